"""``make bench``: run the benchmarks, print one markdown table, and put it into the README.

    python -m benchmarks.run [--quick] [--only NAME ...] [--readme README.md] [--json PATH]

Benchmarks (``--only`` takes these names): metrics, synth, preprocess, evaluate, predict, train. Each is a
module ``benchmarks.bench_<name>`` whose ``run(quick)`` returns table rows; every figure is either
a ratio or comes with a reference measured in the same run, because the machines these numbers
come from are shared and their absolute speed varies from hour to hour.

With ``--readme``, the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is replaced by
the machine's description, the date, the command and the table; nothing else in the file changes.
``--quick`` is a smoke run (tiny sizes, one repeat) for the tests: its figures mean nothing.

This module also holds what the bench modules share: the row format, the markdown table, and
measurements in a fresh child process (peak memory of one task, glibc malloc settings).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
BENCHES = {
    "metrics": "benchmarks.bench_metrics",
    "synth": "benchmarks.bench_synth",
    "preprocess": "benchmarks.bench_preprocess",
    "evaluate": "benchmarks.bench_evaluate",
    "predict": "benchmarks.bench_predict",
    "train": "benchmarks.bench_train",
    "registration": "benchmarks.bench_registration",
}
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
ROW_KEYS = ("benchmark", "measure", "value", "unit", "reference", "reference_value", "ratio", "target", "ok")
TABLE_COLUMNS = ("benchmark", "measure", "value", "reference", "ratio", "target", "ok")

# glibc hands freed blocks above a (dynamic) threshold back to the kernel and trims the heap top;
# a training or prediction step on 3-D volumes then faults its hundreds of MB of activations back in
# on every step (a page-fault storm). Thresholds of 16 GiB keep the freed memory in the process.
# Set in the children that time CPU training and prediction (the train bench also measures without).
FAST_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "17179869184", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
CHILD_RESULT = "bench-child-result: "
GB = 1e9


# --------------------------------------------------------------------------------------------------
# Rows and tables
# --------------------------------------------------------------------------------------------------


def row(
    benchmark: str,
    measure: str,
    value: float,
    unit: str,
    reference: str = "",
    reference_value: float | None = None,
    ratio: float | None = None,
    target: str = "none",
    ok: bool | None = None,
) -> dict[str, Any]:
    """One table row, in the format of ``benchmarks.bench_metrics``."""
    return dict(zip(ROW_KEYS, (benchmark, measure, value, unit, reference, reference_value, ratio, target, ok)))


def repeats_text(n: int, what: str = "runs") -> str:
    """How a figure was reduced, for the measure column: "median of 3 runs" or "1 run"."""
    return f"median of {n} {what}" if n > 1 else f"1 {what.rstrip('s')}"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _number(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    text = f"{value:.4g}"
    return f"{text} {unit}" if unit else text


def _cell(text: str) -> str:
    """Markdown table cells cannot hold a bare ``|`` (the metrics rows' "|R - scipy R|")."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table with the columns of ``TABLE_COLUMNS``."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        reference = r["reference"] or ""
        if r["reference_value"] is not None:
            reference = f"{reference}: {_number(r['reference_value'], r['unit'])}"
        cells = [
            r["benchmark"],
            r["measure"],
            _number(r["value"], r["unit"]),
            reference,
            "" if r["ratio"] is None else f"{r['ratio']:.3g}x",
            r["target"],
            {True: "yes", False: "**NO**", None: ""}[r["ok"]],
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Measurements in a child process
# --------------------------------------------------------------------------------------------------


def quiet_library_warnings() -> None:
    """Keep the terminal for the table: MONAI's deprecation notices and its note on replaced affines
    (which ctpm's transforms trigger by design) say nothing about the measurements."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*Setting affine, but the applied meta contains an affine.*")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # no /proc (macOS): ru_maxrss is in bytes there, in KiB on Linux

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_child(module: str, task: dict, *, fast_malloc: bool) -> dict:
    """Run ``python -m module --child TASK`` in a fresh process and return its result.

    A fresh process per measurement gives each one its own peak memory and no allocator or cache
    state left by the previous one. ``fast_malloc`` sets ``FAST_MALLOC`` in its environment, and
    otherwise removes it, so that "glibc defaults" holds even when the caller's shell set them.
    """
    env = {k: v for k, v in os.environ.items() if k not in FAST_MALLOC}
    if fast_malloc:
        env.update(FAST_MALLOC)
    # benchmarks/ is not an installed package: the child finds it from the repository root.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", module, "--child", json.dumps(task)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-25:])
        raise RuntimeError(f"{module} --child {json.dumps(task)} failed (exit {proc.returncode}):\n{tail}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_RESULT):
            return json.loads(line[len(CHILD_RESULT):])
    raise RuntimeError(f"{module} --child {json.dumps(task)} printed no result")


def bench_main(run_bench: Callable[..., list[dict]], child: Callable[[dict], dict] | None = None) -> None:
    """Entry point of ``python -m benchmarks.bench_<name> [--quick]``: print the bench's table.

    With ``--child TASK`` (JSON), do one measurement for ``run_child`` instead: the result of
    ``child(task)`` plus the process's peak RSS, as one JSON line on stdout.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fast smoke run (tiny sizes, 1 repeat)")
    parser.add_argument("--child", metavar="TASK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_library_warnings()
    if args.child is not None:
        if child is None:
            parser.error("this benchmark has no child measurements")
        result = child(json.loads(args.child))
        result["peak_rss_bytes"] = peak_rss_bytes()
        print(CHILD_RESULT + json.dumps(result), flush=True)
        return
    print(markdown_table(run_bench(quick=args.quick)))


# --------------------------------------------------------------------------------------------------
# Machine, README
# --------------------------------------------------------------------------------------------------


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return None


def machine_description() -> list[str]:
    """What the figures were measured on, one markdown bullet per line."""
    import monai
    import numpy
    import torch

    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_kib = _proc_field("/proc/meminfo", "MemTotal")
    ram = f"{int(mem_kib.split()[0]) * 1024 / GB:.1f} GB RAM" if mem_kib else "RAM unknown"
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
    except OSError:  # not a Linux with os-release
        os_name = platform.platform(terse=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return [
        f"- CPU: {cpu}, {cores} cores available to this process, {ram}",
        f"- OS: {os_name} ({platform.system()} {platform.release()})",
        f"- Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
        f"MONAI {monai.__version__}",
        f"- GPU: {gpu}",
    ]


def report(rows: list[dict], command: str, load: tuple[float, float], elapsed_s: float) -> str:
    """The README section: how and where the table was measured, then the table."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured with `{command}` on {date}, in {elapsed_s / 60:.1f} min; the machine is shared "
        f"(1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end), so timings "
        "are medians and targets are stated against references measured in the same run.",
        "",
        *machine_description(),
        "",
        markdown_table(rows),
    ]
    return "\n".join(lines)


class MarkersMissing(ValueError):
    """The README lacks the bench markers (or has them out of order)."""


def _marker_span(text: str, path: Path) -> tuple[int, int]:
    """Start and end offsets of what lies between the markers."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < 0 or end < start:
        raise MarkersMissing(f"{path} has no '{README_START}' ... '{README_END}' section for the benchmark table")
    return start + len(README_START), end


def check_readme(path: Path) -> None:
    """Raise ``MarkersMissing`` (or OSError) before any benchmark runs, not after minutes of them."""
    _marker_span(path.read_text(), path)


def update_readme(path: Path, section: str) -> None:
    """Replace what lies between the markers by ``section``; the rest of the file is kept as is."""
    text = path.read_text()
    begin, end = _marker_span(text, path)
    tmp = path.with_name(f".{path.name}.bench-tmp")
    tmp.write_text(text[:begin] + "\n" + section.strip("\n") + "\n" + text[end:])
    tmp.replace(path)  # atomic: an interrupted write never leaves half a README


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def run_benches(names: Sequence[str], quick: bool) -> tuple[list[dict], list[str]]:
    """Rows of the named benchmarks in order, and the names of those that failed. A failure shows
    its traceback and a row saying so, and the others still run."""
    rows: list[dict] = []
    failed: list[str] = []
    for name in names:
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            rows += importlib.import_module(BENCHES[name]).run(quick=quick)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            rows.append(row(name, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}", None, "", ok=False))
            failed.append(name)
        print(f"bench {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return rows, failed


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run (tiny sizes, 1 repeat)")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), metavar="NAME",
                        help=f"run only these benchmarks ({', '.join(BENCHES)})")
    parser.add_argument("--readme", type=Path, help="replace the bench section of this README")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine here")
    args = parser.parse_args(argv)
    if args.readme is not None:
        try:
            check_readme(args.readme)
        except (MarkersMissing, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    import torch

    quiet_library_warnings()
    torch.set_num_threads(2)  # the targets are stated for 2 CPU cores
    names = args.only or list(BENCHES)
    load_start, start = os.getloadavg()[0], time.perf_counter()
    rows, failed = run_benches(names, args.quick)
    elapsed, load_end = time.perf_counter() - start, os.getloadavg()[0]
    command = shlex.join(["python", "-m", "benchmarks.run", *argv])
    print(markdown_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"command": command, "machine": machine_description(),
                                         "load_average": [load_start, load_end], "elapsed_s": elapsed,
                                         "rows": rows}, indent=1))
    if failed:
        print(f"error: benchmark(s) failed: {', '.join(failed)}; the README is left as it was", file=sys.stderr)
        return 1
    if args.readme is not None:
        try:
            update_readme(args.readme, report(rows, command, (load_start, load_end), elapsed))
        except (MarkersMissing, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"wrote the table into {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
