"""The training library: configs, fast_dev_run, transfer from pretrain, resume, determinism,
fold multirun, sweeps, loggers, safe checkpoint loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from ctpm.data.cache import PreprocessCache
from ctpm.errors import CtpmError
from ctpm.lightning.module import load_state_dict_safely, network_weights
from ctpm.lightning.train import build, train
from ctpm.pipeline import compose
from ctpm.provenance import read_provenance, resolve_checkpoint, resolve_in, write_provenance
from tests.helpers import compose_train, run_cli, tiny_overrides


@pytest.fixture
def own_cache(cache_copy) -> Path:
    return cache_copy


@pytest.fixture(scope="module")
def pretrained(tiny_cohort, tiny_cache, tmp_path_factory) -> Path:
    """A 1-epoch pretrain run on the tiny non-cancer cohort; returns its last.ckpt."""
    out = tmp_path_factory.mktemp("pretrain")
    cfg = compose_train(["experiment=pretrain", *tiny_overrides(tiny_cohort, tiny_cache, out)])
    train(cfg)
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


# The schedule each (experiment x scale) composes to, as conf/train.yaml documents it.
SCHEDULES = {("pretrain", "paper"): (1.0e-3, 100), ("finetune", "paper"): (2.0e-4, 50),
             ("pretrain", "demo"): (3.0e-3, 12), ("finetune", "demo"): (1.0e-4, 10)}
SIZES = {"paper": ([1.0, 1.0, 1.0], [128, 64, 64], 16), "demo": ([2.0, 2.0, 2.0], [64, 32, 32], 8)}


@pytest.mark.parametrize("scale", ["paper", "demo"])
@pytest.mark.parametrize("experiment", ["pretrain", "finetune"])
def test_every_experiment_and_scale_composes_and_runs_fast_dev_run(experiment, scale, tiny_cohort, own_cache,
                                                                   tmp_path, pretrained):
    """One override names the step, one the scale: the composed job has that step's cohort and that
    scale's sizes and schedule (model.optimizer.lr and trainer.max_epochs, the one place those
    live), and, shrunk to the tiny cohort, it instantiates and runs one fast_dev_run batch."""
    init = [f"model.init_from={pretrained}"] if experiment == "finetune" else []
    cfg = compose("train", [f"experiment={experiment}", f"scale={scale}", *init])
    lr, epochs = SCHEDULES[(experiment, scale)]
    assert cfg.model.optimizer.lr == pytest.approx(lr) and cfg.trainer.max_epochs == epochs
    assert cfg.model.scheduler.T_max == epochs
    spacing, roi, channels = SIZES[scale]
    assert list(cfg.data.preprocessing.spacing) == spacing and list(cfg.data.preprocessing.roi_size) == roi
    assert cfg.model.net.base_channels == channels
    assert cfg.stage == experiment and cfg.data.cohort == ("noncancer" if experiment == "pretrain" else "cancer")
    assert "epochs" not in cfg and "lr" not in cfg  # no second copy of the schedule

    over = [f"experiment={experiment}", f"scale={scale}", *init, *tiny_overrides(tiny_cohort, own_cache, tmp_path)]
    objects = build(compose_train(over))
    assert objects["trainer"].max_epochs == 1 and objects["model"].net is not None
    train(compose_train([*over, "debug=fdr"]))
    record = read_provenance(tmp_path, experiment)
    assert record["init_from"] == (str(pretrained.absolute()) if init else None)
    assert record["cache_hash"] == PreprocessCache(own_cache, record["preprocessing"]).key


def test_a_command_line_override_beats_the_schedule():
    cfg = compose("train", ["experiment=finetune", "scale=demo", "model.optimizer.lr=0.5", "trainer.max_epochs=3"])
    assert cfg.model.optimizer.lr == 0.5 and cfg.trainer.max_epochs == 3 and cfg.model.scheduler.T_max == 3


@pytest.mark.parametrize("model", ["arnn", "unet", "arnn_ablation"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_model_and_trainer_configs_compose(model, trainer, tiny_cohort, tiny_cache, tmp_path):
    over = [o for o in tiny_overrides(tiny_cohort, tiny_cache, tmp_path)
            if not (model == "unet" and o.startswith("model.net."))]
    cfg = compose_train([f"model={model}", f"trainer={trainer}", *over])
    net = hydra.utils.instantiate(cfg.model.net)
    x = torch.zeros(1, 1, 32, 16, 16)
    assert net(x, torch.ones_like(x)).shape == x.shape
    if trainer != "cpu":
        assert cfg.trainer.accelerator == "gpu" and "bf16" in cfg.trainer.precision


def test_finetune_starts_from_the_pretrain_weights(tiny_cohort, tiny_cache, tmp_path, pretrained):
    base = tiny_overrides(tiny_cohort, tiny_cache, tmp_path)
    cfg = compose_train(["experiment=finetune", f"model.init_from={pretrained}", *base])
    model = build(cfg)["model"]
    expected = network_weights(load_state_dict_safely(pretrained))
    got = model.net.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # and a fresh model (no init_from) differs
    cfg2 = compose_train(["experiment=pretrain", *tiny_overrides(tiny_cohort, tiny_cache, tmp_path)])
    fresh = build(cfg2)["model"].net.state_dict()
    assert any(not torch.equal(fresh[k], expected[k]) for k in expected)


def test_finetune_starts_from_a_pretrain_run_folder_by_its_record(tiny_cohort, tiny_cache, tmp_path, pretrained):
    """model.init_from=<run folder>: the final checkpoint the run's provenance.json records."""
    run_dir = pretrained.parent.parent
    record = read_provenance(run_dir, "pretrain")
    assert resolve_in(run_dir, record["checkpoint"]) == pretrained
    assert record["cache_hash"] == PreprocessCache(tiny_cache, record["preprocessing"]).key
    assert record["manifest"] == str(tiny_cohort) and record["predictions"] == "predictions"
    assert resolve_checkpoint(run_dir) == pretrained
    base = tiny_overrides(tiny_cohort, tiny_cache, tmp_path)
    cfg = compose_train(["experiment=finetune", f"model.init_from={run_dir}", *base])
    expected = network_weights(load_state_dict_safely(pretrained))
    got = build(cfg)["model"].net.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_folder_without_a_record_is_refused_with_the_fix(tmp_path, pretrained):
    """Never "the newest last.ckpt below a folder": a folder of runs, or a run without a record, is refused."""
    for name in ("a", "b"):
        (tmp_path / "runs" / name / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / name / "checkpoints" / "last.ckpt").write_bytes(pretrained.read_bytes())
    with pytest.raises(CtpmError, match="several checkpoints, name one file"):
        resolve_checkpoint(tmp_path / "runs")
    with pytest.raises(CtpmError, match="without provenance.json"):
        resolve_checkpoint(tmp_path / "runs" / "a")
    write_provenance(tmp_path / "fdr", {"stage": "pretrain", "checkpoint": None})
    with pytest.raises(CtpmError, match="recorded no checkpoint"):
        resolve_checkpoint(tmp_path / "fdr")


def test_missing_or_mismatched_pretrain_checkpoint_stops_before_training(tiny_cohort, tiny_cache, tmp_path, pretrained):
    base = tiny_overrides(tiny_cohort, tiny_cache, tmp_path)
    with pytest.raises(Exception) as err:
        build(compose_train(["experiment=finetune", f"model.init_from={tmp_path / 'nope.ckpt'}", *base]))
    assert "does not exist" in str(err.value) and "nope.ckpt" in str(err.value)
    with pytest.raises(Exception) as err:
        build(compose_train(["experiment=finetune", f"model.init_from={pretrained}", *base,
                             "model.net.base_channels=8"]))
    assert "does not fit this network" in str(err.value)
    with pytest.raises(CtpmError, match=r"experiment=finetune starts from a pretrained model: give model.init_from="):
        build(compose_train(["experiment=finetune", *base]))


def test_crafted_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.ckpt"
    with evil.open("wb") as fh:
        pickle.dump({"state_dict": {}, "ctpm": Payload()}, fh)
    with pytest.raises(CtpmError, match="cannot load the checkpoint safely"):
        load_state_dict_safely(evil)
    assert not marker.exists()


class Killed(Exception):
    """Stands for the process dying (OOM killer, pre-emption) in the middle of an epoch."""


class _Killer(__import__("pytorch_lightning").Callback):
    """Dies in the middle of epoch 1, after last.ckpt of epoch 0 was written."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            raise Killed()


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


def test_deterministic_and_exact_resume_after_a_kill(tiny_cohort, tiny_cache, tmp_path):
    def cfg_for(out: Path, extra=()):
        return compose_train(["experiment=pretrain", *tiny_overrides(tiny_cohort, tiny_cache, out),
                              "trainer.deterministic=true", "trainer.max_epochs=2", "predict=false", "test=false",
                              *extra])

    # two uninterrupted runs: identical metrics and weights (CPU, deterministic)
    runs = []
    for name in ("a", "b"):
        objs = build(cfg_for(tmp_path / name))
        objs["trainer"].fit(objs["model"], datamodule=objs["datamodule"])
        runs.append((dict(objs["trainer"].callback_metrics), _weights(objs["model"])))
    (m_a, w_a), (m_b, w_b) = runs
    assert {k: float(v) for k, v in m_a.items()} == {k: float(v) for k, v in m_b.items()}
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)

    # killed mid-epoch, resumed from last.ckpt: same weights and metrics as uninterrupted
    out = tmp_path / "c"
    objs = build(cfg_for(out))
    objs["trainer"].callbacks.append(_Killer())
    with pytest.raises(Killed):
        objs["trainer"].fit(objs["model"], datamodule=objs["datamodule"])
    last = out / "checkpoints" / "last.ckpt"
    saved = load_state_dict_safely(last)
    assert saved["global_step"] < load_state_dict_safely(tmp_path / "a" / "checkpoints" / "last.ckpt")["global_step"]
    objs = build(cfg_for(out))
    objs["trainer"].fit(objs["model"], datamodule=objs["datamodule"], ckpt_path=str(last))
    w_c = _weights(objs["model"])
    assert all(torch.equal(w_a[k], w_c[k]) for k in w_a)
    assert float(objs["trainer"].callback_metrics["val/spearman_r"]) == float(m_a["val/spearman_r"])


def test_training_writes_panel_and_job_summary(tiny_cohort, tiny_cache, tmp_path):
    cfg = compose_train(["experiment=pretrain", *tiny_overrides(tiny_cohort, tiny_cache, tmp_path), "logger=csv"])
    metrics = train(cfg)
    assert {"val/spearman_r", "val/dice_high", "val/dice_low", "test/spearman_r"} <= set(metrics)
    assert list((tmp_path / "csv" / "panels").glob("epoch_*.png"))
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["stage"] == "pretrain" and job["split"]["val"]
    assert list((tmp_path / "predictions").glob("*.nii.gz"))


def test_wandb_runs_offline(tiny_cohort, tiny_cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_train(["experiment=pretrain", *tiny_overrides(tiny_cohort, tiny_cache, tmp_path), "logger=wandb",
                         "predict=false"])
    assert cfg.logger.wandb.offline is True
    train(cfg)
    import wandb

    assert wandb.run is None  # finished: the next job of a multirun starts a fresh run
    assert list(tmp_path.glob("wandb/offline-run-*"))


def _without_output_dir(overrides: list[str]) -> list[str]:
    """A multirun's jobs each get their own folder (hydra.sweep.dir/subdir)."""
    return [o for o in overrides if not o.startswith("paths.output_dir")]


def test_fold_multirun_keeps_the_good_folds_when_one_fails(tiny_cohort, own_cache, tmp_path, pretrained):
    """Two folds and a third job with an impossible fold: the two write their predictions, the
    failing one is reported, and the exit status says a job failed."""
    sweep = tmp_path / "sweep"
    res = run_cli("ctpm-train", "-m", "experiment=finetune", "data.n_folds=2", "data.fold=0,1,7",
                  f"model.init_from={pretrained}", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${data.fold}",
                  *_without_output_dir(tiny_overrides(tiny_cohort, own_cache, tmp_path)))
    assert res.returncode != 0
    assert "data.fold=7 is outside 0..1" in res.stderr
    preds = [p.name for k in (0, 1) for p in (sweep / str(k) / "predictions").glob("*.nii.gz")]
    splits = json.loads((own_cache / "splits.json").read_text())
    assert splits["n_folds"] == 2
    assert sorted(preds) == sorted(f"{pid}.nii.gz" for f in splits["folds"] for pid in f["test"])
    assert len(preds) == 6  # every cancer patient predicted once, by the fold that held it out
    for k in (0, 1):
        assert (sweep / str(k) / "checkpoints" / "last.ckpt").is_file()


def test_optuna_sweep_returns_best_validation_r(tiny_cohort, tiny_cache, tmp_path):
    pytest.importorskip("optuna")
    sweep = tmp_path / "sweep"
    res = run_cli("ctpm-train", "-m", "experiment=pretrain", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                  f"hydra.sweep.dir={sweep}",
                  *_without_output_dir(tiny_overrides(tiny_cohort, tiny_cache, tmp_path)))
    assert res.returncode == 0, res.stderr[-2000:]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.n_complete == 2 and -1.0 <= best.best_value <= 1.0
    assert "model.optimizer.lr" in best.best_params
    # the best trial's run folder and final checkpoint are recorded: a fine-tune starts from them
    job = json.loads((sweep / best.best_run_dir / "job.json").read_text())
    assert job["metrics"]["val/spearman_r"] == pytest.approx(best.best_value)
    assert (sweep / best.best_checkpoint) == sweep / best.best_run_dir / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(sweep) == sweep / best.best_checkpoint
