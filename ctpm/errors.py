"""Errors a user can cause and fix, reported as one clear line without a traceback."""

from __future__ import annotations

import warnings
from pathlib import Path


class CtpmError(Exception):
    """A problem with the user's input (manifest, image, geometry, config).

    The message names the patient and the file when they are known, so that the user can find the
    case in a cohort of hundreds. Command-line tools print it and exit with status 2.
    """

    def __init__(self, message: str, *, patient: str | None = None, path: str | Path | None = None):
        self.message = message
        self.patient = patient
        self.path = str(path) if path is not None else None
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.patient is not None:
            where.append(f"patient {self.patient}")
        if self.path is not None:
            where.append(f"file {self.path}")
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def with_context(self, *, patient: str | None = None, path: str | Path | None = None) -> CtpmError:
        """Fill in the patient or file where the raising code did not know them."""
        if self.patient is None and patient is not None:
            self.patient = patient
        if self.path is None and path is not None:
            self.path = str(path)
        self.args = (str(self),)
        return self


class CtpmWarning(UserWarning):
    """Something the user should know about but that does not stop the work (e.g. one lung only)."""


def warn(message: str, *, patient: str | None = None) -> None:
    text = f"patient {patient}: {message}" if patient else message
    warnings.warn(text, CtpmWarning, stacklevel=2)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none (an empty
    ``str(exc)`` must not crash the code that reports it)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def from_os_error(exc: OSError, *, patient: str | None = None) -> CtpmError:
    """A full disk, a read-only or missing folder, a file where a folder should be ...: problems
    of the user's machine, not of ctpm, as one line that names the file."""
    reason = exc.strerror or first_line(exc)
    path = exc.filename
    if exc.filename2:
        path = f"{exc.filename} -> {exc.filename2}"
    return CtpmError(f"{reason} (errno {exc.errno})" if exc.errno else reason, patient=patient, path=path)


def user_error(exc: BaseException, *, patient: str | None = None) -> CtpmError | None:
    """The user's error behind an exception: a CtpmError, also when a library wrapped it (Hydra's
    instantiate raises InstantiationException from the error of the object it built), or an
    OSError (as ``from_os_error``). None for anything else (a bug, to be raised)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    os_error = None
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, CtpmError):
            return cur.with_context(patient=patient)
        if isinstance(cur, OSError) and os_error is None:
            os_error = cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return from_os_error(os_error, patient=patient) if os_error is not None else None
