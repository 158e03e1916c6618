"""The paper's study, stage by stage, as functions a notebook can call.

    synthesise -> preprocess (+ roundtrip ceiling) -> pretrain (non-cancer cohort)
    -> fine-tune folds 0..K-1 of the cancer cohort (one Hydra multirun)
    -> predict the cancer cohort with the pretrained-only model
    -> evaluate: fine-tuned (out-of-fold) vs pretrained-only, density baseline, noise ceiling -> report.md

Each stage runs the ctpm command a user would type (printed, and logged to ``study.log`` as
``$ command`` then ``exit N after S s``), and its output folder gets a ``provenance.json``
(ctpm.provenance) once the stage has finished: the checkpoint(s), the preprocessing config and its
cache hash, the grid spacing, the manifest and the command. A stage is done when its folder's
record matches what the stage would now be given (the same manifest, the same preprocessing hash,
the same starting checkpoint); otherwise it runs again. Configs are composed with Hydra's compose
API from the same tree the commands use (``compose``), so the cache built here is the one training
reads and no config key is copied by hand.

    from ctpm.pipeline import Study, run_study
    study = Study("outputs/demo", scale="demo")
    run_study(study)                       # or stage by stage: preprocess(study), pretrain(study) ...

The study folder (design card): data/manifest.csv, cache/, pretrain/checkpoints/last.ckpt,
finetune/<fold>/predictions/, predictions_pretrained/, metrics.csv, ..., report.md, study.log.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ctpm.conf import conf_dir
from ctpm.errors import CtpmError
from ctpm.provenance import read_provenance, relative_to, resolve_checkpoint, resolve_in, write_provenance

# glibc returns large freed buffers to the system after every training step and faults them back
# in on the next one; high thresholds keep them (measured: ~30% faster CPU steps at 128x64x64).
FAST_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


@dataclass
class Study:
    """Where a study lives and what it is run with.

    out: the study folder. scale: ctpm-train's scale (conf/scale/: paper | demo). folds: K of the
    cancer cohort's cross-validation. workers: patients in parallel (synthesis, preprocessing).
    train_overrides: added to every ctpm-train call and to the composed configs (e.g. trainer=gpu,
    or data.preprocessing.spacing=[...]). manifest: a cohort of one's own (otherwise
    out/data/manifest.csv, written by `synthesise`).
    """

    out: str | Path
    scale: str = "paper"
    folds: int = 3
    workers: int = 1
    train_overrides: list[str] = field(default_factory=list)
    manifest: str | Path | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.train_overrides = [str(o) for o in self.train_overrides]
        self.manifest = Path(self.manifest) if self.manifest else self.out / "data" / "manifest.csv"

    @property
    def log(self) -> Path:
        return self.out / "study.log"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    def train_args(self, experiment: str) -> list[str]:
        """The ctpm-train overrides of one step of this study (also what `compose` is given)."""
        return [f"experiment={experiment}", f"scale={self.scale}", f"paths.manifest={self.manifest}",
                f"paths.cache_dir={self.cache}", f"paths.log_dir={self.out / 'runs'}", *self.train_overrides]


# ---- configs and commands ----

def compose(config_name: str, overrides: list[str], *, return_hydra_config: bool = False) -> DictConfig:
    """A config of the ctpm tree, composed by Hydra's compose API as the command would compose it.
    Works inside a running Hydra app too (the app's global Hydra is set aside and put back)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
            return hydra_compose(config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
    finally:
        restore_gh_from_backup(backup)


def training_preprocessing(study: Study) -> dict[str, Any]:
    """The preprocessing block the study's training jobs compose (data.preprocessing)."""
    cfg = compose("train", study.train_args("pretrain"))
    return OmegaConf.to_container(cfg.data.preprocessing, resolve=True)


def cache_hash(preprocessing: dict[str, Any]) -> str:
    from ctpm.data.cache import config_hash
    from ctpm.data.transforms import PreprocessConfig

    return config_hash(PreprocessConfig.from_any(preprocessing))


def run_command(args: list[str], log: Path) -> None:
    """Run one ctpm command, showing it and its progress; raise CtpmError if it fails. The log gets
    `$ command` and `exit N after S s`."""
    exe = Path(sys.executable).parent / args[0]
    cmd = [str(exe) if exe.exists() else args[0], *args[1:]]
    print(f"\n$ {shlex.join(args)}", flush=True)
    t0 = time.time()
    env = {**os.environ, **FAST_MALLOC, "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.run(cmd, env=env)
        fh.write(f"exit {proc.returncode} after {time.time() - t0:.0f} s\n")
    if proc.returncode != 0:
        raise CtpmError(f"stage failed (exit {proc.returncode}): {' '.join(args)}")
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def override(value: Any) -> str:
    """A value as a Hydra override (lists in brackets, None as null)."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override(x) for x in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override(x)}" for k, x in value.items()) + "}"
    return str(value)


def _done(folder: Path, stage: str, **expected: Any) -> dict[str, Any] | None:
    """The folder's record when the stage finished with these inputs, else None (the stage runs)."""
    record = read_provenance(folder, stage)
    if record is None or any(record.get(k) != v for k, v in expected.items()):
        return None
    return record


def _start(folder: Path) -> None:
    """A stage about to (re)run: its old record goes first, so an interrupted run is never 'done'."""
    (folder / "provenance.json").unlink(missing_ok=True)


# ---- the stages ----

def synthesise(study: Study, *, preset: str = "small", n_noncancer: int = 30, n_cancer: int = 18,
               seed: int = 0) -> dict[str, Any]:
    """Synthetic cohorts into out/data (ctpm-synth); a study with its own manifest skips this."""
    data = study.out / "data"
    settings = {"preset": preset, "n_noncancer": int(n_noncancer), "n_cancer": int(n_cancer), "seed": int(seed)}
    record = _done(data, "synthesise", settings=settings)
    if record:
        return record
    _start(data)
    args = ["ctpm-synth", f"out={data}", *[f"{k}={v}" for k, v in settings.items()], f"workers={study.workers}"]
    if (data / "manifest.csv").exists():
        args.append("overwrite=true")  # a cohort of other settings, or without a record: this study's folder
    run_command(args, study.log)
    return _record(data, {"stage": "synthesise", "settings": settings, "manifest": "manifest.csv",
                          "command": shlex.join(args)})


def preprocess(study: Study) -> dict[str, Any]:
    """The cohort into out/cache (ctpm-preprocess, with the roundtrip ceiling), at the preprocessing
    the training jobs compose."""
    if not Path(study.manifest).is_file():
        raise CtpmError("manifest does not exist (run the synthesis stage, or give manifest=)", path=study.manifest)
    prep = training_preprocessing(study)
    key = cache_hash(prep)
    record = _done(study.cache, "preprocess", cache_hash=key, manifest=str(study.manifest))
    if record:
        return record
    _start(study.cache)
    args = ["ctpm-preprocess", f"manifest={study.manifest}", f"out={study.cache}", "roundtrip=true",
            f"workers={study.workers}", *[f"preprocessing.{k}={override(v)}" for k, v in prep.items()]]
    run_command(args, study.log)
    return _record(study.cache, {"stage": "preprocess", "preprocessing": prep, "cache_hash": key,
                                 "spacing": prep.get("spacing"), "manifest": str(study.manifest),
                                 "roundtrip": "roundtrip.csv", "command": shlex.join(args)})


def pretrain(study: Study) -> dict[str, Any]:
    """Pre-training on the non-cancer cohort into out/pretrain (ctpm-train experiment=pretrain);
    ctpm-train writes the run's provenance (its final checkpoint)."""
    run_dir = study.out / "pretrain"
    key = cache_hash(training_preprocessing(study))
    record = _done(run_dir, "pretrain", cache_hash=key, manifest=str(study.manifest))
    if record and resolve_in(run_dir, record.get("checkpoint")) and resolve_in(run_dir, record["checkpoint"]).is_file():
        return record
    _start(run_dir)
    run_command(["ctpm-train", *study.train_args("pretrain"), f"hydra.run.dir={run_dir}"], study.log)
    return _finished(run_dir, "pretrain")


def finetune(study: Study) -> dict[str, Any]:
    """Folds 0..K-1 of the cancer cohort, each from the pretrain run (model.init_from=out/pretrain,
    the run's recorded final checkpoint), as one Hydra multirun into out/finetune/<fold>; only the
    folds not yet done with this checkpoint run. out/finetune/provenance.json lists the folds."""
    root = study.out / "finetune"
    start = str(resolve_checkpoint(study.out / "pretrain").absolute())
    prep = training_preprocessing(study)
    key = cache_hash(prep)
    folds = list(range(int(study.folds)))
    todo = [k for k in folds if not _done(root / str(k), "finetune", init_from=start, cache_hash=key, fold=k)]
    command = (read_provenance(root, "finetune") or {}).get("command")
    if todo:
        _start(root)
        for k in todo:
            _start(root / str(k))
        args = ["ctpm-train", "-m", *study.train_args("finetune"), f"data.n_folds={study.folds}",
                f"data.fold={','.join(map(str, todo))}", f"model.init_from={study.out / 'pretrain'}",
                f"hydra.sweep.dir={root}", "hydra.sweep.subdir=${data.fold}"]
        run_command(args, study.log)
        command = shlex.join(args)
    runs = [_finished(root / str(k), "finetune") for k in folds]
    return _record(root, {"stage": "finetune", "folds": folds, "init_from": start, "preprocessing": prep,
                          "cache_hash": key, "spacing": prep.get("spacing"),
                          "checkpoints": [relative_to(root, resolve_in(root / str(k), r["checkpoint"]))
                                          for k, r in zip(folds, runs)],
                          "predictions": [relative_to(root, resolve_in(root / str(k), r["predictions"]))
                                          for k, r in zip(folds, runs)],
                          "manifest": str(study.manifest), "command": command})


def predict_pretrained(study: Study) -> dict[str, Any]:
    """The cancer cohort predicted by the pretrained-only model (ctpm-predict) into
    out/predictions_pretrained: the baseline the fine-tuned models are compared with."""
    folder = study.out / "predictions_pretrained"
    ckpt = resolve_checkpoint(study.out / "pretrain")
    trained = read_provenance(study.out / "pretrain", "pretrain") or {}
    record = _done(folder, "predict", checkpoint=str(ckpt.absolute()), manifest=str(study.manifest))
    if record:
        return record
    _start(folder)
    args = ["ctpm-predict", f"manifest={study.manifest}", "cohort=cancer", f"ckpt={ckpt}", f"out={folder}",
            "overwrite=true"]
    run_command(args, study.log)
    return _record(folder, {"stage": "predict", "checkpoint": str(ckpt.absolute()), "cohort": "cancer",
                            # the checkpoint's own preprocessing, which ctpm-predict applies
                            **{k: trained.get(k) for k in ("preprocessing", "cache_hash", "spacing")},
                            "manifest": str(study.manifest), "command": shlex.join(args)})


def evaluate_command(study: Study) -> list[str]:
    """ctpm-evaluate of the fine-tuned folds against the pretrained-only model. The evaluation grid,
    masks and lungs come from the preprocessing cache's record (cache=): no preprocessing key is
    repeated here."""
    ft = read_provenance(study.out / "finetune", "finetune")
    if ft is None:
        raise CtpmError("the fine-tune stage has not finished (no finetune/provenance.json)", path=study.out)
    preds = [str(resolve_in(study.out / "finetune", p)) for p in ft["predictions"]]
    return ["ctpm-evaluate", f"manifest={study.manifest}", f"predictions=[{','.join(preds)}]",
            f"baseline_predictions={study.out / 'predictions_pretrained'}", f"cache={study.cache}",
            f"out={study.out}", "overwrite=true", f"splits={study.cache / 'splits.json'}",
            "title=ctpm study: transfer learning on synthetic cohorts"]


def evaluate(study: Study) -> dict[str, Any]:
    """Metrics, statistics, figures and report.md in the study folder (ctpm-evaluate)."""
    ft = read_provenance(study.out / "finetune", "finetune")
    pre = read_provenance(study.out / "predictions_pretrained", "predict")
    if pre is None:
        raise CtpmError("the pretrained-only predictions are missing (no predictions_pretrained/provenance.json)",
                        path=study.out)
    inputs = {"finetune_checkpoints": ft["checkpoints"] if ft else None, "baseline_checkpoint": pre["checkpoint"],
              "cache_hash": ft["cache_hash"] if ft else None}
    record = _done(study.out, "evaluate", **inputs)
    if record and (study.out / "report.md").is_file():
        return record
    _start(study.out)
    args = evaluate_command(study)
    run_command(args, study.log)
    return _record(study.out, {"stage": "evaluate", **inputs, "spacing": ft.get("spacing"), "cache": "cache",
                               "report": "report.md", "manifest": str(study.manifest), "command": shlex.join(args)})


def run_study(study: Study, *, synth: dict[str, Any] | None = None, fresh: bool = False) -> Path:
    """Every stage in order (finished stages are kept); returns report.md. `synth`: the settings of
    `synthesise` (ignored when the study has a manifest of its own)."""
    out = Path(study.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    own = Path(study.manifest) != out / "data" / "manifest.csv"
    if own and not Path(study.manifest).is_file():
        raise CtpmError("manifest does not exist", path=study.manifest)
    if not own:
        synthesise(study, **(synth or {}))
    preprocess(study)
    pretrain(study)
    finetune(study)
    predict_pretrained(study)
    evaluate(study)
    report = out / "report.md"
    print(f"\nctpm study finished in {(time.time() - t0) / 60:.1f} min: {report}")
    return report


def run_seeds(study: Study, seeds: list[int], *, synth: dict[str, Any] | None = None, fresh: bool = False) -> Path:
    """The whole study once per synthetic cohort seed, each in out/seed-<k>/ (a study folder of the
    usual shape), then the seeds' summaries side by side with mean and SD across them
    (out/seeds.md, out/seeds_summary.json). One number from one cohort is one draw of the
    synthetic world: the spread across seeds is what a claim about the model has to beat."""
    from ctpm.evaluation.report import write_seed_report

    if not seeds:
        raise CtpmError("seeds is empty: give at least one synthetic cohort seed, e.g. seeds=[0,1,2]")
    if Path(study.manifest) != Path(study.out) / "data" / "manifest.csv":
        raise CtpmError("seeds= runs synthetic cohorts; a study of one's own manifest has a single cohort (leave seeds out)")
    out = Path(study.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    summaries: dict[int, Path] = {}
    for seed in seeds:
        one = Study(out / f"seed-{int(seed)}", scale=study.scale, folds=study.folds, workers=study.workers,
                    train_overrides=list(study.train_overrides))
        run_study(one, synth={**(synth or {}), "seed": int(seed)})
        summaries[int(seed)] = one.out / "summary.json"
    files = write_seed_report(summaries, out, title="ctpm study on synthetic cohorts")
    _record(out, {"stage": "seeds", "seeds": [int(s) for s in seeds],
                  "studies": [f"seed-{int(s)}" for s in seeds], "report": files["report"].name})
    print(f"\nctpm study of {len(seeds)} seed(s) finished in {(time.time() - t0) / 60:.1f} min: {files['report']}")
    return files["report"]


def _record(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    write_provenance(folder, record)
    return record


def _finished(run_dir: Path, stage: str) -> dict[str, Any]:
    """A training run's record, which ctpm-train writes when the job has finished."""
    record = read_provenance(run_dir, stage)
    if record is None:
        raise CtpmError(f"the {stage} run finished without a provenance record", path=run_dir)
    return record
