"""Synthetic cohorts (ctpm-synth): two cohorts, own SPECT grids, five lobes, reproducible bytes."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctpm.data.io import load_image
from ctpm.data.manifest import load_manifest
from ctpm.synth import make_patient, synthesise
from tests.conftest import synth_settings
from tests.data_helpers import run_cli


@pytest.fixture(scope="module")
def cli_cohort(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    proc = run_cli("ctpm-synth", f"out={out}", "preset=tiny", "n_noncancer=2", "n_cancer=2", "seed=5")
    return out, proc


def _digest(folder: Path, *, everything: bool = False) -> dict[str, str]:
    """sha256 of every file; the images and the manifest only unless `everything` (with the run
    record .hydra/ and the log)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and (everything or (".hydra" not in p.parts and p.suffix != ".log"))}


def test_cli_makes_a_two_cohort_set(cli_cohort):
    out, proc = cli_cohort
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    m = load_manifest(out / "manifest.csv")
    assert {(p.cohort, p.institution) for p in m} == {("noncancer", "A"), ("cancer", "A"), ("cancer", "B")}
    assert len(m.cohort("noncancer")) == 2 and len(m.cohort("cancer")) == 2
    assert "4 patients" in proc.stdout
    for p in m:
        assert p.ct.is_file() and p.spect.is_file() and p.lobes.is_file() and p.perfusion.is_file()
        if p.cohort == "cancer":
            assert p.tumor_diameter_mm is not None and p.tumor_diameter_mm >= (20.0 if p.institution == "A" else 6.0)
            assert p.dose is not None and p.dose.is_file()
        else:
            assert p.tumor_diameter_mm is None and p.dose is None


def test_spect_and_ct_grids_differ(cli_cohort):
    out, _ = cli_cohort
    for p in load_manifest(out / "manifest.csv"):
        ct, spect = load_image(p.ct, kind="ct"), load_image(p.spect, kind="spect")
        assert ct.shape != spect.shape
        assert not np.allclose(ct.spacing, spect.spacing)
        assert not np.allclose(ct.affine[:3, 3], spect.affine[:3, 3])
        # ... but they overlap in world space, over the lungs
        lo = np.maximum(ct.world_bounds()[0], spect.world_bounds()[0])
        hi = np.minimum(ct.world_bounds()[1], spect.world_bounds()[1])
        assert np.all(hi - lo > 150)
        assert spect.array.min() >= 0 and spect.array.max() > 0
        assert ct.array.dtype == np.float32 and nib.load(str(p.ct)).get_data_dtype() == np.int16


def test_lobes_hold_the_five_labels_on_the_ct_grid(cli_cohort):
    out, _ = cli_cohort
    for p in load_manifest(out / "manifest.csv"):
        lobes, ct = nib.load(str(p.lobes)), nib.load(str(p.ct))
        assert lobes.shape == ct.shape
        np.testing.assert_allclose(lobes.affine, ct.affine)
        assert set(np.unique(np.asarray(lobes.dataobj))) == {0, 1, 2, 3, 4, 5}


def test_left_lobes_lie_on_the_patients_left(cli_cohort):
    """RAS: the left lobes (1, 2) at smaller world x than the right ones (3, 4, 5)."""
    out, _ = cli_cohort
    for p in load_manifest(out / "manifest.csv"):
        img = nib.load(str(p.lobes))
        lab = np.asarray(img.dataobj)
        x = {}
        for name, values in (("left", [1, 2]), ("right", [3, 4, 5])):
            idx = np.argwhere(np.isin(lab, values))
            x[name] = (img.affine[:3, :3] @ idx.mean(0) + img.affine[:3, 3])[0]
        assert x["left"] < x["right"] - 50, x


def test_institution_slice_spacing(cli_cohort):
    out, _ = cli_cohort
    presets = synth_settings()["presets"]["tiny"]["ct_slice"]
    for p in load_manifest(out / "manifest.csv"):
        sp = load_image(p.ct, kind="ct").spacing
        assert sp[2] == pytest.approx(presets[p.institution]), p.patient_id
    assert presets["A"] != presets["B"]


def test_refuses_to_overwrite_an_existing_cohort(cli_cohort):
    out, first = cli_cohort
    assert first.returncode == 0
    before = _digest(out, everything=True)
    assert ".hydra/config.yaml" in before
    proc = run_cli("ctpm-synth", f"out={out}", "preset=tiny", "n_noncancer=1", "n_cancer=0", "seed=9")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ctpm-synth: error:")]
    assert len(lines) == 1, proc.stderr
    assert str(out) in lines[0] and "overwrite=true" in lines[0] and "already" in lines[0]
    assert "Traceback" not in proc.stderr
    # nothing of the cohort touched, not even its record of how it was made (.hydra/config.yaml)
    assert _digest(out, everything=True) == before


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    s = synth_settings()
    kw = dict(preset="tiny", n_noncancer=1, n_cancer=1, progress=False, **s)
    a = synthesise(tmp_path / "a", seed=11, **kw).parent
    b = synthesise(tmp_path / "b", seed=11, **kw).parent
    c = synthesise(tmp_path / "c", seed=12, **kw).parent
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert len(da) >= 2 + 4 * 2 and da == db
    images = [k for k in da if k.endswith(".nii.gz")]
    assert all(da[k] != dc[k] for k in images)


def test_make_patient_deterministic_and_institution_grids():
    s = synth_settings()
    tiny = s["presets"]["tiny"]
    a1 = make_patient("LC-A-001", "cancer", "A", tiny, s["physics"], 0)
    a2 = make_patient("LC-A-001", "cancer", "A", tiny, s["physics"], 0)
    b = make_patient("LC-B-001", "cancer", "B", tiny, s["physics"], 0)
    np.testing.assert_array_equal(a1.ct, a2.ct)
    np.testing.assert_array_equal(a1.spect, a2.spect)
    assert a1.ct.shape[2] != b.ct.shape[2]
    assert a1.spect.shape == tuple(tiny["spect_matrix"]["A"]) and b.spect.shape == tuple(tiny["spect_matrix"]["B"])
    assert a1.tumor_diameter_mm >= 20.0


def test_manifest_records_each_patients_spect_psf(cli_cohort):
    """spect_fwhm_mm: the camera PSF the simulation drew for that patient, within the configured range."""
    out, _ = cli_cohort
    s = synth_settings()
    lo, hi = s["physics"]["spect"]["fwhm"]
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    fwhm = {r["patient_id"]: float(r["spect_fwhm_mm"]) for r in rows}
    assert len(fwhm) == 4 and all(lo <= v <= hi for v in fwhm.values()) and len(set(fwhm.values())) == 4
    p = next(r for r in rows if r["cohort"] == "noncancer")
    again = make_patient(p["patient_id"], "noncancer", p["institution"], s["presets"]["tiny"], s["physics"], 5)
    assert fwhm[p["patient_id"]] == pytest.approx(again.spect_fwhm_mm, abs=5e-4)
