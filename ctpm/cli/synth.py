"""ctpm-synth: write synthetic SPECT/CT cohorts (see ctpm.synth and conf/synth.yaml)."""

from __future__ import annotations

import sys
from collections import Counter

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpm.cli._common import CONF_DIR, command_line, user_errors
from ctpm.data.manifest import load_manifest
from ctpm.errors import CtpmError
from ctpm.synth import synthesise


def run(cfg: DictConfig):
    c = OmegaConf.to_container(cfg, resolve=True)
    manifest = synthesise(
        c["out"], preset=c["preset"], presets=c["presets"], physics=c["physics"],
        n_noncancer=int(c["n_noncancer"]), n_cancer=int(c["n_cancer"]), seed=int(c["seed"]),
        workers=int(c["workers"]), cancer_institutions=c["cancer_institutions"], with_dose=bool(c["dose"]),
        overwrite=bool(c["overwrite"]), progress=bool(c["progress"]),
    )
    m = load_manifest(manifest)
    counts = Counter((p.cohort, p.institution) for p in m)
    made = ", ".join(f"{n} {cohort} ({inst})" for (cohort, inst), n in sorted(counts.items()))
    print(f"ctpm-synth: {len(m)} patients ({made}), preset {c['preset']}, seed {c['seed']} -> {manifest}")
    return manifest


@command_line("ctpm-synth")
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="synth")
@user_errors("ctpm-synth")
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    _refuse_existing_cohort(sys.argv[1:])
    _main()


def _refuse_existing_cohort(args: list[str]) -> None:
    """Refuse before Hydra starts: its run folder is the cohort's folder, and it would overwrite
    the cohort's record (.hydra/config.yaml) with the config of a run that then writes nothing.
    Best effort: anything unusual (multirun, --help, no out=) is left to Hydra and `synthesise`."""
    if any(a.startswith("-") for a in args):
        return
    try:
        from pathlib import Path

        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("synth", overrides=args)
        out, overwrite = Path(str(cfg.out)), bool(cfg.overwrite)
    except Exception:  # noqa: BLE001 - Hydra reports bad overrides itself
        return
    if (out / "manifest.csv").exists() and not overwrite:
        err = CtpmError("a cohort already exists here; choose another out= or pass overwrite=true", path=out)
        print(f"ctpm-synth: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
