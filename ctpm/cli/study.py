"""The paper's study as one run (``make demo``): every stage is the ctpm command a user would type,
printed before it runs, so the demo doubles as a worked example.

    synthesise -> preprocess (+ roundtrip ceiling) -> pretrain (non-cancer cohort)
    -> fine-tune folds 0..K-1 of the cancer cohort (one Hydra multirun)
    -> predict the cancer cohort with the pretrained-only model
    -> evaluate: fine-tuned (out-of-fold) vs pretrained-only, density baseline, noise ceiling -> report.md

Stages whose outputs exist are kept (rerun after an interruption); fresh=true starts over.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ctpm.cli._common import CONF_DIR, user_errors
from ctpm.errors import CtpmError

# glibc returns large freed buffers to the system after every training step and faults them back
# in on the next one; high thresholds keep them (measured: ~30% faster CPU steps at 128x64x64).
FAST_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def sh(args: list[str], log: Path) -> None:
    """Run one ctpm command, showing it and its progress; stop the study if it fails."""
    exe = Path(sys.executable).parent / args[0]
    cmd = [str(exe) if exe.exists() else args[0], *args[1:]]
    print(f"\n$ {' '.join(shlex.quote(a) for a in args)}", flush=True)
    t0 = time.time()
    env = {**os.environ, **FAST_MALLOC, "PYTHONUNBUFFERED": "1"}
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(args)}\n")
        proc = subprocess.run(cmd, env=env)
        fh.write(f"exit {proc.returncode} after {time.time() - t0:.0f} s\n")
    if proc.returncode != 0:
        raise CtpmError(f"stage failed (exit {proc.returncode}): {' '.join(args)}")
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def run(cfg: DictConfig) -> Path:
    out = Path(cfg.out)
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    t_start = time.time()
    exp = f"experiment={cfg.train_experiment}"
    extra = [str(o) for o in cfg.train_overrides]

    manifest = Path(cfg.manifest) if cfg.manifest else out / "data" / "manifest.csv"
    if not manifest.exists():
        if cfg.manifest:
            raise CtpmError("manifest does not exist", path=manifest)
        s = cfg.synth
        sh(["ctpm-synth", f"out={out / 'data'}", f"preset={s.preset}", f"n_noncancer={s.n_noncancer}",
            f"n_cancer={s.n_cancer}", f"seed={s.seed}", f"workers={cfg.workers}"], log)

    paths = [f"paths.manifest={manifest}", f"paths.cache_dir={out / 'cache'}", f"paths.log_dir={out / 'runs'}"]
    pretrain_dir = out / "pretrain"
    ckpt = pretrain_dir / "checkpoints" / "last.ckpt"
    if not (pretrain_dir / "job.json").exists():
        # the preprocessing the experiment trains with, from its composed config (no second copy)
        prep = _experiment_preprocessing(cfg.train_experiment)
        sh(["ctpm-preprocess", f"manifest={manifest}", f"out={out / 'cache'}", "roundtrip=true", f"workers={cfg.workers}",
            *[f"preprocessing.{k}={_ov(v)}" for k, v in prep.items()]], log)
        sh(["ctpm-train", exp, "stage=pretrain", *paths, f"hydra.run.dir={pretrain_dir}", *extra], log)

    folds = list(range(int(cfg.folds)))
    ft = out / "finetune"
    if not all((ft / str(k) / "job.json").exists() for k in folds):
        sh(["ctpm-train", "-m", exp, "stage=finetune", f"data.n_folds={cfg.folds}", f"data.fold={','.join(map(str, folds))}",
            f"model.init_from={ckpt}", *paths, f"hydra.sweep.dir={ft}", "hydra.sweep.subdir=${data.fold}", *extra], log)

    pre_only = out / "predictions_pretrained"
    if not (pre_only / "predictions.csv").exists():
        sh(["ctpm-predict", f"manifest={manifest}", "cohort=cancer", f"ckpt={ckpt}", f"out={pre_only}", "overwrite=true"], log)

    trained = OmegaConf.load(pretrain_dir / ".hydra" / "config.yaml")
    prep = OmegaConf.to_container(trained.data.preprocessing, resolve=True)
    sh(["ctpm-evaluate", f"manifest={manifest}", f"predictions=[{','.join(str(ft / str(k) / 'predictions') for k in folds)}]",
        f"baseline_predictions={pre_only}", f"out={out}", "overwrite=true", f"splits={out / 'cache' / 'splits.json'}",
        "title=ctpm study: transfer learning on synthetic cohorts",
        *[f"evaluation.{k}={_ov(v)}" for k, v in prep.items() if k in ("spacing", "eval_hu_range", "spect_percentile", "spect_clip", "lung_backend")]], log)
    report = out / "report.md"
    print(f"\nctpm study finished in {(time.time() - t_start) / 60:.1f} min: {report}")
    return report


def _experiment_preprocessing(experiment: str) -> dict:
    """The experiment's preprocessing block, as Hydra composes it (`--cfg job`), so that the cache
    built here is the one the training jobs read."""
    exe = Path(sys.executable).parent / "ctpm-train"
    res = subprocess.run([str(exe), f"experiment={experiment}", "stage=pretrain", "--cfg", "job",
                          "--package", "data.preprocessing", "--resolve"], capture_output=True, text=True)
    if res.returncode != 0:
        raise CtpmError(f"cannot compose experiment={experiment}: {res.stderr.strip().splitlines()[-1:]}")
    return OmegaConf.to_container(OmegaConf.create(res.stdout), resolve=True)  # the "# @package" line is a comment


def _ov(v) -> str:
    """A value as a Hydra override (lists in brackets, None as null)."""
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_ov(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_ov(x)}" for k, x in v.items()) + "}"
    return str(v)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="study")
@user_errors("ctpm-study")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
