"""Tests of ctpm.evaluation.stats: every statistic against scipy computed here independently,
hand-checkable counts, and the small-n / missing-column behaviour (NaN or None with a note)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from ctpm.evaluation.stats import (
    LOBES,
    ROW_COLUMNS,
    aggregate_seeds,
    bootstrap_interval,
    cohort_summary,
    fisher_z_interval,
    format_p,
    includes_zero,
    institution_comparison,
    lobe_agreement,
    lobe_margins,
    mean_interval,
    mean_lobe_r,
    paired_comparison,
    pearson_r,
    rows_to_frame,
    tumour_size_association,
)

TOL = 1e-12  # p-values and statistics must be scipy's own


def cohort(n: int = 12, seed: int = 0, lobes: bool = True) -> pd.DataFrame:
    """n random patients, the first half at institution A, with tumour diameters and lobe means."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {"patient_id": f"p{i:02d}", "cohort": "cancer", "institution": "A" if i < n // 2 else "B",
               "tumor_diameter_mm": float(rng.uniform(5, 70)), "n_voxels": int(rng.integers(1000, 5000)),
               "spearman_r": float(rng.uniform(0.6, 0.95)), "dice_high": float(rng.uniform(0.6, 0.9)),
               "dice_low": float(rng.uniform(0.6, 0.9))}
        if lobes:
            for lobe in LOBES:
                spect = float(rng.uniform(0.2, 1.0))
                row[f"mean_spect_{lobe}"], row[f"mean_pred_{lobe}"] = spect, float(spect + rng.normal(0, 0.1))
        rows.append(row)
    return pd.DataFrame(rows)


# --- cohort_summary ----------------------------------------------------------------------------


def test_cohort_summary_matches_numpy_and_counts_strictly_above():
    df = pd.DataFrame({"patient_id": list("abcde"), "institution": ["A", "A", "B", "B", "B"],
                       "cohort": ["cancer"] * 5, "spearman_r": [0.8, 0.7, 0.9, 0.85, 0.6],
                       "dice_high": [0.65, 0.72, 0.81, 0.85, 0.70],  # 0.70 is not "> 0.7"
                       "dice_low": [0.75, 0.80, 0.81, 0.9, 0.71]})
    s = cohort_summary(df)
    assert s["n_patients"] == 5 and s["institutions"] == {"A": 2, "B": 3} and s["cohorts"] == {"cancer": 5}
    r = s["metrics"]["spearman_r"]
    values = df["spearman_r"].to_numpy()
    assert r["n"] == 5 and r["mean"] == pytest.approx(values.mean(), abs=TOL)
    assert r["sd"] == pytest.approx(values.std(ddof=1), abs=TOL)
    assert (r["min"], r["max"], r["median"]) == (0.6, 0.9, 0.8)
    high = s["metrics"]["dice_high"]["above"]
    assert high["0.7"] == {"count": 3, "fraction": 0.6} and high["0.8"] == {"count": 2, "fraction": 0.4}
    low = s["metrics"]["dice_low"]["above"]
    assert low["0.7"]["count"] == 5 and low["0.8"]["count"] == 2  # 0.80 is not "> 0.8"
    assert "ceiling_r" not in s["metrics"] and "above" not in r


def test_cohort_summary_ceiling_nan_and_one_patient():
    df = pd.DataFrame({"patient_id": ["a", "b", "c"], "spearman_r": [0.8, np.nan, 0.6],
                       "dice_high": [0.8] * 3, "dice_low": [0.8] * 3, "ceiling_r": [0.9, 0.95, 0.85]})
    s = cohort_summary(df)
    assert s["metrics"]["spearman_r"]["n"] == 2  # the NaN patient is left out, not propagated
    assert s["metrics"]["spearman_r"]["mean"] == pytest.approx(0.7)
    assert s["metrics"]["ceiling_r"]["mean"] == pytest.approx(0.9)
    one = cohort_summary(df.iloc[:1])
    assert math.isnan(one["metrics"]["spearman_r"]["sd"]) and "note" in one["metrics"]["spearman_r"]
    assert one["institutions"] == {}
    empty = cohort_summary(pd.DataFrame({"patient_id": ["a"]}))  # no metric column at all
    assert empty["metrics"]["dice_high"]["n"] == 0
    assert math.isnan(empty["metrics"]["dice_high"]["above"]["0.7"]["fraction"])


# --- lobe_agreement ----------------------------------------------------------------------------


def test_lobe_agreement_matches_scipy_and_skips_missing_lobes():
    df = cohort(10)
    df.loc[[2, 5], "mean_pred_RML"] = np.nan  # two patients without a right middle lobe
    agreement = lobe_agreement(df)
    for lobe in LOBES:
        pair = df[[f"mean_spect_{lobe}", f"mean_pred_{lobe}"]].dropna()
        x, y = pair.iloc[:, 0].to_numpy(), pair.iloc[:, 1].to_numpy()
        a = agreement[lobe]
        pearson, spearman = scipy.stats.pearsonr(x, y), scipy.stats.spearmanr(x, y)
        assert a["n"] == len(x) == (8 if lobe == "RML" else 10)
        assert a["pearson_r"] == pytest.approx(pearson.statistic, abs=TOL)
        assert a["pearson_p"] == pytest.approx(pearson.pvalue, abs=TOL)
        assert a["spearman_rho"] == pytest.approx(spearman.statistic, abs=TOL)
        assert a["spearman_p"] == pytest.approx(spearman.pvalue, abs=TOL)
        assert a["mean_difference"] == pytest.approx((y - x).mean(), abs=TOL)
    for lung in ("right", "left"):  # no per-lung columns in these rows
        assert agreement[lung]["n"] == 0 and math.isnan(agreement[lung]["pearson_r"])


def test_lobe_agreement_small_n_and_constant():
    two = lobe_agreement(cohort(2))
    assert two["LUL"]["n"] == 2 and math.isnan(two["LUL"]["pearson_p"]) and "at least 3" in two["LUL"]["note"]
    assert not math.isnan(two["LUL"]["mean_difference"])  # a difference needs no third patient
    df = cohort(5)
    df["mean_spect_LLL"] = 0.5
    constant = lobe_agreement(df)["LLL"]
    assert math.isnan(constant["pearson_r"]) and "constant" in constant["note"]


# --- institution_comparison --------------------------------------------------------------------


def test_institution_comparison_matches_mannwhitneyu():
    df = cohort(11)  # A: 5, B: 6
    cmp = institution_comparison(df)
    assert cmp["institutions"] == ["A", "B"]
    a, b = df[df.institution == "A"], df[df.institution == "B"]
    for metric in ("spearman_r", "dice_high", "dice_low", "tumor_diameter_mm"):
        entry = cmp[metric] if metric == "tumor_diameter_mm" else cmp["metrics"][metric]
        test = scipy.stats.mannwhitneyu(a[metric], b[metric], alternative="two-sided")
        assert entry["u"] == pytest.approx(test.statistic, abs=TOL)
        assert entry["p"] == pytest.approx(test.pvalue, abs=TOL)
        assert entry["A"]["n"] == 5 and entry["B"]["n"] == 6
        assert entry["A"]["sd"] == pytest.approx(a[metric].std(ddof=1), abs=TOL)
        assert entry["relative_difference"] == pytest.approx(a[metric].mean() / b[metric].mean() - 1, abs=TOL)


def test_institution_comparison_degenerate_cases():
    df = cohort(6)
    one = institution_comparison(df.assign(institution="A"))
    assert one["institutions"] == ["A"] and math.isnan(one["metrics"]["spearman_r"]["p"]) and "two" in one["note"]
    lonely = institution_comparison(df.iloc[:4])  # A: 3 patients, B: 1
    assert math.isnan(lonely["metrics"]["dice_low"]["p"]) and "at least 2" in lonely["metrics"]["dice_low"]["note"]
    assert institution_comparison(df.assign(tumor_diameter_mm=np.nan))["tumor_diameter_mm"] is None
    assert institution_comparison(df.drop(columns="institution"))["metrics"] == {}


# --- paired_comparison -------------------------------------------------------------------------


def test_paired_comparison_joins_on_patient_and_matches_scipy():
    a = cohort(9, seed=1)
    b = a.copy()
    b["spearman_r"] = a["spearman_r"] - np.random.default_rng(2).uniform(-0.02, 0.1, len(a))
    b = b.iloc[::-1]  # another order, and a patient the model set lacks
    b = pd.concat([b, pd.DataFrame([{"patient_id": "extra", "spearman_r": 0.1}])])
    cmp = paired_comparison(a, b)
    joined = a[["patient_id", "spearman_r"]].merge(b[["patient_id", "spearman_r"]], on="patient_id")
    x, y = joined["spearman_r_x"].to_numpy(), joined["spearman_r_y"].to_numpy()
    assert cmp["n"] == 9
    assert cmp["mean_a"] == pytest.approx(x.mean(), abs=TOL) and cmp["mean_b"] == pytest.approx(y.mean(), abs=TOL)
    assert cmp["relative_change"] == pytest.approx((x.mean() - y.mean()) / y.mean(), abs=TOL)
    assert cmp["mean_difference"] == pytest.approx((x - y).mean(), abs=TOL)
    wilcoxon, ttest = scipy.stats.wilcoxon(x, y), scipy.stats.ttest_rel(x, y)
    assert cmp["wilcoxon_statistic"] == pytest.approx(wilcoxon.statistic, abs=TOL)
    assert cmp["wilcoxon_p"] == pytest.approx(wilcoxon.pvalue, abs=TOL)
    assert cmp["ttest_statistic"] == pytest.approx(ttest.statistic, abs=TOL)
    assert cmp["ttest_p"] == pytest.approx(ttest.pvalue, abs=TOL)


def test_paired_comparison_relative_change_as_in_the_paper():
    # the paper's 0.8142 after vs 0.7554 before is a 7.78% change
    a = pd.DataFrame({"patient_id": ["x", "y"], "spearman_r": [0.8142, 0.8142]})
    b = pd.DataFrame({"patient_id": ["x", "y"], "spearman_r": [0.7554, 0.7554]})
    assert round(100 * paired_comparison(a, b)["relative_change"], 2) == 7.78


def test_paired_comparison_small_n_and_missing_metric():
    a = pd.DataFrame({"patient_id": ["x", "y"], "dice_low": [0.8, 0.7]})
    b = pd.DataFrame({"patient_id": ["x", "z"], "dice_low": [0.6, 0.7]})
    one = paired_comparison(a, b, "dice_low")
    assert one["n"] == 1 and one["mean_difference"] == pytest.approx(0.2)
    assert math.isnan(one["wilcoxon_p"]) and math.isnan(one["ttest_p"]) and "at least 2" in one["note"]
    missing = paired_comparison(a, b, "spearman_r")
    assert missing["n"] == 0 and "missing" in missing["note"]
    same = paired_comparison(a, a, "dice_low")
    assert same["relative_change"] == 0 and "identical" in same["note"]
    with warnings.catch_warnings():  # scipy warns about the zero differences; stats.py silences it too
        warnings.simplefilter("ignore")
        expected = scipy.stats.wilcoxon([0.8, 0.7], [0.8, 0.7]).pvalue
    assert same["wilcoxon_p"] == pytest.approx(expected, abs=TOL)


# --- tumour_size_association -------------------------------------------------------------------


def test_tumour_size_association_matches_spearmanr():
    df = cohort(10, seed=3)
    df.loc[[0, 4], "tumor_diameter_mm"] = np.nan
    assoc = tumour_size_association(df)
    assert assoc["n"] == 8 and "note" not in assoc
    have = df.dropna(subset=["tumor_diameter_mm"])
    for metric in ("spearman_r", "dice_high", "dice_low"):
        test = scipy.stats.spearmanr(have["tumor_diameter_mm"], have[metric])
        assert assoc[metric]["n"] == 8
        assert assoc[metric]["rho"] == pytest.approx(test.statistic, abs=TOL)
        assert assoc[metric]["p"] == pytest.approx(test.pvalue, abs=TOL)


def test_tumour_size_association_needs_three_patients():
    df = cohort(6)
    df.loc[2:, "tumor_diameter_mm"] = np.nan
    assoc = tumour_size_association(df)
    assert assoc["n"] == 2 and assoc["spearman_r"] is None and "fewer than 3" in assoc["note"]
    assert tumour_size_association(df.drop(columns="tumor_diameter_mm"))["dice_low"] is None


# --- helpers -----------------------------------------------------------------------------------


def test_rows_to_frame_orders_columns_and_makes_diameter_numeric():
    rows = [{"prediction": "a.nii.gz", "zz_extra": 1, "spearman_r": 0.8, "patient_id": "a", "tumor_diameter_mm": None,
             "mean_spect_LUL": 0.5, "mean_pred_LUL": 0.4, "institution": "A"},
            {"patient_id": "b", "tumor_diameter_mm": 12.0, "spearman_r": 0.7}]
    df = rows_to_frame(rows)
    known = [c for c in ROW_COLUMNS if c in df.columns]
    assert list(df.columns) == known + ["zz_extra", "prediction"]
    assert known == ["patient_id", "institution", "tumor_diameter_mm", "spearman_r", "mean_pred_LUL", "mean_spect_LUL"]
    assert df["tumor_diameter_mm"].dtype == float and math.isnan(df["tumor_diameter_mm"][0])


def test_format_p():
    assert format_p(0.0047) == "0.0047" and format_p(0.0006) == "6.00e-04" and format_p(3.2e-9) == "3.20e-09"
    assert format_p(float("nan")) == "n/a" and format_p(None) == "n/a"


# --- intervals ---------------------------------------------------------------------------------


def test_pearson_r_matches_scipy_in_float64():
    rng = np.random.default_rng(4)
    x = rng.normal(size=5000).astype(np.float32)
    y = (0.3 * x + rng.normal(size=5000)).astype(np.float32)
    assert pearson_r(x, y) == pytest.approx(scipy.stats.pearsonr(x.astype(float), y.astype(float)).statistic, abs=1e-12)
    assert math.isnan(pearson_r([1.0], [2.0])) and math.isnan(pearson_r([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


@pytest.mark.parametrize("method", ["BCa", "percentile"])
def test_mean_interval_is_scipys_bootstrap(method):
    v = np.random.default_rng(5).normal(0.7, 0.1, 17)
    cfg = {"n_resamples": 2000, "seed": 3, "confidence": 0.9, "method": method}
    ci = mean_interval(np.append(v, np.nan), cfg)  # the NaN patient is left out
    ref = scipy.stats.bootstrap((v,), np.mean, n_resamples=2000, confidence_level=0.9, method=method,
                                random_state=np.random.default_rng(3)).confidence_interval
    assert ci["n"] == 17 and ci["estimate"] == pytest.approx(v.mean(), abs=TOL) and ci["method"] == method
    assert (ci["low"], ci["high"]) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert ci["low"] < v.mean() < ci["high"]


def test_paired_difference_interval_resamples_patients_together():
    rng = np.random.default_rng(6)
    b = rng.uniform(0.5, 0.8, 12)
    a = b + rng.normal(0.05, 0.02, 12)
    ci = bootstrap_interval([a, b], lambda x, y: np.mean(x - y, axis=-1), {"n_resamples": 3000, "seed": 1})
    ref = scipy.stats.bootstrap((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, n_resamples=3000,
                                random_state=np.random.default_rng(1)).confidence_interval
    assert (ci["low"], ci["high"]) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert includes_zero(ci) is False
    # the same through paired_comparison, on frames joined by patient
    da = pd.DataFrame({"patient_id": [f"p{i}" for i in range(12)], "spearman_r": a})
    db = pd.DataFrame({"patient_id": [f"p{i}" for i in range(12)][::-1], "spearman_r": b[::-1]})
    cmp = paired_comparison(da, db, bootstrap={"n_resamples": 3000, "seed": 1})
    assert (cmp["ci"]["low"], cmp["ci"]["high"]) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert cmp["ci"]["includes_zero"] is False
    # a difference of noise: its interval includes zero
    noise = paired_comparison(da, da.assign(spearman_r=a + rng.normal(0, 0.05, 12)))
    assert noise["ci"]["includes_zero"] is True


def test_interval_small_n_and_constant():
    two = mean_interval(np.array([0.5, 0.7]))
    assert two["n"] == 2 and math.isnan(two["low"]) and "at least 3" in two["note"]
    assert includes_zero(two) is None
    same = mean_interval(np.full(6, 0.8))
    assert same["low"] == pytest.approx(0.8) and same["high"] == pytest.approx(0.8)


def test_fisher_z_interval_by_hand_and_against_scipy():
    # r = 0.5, n = 19: z = atanh(0.5) = 0.549306, se = 1/4, 1.959964 * 0.25 = 0.489991
    low, high = fisher_z_interval(0.5, 19)
    assert low == pytest.approx(math.tanh(0.5493061443 - 0.4899909961), abs=1e-9)
    assert high == pytest.approx(math.tanh(0.5493061443 + 0.4899909961), abs=1e-9)
    assert (low, high) == pytest.approx((0.0592, 0.7776), abs=1e-4)  # (e^0.1186 - 1)/(e^0.1186 + 1), ...e^2.0786
    x = np.random.default_rng(7).normal(size=14)
    y = x + np.random.default_rng(8).normal(size=14)
    ref = scipy.stats.pearsonr(x, y).confidence_interval(0.95)
    assert fisher_z_interval(scipy.stats.pearsonr(x, y).statistic, 14) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert all(math.isnan(v) for v in fisher_z_interval(0.9, 3))
    a = lobe_agreement(cohort(14))["RUL"]
    assert (a["pearson_ci_low"], a["pearson_ci_high"]) == pytest.approx(fisher_z_interval(a["pearson_r"], 14), abs=1e-15)


def test_lobe_margins_difference_of_correlations():
    df = cohort(15, seed=9)
    worse = df.copy()
    rng = np.random.default_rng(10)
    for lobe in LOBES:
        worse[f"mean_pred_{lobe}"] = rng.uniform(0.2, 1.0, len(df))  # no relation to the SPECT
    margins = lobe_margins(df, worse, {"n_resamples": 1000})
    for lobe in LOBES:
        expected = (scipy.stats.pearsonr(df[f"mean_pred_{lobe}"], df[f"mean_spect_{lobe}"]).statistic
                    - scipy.stats.pearsonr(worse[f"mean_pred_{lobe}"], df[f"mean_spect_{lobe}"]).statistic)
        assert margins[lobe]["estimate"] == pytest.approx(expected, abs=1e-12)
    mean = margins["mean_lobe_r"]
    assert mean["estimate"] == pytest.approx(np.mean([margins[lobe]["estimate"] for lobe in LOBES]), abs=1e-12)
    assert mean["includes_zero"] is False and mean["low"] > 0
    assert "right" not in margins  # no per-lung columns in these rows
    assert mean_lobe_r(df)["estimate"] == pytest.approx(
        np.mean([lobe_agreement(df)[lobe]["pearson_r"] for lobe in LOBES]), abs=1e-12)


def test_aggregate_seeds_mean_and_sd(tmp_path):
    docs = [{"headline": {"metrics": {"spearman_r": {"margin": {"estimate": v, "low": None}}}}, "n_patients": 18,
             "title": "seed", "flag": True} for v in (0.10, 0.14, 0.06)]
    docs[2]["only_here"] = 1.5
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps(doc))
    agg = aggregate_seeds(paths)
    assert agg["n_seeds"] == 3 and agg["sources"] == [str(p) for p in paths]
    m = agg["values"]["headline.metrics.spearman_r.margin.estimate"]
    assert m["n"] == 3 and m["mean"] == pytest.approx(0.10) and m["sd"] == pytest.approx(0.04)
    assert agg["values"]["n_patients"]["sd"] == 0 and agg["values"]["only_here"]["n"] == 1
    assert "title" not in agg["values"] and "flag" not in agg["values"]  # strings and booleans are not numbers
    assert "headline.metrics.spearman_r.margin.low" not in agg["values"]  # null in every file
    with pytest.raises(ValueError):
        aggregate_seeds([])
