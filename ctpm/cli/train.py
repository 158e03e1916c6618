"""ctpm-train: pretrain on the non-cancer cohort, or fine-tune fold k of the cancer cohort.

    ctpm-train experiment=pretrain
    ctpm-train -m experiment=finetune data.fold=0,1,2
    ctpm-train -m experiment=pretrain hparams_search=optuna
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ctpm.cli._common import CONF_DIR, user_errors
from ctpm.lightning.train import register_resolvers, train

register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@user_errors("ctpm-train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None  # what a sweeper optimises


if __name__ == "__main__":
    main()
