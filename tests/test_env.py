"""ctpm-env runs without a GPU and reports what a bug report needs."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.helpers import BIN


def test_ctpm_env_without_gpu(tmp_path):
    weights = tmp_path / "R231.pth"
    weights.write_bytes(b"\0" * 2048)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "CTPM_LUNGMASK_WEIGHTS": str(weights)}
    res = subprocess.run([str(BIN / "ctpm-env")], capture_output=True, text=True, timeout=120, check=False, env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for head in ("== Versions ==", "== Devices ==", "== Optional backends ==", "== Machine =="):
        assert head in out
    assert f"torch                    {torch.__version__}" in out
    assert "no GPU" in out
    assert f"CTPM_LUNGMASK_WEIGHTS={weights} (present" in out
    for name in ("MONAI", "Lightning", "Hydra", "wandb", "pydicom", "optuna", "hydra-submitit-launcher", "TotalSegmentator"):
        assert name in out
    missing = subprocess.run([sys.executable, "-m", "ctpm.env"], capture_output=True, text=True, timeout=120, check=False,
                             env={**env, "CTPM_LUNGMASK_WEIGHTS": str(tmp_path / "none.pth")})
    assert missing.returncode == 0 and "MISSING" in missing.stdout
