"""The preprocessing cache: keyed by config, atomic, checked, rebuilt when damaged, memory-mapped,
with a QA lung mask in the CT's geometry; ctpm-preprocess roundtrip=true; workers."""

from __future__ import annotations

import csv
import json
import warnings

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from ctpm.data.cache import PreprocessCache, config_hash
from ctpm.data.manifest import load_manifest
from ctpm.data.preprocess import preprocess_patient, restore_to_grid
from ctpm.data.transforms import PreprocessConfig
from ctpm.errors import CtpmWarning
from tests.conftest import TINY_PREPROCESSING
from tests.data_helpers import absolute_manifest, run_cli


@pytest.fixture(scope="module")
def two(tiny_cohort):
    by_id = load_manifest(tiny_cohort).by_id()
    return [by_id["NC-A-002"], by_id["LC-B-002"]]


@pytest.fixture(scope="module")
def pre_a(two):
    return preprocess_patient(two[0], TINY_PREPROCESSING)


def _no_temp_left(root) -> bool:
    return not [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_config_hash_is_stable_and_sensitive():
    a = config_hash(PreprocessConfig.from_any(TINY_PREPROCESSING))
    b = config_hash(PreprocessConfig.from_any(OmegaConf.create({"roi_size": [32, 16, 16], "spacing": [4, 4, 4]})))
    c = config_hash(PreprocessConfig.from_any({"spacing": (4.0, 4.0, 4.0), "roi_size": (32, 16, 16)}))
    assert a == b == c
    for change in ({"hu_window": [-1000.0, 200.0]}, {"roi_size": [32, 16, 8]}, {"spect_percentile": 70.0},
                   {"mirror_left": False}, {"lung": {"air_threshold": -400.0}}):
        assert config_hash(PreprocessConfig.from_any({**TINY_PREPROCESSING, **change})) != a, change


def test_changed_config_is_another_entry_never_a_stale_read(two, tmp_path):
    p = two[0]
    c1 = PreprocessCache(tmp_path, TINY_PREPROCESSING)
    c2 = PreprocessCache(tmp_path, {**TINY_PREPROCESSING, "hu_window": [-1000.0, 200.0]})
    assert c1.key != c2.key
    assert c1.ensure([p], progress=False)[0] == {p.patient_id: "built"}
    assert c1.problem(p.patient_id) is None
    assert c2.problem(p.patient_id) == "missing"
    assert c2.ensure([p], progress=False)[0] == {p.patient_id: "built"}
    e1, e2 = c1.load(p.patient_id), c2.load(p.patient_id)
    assert e1.path != e2.path and e1.path.parent == e2.path.parent
    assert not np.allclose(e1.ct, e2.ct)  # the new window, not the old entry
    assert e1.meta["config_hash"] == c1.key and e2.meta["config_hash"] == c2.key
    assert json.loads((tmp_path / f"{c2.key}.json").read_text())["hu_window"] == [-1000.0, 200.0]
    # an entry whose meta.json claims another config is not used
    meta = json.loads((e1.path / "meta.json").read_text())
    meta["config_hash"] = "0" * 12
    (e1.path / "meta.json").write_text(json.dumps(meta))
    assert c1.problem(p.patient_id) == "config mismatch"


def test_crash_mid_write_leaves_no_entry(two, pre_a, tmp_path, monkeypatch):
    cache = PreprocessCache(tmp_path, TINY_PREPROCESSING)
    real_save, calls = np.save, []

    def save_then_crash(file, arr, *a, **kw):
        calls.append(file)
        if len(calls) > 1:
            raise OSError("No space left on device")
        return real_save(file, arr, *a, **kw)

    monkeypatch.setattr(np, "save", save_then_crash)
    with pytest.raises(OSError, match="No space"):
        cache.write(pre_a)
    monkeypatch.setattr(np, "save", real_save)
    assert len(calls) == 2
    assert not cache.entry_dir(pre_a.patient_id).exists()
    assert cache.problem(pre_a.patient_id) == "missing"
    assert _no_temp_left(tmp_path)
    status, _ = cache.ensure([two[0]], progress=False)
    assert status == {two[0].patient_id: "built"} and cache.problem(two[0].patient_id) is None


def test_rerun_does_not_redo_complete_entries(tiny_cohort, tiny_cache):
    patients = load_manifest(tiny_cohort).patients
    cache = PreprocessCache(tiny_cache, TINY_PREPROCESSING)
    stamps = {p.patient_id: (cache.entry_dir(p.patient_id) / "ct.npy").stat().st_mtime_ns for p in patients}
    status, rt = cache.ensure(patients, progress=False)
    assert set(status.values()) == {"cached"} and len(status) == len(patients) and rt == {}
    assert stamps == {p.patient_id: (cache.entry_dir(p.patient_id) / "ct.npy").stat().st_mtime_ns for p in patients}


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_entry_is_detected_and_rebuilt(two, pre_a, tmp_path, damage):
    cache = PreprocessCache(tmp_path, TINY_PREPROCESSING)
    cache.write(pre_a)
    pid = pre_a.patient_id
    d = cache.entry_dir(pid)
    good = np.load(d / "ct.npy").copy()
    if damage == "truncate":
        data = (d / "ct.npy").read_bytes()
        (d / "ct.npy").write_bytes(data[: len(data) // 2])
        assert cache.problem(pid) == "ct.npy damaged (size)"
    elif damage == "flip":
        data = bytearray((d / "ct.npy").read_bytes())
        data[-100] ^= 0xFF
        (d / "ct.npy").write_bytes(bytes(data))
        assert cache.problem(pid) == "ct.npy damaged (checksum)"
    else:
        (d / "meta.json").write_text("{not json")
        assert cache.problem(pid) == "meta.json unreadable"
    with pytest.warns(CtpmWarning, match=f"patient {pid}: cache entry .*rebuilding"):
        status, _ = cache.ensure([two[0]], progress=False)
    assert status == {pid: "rebuilt"}
    assert cache.problem(pid) is None
    np.testing.assert_array_equal(cache.load(pid).ct, good)
    assert _no_temp_left(tmp_path)


def test_memory_mapped_load_and_inverse_from_the_entry(pre_a, tmp_path):
    cache = PreprocessCache(tmp_path, TINY_PREPROCESSING)
    cache.write(pre_a)
    e = cache.load(pre_a.patient_id)
    for name in ("ct", "spect", "lung", "mask"):
        arr = getattr(e, name)
        assert isinstance(arr, np.memmap), name
        np.testing.assert_array_equal(arr, getattr(pre_a, name))
    assert not isinstance(cache.load(pre_a.patient_id, mmap=False).ct, np.memmap)
    assert e.sides == pre_a.sides and e.ct_shape == pre_a.ct_shape
    np.testing.assert_allclose(e.ct_affine, pre_a.ct_affine)
    np.testing.assert_array_equal(e.grid_lungs(), pre_a.grid_lungs)
    # a prediction inverts from the entry alone (another process) as from the live result
    roi = {s: np.asarray(e.spect[i]) for i, s in enumerate(e.sides)}
    a = restore_to_grid(roi, e.lung_ops(), e.grid_lungs(), TINY_PREPROCESSING)
    b = restore_to_grid(roi, pre_a.lung_ops, pre_a.grid_lungs, TINY_PREPROCESSING)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_qa_lungs_in_the_ct_geometry(two, pre_a, tmp_path):
    cache = PreprocessCache(tmp_path, TINY_PREPROCESSING)
    cache.write(pre_a)
    qa = nib.load(str(cache.qa_lungs_path(pre_a.patient_id)))
    ct = nib.load(str(two[0].ct))
    assert qa.shape == ct.shape
    np.testing.assert_allclose(qa.affine, ct.affine, atol=1e-5)
    labels = np.asarray(qa.dataobj)
    assert set(np.unique(labels)) == {0, 1, 2}
    np.testing.assert_array_equal(labels, pre_a.ct_lungs)
    # the labels sit on the lungs of that CT: parenchyma HU
    hu = np.asarray(ct.dataobj)
    assert np.median(hu[labels > 0]) < -600


def test_cli_roundtrip_csv(tiny_cohort, tmp_path):
    manifest = absolute_manifest(tiny_cohort, tmp_path / "subset.csv", ids=["NC-A-003", "LC-B-003"])
    out = tmp_path / "cache"
    proc = run_cli("ctpm-preprocess", f"manifest={manifest}", f"out={out}", "roundtrip=true", "progress=false",
                   "preprocessing.spacing=[4,4,4]", "preprocessing.roi_size=[32,16,16]")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    with (out / "roundtrip.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["patient_id", "spearman_r"]
    assert [r[0] for r in rows[1:]] == ["NC-A-003", "LC-B-003"]
    assert all(float(r[1]) >= 0.95 for r in rows[1:]), rows
    assert "roundtrip Spearman R" in proc.stdout
    cache = PreprocessCache(out, TINY_PREPROCESSING)  # the CLI's entries are the library's
    assert all(cache.problem(pid) is None for pid in ("NC-A-003", "LC-B-003"))


def test_workers_give_the_same_entries(two, tmp_path):
    c1 = PreprocessCache(tmp_path / "w1", TINY_PREPROCESSING)
    c2 = PreprocessCache(tmp_path / "w2", TINY_PREPROCESSING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s1, _ = c1.ensure(two, workers=1, progress=False)
        s2, _ = c2.ensure(two, workers=2, progress=False)
    assert s1 == s2 == {p.patient_id: "built" for p in two}
    for p in two:
        e1, e2 = c1.load(p.patient_id), c2.load(p.patient_id)
        for name in ("ct", "spect", "lung", "mask"):
            np.testing.assert_array_equal(getattr(e1, name), getattr(e2, name))
        assert e1.meta == e2.meta
        assert c1.qa_lungs_path(p.patient_id).read_bytes() == c2.qa_lungs_path(p.patient_id).read_bytes()
