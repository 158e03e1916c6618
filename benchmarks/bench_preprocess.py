"""Preprocessing of one clinical-size patient against the floor of reading and resampling its CT.

``preprocess_patient`` with the default config (CT and SPECT onto the 1 mm grid, lungs, per-lung
ROIs of 128 x 64 x 64) on a ``clinical`` synthetic patient of institution A (CT 512 x 512 x 256).
The floor is what any pipeline on the 1 mm grid must do: ``load_image`` of the CT and one MONAI
``Spacing`` of the whole CT to 1 mm (float32, bilinear, as the pipeline's ``Spacingd``).

Each measurement runs in a fresh process, which reports its wall time (imports excluded) and its
peak RSS (VmHWM); floor and pipeline processes alternate, so that a change in the load of the
shared machine hits both. Targets: time <= 3x the floor, peak RSS < 4 GB.

Run: ``python -m benchmarks.bench_preprocess [--quick]``; ``run()`` returns the rows for the README table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from monai.transforms import Spacing

from benchmarks.bench_synth import write_synthetic_patient
from benchmarks.run import GB, bench_main, median, repeats_text, row, run_child
from ctpm.data.io import load_image
from ctpm.data.preprocess import preprocess_patient
from ctpm.data.transforms import PreprocessConfig, volume_to_metatensor

CHILD_MODULE = "benchmarks.bench_preprocess"  # not __name__: that is "__main__" under python -m
MAX_RATIO = 3.0
MAX_PEAK_BYTES = 4 * GB
# The smoke run's config: a 4 mm grid and small ROIs, as in the test suite.
QUICK_PREPROCESSING = {"spacing": [4.0, 4.0, 4.0], "roi_size": [32, 16, 16]}


def _child(task: dict) -> dict:
    """One measurement in this (fresh) process: "floor" or "preprocess"."""
    torch.set_num_threads(2)
    cfg = PreprocessConfig.from_any(task["preprocessing"])
    start = time.perf_counter()
    if task["measure"] == "floor":
        image = volume_to_metatensor(load_image(task["ct"], kind="ct"))
        Spacing(pixdim=tuple(cfg.spacing), mode="bilinear", dtype=torch.float32)(image)
    else:
        preprocess_patient({"patient_id": task["patient_id"], "ct": task["ct"], "spect": task["spect"]}, cfg)
    return {"seconds": time.perf_counter() - start}


def run(quick: bool = False) -> list[dict]:
    """Preprocessing time and peak RSS against the floor's.

    Args:
        quick: a tiny patient at QUICK_PREPROCESSING, one process each, instead of a clinical one at
            the default config, median of 3.
    """
    preset = "tiny" if quick else "clinical"
    cfg = PreprocessConfig.from_any(QUICK_PREPROCESSING if quick else None)
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="ctpm-bench-preprocess-") as tmp:
        patient = write_synthetic_patient(preset, "A", Path(tmp))
        results: dict[str, list[dict]] = {"floor": [], "preprocess": []}
        for _ in range(repeats):
            for measure in results:
                task = {**patient, "measure": measure, "preprocessing": cfg.to_dict()}
                # glibc defaults: the peak RSS is then what a ctpm-preprocess user sees (raised malloc
                # thresholds would keep freed buffers and inflate it)
                results[measure].append(run_child(CHILD_MODULE, task, fast_malloc=False))

    def seconds(measure: str) -> float:
        return median([r["seconds"] for r in results[measure]])

    def peak(measure: str) -> float:
        return max(r["peak_rss_bytes"] for r in results[measure]) / GB

    shape = "x".join(str(n) for n in patient["ct_shape"])
    grid = "x".join(f"{v:g}" for v in cfg.spacing)
    roi = "x".join(str(v) for v in cfg.roi_size)
    what = (f"one {preset} patient, institution A (CT {shape}), CT + SPECT, {grid} mm grid, ROIs {roi}; "
            f"fresh process each")
    floor = f"floor: load_image + MONAI Spacing to {grid} mm (float32, bilinear)"
    time_ratio = seconds("preprocess") / seconds("floor")
    peak_ratio = peak("preprocess") / peak("floor")
    return [
        row("preprocess", f"preprocess_patient time, {what} ({repeats_text(repeats)})", seconds("preprocess"), "s",
            floor, seconds("floor"), time_ratio, f"<= {MAX_RATIO:g}x the floor", time_ratio <= MAX_RATIO),
        row("preprocess", f"peak RSS of that process (VmHWM, max of {repeats})", peak("preprocess"), "GB",
            f"{floor}, its peak RSS", peak("floor"), peak_ratio, f"< {MAX_PEAK_BYTES / GB:g} GB",
            peak("preprocess") * GB < MAX_PEAK_BYTES),
    ]


if __name__ == "__main__":
    bench_main(run, _child)
