"""One patient through the preprocessing (forward) and a prediction back to CT geometry (inverse)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from ctpm.data.lungs import evaluation_mask
from ctpm.data.manifest import Patient
from ctpm.data.transforms import (
    IMAGE_KEYS,
    PreprocessConfig,
    SplitLungsd,
    grid_stage,
    lung_stage,
    ops_from_json,
    ops_to_json,
    with_history,
)
from ctpm.errors import CtpmError
from ctpm.geometry import Grid, resample_labels, resample_masked


@dataclass
class Preprocessed:
    """What the network sees of one patient, and what it takes to put a prediction back.

    Per-lung arrays are stacked over `sides` (["right", "left"], or one side after pneumonectomy),
    each (S, D, H, W) at roi_size. `grid_*` describe the evaluation grid (isotropic, cropped to the
    lungs) and `ct_*` the original CT grid.
    """

    patient_id: str
    sides: list[str]
    ct: np.ndarray
    lung: np.ndarray
    mask: np.ndarray
    spect: np.ndarray | None
    lung_ops: dict[str, list]
    grid_lungs: np.ndarray
    grid_affine: np.ndarray
    ct_shape: tuple[int, int, int]
    ct_affine: np.ndarray
    spect_percentile: float | None = None
    grid_spect: np.ndarray | None = None
    grid_mask: np.ndarray | None = None
    grid_ct: np.ndarray | None = None
    ct_lungs: np.ndarray | None = None  # the lung labels used, on the original CT grid (QA)
    ct_eval_mask: np.ndarray | None = None  # evaluation mask on the original CT grid (keep_grid)
    dicom: dict[str, Any] = field(default_factory=dict)
    registration: Any = None  # ctpm.data.registration.Registration with register_spect on


def patient_inputs(patient: Patient | dict, *, with_spect: bool = True) -> dict[str, Any]:
    if isinstance(patient, Patient):
        d = {"patient_id": patient.patient_id, "ct": patient.ct}
        if with_spect:
            if patient.spect is None:
                raise CtpmError("has no SPECT in the manifest", patient=patient.patient_id)
            d["spect"] = patient.spect
        if patient.lung_mask is not None:
            d["lung_mask"] = patient.lung_mask
        return d
    d = dict(patient)
    if not with_spect:
        d.pop("spect", None)
    return d


def preprocess_patient(patient: Patient | dict, cfg: PreprocessConfig | dict | None = None, *,
                       with_spect: bool = True, keep_grid: bool = False) -> Preprocessed:
    """Run the forward transforms. keep_grid: also return the CT, SPECT and evaluation mask on the
    evaluation grid (for the roundtrip check and the evaluation)."""
    cfg = PreprocessConfig.from_any(cfg)
    data = patient_inputs(patient, with_spect=with_spect)
    pid = str(data.get("patient_id", "?"))
    d = _apply(grid_stage(cfg, with_spect=with_spect), data, pid)
    ct_grid = d["ct"]
    original = _original_geometry(ct_grid)
    keys = ["ct", "mask"] + (["spect"] if with_spect else [])
    d = SplitLungsd(keys)(d)
    sides = list(d["sides"])
    if not sides:
        raise CtpmError("no lung left after segmentation", patient=pid)
    for side in sides:
        d = _apply(lung_stage(cfg, side, keys), d, pid)

    native_labels, native_affine, native_ct = d.pop("native_lungs")

    def stack(key, dtype):
        return np.stack([d[f"{key}_{s}"][0].numpy() for s in sides]).astype(dtype)

    return Preprocessed(
        patient_id=pid,
        sides=sides,
        ct=stack("ct", np.float32),
        lung=(stack("lung", np.float32) > 0.5).astype(np.uint8),
        mask=(stack("mask", np.float32) > 0.5).astype(np.uint8),
        spect=stack("spect", np.float32) if with_spect else None,
        # portable: JSON-safe, object ids cleared, so another process (or a cache) can invert them
        lung_ops={s: ops_from_json(ops_to_json(d[f"ct_{s}"].applied_operations)) for s in sides},
        grid_lungs=d["lungs"][0].numpy().astype(np.uint8),
        grid_affine=ct_grid.affine.numpy().copy(),
        ct_shape=original[0],
        ct_affine=original[1],
        spect_percentile=d.get("percentile_spect"),
        grid_spect=d["spect"][0].numpy() if (keep_grid and with_spect) else None,
        grid_mask=d["mask"][0].numpy().astype(np.uint8) if keep_grid else None,
        grid_ct=ct_grid[0].numpy() if keep_grid else None,
        ct_lungs=labels_to_ct(native_labels, native_affine, original[1], original[0]),
        ct_eval_mask=(labels_to_ct(evaluation_mask(native_ct, native_labels, cfg.eval_hu_range).astype(np.uint8),
                                   native_affine, original[1], original[0]) if keep_grid else None),
        dicom=d.get("dicom_ct", {}),
        registration=d.get("registration"),
    )


def _apply(transform, data: dict, pid: str) -> dict:
    """Run a Compose; MONAI wraps every exception of a transform in RuntimeError("applying
    transform ..."): a user error (CtpmError) inside is raised as itself, so that callers (the
    cache, the command-line tools) can report it and go on with the other patients."""
    try:
        return transform(data)
    except Exception as exc:
        seen, cause = set(), exc
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, CtpmError):
                raise cause.with_context(patient=pid) from None
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        raise


def _original_geometry(img: MetaTensor) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the CT as read, from the first recorded operation (Orientation)."""
    ops = img.applied_operations
    first = ops[0]
    shape = tuple(int(v) for v in first["orig_size"])
    affine = np.asarray(first["extra_info"]["original_affine"], dtype=np.float64)
    return shape, affine  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Inverse
# --------------------------------------------------------------------------------------------------


def restore_to_grid(roi: dict[str, np.ndarray], lung_ops: dict[str, list], grid_lungs: np.ndarray,
                    cfg: PreprocessConfig | dict | None = None) -> np.ndarray:
    """Per-lung maps at roi_size -> one map on the evaluation grid, with MONAI's ``Invertd``
    (trilinear, not nearest: perfusion is continuous). Each voxel of a lung takes its own lung's
    prediction; voxels outside the lungs are 0."""
    cfg = PreprocessConfig.from_any(cfg)
    out = np.zeros(grid_lungs.shape, np.float32)
    from ctpm.data.lungs import LEFT, RIGHT

    for side, value in (("right", RIGHT), ("left", LEFT)):
        if side not in roi:
            continue
        stage = lung_stage(cfg, side, IMAGE_KEYS)
        ref = with_history(np.zeros((1, 1, 1, 1), np.float32), np.eye(4), lung_ops[side])
        inv = Invertd(keys="pred", transform=stage, orig_keys=f"ct_{side}", nearest_interp=False)
        pred = torch.as_tensor(np.array(roi[side], np.float32))  # a copy: roi may be a read-only memmap
        pred = pred[None] if pred.ndim == 3 else pred
        back = inv({"pred": MetaTensor(pred), f"ct_{side}": ref})["pred"]
        arr = back[0].numpy()
        if arr.shape != grid_lungs.shape:
            raise RuntimeError(f"inverse gave {arr.shape}, evaluation grid is {grid_lungs.shape}")
        sel = grid_lungs == value
        out[sel] = arr[sel]
    return out


def restore_to_ct(grid_map: np.ndarray, grid_lungs: np.ndarray, grid_affine: np.ndarray,
                  ct_affine: np.ndarray, ct_shape, ct_lungs: np.ndarray | None = None) -> np.ndarray:
    """A map on the evaluation grid -> the original CT grid (linear). Interpolation is normalised
    by the lung mask, so lung voxels at the boundary are not pulled towards the 0 outside. With
    `ct_lungs` (the lung labels on the CT grid) the map covers exactly those voxels; without, the
    voxels that lie at least half inside the resampled lungs."""
    out, weight = resample_masked(grid_map, grid_lungs > 0, Grid(grid_affine, grid_lungs.shape), Grid(ct_affine, ct_shape))
    inside = (weight > 1e-3) & (ct_lungs > 0) if ct_lungs is not None else weight >= 0.5
    out[~inside] = 0.0
    return out


def labels_to_ct(grid_labels: np.ndarray, grid_affine: np.ndarray, ct_affine: np.ndarray, ct_shape) -> np.ndarray:
    """Labels onto the CT grid: exact when the source is the CT grid in another orientation (the
    RAS-reoriented CT), nearest neighbour otherwise."""
    return resample_labels(grid_labels, Grid(grid_affine, grid_labels.shape), Grid(ct_affine, ct_shape))
