"""Test helpers: compose the real configs for tiny, fast runs (as lightning-hydra-template's tests do)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from ctpm.cli._common import CONF_DIR

BIN = Path(sys.executable).parent


def tiny_overrides(manifest: Path, cache: Path, out: Path) -> list[str]:
    return [
        f"paths.manifest={manifest}",
        f"paths.cache_dir={cache}",
        f"paths.log_dir={out}",
        f"paths.output_dir={out}",
        "data.preprocessing.spacing=[4.0,4.0,4.0]",
        "data.preprocessing.roi_size=[32,16,16]",
        "data.batch_size=2",
        "model.net.base_channels=4",
        "model.net.depth=3",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "trainer.max_epochs=1",
        "data.progress=false",
    ]


def compose_train(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.output_dir  # already set by the overrides
    return cfg


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A ctpm console script in a subprocess (exit codes and messages as the user sees them)."""
    exe = BIN / args[0]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(exe), *args[1:]], capture_output=True, text=True, timeout=timeout, env=env)
