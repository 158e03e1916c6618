"""One record per patient, and the one inverse that takes ROI maps back.

``PatientRecord`` is what preprocessing gives and what every later stage reads: the same type
whether ``preprocess_patient`` just computed it (in memory) or ``PreprocessCache.load`` read it
(memory-mapped). It holds

- the ROIs at roi_size (ct, spect, lung, mask), what the network sees: one per lung ("right",
  "left"; preprocessing.roi_mode lung, the paper's) or one of both lungs ("thorax"; roi_mode thorax);
- the evaluation grid (the isotropic grid of the CT cropped to the lungs) and the images on it:
  CT (HU), standardised SPECT, evaluation mask, lungs (1 right, 2 left) and, when the manifest
  has them, the lobes (nearest) and the synthetic truth perfusion (linear);
- the CT grid (affine, shape) with the lungs used on it;
- the inverse of each ROI (``LungInverse``): the crop box on the evaluation grid, the axis order,
  the mirror, the padding (thorax) and the ROI size, as plain numbers, as nnU-Net keeps its crop box.

``restore`` takes the ROI maps back onto the evaluation grid and ``to_ct`` from there onto
the CT grid; the training's prediction writer, ``ctpm-predict``, the roundtrip check and the
evaluation all call them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctpm.data.lungs import LEFT, RIGHT
from ctpm.errors import CtpmError, warn
from ctpm.geometry import Grid, coverage, resample, resample_masked

# the lung labels each ROI ("side") holds: one lung each, or both in the thorax's ROI
SIDE_LABELS = {"right": (RIGHT,), "left": (LEFT,), "thorax": (RIGHT, LEFT)}


# --------------------------------------------------------------------------------------------------
# The inverse of the lung stage, as explicit geometry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LungInverse:
    """How one lung's ROI (or the thorax's) was cut from the evaluation grid (``transforms.lung_stage``).

    start, stop: the crop box on the evaluation grid (indices, stop exclusive); grid_shape: that
    grid's shape; transpose: ROI axis a holds evaluation-grid axis ``transpose[a]``; roi_size: the
    ROI's shape; flip: ROI axes mirrored after the resize (the left lung's left-right axis);
    mode: the interpolation that takes the ROI back to the box (the CT's, trilinear);
    fitted, offset: the thorax's ROI (roi_mode thorax): the box was resized to ``fitted`` (one
    scale factor for all axes) and padded into roi_size, starting at ``offset`` along each ROI
    axis; a lung's ROI is the resized box itself (fitted None: roi_size, offset 0).
    """

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    grid_shape: tuple[int, int, int]
    transpose: tuple[int, int, int]
    roi_size: tuple[int, int, int]
    flip: tuple[int, ...] = ()
    mode: str = "trilinear"
    fitted: tuple[int, int, int] | None = None
    offset: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def from_operations(cls, ops: Sequence[Mapping], roi_size: Sequence[int]) -> LungInverse:
        """Read from what MONAI's CropForegroundd, Transposed, Resized, Flipd and SpatialPadd
        recorded (``MetaTensor.applied_operations`` of a lung-stage image at ``roi_size``)."""
        from monai.utils import TraceKeys

        by_name = {str(op[TraceKeys.CLASS_NAME]): op for op in ops}
        crop, tr, rs = by_name["CropForeground"], by_name["Transposed"], by_name["Resize"]
        info = crop[TraceKeys.EXTRA_INFO]
        padded = info.get("pad_info", {}).get(TraceKeys.EXTRA_INFO, {}).get("padded", ())
        if any(int(v) for pair in padded for v in pair):
            raise ValueError("the lung's crop box reaches beyond the evaluation grid")
        grid_shape = tuple(int(v) for v in crop[TraceKeys.ORIG_SIZE])
        cut = [int(v) for v in info["cropped"]]
        start = tuple(cut[0::2])
        stop = tuple(n - after for n, after in zip(grid_shape, cut[1::2]))
        indices = [int(v) for v in tr[TraceKeys.EXTRA_INFO]["indices"]]
        transpose = tuple(i - 1 for i in indices[1:])  # channel first in MONAI's record
        flip: tuple[int, ...] = ()
        if "Flip" in by_name:
            axes = by_name["Flip"][TraceKeys.EXTRA_INFO]["axes"]
            flip = tuple(int(a) for a in (axes if isinstance(axes, (list, tuple)) else [axes]))
        fitted, offset = None, (0, 0, 0)
        if "SpatialPad" in by_name:  # the thorax: resized to fit, then padded to roi_size
            pad = by_name["SpatialPad"]
            fitted = tuple(int(v) for v in pad[TraceKeys.ORIG_SIZE])
            offset = tuple(int(before) for before, _ in pad[TraceKeys.EXTRA_INFO]["padded"][1:])  # channel first
        return cls(start, stop, grid_shape, transpose, tuple(int(v) for v in roi_size), flip,
                   str(rs[TraceKeys.EXTRA_INFO]["mode"]), fitted, offset)  # type: ignore[arg-type]

    @property
    def box_shape(self) -> tuple[int, int, int]:
        return tuple(int(b - a) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def resized_shape(self) -> tuple[int, int, int]:
        """The shape (ROI axes) the box was resized to: roi_size, or the thorax's fitted size."""
        return self.fitted if self.fitted is not None else self.roi_size

    def roi_spacing(self, grid_spacing: Sequence[float]) -> tuple[float, float, float]:
        """The ROI's voxel size in mm along its own axes, given the evaluation grid's spacing: the
        resize to roi_size stretches every axis by its own factor (box / roi_size); the thorax's
        by one factor (box / fitted, equal on every axis up to the rounding of fitted)."""
        return tuple(float(grid_spacing[g]) * self.box_shape[g] / self.resized_shape[a]  # type: ignore[return-value]
                     for a, g in enumerate(self.transpose))

    def to_json(self) -> dict:
        out = {"start": list(self.start), "stop": list(self.stop), "grid_shape": list(self.grid_shape),
               "transpose": list(self.transpose), "roi_size": list(self.roi_size), "flip": list(self.flip),
               "mode": self.mode}
        if self.fitted is not None:  # the thorax's ROI only: a lung's entry reads as it always has
            out.update(fitted=list(self.fitted), offset=list(self.offset))
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> LungInverse:
        t = lambda k: tuple(int(v) for v in d[k])  # noqa: E731
        fitted = t("fitted") if d.get("fitted") is not None else None
        offset = t("offset") if "offset" in d else (0, 0, 0)
        return cls(t("start"), t("stop"), t("grid_shape"), t("transpose"), t("roi_size"), t("flip"), str(d["mode"]),
                   fitted, offset)  # type: ignore[arg-type]

    def to_box(self, roi: np.ndarray) -> np.ndarray:
        """A map at roi_size -> the same map on the crop box (evaluation-grid axes): the mirror
        undone, the thorax's padding cut off, resized back to the box with the forward's
        interpolation (MONAI's Resize, as its own inverse does), axes put back."""
        import torch
        from monai.transforms import Resize

        arr = np.array(roi, dtype=np.float32)  # a copy: roi may be a read-only memmap
        if arr.ndim == 4:
            arr = arr[0]
        if arr.shape != self.roi_size:
            raise ValueError(f"ROI map of shape {arr.shape}, the preprocessing made {self.roi_size}")
        if self.flip:
            arr = np.flip(arr, axis=self.flip)
        if self.fitted is not None:
            arr = arr[tuple(slice(o, o + n) for o, n in zip(self.offset, self.fitted))]
        in_roi_order = tuple(self.box_shape[a] for a in self.transpose)
        back = Resize(spatial_size=in_roi_order, mode=self.mode)(torch.from_numpy(np.ascontiguousarray(arr))[None])
        back = np.asarray(back.numpy() if hasattr(back, "numpy") else back)[0]
        return np.ascontiguousarray(np.transpose(back, np.argsort(self.transpose)))


def restore(roi_maps: Mapping[str, np.ndarray], record: PatientRecord) -> np.ndarray:
    """ROI maps at roi_size ({"right": ..., "left": ...}, or {"thorax": ...}) -> one map on the
    evaluation grid. Each voxel of a lung takes the prediction of its own ROI (its lung's, or the
    thorax's); voxels outside the lungs are 0."""
    lungs = np.asarray(record.grid_lungs)
    out = np.zeros(lungs.shape, np.float32)
    for side, roi in roi_maps.items():
        if side not in SIDE_LABELS:
            raise ValueError(f"unknown ROI {side!r} (known: {', '.join(SIDE_LABELS)})")
        inv = record.inverse[side]
        if tuple(inv.grid_shape) != lungs.shape:
            raise ValueError(f"inverse made for a grid of {inv.grid_shape}, the evaluation grid is {lungs.shape}")
        box = tuple(slice(a, b) for a, b in zip(inv.start, inv.stop))
        sel = np.isin(lungs[box], SIDE_LABELS[side])
        out[box][sel] = inv.to_box(roi)[sel]
    return out


def to_ct(grid_map: np.ndarray, record: PatientRecord) -> np.ndarray:
    """A map on the evaluation grid -> the CT grid (linear, normalised by the lungs, so that lung
    voxels at the border are not pulled towards the 0 outside), inside the lungs the
    preprocessing used on the CT grid."""
    lungs = np.asarray(record.grid_lungs)
    ct_lungs = np.asarray(record.ct_lungs) > 0
    out = np.zeros(record.ct_grid.shape, np.float32)
    box = _bounding_box(ct_lungs)
    if box is None:
        return out
    # Only the lungs' box of the CT grid is resampled (the rest is 0 by definition): on a 512^2 CT
    # the full-grid temporaries, not the interpolation, would take most of the time.
    values, weight = resample_masked(grid_map, lungs > 0, record.grid, record.ct_grid[box])
    values[~((weight > 1e-3) & ct_lungs[box])] = 0.0
    out[box] = values
    return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Index slices of the smallest box holding every True voxel (None when there is none)."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# The evaluation grid's view
# --------------------------------------------------------------------------------------------------


@dataclass
class EvaluationGrid:
    """One patient on the evaluation grid (the isotropic grid of the CT, cropped to the lungs):
    what the evaluation compares maps on."""

    patient: Any  # the manifest's Patient (or None)
    affine: np.ndarray
    ct: np.ndarray  # HU
    spect: np.ndarray  # standardised
    mask: np.ndarray  # evaluation mask (bool)
    lungs: np.ndarray  # 1 right, 2 left
    lobes: np.ndarray | None = None
    truth: np.ndarray | None = None  # synthetic truth perfusion, when the manifest has it

    @property
    def shape(self):
        return self.ct.shape

    @property
    def grid(self) -> Grid:
        return Grid(self.affine, self.shape)

    @property
    def patient_id(self) -> str | None:
        return getattr(self.patient, "patient_id", None)

    def on_grid(self, path: Path, kind: str = "perfusion", mode: str = "bilinear",
                min_coverage: float | None = None) -> np.ndarray:
        """A map resampled onto this grid. With `min_coverage`, a map whose grid covers less than
        that share of the evaluation mask (another patient's, or not in CT geometry) is refused,
        and so is one that is zero everywhere in the mask: either would score silently as R = 0."""
        from ctpm.data.io import check_patient_tag, load_image

        vol = load_image(path, kind=kind, patient=self.patient_id)
        if min_coverage is not None:
            check_patient_tag(vol, self.patient_id, path)
            covered = coverage(vol.grid, self.grid, self.mask)
            if covered < min_coverage:
                raise CtpmError(
                    f"the prediction's grid covers only {100 * covered:.1f}% of the lungs (at least "
                    f"{100 * min_coverage:.0f}% needed, min_coverage); is it this patient's map in the CT's geometry?",
                    patient=self.patient_id, path=path)
        out = resample(vol.array, vol.grid, self.grid, order=0 if mode == "nearest" else 1)
        if min_coverage is not None:
            zero = float(np.mean(out[self.mask] <= 0))
            if zero == 1.0:
                raise CtpmError("the prediction is zero everywhere in the lungs; is it registered to this CT?",
                                patient=self.patient_id, path=path)
            if zero > 0.1:  # a map made inside other lungs: another patient's, or another segmentation
                warn(f"the prediction is zero in {100 * zero:.0f}% of the evaluated lungs ({path}); is it this "
                     "patient's map? (ctpm's maps are positive everywhere inside the lungs they were made in)",
                     patient=self.patient_id)
        return out


# --------------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------------

# Arrays of a record as the cache stores them (name -> attribute); the ROI stacks are (sides, D, H, W).
ROI_ARRAYS = ("ct", "spect", "lung", "mask", "context")
GRID_ARRAYS = ("grid_ct", "grid_spect", "grid_mask", "grid_lungs", "grid_lobes", "grid_truth")


@dataclass
class PatientRecord:
    """Everything preprocessing knows of one patient (see the module docstring)."""

    patient_id: str
    sides: list[str]
    # per ROI (each lung, or the thorax), stacked over `sides`, at roi_size
    ct: np.ndarray  # CT enhanced to [0, 1]
    lung: np.ndarray  # the lung (uint8), the network's attention mask
    mask: np.ndarray  # the evaluation mask within the lung (uint8)
    spect: np.ndarray | None  # standardised SPECT (float32)
    inverse: dict[str, LungInverse]
    # the evaluation grid
    grid_affine: np.ndarray
    grid_ct: np.ndarray  # HU
    grid_mask: np.ndarray  # uint8
    grid_lungs: np.ndarray  # uint8, 1 right, 2 left
    # the CT as read
    ct_grid: Grid
    grid_spect: np.ndarray | None = None  # standardised
    grid_lobes: np.ndarray | None = None  # uint8, lobe labels 1..5 (nearest)
    grid_truth: np.ndarray | None = None  # synthetic truth perfusion (linear)
    ct_lungs_array: np.ndarray | None = field(default=None, repr=False)  # in memory; else read from `path`
    ct_mask_array: np.ndarray | None = field(default=None, repr=False)
    spect_percentile: float | None = None
    context: np.ndarray | None = None  # (sides, C, D, H, W) at roi_size (preprocessing.context_channels)
    dicom: dict[str, Any] = field(default_factory=dict)
    registration: Any = field(default=None, repr=False)  # ctpm.data.registration.Registration (register_spect)
    path: Path | None = None  # the cache entry it was read from

    @property
    def grid(self) -> Grid:
        """The evaluation grid."""
        return Grid(self.grid_affine, np.asarray(self.grid_lungs).shape)

    @property
    def ct_lungs(self) -> np.ndarray:
        """The lungs (1 right, 2 left) on the CT grid (uint8)."""
        if self.ct_lungs_array is None and self.path is not None:
            import nibabel as nib

            self.ct_lungs_array = np.asarray(nib.load(str(self.path / "lungs.nii.gz")).dataobj).astype(np.uint8)
        return self.ct_lungs_array  # type: ignore[return-value]

    @property
    def ct_mask(self) -> np.ndarray:
        """The evaluation mask (lungs within the HU range) on the CT grid (bool)."""
        if self.ct_mask_array is None and self.path is not None:
            bits = np.load(self.path / "ct_mask.npy")
            n = int(np.prod(self.ct_grid.shape))
            self.ct_mask_array = np.unpackbits(bits, count=n).astype(bool).reshape(self.ct_grid.shape)
        return self.ct_mask_array  # type: ignore[return-value]

    def evaluation(self, patient: Any = None) -> EvaluationGrid:
        """The evaluation grid's view (needs the SPECT)."""
        if self.grid_spect is None:
            raise CtpmError("preprocessed without its SPECT; it cannot be evaluated", patient=self.patient_id)
        return EvaluationGrid(patient, np.asarray(self.grid_affine, np.float64), self.grid_ct, self.grid_spect,
                              np.asarray(self.grid_mask) > 0, np.asarray(self.grid_lungs), self.grid_lobes, self.grid_truth)

    def network_input(self) -> np.ndarray:
        """(sides, C, D, H, W) float32: the enhanced CT, then the context channels when the
        preprocessing made them (what the network is given)."""
        ct = np.asarray(self.ct, np.float32)[:, None]
        if self.context is None:
            return np.array(ct)  # a copy: the arrays of a cached record are read-only memmaps
        return np.concatenate([ct, np.asarray(self.context, np.float32)], axis=1)

    def roi_maps(self, stack: np.ndarray) -> dict[str, np.ndarray]:
        """A (sides, D, H, W) stack as {side: map}."""
        return {s: stack[i] for i, s in enumerate(self.sides)}

    def inverse_json(self) -> dict[str, dict]:
        return {s: inv.to_json() for s, inv in self.inverse.items()}
