"""Dice similarity of the high- and low-functional lung volumes of two perfusion maps.

The paper thresholds standardised perfusion (1.0 = normal-functioning lung) at 0.66: voxels at or
above are high-functional, voxels below are low-functional. For each volume, inside the
evaluation mask, Dice = 2 |P ∩ Y| / (|P| + |Y|) is computed for each class, where P and Y are the
class's voxels in the prediction and in the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ctpm.metrics.spearman import ArrayLike, prepare_volumes

DEFAULT_THRESHOLD = 0.66


def _threshold_in_dtype(threshold: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The smallest value of ``dtype`` that is >= ``threshold``, as a 0-d tensor.

    Why: comparing float32 maps with it in float32 decides ``value >= threshold`` exactly as in
    real numbers, without a float64 copy of a map of tens of millions of voxels. (Casting the
    threshold to float32 by rounding could land just below it and misclassify that one value.)
    """
    exact = torch.tensor(threshold, dtype=torch.float64)
    rounded = exact.to(dtype)
    if rounded.to(torch.float64) < exact:
        rounded = torch.nextafter(rounded, torch.tensor(float("inf"), dtype=dtype))
    return rounded.to(device)


def _dice(predicted: Tensor, reference: Tensor) -> Tensor:
    """Per-row Dice of two bool tensors ``(B, N)``, float64 ``(B,)``; 1.0 where both are empty."""
    overlap = (predicted & reference).sum(dim=1, dtype=torch.float64)
    total = predicted.sum(dim=1, dtype=torch.float64) + reference.sum(dim=1, dtype=torch.float64)
    # Both empty means both maps agree that the class is absent: perfect agreement, not 0/0.
    return torch.where(total > 0, 2.0 * overlap / total.clamp(min=1.0), 1.0)


def dice_per_volume(
    preds: Tensor, target: Tensor, mask: Tensor | None, threshold: float
) -> tuple[Tensor, Tensor]:
    """Per-volume (high, low) Dice of inputs laid out by :func:`.spearman.prepare_volumes`.

    Returns:
        float64 tensors ``(B,)`` on the inputs' device.
    """
    if mask is None:
        mask = torch.ones_like(preds, dtype=torch.bool)
    # NaN voxels are neither >= nor < the threshold, so they fall in no class.
    preds_cut = _threshold_in_dtype(threshold, preds.dtype, preds.device)
    target_cut = _threshold_in_dtype(threshold, target.dtype, target.device)
    high = _dice(mask & (preds >= preds_cut), mask & (target >= target_cut))
    low = _dice(mask & (preds < preds_cut), mask & (target < target_cut))
    return high, low


def functional_dice(
    preds: ArrayLike,
    target: ArrayLike,
    mask: ArrayLike | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[Tensor, Tensor] | tuple[float, float]:
    """Dice of the high (>= threshold) and low (< threshold) functional volumes, per volume.

    Args:
        preds: Predicted standardised perfusion, tensor ``(B, ...)`` (B volumes) or one numpy
            volume.
        target: Reference standardised perfusion, same type and shape.
        mask: Optional bool/0-1 mask, same type and shape; voxels outside belong to no class.
        threshold: Standardised perfusion (unitless, 1.0 = normal lung) separating the classes.

    Returns:
        ``(high, low)``: float64 tensors ``(B,)`` on the inputs' device, or two python floats for
        numpy input. A class that is empty in both maps of a volume scores 1.0 (the maps agree);
        so does a volume whose mask is empty.
    """
    preds, target, mask, single = prepare_volumes(preds, target, mask)
    high, low = dice_per_volume(preds, target, mask, threshold)
    return (float(high[0]), float(low[0])) if single else (high, low)


class FunctionalDice(Metric):
    """Mean over volumes of the high/low functional-volume Dice (see :func:`functional_dice`).

    ``update(preds, target, mask=None)`` takes tensors ``(B, ...)``, typically
    ``(B, 1, D, H, W)``, one volume per batch item. A class empty in both maps of a volume scores
    1.0 for that volume. The state is three scalars summed across processes, so the value under
    DDP equals the single-process value over all volumes.

    ``compute()`` returns ``{"high": tensor, "low": tensor}`` (float64 scalars, NaN before any
    volume was seen).

    Args:
        threshold: Standardised perfusion separating high (>=) from low (<) function.
        kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    sum_high: Tensor
    sum_low: Tensor
    n_volumes: Tensor

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.add_state("sum_high", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_low", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_volumes", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add the Dice of each volume of the batch."""
        preds, target, mask, _ = prepare_volumes(preds, target, mask)
        high, low = dice_per_volume(preds, target, mask, self.threshold)
        self.sum_high += high.sum()
        self.sum_low += low.sum()
        self.n_volumes += high.numel()

    def compute(self) -> dict[str, Tensor]:
        """Mean high and low Dice over the volumes seen."""
        return {"high": self.sum_high / self.n_volumes, "low": self.sum_low / self.n_volumes}
