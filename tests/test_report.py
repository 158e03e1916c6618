"""Tests of ctpm.evaluation.report (and the figures it draws) on a synthetic result of
``evaluate``: 9 patients at two institutions with lobes, a baseline, a geometry prior, a density
set and the two ceilings, and a small representative case."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ctpm.evaluation.report import json_safe, write_report
from ctpm.evaluation.stats import (
    LOBES,
    cohort_summary,
    format_p,
    institution_comparison,
    lobe_agreement,
    paired_comparison,
    rows_to_frame,
    tumour_size_association,
)

FIGURES = {"r_before_after", "r_vs_density", "model_vs_geometry", "dice_histograms", "lobe_scatter", "lobe_histogram",
           "lobe_intervals", "representative_case"}
SETS = ("model", "baseline", "geometry", "density", "truth_psf", "truth")


def fake_rows(n: int, rng: np.random.Generator, shift: float = 0.0, lobes: bool = True, ceiling: bool = False):
    rows = []
    for i in range(n):
        row = {"patient_id": f"P{i:03d}", "cohort": "cancer", "institution": "A" if i < 4 else "B",
               "tumor_diameter_mm": None if i == 8 else float(10 + 5 * i), "n_voxels": 1000 + i,
               "spearman_r": float(np.clip(rng.normal(0.8 - shift, 0.05), 0, 1)),
               "dice_high": float(rng.uniform(0.65, 0.9)), "dice_low": float(rng.uniform(0.65, 0.9)),
               "spearman_r_right": float(rng.uniform(0.6, 0.9)), "spearman_r_left": float(rng.uniform(0.6, 0.9)),
               "pearson_r": float(np.clip(rng.normal(0.8 - shift, 0.05), 0, 1)),
               "spearman_r_interior": float(np.clip(rng.normal(0.5 - shift, 0.1), -1, 1)),
               "pearson_r_interior": float(np.clip(rng.normal(0.5 - shift, 0.1), -1, 1)),
               "dice_high_interior": float(rng.uniform(0.6, 0.9)), "dice_low_interior": float(rng.uniform(0.5, 0.9)),
               "n_defects": int(i % 3), "defects_found": int(i % 3 > 1), "defect_ml": float(12.0 * (i % 3)),
               "low_call_ml": float(rng.uniform(5, 30)),
               "defect_sensitivity": float(rng.uniform(0.2, 1.0)) if i % 3 else float("nan"),
               "defect_precision": float(rng.uniform(0.3, 1.0)),
               "defect_sensitivity_interior": float(rng.uniform(0.2, 1.0)) if i % 3 else float("nan"),
               "defect_precision_interior": float(rng.uniform(0.3, 1.0))}
        for side in ("right", "left"):
            row[f"mean_pred_{side}"], row[f"mean_spect_{side}"] = rng.uniform(0.4, 0.9, 2).tolist()
        if lobes:
            for k, lobe in enumerate(LOBES):
                if lobe == "RML" and i == 3:
                    continue  # a patient without a middle lobe
                spect = float(np.random.default_rng(100 * i + k).uniform(0.1, 1.0))  # one SPECT for every set
                row[f"mean_spect_{lobe}"] = spect
                row[f"mean_pred_{lobe}"] = float(np.clip(spect + rng.normal(0, 0.1), 0, 1))
        if ceiling:
            row["ceiling_r"] = float(rng.uniform(0.85, 0.95))
            row["ceiling_psf_r"] = float(rng.uniform(0.95, 0.99))
            row["prediction"] = f"preds/P{i:03d}.nii.gz"
        rows.append(row)
    return rows


def fake_case(rng: np.random.Generator) -> dict:
    """Central slices of a 40 x 30 x 30 RAS volume (axial and coronal 40 x 30): an ellipsoidal
    'lung' of air-like HU, perfusion rising towards the right, posterior and inferior side."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 30, 30)), indexing="ij")
    mask = ((x / 0.9) ** 2 + (y / 0.8) ** 2 + (z / 0.9) ** 2 < 1).astype(np.uint8)
    ct = np.where(mask, -850.0, 40.0) + rng.normal(0, 20, mask.shape)
    spect = np.clip(0.6 + 0.2 * x - 0.2 * y - 0.2 * z, 0, 1) * mask
    pred = np.clip(spect + rng.normal(0, 0.1, mask.shape), 0, 1) * mask

    def slices(volume):
        return {"axial": volume[:, :, 15], "coronal": volume[:, 15, :], "sagittal": volume[20, :, :]}

    return {"patient_id": "P004", "spacing": [1.0, 1.0, 1.5], "ct": slices(ct), "spect": slices(spect),
            "pred": slices(pred), "mask": slices(mask)}


def fake_result(seed: int = 0, **overrides) -> dict:
    rng = np.random.default_rng(seed)
    result = {"rows": {"model": fake_rows(9, rng, ceiling=True), "baseline": fake_rows(9, rng, shift=0.06),
                       "geometry": fake_rows(9, rng, shift=0.1), "density": fake_rows(9, rng, shift=0.3),
                       "truth_psf": fake_rows(9, rng, shift=-0.15), "truth": fake_rows(9, rng, shift=-0.1)},
              "missing": [], "missing_folds": [], "density_fit": "noncancer cohort", "case": fake_case(rng),
              "min_defect_ml": 5.0, "smooth_density": True}
    result.update(overrides)
    return result


def no_nan(constant):
    raise AssertionError(f"summary.json holds {constant}")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    result = fake_result()
    out = tmp_path_factory.mktemp("report")
    return result, out, write_report(result, out)


def test_writes_every_file(written):
    result, out, files = written
    assert set(files) == {"metrics", "baseline_metrics", "geometry_metrics", "density_metrics", "ceiling_psf_metrics",
                          "ceiling_truth_metrics", "summary", "report"} | FIGURES
    for name in FIGURES:
        assert files[name] == out / "figures" / f"{name}.png"
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp"))  # no temporary file left behind
    metrics = pd.read_csv(files["metrics"])
    assert list(metrics["patient_id"]) == [r["patient_id"] for r in result["rows"]["model"]]
    assert list(metrics.columns[:8]) == ["patient_id", "cohort", "institution", "tumor_diameter_mm", "n_voxels",
                                         "spearman_r", "dice_high", "dice_low"]
    assert metrics.columns[-1] == "prediction"
    assert metrics["spearman_r"].to_numpy() == pytest.approx([r["spearman_r"] for r in result["rows"]["model"]],
                                                             abs=1e-15)
    assert len(pd.read_csv(files["density_metrics"])) == 9


def test_summary_equals_stats(written):
    result, out, files = written
    summary = json.loads(files["summary"].read_text(), parse_constant=no_nan)
    frames = {name: rows_to_frame(rows) for name, rows in result["rows"].items()}
    for name, df in frames.items():
        s = summary["sets"][name]
        assert s["summary"] == json_safe(cohort_summary(df))
        assert s["lobes"] == json_safe(lobe_agreement(df))
        assert s["institutions"] == json_safe(institution_comparison(df))
        assert s["tumour_size"] == json_safe(tumour_size_association(df))
    for name in ("baseline", "geometry", "density"):
        for metric in ("spearman_r", "dice_high", "dice_low", "pearson_r", "spearman_r_interior", "defect_sensitivity"):
            expected = json_safe(paired_comparison(frames["model"], frames[name], metric))
            assert summary["paired"][f"model_vs_{name}"][metric] == expected
    assert summary["labels"] == {"model": "fine-tuned", "baseline": "pretrained only", "geometry": "geometry prior",
                                 "density": "density baseline", "truth_psf": "ceiling: truth through the SPECT PSF",
                                 "truth": "truth (unblurred)"}
    assert summary["n_patients"] == 9 and summary["missing"] == [] and summary["density_fit"] == "noncancer cohort"
    assert summary["representative_case"] == "P004"
    ceiling = [r["ceiling_r"] for r in result["rows"]["model"]]
    assert summary["ceiling"]["mean"] == pytest.approx(np.mean(ceiling), abs=1e-15)
    model_r = np.mean([r["spearman_r"] for r in result["rows"]["model"]])
    assert summary["ceiling"]["fraction_of_ceiling"] == pytest.approx(model_r / np.mean(ceiling), abs=1e-15)
    # one patient lacks a diameter; a lobe with 8 patients is still reported
    assert summary["sets"]["model"]["tumour_size"]["n"] == 8
    assert summary["sets"]["model"]["lobes"]["RML"]["n"] == 8


def test_report_states_the_numbers(written):
    result, out, files = written
    report = files["report"].read_text()
    summary = json.loads(files["summary"].read_text())
    paired = summary["paired"]["model_vs_baseline"]["spearman_r"]
    assert f"Wilcoxon signed-rank p = {format_p(paired['wilcoxon_p'])}" in report
    assert f"paired t-test p = {format_p(paired['ttest_p'])}" in report
    assert f"{100 * paired['relative_change']:+.2f}%" in report
    r = summary["sets"]["model"]["summary"]["metrics"]["spearman_r"]
    assert f"{r['mean']:.4f} ± {r['sd']:.4f}" in report
    lul = summary["sets"]["model"]["lobes"]["LUL"]
    assert f"{lul['pearson_r']:.3f} [{lul['pearson_ci_low']:.3f}, {lul['pearson_ci_high']:.3f}]" in report
    assert "WARNING" not in report
    order = [report.index(h) for h in ("## Cohort", "## Voxel-wise correlation", "## Function-wise similarity",
                                        "## Lobe-wise agreement", "## Institutions", "## Tumour size")]
    assert order == sorted(order)
    for name in FIGURES:  # every figure linked, relatively
        assert f"(figures/{name}.png)" in report


def test_missing_patients_are_stated_at_the_top(tmp_path):
    result = fake_result(missing=["P101", "P102"], missing_folds=[2])
    files = write_report(result, tmp_path, labels={"model": "after"}, title="cancer cohort")
    report = files["report"].read_text()
    head = report.split("## Cohort")[0]
    assert head.startswith("# cancer cohort")
    assert "WARNING: 2 patient(s)" in head and "P101, P102" in head and "Folds without predictions: 2" in head
    summary = json.loads(files["summary"].read_text())
    assert summary["missing"] == ["P101", "P102"] and summary["missing_folds"] == [2]
    assert summary["labels"]["model"] == "after" and summary["labels"]["baseline"] == "pretrained only"


def test_only_what_the_data_allow_and_no_stale_files(tmp_path):
    write_report(fake_result(), tmp_path)  # an earlier, fuller evaluation in the same folder
    rng = np.random.default_rng(1)
    rows = fake_rows(2, rng, lobes=False)  # two patients, no lobes, one institution
    files = write_report({"rows": {"model": rows}, "missing": [], "missing_folds": [], "case": None,
                          "density_fit": None}, tmp_path)
    assert set(files) == {"metrics", "summary", "report", "dice_histograms"}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["dice_histograms.png"]
    assert not (tmp_path / "baseline_metrics.csv").exists() and not (tmp_path / "density_metrics.csv").exists()
    text = files["summary"].read_text()
    summary = json.loads(text, parse_constant=no_nan)
    assert summary["paired"] == {} and summary["ceiling"] is None
    assert summary["sets"]["model"]["lobes"]["LUL"]["pearson_r"] is None  # NaN became null
    assert summary["sets"]["model"]["tumour_size"]["spearman_r"] is None
    report = files["report"].read_text()
    assert "No lobe labels" in report and "Not compared" in report
    assert "lobe_scatter" not in report and "Representative case" not in report


def test_json_safe():
    assert json_safe({"a": np.float32(0.5), "b": (np.int64(2), float("nan")), 3: np.bool_(True)}) == \
        {"a": 0.5, "b": [2, None], "3": True}


def test_headline_margin_over_the_geometry_prior_and_marks(tmp_path):
    """The headline gives the model's paired margin over the geometry prior with its interval; a
    margin whose interval includes zero is marked †, a clear one is not."""
    rng = np.random.default_rng(3)
    model = fake_rows(12, rng)
    geometry = []
    for row in model:
        g = dict(row)
        g["spearman_r"] = row["spearman_r"] - 0.1 - rng.uniform(0, 0.02)  # clearly worse
        g["dice_low"] = row["dice_low"] + rng.normal(0, 0.05)  # no difference
        geometry.append(g)
    result = {"rows": {"model": model, "geometry": geometry}, "missing": [], "missing_folds": [], "case": None,
              "density_fit": "noncancer cohort"}
    files = write_report(result, tmp_path, bootstrap={"n_resamples": 999, "seed": 2})
    summary = json.loads(files["summary"].read_text(), parse_constant=no_nan)
    head = summary["headline"]["metrics"]
    r = head["spearman_r"]
    diff = np.array([m["spearman_r"] - g["spearman_r"] for m, g in zip(model, geometry)])
    assert r["margin"]["estimate"] == pytest.approx(diff.mean(), abs=1e-12)
    assert r["margin"]["low"] > 0.09 and r["includes_zero"] is False
    assert head["dice_low"]["includes_zero"] is True
    assert r["model"]["estimate"] == pytest.approx(np.mean([m["spearman_r"] for m in model]), abs=1e-12)
    assert summary["bootstrap"] == {"n_resamples": 999, "seed": 2, "confidence": 0.95, "method": "BCa",
                                    "resampled": "patients"}
    report = files["report"].read_text()
    margin_line = next(ln for ln in report.splitlines() if ln.startswith("- **Margin (the headline)"))
    m = r["margin"]
    assert f"Spearman R {m['estimate']:+.3f} [{m['low']:.3f}, {m['high']:.3f}];" in margin_line
    d = head["dice_low"]["margin"]
    assert f"DSC low-functional {d['estimate']:+.3f} [{d['low']:.3f}, {d['high']:.3f}] †" in margin_line
    assert report.index("## Headline") < report.index("## Cohort")
    assert "model_vs_geometry.png" in report


def test_no_geometry_prior_no_headline(tmp_path):
    rows = fake_rows(5, np.random.default_rng(4))
    files = write_report({"rows": {"model": rows}, "missing": [], "missing_folds": [], "case": None,
                          "density_fit": None}, tmp_path, bootstrap={"n_resamples": 200})
    assert json.loads(files["summary"].read_text())["headline"] is None
    assert "headline margin is not available" in files["report"].read_text()
