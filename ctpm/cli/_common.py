"""What every command-line entry point shares: the config folder and clean user errors."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctpm.conf import conf_dir
from ctpm.errors import CtpmError, CtpmWarning, first_line, user_error

# conf/ of the repository, installed as the package ctpm.conf (a wheel carries it too)
CONF_DIR = conf_dir()

log = logging.getLogger("ctpm")


def user_errors(prog: str) -> Callable:
    """Wrap a Hydra task: a user error is printed as one line and ends the run with status 2, no
    traceback. User errors are a CtpmError (a problem with the user's input), an OSError (a full
    disk, a read-only or missing folder: ``ctpm.errors.user_error``), a config value of the wrong
    type (``check_config_types``) and a mandatory value not given. In a multirun the error is
    re-raised instead, so that Hydra records this job as failed and goes on with the others."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(cfg):
            _quiet_library_warnings()
            try:
                check_config_types(cfg)
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


def command_line(prog: str) -> Callable:
    """Wrap a ``@hydra.main`` function as a console script, so that what fails around the task
    (Hydra making the run folder ``out=`` below a file or on a read-only disk, an override that does
    not compose) is one line and status 2 too. Hydra prints its own trimmed traceback unless
    HYDRA_FULL_ERROR=1, so it is set while Hydra runs and the exception comes here; a user who set
    HYDRA_FULL_ERROR=1 gets every traceback, as Hydra documents."""

    def deco(hydra_main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hydra_main)
        def entry(*args, **kwargs):
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                return hydra_main(*args, **kwargs)
            before = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                return hydra_main(*args, **kwargs)
            except Exception as exc:
                err = find_user_error(exc) or _hydra_error(exc)
                if err is None:
                    raise
                print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
                sys.exit(2)
            finally:
                if before is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = before

        return entry

    return deco


def _hydra_error(exc: BaseException) -> CtpmError | None:
    """Hydra's own errors of the command line (an override that does not parse or compose, a
    config group option that does not exist), as one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (HydraException, OmegaConfBaseException)) or _raised_in_hydra(exc):
        text = " ".join(line.strip() for line in str(exc).strip().splitlines()
                        if line.strip() and not line.strip().startswith(("full_key", "object_type", "reference_type")))
        if not isinstance(exc, (HydraException, OmegaConfBaseException)):
            text = f"the command line does not compose: {text}"
        return CtpmError(text or type(exc).__name__)
    return None


def _raised_in_hydra(exc: BaseException) -> bool:
    """Whether Hydra itself raised `exc` while composing the command line (e.g. the ValueError of
    ``preprocessing=3`` for a config group): its innermost frame is in Hydra's code."""
    import hydra

    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(str(Path(hydra.__file__).parent))


def find_user_error(exc: BaseException) -> CtpmError | None:
    """The user's error behind an exception (``ctpm.errors.user_error``, and omegaconf's errors of
    a config value: a mandatory ``???`` not given, an interpolation that does not resolve)."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    err = user_error(exc)
    if err is not None:
        return err
    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", None) or "a value"
        return CtpmError(f"{key} has no default: give {key}=... on the command line")
    if isinstance(exc, InterpolationResolutionError):
        return CtpmError(f"a config value does not resolve: {first_line(exc)}")
    return None


def check_config_types(cfg, defaults=None, prefix: str = "") -> None:
    """Every config value whose default is a number, a boolean or a list of numbers must still be
    one (``threshold=abc``, ``thresholds_gy=[5,x]``, ``overwrite=maybe`` are refused in one line
    before any work is done). `defaults`: the tool's own YAML (read from the config folder by the
    name Hydra composed); keys it does not hold, and null defaults, are not checked."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if defaults is None:
        defaults = _primary_defaults()
        if defaults is None:
            return
    for key, default in defaults.items():
        if key in ("defaults", "hydra") and not prefix:
            continue
        if not isinstance(cfg, DictConfig) or key not in cfg:
            continue
        name = f"{prefix}{key}"
        value = OmegaConf.select(cfg, str(key), throw_on_missing=False)
        if value is None or OmegaConf.is_missing(cfg, str(key)):
            continue
        if isinstance(default, dict):
            if isinstance(value, DictConfig):
                check_config_types(value, default, prefix=f"{name}.")
            continue
        want = _kind(default)
        if want == "list of numbers":
            ok = isinstance(value, (ListConfig, list)) and all(_kind(v) == "number" for v in value)
        else:
            ok = want is None or _kind(value) == want
        if not ok:
            shown = _as_typed(OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value)
            what = {"number": "a number", "list of numbers": "a list of numbers"}.get(want, want)
            raise CtpmError(f"{name}={shown}: {what} expected (the default is {_as_typed(default)})")


def _as_typed(value) -> str:
    """A value as it is written on the command line (``[5,x]``, not ``[5, 'x']``)."""
    if isinstance(value, list):
        return "[" + ",".join(_as_typed(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _kind(value) -> str | None:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return "list of numbers"
    return None


def _primary_defaults() -> dict | None:
    """The tool's own config file (conf/<config_name>.yaml) as plain data, or None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        name = HydraConfig.get().job.config_name
        path = Path(CONF_DIR) / f"{name}.yaml"
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None
    except Exception:  # noqa: BLE001 - not under Hydra (a test calling the task directly)
        return None
    return data if isinstance(data, dict) else None


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
