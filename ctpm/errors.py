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
