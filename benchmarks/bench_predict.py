"""Prediction of one clinical-size patient end to end, as ``ctpm-predict`` does it, on 2 CPU threads.

CT file in, perfusion and functional maps written: the checkpoint is loaded, the CT read and
preprocessed (without SPECT), the default ARNN (random weights: speed does not depend on them)
run on both lungs, the maps restored to the CT's 512 x 512 x 256 grid and written. The breakdown
times ``preprocess_patient`` and ``Predictor.roi_maps`` inside ``Predictor.predict``; the reference is
the I/O floor of the task: reading the CT (``load_image``) and writing the maps (``write_prediction``:
perfusion, functional and lung labels).

Each run is a fresh process with glibc's malloc thresholds raised (see ``benchmarks.run.FAST_MALLOC``).
Target: < 20 s end to end.

Run: ``python -m benchmarks.bench_predict [--quick]``; ``run()`` returns the rows for the README table.
"""

from __future__ import annotations

import inspect
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ctpm.lightning.predictor as predictor_module
from benchmarks.bench_synth import write_synthetic_patient
from benchmarks.run import GB, bench_main, median, repeats_text, row, run_child
from ctpm.data.io import load_image
from ctpm.data.transforms import PreprocessConfig
from ctpm.lightning.predictor import Predictor, write_prediction
from ctpm.models import ARNN

CHILD_MODULE = "benchmarks.bench_predict"  # not __name__: that is "__main__" under python -m
TARGET_S = 20.0
# The smoke run: a narrow, shallow network at the test suite's preprocessing.
QUICK_NET = {"base_channels": 4, "depth": 3}
QUICK_PREPROCESSING = {"spacing": [4.0, 4.0, 4.0], "roi_size": [32, 16, 16]}
BREAKDOWN = {  # the child's result key: what it times ({roi}: the ROI size)
    "load checkpoint": "load the checkpoint (Predictor)",
    "preprocess": "preprocess_patient (CT only: the record)",
    "network": "network (Predictor.roi_maps), both lungs at {roi}",
    "restore + write": "restore (ROIs -> evaluation grid -> CT grid) + write the maps",
}


def arnn_config(**overrides: Any) -> dict[str, Any]:
    """The Hydra config of ``ARNN(**overrides)``: its target and every constructor argument, the
    defaults read from the signature so that they cannot drift from the class."""
    defaults = {name: p.default for name, p in inspect.signature(ARNN).parameters.items()}
    return {"_target_": "ctpm.models.ARNN", **defaults, **overrides}


def write_checkpoint(path: Path, net_config: dict[str, Any], preprocessing: dict[str, Any]) -> Path:
    """A checkpoint as ``ctpm-train`` writes it, as far as ``Predictor`` reads one: the network's
    weights under ``net.`` and the configs under ``ctpm``. Random weights, seeded."""
    torch.manual_seed(0)
    net = ARNN(**{k: v for k, v in net_config.items() if k != "_target_"})
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "ctpm": {"net_config": net_config, "preprocessing": preprocessing}}, path)
    return path


def _timed(function: Callable, seconds: list[float]) -> Callable:
    """``function`` that appends its wall time to ``seconds`` on every call."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return wrapper


def _child(task: dict) -> dict:
    """One prediction in this (fresh) process, timed step by step."""
    torch.set_num_threads(2)
    preprocess_s: list[float] = []
    network_s: list[float] = []
    # Time the real code path of Predictor.predict: its preprocess_patient (a module global) and its
    # roi_maps (an instance attribute shadows the method) are wrapped, not re-implemented here.
    predictor_module.preprocess_patient = _timed(predictor_module.preprocess_patient, preprocess_s)
    start = time.perf_counter()
    predictor = Predictor([task["checkpoint"]], device="cpu")
    loaded = time.perf_counter()
    predictor.roi_maps = _timed(predictor.roi_maps, network_s)
    prediction = predictor.predict({"patient_id": task["patient_id"], "ct": task["ct"]})
    write_prediction(prediction, Path(task["out"]))
    done = time.perf_counter()
    load_image(task["ct"], kind="ct")
    read_s = time.perf_counter() - done
    write_start = time.perf_counter()
    write_prediction(prediction, Path(task["out"]) / "again")
    write_s = time.perf_counter() - write_start
    total = done - start
    return {
        "total": total,
        "floor": read_s + write_s,
        "load checkpoint": loaded - start,
        "preprocess": sum(preprocess_s),
        "network": sum(network_s),
        "restore + write": total - (loaded - start) - sum(preprocess_s) - sum(network_s),
    }


def run(quick: bool = False) -> list[dict]:
    """End-to-end time against the I/O floor, its breakdown and the peak RSS.

    Args:
        quick: a tiny patient, a small network and the test suite's preprocessing, one process,
            instead of a clinical patient and the default network and config, median of 3.
    """
    preset = "tiny" if quick else "clinical"
    net_config = arnn_config(**(QUICK_NET if quick else {}))
    preprocessing = QUICK_PREPROCESSING if quick else {}  # {}: the default config, as the target asks
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="ctpm-bench-predict-") as tmp:
        patient = write_synthetic_patient(preset, "A", Path(tmp))
        checkpoint = write_checkpoint(Path(tmp) / "arnn.ckpt", net_config, preprocessing)
        results = [
            run_child(CHILD_MODULE, {"patient_id": patient["patient_id"], "ct": patient["ct"],
                                     "checkpoint": str(checkpoint), "out": str(Path(tmp) / f"pred-{i}")},
                      fast_malloc=True)
            for i in range(repeats)
        ]

    def seconds(key: str) -> float:
        return median([r[key] for r in results])

    cfg = PreprocessConfig.from_any(preprocessing)
    shape = "x".join(str(n) for n in patient["ct_shape"])
    roi = "x".join(str(v) for v in cfg.roi_size)
    net = "default ARNN" if not quick else "ARNN " + ", ".join(f"{k}={v}" for k, v in QUICK_NET.items())
    total = seconds("total")
    rows = [row(
        "predict", f"end to end, one {preset} patient, institution A (CT {shape}): CT file in, perfusion + "
        f"functional maps written; single {net}, CPU, 2 threads, fresh process ({repeats_text(repeats)})",
        total, "s", "I/O floor: load_image of the CT + write_prediction", seconds("floor"),
        total / seconds("floor"), f"< {TARGET_S:g} s", total < TARGET_S,
    )]
    for key, what in BREAKDOWN.items():
        rows.append(row("predict", f"of which: {what.format(roi=roi)}", seconds(key), "s",
                        "end to end", total, seconds(key) / total))
    rows.append(row("predict", f"peak RSS of that process (VmHWM, max of {repeats})",
                    max(r["peak_rss_bytes"] for r in results) / GB, "GB"))
    return rows


if __name__ == "__main__":
    bench_main(run, _child)
