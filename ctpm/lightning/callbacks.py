"""Lightning callbacks of ctpm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pytorch_lightning.callbacks import BasePredictionWriter

from ctpm.data.io import save_nifti
from ctpm.data.record import PatientRecord, restore, to_ct


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

    def on_predict_end(self, trainer, pl_module) -> None:
        cache = getattr(trainer.datamodule, "cache", None)
        if self.written and cache is not None:
            write_provenance(self.output_dir, cache.cfg, checkpoints=[getattr(trainer, "ckpt_path", None)])

    def write_on_batch_end(self, trainer, pl_module, prediction: dict[str, Any], batch_indices, batch, batch_idx, dataloader_idx=0):
        cache = trainer.datamodule.cache
        for pid, side, pred in zip(prediction["patient_id"], prediction["side"], prediction["pred"]):
            self._pending.setdefault(pid, {})[side] = pred[0].numpy()
            record = cache.load(pid)
            if set(self._pending[pid]) == set(record.sides):
                write_patient_map(record, self._pending.pop(pid), self.output_dir / f"{pid}.nii.gz")
                self.written.append(pid)


def write_patient_map(record: PatientRecord, roi: dict[str, np.ndarray], path: Path) -> Path:
    """Per-lung ROI predictions of a patient -> perfusion map in CT geometry on disk (inside the
    lungs the preprocessing used)."""
    return save_nifti(to_ct(restore(roi, record), record), record.ct_grid.affine, path, dtype=np.float32)


def write_provenance(folder: Path, preprocessing, *, checkpoints=()) -> Path:
    """``provenance.json`` beside a prediction set: the preprocessing (config and its cache hash)
    and checkpoint(s) it was made with, so that ``ctpm-evaluate cache=DIR`` picks the same records."""
    import json
    import os

    from ctpm.data.cache import config_hash
    from ctpm.data.transforms import PreprocessConfig

    cfg = PreprocessConfig.from_any(preprocessing)
    info = {"preprocessing_hash": config_hash(cfg), "preprocessing": cfg.to_dict(),
            "checkpoints": [str(c) for c in checkpoints if c]}
    path = Path(folder) / "provenance.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".provenance.json.tmp-{os.getpid()}")
    part.write_text(json.dumps(info, indent=1))
    os.replace(part, path)
    return path
