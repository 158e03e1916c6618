"""Plain 3-D U-Net baseline (MONAI's ``UNet``), a drop-in replacement for the ARNN.

It has no residual blocks (by default), no ROI attention inside the network and no attention
gates: what it shares with the ARNN is the interface. ``forward(x, mask)`` takes the same inputs,
applies the same final activation and, with ``mask_output``, zeroes the prediction outside the
lung, so a config can swap ``_target_: ctpm.models.ARNN`` for ``ctpm.models.UNet`` and measure
what the attention and residual parts of the ARNN are worth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import UNet as MonaiUNet
from torch import nn

from ctpm.models.arnn import NORMS, FinalActivation, check_input


class UNet(nn.Module):
    """MONAI 3-D U-Net with the ARNN's ``forward(x, mask)`` interface.

    Args:
        in_channels: input channels (1: the enhanced CT).
        out_channels: output channels (1: the standardised perfusion).
        channels: feature channels per level, e.g. (16, 32, 64, 128).
        strides: downsampling factor between consecutive levels (``len(channels) - 1`` values);
            D, H and W must be divisible by their product.
        num_res_units: residual units per MONAI block (0: plain convolutions).
        norm: "instance", "batch", "group", "layer" or "none".
        dropout: dropout probability inside every block.
        final_activation: "sigmoid", "clamp" or "none" (see ``FinalActivation``).
        mask_output: multiply the output by the lung mask when one is given.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 0,
        norm: str = "instance",
        dropout: float = 0.0,
        final_activation: str = "sigmoid",
        mask_output: bool = True,
    ):
        super().__init__()
        channels, strides = tuple(channels), tuple(strides)
        if len(strides) != len(channels) - 1:
            raise ValueError(f"UNet needs len(strides) == len(channels) - 1, got {strides} for {channels}")
        # MONAI names the norms in its own way. "group" needs a group count that divides every
        # normalised channel count; with residual units MONAI also normalises the top level's
        # output (out_channels wide), so that count must divide out_channels too.
        normalised = (*channels, out_channels) if num_res_units > 0 else channels
        monai_norms = {
            "instance": "instance",
            "batch": "batch",
            "group": ("group", {"num_groups": math.gcd(8, *normalised)}),
            "layer": ("group", {"num_groups": 1}),
            "none": None,
        }
        if norm not in monai_norms:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.size_multiple = math.prod(strides)
        self.mask_output = mask_output
        self.net = MonaiUNet(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=strides,
            num_res_units=num_res_units,
            norm=monai_norms[norm],
            dropout=dropout,
        )
        self.final_activation = FinalActivation(final_activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict perfusion.

        Args:
            x: (B, in_channels, D, H, W) enhanced CT in [0, 1].
            mask: (B, 1, D, H, W) lung ROI (0/1 float or bool), or None.

        Returns:
            (B, out_channels, D, H, W); exactly 0 outside the mask when ``mask_output`` is on.
        """
        check_input(x, mask, self.size_multiple, type(self).__name__)
        output = self.final_activation(self.net(x))
        if self.mask_output and mask is not None:
            output = output * mask.to(output.dtype)
        return output
