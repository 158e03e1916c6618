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
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ctpm.errors import CtpmError

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


def build(cfg: DictConfig) -> dict[str, Any]:
    """Datamodule, model, callbacks, loggers and trainer of a job config (seeded first: the
    network's initial weights depend on it)."""
    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="object")
    # as JSON text: instantiate() would otherwise build the network config it is handed
    net_config = json.dumps(OmegaConf.to_container(cfg.model.net, resolve=True))
    preprocessing = json.dumps(OmegaConf.to_container(cfg.data.preprocessing, resolve=True))
    model = hydra.utils.instantiate(cfg.model, net_config=net_config, preprocessing=preprocessing)
    callbacks = instantiate_list(cfg.get("callbacks"))
    loggers = instantiate_list(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {"datamodule": datamodule, "model": model, "callbacks": callbacks, "loggers": loggers, "trainer": trainer}


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test and predict one job; returns its metrics (val/* and test/*)."""
    objects: dict[str, Any] = {}
    try:
        objects = build(cfg)
        trainer: pl.Trainer = objects["trainer"]
        model, dm = objects["model"], objects["datamodule"]
        for lg in objects["loggers"]:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if cfg.get("train", True):
            trainer.fit(model, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test", True) and not trainer.fast_dev_run:
            dm.setup("test")
            if dm.test_set is not None:
                trainer.test(model, datamodule=dm, verbose=False)
                metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        if cfg.get("predict", True):
            dm.setup("predict")
            if dm.test_set is not None:
                trainer.predict(model, datamodule=dm, return_predictions=False)
        out = Path(cfg.paths.output_dir)
        summary = {"stage": cfg.get("stage"), "fold": cfg.data.get("fold") if cfg.data.get("mode") == "fold" else None,
                   "metrics": metrics, "split": dm.split}
        (out / "job.json").write_text(json.dumps(summary, indent=1))
        return metrics
    finally:
        _close_loggers(objects.get("loggers", []))


def _close_loggers(loggers: list[Any]) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            try:
                import wandb

                wandb.finish()
            except Exception:  # noqa: BLE001 - closing must not mask the job's own error
                log.warning("wandb.finish() failed", exc_info=True)


def latest_checkpoint(root: str) -> str:
    """Resolver ${ctpm.latest_ckpt:DIR}: the newest last.ckpt below DIR (the latest pretrain run)."""
    cands = sorted(Path(root).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not cands:
        raise CtpmError(
            f"no pretrain checkpoint found below {root}; run `ctpm-train experiment=pretrain` first "
            "or give model.init_from=PATH"
        )
    return str(cands[-1])


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ctpm.latest_ckpt"):
        OmegaConf.register_new_resolver("ctpm.latest_ckpt", latest_checkpoint)
