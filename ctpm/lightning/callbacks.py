"""Lightning callbacks of ctpm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

from ctpm.data.io import DESCRIPTIONS, atomic_write, save_nifti
from ctpm.data.record import PatientRecord, restore, to_ct


class PerfusionWriter(BasePredictionWriter):
    """Writes each predicted patient as ``<output_dir>/<patient_id>.nii.gz``: its ROIs (both lungs,
    or the one thorax ROI) put back through the inverse of the preprocessing onto the original CT
    grid (float32, standardised perfusion), as ``ctpm-predict`` does, ready for ``ctpm-evaluate``.
    Under DDP each process holds whole patients (``PatientDistributedSampler``), so every map is
    written once, by the process that predicted all of its ROIs."""

    def __init__(self, output_dir: str):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._pending: dict[str, dict[str, np.ndarray]] = {}
        self.written: list[str] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self._pending.clear()
        self.written = []

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._pending:  # a patient's lungs on two processes: its map cannot be written
            raise RuntimeError(f"prediction ended before every lung of {sorted(self._pending)} was seen; under DDP "
                               "the predict loader needs whole patients per process (PatientDistributedSampler)")
        cache = getattr(trainer.datamodule, "cache", None)
        # one record for the folder, by rank 0 (under DDP each process writes its own patients' maps)
        if trainer.is_global_zero and cache is not None and (self.written or trainer.world_size > 1):
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
    """ROI predictions of a patient ({side: map}: each lung's, or the thorax's) -> perfusion map in
    CT geometry on disk (inside the lungs the preprocessing used)."""
    return save_nifti(to_ct(restore(roi, record), record), record.ct_grid.affine, path, dtype=np.float32,
                      description=DESCRIPTIONS["perfusion"], patient=record.patient_id)


def write_provenance(folder: Path, preprocessing, *, checkpoints=()) -> Path:
    """``provenance.json`` beside a prediction set: the preprocessing (config and its cache hash)
    and checkpoint(s) it was made with, so that ``ctpm-evaluate cache=DIR`` picks the same records."""
    import json

    from ctpm.data.cache import config_hash
    from ctpm.data.transforms import PreprocessConfig

    cfg = PreprocessConfig.from_any(preprocessing)
    info = {"preprocessing_hash": config_hash(cfg), "preprocessing": cfg.to_dict(),
            "checkpoints": [str(c) for c in checkpoints if c]}
    path = Path(folder) / "provenance.json"
    return atomic_write(path, json.dumps(info, indent=1))


def open_optuna_storage(spec: str):
    """An Optuna storage from its spec: a database URL (``sqlite:///optuna.db``, ``postgresql://...``)
    as given, anything else the path of a journal file (one file that every trial's process, on
    this machine or on SLURM nodes sharing the folder, appends to under a lock)."""
    import optuna

    if "://" in spec:
        return spec
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(spec)))


class OptunaPruning(pl.Callback):
    """Reports ``monitor`` (the validation Spearman R) to the Optuna trial this job runs after each
    validation epoch and stops the job as a pruned trial when the study's pruner (a MedianPruner,
    hydra.sweeper.pruner) says so: ``optuna.TrialPruned`` is raised, and the sweeper records the
    trial as pruned.

    Own code rather than optuna-integration's ``PyTorchLightningPruningCallback``: that one
    subclasses ``lightning.pytorch.Callback``, which a ``pytorch_lightning.Trainer`` (ctpm's) does
    not accept; and a trial's job may run in another process (a submitit/SLURM job), so the trial is
    named by its storage, study and id (``optuna_trial`` in the config, set by the sweeper) rather
    than handed over as an object. Without a trial (a run outside a sweep) it does nothing. Under
    DDP, rank 0 reports and decides, and every rank stops.
    """

    def __init__(self, monitor: str = "val/spearman_r", trial: dict | None = None):
        """trial: {id, storage, study, startup, warmup} (the MedianPruner's n_startup_trials and
        n_warmup_steps), or None."""
        super().__init__()
        self.monitor = monitor
        trial = dict(trial or {})
        self.trial_id, self.storage, self.study = trial.get("id"), trial.get("storage"), trial.get("study")
        # a study's pruner is not kept in its storage: the sweeper passes its settings along
        self.startup, self.warmup = int(trial.get("startup") or 0), int(trial.get("warmup") or 0)
        self._trial = None

    def _get_trial(self):
        if self._trial is None:
            import optuna

            pruner = optuna.pruners.MedianPruner(n_startup_trials=self.startup, n_warmup_steps=self.warmup)
            study = optuna.load_study(study_name=self.study, storage=open_optuna_storage(self.storage), pruner=pruner)
            self._trial = optuna.trial.Trial(study, int(self.trial_id))
        return self._trial

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trial_id is None or trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                from ctpm.errors import CtpmError

                raise CtpmError(f"pruning monitors {self.monitor!r}, which validation did not log "
                                f"(logged: {', '.join(sorted(trainer.callback_metrics)) or 'nothing'})")
            trial = self._get_trial()
            trial.report(float(value), step=trainer.current_epoch)
            prune = trial.should_prune()
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            import optuna

            raise optuna.TrialPruned(f"trial pruned at epoch {trainer.current_epoch} ({self.monitor})")
