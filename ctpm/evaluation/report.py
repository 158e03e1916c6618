"""The evaluation's files: per-patient CSVs, summary.json, figures and report.md.

:func:`write_report` turns the result of :func:`ctpm.evaluation.evaluate.evaluate` into

- ``metrics.csv`` (the evaluated prediction set, a row a patient), ``baseline_metrics.csv`` and
  ``density_metrics.csv`` when those sets were evaluated;
- ``summary.json``: every statistic of :mod:`ctpm.evaluation.stats` for each set, the paired
  comparisons of the model with the baseline and with the density baseline, the noise ceiling,
  and the patients and folds without prediction (JSON-safe: an undefined number is null);
- ``figures/*.png``: the paper's Figs. 2-4 as far as the data allow;
- ``report.md``: the numbers in the paper's order (voxel-wise, function-wise, lobe-wise,
  institutions, tumour size), every one of them computed from the rows.

Each file is written to a temporary name and renamed, so an interrupted run leaves no half file.
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ctpm.evaluation import figures
from ctpm.evaluation.stats import (
    DIAMETER,
    LOBES,
    LUNGS,
    METRICS,
    cohort_summary,
    describe,
    format_p,
    institution_comparison,
    lobe_agreement,
    paired_comparison,
    rows_to_frame,
    tumour_size_association,
)

DEFAULT_LABELS = {"model": "fine-tuned", "baseline": "pretrained only", "density": "density baseline"}
#: The prediction sets in the order the report lists them, with the CSV each is written to.
SET_FILES = {"model": "metrics.csv", "baseline": "baseline_metrics.csv", "density": "density_metrics.csv"}
#: Every figure the report can draw (figures/<name>.png).
FIGURE_NAMES = ("r_before_after", "r_vs_density", "dice_histograms", "lobe_scatter", "lobe_histogram",
                "representative_case")
METRIC_NAMES = {"spearman_r": "Spearman R", "dice_high": "DSC high-functional", "dice_low": "DSC low-functional"}
FIGURE_DPI = 130


# --------------------------------------------------------------------------------------------------
# summary.json
# --------------------------------------------------------------------------------------------------


def summarise(frames: Mapping[str, pd.DataFrame], result: Mapping[str, Any], *, labels: Mapping[str, str],
              title: str, threshold: float) -> dict[str, Any]:
    """Every statistic of the evaluation as one dict (the content of summary.json, before NaN
    becomes null). ``frames`` holds a DataFrame per prediction set, "model" first."""
    model = frames["model"]
    summary: dict[str, Any] = {
        "title": title,
        "threshold": threshold,
        "labels": {name: labels[name] for name in frames},
        "n_patients": int(len(model)),
        "missing": list(result.get("missing") or []),
        "missing_folds": [int(k) for k in result.get("missing_folds") or []],
        "density_fit": result.get("density_fit"),
        "sets": {},
        "paired": {},
        "ceiling": None,
        "representative_case": (result.get("case") or {}).get("patient_id"),
    }
    for name, df in frames.items():
        summary["sets"][name] = {
            "label": labels[name],
            "summary": cohort_summary(df),
            "lobes": lobe_agreement(df),
            "institutions": institution_comparison(df),
            "tumour_size": tumour_size_association(df),
        }
    for name in ("baseline", "density"):
        if name in frames:
            summary["paired"][f"model_vs_{name}"] = {m: paired_comparison(model, frames[name], m) for m in METRICS}
    if "ceiling_r" in model.columns:
        both = model[["spearman_r", "ceiling_r"]].apply(pd.to_numeric, errors="coerce").dropna()
        ceiling = describe(both["ceiling_r"].to_numpy(float))
        # what share of the attainable correlation (truth vs SPECT) the model reaches
        ceiling["model_mean_r"] = float(both["spearman_r"].mean()) if len(both) else math.nan
        ceiling["fraction_of_ceiling"] = (ceiling["model_mean_r"] / ceiling["mean"]
                                          if len(both) and ceiling["mean"] != 0 else math.nan)
        summary["ceiling"] = ceiling
    return summary


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


def _paired_line(cmp: Mapping[str, Any], label_a: str, label_b: str) -> str:
    metric = METRIC_NAMES.get(cmp["metric"], cmp["metric"])
    text = (f"- **{label_a} vs {label_b}**, {metric} (n = {cmp['n']} patients): mean {_num(cmp['mean_a'])} vs "
            f"{_num(cmp['mean_b'])}, relative change {_percent(cmp['relative_change'])}, mean per-patient "
            f"difference {_num(cmp['mean_difference'])} ± {_num(cmp['sd_difference'])}; Wilcoxon signed-rank "
            f"p = {format_p(cmp['wilcoxon_p'])}, paired t-test p = {format_p(cmp['ttest_p'])}.")
    return text + (f" ({cmp['note']})" if cmp.get("note") else "")


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

    compared = [labels[n] for n in ("baseline", "density") if n in frames]
    lines += [f"{summary['n_patients']} patient(s) evaluated; {labels['model']} predictions"
              + (f", compared with {' and '.join(compared)}" if compared else "")
              + f". Functional volumes at the threshold {summary['threshold']} of the standardised perfusion.",
              ""]
    if summary["density_fit"]:
        lines += [f"The {labels.get('density', 'density baseline')} predicts perfusion from CT density and "
                  f"vertical position; fitted on: {summary['density_fit']}.", ""]

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
    if summary["ceiling"]:
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
    rows = [[region, str(lobes[region]["n"]), _num(lobes[region]["pearson_r"]), format_p(lobes[region]["pearson_p"]),
             _num(lobes[region]["spearman_rho"]), format_p(lobes[region]["spearman_p"]),
             _num(lobes[region]["mean_pred"]), _num(lobes[region]["mean_spect"]),
             _num(lobes[region]["mean_difference"]),
             *[_num(sets[n]["lobes"][region]["pearson_r"]) for n in others]] for region in regions]
    lines += _table(["region", "n", "Pearson r", "p", "Spearman rho", "p", "mean CT-based", "mean SPECT",
                     "mean difference", *[f"r, {labels[n]}" for n in others]], rows) + [""]
    _figure(lines, figure_files, "lobe_scatter", "Lobe means, SPECT vs CT-based")
    _figure(lines, figure_files, "lobe_histogram", "Histogram of lobe mean perfusion")

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


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: str | bytes) -> Path:
    """Write data to a temporary file beside path, then rename it onto path. (The temporary name
    is opened with ``open``, not ``mkstemp``, so that the file gets the user's umask, not 0600.)"""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _draw_figures(frames: Mapping[str, pd.DataFrame], case: Mapping[str, Any] | None,
                  labels: Mapping[str, str], threshold: float) -> dict[str, Any]:
    """The figures the data allow, by name (Figure objects, not yet saved)."""
    model = frames["model"]
    drawn: dict[str, Any] = {}
    for name, fig_name in (("baseline", "r_before_after"), ("density", "r_vs_density")):
        if name in frames and paired_comparison(model, frames[name])["n"]:
            drawn[fig_name] = figures.r_before_after(model, frames[name], (labels["model"], labels[name]))
    drawn["dice_histograms"] = figures.dice_histograms(model)
    if any(lobe_agreement(model)[lobe]["n"] for lobe in LOBES):
        drawn["lobe_scatter"] = figures.lobe_scatter(model)
        drawn["lobe_histogram"] = figures.lobe_histogram(model)
    if case is not None:
        drawn["representative_case"] = figures.representative_case(case, threshold=threshold)
    return drawn


def write_report(result: Mapping[str, Any], out_dir: str | Path, *, labels: Mapping[str, str] | None = None,
                 title: str = "ctpm evaluation", threshold: float = 0.66) -> dict[str, Path]:
    """Write the evaluation's files into out_dir (see the module docstring).

    Returns the written paths by name: "metrics", "baseline_metrics", "density_metrics",
    "summary", "report" and one per figure ("dice_histograms", ...). Files of these names left
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
        written[key] = _write_atomic(out / SET_FILES[name], df.to_csv(index=False))

    summary = summarise(frames, result, labels=labels, title=title, threshold=threshold)
    written["summary"] = _write_atomic(out / "summary.json",
                                       json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")

    figure_files: dict[str, Path] = {}
    for name, fig in _draw_figures(frames, result.get("case"), labels, threshold).items():
        buffer = io.BytesIO()
        try:
            fig.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
        finally:
            plt.close(fig)
        figure_files[name] = written[name] = _write_atomic(out / "figures" / f"{name}.png", buffer.getvalue())

    written["report"] = _write_atomic(out / "report.md", render_markdown(summary, frames, figure_files))

    stale = [out / f for f in SET_FILES.values()] + [out / "figures" / f"{n}.png" for n in FIGURE_NAMES]
    for path in stale:
        if path not in written.values():
            path.unlink(missing_ok=True)
    return written
