"""What a stage's output folder records about how it was made: ``provenance.json``.

Every stage of the study (synthesis, preprocessing, a training run, a prediction set, an
evaluation) writes one small JSON file into its output folder once the stage has finished: the
stage, the checkpoint(s), the preprocessing config and its cache hash, the grid spacing, the
manifest and the command. The next stage reads it instead of guessing from the files present, and
a fine-tune names its starting point by a checkpoint file, a pretrain run folder (its provenance
records the final checkpoint) or an Optuna sweep folder (``optimization_results.yaml`` records the
best trial's run folder and checkpoint) -- never "the newest checkpoint below a folder".

Paths inside the folder are stored relative to it, so that a study folder can be moved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ctpm.data.io import atomic_write
from ctpm.errors import CtpmError

PROVENANCE = "provenance.json"
SWEEP_RESULTS = "optimization_results.yaml"


def relative_to(folder: str | Path, path: str | Path | None) -> str | None:
    """`path` as stored in `folder`'s provenance: relative when it lies inside the folder."""
    if path is None:
        return None
    p, root = Path(path).absolute(), Path(folder).absolute()
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def resolve_in(folder: str | Path, path: str | None) -> Path | None:
    """A path read from `folder`'s provenance, back to a usable path."""
    if path is None:
        return None
    p = Path(path)
    return p if p.is_absolute() else Path(folder) / p


def write_provenance(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write `folder`/provenance.json (atomically: a reader never sees half a file). The record needs
    a "stage"; it is written last, once the stage's outputs are complete."""
    if "stage" not in record:
        raise ValueError("a provenance record names its stage")
    return atomic_write(Path(folder) / PROVENANCE, json.dumps(record, indent=1, default=str) + "\n")


def read_provenance(folder: str | Path, stage: str | None = None) -> dict[str, Any] | None:
    """`folder`'s provenance record, or None when the folder has none (the stage has not finished).
    With `stage`, a record of another stage is an error (the folder is not what it was given as)."""
    path = Path(folder) / PROVENANCE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CtpmError(f"unreadable provenance record ({exc}); delete it to redo the stage", path=path) from None
    if not isinstance(record, dict) or "stage" not in record:
        raise CtpmError("not a ctpm provenance record (no 'stage'); delete it to redo the stage", path=path)
    if stage is not None and record["stage"] != stage:
        raise CtpmError(f"this folder holds a {record['stage']!r} stage, not {stage!r}", path=path)
    return record


def resolve_checkpoint(spec: str | Path) -> Path:
    """The checkpoint a fine-tune starts from, given as one of
    - a checkpoint file;
    - a training run folder, whose provenance.json records its final checkpoint;
    - an Optuna sweep folder, whose optimization_results.yaml records the best trial's checkpoint.
    Anything else (a folder of several runs, a run without a record) is refused with the fix."""
    path = Path(spec)
    if path.is_file():
        return path
    if not path.exists():
        raise CtpmError("model.init_from does not exist: give a checkpoint file, a pretrain run folder or an "
                        "Optuna sweep folder", path=path)
    if (path / SWEEP_RESULTS).is_file():
        return _sweep_checkpoint(path)
    record = read_provenance(path)
    if record is None:
        if len(list(path.glob("**/last.ckpt"))) > 1:
            hint = f"; it holds several checkpoints, name one file: model.init_from={path}/<run>/checkpoints/last.ckpt"
        else:
            hint = "; give the checkpoint file (model.init_from=DIR/checkpoints/last.ckpt) or a ctpm-train run folder"
        raise CtpmError(f"model.init_from is a folder without {PROVENANCE} or {SWEEP_RESULTS}" + hint, path=path)
    ckpt = resolve_in(path, record.get("checkpoint"))
    if ckpt is None:
        raise CtpmError(f"the {record['stage']} run recorded no checkpoint (a fast_dev_run, or train=false); "
                        "train it again, or give a checkpoint file", path=path / PROVENANCE)
    if not ckpt.is_file():
        raise CtpmError(f"the checkpoint recorded by this run is gone: {ckpt}", path=path / PROVENANCE)
    return ckpt


def _sweep_checkpoint(sweep: Path) -> Path:
    from omegaconf import OmegaConf

    results = OmegaConf.load(sweep / SWEEP_RESULTS)
    ckpt = results.get("best_checkpoint")
    if not ckpt:
        raise CtpmError(f"the sweep records no best checkpoint (its best trial, {results.get('best_run_dir')}, "
                        "wrote none, or an older sweeper wrote the file); give model.init_from=<the best trial's "
                        "run folder or checkpoint file>", path=sweep / SWEEP_RESULTS)
    path = resolve_in(sweep, str(ckpt))
    if not path.is_file():
        raise CtpmError(f"the sweep's best checkpoint is gone: {path}", path=sweep / SWEEP_RESULTS)
    return path


def resolve_checkpoints(spec: str | Path) -> list[Path]:
    """The checkpoints a prediction averages, given as
    - a checkpoint file;
    - a training run folder (its provenance.json records the final checkpoint);
    - a folder whose provenance.json lists ``checkpoints`` (a study's finetune folder);
    - a fold multirun folder (Hydra's ``multirun/<date>/<time>`` or any folder of runs): the final
      checkpoint of every finished run below it, as each run's provenance.json records it, in fold
      order. Runs without a record (unfinished, or killed) are left out with a warning.
    """
    from ctpm.errors import warn

    path = Path(spec)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CtpmError("ckpt= does not exist: give a checkpoint file, a ctpm-train run folder or a fold multirun "
                        "folder", path=path)
    record = read_provenance(path)
    if record is not None and record.get("checkpoints"):
        found = [resolve_in(path, c) for c in record["checkpoints"]]
    elif record is not None:
        found = [resolve_checkpoint(path)]
    else:
        runs = sorted((p.parent for p in path.glob(f"**/{PROVENANCE}")), key=lambda d: str(d))
        records = [(d, r) for d in runs if (r := _training_record(d)) is not None]
        if not records:
            raise CtpmError(f"no finished training run below this folder (no {PROVENANCE} recording a checkpoint); "
                            "give checkpoint files: ckpt=[A.ckpt,B.ckpt]", path=path)
        records.sort(key=lambda dr: (dr[1].get("fold") is None, dr[1].get("fold") or 0, str(dr[0])))
        found = [resolve_in(d, r["checkpoint"]) for d, r in records]
        done = {d.resolve() for d, _ in records}
        unfinished = sorted({str(c.parent.parent) for c in path.glob("**/checkpoints/last.ckpt")
                             if c.parent.parent.resolve() not in done})
        if unfinished:
            warn(f"{len(unfinished)} run(s) below {path} have a checkpoint but no {PROVENANCE} (unfinished?) and are "
                 f"left out: {', '.join(unfinished)}")
    gone = [str(c) for c in found if not c.is_file()]
    if gone:
        raise CtpmError(f"recorded checkpoint(s) are gone: {', '.join(gone)}", path=path)
    return found


def _training_record(folder: Path) -> dict[str, Any] | None:
    """A finished training run's record below a multirun folder, or None for anything else there
    (a prediction set's provenance, a run that recorded no checkpoint)."""
    try:
        record = read_provenance(folder)
    except CtpmError:
        return None
    return record if record and record.get("checkpoint") else None
