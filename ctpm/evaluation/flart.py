"""Dose metrics of the lungs for functional lung avoidance radiotherapy (FLART) planning.

A plan is judged by how much dose the lungs receive (paper, "Introduction": FLART spares the high
functional lung, Matuszak et al. report the mean dose in the high functional region); a perfusion
map turns the anatomical metrics into functional ones by weighting each voxel with its perfusion:

- ``MLD`` (Gy): mean lung dose, the mean of the dose over the lung voxels;
- ``V5``, ``V20``, ``V30`` (%): share of the lung volume that receives at least 5, 20, 30 Gy;
- ``fMLD`` (Gy): perfusion-weighted mean dose, sum(D * p) / sum(p);
- ``fV5``, ``fV20``, ``fV30`` (%): share of the lung perfusion in the voxels that receive at least
  5, 20, 30 Gy, 100 * sum(p over D >= x) / sum(p).

Each is given for both lungs together, for each lung (``_right``, ``_left``) and, with a lobe map
(labels 1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL), for each lobe (``_LUL`` ...). Everything is computed on
the grid of the lung mask (the CT's grid): the dose, and a perfusion map given on another grid
(SPECT), are interpolated trilinearly at the centres of the lung voxels in world coordinates.

The lungs come as a label map (``<id>_lungs.nii.gz`` of ctpm-predict, ``lungs.nii.gz`` of
ctpm-preprocess), a lobe map, or the plan's own RT Structure Set (``structures=RS.dcm`` with the
ROI name(s), e.g. "Lungs-GTV"), rasterised onto the grid of the planning CT (``ct=``, its DICOM
series: the structures' contours reference its slices and its frame of reference). The frames of
reference of the CT, the RT Dose and the structures must be one; a functional-volume map
(``<id>_functional.nii.gz``, also 0 / 1 / 2) given as the lungs is refused.

Beside the metrics, the cumulative dose-volume histogram (DVH: % of the lung volume receiving at
least d Gy) and its perfusion-weighted form (% of the lung perfusion at or above d Gy) are written
per patient as a table and a plot (``dvh/<id>_dvh.csv``, ``.png``); at d = 20 Gy they are V20 and fV20.

Perfusion is the CT-based map of ``ctpm-predict`` (standardised: 1.0 = normal-functioning lung) or
a SPECT, standardised the same way (÷ its 75th percentile in the lungs, clipped to 1) so that both
weight the dose with the same quantity. The scale itself cancels in fMLD and fVx; the clip does not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctpm.batch import BatchResult, Failure
from ctpm.data.io import DESCRIPTIONS, Volume, atomic_write, check_patient_tag, load_image
from ctpm.data.lungs import LEFT, RIGHT
from ctpm.data.manifest import Manifest
from ctpm.data.transforms import standardise_spect
from ctpm.errors import CtpmError, user_error, warn
from ctpm.evaluation.evaluate import find_predictions
from ctpm.evaluation.report import json_safe
from ctpm.evaluation.stats import LOBES, describe, paired_comparison
from ctpm.geometry import Grid, dicom_affine, sample_at

THRESHOLDS_GY = (5.0, 20.0, 30.0)
#: Lobe labels of the lobe map (design card) and which lung each belongs to.
LOBE_LABELS = {i + 1: name for i, name in enumerate(LOBES)}
RIGHT_LOBES, LEFT_LOBES = (3, 4, 5), (1, 2)
#: The source of the per-patient rows SPECT-based minus CT-based (the others: "ct", "spect").
DIFFERENCE = "spect_minus_ct"
#: The metrics whose SPECT-vs-CT difference is tested (paired Wilcoxon) in summary.json.
TESTED = ("fMLD", "fV20")
#: No lung plan comes near this; a dose above it is almost certainly in cGy.
MAX_PLAUSIBLE_GY = 300.0
# RT Dose summation types that are a part of the plan's dose, not the plan's: metrics of these
# would look valid and be wrong.
PARTIAL_DOSE_TYPES = ("BEAM", "FRACTION", "CONTROL_POINT", "BEAM_SESSION", "FRACTION_SESSION", "BRACHY_SESSION")


def metric_names(thresholds_gy: Sequence[float] = THRESHOLDS_GY) -> list[str]:
    """Names of the metrics in output order: MLD, Vx..., fMLD, fVx..."""
    vx = [f"V{x:g}" for x in thresholds_gy]
    return ["MLD", *vx, "fMLD", *(f"f{v}" for v in vx)]


def metric_units(thresholds_gy: Sequence[float] = THRESHOLDS_GY) -> dict[str, str]:
    return {m: ("Gy" if m.endswith("MLD") else "%") for m in metric_names(thresholds_gy)}


# --------------------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------------------


def dose_metrics(dose_gy: np.ndarray, perfusion: np.ndarray | None = None,
                 thresholds_gy: Sequence[float] = THRESHOLDS_GY) -> dict[str, float]:
    """MLD (Gy) and Vx (%) of the voxels' dose, and with a perfusion per voxel fMLD (Gy) and fVx (%).

    dose_gy, perfusion: values of the same voxels (any shape, same size). Negative perfusion (a
    CT-based map may dip below 0 near the pleura) weighs nothing. Undefined values are NaN: no voxel,
    or no perfusion at all.
    """
    d = np.asarray(dose_gy, np.float64).ravel()
    out: dict[str, float] = dict.fromkeys(metric_names(thresholds_gy), math.nan)
    if d.size:
        out["MLD"] = float(d.mean())
        for x in thresholds_gy:
            out[f"V{x:g}"] = 100.0 * float(np.count_nonzero(d >= x)) / d.size
    if perfusion is None:
        return {k: v for k, v in out.items() if not k.startswith("f")}
    w = np.clip(np.asarray(perfusion, np.float64).ravel(), 0.0, None)
    if w.shape != d.shape:
        raise ValueError(f"dose has {d.size} voxels, perfusion {w.size}")
    total = float(w.sum())
    if total > 0:
        out["fMLD"] = float((d * w).sum() / total)
        for x in thresholds_gy:
            out[f"fV{x:g}"] = 100.0 * float(w[d >= x].sum()) / total
    return out


# --------------------------------------------------------------------------------------------------
# Reading the dose
# --------------------------------------------------------------------------------------------------


def load_dose(path: str | Path, *, patient: str | None = None, unit: str = "Gy") -> Volume:
    """A plan dose in Gy from a NIfTI file (in `unit`: Gy or cGy), a DICOM RT Dose file, or a folder
    holding one RT Dose file."""
    path = Path(path)
    if unit not in ("Gy", "cGy"):
        raise CtpmError(f"dose_unit must be Gy or cGy, not {unit!r}")
    if path.name.endswith((".nii", ".nii.gz")):
        vol = load_image(path, kind="dose", patient=patient)
        if unit == "cGy":
            vol.array /= 100.0
    else:
        try:
            vol = read_rtdose(_rtdose_file(path))
        except CtpmError as err:
            raise err.with_context(patient=patient, path=path) from None
        vol.meta["source"] = str(path)
    top = float(vol.array.max())
    if top > MAX_PLAUSIBLE_GY:
        hint = " (is it in cGy? pass dose_unit=cGy)" if unit == "Gy" and vol.meta.get("format") == "nifti" else ""
        raise CtpmError(f"dose reaches {top:.0f} Gy, more than any lung plan{hint}", patient=patient, path=path)
    if float(vol.array.min()) < -0.01 * max(top, 1e-6):
        raise CtpmError(f"dose holds negative values (min {float(vol.array.min()):.3g} Gy)", patient=patient, path=path)
    return vol


def _rtdose_file(path: Path) -> Path:
    import pydicom

    if not path.exists():
        raise CtpmError("file does not exist")
    if path.is_file():
        return path
    found = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            if pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality") == "RTDOSE":
                found.append(f)
        except Exception:  # noqa: BLE001 - not DICOM (a README): not a dose
            continue
    if len(found) != 1:
        raise CtpmError(f"folder holds {len(found)} RT Dose files; give the plan's RT Dose file itself")
    return found[0]


def read_rtdose(path: Path) -> Volume:
    """A DICOM RT Dose file -> Volume in Gy on its own grid (world RAS, like ``ctpm.data.io``).

    Dose = stored value x DoseGridScaling; frame k lies at ImagePositionPatient + GridFrameOffsetVector[k]
    (relative to the first frame's, which covers both forms of the vector the standard allows) along
    the normal of ImageOrientationPatient.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise CtpmError(f"cannot read the DICOM file ({type(exc).__name__}: {exc})", path=path) from None
    if ds.get("Modality") != "RTDOSE":
        raise CtpmError(f"not an RT Dose (Modality {ds.get('Modality', 'missing')}); give the plan's RT Dose file",
                        path=path)
    units = str(ds.get("DoseUnits", "")).upper()
    if units != "GY":
        raise CtpmError(f"RT Dose is in {units or 'unknown'} units; an absolute dose in Gy (DoseUnits GY) is needed",
                        path=path)
    summation = str(ds.get("DoseSummationType", "")).upper()
    if summation in PARTIAL_DOSE_TYPES:
        raise CtpmError(f"RT Dose is a {summation} dose, not the plan's; export the plan dose (DoseSummationType PLAN)",
                        path=path)
    missing = [k for k in ("DoseGridScaling", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
               if k not in ds]
    if missing:
        raise CtpmError(f"RT Dose lacks {', '.join(missing)}", path=path)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - compressed without a decoder, truncated
        raise CtpmError(f"cannot read the RT Dose pixel data ({type(exc).__name__}: {exc})", path=path) from None
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames < 2:
        raise CtpmError("RT Dose has a single frame; a 3-D dose grid is needed", path=path)
    offsets = np.asarray([float(v) for v in ds.get("GridFrameOffsetVector", [])])
    if offsets.size != frames:
        raise CtpmError(f"RT Dose has {frames} frames but {offsets.size} GridFrameOffsetVector values", path=path)
    steps = np.diff(offsets - offsets[0])
    step = float(np.median(steps))
    if abs(step) < 1e-6 or np.max(np.abs(steps - step)) > 1e-3 + 1e-3 * abs(step):
        raise CtpmError("RT Dose frames are not evenly spaced (GridFrameOffsetVector); resample it in the TPS",
                        path=path)
    affine = dicom_affine(ds.ImageOrientationPatient, ds.ImagePositionPatient, ds.PixelSpacing, step)
    gy = stored.reshape(frames, rows, cols).astype(np.float32) * np.float32(float(ds.DoseGridScaling))
    array = np.ascontiguousarray(np.transpose(gy, (2, 1, 0)))  # (frame, row, col) -> (i = col, j = row, k = frame)
    meta = {"format": "dicom", "modality": "RTDOSE", "dose_type": str(ds.get("DoseType", "")),
            "dose_summation_type": summation,
            "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", ""))}
    return Volume(array, affine, meta)


# --------------------------------------------------------------------------------------------------
# Lungs, and every map sampled at the lung voxels
# --------------------------------------------------------------------------------------------------


@dataclass
class LungRegions:
    """The lung voxels of one patient, on the grid of their mask, and the regions among them.

    world: (N, 3) world RAS mm of the voxel centres; regions: name -> (N,) bool ("lungs" always,
    "right"/"left" when the sides are known, a lobe's name when a lobe map is given).
    """

    grid: Grid
    index: tuple[np.ndarray, np.ndarray, np.ndarray]
    world: np.ndarray
    regions: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    @property
    def voxel_ml(self) -> float:
        return self.grid.voxel_ml

    def values_of(self, vol: Volume, *, order: int = 1) -> tuple[np.ndarray, float]:
        """`vol` at the lung voxels (trilinear for order 1, nearest for 0) and the fraction of them
        that lie within its grid. Within half a voxel of the outermost centres the edge value is
        taken (that is what the grid's voxels cover); further out 0."""
        grid = Grid.of(vol)
        if grid.same_as(self.grid):
            return np.asarray(vol.array[self.index], np.float32), 1.0
        values = sample_at(vol.array, grid, self.world, order=order, fill=0.0, edge="voxel")
        return values.astype(np.float32, copy=False), float(grid.contains(self.world).mean())


def lung_regions(lungs: Volume | None, lobes: Volume | None = None, *, patient: str | None = None) -> LungRegions:
    """The lung voxels and regions from a lung mask and/or a lobe map.

    lungs: 1 right / 2 left labels (``lungs.nii.gz`` of ctpm-preprocess, the prediction's lungs) or a
    binary mask (0/1, or 0 and any one value: both lungs, sides unknown). lobes: 1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL;
    alone they define the lungs and their sides, with a mask they are read within it (and tell the
    sides of a binary mask). The grid is the mask's (the lobe map's when there is no mask).
    """
    if lungs is None and lobes is None:
        raise CtpmError("give the lungs (a lung mask or label map) or a lobe map", patient=patient)
    ref = lungs if lungs is not None else lobes
    labels = np.rint(ref.array).astype(np.int16)
    where = ref.meta.get("source")
    if lungs is not None:
        present = set(np.unique(labels).tolist())
        if len(present - {0}) == 1 and max(present) > 2:
            labels = (labels > 0).astype(np.int16)  # a binary mask stored as 0 / 255 (or any one value)
        elif not present <= {0, 1, 2}:
            raise CtpmError(f"lung mask holds labels {sorted(present)[:8]}; expected 1 right / 2 left or a binary "
                            "mask (give lobes as lobes=)", patient=patient, path=where)
    inside = labels > 0
    if not inside.any():
        raise CtpmError("the lung mask is empty", patient=patient, path=where)
    index = np.nonzero(inside)
    grid = Grid.of(ref)
    world = grid.world(np.stack(index, axis=1))
    out = LungRegions(grid, index, world, {"lungs": np.ones(len(world), bool)})
    values = labels[index]
    lobe_values = None
    if lobes is not None:
        lobe_values = np.rint(out.values_of(lobes, order=0)[0]).astype(np.int16) if lungs is not None else values
        bad = sorted(set(np.unique(lobe_values).tolist()) - {0, *LOBE_LABELS})
        if bad:
            raise CtpmError(f"lobe map holds labels {bad}; expected 1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL",
                            patient=patient, path=lobes.meta.get("source"))
        covered = float((lobe_values > 0).mean())
        if covered < 0.5:  # lobes off the lungs would give zero lobe volumes and blank lobe metrics
            raise CtpmError(f"the lobe map covers {100 * covered:.0f}% of the lung voxels (it lies off the lungs: "
                            "another patient's, or not in this CT's frame of reference?)",
                            patient=patient, path=lobes.meta.get("source"))
        absent = [name for label, name in LOBE_LABELS.items() if not (lobe_values == label).any()]
        if absent:
            warn(f"lobe(s) {', '.join(absent)} of the lobe map have no voxel inside the lungs; their metrics are "
                 f"left blank ({lobes.meta.get('source')})", patient=patient)
    if lungs is not None and np.any(values == LEFT):
        out.regions["right"], out.regions["left"] = values == RIGHT, values == LEFT
        out.source = "lung labels"
    elif lobe_values is not None:
        out.regions["right"], out.regions["left"] = np.isin(lobe_values, RIGHT_LOBES), np.isin(lobe_values, LEFT_LOBES)
        out.source = "lobes" if lungs is None else "lung mask, sides from lobes"
    else:
        out.source = "lung mask"
    if lobe_values is not None:
        for label, name in LOBE_LABELS.items():
            out.regions[name] = lobe_values == label
    return out


def perfusion_at(regions: LungRegions, perfusion: Volume, *, kind: str, patient: str | None = None,
                 min_coverage: float = 0.95) -> np.ndarray:
    """Perfusion weights at the lung voxels: a CT-based map as it is, a SPECT standardised to its
    75th percentile in the lungs and clipped to 1 (``standardise_spect``, as ctpm trains on)."""
    if kind not in ("prediction", "spect"):
        raise CtpmError(f"perfusion_kind must be prediction or spect, not {kind!r}")
    values, coverage = regions.values_of(perfusion)
    where = perfusion.meta.get("source")
    if coverage < min_coverage:
        raise CtpmError(f"the {kind} covers only {100 * coverage:.1f}% of the lungs; is it on this patient's CT?",
                        patient=patient, path=where)
    if kind == "spect":
        try:
            values, _ = standardise_spect(values, np.ones(values.shape, bool))
        except CtpmError as err:
            raise err.with_context(patient=patient, path=where) from None
    if not np.any(values > 0):
        raise CtpmError(f"the {kind} map is zero everywhere in the lungs; is it registered to this CT?",
                        patient=patient, path=where)
    return values


def dose_at(regions: LungRegions, dose: Volume, *, patient: str | None = None,
            min_coverage: float = 0.95) -> tuple[np.ndarray, float]:
    """The dose (Gy) at the lung voxels, and the fraction of them inside the dose grid. Voxels
    outside get 0 Gy; a grid that misses more than 1 - min_coverage of the lungs is refused (a
    wrong or unregistered dose), one that misses less is accepted with a warning."""
    values, coverage = regions.values_of(dose)
    where = dose.meta.get("source")
    if coverage == 0:
        raise CtpmError("the dose grid does not overlap the lungs; is the dose in this CT's frame of reference?",
                        patient=patient, path=where)
    if coverage < min_coverage:
        raise CtpmError(f"the dose grid covers only {100 * coverage:.1f}% of the lungs (at least "
                        f"{100 * min_coverage:g}% needed, min_dose_coverage); is it this patient's plan?",
                        patient=patient, path=where)
    if coverage < 1:
        warn(f"the dose grid misses {100 * (1 - coverage):.2f}% of the lung voxels; they count as 0 Gy",
             patient=patient)
    return values, coverage


def region_metrics(dose_gy: np.ndarray, perfusion: np.ndarray, regions: LungRegions,
                   thresholds_gy: Sequence[float] = THRESHOLDS_GY) -> dict[str, float]:
    """Every metric for every region: ``MLD``, ``fV20`` ... for both lungs, ``MLD_right``,
    ``fV20_LUL`` ... for the lungs and lobes; ``volume_ml[_region]`` beside them."""
    row: dict[str, float] = {}
    for name, sel in regions.regions.items():
        suffix = "" if name == "lungs" else f"_{name}"
        row[f"volume_ml{suffix}"] = float(np.count_nonzero(sel)) * regions.voxel_ml
        for metric, value in dose_metrics(dose_gy[sel], perfusion[sel], thresholds_gy).items():
            row[f"{metric}{suffix}"] = value
    return row


# --------------------------------------------------------------------------------------------------
# One patient, a cohort
# --------------------------------------------------------------------------------------------------


@dataclass
class FlartSettings:
    thresholds_gy: tuple[float, ...] = THRESHOLDS_GY
    dose_unit: str = "Gy"
    min_dose_coverage: float = 0.95
    min_perfusion_coverage: float = 0.95

    def __post_init__(self):
        self.thresholds_gy = tuple(sorted(float(x) for x in self.thresholds_gy))
        if not self.thresholds_gy or min(self.thresholds_gy) < 0:
            raise CtpmError("thresholds_gy must be a non-empty list of doses >= 0 Gy")
        for name in ("min_dose_coverage", "min_perfusion_coverage"):
            if not 0 < getattr(self, name) <= 1:
                raise CtpmError(f"{name} must lie in (0, 1]")


def flart_patient(dose: str | Path, perfusion: str | Path, *, lungs: str | Path | None = None,
                  lobes: str | Path | None = None, kind: str = "prediction", patient_id: str = "patient",
                  settings: FlartSettings | None = None, structures: str | Path | None = None,
                  lungs_roi: Any = None, ct: str | Path | None = None, registration: str | Path | None = None,
                  dvh: dict[str, pd.DataFrame] | None = None) -> dict[str, Any]:
    """The metrics of one plan with one perfusion map (a row of flart.csv).

    The lungs: `lungs` (labels or a mask) and/or `lobes`, or `structures` (an RT Structure Set) with
    `lungs_roi` rasterised on the DICOM CT `ct`. With `ct` the frames of reference of CT, RT Dose and
    structures are compared. `dvh`, when given, receives the patient's DVH table under its id.
    """
    s = settings or FlartSettings()
    frames: dict[str, str] = {}
    if structures is not None:
        if ct is None:
            raise CtpmError("structures= needs ct=, the planning CT's DICOM series: the contours are drawn on "
                            "its slices", patient=patient_id)
        if lungs is not None:
            raise CtpmError("give the lungs once: lungs= or structures= with lungs_roi=", patient=patient_id)
        lung_vol = structure_lungs(structures, lungs_roi, ct, patient=patient_id)
        frames[f"the RT Structure Set ({structures})"] = lung_vol.meta["frame_of_reference_uid"]
    else:
        lung_vol = _lung_labels(lungs, patient_id)
        if ct is not None:
            ct_meta = load_image(ct, kind="ct", patient=patient_id).meta
            frames[f"the CT ({ct})"] = ct_meta.get("frame_of_reference_uid", "")
    regions = lung_regions(lung_vol, _maybe_label(lobes, patient_id), patient=patient_id)
    if structures is not None:
        regions.source = "structures " + ", ".join(_roi_names(lungs_roi))
    dose_vol = load_dose(dose, patient=patient_id, unit=s.dose_unit)
    frames[f"the RT Dose ({dose})"] = dose_vol.meta.get("frame_of_reference_uid", "")
    check_frames_of_reference(frames, patient=patient_id)
    dose_gy, coverage = dose_at(regions, dose_vol, patient=patient_id, min_coverage=s.min_dose_coverage)
    perf_vol = load_image(perfusion, kind="spect" if kind == "spect" else "perfusion", patient=patient_id)
    if kind == "spect" and (reg := registration or registration_beside(lungs)) is not None:
        perf_vol = registered(perf_vol, reg)
    perf = perfusion_at(regions, perf_vol, kind=kind, patient=patient_id, min_coverage=s.min_perfusion_coverage)
    if dvh is not None:
        dvh[patient_id] = dvh_table(dose_gy, {kind: perf}, regions)
    return {"patient_id": patient_id, "source": kind, "lungs_from": regions.source, "dose_coverage": coverage,
            **region_metrics(dose_gy, perf, regions, s.thresholds_gy)}


def _roi_names(rois: Any) -> list[str]:
    if isinstance(rois, str):
        return [rois]
    if isinstance(rois, Mapping):
        return [f"{k}={v}" for k, v in rois.items()]
    return [str(r) for r in rois]


def lungs_file(lungs: str | Path, patient_id: str) -> Path:
    """A patient's lung labels in a cohort: ``{patient_id}`` in `lungs` replaced by the id, or else
    `lungs` taken as the folder of ctpm-preprocess, which writes ``<patient_id>/lungs.nii.gz`` (the
    lungs the model saw, 1 right / 2 left, in the CT's geometry)."""
    text = str(lungs)
    if "{patient_id}" in text:
        return Path(text.replace("{patient_id}", patient_id))
    return Path(text) / patient_id / "lungs.nii.gz"


def _maybe_label(path: str | Path | None, patient: str | None) -> Volume | None:
    return None if path is None else load_image(path, kind="label", patient=patient)


def _lung_labels(path: str | Path | None, patient: str | None) -> Volume | None:
    """A lung label map or mask, refusing ctpm-predict's functional-volume map: it holds 0 / 1 / 2
    too, and read as lungs it would give the high-functioning lung as the left lung."""
    vol = _maybe_label(path, patient)
    if vol is not None and is_functional_map(vol):
        raise CtpmError("this is a functional-volume map (1 low, 2 high), not the lungs; give ctpm-predict's "
                        "<id>_lungs.nii.gz (1 right, 2 left) or the plan's structures (structures=RS.dcm "
                        "lungs_roi=NAME ct=CT)", patient=patient, path=path)
    return vol


def is_functional_map(vol: Volume) -> bool:
    """ctpm-predict's functional-volume map: by its header (``descrip``), or, for files written
    before ctpm recorded it, by its name ``<id>_functional.nii[.gz]`` and labels within 0 / 1 / 2."""
    if vol.meta.get("description") == DESCRIPTIONS["functional"]:
        return True
    name = Path(str(vol.meta.get("source", ""))).name
    tagged_lungs = vol.meta.get("description") == DESCRIPTIONS["lungs"]
    if name.endswith(("_functional.nii.gz", "_functional.nii")) and not tagged_lungs:
        return bool(set(np.unique(np.rint(vol.array)).tolist()) <= {0, 1, 2})
    return False


def registration_beside(lungs: str | Path | None) -> Path | None:
    """The SPECT-to-CT registration of a patient's ctpm-preprocess cache entry, when `lungs` is that
    patient's ``<cache>/<id>/lungs.nii.gz`` and an entry below holds ``registration.json``
    (``preprocessing.register_spect``). Entries of several configs with different transforms are
    ambiguous: refused, name one with registration=."""
    if lungs is None or Path(lungs).name != "lungs.nii.gz":
        return None
    found = sorted(Path(lungs).parent.glob("*/registration.json"))
    if len(found) <= 1:
        return found[0] if found else None
    matrices = [np.asarray(_registration_matrix(f)) for f in found]
    if all(np.allclose(m, matrices[0], atol=1e-6) for m in matrices[1:]):
        return found[0]
    raise CtpmError(f"{len(found)} cache entries hold different SPECT-to-CT registrations "
                    f"({', '.join(str(f) for f in found)}); name one with registration=PATH", path=lungs)


def _registration_matrix(path: str | Path) -> np.ndarray:
    import json

    try:
        record = json.loads(Path(path).read_text())
        m = np.asarray(record["matrix_ras"], np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CtpmError(f"not a ctpm registration.json ({type(exc).__name__}: {exc})", path=path) from None
    if m.shape != (4, 4) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:3, :3])) < 1e-6:
        raise CtpmError("registration.json holds no invertible 4x4 matrix_ras", path=path)
    return m


def registered(spect: Volume, registration: str | Path) -> Volume:
    """The SPECT placed on the CT by a ctpm registration (``registration.json``: ``matrix_ras`` maps a
    CT point to the SPECT point of the same anatomy, so the registered affine is inv(matrix) @ affine,
    as ``ctpm.data.registration.Registration.registered_affine``). The voxels are not resampled."""
    m = _registration_matrix(registration)
    return Volume(spect.array, np.linalg.inv(m) @ spect.affine, {**spect.meta, "registration": str(registration)})


def check_frames_of_reference(uids: Mapping[str, str], *, patient: str | None = None) -> None:
    """One frame of reference for every DICOM object of a plan (name -> FrameOfReferenceUID; objects
    without one, e.g. NIfTI files, are left out). Two frames mean two coordinate systems: a dose or
    structures of another CT, or of the same patient scanned again, which no resampling fixes."""
    known = {name: uid for name, uid in uids.items() if uid}
    for (a, ua), (b, ub) in zip(list(known.items()), list(known.items())[1:]):
        if ua != ub:
            raise CtpmError(f"frames of reference differ: {a} has FrameOfReferenceUID {ua}, {b} has {ub}; "
                            "export the dose and structures of the plan on this CT", patient=patient)


def structure_lungs(structures: str | Path, rois: Any, ct: str | Path, *, patient: str | None = None) -> Volume:
    """The lungs from the plan's RT Structure Set, as labels on the grid of the DICOM CT `ct`.

    rois: one ROI name (a whole-lung structure such as "Lungs-GTV": sides unknown), a list of names
    (their union), or a mapping {"right": name(s), "left": name(s)} (1 right, 2 left). Checks that the
    structures are in the CT's frame of reference. meta holds both frames of reference.
    """
    from ctpm.data.dicom_export import load_dicom_ct, rasterise_rois, read_structure_set

    ct_vol = load_dicom_ct(ct, patient=patient)
    rs = read_structure_set(structures, patient=patient)
    check_frames_of_reference({f"the CT ({ct})": ct_vol.meta.get("frame_of_reference_uid", ""),
                               f"the RT Structure Set ({structures})": rs.frame_of_reference_uid}, patient=patient)
    if rois is None or (not isinstance(rois, (str, Mapping)) and not list(rois)):
        raise CtpmError("with structures=, name the lung ROI(s): lungs_roi=NAME, lungs_roi=[NAME,NAME] or "
                        "lungs_roi={right: NAME, left: NAME}; the structure set holds "
                        f"{', '.join(map(repr, sorted(rs.contours)))}", patient=patient, path=structures)

    def names(v: Any) -> list[str]:
        return [v] if isinstance(v, str) else [str(x) for x in v]

    labels = np.zeros(ct_vol.shape, np.uint8)
    if isinstance(rois, Mapping):
        if set(rois) != {"right", "left"}:
            raise CtpmError(f"lungs_roi as a mapping takes the keys right and left, not {sorted(rois)}")
        right = rasterise_rois(rs, names(rois["right"]), ct_vol.affine, ct_vol.shape, patient=patient)
        left = rasterise_rois(rs, names(rois["left"]), ct_vol.affine, ct_vol.shape, patient=patient)
        labels[right] = RIGHT
        labels[left & ~right] = LEFT
    else:
        labels[rasterise_rois(rs, names(rois), ct_vol.affine, ct_vol.shape, patient=patient)] = 1
    return Volume(labels, ct_vol.affine, {"source": str(structures), "format": "rtstruct",
                                          "frame_of_reference_uid": rs.frame_of_reference_uid})


# --------------------------------------------------------------------------------------------------
# Dose-volume histograms
# --------------------------------------------------------------------------------------------------

DVH_STEP_GY = 0.1
DVH_REGIONS = ("lungs", "right", "left")


def cumulative_dvh(dose_gy: np.ndarray, doses: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """% of the voxels (or, with weights, of the weight; negative weights count 0) at dose >= each
    of `doses` (Gy): the cumulative DVH. NaN when there is nothing to count."""
    d = np.asarray(dose_gy, np.float64).ravel()
    w = np.ones_like(d) if weights is None else np.clip(np.asarray(weights, np.float64).ravel(), 0.0, None)
    total = float(w.sum())
    if d.size == 0 or total <= 0:
        return np.full(len(doses), math.nan)
    order = np.argsort(d, kind="stable")
    d_sorted, tail = d[order], np.cumsum(w[order][::-1])[::-1]  # tail[i]: weight of the voxels from i on
    first = np.searchsorted(d_sorted, np.asarray(doses, np.float64), side="left")  # first voxel >= dose
    at_or_above = np.where(first < d.size, tail[np.minimum(first, d.size - 1)], 0.0)
    return 100.0 * at_or_above / total


def dvh_table(dose_gy: np.ndarray, maps: Mapping[str, np.ndarray], regions: LungRegions,
              step_gy: float = DVH_STEP_GY) -> pd.DataFrame:
    """The DVH and perfusion-weighted DVH of each region (whole lungs, right, left): columns
    ``dose_gy``, ``V_<region>`` (% volume) and ``fV_<region>_<source>`` (% perfusion) per map."""
    top = float(np.max(dose_gy)) if np.size(dose_gy) else 0.0
    doses = np.round(np.arange(0.0, top + step_gy, step_gy), 6)
    table: dict[str, np.ndarray] = {"dose_gy": doses}
    for name in DVH_REGIONS:
        if name not in regions.regions:
            continue
        sel = regions.regions[name]
        table[f"V_{name}"] = cumulative_dvh(dose_gy[sel], doses)
        for source, w in maps.items():
            table[f"fV_{name}_{source}"] = cumulative_dvh(dose_gy[sel], doses, w[sel])
    return pd.DataFrame(table)


def write_dvh(tables: Mapping[str, pd.DataFrame], out: str | Path) -> dict[str, Path]:
    """``<out>/dvh/<id>_dvh.csv`` and ``<id>_dvh.png`` per patient (solid: volume, dashed: perfusion;
    one colour per region), each written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder = Path(out) / "dvh"
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    colours = {"lungs": "black", "right": "tab:blue", "left": "tab:red"}
    styles = ["--", ":", "-."]
    for pid, df in tables.items():
        files[f"{pid}_csv"] = atomic_write(folder / f"{pid}_dvh.csv", df.to_csv(index=False, float_format="%.6g"))
        fig, ax = plt.subplots(figsize=(6.0, 4.0))
        try:
            for name in DVH_REGIONS:
                if f"V_{name}" not in df:
                    continue
                ax.plot(df["dose_gy"], df[f"V_{name}"], color=colours[name], lw=1.5, label=f"{name}: volume")
                weighted = [c for c in df if c.startswith(f"fV_{name}_")]
                for style, col in zip(styles, weighted):
                    ax.plot(df["dose_gy"], df[col], color=colours[name], lw=1.2, ls=style,
                            label=f"{name}: perfusion ({col[len(f'fV_{name}_'):]})")
            ax.set(xlabel="dose (Gy)", ylabel="% at or above the dose", ylim=(0, 101), xlim=(0, None),
                   title=f"{pid}: DVH and perfusion-weighted DVH")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        finally:
            plt.close(fig)
        files[f"{pid}_png"] = atomic_write(folder / f"{pid}_dvh.png", buffer.getvalue())
    return files


def flart_cohort(manifest: Manifest, predictions: Any, *, lungs: str | Path | None = None,
                 settings: FlartSettings | None = None, progress: bool = False) -> dict[str, Any]:
    """Every patient of the manifest with a dose: metrics with the CT-based map
    (``<predictions>/<id>.nii.gz``) and with the SPECT, and SPECT minus CT-based.

    Lungs, in this order: `lungs` (see :func:`lungs_file`), the manifest's ``lung_mask``, its
    ``lobes``. A SPECT is placed by the cache entry's ``registration.json`` when `lungs` is a
    ctpm-preprocess cache made with ``register_spect`` (:func:`registration_beside`). Lobes, when
    the manifest has them, also give the per-lobe metrics. Every patient is tried: the good ones
    give their rows, the bad ones come back in ``failed`` (the caller writes the table of the good
    ones, then reports the bad ones together). A cohort in which no patient worked is an error.

    Returns {"rows": [...], "summary": {...}, "dvh": {patient_id: table}, "failed": [Failure]}
    (see :func:`summarise`, :func:`dvh_table`).
    """
    from tqdm.auto import tqdm

    s = settings or FlartSettings()
    with_dose = [p for p in manifest if p.dose is not None]
    if not with_dose:
        raise CtpmError("no patient of the manifest has a dose (column 'dose')", path=manifest.path)
    found, missing = find_predictions(predictions, [p.patient_id for p in with_dose])
    if not found:
        raise CtpmError(f"no CT-based prediction <patient_id>.nii.gz for any of the {len(with_dose)} patients with a "
                        f"dose (e.g. {with_dose[0].patient_id}) in {predictions}")
    if missing:
        warn(f"{len(missing)} patient(s) with a dose have no CT-based prediction and are left out: "
             f"{', '.join(missing)}")
    rows: list[dict[str, Any]] = []
    failed: list[Failure] = []
    without_spect: list[str] = []
    curves: dict[str, pd.DataFrame] = {}
    todo = [p for p in with_dose if p.patient_id in found]
    for p in tqdm(todo, desc="ctpm-flart", unit="patient", disable=not progress or len(todo) < 2):
        pid = p.patient_id
        try:
            lungs_path = lungs_file(lungs, pid) if lungs else p.lung_mask
            if lungs_path is None and p.lobes is None:
                raise CtpmError("no lungs: pass lungs=CACHE (the ctpm-preprocess folder, with "
                                "<patient_id>/lungs.nii.gz) or give the manifest a lung_mask or lobes column")
            regions = lung_regions(_lung_labels(lungs_path, pid), _maybe_label(p.lobes, pid), patient=pid)
            dose_gy, coverage = dose_at(regions, load_dose(p.dose, patient=pid, unit=s.dose_unit), patient=pid,
                                        min_coverage=s.min_dose_coverage)
            ct_map = load_image(found[pid], kind="perfusion", patient=pid)
            check_patient_tag(ct_map, pid, found[pid])  # not another patient's map under this name
            maps = {"ct": perfusion_at(regions, ct_map, kind="prediction", patient=pid,
                                       min_coverage=s.min_perfusion_coverage)}
            if p.spect is not None:
                spect = load_image(p.spect, kind="spect", patient=pid)
                if (reg := registration_beside(lungs_path)) is not None:
                    spect = registered(spect, reg)
                maps["spect"] = perfusion_at(regions, spect, kind="spect", patient=pid,
                                             min_coverage=s.min_perfusion_coverage)
            else:
                without_spect.append(pid)
        except (CtpmError, OSError) as exc:
            failed.append(Failure.from_error(user_error(exc), pid))
            continue
        base = {"patient_id": pid, "cohort": p.cohort, "institution": p.institution,
                "lungs_from": regions.source, "dose_coverage": coverage}
        by_source = {src: region_metrics(dose_gy, w, regions, s.thresholds_gy) for src, w in maps.items()}
        curves[pid] = dvh_table(dose_gy, maps, regions)
        rows += [{**base, "source": src, **m} for src, m in by_source.items()]
        if "spect" in by_source:
            weighted = [k for k in by_source["ct"] if k.startswith("f")]
            rows.append({**base, "source": DIFFERENCE,
                         **{k: by_source["spect"][k] - by_source["ct"][k] for k in weighted}})
    if not rows:  # nothing to tabulate: the failures are the answer
        BatchResult(failed=failed).raise_if_failed("evaluated")
    if without_spect:
        warn(f"{len(without_spect)} patient(s) have no SPECT; CT-based metrics only: {', '.join(without_spect)}")
    summary = summarise(rows, s.thresholds_gy)
    summary.update(missing_prediction=missing, without_spect=without_spect,
                   failed=[{"patient_id": f.patient, "error": f.message, "file": f.path} for f in failed])
    return {"rows": rows, "summary": summary, "dvh": curves, "failed": failed}


# --------------------------------------------------------------------------------------------------
# Statistics and files
# --------------------------------------------------------------------------------------------------


def metric_columns(rows: Iterable[Mapping[str, Any]], thresholds_gy: Sequence[float] = THRESHOLDS_GY) -> list[str]:
    """The metric columns present, whole lungs first, then right, left and the lobes."""
    present = {k for r in rows for k in r}
    out = []
    for suffix in ["", "_right", "_left", *(f"_{lobe}" for lobe in LOBES)]:
        for metric in ["volume_ml", *metric_names(thresholds_gy)]:
            if f"{metric}{suffix}" in present:
                out.append(f"{metric}{suffix}")
    return out


def summarise(rows: Sequence[Mapping[str, Any]], thresholds_gy: Sequence[float] = THRESHOLDS_GY) -> dict[str, Any]:
    """Cohort statistics: n, mean, SD (ddof 1), min, max, median of every metric per source and of
    every SPECT - CT-based difference, and the paired Wilcoxon signed-rank test of SPECT- against
    CT-based fMLD and fV20 (:func:`ctpm.evaluation.stats.paired_comparison`; mean_difference is
    SPECT minus CT-based)."""
    df = pd.DataFrame(list(rows))
    columns = metric_columns(rows, thresholds_gy)
    by_source = {src: df[df["source"] == src] for src in df["source"].unique()} if len(df) else {}
    summary: dict[str, Any] = {
        "n_patients": int(df["patient_id"].nunique()) if len(df) else 0,
        "thresholds_gy": list(thresholds_gy),
        "units": {**metric_units(thresholds_gy), "volume_ml": "mL"},
        "metrics": {src: {c: describe(pd.to_numeric(g[c], errors="coerce").dropna().to_numpy())
                          for c in columns if c in g and g[c].notna().any()}
                    for src, g in by_source.items() if src != DIFFERENCE},
    }
    if DIFFERENCE in by_source:
        g = by_source[DIFFERENCE]
        summary["difference"] = {c: describe(pd.to_numeric(g[c], errors="coerce").dropna().to_numpy())
                                 for c in columns if c in g and g[c].notna().any()}
        summary["tests"] = {m: {"a": "spect", "b": "ct", **paired_comparison(by_source["spect"], by_source["ct"], m)}
                            for m in TESTED}
    return summary


def write_flart(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], out: str | Path,
                thresholds_gy: Sequence[float] = THRESHOLDS_GY) -> dict[str, Path]:
    """flart.csv (a row per patient and source) and summary.json, each written atomically."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lead = [c for c in ("patient_id", "cohort", "institution", "source", "lungs_from", "dose_coverage")
            if any(c in r for r in rows)]
    df = pd.DataFrame(list(rows), columns=lead + metric_columns(rows, thresholds_gy))
    return {"csv": atomic_write(out / "flart.csv", df.to_csv(index=False, float_format="%.6g")),
            "summary": atomic_write(out / "summary.json", json.dumps(json_safe(summary), indent=2) + "\n")}
