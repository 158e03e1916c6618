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


# --------------------------------------------------------------------------------------------------
# wandb
# --------------------------------------------------------------------------------------------------


def _wandb_init(objects) -> dict:
    (logger,) = [lg for lg in objects["loggers"] if type(lg).__name__ == "WandbLogger"]
    return logger._wandb_init


def test_wandb_runs_are_named_per_stage_and_fold_and_a_resume_keeps_the_id(tiny_cohort, cache_copy, tmp_path,
                                                                           monkeypatch):
    pytest.importorskip("wandb")
    from ctpm.lightning.train import build, train
    from tests.helpers import compose_train

    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_RUN_ID", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "pre"
    cfg = compose_train(["experiment=pretrain", *tiny_overrides(tiny_cohort, cache_copy, run), "logger=wandb",
                         "predict=false", "test=false"])
    objs = build(cfg)
    init = _wandb_init(objs)
    assert init["name"] == "pretrain" and init["job_type"] == "pretrain" and init["group"] is None
    assert init["tags"] == ["ctpm", "pretrain"] and init["resume"] == "allow"
    assert any(type(c).__name__ == "LearningRateMonitor" for c in objs["callbacks"])
    record = json.loads((run / "wandb.json").read_text())
    assert record["id"] == init["id"] and len(init["id"]) >= 8
    train(cfg)
    # the offline run on disk carries that id; its config holds the composed job config
    (run_dir,) = list((run / "wandb").glob(f"offline-run-*-{init['id']}"))
    assert run_dir.is_dir()
    # a resume from that run's last.ckpt, in a new folder, continues the same wandb run
    resumed = compose_train(["experiment=pretrain", *tiny_overrides(tiny_cohort, cache_copy, tmp_path / "resumed"),
                             "logger=wandb", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert _wandb_init(build(resumed))["id"] == init["id"]
    # a fine-tune of fold 1: its own name and a new id
    ft = compose_train(["experiment=finetune", "model.init_from=null", "data.n_folds=2", "data.fold=1",
                        *tiny_overrides(tiny_cohort, cache_copy, tmp_path / "ft"), "logger=wandb"])
    ft_init = _wandb_init(build(ft))
    assert ft_init["name"] == "finetune-fold1" and ft_init["job_type"] == "finetune" and ft_init["id"] != init["id"]
    # what the config gives explicitly wins
    own = compose_train(["experiment=pretrain", *tiny_overrides(tiny_cohort, cache_copy, tmp_path / "own"),
                         "logger=wandb", "+logger.wandb.name=mine", "logger.wandb.group=study-a"])
    own_init = _wandb_init(build(own))
    assert own_init["name"] == "mine" and own_init["group"] == "study-a"


def test_a_multirun_groups_its_folds_in_wandb(tiny_cohort, cache_copy, tmp_path):
    """Two folds of one multirun: names finetune-fold0/1, one group named after the sweep folder."""
    pytest.importorskip("wandb")
    sweep = tmp_path / "2026-01-01_00-00-00"
    res = run_cli("ctpm-train", "-m", "experiment=finetune", "model.init_from=null", "data.n_folds=2", "data.fold=0,1",
                  f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${data.fold}", "train=false", "test=false",
                  "predict=false", *_without_output_dir(tiny_overrides(tiny_cohort, cache_copy, tmp_path)),
                  "logger=wandb")
    assert res.returncode == 0, res.stderr[-3000:]
    records = [json.loads((sweep / str(k) / "wandb.json").read_text()) for k in (0, 1)]
    assert [r["name"] for r in records] == ["finetune-fold0", "finetune-fold1"]
    assert {r["group"] for r in records} == {"finetune-2026-01-01_00-00-00"}
    assert records[0]["id"] != records[1]["id"]


def test_the_wandb_sweep_command_composes(tmp_path):
    """sweeps/wandb.yaml: the command the agent runs (its ${args_no_hyphens} substituted as wandb
    does, `key=value` per parameter) is a ctpm-train command line that composes, with the values."""
    import yaml

    from tests.conftest import REPO

    spec = yaml.safe_load((REPO / "sweeps" / "wandb.yaml").read_text())
    assert spec["metric"] == {"name": "val/spearman_r", "goal": "maximize"}
    sample = {}
    for key, p in spec["parameters"].items():
        sample[key] = p["values"][-1] if "values" in p else p["min"] * 2
    args = [f"{k}={v}" for k, v in sample.items()]
    command = []
    for part in spec["command"]:
        command += args if part == "${args_no_hyphens}" else [part]
    assert command[0] == "ctpm-train" and "${args_no_hyphens}" not in command
    cfg = compose("train", command[1:])
    assert cfg.model.optimizer.lr == pytest.approx(sample["model.optimizer.lr"])
    assert cfg.model.net.base_channels == 24 and cfg.model.loss == "smooth_l1"
    assert cfg.logger.wandb.offline is False and cfg.optimized_metric == spec["metric"]["name"]
