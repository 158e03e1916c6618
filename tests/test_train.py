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

from ctpm.errors import CtpmError
from ctpm.lightning.module import load_state_dict_safely, network_weights
from ctpm.lightning.train import build, train
from tests.helpers import compose_train, run_cli, tiny_overrides

CONF = Path(__file__).resolve().parents[1] / "conf"


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


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_every_experiment_composes_and_instantiates(experiment, stage, tiny_cohort, own_cache, tmp_path, pretrained):
    over = [f"experiment={experiment}", f"stage={stage}", *tiny_overrides(tiny_cohort, own_cache, tmp_path)]
    if stage == "finetune":
        over.append(f"model.init_from={pretrained}")
    cfg = compose_train(over)
    assert cfg.stage == stage
    assert cfg.data.cohort == ("noncancer" if stage == "pretrain" else "cancer")
    objects = build(cfg)
    assert objects["trainer"].max_epochs == 1
    assert objects["model"].net is not None


@pytest.mark.parametrize("model", ["arnn", "unet", "arnn_ablation"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_model_and_trainer_configs_compose(model, trainer, tiny_cohort, tiny_cache, tmp_path):
    over = [o for o in tiny_overrides(tiny_cohort, tiny_cache, tmp_path) if not (model == "unet" and o.startswith("model.net."))]
    cfg = compose_train([f"model={model}", f"trainer={trainer}", *over])
    net = hydra.utils.instantiate(cfg.model.net)
    x = torch.zeros(1, 1, 32, 16, 16)
    assert net(x, torch.ones_like(x)).shape == x.shape
    if trainer != "cpu":
        assert cfg.trainer.accelerator == "gpu" and "bf16" in cfg.trainer.precision


def test_fast_dev_run_pretrain_and_finetune(tiny_cohort, own_cache, tmp_path, pretrained):
    base = tiny_overrides(tiny_cohort, own_cache, tmp_path)
    train(compose_train(["experiment=pretrain", "debug=fdr", *base]))
    train(compose_train(["experiment=finetune", "debug=fdr", "data.fold=1", f"model.init_from={pretrained}", *base]))


def test_finetune_starts_from_the_pretrain_weights(tiny_cohort, tiny_cache, tmp_path, pretrained):
    cfg = compose_train(["experiment=finetune", f"model.init_from={pretrained}", *tiny_overrides(tiny_cohort, tiny_cache, tmp_path)])
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


def test_finetune_default_init_is_the_latest_pretrain_run(tiny_cohort, tiny_cache, tmp_path, pretrained):
    runs = tmp_path / "train" / "pretrain" / "runs" / "x" / "checkpoints"
    runs.mkdir(parents=True)
    (runs / "last.ckpt").write_bytes(pretrained.read_bytes())
    cfg = compose_train(["experiment=finetune", *tiny_overrides(tiny_cohort, tiny_cache, tmp_path)])
    assert cfg.model.init_from == str(runs / "last.ckpt")


def test_missing_or_mismatched_pretrain_checkpoint_stops_before_training(tiny_cohort, tiny_cache, tmp_path, pretrained):
    base = tiny_overrides(tiny_cohort, tiny_cache, tmp_path)
    with pytest.raises(Exception) as err:
        build(compose_train(["experiment=finetune", f"model.init_from={tmp_path / 'nope.ckpt'}", *base]))
    assert "does not exist" in str(err.value) and "nope.ckpt" in str(err.value)
    with pytest.raises(Exception) as err:
        build(compose_train(["experiment=finetune", f"model.init_from={pretrained}", *base, "model.net.base_channels=8"]))
    assert "does not fit this network" in str(err.value)
    with pytest.raises(Exception) as err:  # no pretrain run below paths.log_dir
        compose_train(["experiment=finetune", *base]).model.init_from  # noqa: B018
    assert "no pretrain checkpoint found" in str(err.value)


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
                              "trainer.deterministic=true", "epochs.pretrain=2", "predict=false", "test=false", *extra])

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


def test_fold_multirun_keeps_the_good_folds_when_one_fails(tiny_cohort, own_cache, tmp_path, pretrained):
    """Two folds and a third job with an impossible fold: the two write their predictions, the
    failing one is reported, and the exit status says a job failed."""
    sweep = tmp_path / "sweep"
    res = run_cli("ctpm-train", "-m", "experiment=finetune", "data.n_folds=2", "data.fold=0,1,7",
                  f"model.init_from={pretrained}", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${data.fold}",
                  *[o for o in tiny_overrides(tiny_cohort, own_cache, tmp_path) if not o.startswith("paths.output_dir")])
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
                  *[o for o in tiny_overrides(tiny_cohort, tiny_cache, tmp_path) if not o.startswith("paths.output_dir")])
    assert res.returncode == 0, res.stderr[-2000:]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.n_complete == 2 and -1.0 <= best.best_value <= 1.0
    assert "model.optimizer.lr" in best.best_params


def test_slurm_launcher_config_is_valid_yaml():
    cfg = OmegaConf.load(CONF / "hydra" / "launcher" / "submitit_slurm.yaml")
    assert "timeout_min" in cfg and "gpus_per_node" in cfg
