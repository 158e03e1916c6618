"""Voxel-wise Spearman rank correlation between a predicted and a reference perfusion map.

The paper's main voxel-level measure: for each volume, the Spearman R of the voxels inside the
evaluation mask. Ranks are exact (ties get their average rank, as ``scipy.stats.rankdata``'s
``"average"`` method) and all arithmetic on ranks is float64, so the value agrees with
``scipy.stats.spearmanr`` to about 1e-12 even on maps with many tied voxels (zeros outside the
perfused lung, SPECT clipped at 1.0). ``torchmetrics.functional.spearman_corrcoef`` does not:
it sums tied ranks in int32, which overflows once a tie group's rank sum passes 2**31 (e.g.
66,000 voxels tied at the lowest value, fewer higher up), and then returns a wrong value
without warning.

The module also holds the input handling shared with :mod:`ctpm.metrics.dice`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

ArrayLike = Tensor | np.ndarray

# dtypes that are ranked and thresholded as they are; anything else is converted to float64,
# which holds every float16/bfloat16 value and every integer below 2**53 exactly.
_NATIVE_FLOAT_DTYPES = (torch.float32, torch.float64)


def _volume_tensor(values: np.ndarray, dtype: np.dtype | type) -> Tensor:
    """A numpy volume as a contiguous native-endian tensor, without a copy where none is needed."""
    # NIfTI readers hand out big-endian, negatively strided or read-only arrays; torch accepts
    # none of the first two, so those are copied here.
    array = np.ascontiguousarray(values, dtype=dtype)
    with warnings.catch_warnings():
        # A read-only array (a memory-mapped NIfTI) is only read here, never written to.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _numpy_value_dtype(values: np.ndarray) -> np.dtype:
    """The native-endian dtype a numpy volume is ranked or thresholded in."""
    dtype = values.dtype.newbyteorder("=")
    return dtype if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float64)


def prepare_volumes(
    preds: ArrayLike, target: ArrayLike, mask: ArrayLike | None
) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """Bring metric inputs to one layout: values ``(B, N)`` float32/float64, mask ``(B, N)`` bool.

    Args:
        preds: Predicted maps, a tensor ``(B, ...)`` holding B volumes, or one numpy volume.
        target: Reference maps, same type and shape as ``preds``.
        mask: Optional voxels to evaluate (bool or 0/1), same type and shape as ``preds``.

    Returns:
        ``(preds, target, mask, single)`` where ``single`` tells that the input was one numpy
        volume, so that callers return python floats rather than tensors of shape ``(1,)``.

    Raises:
        TypeError: numpy and torch inputs are mixed.
        ValueError: shapes differ, or a tensor input has no batch dimension.
    """
    inputs = [preds, target] + ([] if mask is None else [mask])
    single = isinstance(preds, np.ndarray)
    if any(isinstance(x, np.ndarray) != single for x in inputs):
        raise TypeError("preds, target and mask must all be numpy arrays or all be torch tensors")
    if any(x.shape != preds.shape for x in inputs):
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        raise ValueError(f"preds, target and mask must have the same shape, got {shapes}")

    if single:
        preds = _volume_tensor(preds, _numpy_value_dtype(preds))[None]
        target = _volume_tensor(target, _numpy_value_dtype(target))[None]
        if mask is not None:
            mask = _volume_tensor(mask, np.bool_)[None]
    elif preds.ndim < 2:
        raise ValueError(
            f"tensor inputs must have a batch dimension, shape (B, ...), got {tuple(preds.shape)}"
        )
    else:
        # The metrics are not differentiable; detached CPU tensors can be viewed as numpy.
        preds, target = preds.detach(), target.detach()
        mask = None if mask is None else mask.detach()

    batch_size = preds.shape[0]
    preds, target = (
        (x if x.dtype in _NATIVE_FLOAT_DTYPES else x.to(torch.float64)).reshape(batch_size, -1)
        for x in (preds, target)
    )
    if mask is not None:
        mask = mask.bool().reshape(batch_size, -1)
    return preds, target, mask, single


def _sort_numpy(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort a 1-D float array: ``(sorted_keys, order)``, keys equal exactly when values are.

    float32 values are turned into order-preserving int32 keys and packed with their index into
    one int64 (key in the high half, so the order is by key), then sorted as plain values:
    numpy's SIMD sort does that about 3x faster than an argsort of continuous values (network
    outputs, resampled SPECT), and this sort dominates the cost of the Spearman R.
    """
    if values.dtype != np.float32 or values.size >= 2**32:
        order = np.argsort(values)
        return values[order], order
    # Adding +0.0 turns -0.0 into +0.0 (equal values, different bits) and makes a fresh array.
    keys = (values + np.float32(0.0)).view(np.int32)
    # IEEE floats order like sign-magnitude integers: flipping the magnitude bits of negative
    # values (the arithmetic shift is all ones for them, zero otherwise) gives two's-complement
    # integers in the same order.
    keys ^= (keys >> 31) & 0x7FFFFFFF
    packed = keys.astype(np.int64) << 32
    del keys  # at 1 mm a map has tens of millions of voxels: free buffers as soon as done
    packed |= np.arange(values.size, dtype=np.int64)
    packed.sort()
    return packed >> 32, packed & 0xFFFFFFFF


def _average_ranks_numpy(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Ranks 1..n of a 1-D float array, ties given their average rank, as float64.

    Returns:
        The ranks in the order of ``values``, and the number of distinct values.
    """
    sorted_keys, order = _sort_numpy(values)
    is_group_end = np.empty(values.size, dtype=bool)
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=is_group_end[:-1])
    is_group_end[-1] = True
    del sorted_keys  # buffers of tens of millions of voxels are freed as soon as done
    group_end = np.flatnonzero(is_group_end) + 1  # 1-based rank of each tie group's last value
    del is_group_end
    group_size = np.diff(group_end, prepend=0)
    # A tie group covering ranks first..last has average rank (first + last) / 2
    # = last - (size - 1) / 2; every term is exact in float64 below 2**52.
    group_rank = group_end - (group_size - 1) * 0.5
    del group_end
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, group_size)
    return ranks, group_size.size


def _average_ranks_torch(values: Tensor) -> tuple[Tensor, int]:
    """:func:`_average_ranks_numpy` for tensors on an accelerator, where ``torch.sort`` is fast."""
    # Sorting puts -0.0 and +0.0 next to each other and unique_consecutive compares with ==, so
    # they form one tie group, as they should.
    sorted_values, order = torch.sort(values)
    _, group_of_sorted, group_size = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )
    group_rank = torch.cumsum(group_size, dim=0).to(torch.float64)
    group_rank -= (group_size - 1).to(torch.float64) * 0.5
    ranks = torch.empty(values.numel(), dtype=torch.float64, device=values.device)
    ranks.scatter_(0, order, group_rank[group_of_sorted])
    return ranks, group_size.numel()


def _spearman_one_volume(
    preds: np.ndarray | Tensor, target: np.ndarray | Tensor
) -> tuple[float, bool]:
    """Spearman R of two 1-D arrays of paired voxel values (numpy on CPU, else torch).

    Returns:
        ``(r, defined)``. ``defined`` is False when R does not exist (fewer than 2 voxels, or
        either map constant); ``r`` is then NaN. NaN voxel values give ``(nan, True)``, like
        scipy's default ``nan_policy="propagate"``.
    """
    n_voxels = preds.shape[0]
    if n_voxels < 2:
        return math.nan, False
    # NaN is the only value unequal to itself.
    if bool((preds != preds).any()) or bool((target != target).any()):
        return math.nan, True

    average_ranks = _average_ranks_numpy if isinstance(preds, np.ndarray) else _average_ranks_torch
    preds_ranks, preds_distinct = average_ranks(preds)
    if preds_distinct == 1:
        return math.nan, False
    target_ranks, target_distinct = average_ranks(target)
    if target_distinct == 1:
        return math.nan, False

    # Average ranks of 1..n always have mean (n + 1) / 2, ties or not; using the exact value
    # rather than a computed mean keeps the centring free of rounding.
    mean_rank = (n_voxels + 1) / 2
    preds_ranks -= mean_rank
    target_ranks -= mean_rank
    covariance = float(preds_ranks @ target_ranks)
    scale = math.sqrt(float(preds_ranks @ preds_ranks) * float(target_ranks @ target_ranks))
    # Rounding can put a perfect correlation a hair outside [-1, 1].
    return min(max(covariance / scale, -1.0), 1.0), True


def spearman_per_volume(
    preds: Tensor, target: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-volume Spearman R of inputs laid out by :func:`prepare_volumes`.

    Returns:
        ``(r, defined)``: float64 and bool tensors of shape ``(B,)`` on the inputs' device;
        ``r`` is NaN where ``defined`` is False.
    """
    on_cpu = preds.device.type == "cpu"
    values, defined = [], []
    for volume in range(preds.shape[0]):
        volume_preds, volume_target = preds[volume], target[volume]
        volume_mask = None if mask is None else mask[volume]
        if on_cpu:
            # CPU work runs in numpy (zero-copy views): its kernels are single-threaded, whereas
            # torch's multi-threaded CPU kernels slow down several-fold when another process
            # holds a core (parallel evaluation workers, a busy CI machine).
            volume_preds, volume_target = volume_preds.numpy(), volume_target.numpy()
            volume_mask = None if volume_mask is None else volume_mask.numpy()
        if volume_mask is not None:
            volume_preds, volume_target = volume_preds[volume_mask], volume_target[volume_mask]
        r, is_defined = _spearman_one_volume(volume_preds, volume_target)
        values.append(r)
        defined.append(is_defined)
    return (
        torch.tensor(values, dtype=torch.float64, device=preds.device),
        torch.tensor(defined, dtype=torch.bool, device=preds.device),
    )


def spearman_r(
    preds: ArrayLike,
    target: ArrayLike,
    mask: ArrayLike | None = None,
    undefined: Literal["zero", "nan"] = "zero",
) -> Tensor | float:
    """Exact voxel-wise Spearman rank correlation, one value per volume.

    Ties get their average rank (``scipy.stats.rankdata(method="average")``) and the Pearson
    correlation of the ranks is computed in float64, so the result matches
    ``scipy.stats.spearmanr`` to ~1e-12. Cost: two sorts of the masked voxels, fastest for
    float32 maps (timings against scipy in ``benchmarks/bench_metrics.py``), and at most about
    45 bytes of working memory per masked voxel (0.9 GB for 2e7 voxels).

    Args:
        preds: Predicted maps, tensor ``(B, ...)`` (B volumes), or a single numpy volume.
        target: Reference maps, same type and shape.
        mask: Optional bool/0-1 mask, same type and shape; voxels outside are ignored.
        undefined: Value for a volume whose R does not exist (fewer than 2 masked voxels, or a
            constant map, whose ranks have zero variance): ``"zero"`` gives 0.0 (a constant
            prediction carries no correlation; the convention of :class:`SpearmanR`), ``"nan"``
            gives NaN so the caller can tell such volumes apart.

    Returns:
        float64 tensor ``(B,)`` on the inputs' device, or a python float for numpy input. NaN
        in the masked voxels gives NaN for that volume.
    """
    if undefined not in ("zero", "nan"):
        raise ValueError(f'undefined must be "zero" or "nan", got {undefined!r}')
    preds, target, mask, single = prepare_volumes(preds, target, mask)
    r, defined = spearman_per_volume(preds, target, mask)
    if undefined == "zero":
        r = torch.where(defined, r, torch.zeros_like(r))
    return float(r[0]) if single else r


class SpearmanR(Metric):
    """Mean over volumes of the exact voxel-wise Spearman R (see :func:`spearman_r`).

    ``update(preds, target, mask=None)`` takes tensors ``(B, ...)``, typically
    ``(B, 1, D, H, W)``: each batch item is one volume, and ``mask`` (bool or 0/1, same shape)
    selects the voxels that count. The state is two scalars summed across processes, so the
    value is the same under DDP as on one process over all volumes, and memory does not grow
    with the data.

    A volume with fewer than 2 masked voxels, or with a constant predicted or reference map
    (zero variance of ranks), has no defined R. With ``undefined="zero"`` (default) it counts
    as R = 0: a constant prediction carries no correlation, and dropping it would reward a
    model for collapsing to a constant. With ``undefined="skip"`` it is not counted at all.
    ``compute()`` returns NaN when no volume was counted.

    Args:
        undefined: ``"zero"`` or ``"skip"``, as above.
        kwargs: Passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    sum_r: Tensor
    n_volumes: Tensor

    def __init__(self, undefined: Literal["zero", "skip"] = "zero", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if undefined not in ("zero", "skip"):
            raise ValueError(f'undefined must be "zero" or "skip", got {undefined!r}')
        self.undefined = undefined
        self.add_state("sum_r", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_volumes", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add the R of each volume of the batch (see the class docstring for shapes)."""
        preds, target, mask, _ = prepare_volumes(preds, target, mask)
        r, defined = spearman_per_volume(preds, target, mask)
        if self.undefined == "zero":
            r = torch.where(defined, r, torch.zeros_like(r))
        else:
            r = r[defined]
        self.sum_r += r.sum()
        self.n_volumes += r.numel()

    def compute(self) -> Tensor:
        """Mean R over the counted volumes, float64 scalar (NaN if none)."""
        return self.sum_r / self.n_volumes
