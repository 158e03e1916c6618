"""Lightning callbacks of ctpm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pytorch_lightning.callbacks import BasePredictionWriter

from ctpm.data.io import save_nifti
from ctpm.data.preprocess import restore_to_ct, restore_to_grid


class PerfusionWriter(BasePredictionWriter):
    """Writes each predicted patient as ``<output_dir>/<patient_id>.nii.gz``: both lungs put back
    through the inverse of the preprocessing onto the original CT grid (float32, standardised
    perfusion), as ``ctpm-predict`` does, ready for ``ctpm-evaluate``."""

    def __init__(self, output_dir: str):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._pending: dict[str, dict[str, np.ndarray]] = {}
        self.written: list[str] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self._pending.clear()
        self.written = []

    def write_on_batch_end(self, trainer, pl_module, prediction: dict[str, Any], batch_indices, batch, batch_idx, dataloader_idx=0):
        cache = trainer.datamodule.cache
        for pid, side, pred in zip(prediction["patient_id"], prediction["side"], prediction["pred"]):
            self._pending.setdefault(pid, {})[side] = pred[0].numpy()
            entry = cache.load(pid)
            if set(self._pending[pid]) == set(entry.sides):
                write_patient_map(entry, self._pending.pop(pid), cache.cfg, self.output_dir / f"{pid}.nii.gz",
                                  cache.qa_lungs_path(pid))
                self.written.append(pid)


def write_patient_map(entry, roi: dict[str, np.ndarray], cfg, path: Path, ct_lungs_path: Path | None = None) -> Path:
    """Per-lung ROI predictions of a cached patient -> perfusion map in CT geometry on disk (inside
    the lungs the preprocessing used, when their QA file is there)."""
    grid_lungs = entry.grid_lungs()
    grid = restore_to_grid(roi, entry.lung_ops(), grid_lungs, cfg)
    ct_lungs = None
    if ct_lungs_path is not None and Path(ct_lungs_path).is_file():
        ct_lungs = np.asarray(nib.load(str(ct_lungs_path)).dataobj)
    ct_map = restore_to_ct(grid, grid_lungs, entry.grid_affine, entry.ct_affine, entry.ct_shape, ct_lungs)
    return save_nifti(ct_map, entry.ct_affine, path, dtype=np.float32)
