"""SPECT-to-CT registration of one clinical-size patient against the preprocessing itself.

A ``clinical`` synthetic cancer patient of institution A (CT 512 x 512 x 256, SPECT 128^3 at
4.4 mm), default preprocessing config. Three measurements, each in a fresh process:

- ``preprocess``: ``preprocess_patient`` without registration (the reference);
- ``register``: ``register_spect`` (rigid) alone, on the grid stage's CT and lungs (1 mm grid,
  cropped), the SPECT as written (aligned: the synthetic world shares one frame of reference) and
  the same SPECT moved by 10 mm and 3 degrees (its affine), so that the optimiser has work to do;
  the rows give the time and how far the transform found lies from the truth;
- ``preprocess+rigid``: ``preprocess_patient`` with ``register_spect=rigid``.

Target: registration time <= the preprocessing time (issue: "at most the preprocessing time").

Run: ``python -m benchmarks.bench_registration [--quick]``; ``run()`` returns the rows for the README table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_synth import write_synthetic_patient
from benchmarks.run import bench_main, median, repeats_text, row, run_child

CHILD_MODULE = "benchmarks.bench_registration"
QUICK_PREPROCESSING = {"spacing": [4.0, 4.0, 4.0], "roi_size": [32, 16, 16]}
MOTION = ((1.5, -2.0, 1.5), (6.0, -5.0, 6.5))  # Euler deg (about 3 degrees in all), translation mm (~10.3 mm)


def _child(task: dict) -> dict:
    torch.set_num_threads(2)
    from monai.transforms import Compose

    from ctpm.data.preprocess import patient_inputs, preprocess_patient
    from ctpm.data.registration import register_spect, rigid_matrix, rotation_angle_deg
    from ctpm.data.transforms import PreprocessConfig, grid_stage
    from ctpm.geometry import Grid

    cfg = PreprocessConfig.from_any(task["preprocessing"])
    inputs = {"patient_id": task["patient_id"], "ct": task["ct"], "spect": task["spect"]}
    if task["measure"] != "register":
        start = time.perf_counter()
        preprocess_patient(inputs, cfg)
        return {"seconds": time.perf_counter() - start}
    # up to the lungs on the cropped 1 mm grid (LoadVolumed ... LabelsFromOneHotd), then register
    d = Compose(grid_stage(cfg, with_spect=True).transforms[:6])(patient_inputs(inputs))
    ct, lungs, spect = d["ct"], d["lungs"][0].numpy() > 0, d["spect"]
    grid, sgrid = Grid.of(ct), Grid.of(spect)
    centre = grid.world(np.argwhere(lungs)).mean(0)
    out = {}
    for name, applied in (("aligned", np.eye(4)), ("moved", rigid_matrix(*MOTION, centre))):
        start = time.perf_counter()
        reg = register_spect(ct[0].numpy(), grid, spect[0].numpy(), Grid(applied @ sgrid.affine, sgrid.shape), lungs)
        c = np.r_[centre, 1.0]
        out[name] = {"seconds": time.perf_counter() - start, "iterations": reg.iterations,
                     "error_mm": float(np.linalg.norm((reg.matrix @ c - applied @ c)[:3])),
                     "error_deg": rotation_angle_deg(reg.matrix[:3, :3].T @ applied[:3, :3])}
    return out


def run(quick: bool = False) -> list[dict]:
    """Registration time against the preprocessing time, and the error of the transforms found.

    Args:
        quick: a tiny patient at QUICK_PREPROCESSING, one process each, instead of a clinical one at
            the default config, median of 3.
    """
    preset = "tiny" if quick else "clinical"
    base = QUICK_PREPROCESSING if quick else {}
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="ctpm-bench-registration-") as tmp:
        patient = write_synthetic_patient(preset, "A", Path(tmp))
        res: dict[str, list[dict]] = {"preprocess": [], "register": [], "preprocess+rigid": []}
        for _ in range(repeats):
            for measure in res:
                cfg = {**base, **({"register_spect": "rigid"} if measure == "preprocess+rigid" else {})}
                res[measure].append(run_child(CHILD_MODULE, {**patient, "measure": measure, "preprocessing": cfg},
                                              fast_malloc=False))

    pre = median([r["seconds"] for r in res["preprocess"]])
    with_reg = median([r["seconds"] for r in res["preprocess+rigid"]])
    shape = "x".join(str(n) for n in patient["ct_shape"])
    what = f"one {preset} patient, institution A (CT {shape})"
    reference = "preprocess_patient without registration"
    rows = []
    for case, label in (("aligned", "SPECT as written (aligned)"), ("moved", "SPECT moved 10 mm, 3 deg")):
        runs = [r[case] for r in res["register"]]
        sec = median([r["seconds"] for r in runs])
        rows.append(row("registration", f"register_spect rigid, {what}, {label} ({repeats_text(repeats)})", sec, "s",
                        reference, pre, sec / pre, "<= 1x the preprocessing", sec <= pre))
        err_mm, err_deg = max(r["error_mm"] for r in runs), max(r["error_deg"] for r in runs)
        rows.append(row("registration", f"registration error: distance from the truth at the lungs' centre, {label} "
                        f"(max of {repeats}; rotation {err_deg:.2f} deg, {runs[0]['iterations']} iterations)",
                        err_mm, "mm", target="none"))
    rows.append(row("registration", f"preprocess_patient with register_spect=rigid, {what} ({repeats_text(repeats)})",
                    with_reg, "s", reference, pre, with_reg / pre, "<= 2x the preprocessing", with_reg <= 2 * pre))
    return rows


if __name__ == "__main__":
    bench_main(run, _child)
