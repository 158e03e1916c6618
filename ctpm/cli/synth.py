"""ctpm-synth: write synthetic SPECT/CT cohorts (see ctpm.data.synth and conf/synth.yaml)."""

from __future__ import annotations

import sys
from collections import Counter

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpm.cli._common import CONF_DIR, user_errors
from ctpm.data.manifest import load_manifest
from ctpm.data.synth import synthesise


def run(cfg: DictConfig):
    c = OmegaConf.to_container(cfg, resolve=True)
    manifest = synthesise(
        c["out"], preset=c["preset"], presets=c["presets"], physics=c["physics"],
        n_noncancer=int(c["n_noncancer"]), n_cancer=int(c["n_cancer"]), seed=int(c["seed"]),
        workers=int(c["workers"]), cancer_institutions=c["cancer_institutions"], with_dose=bool(c["dose"]),
        overwrite=bool(c["overwrite"]),
    )
    m = load_manifest(manifest)
    counts = Counter((p.cohort, p.institution) for p in m)
    made = ", ".join(f"{n} {cohort} ({inst})" for (cohort, inst), n in sorted(counts.items()))
    print(f"ctpm-synth: {len(m)} patients ({made}), preset {c['preset']}, seed {c['seed']} -> {manifest}")
    return manifest


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="synth")
@user_errors("ctpm-synth")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
