"""Tests of ctpm.metrics: SpearmanR / spearman_r against scipy, FunctionalDice against hand counts,
and both metrics under a real 2-process DDP run."""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.functional import spearman_corrcoef

from ctpm.metrics import FunctionalDice, SpearmanR, functional_dice, spearman_r
from ctpm.metrics.spearman import (
    _average_ranks_numpy,
    _average_ranks_torch,
    _spearman_one_volume,
)

AGREEMENT = 1e-6  # the required agreement with scipy
DDP_TIMEOUT_S = 120.0  # a hung DDP run fails the test after this long instead of blocking CI


def heavy_tie_maps(
    rng: np.random.Generator, shape: tuple[int, ...], levels: int = 8, zero_fraction: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """Correlated float32 (preds, target) maps in [0, 1] with heavy ties.

    Values are quantised to ``levels`` steps and clipped at 1 (as standardised SPECT is), and the
    same ``zero_fraction`` of voxels is exactly 0 in both maps, so most voxels share their value
    with thousands of others.
    """
    target = rng.gamma(4.0, 0.25, shape)
    preds = target + rng.normal(0.0, 0.3, shape)
    zero = rng.random(shape) < zero_fraction
    maps = []
    for values in (preds, target):
        values = np.clip(np.round(values * levels) / levels, 0.0, 1.0)
        values[zero] = 0.0
        maps.append(values.astype(np.float32))
    return maps[0], maps[1]


def scipy_r(preds: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        preds, target = preds[mask], target[mask]
    return float(scipy.stats.spearmanr(preds.ravel(), target.ravel()).statistic)


# --- SpearmanR ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_spearman_matches_scipy_on_heavy_ties(batch_size: int, masked: bool) -> None:
    rng = np.random.default_rng(batch_size + 10 * masked)
    metric = SpearmanR()
    expected = []
    for _ in range(3):  # several update calls accumulate
        preds, target = heavy_tie_maps(rng, (batch_size, 1, 8, 16, 16))
        mask = rng.random(preds.shape) < 0.6 if masked else None
        per_volume = [
            scipy_r(preds[b], target[b], None if mask is None else mask[b])
            for b in range(batch_size)
        ]
        args = [torch.from_numpy(preds), torch.from_numpy(target)]
        if mask is not None:
            args.append(torch.from_numpy(mask))
        np.testing.assert_allclose(spearman_r(*args).numpy(), per_volume, rtol=0, atol=AGREEMENT)
        metric.update(*args)
        expected += per_volume
    assert metric.compute().dtype == torch.float64
    assert metric.compute().item() == pytest.approx(np.mean(expected), abs=AGREEMENT)


def test_spearman_functional_on_single_numpy_volume() -> None:
    rng = np.random.default_rng(1)
    preds, target = heavy_tie_maps(rng, (12, 20, 20))
    mask = rng.random(preds.shape) < 0.7
    r = spearman_r(preds, target)
    assert isinstance(r, float)
    assert r == pytest.approx(scipy_r(preds, target), abs=AGREEMENT)
    # A 0/1 integer mask, float64, big-endian, flipped (negative strides) and read-only maps,
    # as NIfTI readers return them, give the same R.
    expected = scipy_r(preds, target, mask)
    assert spearman_r(preds, target, mask) == pytest.approx(expected, abs=AGREEMENT)
    int_mask = mask.astype(np.uint8)
    assert spearman_r(preds, target, int_mask) == pytest.approx(expected, abs=AGREEMENT)
    assert spearman_r(
        preds.astype(np.float64), target.astype(">f4"), mask
    ) == pytest.approx(expected, abs=AGREEMENT)
    flipped = [x[::-1, :, ::-1] for x in (preds, target, mask)]
    assert spearman_r(*flipped) == pytest.approx(expected, abs=AGREEMENT)
    preds.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spearman_r(preds, target, mask) == pytest.approx(expected, abs=AGREEMENT)


def test_spearman_ranks_signed_zeros_infinities_and_negatives_like_scipy() -> None:
    special = [-0.0, 0.0, -1.0, 1.0, np.inf, -np.inf, -2.5, 1e-45, -1e-45, 0.0, -0.0, 1.0]
    values = np.array(special * 3, dtype=np.float32)
    other = np.random.default_rng(2).random(values.size).astype(np.float32)
    for dtype in (np.float32, np.float64):
        expected_ranks = scipy.stats.rankdata(values.astype(dtype))
        np.testing.assert_array_equal(_average_ranks_numpy(values.astype(dtype))[0], expected_ranks)
        assert spearman_r(values.astype(dtype), other) == pytest.approx(
            scipy_r(values, other), abs=AGREEMENT
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_ranking_used_on_accelerators_matches_scipy(dtype: torch.dtype) -> None:
    # The torch kernel runs for non-CPU tensors; here it is checked on CPU against scipy.
    preds, _ = heavy_tie_maps(np.random.default_rng(3), (5000,))
    values = np.concatenate([preds, [-0.0, 0.0, -np.inf, np.inf, -3.0]]).astype(np.float32)
    ranks, n_distinct = _average_ranks_torch(torch.from_numpy(values).to(dtype))
    np.testing.assert_array_equal(ranks.numpy(), scipy.stats.rankdata(values))
    assert n_distinct == np.unique(values).size
    target = np.random.default_rng(4).random(values.size).astype(np.float32)
    r, defined = _spearman_one_volume(torch.from_numpy(values).to(dtype), torch.from_numpy(target))
    assert defined and r == pytest.approx(scipy_r(values, target), abs=AGREEMENT)


def test_spearman_other_input_dtypes_match_float64() -> None:
    preds, target = heavy_tie_maps(np.random.default_rng(4), (2, 1, 6, 10, 10))
    expected = spearman_r(torch.from_numpy(preds).double(), torch.from_numpy(target).double())
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        # Quantised steps of 1/8 in [0, 1] are exact in every one of these dtypes.
        got = spearman_r(torch.from_numpy(preds).to(dtype), torch.from_numpy(target).to(dtype))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    integers = spearman_r(torch.from_numpy(preds * 8).int(), torch.from_numpy(target * 8).long())
    torch.testing.assert_close(integers, expected, rtol=0, atol=1e-12)


def test_spearman_perfect_and_reversed_predictions() -> None:
    _, target = heavy_tie_maps(np.random.default_rng(5), (2, 1, 6, 10, 10))
    target = torch.from_numpy(target)
    metric = SpearmanR()
    metric.update(target.clone(), target)
    assert metric.compute().item() == pytest.approx(1.0, abs=1e-12)
    # Any strictly increasing transform keeps the ranks.
    transformed = spearman_r(torch.exp(3 * target), target)
    assert transformed.tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    reversed_metric = SpearmanR()
    reversed_metric.update(-target, target)
    assert reversed_metric.compute().item() == pytest.approx(-1.0, abs=1e-12)


def test_spearman_undefined_volumes_zero_or_skip() -> None:
    rng = np.random.default_rng(6)
    preds, target = (torch.from_numpy(x) for x in heavy_tie_maps(rng, (4, 1, 4, 8, 8)))
    mask = torch.ones_like(preds, dtype=torch.bool)
    preds[1] = 0.3  # constant prediction: ranks have zero variance
    target[2] = 1.0  # constant reference
    mask[3] = False
    mask[3, 0, 0, 0, 0] = True  # a single masked voxel
    r0 = scipy_r(preds[0].numpy(), target[0].numpy())

    zero = SpearmanR(undefined="zero")
    zero.update(preds, target, mask)
    assert zero.compute().item() == pytest.approx(r0 / 4, abs=AGREEMENT)
    skip = SpearmanR(undefined="skip")
    skip.update(preds, target, mask)
    assert skip.compute().item() == pytest.approx(r0, abs=AGREEMENT)
    assert skip.n_volumes.item() == 1

    per_volume = spearman_r(preds, target, mask)
    assert per_volume[1:].tolist() == [0.0, 0.0, 0.0]
    assert torch.isnan(spearman_r(preds, target, mask, undefined="nan")[1:]).all()
    assert math.isnan(spearman_r(np.ones(3), np.arange(3.0), undefined="nan"))

    only_undefined = SpearmanR(undefined="skip")
    only_undefined.update(preds[1:3], target[1:3])
    assert torch.isnan(only_undefined.compute())


def test_spearman_functional_accepts_tensors_that_require_grad() -> None:
    preds = torch.rand(2, 30, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 30, dtype=torch.float64)
    expected = [scipy_r(preds[b].detach().numpy(), target[b].numpy()) for b in range(2)]
    assert spearman_r(preds, target).tolist() == pytest.approx(expected, abs=AGREEMENT)


def test_spearman_nan_voxels_propagate() -> None:
    preds = torch.rand(2, 50, dtype=torch.float64)
    target = torch.rand(2, 50, dtype=torch.float64)
    preds[0, 7] = float("nan")
    r = spearman_r(preds, target)
    assert math.isnan(r[0]) and not math.isnan(r[1])


def test_spearman_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same shape"):
        spearman_r(torch.rand(2, 10), torch.rand(2, 11))
    with pytest.raises(ValueError, match="batch dimension"):
        spearman_r(torch.rand(10), torch.rand(10))
    with pytest.raises(TypeError, match="numpy"):
        spearman_r(np.random.rand(2, 10), torch.rand(2, 10))
    with pytest.raises(ValueError, match="undefined"):
        SpearmanR(undefined="ignore")


def test_torchmetrics_spearman_is_wrong_on_a_large_tie_group() -> None:
    # 120,000 voxels of SPECT standardised as the pipeline does (divided by its 75th percentile,
    # clipped at 1.0): the top quarter ties at 1.0 with ranks ~90,000..120,000, whose sum
    # (~3.2e9) overflows torchmetrics' int32 accumulator.
    rng = np.random.default_rng(7)
    target = rng.gamma(4.0, 0.25, 120_000)
    preds = target + rng.normal(0.0, 0.2, target.size)
    target, preds = (
        np.clip(x / np.percentile(x, 75), 0, 1).astype(np.float32) for x in (target, preds)
    )
    expected = scipy_r(preds, target)
    theirs = spearman_corrcoef(torch.from_numpy(preds), torch.from_numpy(target)).item()
    assert abs(theirs - expected) > 0.1
    assert spearman_r(preds, target) == pytest.approx(expected, abs=AGREEMENT)


# --- FunctionalDice ----------------------------------------------------------------------------

# One 2x2x2 volume, written out voxel by voxel (flattened order):
#   voxel   0     1     2     3     4     5     6     7
#   preds   0.9   0.7   0.5   0.1   0.66  0.3   0.8   0.2
#   target  0.8   0.2   0.7   0.1   0.9   0.65  0.4   0.3
# At 0.66 (>= is high): P_high = {0,1,4,6}, Y_high = {0,2,4}, overlap {0,4}
#   -> high Dice = 2*2 / (4+3) = 4/7; P_low = {2,3,5,7}, Y_low = {1,3,5,6,7}, overlap {3,5,7}
#   -> low Dice = 2*3 / (4+5) = 2/3.
HAND_PREDS = np.array([0.9, 0.7, 0.5, 0.1, 0.66, 0.3, 0.8, 0.2]).reshape(2, 2, 2)
HAND_TARGET = np.array([0.8, 0.2, 0.7, 0.1, 0.9, 0.65, 0.4, 0.3]).reshape(2, 2, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dice_hand_computed_example(dtype: type) -> None:
    high, low = functional_dice(HAND_PREDS.astype(dtype), HAND_TARGET.astype(dtype))
    assert isinstance(high, float) and isinstance(low, float)
    assert (high, low) == pytest.approx((4 / 7, 2 / 3), abs=1e-15)


def test_dice_hand_computed_with_mask() -> None:
    # Without voxels 0 and 7: P_high = {1,4,6}, Y_high = {2,4}, overlap {4} -> 2/5;
    # P_low = {2,3,5}, Y_low = {1,3,5,6}, overlap {3,5} -> 4/7.
    mask = np.ones(8, dtype=bool)
    mask[[0, 7]] = False
    high, low = functional_dice(HAND_PREDS, HAND_TARGET, mask.reshape(2, 2, 2))
    assert (high, low) == pytest.approx((2 / 5, 4 / 7), abs=1e-15)


def test_dice_hand_computed_other_threshold() -> None:
    # At 0.5: P_high = {0,1,2,4,6}, Y_high = {0,2,4,5}, overlap {0,2,4} -> 6/9;
    # P_low = {3,5,7}, Y_low = {1,3,6,7}, overlap {3,7} -> 4/7.
    high, low = functional_dice(HAND_PREDS, HAND_TARGET, threshold=0.5)
    assert (high, low) == pytest.approx((2 / 3, 4 / 7), abs=1e-15)
    metric = FunctionalDice(threshold=0.5)
    metric.update(torch.from_numpy(HAND_PREDS)[None], torch.from_numpy(HAND_TARGET)[None])
    result = metric.compute()
    assert set(result) == {"high", "low"}
    assert (result["high"].item(), result["low"].item()) == pytest.approx((2 / 3, 4 / 7), abs=1e-15)


def test_dice_threshold_is_inclusive_in_float32() -> None:
    # float32(0.66) is the float32 value closest to 0.66 and lies above it, so it is high.
    preds = np.array([0.66, np.nextafter(np.float32(0.66), np.float32(0))], dtype=np.float32)
    high, low = functional_dice(preds, np.array([0.66, 0.1]))
    assert (high, low) == (1.0, 1.0)


def test_dice_empty_class_convention() -> None:
    low_only = np.full((2, 2, 2), 0.2)
    # No high voxel in either map: they agree on the high class.
    assert functional_dice(low_only, low_only * 1.5) == (1.0, 1.0)
    # High voxels in the prediction only: no overlap.
    high_pred = low_only.copy()
    high_pred[0, 0, 0] = 0.9
    assert functional_dice(high_pred, low_only) == pytest.approx((0.0, 2 * 7 / 15))
    # An empty mask leaves both classes empty in both maps.
    assert functional_dice(high_pred, low_only, np.zeros((2, 2, 2), dtype=bool)) == (1.0, 1.0)


def test_dice_metric_averages_volumes_over_updates() -> None:
    rng = np.random.default_rng(8)
    metric = FunctionalDice()
    per_volume_high, per_volume_low = [], []
    for batch_size in (2, 3):
        preds = torch.from_numpy(rng.random((batch_size, 1, 4, 5, 6)) * 1.3)
        target = torch.from_numpy(rng.random((batch_size, 1, 4, 5, 6)) * 1.3)
        mask = torch.from_numpy(rng.random((batch_size, 1, 4, 5, 6)) < 0.8)
        metric.update(preds, target, mask)
        for b in range(batch_size):
            p, y = preds[b][mask[b]].numpy(), target[b][mask[b]].numpy()
            for cls_pred, cls_target, out in (
                (p >= 0.66, y >= 0.66, per_volume_high),
                (p < 0.66, y < 0.66, per_volume_low),
            ):
                out.append(2 * (cls_pred & cls_target).sum() / (cls_pred.sum() + cls_target.sum()))
    result = metric.compute()
    assert result["high"].item() == pytest.approx(np.mean(per_volume_high), abs=1e-12)
    assert result["low"].item() == pytest.approx(np.mean(per_volume_low), abs=1e-12)


# --- DDP ---------------------------------------------------------------------------------------


def _ddp_volumes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """7 small volumes with masks; volume 5 has a constant prediction (undefined R)."""
    preds, target = heavy_tie_maps(np.random.default_rng(9), (7, 1, 4, 8, 8))
    mask = np.random.default_rng(10).random(preds.shape) < 0.8
    preds[5] = 0.5
    return torch.from_numpy(preds), torch.from_numpy(target), torch.from_numpy(mask)


def _metric_values(batches: list[slice]) -> dict[str, float]:
    """Update fresh metrics with the given slices of the volumes and compute them."""
    preds, target, mask = _ddp_volumes()
    metrics = {"zero": SpearmanR(), "skip": SpearmanR(undefined="skip"), "dice": FunctionalDice()}
    for batch in batches:
        for metric in metrics.values():
            metric.update(preds[batch], target[batch], mask[batch])
    dice = metrics["dice"].compute()
    return {
        "spearman_zero": metrics["zero"].compute().item(),
        "spearman_skip": metrics["skip"].compute().item(),
        "dice_high": dice["high"].item(),
        "dice_low": dice["low"].item(),
    }


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        # Uneven halves (4 and 3 volumes, rank 0 in two updates), so that averaging the ranks'
        # means instead of all volumes would give a different number.
        batches = [slice(0, 3), slice(3, 4)] if rank == 0 else [slice(4, 7)]
        torch.save(_metric_values(batches), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_equal_single_process(tmp_path: Path) -> None:
    expected = _metric_values([slice(0, 7)])
    context = mp.spawn(
        _ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False
    )
    deadline = time.monotonic() + DDP_TIMEOUT_S
    # join() returns as soon as one process ends; loop until both have, or give up.
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0), grace_period=5):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP workers did not finish within {DDP_TIMEOUT_S:.0f} s")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got == pytest.approx(expected, abs=1e-12), f"rank {rank}"
