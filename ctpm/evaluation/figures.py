"""Figures (matplotlib, PNG): the paper's Figure 2-5 and the training panel."""

from __future__ import annotations

# No backend is forced here: headless processes fall back to Agg by themselves, and notebooks
# keep their inline backend so that these figures show there.
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ctpm.evaluation.stats import (
    LOBES,
    format_p,
    includes_zero,
    lobe_agreement,
    paired_comparison,
)


def slice_panel(ct: np.ndarray, spect: np.ndarray, pred: np.ndarray, *, title: str | None = None):
    """CT, SPECT and prediction of one lung ROI (D, H, W = S-I, A-P, L-R): the coronal slice
    through the middle of the A-P axis, superior up."""
    j = ct.shape[1] // 2
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 4.2))
    for ax, img, name, cmap, vr in (
        (axes[0], ct, "CT (enhanced)", "gray", (0, 1)),
        (axes[1], spect, "SPECT", "inferno", (0, 1)),
        (axes[2], pred, "prediction", "inferno", (0, 1)),
    ):
        ax.imshow(img[::-1, j, :], cmap=cmap, vmin=vr[0], vmax=vr[1], aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# The multi-level evaluation (paper Figs. 2-4), drawn from the per-patient rows of ``evaluate``
# --------------------------------------------------------------------------------------------------

#: Lung window for CT display (HU): level -600, width 1500.
CT_WINDOW = (-1350.0, 150.0)
PERFUSION_CMAP = "inferno"
#: Colours of the high / low functional volumes and of the SPECT line, on the grey CT.
HIGH_COLOUR, LOW_COLOUR, SPECT_LINE_COLOUR = "#2ca02c", "#1f77b4", "white"


def r_before_after(df_model, df_baseline, labels=("fine-tuned", "pretrained only"), metric="spearman_r"):
    """Fig. 2A: per-patient voxel-wise R of two prediction sets on the same patients. The baseline
    ("before") stands left, the model ("after") right; a grey line joins the two values of a
    patient, boxes give the spread, and mean ± SD, relative change and the paired p are written in."""
    joined = df_baseline[["patient_id", metric]].merge(df_model[["patient_id", metric]], on="patient_id",
                                                       suffixes=("_b", "_a")).dropna()
    before, after = joined[f"{metric}_b"].to_numpy(float), joined[f"{metric}_a"].to_numpy(float)
    cmp = paired_comparison(df_model, df_baseline, metric)
    label_model, label_baseline = labels
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    ax.boxplot([before, after], positions=[0, 1], widths=0.35, showfliers=False,
               medianprops={"color": "black"}, boxprops={"color": "0.5"}, whiskerprops={"color": "0.5"},
               capprops={"color": "0.5"})
    for b, a in zip(before, after):
        ax.plot([0, 1], [b, a], color="0.6", lw=0.8, zorder=1)
    ax.scatter(np.zeros_like(before), before, s=14, color="tab:orange", zorder=2)
    ax.scatter(np.ones_like(after), after, s=14, color="tab:blue", zorder=2)
    for x, v in ((0, before), (1, after)):
        if v.size:
            sd = f" ± {v.std(ddof=1):.4f}" if v.size > 1 else ""
            ax.annotate(f"{v.mean():.4f}{sd}", (x, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(0, -12), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks([0, 1], [label_baseline, label_model])
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylabel("voxel-wise Spearman R" if metric == "spearman_r" else metric)
    change = f"{100 * cmp['relative_change']:+.2f}%" if np.isfinite(cmp["relative_change"]) else "n/a"
    ax.set_title(f"{label_model} vs {label_baseline} (n = {cmp['n']})\n"
                 f"change {change}, Wilcoxon p = {format_p(cmp['wilcoxon_p'])}", fontsize=9)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.12 * (hi - lo))  # room for the means written at the top
    fig.tight_layout()
    return fig


PAIRED_DOT_METRICS = (("spearman_r", "Spearman R"), ("spearman_r_interior", "interior Spearman R"),
                      ("dice_low", "DSC low-functional"))


def paired_dots(df_model, df_reference, labels=("fine-tuned", "geometry prior"), metrics=PAIRED_DOT_METRICS,
                bootstrap=None):
    """Per patient, a set's metric beside a reference's (e.g. the geometry prior), one panel per
    metric the rows have: the reference's dot left, the model's right, a line joining a patient's
    two, green where the model is better and red where worse; the title gives the mean paired
    difference with its bootstrap interval (marked when the interval includes zero)."""
    label_model, label_ref = labels
    present = [(c, name) for c, name in metrics if c in df_model.columns and c in df_reference.columns]
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(3.3 * max(len(present), 1), 4.2), squeeze=False)
    for ax, (column, name) in zip(axes[0], present):
        joined = df_reference[["patient_id", column]].merge(df_model[["patient_id", column]], on="patient_id",
                                                             suffixes=("_r", "_m")).dropna()
        ref, mod = joined[f"{column}_r"].to_numpy(float), joined[f"{column}_m"].to_numpy(float)
        for r, m in zip(ref, mod):
            ax.plot([0, 1], [r, m], color="tab:green" if m > r else "tab:red", lw=0.8, alpha=0.7, zorder=1)
        ax.scatter(np.zeros_like(ref), ref, s=14, color="tab:orange", zorder=2)
        ax.scatter(np.ones_like(mod), mod, s=14, color="tab:blue", zorder=2)
        cmp = paired_comparison(df_model, df_reference, column, bootstrap)
        ci = cmp["ci"]
        if np.isfinite(ci.get("low", np.nan)):
            delta = (f"Δ {ci['estimate']:+.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
                     + (" †" if includes_zero(ci) else ""))
        else:
            delta = f"Δ {cmp['mean_difference']:+.3f}" if np.isfinite(cmp["mean_difference"]) else "Δ n/a"
        ax.set_title(f"{name} (n = {cmp['n']})\n{delta}", fontsize=9)
        ax.set_xticks([0, 1], [label_ref, label_model], fontsize=8)
        ax.set_xlim(-0.4, 1.4)
    if not present:
        axes[0, 0].set_axis_off()
    fig.suptitle(f"{label_model} vs {label_ref}, per patient (†: 95 % interval includes 0)", fontsize=9)
    fig.tight_layout()
    return fig


def lobe_intervals(frames, regions=LOBES):
    """The lobe-wise Pearson r across patients of each set (``{label: rows}``) with its 95 %
    interval by Fisher's z, one row per lobe, the sets side by side (a forest plot)."""
    names = list(frames)
    fig, ax = plt.subplots(figsize=(6.2, 1.2 + 0.16 * len(regions) * max(len(names), 2)))
    colours = plt.get_cmap("tab10")
    step = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        agreement = lobe_agreement(frames[name])
        ys, rs, lows, highs = [], [], [], []
        for i, region in enumerate(regions):
            a = agreement[region]
            if np.isfinite(a["pearson_r"]):
                y = i - 0.4 + step * (k + 0.5)
                ys.append(y)
                rs.append(a["pearson_r"])
                lo, hi = a["pearson_ci_low"], a["pearson_ci_high"]
                lows.append(a["pearson_r"] - lo if np.isfinite(lo) else 0.0)
                highs.append(hi - a["pearson_r"] if np.isfinite(hi) else 0.0)
        if ys:
            ax.errorbar(rs, ys, xerr=[lows, highs], fmt="o", ms=4, capsize=2, color=colours(k % 10), label=name)
    ax.axvline(0, color="0.5", lw=0.8, ls="--")
    ax.set_yticks(range(len(regions)), regions)
    ax.invert_yaxis()
    ax.set_xlim(-1.02, 1.02)
    ax.set_xlabel("Pearson r of lobe means with the SPECT's, across patients (95 % CI, Fisher z)", fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def dice_histograms(df, levels=(0.7, 0.8)):
    """Fig. 2B: histograms of the Dice of the high and of the low functional volumes, with the
    0.7 / 0.8 levels the paper counts patients above."""
    columns = (("dice_high", "high-functional volume (HFV)"), ("dice_low", "low-functional volume (LFV)"))
    values = [df[c].dropna().to_numpy(float) if c in df.columns else np.array([]) for c, _ in columns]
    pooled = np.concatenate(values)
    # bins of 0.025 from just below the smallest DSC (or 0.5) to 1, shared by both panels
    start = min(0.5, np.floor(pooled.min() * 40) / 40) if pooled.size else 0.5
    bins = np.arange(start, 1.0 + 1e-9, 0.025)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
    for ax, (column, name), v, colour in zip(axes, columns, values, ("tab:green", "tab:blue")):
        ax.hist(v, bins=bins, color=colour, alpha=0.8, edgecolor="white")
        for level, style in zip(levels, ("--", ":")):
            ax.axvline(level, color="black", ls=style, lw=1,
                       label=f"> {level}: {int((v > level).sum())} of {v.size}")
        mean = f"mean {v.mean():.4f}" + (f" ± {v.std(ddof=1):.4f}" if v.size > 1 else "") if v.size else "no data"
        ax.set_title(f"{name}\n{mean}", fontsize=9)
        ax.set_xlabel("DSC")
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("patients")
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def lobe_scatter(df):
    """Fig. 4A, B: per lobe, the mean perfusion of each patient, SPECT (x) against CT-based (y),
    with the identity line and the Pearson r across patients in the title. Top row: the left lung
    (LUL, LLL); bottom row: the right lung (RUL, RML, RLL)."""
    agreement = lobe_agreement(df)
    fig, axes = plt.subplots(2, 3, figsize=(9, 6.2))
    axes[0, 2].set_visible(False)
    panels = zip((axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1], axes[1, 2]), LOBES)
    for ax, lobe in panels:
        pred_col, spect_col = f"mean_pred_{lobe}", f"mean_spect_{lobe}"
        pairs = df[[spect_col, pred_col]].dropna() if {pred_col, spect_col} <= set(df.columns) else None
        ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls="--")
        if pairs is not None and len(pairs):
            ax.scatter(pairs[spect_col], pairs[pred_col], s=16, color="tab:blue")
        a = agreement[lobe]
        r = f"r = {a['pearson_r']:.4f}" if np.isfinite(a["pearson_r"]) else "r n/a"
        ax.set_title(f"{lobe}: {r} (n = {a['n']})", fontsize=9)
        ax.set_xlim(-0.02, 1.02)  # a margin, so that points at 0 or 1 are not cut in half
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("SPECT mean perfusion", fontsize=8)
        ax.set_ylabel("CT-based mean perfusion", fontsize=8)
    fig.tight_layout()
    return fig


def lobe_histogram(df, n_bins=20):
    """Fig. 4C: histogram of the mean perfusion of every lobe of every patient, SPECT against
    CT-based, in n_bins bins over [0, 1]."""
    bins = np.linspace(0, 1, n_bins + 1)

    def pooled(kind):
        cols = [f"mean_{kind}_{lobe}" for lobe in LOBES if f"mean_{kind}_{lobe}" in df.columns]
        return df[cols].to_numpy(float).ravel() if cols else np.array([])

    spect, pred = pooled("spect"), pooled("pred")
    spect, pred = spect[np.isfinite(spect)], pred[np.isfinite(pred)]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.hist(spect, bins=bins, histtype="stepfilled", alpha=0.35, color="tab:orange", label=f"SPECT (n = {spect.size})")
    ax.hist(pred, bins=bins, histtype="step", lw=1.6, color="tab:blue", label=f"CT-based (n = {pred.size})")
    ax.set_xlabel("mean relative perfusion of a lobe")
    ax.set_ylabel("lobes")
    ax.set_xlim(bins[0], bins[-1])
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _display(slice2d: np.ndarray) -> np.ndarray:
    """A RAS-ordered slice ([x, y], [x, z] or [y, z]) as an image: the second axis upward
    (anterior in axial, superior in coronal and sagittal) and the first decreasing to the right,
    which puts the patient's right on the image's left (axial, coronal) and anterior on the left
    (sagittal)."""
    return np.asarray(slice2d).T[::-1, ::-1]


def representative_case(case, threshold=0.66):
    """Fig. 3: one patient, rows CT / SPECT / CT-based prediction / functional volumes, columns
    axial / coronal / sagittal at the centre of the lungs. Perfusion is shown inside the
    evaluation mask; the last row fills the predicted high (>= threshold) and low (< threshold)
    functional volumes on the CT and draws the SPECT's high/low border as a white line, so that
    their overlap (the DSC) can be seen. Pixels keep their physical aspect ratio."""
    sx, sy, sz = (float(s) for s in case["spacing"])
    views = (("axial", sy / sx), ("coronal", sz / sx), ("sagittal", sz / sy))  # row mm / column mm
    # columns as wide as the slices are in mm, rows as tall as the tallest slice, so that no view
    # is shrunk to fit the others' boxes
    widths = [case["ct"][v].shape[0] * (sx if v != "sagittal" else sy) for v, _ in views]
    heights = [case["ct"][v].shape[1] * (sy if v == "axial" else sz) for v, _ in views]
    width_in = 8.0
    row_in = width_in * max(heights) / sum(widths)
    fig, axes = plt.subplots(4, 3, figsize=(width_in + 1.2, 4 * row_in + 1.4), width_ratios=widths,
                             layout="constrained")
    perfusion_cmap = plt.get_cmap(PERFUSION_CMAP).with_extremes(bad="black")  # outside the mask
    for col, (view, aspect) in enumerate(views):
        ct = _display(case["ct"][view])
        mask = _display(case["mask"][view]) > 0
        spect, pred = _display(case["spect"][view]), _display(case["pred"][view])
        axes[0, col].imshow(ct, cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=aspect)
        for row, img in ((1, spect), (2, pred)):
            im = axes[row, col].imshow(np.ma.masked_where(~mask, img), cmap=perfusion_cmap, vmin=0, vmax=1,
                                       aspect=aspect)
        ax = axes[3, col]
        ax.imshow(ct, cmap="gray", vmin=CT_WINDOW[0], vmax=CT_WINDOW[1], aspect=aspect)
        volumes = np.zeros(ct.shape + (4,))
        volumes[mask & (pred >= threshold)] = to_rgba(HIGH_COLOUR, 0.55)
        volumes[mask & (pred < threshold)] = to_rgba(LOW_COLOUR, 0.55)
        ax.imshow(volumes, aspect=aspect)
        if (mask & (spect >= threshold)).any() and (mask & (spect < threshold)).any():
            ax.contour(np.where(mask, spect, np.nan), levels=[threshold], colors=SPECT_LINE_COLOUR, linewidths=0.8)
        axes[0, col].set_title(view, fontsize=10)
    for row, name in enumerate(("CT", "SPECT", "CT-based", "functional volumes")):
        axes[row, 0].set_ylabel(name, fontsize=10)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[1:3, -1].tolist(), shrink=0.8, label="relative perfusion")
    handles = [Patch(color=HIGH_COLOUR, alpha=0.55, label=f"predicted high (>= {threshold})"),
               Patch(color=LOW_COLOUR, alpha=0.55, label=f"predicted low (< {threshold})"),
               Line2D([], [], color="0.3", lw=1, label="SPECT high/low border (white)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"patient {case['patient_id']} (axial, coronal: patient right on image left)", fontsize=10)
    return fig
