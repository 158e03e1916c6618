"""Networks that map a preprocessed lung CT to its perfusion map.

- ``ARNN``: the 3-D attention residual network of the CTPM method (paper Fig. 1B).
- ``UNet``: a plain 3-D U-Net baseline (MONAI) with the same ``forward(x, mask)`` interface.
- ``DynUNet``, ``SegResNet``, ``SwinUNETR``: MONAI backbones behind the same interface (the lung
  mask an input channel and the output masked; ``ctpm.models.backbones``).

Both are built by Hydra from ``conf/model/*.yaml`` (``_target_: ctpm.models.ARNN``).
"""

from __future__ import annotations

from torch import nn

from ctpm.models.arnn import ARNN, AttentionGate, FinalActivation, ResidualBlock, check_fits
from ctpm.models.backbones import DynUNet, MaskedBackbone, SegResNet, SwinUNETR
from ctpm.models.unet import UNet

__all__ = ["ARNN", "AttentionGate", "check_fits", "DynUNet", "FinalActivation", "MaskedBackbone", "ResidualBlock", "SegResNet",
           "SwinUNETR", "UNet", "count_parameters"]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` by default)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
