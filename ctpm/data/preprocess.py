"""One patient through the preprocessing: the forward transforms, into one ``PatientRecord``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from ctpm.data.lungs import evaluation_mask
from ctpm.data.manifest import Patient
from ctpm.data.record import LungInverse, PatientRecord
from ctpm.data.transforms import PreprocessConfig, SplitLungsd, _like, context_maps, grid_stage, lung_stage
from ctpm.errors import CtpmError, warn
from ctpm.geometry import Grid, resample, resample_labels


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
                       with_spect: bool = True) -> PatientRecord:
    """Run the forward transforms of one patient (a manifest Patient, or a dict with patient_id,
    ct, optional spect, lung_mask, lobes, perfusion) into its record."""
    cfg = PreprocessConfig.from_any(cfg)
    data = patient_inputs(patient, with_spect=with_spect)
    pid = str(data.get("patient_id", "?"))
    d = _apply(grid_stage(cfg, with_spect=with_spect), data, pid)
    ct_grid_img = d["ct"]
    ct_grid = _original_grid(ct_grid_img)
    keys = ["ct", "mask"] + (["spect"] if with_spect else [])
    if cfg.context_channels:  # on the evaluation grid, before the ROI crop
        lungs = d["lungs"]
        ctx = context_maps(np.rint(lungs[0].numpy()), Grid.of(ct_grid_img).spacing, list(cfg.context_channels))
        d["ctx"] = _like(lungs, torch.from_numpy(ctx))
        keys.append("ctx")
    d = SplitLungsd(keys, roi_mode=cfg.roi_mode)(d)
    sides = list(d["sides"])
    if not sides:
        raise CtpmError("no lung left after segmentation", patient=pid)
    for side in sides:
        d = _apply(lung_stage(cfg, side, keys), d, pid)

    native_labels, native_affine, native_ct = d.pop("native_lungs")
    native = Grid(native_affine, native_labels.shape)

    def stack(key, dtype):
        return np.stack([d[f"{key}_{s}"][0].numpy() for s in sides]).astype(dtype)

    grid = Grid.of(ct_grid_img)
    roi_size = tuple(int(v) for v in cfg.roi_size)
    lobes_path, truth_path = _optional(patient, "lobes"), _optional(patient, "perfusion")
    return PatientRecord(
        patient_id=pid,
        sides=sides,
        ct=stack("ct", np.float32),
        lung=(stack("lung", np.float32) > 0.5).astype(np.uint8),
        mask=(stack("mask", np.float32) > 0.5).astype(np.uint8),
        spect=stack("spect", np.float32) if with_spect else None,
        inverse={s: LungInverse.from_operations(d[f"ct_{s}"].applied_operations, roi_size) for s in sides},
        grid_affine=grid.affine.copy(),
        grid_ct=ct_grid_img[0].numpy().astype(np.float32),
        grid_mask=(d["mask"][0].numpy() > 0).astype(np.uint8),
        grid_lungs=np.rint(d["lungs"][0].numpy()).astype(np.uint8),
        grid_spect=d["spect"][0].numpy().astype(np.float32) if with_spect else None,
        grid_lobes=_lobes_on(lobes_path, grid, pid, d["lungs"][0].numpy() > 0) if lobes_path else None,
        grid_truth=_map_on(truth_path, grid, pid) if truth_path else None,
        ct_grid=ct_grid,
        ct_lungs_array=resample_labels(native_labels, native, ct_grid),
        ct_mask_array=resample_labels(evaluation_mask(native_ct, native_labels, cfg.eval_hu_range).astype(np.uint8),
                                      native, ct_grid) > 0,
        spect_percentile=d.get("percentile_spect"),
        context=np.stack([d[f"ctx_{s}"].numpy() for s in sides]).astype(np.float32) if cfg.context_channels else None,
        dicom=d.get("dicom_ct", {}),
        registration=d.get("registration"),
    )


def _optional(patient: Patient | dict, name: str) -> Path | None:
    value = patient.get(name) if isinstance(patient, dict) else getattr(patient, name, None)
    return Path(value) if value else None


# lobe labels of the manifest's lobes column (the paper's five lobes)
LOBE_LABELS = {1: "LUL", 2: "LLL", 3: "RUL", 4: "RML", 5: "RLL"}


def _lobes_on(path: Path, grid: Grid, pid: str, lungs: np.ndarray, min_fraction: float = 0.5) -> np.ndarray:
    """The lobe map onto the evaluation grid (nearest neighbour), checked against the lungs: a map
    with other labels, or one that misses the lungs (another patient's, another frame of
    reference), would give blank or meaningless lobe metrics; a lobe absent from the lungs is warned."""
    from ctpm.data.io import load_image

    vol = load_image(path, kind="label", patient=pid)
    labels = np.unique(vol.array)
    bad = [v for v in labels if v != 0 and v not in LOBE_LABELS]
    if bad:
        raise CtpmError(f"the lobe map holds label(s) {', '.join(f'{v:g}' for v in bad[:5])}; lobes are "
                        "1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL (0 elsewhere)", patient=pid, path=path)
    on = np.rint(resample(vol.array, vol.grid, grid, order=0)).astype(np.uint8)
    covered = float((on[lungs] > 0).mean()) if lungs.any() else 0.0
    if covered < min_fraction:
        raise CtpmError(f"the lobe map covers {100 * covered:.0f}% of the lungs (it lies off them: another "
                        "patient's, or not in this CT's frame of reference?)", patient=pid, path=path)
    absent = [name for v, name in LOBE_LABELS.items() if not (lungs & (on == v)).any()]
    if absent:
        warn(f"lobe(s) {', '.join(absent)} of the lobe map have no voxel inside the lungs; their lobe "
             f"metrics are left blank ({path})", patient=pid)
    return on


def _map_on(path: Path, grid: Grid, pid: str) -> np.ndarray:
    """A continuous map (the synthetic truth perfusion) onto the evaluation grid, linear."""
    from ctpm.data.io import load_image

    vol = load_image(path, kind="perfusion", patient=pid)
    return resample(vol.array, vol.grid, grid, order=1).astype(np.float32)


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


def _original_grid(img: MetaTensor) -> Grid:
    """The CT's grid as read, from the first recorded operation (Orientation)."""
    first = img.applied_operations[0]
    return Grid(np.asarray(first["extra_info"]["original_affine"], dtype=np.float64),
                tuple(int(v) for v in first["orig_size"]))
