"""MONAI backbones beside the ARNN: DynUNet, SegResNet and SwinUNETR behind the ARNN's interface.

The training module calls every network as ``net(x, mask)`` (the lung mask is the ARNN's ROI
attention). MONAI's networks take one image tensor, so one small adapter, ``MaskedBackbone``,
gives them that interface:

- ``mask_channel`` (default on): the lung mask is concatenated to the image as one more input
  channel, so the network sees where the lung is (its border, its size in the ROI);
- ``mask_output`` (default on): the output is multiplied by the mask, exactly 0 outside the lung
  as with the ARNN's ROI attention;
- the ARNN's final activation (sigmoid | clamp | none) maps the raw output to perfusion.

Every backbone is sized by the same two numbers as the ARNN, ``base_channels`` (the width of the
full-resolution level) and ``depth`` (resolution levels, ``depth - 1`` halvings), so the scale
configs (``conf/scale/``) size whichever network is chosen, and a comparison is a config switch:
``model/net=dynunet``.

Normalisation (``norm``): "instance" (the ARNN's default), "batch", "group" (up to 8 groups),
"layer" (one group: every channel and voxel of a sample) or "none". Instance, group and layer norm
standardise each sample by its own statistics, which removes the global density level of the
lung from the features; batch norm (statistics over the batch, running averages at inference)
and none keep it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ctpm.models.arnn import FinalActivation, check_input

NORMS = ("instance", "batch", "group", "layer", "none")


def monai_norm(norm: str, channels: tuple[int, ...]):
    """A MONAI ``norm`` argument for a name of ``NORMS``; group norm uses the largest count <= 8
    that divides every normalised channel count."""
    if norm == "instance":
        return ("instance", {"affine": True})
    if norm == "batch":
        return "batch"
    if norm == "group":
        return ("group", {"num_groups": math.gcd(8, *channels)})
    if norm == "layer":
        return ("group", {"num_groups": 1})
    if norm == "none":
        return None
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class MaskedBackbone(nn.Module):
    """A single-input network (``self.net``) with the ARNN's ``forward(x, mask)``.

    Subclasses build ``self.net`` with ``self.net_in_channels`` inputs and set ``size_multiple``.
    """

    size_multiple: int = 1

    def __init__(self, in_channels: int, final_activation: str, mask_channel: bool, mask_output: bool):
        super().__init__()
        self.mask_channel, self.mask_output, self.in_channels = bool(mask_channel), bool(mask_output), in_channels
        self.net_in_channels = in_channels + int(self.mask_channel)
        self.final_activation = FinalActivation(final_activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, in_channels, D, H, W); mask: (B, 1, D, H, W) lung ROI or None (the whole volume).
        Returns (B, out_channels, D, H, W), 0 outside the mask with ``mask_output``."""
        check_input(x, mask, self.size_multiple, type(self).__name__, self.in_channels)
        m = torch.ones_like(x[:, :1]) if mask is None else mask.to(x.dtype)
        inp = torch.cat([x, m], dim=1) if self.mask_channel else x
        out = self.net(inp)
        if isinstance(out, (list, tuple)):  # deep supervision heads: the full-resolution one
            out = out[0]
        out = self.final_activation(out)
        if self.mask_output and mask is not None:
            out = out * m.to(out.dtype)
        return out


class DynUNet(MaskedBackbone):
    """MONAI's DynUNet (the nnU-Net architecture): ``depth`` levels, 3x3x3 kernels, stride 2 between
    levels, filters ``base_channels * 2**level`` (capped at ``max_channels``), residual blocks with
    ``res_block``. D, H, W divisible by ``2 ** (depth - 1)``."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 16, depth: int = 4,
                 norm: str = "instance", res_block: bool = True, max_channels: int = 320, dropout: float = 0.0,
                 final_activation: str = "sigmoid", mask_channel: bool = True, mask_output: bool = True):
        super().__init__(in_channels, final_activation, mask_channel, mask_output)
        from monai.networks.nets import DynUNet as MonaiDynUNet

        if depth < 2:
            raise ValueError(f"DynUNet needs depth >= 2, got {depth}")
        if norm == "none":
            raise ValueError("DynUNet always normalises; norm must be instance, batch, group or layer")
        filters = [min(base_channels * 2**level, max_channels) for level in range(depth)]
        self.size_multiple = 2 ** (depth - 1)
        self.net = MonaiDynUNet(
            spatial_dims=3, in_channels=self.net_in_channels, out_channels=out_channels,
            kernel_size=[3] * depth, strides=[1] + [2] * (depth - 1), upsample_kernel_size=[2] * (depth - 1),
            filters=filters, dropout=dropout or None, norm_name=monai_norm(norm, tuple(filters)),
            res_block=res_block,
        )


class SegResNet(MaskedBackbone):
    """MONAI's SegResNet (Myronenko 2018) without its VAE branch: ``depth`` levels with
    ``blocks_down`` residual blocks each (default 1, 2, 2, 4, ...), ``init_filters = base_channels``.
    D, H, W divisible by ``2 ** (depth - 1)``."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 16, depth: int = 4,
                 norm: str = "group", blocks_down: tuple[int, ...] | None = None, dropout: float = 0.0,
                 final_activation: str = "sigmoid", mask_channel: bool = True, mask_output: bool = True):
        super().__init__(in_channels, final_activation, mask_channel, mask_output)
        from monai.networks.nets import SegResNet as MonaiSegResNet

        if depth < 1:
            raise ValueError(f"SegResNet needs depth >= 1, got {depth}")
        down = tuple(blocks_down) if blocks_down else tuple([1, 2, 2] + [4] * max(0, depth - 3))[:depth]
        if len(down) != depth:
            raise ValueError(f"blocks_down has {len(down)} levels, depth is {depth}")
        channels = tuple(base_channels * 2**level for level in range(depth))
        n = monai_norm(norm, channels)
        self.size_multiple = 2 ** (depth - 1)
        self.net = MonaiSegResNet(
            spatial_dims=3, init_filters=base_channels, in_channels=self.net_in_channels, out_channels=out_channels,
            dropout_prob=dropout or None, norm=n if n is not None else "batch",
            blocks_down=down, blocks_up=(1,) * (depth - 1),
        )
        if n is None:  # MONAI's SegResNet has no norm-free form: replace its norm layers by identities
            _strip_norms(self.net)


class SwinUNETR(MaskedBackbone):
    """MONAI's SwinUNETR (Hatamizadeh et al. 2022): a Swin transformer encoder (window attention,
    patch size 2, four stages) with a convolutional decoder. Its size is fixed by the architecture:
    5 halvings, so D, H, W must be divisible by 32 (64 x 32 x 32 and 128 x 64 x 64 are);
    ``feature_size = base_channels`` rounded up to a multiple of 12 (its heads split the width),
    ``depth`` is ignored beyond the check. ``stage_depth`` transformer blocks per stage."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 12, depth: int = 4,
                 norm: str = "instance", stage_depth: int = 1, heads: tuple[int, ...] = (1, 2, 4, 8),
                 window_size: int = 4, dropout: float = 0.0, final_activation: str = "sigmoid",
                 mask_channel: bool = True, mask_output: bool = True):
        super().__init__(in_channels, final_activation, mask_channel, mask_output)
        from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

        feature_size = 12 * max(1, math.ceil(base_channels / 12))
        n = monai_norm(norm, (feature_size,))
        if n is None:
            raise ValueError("SwinUNETR's decoder always normalises; norm must be instance, batch, group or layer")
        self.size_multiple = 32
        self.net = MonaiSwinUNETR(
            in_channels=self.net_in_channels, out_channels=out_channels, feature_size=feature_size,
            depths=(stage_depth,) * 4, num_heads=tuple(heads), window_size=window_size, norm_name=n,
            drop_rate=dropout, spatial_dims=3, use_v2=False,
        )


def _strip_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, (nn.GroupNorm, nn.BatchNorm3d, nn.InstanceNorm3d, nn.LayerNorm)):
            setattr(module, name, nn.Identity())
        else:
            _strip_norms(child)
