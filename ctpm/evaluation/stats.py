"""Cohort statistics of the multi-level evaluation (Ren et al. 2022, "Results" and "Discussion").

Every function takes a pandas DataFrame of the per-patient rows of
:func:`ctpm.evaluation.evaluate.evaluate` (one row a patient) and returns a plain dict:

- :func:`cohort_summary`: mean ± SD, range and median of the voxel-wise Spearman R and of the Dice
  of the high / low functional volumes, and how many patients exceed DSC 0.7 and 0.8 (Fig. 2);
- :func:`lobe_agreement`: Pearson / Spearman correlation of the mean perfusion of each lobe and lung,
  CT-based against SPECT, across patients (Fig. 4A, B);
- :func:`institution_comparison`: Mann-Whitney U between the two institutions, tumour diameter
  included ("Discussion": 10% higher R at institution A, p = 0.0016);
- :func:`paired_comparison`: one prediction set against another on the same patients, Wilcoxon
  signed-rank and paired t-test (Fig. 2A: +7.78%, p = 0.0047);
- :func:`tumour_size_association`: Spearman correlation of each metric with the tumour diameter.

Every p-value is scipy's own (two-sided). A statistic that the data cannot support (too few
patients, a missing column, a constant input) is NaN, or the entry None, with a ``note`` saying
why: a cohort of three patients must still give a report, not a traceback.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
from scipy import stats as sps

#: The per-patient metrics of the paper, in the order the report gives them.
METRICS = ("spearman_r", "dice_high", "dice_low")
#: Further per-patient metrics summarised when the rows have them: per-lung R, the noise ceiling.
OPTIONAL_METRICS = ("spearman_r_right", "spearman_r_left", "ceiling_r")
#: The DSC levels the paper counts patients above ("32 of 33 > 0.7", "67% > 0.8").
DICE_LEVELS = (0.7, 0.8)
#: Lobes in the paper's order (labels 1..5), then the two lungs.
LOBES = ("LUL", "LLL", "RUL", "RML", "RLL")
LUNGS = ("right", "left")
DIAMETER = "tumor_diameter_mm"

#: Columns of a row of ``evaluate``, in the order metrics.csv keeps them (those present are written).
ROW_COLUMNS = (
    ("patient_id", "cohort", "institution", DIAMETER, "n_voxels")
    + METRICS
    + ("ceiling_r", "spearman_r_right", "spearman_r_left")
    + tuple(f"mean_{kind}_{side}" for side in LUNGS for kind in ("pred", "spect"))
    + tuple(f"mean_{kind}_{lobe}" for lobe in LOBES for kind in ("pred", "spect"))
)

# Fewest values for which a statistic is more than a formality: two points always correlate
# perfectly, and one pair has no spread to test against.
MIN_CORRELATION = 3
MIN_GROUP = 2


def rows_to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The rows of one prediction set as a DataFrame: known columns first in :data:`ROW_COLUMNS`
    order, any others after them (sorted, the prediction path last); the tumour diameter numeric
    (None -> NaN)."""
    df = pd.DataFrame(list(rows))
    known = [c for c in ROW_COLUMNS if c in df.columns]
    extra = sorted(c for c in df.columns if c not in ROW_COLUMNS and c != "prediction")
    df = df[known + extra + (["prediction"] if "prediction" in df.columns else [])]
    if DIAMETER in df.columns:
        df[DIAMETER] = pd.to_numeric(df[DIAMETER], errors="coerce")
    return df


def format_p(p: float | None) -> str:
    """A p-value as the report and figures write it: 4 decimals, scientific below 0.001."""
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def _values(df: pd.DataFrame, column: str) -> np.ndarray:
    """The finite values of a column (an absent column has none)."""
    if column not in df.columns:
        return np.array([], dtype=float)
    v = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
    return v[np.isfinite(v)]


def _scipy(test, *args, **kwargs) -> tuple[float, float]:
    """(statistic, p) of a scipy test, with its warnings about degenerate input silenced: the
    caller sees NaN and writes a note instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = test(*args, **kwargs)
    return float(res[0]), float(res[1])


def describe(values: np.ndarray) -> dict[str, Any]:
    """n, mean, SD (ddof = 1), min, max and median of finite values (NaN where undefined)."""
    v = np.asarray(values, dtype=float)
    n = int(v.size)
    out: dict[str, Any] = {
        "n": n,
        "mean": float(v.mean()) if n else math.nan,
        "sd": float(v.std(ddof=1)) if n > 1 else math.nan,
        "min": float(v.min()) if n else math.nan,
        "max": float(v.max()) if n else math.nan,
        "median": float(np.median(v)) if n else math.nan,
    }
    if n < 2:
        out["note"] = "no patient" if n == 0 else "one patient: no SD"
    return out


def cohort_summary(df: pd.DataFrame) -> dict[str, Any]:
    """The cohort and the per-patient metrics of one prediction set.

    Returns ``{"n_patients", "institutions": {name: n}, "cohorts": {name: n}, "metrics": {metric:
    describe(...)}}``; the two Dice entries also hold ``"above": {"0.7": {"count", "fraction"},
    "0.8": {...}}`` (strictly greater, as the paper counts). Metrics absent from the rows are absent
    here, except the paper's three, which are always present (n = 0 when missing).
    """
    out: dict[str, Any] = {"n_patients": int(len(df))}
    for key in ("institution", "cohort"):
        counts = df[key].value_counts(dropna=False).sort_index() if key in df.columns else pd.Series(dtype=int)
        out[f"{key}s"] = {str(k): int(n) for k, n in counts.items()}
    metrics: dict[str, Any] = {}
    for metric in METRICS + OPTIONAL_METRICS:
        if metric not in METRICS and metric not in df.columns:
            continue
        v = _values(df, metric)
        entry = describe(v)
        if metric.startswith("dice_"):
            entry["above"] = {
                str(level): {"count": int((v > level).sum()),
                             "fraction": float((v > level).mean()) if v.size else math.nan}
                for level in DICE_LEVELS
            }
        metrics[metric] = entry
    out["metrics"] = metrics
    return out


def _correlations(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Pearson and Spearman correlation of paired values (NaN with a note when undefined)."""
    out: dict[str, Any] = {"n": int(x.size)}
    if x.size < MIN_CORRELATION:
        out.update(pearson_r=math.nan, pearson_p=math.nan, spearman_rho=math.nan, spearman_p=math.nan,
                   note=f"{x.size} patient(s): a correlation needs at least {MIN_CORRELATION}")
        return out
    out["pearson_r"], out["pearson_p"] = _scipy(sps.pearsonr, x, y)
    out["spearman_rho"], out["spearman_p"] = _scipy(sps.spearmanr, x, y)
    if not math.isfinite(out["pearson_r"]):
        out["note"] = "constant values: correlation undefined"
    return out


def _pairs(df: pd.DataFrame, x_col: str, y_col: str) -> tuple[np.ndarray, np.ndarray]:
    """The patients with finite values in both columns."""
    if x_col not in df.columns or y_col not in df.columns:
        return np.array([], dtype=float), np.array([], dtype=float)
    x = pd.to_numeric(df[x_col], errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(df[y_col], errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def lobe_agreement(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Lobe-wise agreement: for each lobe (LUL..RLL) and lung (right, left), the correlation across
    patients of the CT-based mean perfusion (``mean_pred_X``) with the SPECT one (``mean_spect_X``).

    Each entry: n, pearson_r, pearson_p, spearman_rho, spearman_p, mean_pred, mean_spect and
    mean_difference (CT-based - SPECT; the paper's Fig. 5 quantity), over the patients having it.
    """
    out: dict[str, dict[str, Any]] = {}
    for region in LOBES + LUNGS:
        pred, spect = _pairs(df, f"mean_pred_{region}", f"mean_spect_{region}")
        entry = _correlations(spect, pred)
        entry["mean_pred"] = float(pred.mean()) if pred.size else math.nan
        entry["mean_spect"] = float(spect.mean()) if spect.size else math.nan
        entry["mean_difference"] = float((pred - spect).mean()) if pred.size else math.nan
        out[region] = entry
    return out


def _group_test(groups: list[str], values: list[np.ndarray]) -> dict[str, Any]:
    """Descriptive statistics per group and, for two groups, the Mann-Whitney U test."""
    out: dict[str, Any] = {g: {k: v for k, v in describe(x).items() if k in ("n", "mean", "sd")}
                           for g, x in zip(groups, values)}
    out.update(u=math.nan, p=math.nan, relative_difference=math.nan)
    if len(groups) != 2:
        out["note"] = f"{len(groups)} institution(s): the comparison needs exactly two"
        return out
    a, b = values
    if min(a.size, b.size) < MIN_GROUP:
        out["note"] = f"a test needs at least {MIN_GROUP} patients per institution"
    else:
        out["u"], out["p"] = _scipy(sps.mannwhitneyu, a, b, alternative="two-sided")
    if a.size and b.size and b.mean() != 0:
        out["relative_difference"] = float((a.mean() - b.mean()) / b.mean())
    return out


def institution_comparison(df: pd.DataFrame) -> dict[str, Any]:
    """The metrics of the patients of one institution against those of the other.

    Returns ``{"institutions": [first, second], "metrics": {metric: {first: {n, mean, sd}, second:
    {...}, "u", "p", "relative_difference"}}, "tumor_diameter_mm": same or None}``. The institutions
    are taken in sorted order ("A" before "B"); ``relative_difference`` is (mean of the first -
    mean of the second) / mean of the second, the paper's "10% higher"; ``u`` is the Mann-Whitney
    U of the first group and ``p`` scipy's two-sided p-value.
    """
    if "institution" not in df.columns:
        return {"institutions": [], "metrics": {}, DIAMETER: None, "note": "no institution column"}
    groups = sorted(str(g) for g in df["institution"].dropna().unique())
    by_group = {g: df[df["institution"].astype(str) == g] for g in groups}
    out: dict[str, Any] = {"institutions": groups, "metrics": {}}
    for metric in METRICS:
        out["metrics"][metric] = _group_test(groups, [_values(by_group[g], metric) for g in groups])
    diameters = [_values(by_group[g], DIAMETER) for g in groups]
    out[DIAMETER] = _group_test(groups, diameters) if sum(d.size for d in diameters) else None
    if len(groups) != 2:
        out["note"] = f"{len(groups)} institution(s): the comparison needs exactly two"
    return out


def paired_comparison(df_a: pd.DataFrame, df_b: pd.DataFrame, metric: str = "spearman_r") -> dict[str, Any]:
    """Set a against set b on the patients both have (joined on patient_id).

    Returns n, mean_a, mean_b, relative_change = (mean_a - mean_b) / mean_b (the paper's
    "7.78%"), mean_difference and sd_difference of the per-patient a - b, the Wilcoxon
    signed-rank test and the paired t-test (statistic and two-sided p, scipy's defaults).
    """
    out: dict[str, Any] = {"metric": metric, "n": 0, "mean_a": math.nan, "mean_b": math.nan,
                           "relative_change": math.nan, "mean_difference": math.nan,
                           "sd_difference": math.nan, "wilcoxon_statistic": math.nan, "wilcoxon_p": math.nan,
                           "ttest_statistic": math.nan, "ttest_p": math.nan}
    if any(metric not in d.columns or "patient_id" not in d.columns for d in (df_a, df_b)):
        out["note"] = f"{metric} or patient_id missing from a set"
        return out
    joined = pd.merge(df_a[["patient_id", metric]], df_b[["patient_id", metric]], on="patient_id",
                      suffixes=("_a", "_b"))
    a, b = _pairs(joined, f"{metric}_a", f"{metric}_b")
    out["n"] = int(a.size)
    if not a.size:
        out["note"] = "no patient in both sets"
        return out
    diff = a - b
    out.update(mean_a=float(a.mean()), mean_b=float(b.mean()), mean_difference=float(diff.mean()))
    if b.mean() != 0:
        out["relative_change"] = float((a.mean() - b.mean()) / b.mean())
    if a.size < MIN_GROUP:
        out["note"] = f"{a.size} patient(s) in both sets: a paired test needs at least {MIN_GROUP}"
        return out
    out["sd_difference"] = float(diff.std(ddof=1))
    out["wilcoxon_statistic"], out["wilcoxon_p"] = _scipy(sps.wilcoxon, a, b)
    out["ttest_statistic"], out["ttest_p"] = _scipy(sps.ttest_rel, a, b)
    if not np.any(diff):
        out["note"] = "the two sets are identical on every patient"
    return out


def tumour_size_association(df: pd.DataFrame) -> dict[str, Any]:
    """Spearman correlation of each metric with the tumour diameter (mm), over the patients that
    have both. Returns ``{"n": patients with a diameter, metric: {"n", "rho", "p"} or None}``;
    an entry is None (with a ``note``) when fewer than three patients have both values."""
    out: dict[str, Any] = {"n": int(_values(df, DIAMETER).size)}
    short = []
    for metric in METRICS:
        diameter, value = _pairs(df, DIAMETER, metric)
        if diameter.size < MIN_CORRELATION:
            out[metric] = None
            short.append(metric)
            continue
        rho, p = _scipy(sps.spearmanr, diameter, value)
        out[metric] = {"n": int(diameter.size), "rho": rho, "p": p}
    if short:
        out["note"] = (f"fewer than {MIN_CORRELATION} patients with a tumour diameter and "
                       f"{', '.join(short)}")
    return out
