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
- :func:`tumour_size_association`: Spearman correlation of each metric with the tumour diameter;
- intervals: :func:`bootstrap_interval` (``scipy.stats.bootstrap``, patients resampled, seeded;
  BCa unless configured otherwise) on every cohort mean and every paired difference,
  :func:`fisher_z_interval` on the lobe correlations, :func:`lobe_margins` (bootstrap of the
  difference of two sets' lobe correlations with the SPECT);
- :func:`aggregate_seeds`: mean and SD across the summary.json files of several cohorts (seeds).

Every p-value is scipy's own (two-sided). A statistic that the data cannot support (too few
patients, a missing column, a constant input) is NaN, or the entry None, with a ``note`` saying
why: a cohort of three patients must still give a report, not a traceback.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from ctpm.errors import CtpmError

#: The per-patient metrics of the paper, in the order the report gives them.
METRICS = ("spearman_r", "dice_high", "dice_low")
#: The same over the lung interior (farther than one SPECT FWHM from the lungs' border).
INTERIOR_METRICS = ("spearman_r_interior", "pearson_r_interior", "dice_high_interior", "dice_low_interior")
#: Defect detection (:mod:`ctpm.evaluation.defects`).
DEFECT_METRICS = ("defect_sensitivity", "defect_precision", "defect_sensitivity_interior", "defect_precision_interior")
#: Further per-patient metrics summarised when the rows have them: Pearson, the interior, the
#: defects, per-lung R, the noise ceiling and the attainable ceiling (truth blurred by the PSF).
OPTIONAL_METRICS = (("pearson_r",) + INTERIOR_METRICS + DEFECT_METRICS
                    + ("spearman_r_right", "spearman_r_left", "ceiling_r", "ceiling_psf_r"))
#: Metrics compared between two sets of the same patients (paired differences with intervals).
PAIRED_METRICS = METRICS + ("pearson_r",) + INTERIOR_METRICS + ("defect_sensitivity", "defect_precision")
#: The DSC levels the paper counts patients above ("32 of 33 > 0.7", "67% > 0.8").
DICE_LEVELS = (0.7, 0.8)
#: Lobes in the paper's order (labels 1..5), then the two lungs.
LOBES = ("LUL", "LLL", "RUL", "RML", "RLL")
LUNGS = ("right", "left")
DIAMETER = "tumor_diameter_mm"

#: Columns of a row of ``evaluate``, in the order metrics.csv keeps them (those present are written).
ROW_COLUMNS = (
    ("patient_id", "cohort", "institution", DIAMETER, "n_voxels", "spect_fwhm_mm")
    + METRICS
    + ("pearson_r",) + INTERIOR_METRICS + ("n_voxels_interior",) + DEFECT_METRICS
    + ("n_defects", "defects_found", "defect_ml", "low_call_ml")
    + ("ceiling_r", "ceiling_psf_r", "spearman_r_right", "spearman_r_left")
    + tuple(f"mean_{kind}_{side}" for side in LUNGS for kind in ("pred", "spect"))
    + tuple(f"mean_{kind}_{lobe}" for lobe in LOBES for kind in ("pred", "spect"))
)

# Fewest values for which a statistic is more than a formality: two points always correlate
# perfectly, and one pair has no spread to test against.
MIN_CORRELATION = 3
MIN_GROUP = 2


# --------------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapConfig:
    """How every bootstrap interval of the report is drawn: patients resampled with replacement
    ``n_resamples`` times from a seeded generator, the ``confidence`` interval by ``method``
    ("BCa", bias-corrected and accelerated, or "percentile"; scipy's names)."""

    n_resamples: int = 9999
    seed: int = 0
    confidence: float = 0.95
    method: str = "BCa"

    @classmethod
    def from_any(cls, cfg: BootstrapConfig | Mapping[str, Any] | None) -> BootstrapConfig:
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        unknown = sorted(set(dict(cfg)) - {"n_resamples", "seed", "confidence", "method"})
        if unknown:
            raise CtpmError(f"bootstrap has no setting {', '.join(unknown)} (n_resamples, seed, confidence, method)")
        d = dict(cfg)
        out = cls(n_resamples=int(d.get("n_resamples", cls.n_resamples)), seed=int(d.get("seed", cls.seed)),
                  confidence=float(d.get("confidence", cls.confidence)), method=str(d.get("method", cls.method)))
        if out.method not in ("BCa", "percentile", "basic"):
            raise CtpmError(f"bootstrap.method must be BCa, percentile or basic, not {out.method!r}")
        if not 0 < out.confidence < 1 or out.n_resamples < 1:
            raise CtpmError("bootstrap.confidence must lie in (0, 1) and bootstrap.n_resamples be positive")
        return out


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r of two equally long arrays in float64 (the paper's Eq. 1 as written); NaN
    for fewer than two values or a constant array."""
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.size < 2:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else math.nan


def bootstrap_interval(data: Sequence[np.ndarray], statistic: Callable[..., Any],
                       cfg: BootstrapConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A bootstrap confidence interval of ``statistic(*data)`` with the patients (the last axis
    of every array, paired across arrays) resampled: ``scipy.stats.bootstrap(..., paired=True,
    vectorized=True)``; statistic must take arrays of shape (..., n) and reduce the last axis.

    Returns {estimate, low, high, n, confidence, method}. When BCa is undefined (e.g. a constant
    statistic across the jackknife) the percentile interval is given and ``method`` says so; a
    statistic on fewer than 3 patients has no interval (NaN, with a note)."""
    cfg = BootstrapConfig.from_any(cfg)
    arrays = [np.asarray(a, dtype=np.float64) for a in data]
    n = int(arrays[0].shape[-1]) if arrays else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate = float(statistic(*arrays)) if n else math.nan
    out: dict[str, Any] = {"estimate": estimate, "low": math.nan, "high": math.nan, "n": n,
                           "confidence": cfg.confidence, "method": cfg.method}
    if n < MIN_CORRELATION:
        out["note"] = f"{n} patient(s): an interval needs at least {MIN_CORRELATION}"
        return out
    if not math.isfinite(estimate):
        out["note"] = "statistic undefined"
        return out
    for method in dict.fromkeys((cfg.method, "percentile")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = sps.bootstrap(arrays, lambda *a, axis=-1: statistic(*a), n_resamples=cfg.n_resamples, confidence_level=cfg.confidence,
                                method=method, paired=True, vectorized=True, axis=-1,
                                random_state=np.random.default_rng(cfg.seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            out.update(low=low, high=high, method=method)
            return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one_each = [float(statistic(*(a[..., [i]] for a in arrays))) for i in range(n)]
    if np.allclose(estimate, one_each):
        out.update(low=estimate, high=estimate, note="the same value for every patient")
    else:
        out["note"] = "the bootstrap distribution is degenerate"
    return out


def _mean_last(*arrays: np.ndarray) -> np.ndarray:
    return np.mean(arrays[0], axis=-1)


def _mean_difference_last(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.mean(a - b, axis=-1)


def mean_interval(values: np.ndarray, cfg: BootstrapConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Bootstrap interval of the mean of per-patient values (finite ones)."""
    v = np.asarray(values, dtype=float)
    return bootstrap_interval([v[np.isfinite(v)]], _mean_last, cfg)


def includes_zero(interval: Mapping[str, Any]) -> bool | None:
    """Whether an interval contains 0 (None when it is undefined): a difference whose interval
    includes zero is not shown by the data."""
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return None
    return bool(low <= 0.0 <= high)


def fisher_z_interval(r: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of a Pearson correlation r of n pairs by Fisher's z transform:
    tanh(atanh(r) ± z_(1+c)/2 / sqrt(n - 3)). NaN for n <= 3 or an undefined r."""
    if n <= 3 or r is None or not math.isfinite(r):
        return math.nan, math.nan
    r = min(max(float(r), -1.0), 1.0)
    z = math.atanh(r) if abs(r) < 1 else math.copysign(math.inf, r)
    half = float(sps.norm.ppf(0.5 + confidence / 2)) / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def _pearson_last(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r along the last axis, patients with a NaN in x or y left out (vectorised)."""
    ok = np.isfinite(x) & np.isfinite(y)
    w = ok.astype(np.float64)
    k = w.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        xm = np.where(ok, x, 0.0).sum(axis=-1, keepdims=True) / k
        ym = np.where(ok, y, 0.0).sum(axis=-1, keepdims=True) / k
        dx, dy = np.where(ok, x - xm, 0.0), np.where(ok, y - ym, 0.0)
        return (dx * dy).sum(axis=-1) / np.sqrt((dx * dx).sum(axis=-1) * (dy * dy).sum(axis=-1))


def lobe_margins(df_a: pd.DataFrame, df_b: pd.DataFrame, cfg: BootstrapConfig | Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """How much better set a's lobe means follow the SPECT's than set b's, across the patients
    both have: per region (lobes and lungs), r_a - r_b with r the Pearson correlation of the
    set's ``mean_pred_X`` with ``mean_spect_X`` (set a's SPECT column: both sets share the SPECT),
    and "mean_lobe_r" = the mean over the five lobes of r; each with a paired bootstrap interval
    (the same resampled patients for both sets: the two correlations are dependent)."""
    cols = [c for c in df_a.columns if c.startswith(("mean_pred_", "mean_spect_"))]
    joined = pd.merge(df_a[["patient_id"] + cols], df_b[["patient_id"] + [c for c in cols if c.startswith("mean_pred_")
                                                                           and c in df_b.columns]],
                      on="patient_id", suffixes=("_a", "_b"))
    out: dict[str, Any] = {}

    def column(name: str) -> np.ndarray:
        return pd.to_numeric(joined[name], errors="coerce").to_numpy(float) if name in joined.columns \
            else np.full(len(joined), np.nan)

    lobes_present = []
    for region in LOBES + LUNGS:
        s, a, b = column(f"mean_spect_{region}"), column(f"mean_pred_{region}_a"), column(f"mean_pred_{region}_b")
        keep = np.isfinite(s) & np.isfinite(a) & np.isfinite(b)
        if keep.sum() == 0:
            continue
        if region in LOBES:
            lobes_present.append((s, a, b))
        entry = bootstrap_interval([s[keep], a[keep], b[keep]],
                                   lambda s_, a_, b_: _pearson_last(a_, s_) - _pearson_last(b_, s_), cfg)
        entry["includes_zero"] = includes_zero(entry)
        out[region] = entry
    if lobes_present:
        data = [arr for triple in lobes_present for arr in triple]
        k = len(lobes_present)

        def mean_lobe_margin(*arrs):
            return np.nanmean(np.stack([_pearson_last(arrs[3 * i + 1], arrs[3 * i]) - _pearson_last(arrs[3 * i + 2], arrs[3 * i])
                                        for i in range(k)]), axis=0)

        entry = bootstrap_interval(data, mean_lobe_margin, cfg)
        entry["includes_zero"] = includes_zero(entry)
        entry["lobes"] = k
        out["mean_lobe_r"] = entry
    return out


def mean_lobe_r(df: pd.DataFrame, cfg: BootstrapConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The mean over the five lobes of the Pearson correlation across patients of the set's lobe
    means with the SPECT's (the lobe level in one number), with a bootstrap interval."""
    data = []
    for lobe in LOBES:
        if f"mean_spect_{lobe}" in df.columns and f"mean_pred_{lobe}" in df.columns:
            data += [pd.to_numeric(df[f"mean_spect_{lobe}"], errors="coerce").to_numpy(float),
                     pd.to_numeric(df[f"mean_pred_{lobe}"], errors="coerce").to_numpy(float)]
    if not data:
        return {"estimate": math.nan, "low": math.nan, "high": math.nan, "n": 0, "note": "no lobe means"}
    k = len(data) // 2

    def stat(*arrs):
        return np.nanmean(np.stack([_pearson_last(arrs[2 * i + 1], arrs[2 * i]) for i in range(k)]), axis=0)

    out = bootstrap_interval(data, stat, cfg)
    out["lobes"] = k
    return out


# --------------------------------------------------------------------------------------------------
# Several cohorts (seeds)
# --------------------------------------------------------------------------------------------------


def _numeric_leaves(obj: Any, prefix: str = "") -> dict[str, float]:
    """Every number of a JSON document by its dotted path (booleans and strings left out)."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_numeric_leaves(v, f"{prefix}{k}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix[:-1]] = float(obj)
    return out


def aggregate_seeds(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Mean and SD (ddof = 1) across several evaluations (the summary.json of one synthetic
    cohort per seed) of every number they hold, by dotted path (e.g.
    ``headline.margins.geometry.spearman_r.mean_difference.estimate``).

    Returns {"n_seeds", "sources", "values": {path: {n, mean, sd, min, max}}}; a number missing
    (or null) in some files is aggregated over the others, n saying over how many."""
    if not paths:
        raise ValueError("aggregate_seeds needs at least one summary.json")
    leaves = []
    for path in paths:
        leaves.append(_numeric_leaves(json.loads(Path(path).read_text())))
    keys = sorted(set().union(*leaves))
    values = {}
    for key in keys:
        v = np.array([leaf[key] for leaf in leaves if key in leaf], dtype=float)
        values[key] = {k: val for k, val in describe(v).items() if k in ("n", "mean", "sd", "min", "max")}
    return {"n_seeds": len(paths), "sources": [str(p) for p in paths], "values": values}


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


def cohort_summary(df: pd.DataFrame, bootstrap: BootstrapConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The cohort and the per-patient metrics of one prediction set.

    Returns ``{"n_patients", "institutions": {name: n}, "cohorts": {name: n}, "metrics": {metric:
    describe(...) + "ci": mean_interval(...)}}``; the two Dice entries also hold ``"above":
    {"0.7": {"count", "fraction"}, "0.8": {...}}`` (strictly greater, as the paper counts). Metrics
    absent from the rows are absent here, except the paper's three, which are always present
    (n = 0 when missing).
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
        entry["ci"] = mean_interval(v, bootstrap)
        if metric in ("dice_high", "dice_low"):
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
                   pearson_ci_low=math.nan, pearson_ci_high=math.nan, note=f"{x.size} patient(s): a correlation needs at least {MIN_CORRELATION}")
        return out
    out["pearson_r"], out["pearson_p"] = _scipy(sps.pearsonr, x, y)
    out["spearman_rho"], out["spearman_p"] = _scipy(sps.spearmanr, x, y)
    out["pearson_ci_low"], out["pearson_ci_high"] = fisher_z_interval(out["pearson_r"], int(x.size))
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

    Each entry: n, pearson_r, pearson_p, pearson_ci_low / pearson_ci_high (95 % by Fisher's z,
    :func:`fisher_z_interval`; NaN for n <= 3), spearman_rho, spearman_p, mean_pred, mean_spect and
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


def paired_comparison(df_a: pd.DataFrame, df_b: pd.DataFrame, metric: str = "spearman_r",
                      bootstrap: BootstrapConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Set a against set b on the patients both have (joined on patient_id).

    Returns n, mean_a, mean_b, relative_change = (mean_a - mean_b) / mean_b (the paper's
    "7.78%"), mean_difference and sd_difference of the per-patient a - b, its bootstrap interval
    ``ci`` (patients resampled; :func:`bootstrap_interval`) with ``ci["includes_zero"]``, the
    Wilcoxon signed-rank test and the paired t-test (statistic and two-sided p, scipy's defaults).
    """
    out: dict[str, Any] = {"metric": metric, "n": 0, "mean_a": math.nan, "mean_b": math.nan,
                           "relative_change": math.nan, "mean_difference": math.nan,
                           "sd_difference": math.nan, "wilcoxon_statistic": math.nan, "wilcoxon_p": math.nan,
                           "ttest_statistic": math.nan, "ttest_p": math.nan,
                           "ci": {"estimate": math.nan, "low": math.nan, "high": math.nan, "n": 0,
                                  "includes_zero": None}}
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
    out["ci"] = bootstrap_interval([a, b], _mean_difference_last, bootstrap)
    out["ci"]["includes_zero"] = includes_zero(out["ci"])
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
