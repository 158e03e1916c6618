"""The cluster paths: the SLURM launcher config, a real multirun through submitit's local
executor, wandb names and ids, the wandb sweep command, pruning and DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctpm.pipeline import compose
from tests.helpers import run_cli, tiny_overrides


def _without_output_dir(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("paths.output_dir")]


# --------------------------------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------------------------------


def test_slurm_launcher_composes_with_the_submitit_plugin():
    """hydra/launcher=slurm extends the plugin's submitit_slurm (no self-include), one task per GPU."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'ctpm[slurm]'")
    cfg = compose("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2", "trainer.num_nodes=3"],
                  return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 2 and launcher.tasks_per_node == 2 and launcher.nodes == 3
    assert launcher.timeout_min == 720 and launcher.cpus_per_task == 8 and launcher.mem_gb == 64
    assert launcher.signal_delay_s == 120  # a field of the plugin's own config: the defaults extend it
    single = compose("train", ["hydra/launcher=slurm", "trainer=gpu"], return_hydra_config=True).hydra.launcher
    assert single.gpus_per_node == 1 and single.tasks_per_node == 1 and single.nodes == 1


def test_a_two_fold_multirun_completes_through_submitit(tiny_cohort, cache_copy, tmp_path):
    """The submitit launcher for real (its local executor: the same pickled job a SLURM node runs)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'ctpm[slurm]'")
    sweep = tmp_path / "sweep"
    res = run_cli("ctpm-train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                  "experiment=finetune", "model.init_from=null", "data.n_folds=2", "data.fold=0,1",
                  f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${data.fold}", "test=false",
                  *_without_output_dir(tiny_overrides(tiny_cohort, cache_copy, tmp_path)))
    assert res.returncode == 0, res.stderr[-3000:]
    splits = json.loads((cache_copy / "splits.json").read_text())
    for k in (0, 1):
        assert (sweep / str(k) / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((sweep / str(k) / "job.json").read_text())["fold"] == k
        got = sorted(p.name for p in (sweep / str(k) / "predictions").glob("*.nii.gz"))
        assert got == sorted(f"{pid}.nii.gz" for pid in splits["folds"][k]["test"])
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # it went through submitit
