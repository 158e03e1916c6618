"""The model ablation: the paper's per-lung ARNN against each model option and their combination,
every variant the whole study of :mod:`ctpm.pipeline` (pretrain, K fine-tuned folds, the
pretrained-only predictions, ctpm-evaluate) on the same synthetic cohorts, over seeds.

    python -m ctpm.cli.ablation out=outputs/ablation            # conf/ablation.yaml
    python -m ctpm.cli.ablation 'variants=[paper,psf]' 'seeds=[0,1]'

Layout: ``out/seed<s>/data`` (the cohorts of that seed, synthesised once), ``out/seed<s>/cache``
(one preprocessing cache shared by every variant of the seed: entries are keyed by the
preprocessing's hash, so variants that preprocess alike share them) and ``out/seed<s>/<variant>``
(the variant's study folder: runs, summary.json, report.md). A variant is a list of ctpm-train
overrides (``conf/ablation.yaml``); finished stages are kept, so an interrupted ablation resumes.
``out/ablation.md`` gets the table (the README's ablation table is this file's).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctpm.data.io import atomic_write
from ctpm.errors import CtpmError
from ctpm.evaluation.stats import format_p
from ctpm.pipeline import Study, compose, evaluate, finetune, predict_pretrained, preprocess, pretrain, synthesise


@dataclass
class SharedCacheStudy(Study):
    """A study whose preprocessing cache lives outside its folder (shared by the variants)."""

    cache_dir: str | Path | None = None

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out) / "cache"


@dataclass
class Ablation:
    out: str | Path
    variants: Mapping[str, Sequence[str]]
    seeds: Sequence[int] = (0,)
    scale: str = "demo"
    folds: int = 3
    workers: int = 1
    train_overrides: Sequence[str] = ()
    synth: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    def study(self, seed: int, variant: str) -> SharedCacheStudy:
        root = Path(self.out) / f"seed{seed}"
        return SharedCacheStudy(root / variant, scale=self.scale, folds=self.folds, workers=self.workers,
                                train_overrides=[*self.train_overrides, f"seed={seed}", *self.variants[variant]],
                                manifest=root / "data" / "manifest.csv", cache_dir=root / "cache")


def n_parameters(study: Study) -> int:
    """Trainable parameters of the network the variant's training composes."""
    import hydra

    from ctpm.models import count_parameters

    cfg = compose("train", study.train_args("pretrain"))
    return count_parameters(hydra.utils.instantiate(cfg.model.net))


def run_variant(study: SharedCacheStudy) -> dict[str, Any]:
    """One variant's study (the cohorts already synthesised); returns its timing and size."""
    Path(study.out).mkdir(parents=True, exist_ok=True)
    timing_file = Path(study.out) / "ablation.json"
    done = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    preprocess(study)
    t0 = time.time()
    pretrain(study)
    t1 = time.time()
    finetune(study)
    t2 = time.time()
    predict_pretrained(study)
    evaluate(study)
    info = {"overrides": list(study.train_overrides), "parameters": n_parameters(study),
            # a stage kept from an earlier run takes ~0 s here: keep the time it was measured with
            "pretrain_s": done.get("pretrain_s") if t1 - t0 < 5 and done else t1 - t0,
            "finetune_s": done.get("finetune_s") if t2 - t1 < 5 and done else t2 - t1}
    atomic_write(timing_file, json.dumps(info, indent=1))
    return info


def run_ablation(ab: Ablation) -> Path:
    """Every seed x variant, then the table (out/ablation.md, returned)."""
    for seed in ab.seeds:
        root = Path(ab.out) / f"seed{seed}"
        synthesise(Study(root, workers=ab.workers), **{**dict(ab.synth), "seed": int(seed)})
        for variant in ab.variants:
            print(f"\n=== ablation: seed {seed}, variant {variant} ===", flush=True)
            run_variant(ab.study(seed, variant))
    return write_table(ab)


# ---- the table ----

def _ci(entry: Mapping[str, Any] | None, key: str = "estimate") -> tuple[float, float, float]:
    if not entry:
        return (math.nan, math.nan, math.nan)
    get = lambda k: math.nan if entry.get(k) is None else float(entry[k])  # noqa: E731
    return get(key) if key in entry else get("mean"), get("low"), get("high")


def _fmt(v: tuple[float, float, float] | float, digits: int = 2) -> str:
    if isinstance(v, tuple):
        m, lo, hi = v
        if not math.isfinite(m):
            return "n/a"
        if math.isfinite(lo) and math.isfinite(hi):
            return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
        return f"{m:.{digits}f}"
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


LOBES = ("LUL", "LLL", "RUL", "RML", "RLL")

# The targets at demo scale (a row meets one when its point estimate does; the interval is
# printed beside it so a reader sees whether the data show it).
TARGETS = {
    "interior R margin over geometry >= 0.25": lambda r: r["margin interior R over geometry"][0] >= 0.25,
    "lobe r above density in all 5 lobes": lambda r: r["lobes above density"][0] == len(LOBES),
    "defect sensitivity and precision >= 0.7": lambda r: min(r["defect sensitivity"][0], r["defect precision"][0]) >= 0.7,
    "fine-tuned > pretrained (R, interval excludes 0)": lambda r: r["fine-tuned - pretrained R"][1] > 0,
}


def variant_row(folder: Path) -> dict[str, Any]:
    """The numbers of one variant's study folder (summary.json of ctpm-evaluate, ablation.json)."""
    summary = json.loads((folder / "summary.json").read_text())
    info = json.loads((folder / "ablation.json").read_text()) if (folder / "ablation.json").is_file() else {}
    model = summary["sets"]["model"]
    metrics = model["summary"]["metrics"]
    head = (summary.get("headline") or {}).get("metrics", {})
    paired = summary.get("paired", {}).get("model_vs_baseline", {})
    lobes = model.get("lobes") or {}
    density_lobes = (summary["sets"].get("density") or {}).get("lobes") or {}
    lobe_r, density_r = {}, {}
    for out, table in ((lobe_r, lobes), (density_r, density_lobes)):
        for name, entry in (table.items() if isinstance(table, Mapping) else []):
            if isinstance(entry, Mapping) and "pearson_r" in entry:
                out[name] = (float(entry["pearson_r"] if entry["pearson_r"] is not None else math.nan),
                             float(entry.get("pearson_ci_low") or math.nan),
                             float(entry.get("pearson_ci_high") or math.nan))
    # r(model) - r(density) per lobe, paired bootstrap over the patients (ctpm-evaluate's lobe margins)
    vs_density = {k: _ci(v) for k, v in (summary.get("lobe_margins", {}).get("model_vs_density") or {}).items()}
    above = [k for k in LOBES if k in vs_density and vs_density[k][0] > 0]
    shown = [k for k in above if vs_density[k][1] > 0]
    defects = summary.get("defects", {}).get("model", {})
    return {
        "R": _ci(metrics.get("spearman_r", {}).get("ci")),
        "interior R": _ci(metrics.get("spearman_r_interior", {}).get("ci")),
        "margin R over geometry": _ci(head.get("spearman_r", {}).get("margin")),
        "margin interior R over geometry": _ci(head.get("spearman_r_interior", {}).get("margin")),
        "mean lobe r": _ci(model.get("mean_lobe_r")),
        "lobe r": lobe_r,
        "density lobe r": density_r,
        "lobe r - density": vs_density,
        # lobes where the model's r is above the density baseline's, and where the interval shows it
        "lobes above density": (len(above), len(shown)),
        "DSC high": _ci(metrics.get("dice_high", {}).get("ci")),
        "DSC low": _ci(metrics.get("dice_low", {}).get("ci")),
        "defect sensitivity": _ci(metrics.get("defect_sensitivity", {}).get("ci")),
        "defect precision": _ci(metrics.get("defect_precision", {}).get("ci")),
        "pooled defect sensitivity": float(defects.get("pooled_sensitivity") or math.nan),
        "pooled defect precision": float(defects.get("pooled_precision") or math.nan),
        "fine-tuned - pretrained R": _ci((paired.get("spearman_r") or {}).get("ci")),
        "p (Wilcoxon)": float((paired.get("spearman_r") or {}).get("wilcoxon_p") or math.nan),
        "parameters": info.get("parameters"),
        "train min": ((info.get("pretrain_s") or 0) + (info.get("finetune_s") or 0)) / 60 if info else math.nan,
    }


COLUMNS = ("R", "interior R", "margin R over geometry", "margin interior R over geometry", "mean lobe r",
           "lobes above density", "DSC high", "DSC low", "defect sensitivity", "defect precision",
           "fine-tuned - pretrained R", "p (Wilcoxon)", "parameters", "train min")

# the point estimates averaged across seeds (mean ± SD) when the ablation has more than one
SEED_COLUMNS = ("R", "interior R", "margin R over geometry", "margin interior R over geometry", "mean lobe r",
                "DSC high", "DSC low", "defect sensitivity", "defect precision", "fine-tuned - pretrained R")


def _cell(column: str, v: Any) -> str:
    if column == "parameters":
        return f"{v / 1e6:.2f} M" if v else "n/a"
    if column == "p (Wilcoxon)":
        return format_p(v)
    if column == "train min":
        return _fmt(v, 1)
    if column == "lobes above density":
        return f"{v[0]} of {len(LOBES)} ({v[1]} shown)"
    return _fmt(v)


def write_table(ab: Ablation) -> Path:
    """out/ablation.md: a row per seed and variant (those not yet evaluated are listed after it),
    the targets each row meets, the lobe r of every row beside the density baseline's, and, over
    several seeds, the mean ± SD across seeds of every variant."""
    lines = ["| seed | variant | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    target_lines = ["| seed | variant | " + " | ".join(TARGETS) + " |", "|" + "---|" * (len(TARGETS) + 2)]
    lobe_lines: list[str] = []
    missing: list[str] = []
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in ab.variants}
    for seed in ab.seeds:
        for variant in ab.variants:
            folder = Path(ab.out) / f"seed{seed}" / variant
            if not (folder / "summary.json").is_file():
                missing.append(f"seed {seed} {variant}")
                continue
            row = variant_row(folder)
            rows[variant].append(row)
            lines.append(f"| {seed} | {variant} | " + " | ".join(_cell(c, row[c]) for c in COLUMNS) + " |")
            target_lines.append(f"| {seed} | {variant} | "
                                + " | ".join("yes" if ok(row) else "no" for ok in TARGETS.values()) + " |")
            if row["lobe r"]:
                parts = []
                for k, v in row["lobe r"].items():
                    d, diff = row["density lobe r"].get(k), row["lobe r - density"].get(k)
                    parts.append(f"{k} {_fmt(v)}" + (f" vs density {_fmt(d[0])}" if d else "")
                                 + (f" (difference {_fmt(diff)}{' †' if diff[1] <= 0 <= diff[2] else ''})"
                                    if diff else ""))
                lobe_lines.append(f"- seed {seed}, {variant}: " + "; ".join(parts))
    text = "\n".join(lines) + "\n"
    if missing:
        text += "\nNot run (no summary.json yet): " + ", ".join(missing) + ".\n"
    text += ("\nTargets met (point estimate; the intervals are in the table above; *shown*: lobes whose "
             "interval of r(model) - r(density) excludes 0):\n\n" + "\n".join(target_lines) + "\n")
    if lobe_lines:
        text += ("\nLobe-mean r across patients (fine-tuned vs SPECT, 95 % Fisher-z interval) beside the density "
                 "baseline's, and their difference (paired bootstrap; † the interval includes 0):\n\n"
                 + "\n".join(lobe_lines) + "\n")
    if len(ab.seeds) > 1:
        seed_lines = ["| variant | seeds | " + " | ".join(SEED_COLUMNS) + " |", "|" + "---|" * (len(SEED_COLUMNS) + 2)]
        for variant, got in rows.items():
            if not got:
                continue
            cells = []
            for c in SEED_COLUMNS:
                v = np.array([r[c][0] for r in got], dtype=float)
                v = v[np.isfinite(v)]
                cells.append("n/a" if not v.size else f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if v.size > 1 else ""))
            seed_lines.append(f"| {variant} | {len(got)} | " + " | ".join(cells) + " |")
        text += "\nMean ± SD across seeds (of each seed's point estimate):\n\n" + "\n".join(seed_lines) + "\n"
    path = Path(ab.out) / "ablation.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    print(text)
    return path


def from_config(cfg: Mapping[str, Any]) -> Ablation:
    variants_all = {str(k): [str(o) for o in (v or [])] for k, v in dict(cfg["variant_overrides"]).items()}
    chosen = [str(v) for v in cfg["variants"]]
    unknown = [v for v in chosen if v not in variants_all]
    if unknown:
        raise CtpmError(f"unknown ablation variant(s) {', '.join(unknown)}; known: {', '.join(variants_all)}")
    return Ablation(cfg["out"], {v: variants_all[v] for v in chosen}, seeds=[int(s) for s in cfg["seeds"]],
                    scale=str(cfg["train_scale"]), folds=int(cfg["folds"]), workers=int(cfg["workers"]),
                    train_overrides=[str(o) for o in cfg.get("train_overrides") or []], synth=dict(cfg["synth"]))
