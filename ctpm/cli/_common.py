"""What every command-line entry point shares: the config folder and clean user errors."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from ctpm.conf import conf_dir
from ctpm.errors import CtpmError, CtpmWarning

# conf/ of the repository, installed as the package ctpm.conf (a wheel carries it too)
CONF_DIR = conf_dir()

log = logging.getLogger("ctpm")


def user_errors(prog: str) -> Callable:
    """Wrap a Hydra task: a CtpmError (a problem with the user's input) is printed as one line and
    ends the run with status 2, no traceback. In a multirun the error is re-raised instead, so that
    Hydra records this job as failed and goes on with the others."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(cfg):
            _quiet_library_warnings()
            try:
                return fn(cfg)
            except Exception as exc:
                err = find_user_error(exc)
                if err is None:
                    raise
                print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
                if _in_multirun():
                    raise err from None
                sys.exit(2)

        return wrapper

    return deco


def find_user_error(exc: BaseException) -> CtpmError | None:
    """The CtpmError behind an exception, also when a library wrapped it (Hydra's instantiate
    raises InstantiationException from the error of the object it built)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CtpmError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


def _quiet_library_warnings() -> None:
    """Keep the user's terminal for what matters: ctpm's own warnings (one lung found, cache entry
    rebuilt ...) are shown once each, the libraries' deprecation chatter is not."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*Setting affine, but the applied meta contains an affine.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.simplefilter("always", CtpmWarning)
    warnings.formatwarning = _format_warning  # type: ignore[assignment]
    os.environ.setdefault("TQDM_MININTERVAL", "1")


def _format_warning(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, CtpmWarning):
        return f"warning: {message}\n"
    return f"{category.__name__}: {message}\n"
