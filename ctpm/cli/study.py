"""The paper's study as one run (``make demo``): ctpm.pipeline's stages in order, every stage the
ctpm command a user would type, printed before it runs, so the demo doubles as a worked example.

    python -m ctpm.cli.study train_scale=demo out=outputs/demo
    python -m ctpm.cli.study train_scale=demo out=outputs/demo-seeds 'seeds=[0,1,2]'   # three cohorts

Stages whose provenance records match are kept (rerun after an interruption); fresh=true starts over.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpm.cli._common import CONF_DIR, command_line, user_errors
from ctpm.pipeline import Study, run_seeds, run_study


def run(cfg: DictConfig) -> Path:
    study = Study(cfg.out, scale=cfg.train_scale, folds=int(cfg.folds), workers=int(cfg.workers),
                  train_overrides=list(cfg.train_overrides), manifest=cfg.manifest)
    synth = OmegaConf.to_container(cfg.synth, resolve=True)
    if cfg.get("seeds"):  # several synthetic cohorts, one study each, then mean and SD across them
        return run_seeds(study, [int(s) for s in cfg.seeds], synth=synth, fresh=bool(cfg.fresh))
    return run_study(study, synth=synth, fresh=bool(cfg.fresh))


@command_line("ctpm-study")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="study")
@user_errors("ctpm-study")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
