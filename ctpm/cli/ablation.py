"""The model ablation (conf/ablation.yaml): every variant the whole study, over seeds, then the table.

    python -m ctpm.cli.ablation out=outputs/ablation 'variants=[paper,psf]'
    python -m ctpm.cli.ablation out=outputs/ablation table_only=true 'seeds=[0,1,2]'   # the table of what ran
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpm.ablation import from_config, run_ablation, write_table
from ctpm.cli._common import CONF_DIR, command_line, user_errors


def run(cfg: DictConfig) -> Path:
    ab = from_config(OmegaConf.to_container(cfg, resolve=True))
    return write_table(ab) if cfg.get("table_only") else run_ablation(ab)


@command_line("ctpm-ablation")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="ablation")
@user_errors("ctpm-ablation")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
