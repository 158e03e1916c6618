"""The preprocessing cache: one record per patient, keyed by config, atomic (lungs included),
checked, rebuilt when damaged, memory-mapped, with a QA lung mask in the CT's geometry;
ctpm-preprocess roundtrip=true; workers."""

from __future__ import annotations

import csv
import json
import warnings

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from ctpm.data.cache import PreprocessCache, config_hash, select_config
from ctpm.data.manifest import load_manifest
from ctpm.data.preprocess import preprocess_patient
from ctpm.data.record import GRID_ARRAYS, ROI_ARRAYS, PatientRecord, restore, to_ct
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


def _status(result) -> dict[str, str]:
    """{patient: status} of an ensure() (failures as "failed")."""
    return {**{pid: s for pid, (s, _) in result.ok.items()}, **{f.patient: "failed" for f in result.failed}}


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
    assert _status(c1.ensure([p], progress=False)) == {p.patient_id: "built"}
    assert c1.problem(p.patient_id) is None
    assert c2.problem(p.patient_id) == "missing"
    assert _status(c2.ensure([p], progress=False)) == {p.patient_id: "built"}
    e1, e2 = c1.load(p.patient_id), c2.load(p.patient_id)
    assert e1.path != e2.path and e1.path.parent == e2.path.parent
    assert not np.allclose(e1.ct, e2.ct)  # the new window, not the old entry
    meta1, meta2 = (json.loads((e.path / "meta.json").read_text()) for e in (e1, e2))
    assert meta1["config_hash"] == c1.key and meta2["config_hash"] == c2.key
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
    status = _status(cache.ensure([two[0]], progress=False))
    assert status == {two[0].patient_id: "built"} and cache.problem(two[0].patient_id) is None


def test_rerun_does_not_redo_complete_entries(tiny_cohort, tiny_cache):
    patients = load_manifest(tiny_cohort).patients
    cache = PreprocessCache(tiny_cache, TINY_PREPROCESSING)
    stamps = {p.patient_id: (cache.entry_dir(p.patient_id) / "ct.npy").stat().st_mtime_ns for p in patients}
    result = cache.ensure(patients, progress=False)
    status = _status(result)
    assert set(status.values()) == {"cached"} and len(status) == len(patients)
    assert all(r is None for _, r in result.ok.values())
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
        status = _status(cache.ensure([two[0]], progress=False))
    assert status == {pid: "rebuilt"}
    assert cache.problem(pid) is None
    np.testing.assert_array_equal(cache.load(pid).ct, good)
    assert _no_temp_left(tmp_path)


def test_the_loaded_record_is_the_computed_one_memory_mapped(pre_a, tmp_path):
    cache = PreprocessCache(tmp_path, TINY_PREPROCESSING)
    cache.write(pre_a)
    e = cache.load(pre_a.patient_id)
    assert type(e) is type(pre_a) is PatientRecord
    for name in ROI_ARRAYS + GRID_ARRAYS:
        a, b = getattr(e, name), getattr(pre_a, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert isinstance(a, np.memmap), name
            assert a.dtype == b.dtype, name
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert not isinstance(cache.load(pre_a.patient_id, mmap=False).ct, np.memmap)
    assert e.sides == pre_a.sides and e.ct_grid.same_as(pre_a.ct_grid, atol=0) and e.grid.same_as(pre_a.grid, atol=0)
    assert e.inverse == pre_a.inverse and e.spect_percentile == pre_a.spect_percentile and e.dicom == pre_a.dicom
    np.testing.assert_array_equal(e.ct_lungs, pre_a.ct_lungs)
    np.testing.assert_array_equal(e.ct_mask, pre_a.ct_mask)
    # the inverse is plain numbers in meta.json (no transform history)
    meta = json.loads((e.path / "meta.json").read_text())
    assert set(meta["inverse"]) == set(pre_a.sides)
    assert all(isinstance(v, (int, str)) for inv in meta["inverse"].values() for x in inv.values()
               for v in (x if isinstance(x, list) else [x]))
    # a prediction inverts from the entry alone (another process) as from the live record
    roi = e.roi_maps(np.asarray(e.spect))
    np.testing.assert_array_equal(restore(roi, e), restore(roi, pre_a))
    np.testing.assert_array_equal(to_ct(restore(roi, e), e), to_ct(restore(roi, pre_a), pre_a))


def test_the_evaluation_grid_part_holds_lobes_and_truth(tiny_cohort, tmp_path):
    """Lobes (nearest) and the synthetic truth (linear) on the evaluation grid, checked against
    scipy's map_coordinates on the files themselves."""
    from scipy import ndimage as ndi

    p = load_manifest(tiny_cohort).by_id()["LC-A-001"]
    assert p.lobes is not None and p.perfusion is not None
    rec = preprocess_patient(p, TINY_PREPROCESSING)
    gv = rec.evaluation(p)
    assert gv.patient is p and gv.lobes.shape == gv.truth.shape == gv.shape == rec.grid.shape
    ijk = np.argwhere(gv.mask)
    for path, order, got in ((p.lobes, 0, gv.lobes), (p.perfusion, 1, gv.truth)):
        img = nib.load(str(path))
        src = np.linalg.inv(img.affine) @ np.c_[rec.grid.world(ijk), np.ones(len(ijk))].T
        want = ndi.map_coordinates(np.asarray(img.dataobj, np.float64), src[:3], order=order, mode="constant")
        np.testing.assert_allclose(got[tuple(ijk.T)], want, atol=1e-4)
    assert set(np.unique(gv.lobes[gv.mask])) - {0} == {1, 2, 3, 4, 5} and (gv.lobes[gv.mask] > 0).mean() > 0.9


def test_the_crop_box_is_the_lungs_box(pre_a):
    """The recorded crop box of each lung is its bounding box on the evaluation grid."""
    for side, value in (("right", 1), ("left", 2)):
        inv = pre_a.inverse[side]
        idx = np.argwhere(np.asarray(pre_a.grid_lungs) == value)
        assert inv.start == tuple(idx.min(0)) and inv.stop == tuple(idx.max(0) + 1)
        assert inv.grid_shape == pre_a.grid.shape and inv.roi_size == tuple(TINY_PREPROCESSING["roi_size"])
        assert inv.transpose == (2, 1, 0) and inv.flip == ((2,) if side == "left" else ())


def test_lungs_are_inside_the_commit(two, pre_a, tmp_path, monkeypatch):
    """A kill after the entry's files are written but before its rename leaves no entry (the QA
    lungs included in what the rerun rebuilds); a removed QA copy comes back on a rerun."""
    import ctpm.data.io as io

    cache = PreprocessCache(tmp_path, TINY_PREPROCESSING)
    real_replace = io.os.replace

    def killed(src, dst):
        if str(dst) == str(cache.entry_dir(pre_a.patient_id)):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.write(pre_a)
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert cache.problem(pre_a.patient_id) == "missing" and _no_temp_left(tmp_path)
    assert _status(cache.ensure([two[0]], progress=False)) == {pre_a.patient_id: "built"}
    qa = cache.qa_lungs_path(pre_a.patient_id)
    assert qa.read_bytes() == (cache.entry_dir(pre_a.patient_id) / "lungs.nii.gz").read_bytes()
    qa.unlink()
    assert _status(cache.ensure([two[0]], progress=False)) == {pre_a.patient_id: "cached"}
    np.testing.assert_array_equal(np.asarray(nib.load(str(qa)).dataobj), pre_a.ct_lungs)


def test_select_config_of_a_cache_folder(tmp_path):
    a = PreprocessCache(tmp_path, TINY_PREPROCESSING)
    a.root.mkdir(parents=True, exist_ok=True)
    (tmp_path / f"{a.key}.json").write_text(json.dumps(a.cfg.to_dict()))
    assert select_config(tmp_path).to_dict() == a.cfg.to_dict()
    b = PreprocessCache(tmp_path, {**TINY_PREPROCESSING, "roi_size": [16, 8, 8]})
    (tmp_path / f"{b.key}.json").write_text(json.dumps(b.cfg.to_dict()))
    with pytest.raises(Exception, match="holds 2 preprocessing configs"):
        select_config(tmp_path)
    assert select_config(tmp_path, hashes=[b.key]).to_dict() == b.cfg.to_dict()
    assert select_config(tmp_path, explicit={"roi_size": [32, 16, 16]}).to_dict() == a.cfg.to_dict()
    new = select_config(tmp_path, explicit={"roi_size": [8, 8, 8]})  # not cached: that config
    assert list(new.roi_size) == [8, 8, 8] and list(new.spacing) == [1.0, 1.0, 1.0]


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
    np.testing.assert_array_equal(labels, cache.load(pre_a.patient_id).ct_lungs)
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
        s1 = _status(c1.ensure(two, workers=1, progress=False))
        s2 = _status(c2.ensure(two, workers=2, progress=False))
    assert s1 == s2 == {p.patient_id: "built" for p in two}
    for p in two:
        e1, e2 = c1.load(p.patient_id), c2.load(p.patient_id)
        for name in ROI_ARRAYS + GRID_ARRAYS:
            a, b = getattr(e1, name), getattr(e2, name)
            assert (a is None) == (b is None), name
            if a is not None:
                np.testing.assert_array_equal(a, b)
        m1, m2 = (json.loads((e.path / "meta.json").read_text()) for e in (e1, e2))
        assert m1 == m2
        assert c1.qa_lungs_path(p.patient_id).read_bytes() == c2.qa_lungs_path(p.patient_id).read_bytes()
