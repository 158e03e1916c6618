"""ctpm-train: one step of the paper (experiment=pretrain|finetune) at one scale (scale=paper|demo).

    ctpm-train experiment=pretrain
    ctpm-train -m experiment=finetune data.fold=0,1,2 model.init_from=RUN
    ctpm-train -m experiment=pretrain hparams_search=optuna
"""

from __future__ import annotations

import shlex

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ctpm.cli._common import CONF_DIR, command_line, user_errors
from ctpm.lightning.train import train


@command_line("ctpm-train")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@user_errors("ctpm-train")
def main(cfg: DictConfig) -> float | None:
    # this job's own overrides (in a multirun: this fold's, not the whole sweep's), for its provenance
    command = shlex.join(["ctpm-train", *HydraConfig.get().overrides.task])
    metrics = train(cfg, command=command)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None  # what a sweeper optimises


if __name__ == "__main__":
    main()
