"""SPECT-to-CT registration, as the paper does it ("Each SPECT image was registered to the
corresponding CT image"), with SimpleITK's ``ImageRegistrationMethod``.

Fixed image: the CT (HU) on the evaluation grid, cropped to the lungs, block-averaged to a
working spacing near the SPECT's resolution; restricted to the lungs and a margin around them by a
fixed-image mask. Moving image: the SPECT as read. Metric: Mattes mutual information; optimiser:
regular-step gradient descent with scales from physical shifts, over a multi-resolution pyramid.
Initial transform: identity in world coordinates (the frames of reference of a hybrid SPECT/CT
agree), centre of rotation at the lungs' centroid; an affine registration refines the rigid one.

The transform found maps a CT world point to the SPECT world point that shows the same anatomy
(fixed -> moving, as ITK's transforms run). ``RegisterSpectd`` applies it to the SPECT's *affine*
only: if ``T`` maps CT world to SPECT world, the SPECT voxel that belongs at CT point ``x`` is
``A^-1 T x``, so the registered affine is ``T^-1 A``. The SPECT is then resampled once, by the
grid stage's ``ResampleToMatchd``, as without registration.

Conventions: ctpm's world is RAS mm (``ctpm.geometry``); SimpleITK's physical space is LPS mm.
``to_sitk`` / ``from_sitk`` are the one place where the two meet. Rotations are reported as Euler
angles in degrees about the world (RAS) x, y, z axes, extrinsic, applied x first: R = Rz @ Ry @ Rx
(scipy's ``"xyz"``), and as one total angle (axis-angle magnitude).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from ctpm.data.io import atomic_write
from ctpm.errors import CtpmError
from ctpm.geometry import LPS_TO_RAS, Grid, resample

KINDS = ("none", "rigid", "affine")


@dataclass
class RegistrationSettings:
    """How the registration runs and what it may find (``preprocessing.registration`` overrides)."""

    work_spacing_mm: float = 4.0  # the fixed CT is block-averaged to about this (SPECT resolves ~10 mm)
    shrink_factors: Sequence[int] = (4, 2, 1)  # multi-resolution pyramid, coarse to fine ...
    smoothing_sigmas_mm: Sequence[float] = (8.0, 4.0, 0.0)  # ... and its Gaussian smoothing (mm)
    histogram_bins: int = 32  # Mattes mutual information
    sampling_percentage: float = 0.25  # of the masked fixed voxels per iteration (random, seeded)
    seed: int = 0
    learning_rate: float = 2.0  # first step, mm of physical shift (scales from physical shift)
    min_step: float = 0.02  # the optimiser stops when its step falls below this (mm)
    iterations: int = 200  # per level at most
    mask_margin_mm: float = 15.0  # the fixed mask: the lungs and this much around them (their borders)
    ct_hu_range: Sequence[float] = (-1000.0, 300.0)  # CT clipped to this (bone and metal saturate the histogram)
    max_translation_mm: float = 30.0  # limits: beyond them the registration is an error ...
    max_rotation_deg: float = 10.0
    max_scale_change: float = 0.1  # affine only: |scale - 1|
    metric_tolerance: float = 0.005  # ... as is a mutual information lower than at identity by this share
    threads: int | None = None  # SimpleITK threads (None: its default)

    @classmethod
    def from_any(cls, cfg: Any) -> RegistrationSettings:
        if isinstance(cfg, cls):
            return cfg
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
        if unknown:
            raise CtpmError(f"unknown registration option(s): {', '.join(unknown)}")
        return cls(**cfg)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in d.items()}


@dataclass
class Registration:
    """A SPECT-to-CT registration result.

    ``matrix`` (4x4, world RAS mm) maps a CT point to the SPECT point that shows the same anatomy;
    the registered SPECT affine is ``inv(matrix) @ affine`` (``registered_affine``).
    ``translation_mm`` is the displacement ``matrix @ c - c`` at the lungs' centroid ``center_mm``;
    ``rotation_deg`` the Euler angles (RAS x, y, z; R = Rz Ry Rx) of the rotation part (for an affine,
    the rotation of its polar decomposition), ``rotation_angle_deg`` its total angle and ``scale``
    the singular values of the linear part. Metrics: Mattes mutual information (higher is better)
    over the whole fixed mask at identity and at the result.
    """

    kind: str
    matrix: np.ndarray
    center_mm: np.ndarray
    translation_mm: np.ndarray
    rotation_deg: np.ndarray
    rotation_angle_deg: float
    scale: np.ndarray
    metric_before: float
    metric_after: float
    iterations: int
    seconds: float
    stop_condition: str = ""
    settings: dict = field(default_factory=dict)
    qa: dict | None = field(default=None, repr=False)  # slices for the QA overlay (``write_qa_png``)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, center_mm, **kw) -> Registration:
        m = np.asarray(matrix, np.float64)
        c = np.asarray(center_mm, np.float64)
        r, s = rotation_part(m[:3, :3])
        return cls(matrix=m, center_mm=c, translation_mm=m[:3, :3] @ c + m[:3, 3] - c,
                   rotation_deg=euler_xyz_deg(r), rotation_angle_deg=rotation_angle_deg(r), scale=s, **kw)

    def registered_affine(self, affine) -> np.ndarray:
        """The SPECT's affine once registered: ``inv(matrix) @ affine``."""
        a = affine.numpy() if hasattr(affine, "numpy") else affine
        return np.linalg.inv(self.matrix) @ np.asarray(a, np.float64)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "direction": "matrix maps CT world (RAS mm) to SPECT world; registered SPECT affine = inv(matrix) @ affine",
            "matrix_ras": np.round(self.matrix, 8).tolist(),
            "center_mm": _floats(self.center_mm),
            "translation_mm": _floats(self.translation_mm),
            "rotation_deg": _floats(self.rotation_deg),
            "rotation_convention": "extrinsic about RAS x, y, z: R = Rz @ Ry @ Rx",
            "rotation_angle_deg": float(self.rotation_angle_deg),
            "scale": _floats(self.scale),
            "metric": "Mattes mutual information (higher is better)",
            "metric_before": float(self.metric_before),
            "metric_after": float(self.metric_after),
            "iterations": int(self.iterations),
            "seconds": float(self.seconds),
            "stop_condition": self.stop_condition,
            "settings": self.settings,
        }


def _floats(v) -> list[float]:
    return [float(x) for x in np.asarray(v).ravel()]


# --------------------------------------------------------------------------------------------------
# Geometry: ctpm (RAS, array (i, j, k)) <-> SimpleITK (LPS, array (k, j, i))
# --------------------------------------------------------------------------------------------------


def to_sitk(array: np.ndarray, grid: Grid, dtype=np.float32):
    """An array on a ctpm grid (index (i, j, k) -> world RAS) as a SimpleITK image whose physical
    point (LPS) of each index is the same place: spacing = column norms, direction = unit
    columns, origin = first voxel centre, all of the LPS affine."""
    import SimpleITK as sitk

    grid = Grid.of(grid)
    arr = np.asarray(array)
    if tuple(arr.shape) != grid.shape:
        raise ValueError(f"array of shape {arr.shape} is not on the grid {grid.shape}")
    lps = LPS_TO_RAS @ grid.affine  # diag(-1, -1, 1) is its own inverse
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0), dtype=dtype))  # numpy (k, j, i)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])  # row-major
    return img


def from_sitk(img) -> tuple[np.ndarray, Grid]:
    """A SimpleITK image as (array (i, j, k), ctpm Grid in RAS)."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(img.GetDirection(), np.float64).reshape(3, 3) * np.asarray(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return np.ascontiguousarray(arr), Grid(LPS_TO_RAS @ lps, arr.shape)


def transform_to_matrix(tx) -> np.ndarray:
    """A SimpleITK matrix-offset transform (Euler3D, Affine; LPS) as a 4x4 RAS matrix:
    y = R (x - c) + c + t in LPS, conjugated by diag(-1, -1, 1)."""
    r = np.asarray(tx.GetMatrix(), np.float64).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), np.float64)
    t = np.asarray(tx.GetTranslation(), np.float64)
    lps = np.eye(4)
    lps[:3, :3] = r
    lps[:3, 3] = c + t - r @ c
    return LPS_TO_RAS @ lps @ LPS_TO_RAS


def rotation_part(linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Polar decomposition of a 3x3 linear map: its rotation and its singular values (scales)."""
    u, s, vt = np.linalg.svd(np.asarray(linear, np.float64))
    r = u @ vt
    if np.linalg.det(r) < 0:  # a reflection is not a rotation: flip the weakest axis
        u[:, -1] *= -1
        r = u @ vt
    return r, s


def euler_xyz_deg(r: np.ndarray) -> np.ndarray:
    """Extrinsic x, y, z angles (degrees) of a rotation matrix: R = Rz @ Ry @ Rx."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(r).as_euler("xyz", degrees=True)


def rotation_angle_deg(r: np.ndarray) -> float:
    """The total angle of a rotation matrix (degrees)."""
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def rigid_matrix(rotation_deg: Sequence[float] = (0, 0, 0), translation_mm: Sequence[float] = (0, 0, 0),
                 center_mm: Sequence[float] = (0, 0, 0)) -> np.ndarray:
    """The 4x4 world transform rotating by the Euler angles (R = Rz Ry Rx) about ``center_mm``, then
    moving ``center_mm`` by ``translation_mm``."""
    from scipy.spatial.transform import Rotation

    r = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    c = np.asarray(center_mm, np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + np.asarray(translation_mm, np.float64) - r @ c
    return m


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


def _fixed_images(ct_hu: np.ndarray, ct_grid: Grid, mask: np.ndarray, st: RegistrationSettings):
    """The CT block-averaged to the working spacing, and the fixed mask (the lungs grown by the
    margin) on that grid."""
    import SimpleITK as sitk

    lo, hi = st.ct_hu_range
    ct = to_sitk(np.clip(ct_hu, lo, hi), ct_grid)
    factors = [max(1, int(round(st.work_spacing_mm / s))) for s in ct_grid.spacing]
    m = to_sitk(mask.astype(np.float32), ct_grid)
    if any(f > 1 for f in factors):
        ct = sitk.BinShrink(ct, factors)
        m = sitk.BinShrink(m, factors)
    m = sitk.Cast(m > 0.25, sitk.sitkUInt8)
    radius = [int(np.ceil(st.mask_margin_mm / s)) for s in m.GetSpacing()]
    if any(radius):
        m = sitk.BinaryDilate(m, radius, sitk.sitkBall)
    return ct, m


def _method(st: RegistrationSettings, fixed_mask, *, sample: bool):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(st.histogram_bins))
    reg.SetMetricFixedMask(fixed_mask)
    if sample:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(float(st.sampling_percentage), int(st.seed))
    else:
        reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    if st.threads:
        reg.SetNumberOfThreads(int(st.threads))
    return reg


def _mutual_information(st, fixed, moving, fixed_mask, transform) -> float:
    """Mattes MI (positive: higher is better) over every voxel of the fixed mask."""
    import SimpleITK as sitk

    reg = _method(st, fixed_mask, sample=False)
    reg.SetInitialTransform(sitk.Transform(transform))  # a copy: MetricEvaluate must not move it
    return -float(reg.MetricEvaluate(fixed, moving))


def _optimise(st: RegistrationSettings, fixed, moving, fixed_mask, tx, *, patient=None, path=None) -> tuple[int, str]:
    """Optimise ``tx`` in place over the multi-resolution pyramid; (iterations, stop condition)."""
    import SimpleITK as sitk

    reg = _method(st, fixed_mask, sample=True)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=float(st.learning_rate), minStep=float(st.min_step), numberOfIterations=int(st.iterations),
        relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(f) for f in st.shrink_factors])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in st.smoothing_sigmas_mm])
    reg.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(True)
    reg.SetInitialTransform(tx, inPlace=True)
    iterations = [0]
    reg.AddCommand(sitk.sitkIterationEvent, lambda: iterations.__setitem__(0, iterations[0] + 1))
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:  # ITK: e.g. all samples mapped outside the SPECT
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CtpmError(f"registration of the SPECT to the CT failed ({first})", patient=patient, path=path) from None
    return iterations[0], reg.GetOptimizerStopConditionDescription()


def register_spect(ct_hu: np.ndarray, ct_grid: Grid, spect: np.ndarray, spect_grid: Grid,
                   mask: np.ndarray | None = None, *, kind: str = "rigid",
                   settings: RegistrationSettings | Mapping | None = None,
                   patient: str | None = None, path: str | None = None) -> Registration:
    """Register a SPECT (counts, on ``spect_grid``) to a CT (HU, on ``ct_grid``), both in world RAS.

    ``mask`` (on ``ct_grid``): the lungs; the metric sees them and ``mask_margin_mm`` around them
    (None: the whole CT grid). Raises CtpmError when the result lies beyond the settings' limits or
    lowers the mutual information below identity's (``check_limits``).
    """
    import SimpleITK as sitk

    if kind not in ("rigid", "affine"):
        raise CtpmError(f"register_spect must be one of {', '.join(KINDS)}, not {kind!r}", patient=patient)
    st = RegistrationSettings.from_any(settings)
    ct_grid, spect_grid = Grid.of(ct_grid), Grid.of(spect_grid)
    mask = np.ones(ct_grid.shape, bool) if mask is None else np.asarray(mask) > 0
    if not mask.any():
        raise CtpmError("registration: the fixed mask (lungs) is empty", patient=patient, path=path)
    start = time.perf_counter()
    fixed, fixed_mask = _fixed_images(np.asarray(ct_hu, np.float32), ct_grid, mask, st)
    counts = np.asarray(spect, np.float32)
    top = float(np.percentile(counts, 99.9)) if counts.size else 0.0
    if not top > 0:
        raise CtpmError("registration: the SPECT has no counts", patient=patient, path=path)
    moving = to_sitk(np.clip(counts, 0.0, top), spect_grid)  # one hot voxel must not take the histogram

    center = ct_grid.world(centroid_index(mask)[None])[0]  # the lungs' centroid, RAS
    center_lps = (LPS_TO_RAS[:3, :3] @ center).tolist()
    tx = sitk.Euler3DTransform()
    tx.SetCenter(center_lps)
    identity = sitk.Euler3DTransform(tx)
    before = _mutual_information(st, fixed, moving, fixed_mask, identity)
    iterations, stop = _optimise(st, fixed, moving, fixed_mask, tx, patient=patient, path=path)
    if kind == "affine":  # from the rigid result: the extra degrees of freedom only refine it
        rigid = tx
        tx = sitk.AffineTransform(3)
        tx.SetCenter(center_lps)
        tx.SetMatrix(rigid.GetMatrix())
        tx.SetTranslation(rigid.GetTranslation())
        more, stop = _optimise(st, fixed, moving, fixed_mask, tx, patient=patient, path=path)
        iterations += more
    after = _mutual_information(st, fixed, moving, fixed_mask, tx)
    result = Registration.from_matrix(
        transform_to_matrix(tx), center, kind=kind, metric_before=before, metric_after=after,
        iterations=iterations, seconds=time.perf_counter() - start, stop_condition=stop, settings=st.to_dict())
    check_limits(result, st, patient=patient, path=path)
    return result


def check_limits(reg: Registration, settings: RegistrationSettings | Mapping | None = None, *,
                 patient: str | None = None, path: str | None = None) -> None:
    """A registration beyond the limits, or one that made the mutual information worse, is an error
    (the SPECT is then not this CT's, or the registration has lost its way): a person must look."""
    st = RegistrationSettings.from_any(settings)
    shift = float(np.linalg.norm(reg.translation_mm))
    problems = []
    if shift > st.max_translation_mm:
        problems.append(f"a translation of {shift:.1f} mm at the lungs' centre (limit {st.max_translation_mm:g} mm)")
    if reg.rotation_angle_deg > st.max_rotation_deg:
        problems.append(f"a rotation of {reg.rotation_angle_deg:.1f} degrees (limit {st.max_rotation_deg:g})")
    scale = float(np.max(np.abs(np.asarray(reg.scale) - 1.0)))
    if scale > st.max_scale_change:
        problems.append(f"a scale change of {100 * scale:.1f}% (limit {100 * st.max_scale_change:g}%)")
    if reg.metric_after < reg.metric_before - st.metric_tolerance * abs(reg.metric_before):
        problems.append(f"a lower mutual information than without it ({reg.metric_after:.4f} < {reg.metric_before:.4f})")
    if problems:
        raise CtpmError(f"SPECT-to-CT registration ({reg.kind}) found {' and '.join(problems)}; check the SPECT "
                        "belongs to this CT, or run with preprocessing.register_spect=none or wider "
                        "preprocessing.registration limits", patient=patient, path=path)


# --------------------------------------------------------------------------------------------------
# MONAI transform (grid stage)
# --------------------------------------------------------------------------------------------------


def centroid_index(mask: np.ndarray) -> np.ndarray:
    """Mean voxel index of a mask (from its three projections: no (N, 3) index list)."""
    mask = np.asarray(mask, bool)
    n = mask.sum()
    return np.array([(mask.sum(axis=tuple(a for a in range(3) if a != ax)) * np.arange(mask.shape[ax])).sum() / n
                     for ax in range(3)], np.float64)


def qa_slices(ct_hu: np.ndarray, ct_grid: Grid, lungs: np.ndarray, spect: np.ndarray, spect_grid: Grid,
              registered_affine: np.ndarray) -> dict:
    """Central axial and coronal slices (through the lungs' centroid) of the CT, the lungs and the
    SPECT before and after registration, all on the CT grid; only those two slices are resampled."""
    ct_grid, spect_grid = Grid.of(ct_grid), Grid.of(spect_grid)
    centre = np.rint(centroid_index(lungs)).astype(int)
    out: dict[str, Any] = {"spacing": ct_grid.spacing.tolist()}
    for name, axis in (("axial", 2), ("coronal", 1)):
        lo, hi = np.zeros(3, int), np.asarray(ct_grid.shape)
        lo[axis], hi[axis] = centre[axis], centre[axis] + 1
        sub = ct_grid.crop(lo, hi)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        out[name] = {
            "ct": np.squeeze(ct_hu[sl], axis),
            "lungs": np.squeeze(lungs[sl], axis),
            "before": np.squeeze(resample(spect, spect_grid, sub), axis),
            "after": np.squeeze(resample(spect, Grid(registered_affine, spect_grid.shape), sub), axis),
        }
    return out


class RegisterSpectd(MapTransform):
    """Register each key's image (the SPECT, as read) to the CT on the evaluation grid and give it
    the registered affine (``inv(T) @ affine``); its voxels are untouched, so the SPECT is still
    resampled once, by ``ResampleToMatchd``. The result (a ``Registration``, with QA slices) goes
    into ``out_key``. Put it before ``CheckOverlapd``, which then checks the registered SPECT."""

    def __init__(self, keys="spect", ct_key: str = "ct", lungs_key: str = "lungs", kind: str = "rigid",
                 settings: RegistrationSettings | Mapping | None = None, out_key: str = "registration",
                 allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        if kind not in ("rigid", "affine"):
            raise CtpmError(f"register_spect must be one of {', '.join(KINDS)}, not {kind!r}")
        self.ct_key, self.lungs_key, self.kind, self.out_key = ct_key, lungs_key, kind, out_key
        self.settings = RegistrationSettings.from_any(settings)

    def __call__(self, data):
        d = dict(data)
        ct = d[self.ct_key]
        ct_hu, ct_grid = ct[0].numpy(), Grid.of(ct)
        lungs = d[self.lungs_key][0].numpy() > 0
        for key in self.key_iterator(d):
            img = d[key]
            spect, grid = img[0].numpy(), Grid.of(img)
            reg = register_spect(ct_hu, ct_grid, spect, grid, lungs, kind=self.kind, settings=self.settings,
                                 patient=d.get("patient_id"), path=d.get("sources", {}).get(key))
            new_affine = reg.registered_affine(grid.affine)
            reg.qa = qa_slices(ct_hu, ct_grid, lungs, spect, grid, new_affine)
            moved = img.clone()
            moved.affine = torch.as_tensor(new_affine, dtype=torch.float64)
            d[key] = moved
            d[self.out_key] = reg
        return d


# --------------------------------------------------------------------------------------------------
# Outputs: registration.json, the QA overlay, the cohort table
# --------------------------------------------------------------------------------------------------


def write_registration_json(reg: Registration, path: str | Path, patient: str | None = None) -> Path:
    path = Path(path)
    path.write_text(json.dumps({"patient_id": patient, **reg.to_json()}, indent=1))
    return path


def write_qa_png(reg: Registration, path: str | Path, patient: str | None = None, level: float = 0.5) -> Path:
    """The SPECT's contour at ``level`` of its maximum in the lungs, on the CT (and the lungs'
    outline), central axial and coronal slices, before and after registration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if reg.qa is None:
        raise ValueError("this Registration carries no QA slices")
    sp = reg.qa["spacing"]
    peak = max(float(reg.qa[v]["after"][reg.qa[v]["lungs"]].max(initial=0.0)) for v in ("axial", "coronal"))
    fig, axes = plt.subplots(2, 2, figsize=(9, 8))
    for row, (view, (h, v)) in enumerate((("axial", (0, 1)), ("coronal", (0, 2)))):
        s = reg.qa[view]
        extent = (0, s["ct"].shape[0] * sp[h], 0, s["ct"].shape[1] * sp[v])
        for col, when in enumerate(("before", "after")):
            ax = axes[row, col]
            ax.imshow(s["ct"].T, cmap="gray", vmin=-1000, vmax=300, origin="lower", extent=extent)
            kw = {"origin": "lower", "extent": extent}
            if s["lungs"].any():
                ax.contour(s["lungs"].T.astype(float), levels=[0.5], colors="deepskyblue", linewidths=0.8, **kw)
            if peak > 0 and (s[when] >= level * peak).any():
                ax.contour(s[when].T, levels=[level * peak], colors="orange", linewidths=1.2, **kw)
            ax.set_title(f"{view}, {when} registration", fontsize=9)
            ax.set_xlabel("x (mm, towards R)" if h == 0 else "")
            ax.set_ylabel("y (mm, towards A)" if v == 1 else "z (mm, towards S)")
    t, r = reg.translation_mm, reg.rotation_deg
    fig.suptitle(f"{patient or ''}  {reg.kind}: t = [{t[0]:.1f}, {t[1]:.1f}, {t[2]:.1f}] mm, "
                 f"r = [{r[0]:.1f}, {r[1]:.1f}, {r[2]:.1f}] deg; MI {reg.metric_before:.3f} -> {reg.metric_after:.3f}\n"
                 f"orange: SPECT at {100 * level:.0f}% of its lung maximum; blue: lungs (CT)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


TABLE_COLUMNS = ("patient_id", "kind", "tx_mm", "ty_mm", "tz_mm", "rx_deg", "ry_deg", "rz_deg",
                 "rotation_deg", "metric_before", "metric_after", "iterations", "seconds")


def write_registration_table(records: Iterable[Mapping], path: str | Path) -> Path:
    """The cohort's registrations (``registration.json`` contents, with ``patient_id``) as one CSV."""
    path = Path(path)
    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    w.writerow(TABLE_COLUMNS)
    for r in records:
        t, a = r["translation_mm"], r["rotation_deg"]
        w.writerow([r["patient_id"], r["kind"], *(f"{v:.3f}" for v in t), *(f"{v:.3f}" for v in a),
                    f"{r['rotation_angle_deg']:.3f}", f"{r['metric_before']:.5f}", f"{r['metric_after']:.5f}",
                    int(r["iterations"]), f"{r['seconds']:.2f}"])
    return atomic_write(path, fh.getvalue())
