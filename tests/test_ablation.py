"""The ablation's config and layout: every variant composes as a ctpm-train job, the variants of a
seed share the cohorts and the preprocessing cache, unknown variants are refused."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from ctpm.ablation import from_config
from ctpm.data.cache import PreprocessCache
from ctpm.errors import CtpmError
from ctpm.pipeline import cache_hash, compose, training_preprocessing


def ablation_cfg(*overrides: str) -> dict:
    return OmegaConf.to_container(compose("ablation", list(overrides)), resolve=True)


def test_every_variant_composes_and_builds_its_network(tmp_path):
    ab = from_config(ablation_cfg(f"out={tmp_path}"))
    assert "paper" in ab.variants and "combination" in ab.variants
    nets = {}
    for variant in ab.variants:
        study = ab.study(0, variant)
        cfg = compose("train", study.train_args("pretrain"))
        thorax = variant == "thorax"
        assert cfg.data.preprocessing.roi_mode == ("thorax" if thorax else "lung")
        assert cfg.seed == 0 and list(cfg.data.preprocessing.roi_size) == ([64, 48, 64] if thorax else [64, 32, 32])  # demo
        nets[variant] = type(hydra.utils.instantiate(cfg.model.net)).__name__
        if variant == "psf":
            assert cfg.model.psf.enabled
        if variant == "context":  # four context channels after the CT
            assert len(cfg.data.preprocessing.context_channels) == 4 and cfg.model.net.in_channels == 5
        if variant == "combination":
            assert cfg.model.net.norm == "batch" and cfg.model.psf.enabled and cfg.model.mean_weight > 0
    assert nets["paper"] == "ARNN" and nets["dynunet"] == "DynUNet" and nets["swinunetr"] == "SwinUNETR"
    net = hydra.utils.instantiate(compose("train", ab.study(0, "segresnet").train_args("pretrain")).model.net)
    x = torch.zeros(1, 1, 64, 32, 32)
    assert net(x, torch.ones_like(x)).shape == x.shape
    net = hydra.utils.instantiate(compose("train", ab.study(0, "thorax").train_args("pretrain")).model.net)
    x = torch.zeros(1, 1, 64, 48, 64)  # the demo ARNN takes the thorax's ROI (divisible by 2 ** (depth - 1))
    assert nets["thorax"] == "ARNN" and net(x, torch.ones_like(x)).shape == x.shape


def test_variants_of_a_seed_share_cohorts_and_cache(tmp_path):
    ab = from_config(ablation_cfg(f"out={tmp_path}", "variants=[paper,psf]", "seeds=[3]"))
    a, b = ab.study(3, "paper"), ab.study(3, "psf")
    assert a.out != b.out and a.manifest == b.manifest == tmp_path / "seed3" / "data" / "manifest.csv"
    assert a.cache == b.cache == tmp_path / "seed3" / "cache"
    assert "seed=3" in a.train_args("pretrain") and f"paths.cache_dir={a.cache}" in a.train_args("pretrain")
    # the loss options do not change the preprocessing: one cache entry serves both
    assert training_preprocessing(a) == training_preprocessing(b)


def test_the_thorax_variant_has_its_own_entries_in_the_shared_cache(tmp_path):
    """Same cache folder as the other variants of the seed, another preprocessing hash: entries
    are keyed by it (DIR/<patient>/<hash>/), so the per-lung entries are never read for it."""
    ab = from_config(ablation_cfg(f"out={tmp_path}", "variants=[paper,thorax]"))
    paper, thorax = ab.study(0, "paper"), ab.study(0, "thorax")
    assert paper.cache == thorax.cache
    prep = training_preprocessing(thorax)
    assert prep["roi_mode"] == "thorax" and cache_hash(prep) != cache_hash(training_preprocessing(paper))
    assert PreprocessCache(thorax.cache, prep).entry_dir("P") != PreprocessCache(paper.cache, training_preprocessing(paper)).entry_dir("P")


def test_an_unknown_variant_is_refused():
    with pytest.raises(CtpmError, match="unknown ablation variant"):
        from_config(ablation_cfg("variants=[paper,bigger]"))


def _summary(interior_margin: float, lobe_margins: list[float], sens: float, prec: float,
             ft_pt: tuple[float, float, float], r: float = 0.8) -> dict:
    """The parts of a ctpm-evaluate summary.json the ablation table reads, with given numbers."""
    ci = lambda e, lo=None, hi=None: {"estimate": e, "low": e - 0.05 if lo is None else lo,  # noqa: E731
                                      "high": e + 0.05 if hi is None else hi}
    lobes = ("LUL", "LLL", "RUL", "RML", "RLL")
    metrics = {"spearman_r": {"ci": ci(r)}, "spearman_r_interior": {"ci": ci(0.5)}, "dice_high": {"ci": ci(0.85)},
               "dice_low": {"ci": ci(0.8)}, "defect_sensitivity": {"ci": ci(sens)},
               "defect_precision": {"ci": ci(prec)}}
    return {"sets": {"model": {"summary": {"metrics": metrics}, "mean_lobe_r": ci(0.3),
                               "lobes": {k: {"pearson_r": 0.5, "pearson_ci_low": 0.1, "pearson_ci_high": 0.8} for k in lobes}},
                     "density": {"lobes": {k: {"pearson_r": 0.5 - m} for k, m in zip(lobes, lobe_margins)}}},
            "headline": {"metrics": {"spearman_r": {"margin": ci(0.07)},
                                     "spearman_r_interior": {"margin": ci(interior_margin)}}},
            "lobe_margins": {"model_vs_density": {k: ci(m, m - 0.1, m + 0.1) for k, m in zip(lobes, lobe_margins)}},
            "paired": {"model_vs_baseline": {"spearman_r": {"ci": ci(*ft_pt), "wilcoxon_p": 0.01}}},
            "defects": {"model": {"pooled_sensitivity": sens, "pooled_precision": prec}}}


def test_the_table_states_each_target_and_the_mean_across_seeds(tmp_path):
    """Targets are judged on the point estimates (intervals printed beside them); lobes above the
    density baseline are counted, and those whose interval shows it; seeds are averaged."""
    import json

    import numpy as np

    from ctpm.ablation import Ablation, write_table

    good = _summary(0.30, [0.2, 0.05, 0.3, 0.4, 0.5], 0.75, 0.72, (0.02, 0.01, 0.03), r=0.82)
    poor = _summary(0.10, [0.2, -0.3, 0.3, 0.4, 0.5], 0.75, 0.65, (0.02, -0.01, 0.05), r=0.78)
    for seed, (paper, best) in enumerate([(poor, good), (poor, poor)]):
        for name, summary in (("paper", paper), ("best", best)):
            (tmp_path / f"seed{seed}" / name).mkdir(parents=True)
            (tmp_path / f"seed{seed}" / name / "summary.json").write_text(json.dumps(summary))
    text = write_table(Ablation(tmp_path, {"paper": [], "best": [], "never": []}, seeds=[0, 1])).read_text()
    lines = text.splitlines()
    assert "| 0 | best | yes | yes | yes | yes |" in lines
    assert "| 0 | paper | no | no | no | no |" in lines
    assert any(line.startswith("| 0 | best |") and "5 of 5 (4 shown)" in line for line in lines)  # 0.05 - 0.1 < 0
    assert any(line.startswith("| 1 | paper |") and "4 of 5 (4 shown)" in line for line in lines)
    assert "Not run (no summary.json yet): seed 0 never, seed 1 never." in text and "| 0 | never |" not in text
    # mean ± SD across the seeds of each point estimate (best: R 0.82 and 0.78)
    row = next(line for line in lines if line.startswith("| best | 2 |"))
    r = np.array([0.82, 0.78])
    assert row.split(" | ")[2] == f"{r.mean():.3f} ± {r.std(ddof=1):.3f}"
    assert "LLL 0.50 [0.10, 0.80] vs density 0.80 (difference -0.30 [-0.40, -0.20])" in text


def test_table_only_writes_the_table_of_what_ran_and_runs_nothing(tmp_path):
    import json

    from ctpm.cli.ablation import run

    (tmp_path / "seed0" / "paper").mkdir(parents=True)
    (tmp_path / "seed0" / "paper" / "summary.json").write_text(
        json.dumps(_summary(0.2, [0.1] * 5, 0.8, 0.8, (0.01, 0.0, 0.02))))
    cfg = compose("ablation", [f"out={tmp_path}", "table_only=true", "variants=[paper,thorax]", "seeds=[0]"])
    text = run(cfg).read_text()
    assert "| 0 | paper |" in text and "Not run (no summary.json yet): seed 0 thorax." in text
    assert sorted(p.name for p in (tmp_path / "seed0").iterdir()) == ["paper"]  # no cohort, no cache
