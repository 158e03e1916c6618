"""The cohort DataModule: patient-level folds stratified by institution, persisted splits, the
pretrain hold-out, bad fold settings, batches, and the epoch-seeded sampler."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from ctpm.data.datamodule import CohortDataModule, EpochSeededSampler, hold_out, make_folds
from ctpm.data.manifest import Patient, load_manifest
from ctpm.errors import CtpmError
from tests.conftest import TINY_PREPROCESSING
from tests.data_helpers import absolute_manifest

ROI = tuple(TINY_PREPROCESSING["roi_size"])


@pytest.fixture
def cache(cache_copy) -> Path:
    return cache_copy


def _dm(manifest, cache, **kw) -> CohortDataModule:
    args = dict(cohort="cancer", mode="fold", fold=0, n_folds=3, seed=0, batch_size=2, val_fraction=0.25,
                preprocessing=TINY_PREPROCESSING, progress=False)
    args.update(kw)
    return CohortDataModule(str(manifest), str(cache), **args)


def _patients(n_a: int, n_b: int) -> list[Patient]:
    return ([Patient(f"A{i:02d}", "cancer", "A", Path("ct"), Path("spect")) for i in range(n_a)]
            + [Patient(f"B{i:02d}", "cancer", "B", Path("ct"), Path("spect")) for i in range(n_b)])


# --------------------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_a,n_b,k", [(14, 19, 5), (3, 3, 3), (7, 2, 4), (10, 0, 3)])
def test_folds_partition_the_cohort_stratified_by_institution(n_a, n_b, k):
    patients = _patients(n_a, n_b)
    folds = make_folds(patients, k, seed=1)
    assert len(folds) == k
    ids = [pid for f in folds for pid in f]
    assert sorted(ids) == sorted(p.patient_id for p in patients)  # each patient in exactly one test fold
    inst = {p.patient_id: p.institution for p in patients}
    for name, n in (("A", n_a), ("B", n_b)):
        for f in folds:
            c = sum(inst[pid] == name for pid in f)
            assert abs(c - n / k) < 1, (name, c, n / k)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    assert make_folds(patients, k, seed=1) == folds  # seeded
    if n_a + n_b > 10:
        assert make_folds(patients, k, seed=2) != folds


def test_hold_out_is_seeded():
    ids = [f"P{i:02d}" for i in range(20)]
    train, val = hold_out(ids, 0.15, seed=3)
    assert len(val) == 3 and sorted(train + val) == ids and not set(train) & set(val)
    assert hold_out(ids, 0.15, seed=3) == (train, val)
    assert hold_out(ids, 0.15, seed=4) != (train, val)
    assert hold_out(ids, 0.0, seed=3) == (ids, [])


def test_fold_mode_splits_by_patient(tiny_cohort, cache):
    n_cancer = len(load_manifest(tiny_cohort).cohort("cancer"))
    tests = []
    for k in range(3):
        dm = _dm(tiny_cohort, cache, fold=k)
        dm.prepare_data()
        dm.setup("fit")
        split = dm.split
        assert not set(split["train"]) & set(split["test"])
        assert not set(split["val"]) & set(split["test"]) and not set(split["val"]) & set(split["train"])
        assert sorted(split["train"] + split["val"] + split["test"]) == sorted(p.patient_id for p in dm.manifest)
        tests += split["test"]
        # both lungs of a patient are on the same side of the split
        for ds, name in ((dm.train_set, "train"), (dm.test_set, "test")):
            sides = Counter(pid for pid, _, _ in ds.items)
            assert set(sides) == set(split[name]) and set(sides.values()) == {2}
        insts = Counter(p.institution for p in dm.manifest if p.patient_id in split["test"])
        for name, n in Counter(p.institution for p in dm.manifest).items():
            assert abs(insts[name] - n / 3) < 1
    assert sorted(tests) == sorted(p.patient_id for p in load_manifest(tiny_cohort).cohort("cancer"))
    assert len(tests) == n_cancer


def test_splits_are_persisted_and_reused(tiny_cohort, cache, tmp_path):
    dm = _dm(tiny_cohort, cache, seed=0)
    dm.prepare_data()
    saved = json.loads((cache / "splits.json").read_text())
    assert saved["cohort"] == "cancer" and saved["n_folds"] == 3 and saved["seed"] == 0
    # another seed reads the saved file: the folds of a cohort are drawn once
    other = _dm(tiny_cohort, cache, seed=123, fold=1)
    other.setup("fit")
    assert other.split == saved["folds"][1]
    assert json.loads((cache / "splits.json").read_text()) == saved
    # a changed cohort (a patient gone) is refused with a clear message
    ids = [p.patient_id for p in load_manifest(tiny_cohort).patients if p.patient_id != "LC-B-003"]
    smaller = absolute_manifest(tiny_cohort, tmp_path / "smaller.csv", ids=ids)
    with pytest.raises(CtpmError, match="splits.json was drawn for 6 patients") as e:
        _dm(smaller, cache).make_split()
    assert "delete it" in str(e.value) and str(cache / "splits.json") in str(e.value)
    # ... and so is another number of folds
    with pytest.raises(CtpmError, match="2 folds are asked for"):
        _dm(tiny_cohort, cache, n_folds=2).make_split()


def test_pretrain_mode_holds_out_a_seeded_share(tiny_cohort, cache):
    dm = _dm(tiny_cohort, cache, cohort="noncancer", mode="pretrain", val_fraction=0.25, seed=7)
    dm.prepare_data()
    dm.setup("fit")
    ids = sorted(p.patient_id for p in load_manifest(tiny_cohort).cohort("noncancer"))
    assert len(dm.split["val"]) == 1 and sorted(dm.split["train"] + dm.split["val"]) == ids
    again = _dm(tiny_cohort, cache, cohort="noncancer", mode="pretrain", val_fraction=0.25, seed=7)
    assert again.make_split() == dm.split
    assert not (cache / "splits.json").exists()  # pretrain draws no folds


def test_bad_fold_settings(tiny_cohort, cache):
    for fold in (-1, 3):
        with pytest.raises(CtpmError, match=r"outside 0\.\.2"):
            _dm(tiny_cohort, cache, fold=fold)
    with pytest.raises(CtpmError, match="fewer than the 10 folds"):
        _dm(tiny_cohort, cache, n_folds=10, fold=0).prepare_data()
    assert not (cache / "splits.json").exists()
    with pytest.raises(CtpmError, match="mode"):
        _dm(tiny_cohort, cache, mode="kfold")


# --------------------------------------------------------------------------------------------------
# Batches and the sampler
# --------------------------------------------------------------------------------------------------


def test_batches(tiny_cohort, cache):
    dm = _dm(tiny_cohort, cache)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for key in ("ct", "spect", "lung", "mask"):
        assert tuple(batch[key].shape) == (2, 1, *ROI), key
        assert batch[key].dtype == torch.float32
    assert len(batch["patient_id"]) == 2 and set(batch["side"]) <= {"right", "left"}
    assert set(batch["patient_id"]) <= set(dm.split["train"])
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
    test_items = [(pid, side) for b in dm.test_dataloader() for pid, side in zip(b["patient_id"], b["side"])]
    assert sorted(test_items) == sorted((pid, s) for pid in dm.split["test"] for s in ("right", "left"))
    assert math.ceil(len(dm.train_set) / 2) == len(dm.train_dataloader())


def test_epoch_seeded_sampler():
    s = EpochSeededSampler(50, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    assert sorted(e0) == list(range(50)) and len(s) == 50
    assert list(s) == e0  # same epoch, same order (a resumed run sees the same batches)
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(e1) == list(range(50))
    fresh = EpochSeededSampler(50, seed=3)
    fresh.set_epoch(1)
    assert list(fresh) == e1  # a function of (seed, epoch) only
    other = EpochSeededSampler(50, seed=4)
    other.set_epoch(1)
    assert list(other) != e1
