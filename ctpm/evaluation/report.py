"""The evaluation's files: per-patient CSVs, summary.json, figures and report.md.

:func:`write_report` turns the result of :func:`ctpm.evaluation.evaluate.evaluate` into

- ``metrics.csv`` (the evaluated prediction set, a row a patient) and, for the sets that were
  evaluated, ``baseline_metrics.csv`` (pretrained only), ``geometry_metrics.csv`` (the geometry
  prior), ``density_metrics.csv``, ``ceiling_psf_metrics.csv`` (the truth blurred by the SPECT's
  PSF) and ``ceiling_truth_metrics.csv`` (the truth);
- ``summary.json``: every statistic of :mod:`ctpm.evaluation.stats` for each set with a
  bootstrap interval on every cohort mean, the **headline** (the model's margin over the geometry
  prior in voxel R, interior R, Pearson r, DSC and mean lobe r, each with its interval), the paired
  comparisons of the model with every other set, the lobe margins, the defect detection, the
  ceilings, and the patients and folds without prediction (JSON-safe: an undefined number is null);
- ``figures/*.png``: the paper's Figs. 2-4 as far as the data allow, the model against the
  geometry prior per patient, and the lobe correlations with their intervals;
- ``report.md``: the headline table first, then the numbers in the paper's order (voxel-wise,
  function-wise, lobe-wise, institutions, tumour size) and the defects, every one of them
  computed from the rows; an interval that includes zero is marked.

Each file is written to a temporary name and renamed, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ctpm.data.io import atomic_write
from ctpm.evaluation import figures
from ctpm.evaluation.stats import (
    DIAMETER,
    LOBES,
    LUNGS,
    METRICS,
    PAIRED_METRICS,
    BootstrapConfig,
    cohort_summary,
    describe,
    format_p,
    includes_zero,
    institution_comparison,
    lobe_agreement,
    lobe_margins,
    mean_lobe_r,
    paired_comparison,
    rows_to_frame,
    tumour_size_association,
)

DEFAULT_LABELS = {"model": "fine-tuned", "baseline": "pretrained only", "geometry": "geometry prior",
                  "density": "density baseline", "truth_psf": "ceiling: truth through the SPECT PSF",
                  "oracle_psf": "ceiling: CT-visible oracle through the SPECT PSF", "truth": "truth (unblurred)"}
#: The prediction sets in the order the report lists them, with the CSV each is written to.
SET_FILES = {"model": "metrics.csv", "baseline": "baseline_metrics.csv", "geometry": "geometry_metrics.csv",
             "density": "density_metrics.csv", "truth_psf": "ceiling_psf_metrics.csv",
             "oracle_psf": "ceiling_oracle_metrics.csv", "truth": "ceiling_truth_metrics.csv"}
#: Sets the model is compared with patient by patient (paired differences), in the report's order.
COMPARED = ("geometry", "density", "baseline")
#: The set whose margin is the headline: what the model adds over the lungs' geometry.
HEADLINE_REFERENCE = "geometry"
#: The headline's metrics: voxel level (full and interior), function level, lobe level.
HEADLINE_METRICS = ("spearman_r", "spearman_r_interior", "pearson_r", "pearson_r_interior",
                    "dice_high", "dice_low", "dice_high_interior", "dice_low_interior")
#: Every figure the report can draw (figures/<name>.png).
FIGURE_NAMES = ("r_before_after", "r_vs_density", "model_vs_geometry", "dice_histograms", "lobe_scatter",
                "lobe_histogram", "lobe_intervals", "representative_case")
METRIC_NAMES = {"spearman_r": "Spearman R", "dice_high": "DSC high-functional", "dice_low": "DSC low-functional",
                "pearson_r": "Pearson r", "spearman_r_interior": "interior Spearman R",
                "pearson_r_interior": "interior Pearson r", "dice_high_interior": "interior DSC high",
                "dice_low_interior": "interior DSC low", "defect_sensitivity": "defect sensitivity",
                "defect_precision": "defect precision", "mean_lobe_r": "mean lobe r"}
FIGURE_DPI = 130


# --------------------------------------------------------------------------------------------------
# summary.json
# --------------------------------------------------------------------------------------------------


def summarise(frames: Mapping[str, pd.DataFrame], result: Mapping[str, Any], *, labels: Mapping[str, str],
              title: str, threshold: float, bootstrap: BootstrapConfig | Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
    """Every statistic of the evaluation as one dict (the content of summary.json, before NaN
    becomes null). ``frames`` holds a DataFrame per prediction set, "model" first."""
    boot = BootstrapConfig.from_any(bootstrap)
    model = frames["model"]
    summary: dict[str, Any] = {
        "title": title,
        "threshold": threshold,
        "labels": {name: labels[name] for name in frames},
        "n_patients": int(len(model)),
        "missing": list(result.get("missing") or []),
        "missing_folds": [int(k) for k in result.get("missing_folds") or []],
        "density_fit": result.get("density_fit"),
        "smooth_density": result.get("smooth_density"),
        "spect_fwhm": result.get("spect_fwhm"),
        "min_defect_ml": result.get("min_defect_ml"),
        "bootstrap": {"n_resamples": boot.n_resamples, "seed": boot.seed, "confidence": boot.confidence,
                      "method": boot.method, "resampled": "patients"},
        "headline": None,
        "sets": {},
        "paired": {},
        "lobe_margins": {},
        "defects": {},
        "ceiling": None,
        "representative_case": (result.get("case") or {}).get("patient_id"),
    }
    for name, df in frames.items():
        summary["sets"][name] = {
            "label": labels[name],
            "summary": cohort_summary(df, boot),
            "lobes": lobe_agreement(df),
            "mean_lobe_r": mean_lobe_r(df, boot),
            "institutions": institution_comparison(df),
            "tumour_size": tumour_size_association(df),
        }
        summary["defects"][name] = defect_summary(df)
    for name in COMPARED:
        if name in frames:
            summary["paired"][f"model_vs_{name}"] = {m: paired_comparison(model, frames[name], m, boot)
                                                     for m in PAIRED_METRICS}
            summary["lobe_margins"][f"model_vs_{name}"] = lobe_margins(model, frames[name], boot)
    summary["headline"] = headline(summary)
    if "ceiling_r" in model.columns:
        both = model[["spearman_r", "ceiling_r"]].apply(pd.to_numeric, errors="coerce").dropna()
        ceiling = describe(both["ceiling_r"].to_numpy(float))
        # what share of the correlation of the truth with the SPECT the model reaches
        ceiling["model_mean_r"] = float(both["spearman_r"].mean()) if len(both) else math.nan
        ceiling["fraction_of_ceiling"] = (ceiling["model_mean_r"] / ceiling["mean"]
                                          if len(both) and ceiling["mean"] != 0 else math.nan)
        if "ceiling_psf_r" in model.columns:
            psf = pd.to_numeric(model["ceiling_psf_r"], errors="coerce").dropna().to_numpy(float)
            attainable = describe(psf)
            attainable["fraction_of_attainable"] = (ceiling["model_mean_r"] / attainable["mean"]
                                                    if psf.size and attainable["mean"] != 0 else math.nan)
            ceiling["attainable"] = attainable
        if "ceiling_oracle_r" in model.columns:
            oracle = pd.to_numeric(model["ceiling_oracle_r"], errors="coerce").dropna().to_numpy(float)
            known = describe(oracle)
            known["fraction_of_oracle"] = (ceiling["model_mean_r"] / known["mean"]
                                           if oracle.size and known["mean"] != 0 else math.nan)
            ceiling["oracle"] = known
        summary["ceiling"] = ceiling
    return summary


def defect_summary(df: pd.DataFrame) -> dict[str, Any]:
    """Defect detection of one set pooled over its patients: patients with a SPECT defect,
    defects and those found (at least half their volume called low), and the volume-weighted
    (pooled) sensitivity and precision: sum of detected defect volume / sum of defect volume,
    sum of SPECT-low low calls / sum of low calls. (Per-patient means with intervals are in the
    set's cohort summary.)"""
    out: dict[str, Any] = {"n_patients": int(len(df)), "patients_with_defects": 0, "n_defects": 0,
                           "defects_found": 0, "pooled_sensitivity": math.nan, "pooled_precision": math.nan}
    if "n_defects" not in df.columns:
        out["note"] = "no defect columns"
        return out
    num = {c: pd.to_numeric(df[c], errors="coerce") for c in ("n_defects", "defects_found", "defect_ml",
                                                                 "low_call_ml", "defect_sensitivity",
                                                                 "defect_precision") if c in df.columns}
    out["patients_with_defects"] = int((num["n_defects"] > 0).sum())
    out["n_defects"] = int(num["n_defects"].sum())
    out["defects_found"] = int(num.get("defects_found", pd.Series(dtype=float)).sum())
    if {"defect_ml", "defect_sensitivity"} <= set(num):
        w, v = num["defect_ml"], num["defect_sensitivity"]
        ok = w.gt(0) & v.notna()
        if ok.any():
            out["pooled_sensitivity"] = float((w[ok] * v[ok]).sum() / w[ok].sum())
    if {"low_call_ml", "defect_precision"} <= set(num):
        w, v = num["low_call_ml"], num["defect_precision"]
        ok = w.gt(0) & v.notna()
        if ok.any():
            out["pooled_precision"] = float((w[ok] * v[ok]).sum() / w[ok].sum())
    return out


def headline(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """The headline of the evaluation: per metric of :data:`HEADLINE_METRICS` and the mean lobe
    r, the model's and the geometry prior's cohort means with intervals and the model's margin
    (mean per-patient difference; for the lobe r the difference of correlations) with its
    interval and whether that includes zero. None without the geometry prior."""
    ref = HEADLINE_REFERENCE
    if ref not in summary["sets"]:
        return None
    sets = summary["sets"]
    paired = summary["paired"][f"model_vs_{ref}"]
    out: dict[str, Any] = {"reference": ref, "metrics": {}}
    for metric in HEADLINE_METRICS:
        m = sets["model"]["summary"]["metrics"].get(metric)
        g = sets[ref]["summary"]["metrics"].get(metric)
        if m is None or g is None:
            continue
        margin = dict(paired[metric]["ci"])
        out["metrics"][metric] = {"model": m["ci"], ref: g["ci"], "margin": margin,
                                  "includes_zero": includes_zero(margin)}
    lobe = summary["lobe_margins"][f"model_vs_{ref}"].get("mean_lobe_r")
    if lobe is not None:
        out["metrics"]["mean_lobe_r"] = {"model": sets["model"]["mean_lobe_r"], ref: sets[ref]["mean_lobe_r"],
                                         "margin": lobe, "includes_zero": includes_zero(lobe)}
    return out


def json_safe(obj: Any) -> Any:
    """obj with numpy scalars as Python numbers, tuples as lists, paths as strings and every
    non-finite float as None (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------


def _num(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if x is not None and math.isfinite(x) else "n/a"


def _mean_sd(d: Mapping[str, Any], digits: int = 4) -> str:
    if not d.get("n"):
        return "n/a"
    sd = f" ± {_num(d['sd'], digits)}" if d["n"] > 1 else ""
    return f"{_num(d['mean'], digits)}{sd}"


def _range(d: Mapping[str, Any]) -> str:
    return f"{_num(d['min'])} – {_num(d['max'])}" if d.get("n") else "n/a"


def _percent(x: Any) -> str:
    return f"{100 * x:+.2f}%" if x is not None and math.isfinite(x) else "n/a"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _above(d: Mapping[str, Any], level: str) -> str:
    a = d["above"][level]
    return f"{a['count']} of {d['n']} ({100 * a['fraction']:.0f}%)" if d["n"] else "n/a"


def _figure(lines: list[str], figure_files: Mapping[str, Path], name: str, caption: str) -> None:
    if name in figure_files:
        lines += [f"![{caption}](figures/{figure_files[name].name})", ""]


#: The mark of a difference whose interval includes zero (the data do not show it).
NOT_SHOWN = "†"


def _interval(entry: Mapping[str, Any] | None, digits: int = 3) -> str:
    """"[low, high]" of an interval entry, "[n/a]" when undefined."""
    if not entry or entry.get("low") is None or not all(
            isinstance(entry.get(k), (int, float)) and math.isfinite(entry[k]) for k in ("low", "high")):
        return "[n/a]"
    return f"[{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def _estimate(entry: Mapping[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    """An estimate with its interval ("0.734 [0.701, 0.760]"), a difference signed, and marked
    with :data:`NOT_SHOWN` when the interval includes zero."""
    if not entry:
        return "n/a"
    x = entry.get("estimate")
    if x is None or not math.isfinite(x):
        return "n/a"
    text = f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    text += f" {_interval(entry, digits)}"
    if includes_zero(entry):
        text += f" {NOT_SHOWN}"
    return text


def _paired_line(cmp: Mapping[str, Any], label_a: str, label_b: str) -> str:
    metric = METRIC_NAMES.get(cmp["metric"], cmp["metric"])
    ci = cmp.get("ci") or {}
    mark = f" {NOT_SHOWN} (the interval includes 0)" if includes_zero(ci) else ""
    text = (f"- **{label_a} vs {label_b}**, {metric} (n = {cmp['n']} patients): mean {_num(cmp['mean_a'])} vs "
            f"{_num(cmp['mean_b'])}, relative change {_percent(cmp['relative_change'])}, mean per-patient "
            f"difference {_num(cmp['mean_difference'])} ± {_num(cmp['sd_difference'])}, 95 % CI "
            f"{_interval(ci, 4)}{mark}; Wilcoxon signed-rank "
            f"p = {format_p(cmp['wilcoxon_p'])}, paired t-test p = {format_p(cmp['ttest_p'])}.")
    return text + (f" ({cmp['note']})" if cmp.get("note") else "")


def _headline_lines(summary: Mapping[str, Any], figure_files: Mapping[str, Path]) -> list[str]:
    """The headline section: every set's cohort means with intervals, then the model's margins."""
    labels, sets = summary["labels"], summary["sets"]
    boot = summary["bootstrap"]
    lines = ["## Headline: what the CT adds over the lungs' geometry", ""]
    if summary["headline"] is None:
        lines += ["No geometry prior was evaluated (`geometry_prior=false`): the headline margin is not available.", ""]
    else:
        lines += [f"The **{labels['geometry']}** sees no CT intensity: the lung mask blurred to the SPECT's resolution "
                  "times a vertical and a cranio-caudal gradient, fitted by least squares "
                  f"({summary['density_fit'] or 'n/a'}). A map's margin over it is what it learned from the CT.", ""]
    lines += [f"Cohort means with 95 % intervals (bootstrap, {boot['method']}, {boot['n_resamples']} resamples of the "
              f"patients, seed {boot['seed']}). *Interior*: the evaluation mask farther than one SPECT FWHM from the "
              "lungs' border. *Mean lobe r*: Pearson r across patients of the lobe means against the SPECT's, "
              "averaged over the lobes.", ""]
    cols = HEADLINE_METRICS
    rows = []
    for name, s in sets.items():
        m = s["summary"]["metrics"]
        rows.append([labels[name], str(m["spearman_r"]["n"])]
                    + [_estimate(m[c]["ci"]) if c in m else "n/a" for c in cols]
                    + [_estimate(s["mean_lobe_r"])])
    lines += _table(["set", "n"] + [METRIC_NAMES[c] for c in cols] + ["mean lobe r"], rows) + [""]
    for name in COMPARED:
        key = f"model_vs_{name}"
        if key not in summary["paired"]:
            continue
        parts = [f"{METRIC_NAMES[c]} {_estimate(summary['paired'][key][c]['ci'], signed=True)}" for c in cols
                 if c in summary["paired"][key]]
        lobe = summary["lobe_margins"][key].get("mean_lobe_r")
        if lobe:
            parts.append(f"mean lobe r {_estimate(lobe, signed=True)}")
        n = summary["paired"][key]["spearman_r"]["n"]
        head = "Margin (the headline): " if name == HEADLINE_REFERENCE else ""
        lines.append(f"- **{head}{labels['model']} − {labels[name]}** (paired, n = {n}): " + "; ".join(parts) + ".")
    lines += ["", f"{NOT_SHOWN} the 95 % interval includes zero: the data do not show that difference (or "
              "that correlation).", ""]
    _figure(lines, figure_files, "model_vs_geometry", f"{labels['model']} vs {labels.get('geometry')} per patient")
    return lines


def render_markdown(summary: Mapping[str, Any], frames: Mapping[str, pd.DataFrame],
                    figure_files: Mapping[str, Path]) -> str:
    """report.md from the summary (numbers) and the model's rows (cohort table)."""
    labels = summary["labels"]
    sets = summary["sets"]
    model = sets["model"]
    lines = [f"# {summary['title']}", ""]

    if summary["missing"] or summary["missing_folds"]:
        lines.append(f"> **WARNING: {len(summary['missing'])} patient(s) of the manifest have no prediction "
                     f"and are left out of every number below: {', '.join(summary['missing'])}.**")
        if summary["missing_folds"]:
            lines.append(f">\n> **Folds without predictions: {', '.join(map(str, summary['missing_folds']))}** "
                         "(a fold job failed or has not run).")
        lines.append("")

    compared = [labels[n] for n in COMPARED + ("truth_psf", "oracle_psf", "truth") if n in frames]
    lines += [f"{summary['n_patients']} patient(s) evaluated; {labels['model']} predictions"
              + (f", compared with {', '.join(compared)}" if compared else "")
              + f". Functional volumes at the threshold {summary['threshold']} of the standardised perfusion.",
              ""]
    if summary["density_fit"]:
        lines += [f"The baselines are fitted by least squares on: {summary['density_fit']}. The "
                  f"{labels.get('density', 'density baseline')} predicts perfusion from CT density and vertical "
                  "position" + (", the HU smoothed to the SPECT's resolution inside the lungs"
                                if summary.get("smooth_density") else "") + ".", ""]

    lines += _headline_lines(summary, figure_files)

    # Cohort: patients and tumour diameter per institution
    lines += ["## Cohort", ""]
    df = frames["model"]

    def cohort_row(name: str, group: pd.DataFrame) -> list[str]:
        diam = describe(group[DIAMETER].dropna().to_numpy(float) if DIAMETER in group.columns else np.array([]))
        cohorts = ", ".join(f"{c} {n}" for c, n in group["cohort"].value_counts().sort_index().items()) \
            if "cohort" in group.columns else "n/a"
        return [name, str(len(group)), cohorts, f"{_mean_sd(diam, 1)} (n = {diam['n']})"]

    rows = []
    if "institution" in df.columns:
        rows += [cohort_row(inst, group) for inst, group in df.groupby(df["institution"].astype(str), sort=True)]
    rows.append(cohort_row("all", df))
    lines += _table(["institution", "patients", "cohorts", "tumour diameter (mm), mean ± SD"], rows) + [""]

    # Voxel-wise correlation (Fig. 2A)
    lines += ["## Voxel-wise correlation", "",
              "Spearman R between the predicted and the SPECT perfusion over the evaluation mask, per patient.", ""]
    rows = []
    for name, s in sets.items():
        m = s["summary"]["metrics"]
        per_lung = [_mean_sd(m[f"spearman_r_{side}"]) if f"spearman_r_{side}" in m else "n/a" for side in LUNGS]
        rows.append([labels[name], str(m["spearman_r"]["n"]), _mean_sd(m["spearman_r"]),
                     _num(m["spearman_r"]["median"]), _range(m["spearman_r"]), *per_lung])
    if summary["ceiling"] and "truth" not in sets:
        c = summary["ceiling"]
        rows.append(["noise ceiling (true perfusion vs SPECT)", str(c["n"]), _mean_sd(c), _num(c["median"]),
                     _range(c), "", ""])
    lines += _table(["set", "n", "R mean ± SD", "median", "range", "right lung R", "left lung R"], rows) + [""]
    for key, cmps in summary["paired"].items():
        lines.append(_paired_line(cmps["spearman_r"], labels["model"], labels[key.removeprefix("model_vs_")]))
    if summary["ceiling"]:
        c = summary["ceiling"]
        lines.append(f"- **Noise ceiling**: the true perfusion of the synthetic patients correlates with their SPECT "
                     f"at R = {_mean_sd(c)}; the {labels['model']} model's mean R is "
                     f"{_num(100 * c['fraction_of_ceiling'], 1)}% of it.")
        if c.get("attainable"):
            a = c["attainable"]
            lines.append(f"- **Attainable ceiling**: the truth seen through each patient's SPECT PSF correlates with "
                         f"the SPECT at R = {_mean_sd(a)}; no map can do better against this SPECT. The "
                         f"{labels['model']} model reaches {_num(100 * a['fraction_of_attainable'], 1)}% of it.")
        if c.get("oracle"):
            o = c["oracle"]
            lines.append(f"- **What CT can know**: the CT-visible oracle (the perfusion rebuilt from the causes CT can "
                         f"see) through each patient's PSF correlates with the SPECT at R = {_mean_sd(o)}: the "
                         f"ceiling of any CT-based model here. The {labels['model']} model reaches "
                         f"{_num(100 * o['fraction_of_oracle'], 1)}% of it.")
    lines.append("")
    _figure(lines, figure_files, "r_before_after", f"Voxel-wise R, {labels.get('baseline')} vs {labels['model']}")
    _figure(lines, figure_files, "r_vs_density", f"Voxel-wise R, {labels.get('density')} vs {labels['model']}")

    # Function-wise similarity (Fig. 2B)
    lines += ["## Function-wise similarity", "",
              f"Dice of the high (>= {summary['threshold']}) and low (< {summary['threshold']}) functional volumes.",
              ""]
    rows = []
    for name, s in sets.items():
        m = s["summary"]["metrics"]
        row = [labels[name]]
        for metric in ("dice_high", "dice_low"):
            row += [_mean_sd(m[metric]), _range(m[metric]), _above(m[metric], "0.7"), _above(m[metric], "0.8")]
        rows.append(row)
    lines += _table(["set", "DSC high mean ± SD", "range", "> 0.7", "> 0.8",
                     "DSC low mean ± SD", "range", "> 0.7", "> 0.8"], rows) + [""]
    for key, cmps in summary["paired"].items():
        for metric in ("dice_high", "dice_low"):
            lines.append(_paired_line(cmps[metric], labels["model"], labels[key.removeprefix("model_vs_")]))
    if summary["paired"]:
        lines.append("")
    _figure(lines, figure_files, "dice_histograms", "DSC histograms")

    # Lobe-wise agreement (Fig. 4)
    lines += ["## Lobe-wise agreement", "",
              "Correlation across patients of the mean perfusion of a lobe (a lung), CT-based against SPECT; "
              "difference = CT-based - SPECT.", ""]
    lobes = model["lobes"]
    regions = [r for r in LOBES + LUNGS if lobes[r]["n"]]
    if not any(lobes[r]["n"] for r in LOBES):
        lines += ["No lobe labels in the manifest: lobe-wise agreement is given per lung only.", ""]
    others = [n for n in sets if n != "model"]
    def fisher(entry: Mapping[str, Any]) -> str:
        ci = {"low": entry["pearson_ci_low"], "high": entry["pearson_ci_high"]}
        mark = f" {NOT_SHOWN}" if includes_zero(ci) else ""
        return f"{_num(entry['pearson_r'], 3)} {_interval(ci)}{mark}"

    rows = [[region, str(lobes[region]["n"]), fisher(lobes[region]), format_p(lobes[region]["pearson_p"]),
             _num(lobes[region]["spearman_rho"]), format_p(lobes[region]["spearman_p"]),
             _num(lobes[region]["mean_pred"]), _num(lobes[region]["mean_spect"]),
             _num(lobes[region]["mean_difference"]),
             *[fisher(sets[n]["lobes"][region]) for n in others]] for region in regions]
    lines += [f"Pearson r with its 95 % interval by Fisher's z transform (n <= 3: none); {NOT_SHOWN}: the "
              "interval includes zero.", ""]
    lines += _table(["region", "n", "Pearson r [95 % CI]", "p", "Spearman rho", "p", "mean CT-based", "mean SPECT",
                     "mean difference", *[f"r, {labels[n]}" for n in others]], rows) + [""]
    margin_sets = [n for n in COMPARED if f"model_vs_{n}" in summary["lobe_margins"]]
    if margin_sets and regions:
        rows = [[region.replace("mean_lobe_r", "mean of the lobes")] + [_estimate(summary["lobe_margins"][f"model_vs_{n}"].get(region), signed=True)
                            for n in margin_sets] for region in regions + ["mean_lobe_r"]
                if any(region in summary["lobe_margins"][f"model_vs_{n}"] for n in margin_sets)]
        lines += [f"Difference of lobe correlations, r({labels['model']}) − r(other), paired bootstrap over the "
                  f"patients (both correlate with the same SPECT); {NOT_SHOWN}: the interval includes zero.", ""]
        lines += _table(["region"] + [f"{labels['model']} − {labels[n]}" for n in margin_sets], rows) + [""]
    _figure(lines, figure_files, "lobe_intervals", "Lobe correlations with their intervals")
    _figure(lines, figure_files, "lobe_scatter", "Lobe means, SPECT vs CT-based")
    _figure(lines, figure_files, "lobe_histogram", "Histogram of lobe mean perfusion")

    lines += _defect_lines(summary)

    # Institutions ("Discussion")
    lines += ["## Institutions", ""]
    inst = model["institutions"]
    if len(inst["institutions"]) == 2:
        a, b = inst["institutions"]
        entries = [(METRIC_NAMES[m], inst["metrics"][m], 4) for m in METRICS]
        if inst[DIAMETER]:
            entries.append(("tumour diameter (mm)", inst[DIAMETER], 1))
        rows = [[name, f"{_mean_sd(e[a], digits)} (n = {e[a]['n']})", f"{_mean_sd(e[b], digits)} (n = {e[b]['n']})",
                 _percent(e["relative_difference"]), _num(e["u"], 1), format_p(e["p"])] for name, e, digits in entries]
        lines += [f"{labels['model']}; Mann-Whitney U test (two-sided); relative difference = ({a} - {b}) / {b}.", ""]
        lines += _table(["metric", a, b, "relative difference", "U", "p"], rows) + [""]
    else:
        lines += [f"Not compared: {inst.get('note', 'no institution')}.", ""]

    # Tumour size
    lines += ["## Tumour size", ""]
    size = model["tumour_size"]
    rows = [[METRIC_NAMES[m], str(size[m]["n"]), _num(size[m]["rho"]), format_p(size[m]["p"])]
            for m in METRICS if size[m]]
    if rows:
        lines += [f"Spearman correlation of each metric of the {labels['model']} model with the tumour diameter.", ""]
        lines += _table(["metric", "n", "Spearman rho", "p"], rows) + [""]
    if size.get("note"):
        lines += [f"Not computed for some metrics: {size['note']}.", ""]

    if "representative_case" in figure_files:
        lines += ["## Representative case", "",
                  f"Patient {summary['representative_case']}, at the centre of the lungs; the last row shows the "
                  f"predicted functional volumes on the CT and the SPECT's border at {summary['threshold']}.", ""]
        _figure(lines, figure_files, "representative_case", "Representative case")
    return "\n".join(lines).rstrip() + "\n"


def _defect_lines(summary: Mapping[str, Any]) -> list[str]:
    """The defect-detection section."""
    labels, sets = summary["labels"], summary["sets"]
    t = summary["threshold"]
    lines = ["## Perfusion defects", "",
             f"SPECT defects: connected regions of SPECT < {t} inside the evaluation mask of at least "
             f"{_num(summary.get('min_defect_ml'), 1)} mL. *Sensitivity*: share of the SPECT's defect volume that the map "
             f"also calls low (< {t}); *precision*: share of the map's low calls that are SPECT-low; per patient, "
             "cohort mean [95 % CI]; *pooled*: volume-weighted over all patients. *Found*: defects with at least "
             "half their volume called low.", ""]
    d_model = summary["defects"].get("model", {})
    if not d_model.get("n_defects"):
        return lines + ["No SPECT defect of that size in these patients.", ""]
    rows = []
    for name, s in sets.items():
        m, d = s["summary"]["metrics"], summary["defects"][name]
        rows.append([labels[name], f"{d['patients_with_defects']} of {d['n_patients']}",
                     f"{d['defects_found']} of {d['n_defects']}"]
                    + [_estimate(m[c]["ci"]) if c in m else "n/a" for c in
                       ("defect_sensitivity", "defect_precision", "defect_sensitivity_interior", "defect_precision_interior")]
                    + [_num(d["pooled_sensitivity"], 3), _num(d["pooled_precision"], 3)])
    lines += _table(["set", "patients with defects", "defects found", "sensitivity", "precision",
                     "interior sensitivity", "interior precision", "pooled sensitivity", "pooled precision"], rows)
    lines.append("")
    for name in COMPARED:
        key = f"model_vs_{name}"
        if key in summary["paired"]:
            for metric in ("defect_sensitivity", "defect_precision"):
                lines.append(_paired_line(summary["paired"][key][metric], labels["model"], labels[name]))
    return lines + [""]


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _draw_figures(frames: Mapping[str, pd.DataFrame], case: Mapping[str, Any] | None,
                  labels: Mapping[str, str], threshold: float, bootstrap: Any = None) -> dict[str, Any]:
    """The figures the data allow, by name (Figure objects, not yet saved)."""
    model = frames["model"]
    drawn: dict[str, Any] = {}
    for name, fig_name in (("baseline", "r_before_after"), ("density", "r_vs_density")):
        if name in frames and paired_comparison(model, frames[name])["n"]:
            drawn[fig_name] = figures.r_before_after(model, frames[name], (labels["model"], labels[name]))
    if "geometry" in frames and paired_comparison(model, frames["geometry"])["n"]:
        drawn["model_vs_geometry"] = figures.paired_dots(model, frames["geometry"], (labels["model"], labels["geometry"]),
                                                         bootstrap=bootstrap)
    drawn["dice_histograms"] = figures.dice_histograms(model)
    if any(lobe_agreement(model)[lobe]["n"] for lobe in LOBES):
        drawn["lobe_scatter"] = figures.lobe_scatter(model)
        drawn["lobe_histogram"] = figures.lobe_histogram(model)
        drawn["lobe_intervals"] = figures.lobe_intervals({labels[n]: df for n, df in frames.items()})
    if case is not None:
        drawn["representative_case"] = figures.representative_case(case, threshold=threshold)
    return drawn


def write_report(result: Mapping[str, Any], out_dir: str | Path, *, labels: Mapping[str, str] | None = None,
                 title: str = "ctpm evaluation", threshold: float = 0.66,
                 bootstrap: BootstrapConfig | Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write the evaluation's files into out_dir (see the module docstring). ``bootstrap``:
    n_resamples, seed, confidence and method of every bootstrap interval (:class:`BootstrapConfig`).

    Returns the written paths by name: "metrics", "baseline_metrics", "geometry_metrics",
    "density_metrics", "ceiling_psf_metrics", "ceiling_truth_metrics", "summary", "report" and
    one per figure ("dice_histograms", ...). Files of these names left
    by an earlier run that this run does not write (e.g. a baseline no longer evaluated) are
    removed, so that the folder never mixes two evaluations.
    """
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    labels = {**DEFAULT_LABELS, **(labels or {})}
    rows = result["rows"]
    frames = {name: rows_to_frame(rows[name]) for name in SET_FILES if rows.get(name) is not None}
    written: dict[str, Path] = {}

    for name, df in frames.items():
        key = Path(SET_FILES[name]).stem
        written[key] = atomic_write(out / SET_FILES[name], df.to_csv(index=False))

    summary = summarise(frames, result, labels=labels, title=title, threshold=threshold, bootstrap=bootstrap)
    written["summary"] = atomic_write(out / "summary.json",
                                       json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")

    figure_files: dict[str, Path] = {}
    for name, fig in _draw_figures(frames, result.get("case"), labels, threshold, bootstrap).items():
        buffer = io.BytesIO()
        try:
            fig.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        finally:
            plt.close(fig)
        figure_files[name] = written[name] = atomic_write(out / "figures" / f"{name}.png", buffer.getvalue())

    written["report"] = atomic_write(out / "report.md", render_markdown(summary, frames, figure_files))

    stale = [out / f for f in SET_FILES.values()] + [out / "figures" / f"{n}.png" for n in FIGURE_NAMES]
    for path in stale:
        if path not in written.values():
            path.unlink(missing_ok=True)
    return written


# --------------------------------------------------------------------------------------------------
# Several synthetic cohorts (seeds): mean and SD across them
# --------------------------------------------------------------------------------------------------

#: The numbers of one evaluation that the seeds table reports, as (row label, summary.json path).
SEED_ROWS = tuple(
    [(f"{name}: {METRIC_NAMES[m]}", f"sets.{name}.summary.metrics.{m}.mean")
     for name in ("model", "baseline", "geometry", "density", "truth_psf", "oracle_psf")
     for m in ("spearman_r", "spearman_r_interior", "pearson_r", "dice_high", "dice_low", "defect_sensitivity",
               "defect_precision")]
    + [(f"{name}: mean lobe r", f"sets.{name}.mean_lobe_r.estimate") for name in ("model", "geometry", "density")]
    + [(f"margin over the geometry prior: {METRIC_NAMES[m]}", f"headline.metrics.{m}.margin.estimate")
       for m in ("spearman_r", "spearman_r_interior", "dice_high", "dice_low")]
    + [("margin over the geometry prior: mean lobe r", "headline.metrics.mean_lobe_r.margin.estimate"),
       ("fine-tuned - pretrained only: Spearman R", "paired.model_vs_baseline.spearman_r.ci.estimate"),
       ("fine-tuned - pretrained only: interior Spearman R", "paired.model_vs_baseline.spearman_r_interior.ci.estimate"),
       ("fine-tuned - density baseline: mean lobe r", "lobe_margins.model_vs_density.mean_lobe_r.estimate")]
)


def write_seed_report(summaries: Mapping[int, str | Path], out_dir: str | Path, *, title: str = "ctpm study") -> dict[str, Path]:
    """``seeds_summary.json`` (every number of the seeds' summary.json files, mean and SD across
    them: :func:`ctpm.evaluation.stats.aggregate_seeds`) and ``seeds.md`` (the headline numbers,
    a column per seed, then mean and SD) for the evaluations of several synthetic cohorts."""
    from ctpm.evaluation.stats import aggregate_seeds, numeric_leaves

    out_dir = Path(out_dir)
    seeds = sorted(summaries)
    agg = aggregate_seeds([summaries[s] for s in seeds])
    agg["seeds"] = seeds
    per_seed = [numeric_leaves(json.loads(Path(summaries[s]).read_text())) for s in seeds]
    lines = [f"# {title}: {len(seeds)} synthetic cohort(s)", "",
             f"Seeds {', '.join(map(str, seeds))}: each a whole study (its own cohorts, training and evaluation, "
             "in `seed-<k>/`); every figure a cohort mean over its patients; mean and SD (ddof 1) across the seeds.", ""]
    header = ["", *[f"seed {s}" for s in seeds], "mean", "SD"]
    rows = []
    for label, key in SEED_ROWS:
        stat = agg["values"].get(key)
        if stat is None:
            continue
        vals = [_num(p.get(key)) for p in per_seed]
        rows.append([label, *vals, _num(stat["mean"]), _num(stat["sd"]) if stat["n"] > 1 else "n/a"])
    lines += _table(header, rows)
    files = {"summary": atomic_write(out_dir / "seeds_summary.json", json.dumps(json_safe(agg), indent=1)),
             "report": atomic_write(out_dir / "seeds.md", "\n".join(lines) + "\n")}
    return files

