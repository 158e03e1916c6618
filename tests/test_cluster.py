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


# --------------------------------------------------------------------------------------------------
# Optuna: pruning on the validation Spearman R, fine-tune from the best trial
# --------------------------------------------------------------------------------------------------


class _FakeTrainer:
    """What OptunaPruning reads of a Trainer (one process)."""

    def __init__(self, epoch: int, value: float):
        import torch

        self.current_epoch, self.sanity_checking, self.is_global_zero = epoch, False, True
        self.callback_metrics = {"val/spearman_r": torch.tensor(value)}
        self.strategy = type("S", (), {"broadcast": staticmethod(lambda obj, src=0: obj)})()


def test_the_pruning_callback_reports_and_prunes_below_the_median(tmp_path):
    optuna = pytest.importorskip("optuna")
    from ctpm.lightning.callbacks import OptunaPruning, open_optuna_storage

    spec = str(tmp_path / "optuna.journal")
    study = optuna.create_study(direction="maximize", storage=open_optuna_storage(spec),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    for good in (0.6, 0.8):  # two finished trials, their curves rising to `good`
        t = study.ask()
        for epoch in range(3):
            t.report(good - 0.1 * (2 - epoch), step=epoch)
        study.tell(t, good)
    t = study.ask()
    cb = OptunaPruning(trial={"id": t._trial_id, "storage": spec, "study": study.study_name,
                                   "startup": 2, "warmup": 1})
    cb.on_validation_end(_FakeTrainer(0, -0.5), None)  # warm-up epoch: reported, never pruned
    cb.on_validation_end(_FakeTrainer(1, 0.65), None)  # above the median (0.6) at epoch 1
    with pytest.raises(optuna.TrialPruned):
        cb.on_validation_end(_FakeTrainer(2, 0.1), None)  # below the median (0.7) at epoch 2
    reloaded = optuna.load_study(study_name=study.study_name, storage=open_optuna_storage(spec))
    assert reloaded.trials[2].intermediate_values == pytest.approx({0: -0.5, 1: 0.65, 2: 0.1})
    OptunaPruning(trial=None).on_validation_end(_FakeTrainer(2, 0.1), None)  # outside a sweep: nothing


def test_a_pruned_sweep_feeds_the_fine_tune_from_its_best_trial(tiny_cohort, cache_copy, tmp_path):
    """hparams_search=optuna with the median pruner: every trial's epochs are reported to the
    study's journal, the sweep records its best trial, and a fine-tune from the sweep folder starts
    from that trial's final weights."""
    optuna = pytest.importorskip("optuna")
    import torch

    from ctpm.lightning.callbacks import open_optuna_storage
    from ctpm.lightning.module import load_state_dict_safely, network_weights
    from ctpm.lightning.train import build
    from tests.helpers import compose_train

    sweep = tmp_path / "sweep"
    base = _without_output_dir(tiny_overrides(tiny_cohort, cache_copy, tmp_path))
    res = run_cli("ctpm-train", "-m", "experiment=pretrain", "hparams_search=optuna", "hydra.sweeper.n_trials=3",
                  "hydra.sweeper.pruner_startup_trials=1", "hydra.sweeper.pruner_warmup_epochs=0",
                  f"hydra.sweep.dir={sweep}", *base, "trainer.max_epochs=2")
    assert res.returncode == 0, res.stderr[-3000:]
    best = __import__("omegaconf").OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.n_trials == 3 and best.n_complete + best.n_pruned == 3 and best.n_complete >= 1
    (study,) = optuna.get_all_study_summaries(open_optuna_storage(str(sweep / "optuna.journal")))
    storage = open_optuna_storage(str(sweep / "optuna.journal"))
    trials = optuna.load_study(study_name=study.study_name, storage=storage).trials
    assert all(t.intermediate_values for t in trials)  # the callback reported every trial
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert sorted(t.intermediate_values) == [0, 1] and t.intermediate_values[1] == pytest.approx(t.value)
    assert trials[best.best_trial].value == pytest.approx(best.best_value)
    # fine-tune from the sweep folder (with the best trial's network): its final weights
    net = [f"{k}={v}" for k, v in best.best_params.items() if k.startswith("model.net.")]
    cfg = compose_train(["experiment=finetune", f"model.init_from={sweep}",
                         *tiny_overrides(tiny_cohort, cache_copy, tmp_path / "ft"), *net])
    expected = network_weights(load_state_dict_safely(sweep / best.best_run_dir / "checkpoints" / "last.ckpt"))
    got = build(cfg)["model"].net.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


# --------------------------------------------------------------------------------------------------
# Sharded preprocessing
# --------------------------------------------------------------------------------------------------


def _entries(cache: Path) -> dict[str, dict]:
    """{patient/hash: {file: crc32}} of a cache's committed entries."""
    return {str(m.parent.relative_to(cache)): {k: v["crc32"] for k, v in json.loads(m.read_text())["files"].items()}
            for m in sorted(cache.glob("*/*/meta.json"))}


def test_two_shards_fill_the_same_cache_as_one_run(tiny_cohort, tiny_cache, tmp_path):
    from ctpm.data.cache import shard_patients
    from ctpm.data.manifest import load_manifest

    patients = load_manifest(tiny_cohort).patients
    parts = [shard_patients(patients, k, 3) for k in range(3)]
    ids = [p.patient_id for part in parts for p in part]
    assert sorted(ids) == sorted(p.patient_id for p in patients) and len(set(ids)) == len(ids)  # a partition
    assert max(map(len, parts)) - min(map(len, parts)) <= 1

    out = tmp_path / "cache"
    common = [f"manifest={tiny_cohort}", f"out={out}", "preprocessing.spacing=[4.0,4.0,4.0]",
              "preprocessing.roi_size=[32,16,16]", "progress=false"]
    res = run_cli("ctpm-preprocess", *common, "shard=0/2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "shard 0/2: 5 of 10 patients" in res.stdout
    res = run_cli("ctpm-preprocess", *common, "check=true")
    assert res.returncode == 2 and "5 of 10 patients are not in the cache" in res.stderr
    second = sorted(p.patient_id for p in shard_patients(patients, 1, 2))
    assert all(f"{pid}: missing" in res.stderr for pid in second)
    res = run_cli("ctpm-preprocess", *common, "shard=1/2")
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("ctpm-preprocess", *common, "check=true")
    assert res.returncode == 0 and "all 10 patients present" in res.stdout
    # the same entries, byte for byte, as the cache one unsharded run built
    assert _entries(out) == _entries(tiny_cache)
    res = run_cli("ctpm-preprocess", *common, "shard=2/2")
    assert res.returncode == 2 and "K must be in 0..N-1" in res.stderr


# --------------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------------


def test_ddp_on_two_processes_writes_each_map_once_with_the_single_process_numbers(tiny_cohort, cache_copy, tmp_path):
    """fit + test + predict with 2 gloo processes on CPU against 1 process. The learning rate is 0
    and the network has instance norm (no running statistics), so the weights stay the seeded
    initial ones in both runs and every number must agree: the maps of the held-out patients
    (each written once) within 1e-5, and the Spearman R and Dice of validation and test."""
    import nibabel as nib
    import numpy as np

    runs = {}
    for name, extra in {"single": [], "ddp": ["trainer.devices=2", "trainer.strategy=ddp"]}.items():
        out = tmp_path / name
        res = run_cli("ctpm-train", "experiment=finetune", "model.init_from=null", "data.n_folds=2", "data.fold=0",
                      "data.val_fraction=0.5",  # 2 validation patients: one per process
                      *tiny_overrides(tiny_cohort, cache_copy, out), "model.optimizer.lr=0.0",
                      f"hydra.run.dir={out}", "trainer.accelerator=cpu", *extra, timeout=400)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = out
    splits = json.loads((cache_copy / "splits.json").read_text())
    test_ids = sorted(splits["folds"][0]["test"])
    assert len(splits["folds"][0]["val"]) == 2 and len(test_ids) == 3  # 3 test patients: 2 on rank 0, 1 on rank 1
    for out in runs.values():
        assert sorted(p.name for p in (out / "predictions").glob("*.nii.gz")) == [f"{pid}.nii.gz" for pid in test_ids]
    for pid in test_ids:
        a = np.asarray(nib.load(str(runs["single"] / "predictions" / f"{pid}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(runs["ddp"] / "predictions" / f"{pid}.nii.gz")).dataobj)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5, pid
    m1, m2 = (json.loads((out / "job.json").read_text())["metrics"] for out in (runs["single"], runs["ddp"]))
    for key in ("val/spearman_r", "val/dice_high", "val/dice_low",
                "test/spearman_r", "test/dice_high", "test/dice_low"):
        assert m2[key] == pytest.approx(m1[key], abs=1e-6), key


def test_a_ddp_multirun_outside_slurm_is_refused_with_the_fix(tiny_cohort, cache_copy, tmp_path):
    res = run_cli("ctpm-train", "-m", "experiment=finetune", "model.init_from=null", "data.n_folds=2", "data.fold=0,1",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}",
                  *_without_output_dir(tiny_overrides(tiny_cohort, cache_copy, tmp_path)),
                  "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp")
    assert res.returncode != 0
    assert "in a multirun (-m) outside SLURM" in res.stderr and "hydra/launcher=slurm" in res.stderr
