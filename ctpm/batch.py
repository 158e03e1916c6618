"""One way to run a function over the patients of a cohort and to report the ones that failed.

A user error of one patient (a ``CtpmError``: unreadable file, no lung found ...; or an OSError) does not stop the
others; it comes back as a structured ``Failure`` (patient, message, file), and ``BatchResult``
builds the one message that every batch tool prints: a single failure as its own line, several
as "N of M patients could not be <verb>:" with one line each. Anything else (a bug) is raised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from ctpm.errors import CtpmError, user_error


@dataclass(frozen=True)
class Failure:
    """One patient that could not be processed, and why."""

    patient: str | None
    message: str
    path: str | None = None

    @classmethod
    def from_error(cls, err: CtpmError, patient: str | None = None) -> Failure:
        return cls(err.patient if err.patient is not None else patient, err.message, err.path)

    def error(self) -> CtpmError:
        return CtpmError(self.message, patient=self.patient, path=self.path)

    def __str__(self) -> str:
        return str(self.error())


@dataclass
class BatchResult:
    """What a batch gave: ``ok`` ({patient: result}, in input order) and ``failed``."""

    ok: dict[str, Any] = field(default_factory=dict)
    failed: list[Failure] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.ok) + len(self.failed)

    def message(self, verb: str, *, note: str | None = None) -> str | None:
        """The one summary of the failures (None when there is none). ``verb``: what could not be
        done ("preprocessed", "predicted", "evaluated"); ``note`` is added after a single failure's
        line (e.g. what happened to the other patients)."""
        if not self.failed:
            return None
        if len(self.failed) == 1:
            return str(self.failed[0]) + (f" ({note})" if note else "")
        lines = "\n  ".join(str(f) for f in self.failed)
        return f"{len(self.failed)} of {self.total} patients could not be {verb}:\n  {lines}"

    def raise_if_failed(self, verb: str, *, note: str | None = None) -> None:
        """Raise the summary as a CtpmError (a single failure keeps its patient and file)."""
        if not self.failed:
            return
        if len(self.failed) == 1:
            f = self.failed[0]
            raise CtpmError(f.message + (f" ({note})" if note else ""), patient=f.patient, path=f.path)
        raise CtpmError(self.message(verb))  # type: ignore[arg-type]


def patient_id_of(item: Any) -> str:
    """The id of a manifest Patient, of a {"patient_id": ...} dict, or the item itself (a string)."""
    if isinstance(item, dict):
        return str(item.get("patient_id", "?"))
    return str(getattr(item, "patient_id", item))


def _call(fn: Callable[[Any], Any], item: Any) -> tuple[bool, Any]:
    """(True, result) or (False, Failure): run in the worker, so that the failure travels as a
    plain dataclass (an exception with keyword-only fields does not survive pickling)."""
    try:
        return True, fn(item)
    except (CtpmError, OSError) as exc:  # an OSError: a file of this patient unreadable, a full disk ...
        return False, Failure.from_error(user_error(exc), patient_id_of(item))


def run_batch(fn: Callable[[Any], Any], items: Iterable[Any], *, workers: int = 1, progress: bool = True,
              desc: str | None = None, unit: str = "patient", initializer: Callable[[], None] | None = None) -> BatchResult:
    """``fn(item)`` for every item (sequentially, or in a pool of ``workers`` processes: ``fn`` must
    then be picklable), with a progress bar. Results are keyed by patient id in input order."""
    from tqdm.auto import tqdm

    items = list(items)
    done: dict[str, tuple[bool, Any]] = {}
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress or not items)
    try:
        if workers > 1 and len(items) > 1:
            with ProcessPoolExecutor(max_workers=workers, initializer=initializer) as pool:
                futures = {pool.submit(_call, fn, it): patient_id_of(it) for it in items}
                for fut in as_completed(futures):
                    done[futures[fut]] = fut.result()
                    bar.update()
        else:
            for it in items:
                done[patient_id_of(it)] = _call(fn, it)
                bar.update()
    finally:
        bar.close()
    result = BatchResult()
    for it in items:
        ok, value = done[patient_id_of(it)]
        if ok:
            result.ok[patient_id_of(it)] = value
        else:
            result.failed.append(value)
    return result
