"""The model ablation (conf/ablation.yaml): every variant the whole study, over seeds, then the table.

    python -m ctpm.cli.ablation out=outputs/ablation 'variants=[paper,psf]'
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpm.ablation import from_config, run_ablation
from ctpm.cli._common import CONF_DIR, command_line, user_errors


def run(cfg: DictConfig) -> Path:
    return run_ablation(from_config(OmegaConf.to_container(cfg, resolve=True)))


@command_line("ctpm-ablation")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="ablation")
@user_errors("ctpm-ablation")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
