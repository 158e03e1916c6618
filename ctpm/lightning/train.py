"""One training job (pretrain, or fine-tune of fold k) from a composed config.

The library side of ``ctpm-train``: usable from a notebook with a config from Hydra's compose API.
Shape after lightning-hydra-template's task: instantiate everything from ``_target_``s, fit, test
the final weights (not the best-on-validation ones: nothing is chosen on the test fold), predict
the held-out patients into CT geometry, and always close the loggers, so one failed job of a
multirun does not poison the next.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ctpm.data.cache import config_hash
from ctpm.data.io import atomic_write
from ctpm.data.transforms import PreprocessConfig
from ctpm.errors import CtpmError
from ctpm.lightning.module import check_checkpoint_file
from ctpm.provenance import relative_to, resolve_checkpoint, write_provenance

log = logging.getLogger("ctpm.train")


def _no_advert(record: logging.LogRecord) -> bool:
    """Lightning >= 2.6 advertises a cloud logger on every Trainer; ctpm runs offline."""
    return "litlogger" not in str(record.msg)


logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_no_advert)


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Callbacks / loggers: a dict of configs with `_target_`s (None entries allowed)."""
    out: list[Any] = []
    if not cfg:
        return out
    for _, c in cfg.items():
        if isinstance(c, DictConfig) and "_target_" in c:
            out.append(hydra.utils.instantiate(c))
    return out


def starting_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint file model.init_from names (a file, a pretrain run folder or a sweep folder,
    see ctpm.provenance.resolve_checkpoint), or None for a run from scratch."""
    if OmegaConf.is_missing(cfg.model, "init_from"):
        raise CtpmError(f"experiment={cfg.get('stage')} starts from a pretrained model: give "
                        "model.init_from=<a checkpoint file, a pretrain run folder or an Optuna sweep folder>")
    spec = cfg.model.init_from
    return str(resolve_checkpoint(spec)) if spec else None


def instantiate_loggers(cfg: DictConfig) -> list[Any]:
    """The configured loggers; a WandbLogger gets this job's name, group and run id
    (``wandb_identity``) where its config leaves them null."""
    out = []
    for key, c in (cfg.get("logger") or {}).items():
        if not (isinstance(c, DictConfig) and "_target_" in c):
            continue
        extra = {}
        if c._target_.endswith("WandbLogger"):
            ident = wandb_identity(cfg, key)
            extra = {k: v for k, v in ident.items() if c.get(k) is None}
        out.append(hydra.utils.instantiate(c, **extra))
    return out


WANDB_RECORD = "wandb.json"


def wandb_identity(cfg: DictConfig, key: str = "wandb") -> dict[str, Any]:
    """name, group and id of this job's wandb run (see conf/logger/wandb.yaml).

    name: <stage>, -fold<k> in fold mode, -trial<n> for a job of an Optuna sweep (-job<n> of
    another multirun). group: <stage>-<sweep folder name> in a multirun, else None. id: that of
    ``<run folder>/wandb.json`` when the folder has one (a rerun, the other ranks of a DDP job),
    else that of the checkpoint's run folder on a resume (``ckpt_path=RUN/checkpoints/last.ckpt``),
    else a new one; written to wandb.json by rank 0. Under ``wandb agent`` the agent's run id
    (WANDB_RUN_ID) is kept and the sweep groups the runs."""
    stage = str(cfg.get("stage") or cfg.get("task_name") or "run")
    name, group = stage, None
    if cfg.data.get("mode") == "fold":
        name += f"-fold{cfg.data.fold}"
    hc = _hydra_config()
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        sweeper = str(hc.sweeper.get("_target_", ""))
        if "optuna" in sweeper.lower():
            name += f"-trial{hc.job.num}"
        elif cfg.data.get("mode") != "fold":
            name += f"-job{hc.job.num}"
        group = f"{stage}-{Path(str(hc.sweep.dir)).name}"
    out = Path(str(cfg.paths.output_dir))
    run_id = os.environ.get("WANDB_RUN_ID") or _recorded_wandb_id(out)
    if run_id is None and cfg.get("ckpt_path"):
        run_id = _recorded_wandb_id(Path(str(cfg.ckpt_path)).absolute().parent.parent)
    if run_id is None:  # the form of wandb's own ids: 8 of [a-z0-9]
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if os.environ.get("WANDB_SWEEP_ID"):
        group = None  # wandb groups a sweep's runs itself
    ident = {"name": name, "group": group, "id": run_id}
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        project = cfg.logger[key].get("project")
        atomic_write(out / WANDB_RECORD, json.dumps({**ident, "project": project}, indent=1) + "\n")
    return ident


def _recorded_wandb_id(run_dir: Path) -> str | None:
    path = run_dir / WANDB_RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("id") or None
    except (OSError, ValueError):
        return None


def _hydra_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def refuse_ddp_multirun(cfg: DictConfig) -> None:
    """strategy=ddp starts the other processes by running the command line again (Lightning's
    subprocess launcher); in a Hydra multirun outside SLURM that command is the whole sweep, so
    each process would start every job. Refused with the fix; under SLURM (hydra/launcher=slurm,
    one task per device) or torchrun the processes exist already and nothing is re-launched."""
    strategy = str(cfg.trainer.get("strategy", "auto"))
    hc = _hydra_config()
    if "ddp" not in strategy or "spawn" in strategy or hc is None or hc.mode != RunMode.MULTIRUN:
        return
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if SLURMEnvironment.detect() or TorchElasticEnvironment.detect():
        return
    raise CtpmError(f"trainer.strategy={strategy} in a multirun (-m) outside SLURM: each DDP process would re-run "
                    "the whole sweep. Run the jobs one at a time without -m, or submit the multirun with "
                    "hydra/launcher=slurm (one SLURM task per device), or use trainer.strategy=ddp_spawn")


def build(cfg: DictConfig) -> dict[str, Any]:
    """Datamodule, model, callbacks, loggers and trainer of a job config (seeded first: the
    network's initial weights depend on it)."""
    refuse_ddp_multirun(cfg)
    init_from = starting_checkpoint(cfg)
    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    # as JSON text: instantiate() would otherwise build the network config it is handed
    net_config = json.dumps(OmegaConf.to_container(cfg.model.net, resolve=True))
    preprocessing = json.dumps(OmegaConf.to_container(cfg.data.preprocessing, resolve=True))
    model = hydra.utils.instantiate(cfg.model, init_from=init_from, net_config=net_config, preprocessing=preprocessing)
    loggers = instantiate_loggers(cfg)
    callbacks = instantiate_list(cfg.get("callbacks"))
    if not loggers:  # a LearningRateMonitor refuses a trainer without loggers
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {"datamodule": datamodule, "model": model, "callbacks": callbacks, "loggers": loggers, "trainer": trainer}


def train(cfg: DictConfig, command: str | None = None) -> dict[str, float]:
    """Fit, test and predict one job; returns its metrics (val/* and test/*). The run folder
    (paths.output_dir) gets job.json (metrics, split) and, last, provenance.json (the final
    checkpoint, the starting one, the preprocessing and its cache hash, the manifest, `command`)."""
    objects: dict[str, Any] = {}
    try:
        objects = build(cfg)
        trainer: pl.Trainer = objects["trainer"]
        model, dm = objects["model"], objects["datamodule"]
        for lg in objects["loggers"]:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if cfg.get("train", True):
            resume = cfg.get("ckpt_path")
            if resume and str(resume) not in ("last", "best", "hpc", "registry"):  # Lightning's own keywords
                check_checkpoint_file(resume, archive=True)  # an empty or damaged file: one line, before Lightning sees it
            trainer.fit(model, datamodule=dm, ckpt_path=resume)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test", True) and not trainer.fast_dev_run:
            dm.setup("test")
            if dm.test_set is not None:
                trainer.test(model, datamodule=dm, verbose=False)
                metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        predicted = False
        if cfg.get("predict", True):
            dm.setup("predict")
            if dm.test_set is not None:
                trainer.predict(model, datamodule=dm, return_predictions=False)
                predicted = True
        out = Path(cfg.paths.output_dir)
        fold = cfg.data.get("fold") if cfg.data.get("mode") == "fold" else None
        summary = {"stage": cfg.get("stage"), "fold": fold, "metrics": metrics, "split": dm.split}
        if trainer.is_global_zero:  # under DDP every process ends here, with the same synced metrics
            atomic_write(out / "job.json", json.dumps(summary, indent=1))
            write_provenance(out, run_record(cfg, trainer, fold=fold, predicted=predicted, command=command))
        return metrics
    finally:
        _close_loggers(objects.get("loggers", []))


def run_record(cfg: DictConfig, trainer: pl.Trainer, *, fold: int | None, predicted: bool,
               command: str | None) -> dict[str, Any]:
    """The provenance record of a finished training run (see ctpm.provenance)."""
    out = Path(cfg.paths.output_dir)
    ckpt_cb = trainer.checkpoint_callback
    last = getattr(ckpt_cb, "last_model_path", "") or None
    if last is not None and not Path(last).is_file():
        last = None
    prep = OmegaConf.to_container(cfg.data.preprocessing, resolve=True)
    return {
        "stage": cfg.get("stage"),
        "fold": fold,
        "checkpoint": relative_to(out, last),
        "init_from": str(Path(init).absolute()) if (init := starting_checkpoint(cfg)) else None,
        "preprocessing": prep,
        "cache_hash": config_hash(PreprocessConfig.from_any(prep)),
        "spacing": prep.get("spacing"),
        "manifest": str(cfg.data.manifest),
        "cache": str(cfg.data.cache_dir),
        "predictions": "predictions" if predicted else None,
        "command": command,
    }


def _close_loggers(loggers: list[Any]) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                import wandb

                wandb.finish()
            except Exception:  # noqa: BLE001 - closing must not mask the job's own error
                log.warning("wandb.finish() failed", exc_info=True)
