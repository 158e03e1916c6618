"""Benchmark of ctpm.metrics.spearman_r against scipy and torchmetrics on 2 million voxels.

The evaluation computes the voxel-wise Spearman R at 1 mm, over millions of lung voxels per
patient, on maps with heavy ties (zeros where there is no perfusion, standardised SPECT clipped at
1.0). This measures our time and agreement with ``scipy.stats.spearmanr`` (the reference), and
shows the error of ``torchmetrics.functional.spearman_corrcoef`` on such data.

Run: ``python -m benchmarks.bench_metrics``; ``run()`` returns the rows for the README table.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import scipy.stats
import torch
from torchmetrics.functional import spearman_corrcoef

from ctpm.metrics import spearman_r

N_VOXELS = 2_000_000
ZERO_FRACTION = 0.15  # voxels exactly 0 in both maps
LEVELS = 16  # quantisation steps in [0, 1]
AGREEMENT = 1e-6
SEED = 0


def heavy_tie_maps(continuous_preds: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Correlated float32 (preds, target) maps of ``N_VOXELS`` voxels in [0, 1].

    The target is quantised to ``LEVELS`` steps and clipped at 1; the same ``ZERO_FRACTION`` of
    voxels is exactly 0 in both maps. The prediction is quantised likewise, or left continuous
    (as a network's output) when ``continuous_preds``.
    """
    rng = np.random.default_rng(SEED)
    target = rng.gamma(4.0, 0.25, N_VOXELS)
    preds = target + rng.normal(0.0, 0.3, N_VOXELS)
    zero = rng.random(N_VOXELS) < ZERO_FRACTION
    target = np.round(target * LEVELS) / LEVELS
    if not continuous_preds:
        preds = np.round(preds * LEVELS) / LEVELS
    maps = []
    for values in (preds, target):
        values = np.clip(values, 0.0, 1.0)
        values[zero] = 0.0
        maps.append(values.astype(np.float32))
    return maps[0], maps[1]


def _median_time(function: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Median wall time of ``function()`` in seconds over ``repeats`` runs, and its result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _row(
    benchmark: str,
    measure: str,
    value: float,
    unit: str,
    reference: str,
    reference_value: float | None,
    ratio: float | None,
    target: str,
    ok: bool | None,
) -> dict:
    return {
        "benchmark": benchmark,
        "measure": measure,
        "value": value,
        "unit": unit,
        "reference": reference,
        "reference_value": reference_value,
        "ratio": ratio,
        "target": target,
        "ok": ok,
    }


def run(quick: bool = False) -> list[dict]:
    """Time and compare the Spearman implementations; one dict per table row.

    Args:
        quick: One timing run per measurement instead of the median of 3.
    """
    torch.set_num_threads(2)
    repeats = 1 if quick else 3
    median = f"median of {repeats}" if repeats > 1 else "1 run"

    # First calls pay one-off costs (lazy imports, allocator warm-up) that are not the metric's.
    small_preds, small_target = np.random.default_rng(SEED).random((2, 1000), dtype=np.float32)
    spearman_r(small_preds, small_target)
    spearman_corrcoef(torch.from_numpy(small_preds), torch.from_numpy(small_target))
    scipy.stats.spearmanr(small_preds, small_target)

    rows = []
    for continuous_preds in (False, True):
        preds, target = heavy_tie_maps(continuous_preds)
        data = (
            "2e6 voxels, continuous preds, quantised target, 15% zeros in both"
            if continuous_preds
            else "2e6 voxels, both quantised, 15% zeros in both"
        )
        scipy_time, scipy_value = _median_time(
            lambda p=preds, t=target: float(scipy.stats.spearmanr(p, t).statistic), repeats
        )
        ours_time, ours_value = _median_time(lambda p=preds, t=target: spearman_r(p, t), repeats)
        rows.append(
            _row(
                "spearman_r", f"time ({data}; {median})", ours_time, "s",
                "scipy.stats.spearmanr time", scipy_time, scipy_time / ours_time,
                "faster than scipy", ours_time < scipy_time,
            )
        )
        if continuous_preds:
            continue  # the agreement and torchmetrics rows are about the heavy-ties data
        difference = abs(ours_value - scipy_value)
        rows.append(
            _row(
                "spearman_r", f"|R - scipy R| ({data})", difference, "",
                "scipy.stats.spearmanr R", scipy_value, None,
                f"<= {AGREEMENT:g}", difference <= AGREEMENT,
            )
        )
        preds_tensor, target_tensor = torch.from_numpy(preds), torch.from_numpy(target)
        theirs_time, theirs_value = _median_time(
            lambda p=preds_tensor, t=target_tensor: spearman_corrcoef(p, t).item(), repeats
        )
        rows.append(
            _row(
                "torchmetrics spearman_corrcoef", f"|R - scipy R| ({data})",
                abs(theirs_value - scipy_value), "", "scipy.stats.spearmanr R", scipy_value, None,
                "none", None,
            )
        )
        rows.append(
            _row(
                "torchmetrics spearman_corrcoef", f"time ({data}; {median})", theirs_time, "s",
                "scipy.stats.spearmanr time", scipy_time, scipy_time / theirs_time, "none", None,
            )
        )
    return rows


if __name__ == "__main__":
    columns = ["benchmark", "measure", "value", "unit", "reference", "reference_value", "ratio",
               "target", "ok"]
    print(" | ".join(columns))
    for row in run():
        cells = (f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns)
        print(" | ".join(cells))
