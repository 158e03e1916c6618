"""ctpm-evaluate's baselines, ceilings, interior and defect columns on the tiny synthetic cohort,
end to end through evaluate() and write_report()."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ctpm.data.io import save_nifti
from ctpm.data.manifest import load_manifest
from ctpm.evaluation.evaluate import evaluate, grid_volumes
from ctpm.evaluation.report import write_report
from tests.conftest import TINY_PREPROCESSING

CFG = {"spacing": TINY_PREPROCESSING["spacing"]}


@pytest.fixture(scope="module")
def evaluated(tiny_cohort, tmp_path_factory):
    m = load_manifest(tiny_cohort)
    pred_dir = tmp_path_factory.mktemp("pred")
    rng = np.random.default_rng(0)
    for p in m.cohort("cancer"):
        gv = grid_volumes(p, CFG)
        save_nifti(np.clip(gv.spect + rng.normal(0, 0.1, gv.shape), 0, 1).astype(np.float32), gv.affine,
                   pred_dir / f"{p.patient_id}.nii.gz")
    result = evaluate(m, pred_dir, cfg=CFG, cohort="cancer", progress=False, default_spect_fwhm_mm=13.0)
    return m, pred_dir, result


def test_every_set_and_column(evaluated):
    m, _, result = evaluated
    rows = result["rows"]
    assert set(rows) == {"model", "density", "geometry", "truth_psf", "oracle_psf", "truth"}
    assert all(len(v) == 6 for v in rows.values())
    for row in rows["model"]:
        for key in ("pearson_r", "spearman_r_interior", "pearson_r_interior", "dice_high_interior",
                    "defect_precision", "n_defects", "n_voxels_interior", "ceiling_r", "ceiling_psf_r"):
            assert key in row
        assert 0 < row["n_voxels_interior"] < row["n_voxels"]
        # the synthetic world records each patient's own PSF, which wins over the default
        assert row["spect_fwhm_mm"] == m.by_id()[row["patient_id"]].spect_fwhm_mm != 13.0
    # the same interior and defects for every set of a patient
    for name in ("density", "geometry", "truth_psf"):
        assert [r["n_voxels_interior"] for r in rows[name]] == [r["n_voxels_interior"] for r in rows["model"]]
        assert [r["n_defects"] for r in rows[name]] == [r["n_defects"] for r in rows["model"]]
    # the truth seen through the PSF is closer to the SPECT than the unblurred truth
    psf_rows = [r["spearman_r"] for r in rows["truth_psf"]]
    psf = np.mean(psf_rows)
    assert psf > np.mean([r["spearman_r"] for r in rows["truth"]])
    # what CT can know (the CT-visible oracle through the PSF) cannot beat the whole truth through it
    oracle = [r["spearman_r"] for r in rows["oracle_psf"]]
    assert np.mean(oracle) <= psf + 1e-6
    assert [r["ceiling_oracle_r"] for r in rows["model"]] == oracle
    # the report's noise-ceiling line and the table's truth row are one number
    assert [r["ceiling_r"] for r in rows["model"]] == [r["spearman_r"] for r in rows["truth"]]
    assert [r["ceiling_psf_r"] for r in rows["model"]] == psf_rows
    assert np.mean([r["spearman_r"] for r in rows["geometry"]]) > 0.2  # the lungs' outline alone correlates
    assert result["density_fit"] == "noncancer cohort" and result["spect_fwhm"]["default_mm"] == 13.0


def test_leave_one_out_when_no_fit_cohort(evaluated):
    m, pred_dir, fitted = evaluated
    loo = evaluate(m, pred_dir, cfg=CFG, cohort="cancer", progress=False, density_fit_cohort=None,
                   ceilings=False, density_baseline=False, keep_case=None)
    assert set(loo["rows"]) == {"model", "geometry"} and "leave-one-out" in loo["density_fit"]
    assert [r["patient_id"] for r in loo["rows"]["geometry"]] == [r["patient_id"] for r in loo["rows"]["model"]]


def test_report_headline_on_the_cohort(evaluated, tmp_path):
    _, _, result = evaluated
    files = write_report(result, tmp_path, bootstrap={"n_resamples": 500, "seed": 1})
    summary = json.loads(files["summary"].read_text())
    head = summary["headline"]
    assert head["reference"] == "geometry"
    margin = head["metrics"]["spearman_r"]["margin"]
    model = pd.read_csv(files["metrics"]).set_index("patient_id")
    geometry = pd.read_csv(files["geometry_metrics"]).set_index("patient_id").loc[model.index]
    assert margin["estimate"] == pytest.approx((model.spearman_r - geometry.spearman_r).mean(), abs=1e-12)
    assert margin["low"] <= margin["estimate"] <= margin["high"]
    assert summary["bootstrap"]["n_resamples"] == 500
    assert summary["ceiling"]["attainable"]["n"] == 6
    report = files["report"].read_text()
    assert "## Headline" in report and "## Perfusion defects" in report and "Attainable ceiling" in report
    assert (tmp_path / "figures" / "model_vs_geometry.png").exists()


def test_manifest_spect_fwhm_column(tiny_cohort, tmp_path):
    import csv
    import shutil

    from ctpm.errors import CtpmError
    from ctpm.evaluation.regions import patient_fwhm_mm

    rows = list(csv.DictReader(tiny_cohort.read_text().splitlines()))
    for d in tiny_cohort.parent.iterdir():
        if d.is_dir():
            shutil.copytree(d, tmp_path / d.name)

    def write(values):
        path = tmp_path / "manifest.csv"
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=[c for c in rows[0] if c != "spect_fwhm_mm"] + ["spect_fwhm_mm"])
            w.writeheader()
            for row, v in zip(rows, values):
                w.writerow({**row, "spect_fwhm_mm": v})
        return path

    m = load_manifest(write(["12.5"] + [""] * (len(rows) - 1)))
    assert m.patients[0].spect_fwhm_mm == 12.5 and m.patients[1].spect_fwhm_mm is None
    assert patient_fwhm_mm(m.patients[0]) == 12.5 and patient_fwhm_mm(m.patients[1], 14.0) == 14.0
    for bad in ("wide", "-3", "0", "nan"):
        with pytest.raises(CtpmError, match="spect_fwhm_mm"):
            load_manifest(write([bad] + [""] * (len(rows) - 1)))
