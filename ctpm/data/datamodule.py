"""The cohort DataModule: pre-training (all patients of a cohort) or fold k of K (fine-tuning).

Items are the ROIs of the records: single lungs (preprocessing.roi_mode lung: the network sees one
lung at a time, as in the paper) or one thorax ROI per patient with both lungs (roi_mode thorax);
splits are by patient, so both lungs of a patient are always on the same side of a split.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ctpm.data.cache import PreprocessCache
from ctpm.data.io import atomic_write
from ctpm.data.manifest import Manifest, Patient, load_manifest
from ctpm.data.transforms import PreprocessConfig
from ctpm.errors import CtpmError

MODES = ("pretrain", "fold")


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def make_folds(patients: list[Patient], n_folds: int, seed: int) -> list[list[str]]:
    """Patient-level K folds, stratified by institution: each institution's patients are shuffled
    (seeded) and dealt round-robin, continuing across institutions so fold sizes differ by <= 1."""
    if n_folds < 2:
        raise CtpmError(f"n_folds must be at least 2, not {n_folds}")
    if len(patients) < n_folds:
        raise CtpmError(f"the cohort has {len(patients)} patients, fewer than the {n_folds} folds asked for")
    rng = random.Random(seed)
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    by_inst: dict[str, list[str]] = {}
    for p in patients:
        by_inst.setdefault(p.institution, []).append(p.patient_id)
    k = 0
    for inst in sorted(by_inst):
        ids = sorted(by_inst[inst])
        rng.shuffle(ids)
        for pid in ids:
            folds[k % n_folds].append(pid)
            k += 1
    return [sorted(f) for f in folds]


def hold_out(ids: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): a seeded share of `ids` held out for validation (at least one when fraction > 0)."""
    ids = sorted(ids)
    if fraction <= 0 or len(ids) < 2:
        return ids, []
    rng = random.Random(seed)
    shuffled = ids[:]
    rng.shuffle(shuffled)
    n_val = min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def load_or_make_splits(path: Path, patients: list[Patient], cohort: str, n_folds: int, seed: int, val_fraction: float) -> dict:
    """The one persisted split of a cohort (nnU-Net's discipline): drawn once, reused by every fold."""
    ids = sorted(p.patient_id for p in patients)
    if path.is_file():
        try:
            splits = json.loads(path.read_text())
        except ValueError:  # (UnicodeDecodeError too)
            raise CtpmError("splits.json is not valid JSON; delete it to draw the splits again", path=path) from None
        folds = splits.get("folds") if isinstance(splits, dict) else None
        if not isinstance(folds, list) or not all(isinstance(f, dict) and {"train", "val", "test"} <= set(f)
                                                  for f in folds):
            raise CtpmError("splits.json is not ctpm's (a JSON object whose 'folds' hold train, val and test "
                            "lists); delete it to draw the splits again", path=path)
        if splits.get("cohort") == cohort:
            if sorted(splits.get("patients", [])) != ids or splits.get("n_folds") != n_folds:
                raise CtpmError(
                    f"splits.json was drawn for {len(splits.get('patients', []))} patients and "
                    f"{splits.get('n_folds')} folds, the {cohort} cohort now has {len(ids)} patients and "
                    f"{n_folds} folds are asked for; delete it (all folds must then be rerun) or use another cache",
                    path=path,
                )
            return splits
        raise CtpmError(f"splits.json holds the splits of cohort {splits.get('cohort')!r}, not {cohort!r}", path=path)
    folds = make_folds(patients, n_folds, seed)
    out = {"cohort": cohort, "n_folds": n_folds, "seed": seed, "val_fraction": val_fraction, "patients": ids, "folds": []}
    for k, test in enumerate(folds):
        rest = [pid for pid in ids if pid not in set(test)]
        train, val = hold_out(rest, val_fraction, seed + 1000 + k)
        out["folds"].append({"train": train, "val": val, "test": test})
    atomic_write(path, json.dumps(out, indent=1))
    return out


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


class LungDataset(Dataset):
    """One item per ROI of each patient (each lung, or the thorax), read from the patients' records
    (memory-mapped cache entries).

    Item: ct, lung (ROI attention mask), mask (evaluation mask: loss and metrics), spect (target,
    when present), each (1, D, H, W) float32; patient_id and side (right, left or thorax) to put
    predictions back;
    roi_spacing (3,) the ROI's voxel size in mm per axis (for the PSF-aware loss) and spect_fwhm_mm
    the patient's SPECT resolution from ``fwhm`` (NaN where unknown).
    """

    def __init__(self, cache: PreprocessCache, patient_ids: list[str], *, with_spect: bool = True, augment=None,
                 fwhm: dict[str, float] | None = None):
        self.cache, self.with_spect, self.augment = cache, with_spect, augment
        self.records = {pid: cache.load(pid) for pid in patient_ids}
        self.items = [(pid, i, side) for pid, r in self.records.items() for i, side in enumerate(r.sides)]
        self.fwhm = dict(fwhm or {})

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def _image(record, i: int) -> torch.Tensor:
        """The network's input: the enhanced CT, then the context channels when preprocessed with them."""
        ct = torch.from_numpy(np.array(record.ct[i], dtype=np.float32))[None]
        if record.context is None:
            return ct
        return torch.cat([ct, torch.from_numpy(np.array(record.context[i], dtype=np.float32))])  # = network_input()[i]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        pid, i, side = self.items[idx]
        e = self.records[pid]
        item = {
            "ct": self._image(e, i),
            "lung": torch.from_numpy(np.array(e.lung[i], dtype=np.float32))[None],
            "mask": torch.from_numpy(np.array(e.mask[i], dtype=np.float32))[None],
            "patient_id": pid,
            "side": side,
            "roi_spacing": torch.tensor(e.inverse[side].roi_spacing(e.grid.spacing), dtype=torch.float32),
            "spect_fwhm_mm": torch.tensor(float(self.fwhm.get(pid, float("nan"))), dtype=torch.float32),
        }
        if self.with_spect and e.spect is not None:
            item["spect"] = torch.from_numpy(np.array(e.spect[i], dtype=np.float32))[None]
        if self.augment is not None:
            item = self.augment(item)
        return item


def manifest_column(path: str | Path, column: str) -> dict[str, float]:
    """{patient_id: value} of an optional numeric manifest column (e.g. ``spect_fwhm_mm``, which
    synthetic cohorts record); empty when the manifest has no such column, blanks left out."""
    import csv

    from ctpm.data.manifest import _delimiter

    text = Path(path).read_text(encoding="utf-8-sig")
    out: dict[str, float] = {}
    for row in csv.DictReader(text.splitlines(), delimiter=_delimiter(text)):
        value = (row.get(column) or "").strip()
        if value and row.get("patient_id"):
            try:
                out[row["patient_id"].strip()] = float(value)
            except ValueError:
                raise CtpmError(f"{column} is not a number: {value!r}", patient=row["patient_id"], path=path) from None
    return out


def build_augmentation(cfg: dict | None):
    """Optional training augmentation as MONAI random dictionary transforms (off in the paper's
    setting). Geometric ones act on every image and mask alike; intensity ones on the CT only."""
    if not cfg or not cfg.get("enabled", False):
        return None
    from monai.transforms import Compose, RandAffined, RandGaussianNoised, RandScaleIntensityd

    keys = ["ct", "lung", "mask", "spect"]
    t = []
    if cfg.get("affine_prob", 0) > 0:
        t.append(RandAffined(keys=keys, prob=cfg["affine_prob"], rotate_range=[np.deg2rad(cfg.get("rotate_deg", 5))] * 3,
                             scale_range=[cfg.get("scale", 0.05)] * 3, mode=["bilinear", "nearest", "nearest", "bilinear"],
                             padding_mode="zeros", allow_missing_keys=True))
    if cfg.get("noise_std", 0) > 0:
        t.append(RandGaussianNoised(keys=["ct"], prob=0.5, std=cfg["noise_std"]))
    if cfg.get("intensity_scale", 0) > 0:
        t.append(RandScaleIntensityd(keys=["ct"], factors=cfg["intensity_scale"], prob=0.5))
    return Compose(t)


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a permutation that is a function of (seed, epoch) only. Lightning calls
    ``set_epoch`` each epoch, so a run resumed from last.ckpt sees exactly the batches an
    uninterrupted run would have seen (a generator carried across epochs would restart)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class PatientDistributedSampler(DistributedSampler):
    """Validation, test and prediction under DDP: whole patients per rank, nothing padded.

    torch's DistributedSampler deals items (lungs) round-robin and pads the last round with
    repeated items, so a patient's two lungs land on different ranks (the prediction writer never
    sees both) and some lungs count twice in the metrics. Here rank r gets the patients r, r + W,
    ... (sorted by id), each with all its lungs, in dataset order; ranks may hold a different number
    of lungs. The metrics reduce sum states across ranks (ctpm.metrics), so every lung counts once.
    A subclass of DistributedSampler, so Lightning (use_distributed_sampler=true) keeps it as it is.
    """

    def __init__(self, dataset: LungDataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        patients = sorted({pid for pid, _, _ in dataset.items})
        if len(patients) < num_replicas:
            raise CtpmError(f"{len(patients)} held-out patient(s) for {num_replicas} processes: every process "
                            "needs one; use fewer devices for this run")
        mine = set(patients[rank::num_replicas])
        self.indices = [i for i, (pid, _, _) in enumerate(dataset.items) if pid in mine]
        self.num_samples = len(self.indices)
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


# --------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------


class CohortDataModule(pl.LightningDataModule):
    """One cohort of a manifest, served per ROI (lung or thorax) from the preprocessing cache.

    mode="pretrain": every patient of the cohort, a seeded `val_fraction` held out for validation.
    mode="fold": fold `fold` of `n_folds` (stratified by institution, persisted in splits.json beside
    the cache): its patients are the test set, the others train, with a seeded validation share
    held out of the training patients (the test fold is never used to choose anything).
    Missing cache entries are built in `prepare_data` (ctpm-preprocess does the same ahead of time).
    """

    def __init__(
        self,
        manifest: str,
        cache_dir: str,
        cohort: str = "noncancer",
        mode: str = "pretrain",
        fold: int = 0,
        n_folds: int = 3,
        val_fraction: float = 0.15,
        seed: int = 0,
        batch_size: int = 2,
        num_workers: int = 0,
        preprocess_workers: int = 1,
        pin_memory: bool = False,
        preprocessing: dict | None = None,
        augmentation: dict | None = None,
        progress: bool = True,
    ):
        super().__init__()
        if mode not in MODES:
            raise CtpmError(f"data.mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.manifest_path, self.cohort, self.mode = manifest, cohort, mode
        self.fold, self.n_folds, self.val_fraction, self.seed = int(fold), int(n_folds), float(val_fraction), int(seed)
        self.batch_size, self.num_workers, self.preprocess_workers = int(batch_size), int(num_workers), int(preprocess_workers)
        self.pin_memory, self.progress = pin_memory, progress
        self.preprocessing = PreprocessConfig.from_any(preprocessing)
        self.cache = PreprocessCache(cache_dir, self.preprocessing)
        self.augmentation = augmentation
        if mode == "fold" and not 0 <= self.fold < self.n_folds:
            raise CtpmError(f"data.fold={self.fold} is outside 0..{self.n_folds - 1} (n_folds={self.n_folds})")
        self.split: dict[str, list[str]] = {}
        self._manifest: Manifest | None = None

    # ---- what belongs where ----
    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = load_manifest(self.manifest_path, require_spect=True, cohort=self.cohort)
        return self._manifest

    @property
    def splits_path(self) -> Path:
        return self.cache.root / "splits.json"

    def make_split(self) -> dict[str, list[str]]:
        patients = self.manifest.patients
        if self.mode == "pretrain":
            train, val = hold_out([p.patient_id for p in patients], self.val_fraction, self.seed)
            return {"train": train, "val": val, "test": val}
        splits = load_or_make_splits(self.splits_path, patients, self.cohort, self.n_folds, self.seed, self.val_fraction)
        return dict(splits["folds"][self.fold])

    # ---- Lightning hooks ----
    def prepare_data(self) -> None:
        result = self.cache.ensure(self.manifest.patients, workers=self.preprocess_workers, progress=self.progress)
        result.raise_if_failed("preprocessed")
        if self.mode == "fold":
            self.make_split()  # drawn and saved once, before any fold job reads it

    def setup(self, stage: str | None = None) -> None:
        if self.split:
            return
        self.split = self.make_split()
        aug = build_augmentation(self.augmentation)
        fwhm = manifest_column(self.manifest_path, "spect_fwhm_mm")
        self.train_set = LungDataset(self.cache, self.split["train"], augment=aug, fwhm=fwhm)
        self.val_set = LungDataset(self.cache, self.split["val"], fwhm=fwhm) if self.split["val"] else None
        self.test_set = LungDataset(self.cache, self.split["test"], fwhm=fwhm) if self.split["test"] else None

    def _loader(self, ds, shuffle: bool) -> DataLoader:
        """Training: the seeded shuffle (Lightning wraps it in its distributed sampler under DDP).
        Evaluation: in order; under DDP, whole patients per process (PatientDistributedSampler)."""
        sampler = EpochSeededSampler(len(ds), self.seed) if shuffle else None
        trainer = getattr(self, "trainer", None)
        if not shuffle and trainer is not None and trainer.world_size > 1:
            sampler = PatientDistributedSampler(ds, num_replicas=trainer.world_size, rank=trainer.global_rank)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []

    def test_dataloader(self):
        return self._loader(self.test_set, shuffle=False) if self.test_set is not None else []

    def predict_dataloader(self):
        """The patients whose predictions the evaluation needs: the test fold (fold mode), the
        held-out share (pretrain mode)."""
        return self.test_dataloader()
