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
