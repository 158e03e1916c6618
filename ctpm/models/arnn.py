"""The 3-D attention residual network (ARNN) of the CTPM method (paper Fig. 1B).

Ren et al. (2021, 2022) translate a preprocessed lung CT (one lung, 128 x 64 x 64 voxels, CT
enhanced to [0, 1]) into a perfusion map of the same size with a U-shaped encoder-decoder built
from three ingredients, each of which can be switched off to repeat the ablations of the 2021
paper:

- **Residual blocks** (``residual``): two 3x3x3 convolutions plus an identity (or 1x1x1
  projection) shortcut. Switched off, a block is the plain double convolution of U-Net.
- **ROI attention** (``roi_attention``): the lung mask gates the network. The encoder features of
  every resolution level are multiplied by the mask max-pooled to that level, and the output is
  multiplied by the mask, so the prediction is exactly 0 outside the lung. Switched off, the mask
  is ignored entirely (the output is *not* masked either), so the ablation really removes the
  mask from the network; the masked loss of the training module is what then keeps the tissue
  outside the lung out of the objective.
- **Skip attention** (``skip_attention``): the attention gate of Attention U-Net (Oktay et al.
  2018) on every skip connection: a gating signal from the coarser decoder level decides, per
  voxel, how much of the encoder feature map is passed to the decoder. Switched off, the skips
  are plain concatenations.

Layout for the default ``depth=4, base_channels=16, channel_multiplier=2`` (channels x size, for
an input of 1 x 128 x 64 x 64)::

    encoder                                   decoder
    level 0   16 x 128x64x64 ── gate ── concat ─> 16 x 128x64x64 ─> 1x1x1 conv ─> output
       │ max-pool                                 ^ transposed conv
    level 1   32 x 64x32x32  ── gate ── concat ─> 32 x 64x32x32
       │ max-pool                                 ^ transposed conv
    level 2   64 x 32x16x16  ── gate ── concat ─> 64 x 32x16x16
       │ max-pool                                 ^ transposed conv
    level 3  128 x 16x8x8  (bottleneck) ──────────┘

Downsampling is 2x2x2 max-pooling (parameter-free, as in U-Net and Attention U-Net, and the same
operation that downsamples the lung mask, so features and mask stay aligned). Upsampling is a
2x2x2 transposed convolution with stride 2: learned and exactly doubles the size; because its
kernel equals its stride every output voxel receives exactly one kernel tap, so there is none of
the uneven overlap that gives transposed convolutions their checkerboard artefacts.

Convolution weights are initialised with Kaiming uniform for ReLU (``nn.init.kaiming_uniform_``,
bound ``sqrt(6 / fan_in)``), as the 2022 paper states; biases start at zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "instance", "group", "layer", "none")
FINAL_ACTIVATIONS = ("sigmoid", "clamp", "none")


def make_norm(norm: str, channels: int) -> nn.Module:
    """A 3-D normalisation layer by name: "batch", "instance", "group", "layer" or "none".

    Instance norm is the default because the network trains with batches of 2 lungs, where batch
    statistics are noisy. Group norm uses up to 8 groups (the largest divisor of ``channels`` that
    is at most 8), so it works for any channel count; layer norm is group norm with one group.
    Instance, group and layer norm standardise each lung by its own statistics and so remove its
    global density level from the features; batch norm and none keep it.
    """
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class FinalActivation(nn.Module):
    """Maps the last convolution's output to a perfusion value.

    - ``"sigmoid"``: squashes into (0, 1); the standardised SPECT target is clipped to [0, 1].
    - ``"clamp"``: linear inside [0, 1], clipped outside (zero gradient there).
    - ``"none"``: the raw output, for losses that want logits.
    """

    def __init__(self, name: str = "sigmoid"):
        super().__init__()
        if name not in FINAL_ACTIVATIONS:
            raise ValueError(f"final_activation must be one of {FINAL_ACTIVATIONS}, got {name!r}")
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "sigmoid":
            return torch.sigmoid(x)
        if self.name == "clamp":
            return x.clamp(0.0, 1.0)
        return x

    def extra_repr(self) -> str:
        return repr(self.name)


def check_input(x: torch.Tensor, mask: torch.Tensor | None, size_multiple: int, model_name: str,
                in_channels: int | None = None) -> None:
    """Raise a clear ValueError for inputs the network cannot take.

    Args:
        x: (B, C, D, H, W) image.
        mask: (B, 1, D, H, W) lung mask, or None.
        size_multiple: D, H and W must be divisible by this (2 ** number of downsamplings).
        model_name: named in the message.
        in_channels: the channels the network was built for (None: not checked).
    """
    if x.ndim != 5:
        raise ValueError(f"{model_name} expects a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    if in_channels is not None and x.shape[1] != in_channels:
        raise ValueError(
            f"{model_name} was built for {in_channels} input channel(s), the input has {x.shape[1]}; with "
            f"preprocessing.context_channels set, model.net.in_channels must be 1 + their number"
        )
    spatial = tuple(x.shape[2:])
    if any(size % size_multiple for size in spatial):
        raise ValueError(
            f"{model_name} needs D, H, W divisible by {size_multiple} (one factor of 2 per "
            f"downsampling), got {spatial}; crop or resample the ROI to a multiple of {size_multiple}"
        )
    if mask is not None and tuple(mask.shape) != (x.shape[0], 1, *spatial):
        raise ValueError(
            f"{model_name} expects a mask of shape {(x.shape[0], 1, *spatial)} to match the image, "
            f"got {tuple(mask.shape)}"
        )


def check_fits(net: nn.Module, roi_size, in_channels: int | None = None) -> None:
    """A CtpmError, before any work, when a network cannot take the ROIs of a preprocessing config:
    a ``roi_size`` that is not a multiple of its ``size_multiple``, or another number of channels
    (1 + ``preprocessing.context_channels``) than it was built for."""
    from ctpm.errors import CtpmError

    name = type(net).__name__
    multiple = int(getattr(net, "size_multiple", 1) or 1)
    size = [int(v) for v in roi_size]
    if any(v % multiple for v in size):
        near = [max(multiple, round(v / multiple) * multiple) for v in size]
        raise CtpmError(f"preprocessing.roi_size={size} does not fit {name}: D, H, W must be multiples of "
                        f"{multiple} (one factor of 2 per downsampling), e.g. roi_size={near}")
    built = getattr(net, "in_channels", None)
    if in_channels is not None and built is not None and int(built) != int(in_channels):
        raise CtpmError(f"{name} was built for {built} input channel(s), the preprocessing gives {in_channels}; "
                        "with preprocessing.context_channels set, model.net.in_channels must be 1 + their number")


def conv3x3x3(in_channels: int, out_channels: int, bias: bool) -> nn.Conv3d:
    """A 3x3x3 convolution that keeps the spatial size."""
    return nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)


class ResidualBlock(nn.Module):
    """Two 3x3x3 convolutions with a residual shortcut (He et al. 2016).

    ``conv -> norm -> ReLU -> [dropout] -> conv -> norm -> (+ shortcut) -> ReLU``. The shortcut is
    the identity when the channel count is unchanged and a 1x1x1 convolution + norm otherwise.
    With ``residual=False`` there is no shortcut (``self.shortcut is None``) and the block is the
    plain double convolution of U-Net.

    Shapes: (B, in_channels, D, H, W) -> (B, out_channels, D, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float, residual: bool):
        super().__init__()
        # A bias right before a normalisation layer is cancelled by its mean subtraction.
        bias = norm == "none"
        self.conv1 = conv3x3x3(in_channels, out_channels, bias)
        self.norm1 = make_norm(norm, out_channels)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3x3(out_channels, out_channels, bias)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut: nn.Module | None = None
        if residual:
            if in_channels == out_channels:
                self.shortcut = nn.Identity()
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv3d(in_channels, out_channels, kernel_size=1, bias=bias),
                    make_norm(norm, out_channels),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(F.relu(self.norm1(self.conv1(x))))
        y = self.norm2(self.conv2(y))
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return F.relu(y)


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al. 2018, Fig. 2).

    The gating signal ``g`` comes from the next coarser level of the decoder, where the features
    carry more context. The skip features ``x`` are brought to that resolution by a strided 2x2x2
    convolution (theta), ``g`` by a 1x1x1 convolution (phi); their sum goes through ReLU, a 1x1x1
    convolution to one channel (psi) and a sigmoid, giving attention coefficients in (0, 1) that
    are trilinearly upsampled back to the skip resolution and multiply ``x``. The intermediate
    width is ``inter_channels`` (the ARNN uses the skip's channel count, as Oktay et al. do). The
    original's 1x1x1 output convolution after the multiplication is left out: the gated skip goes
    straight into a convolution block of the decoder, which does that mixing anyway.

    Shapes: x (B, skip_channels, D, H, W), g (B, gate_channels, D/2, H/2, W/2)
    -> gated x (B, skip_channels, D, H, W).
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.theta_x = nn.Conv3d(skip_channels, inter_channels, kernel_size=2, stride=2, bias=False)
        self.phi_g = nn.Conv3d(gate_channels, inter_channels, kernel_size=1, bias=True)
        self.psi = nn.Conv3d(inter_channels, 1, kernel_size=1, bias=True)

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Attention coefficients (B, 1, D, H, W) in (0, 1); useful to visualise what the gate keeps."""
        q = F.relu(self.theta_x(x) + self.phi_g(g))
        alpha = torch.sigmoid(self.psi(q))
        return F.interpolate(alpha, size=x.shape[2:], mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x, g)


class ARNN(nn.Module):
    """3-D attention residual U-shaped network: CT of one lung -> perfusion map of that lung.

    Args:
        in_channels: input channels (1: the enhanced CT).
        out_channels: output channels (1: the standardised perfusion).
        base_channels: feature channels at the full-resolution level.
        depth: number of resolution levels; there are ``depth - 1`` downsamplings by 2, so
            D, H and W must be divisible by ``2 ** (depth - 1)``.
        channel_multiplier: channels grow by this factor per level
            (level ``i`` has ``base_channels * channel_multiplier ** i``).
        blocks_per_level: residual blocks per level in the encoder and in the decoder.
        norm: "instance", "batch", "group", "layer" or "none" (see ``make_norm``).
        residual: residual blocks (True) or plain double convolutions (False).
        roi_attention: gate the encoder features and the output with the lung mask (True), or
            ignore the mask entirely (False).
        skip_attention: attention gates on the skip connections (True) or plain concatenation.
        dropout: channel dropout probability between the two convolutions of every block.
        final_activation: "sigmoid" (output in (0, 1)), "clamp" (clipped to [0, 1]) or "none".
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        depth: int = 4,
        channel_multiplier: int = 2,
        blocks_per_level: int = 1,
        norm: str = "instance",
        residual: bool = True,
        roi_attention: bool = True,
        skip_attention: bool = True,
        dropout: float = 0.0,
        final_activation: str = "sigmoid",
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if blocks_per_level < 1:
            raise ValueError(f"blocks_per_level must be at least 1, got {blocks_per_level}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.depth, self.in_channels = depth, in_channels
        self.roi_attention = roi_attention
        self.size_multiple = 2 ** (depth - 1)
        channels = [base_channels * channel_multiplier**level for level in range(depth)]

        def stage(in_ch: int, out_ch: int) -> nn.Sequential:
            blocks = [ResidualBlock(in_ch, out_ch, norm, dropout, residual)]
            blocks += [
                ResidualBlock(out_ch, out_ch, norm, dropout, residual) for _ in range(blocks_per_level - 1)
            ]
            return nn.Sequential(*blocks)

        # encoder[i] works at level i; the last one is the bottleneck.
        self.encoder = nn.ModuleList(
            [stage(in_channels, channels[0])]
            + [stage(channels[i - 1], channels[i]) for i in range(1, depth)]
        )
        # Decoder modules are indexed by the level they produce (0 .. depth-2).
        self.upsample = nn.ModuleList(
            [
                nn.ConvTranspose3d(channels[i + 1], channels[i], kernel_size=2, stride=2)
                for i in range(depth - 1)
            ]
        )
        # Gate i: skip of level i (channels[i]), gating signal from level i + 1 (channels[i + 1]).
        self.skip_gates = (
            nn.ModuleList(
                [AttentionGate(channels[i], channels[i + 1], channels[i]) for i in range(depth - 1)]
            )
            if skip_attention
            else None
        )
        self.decoder = nn.ModuleList([stage(2 * channels[i], channels[i]) for i in range(depth - 1)])
        self.head = nn.Conv3d(channels[0], out_channels, kernel_size=1)
        self.final_activation = FinalActivation(final_activation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform (ReLU gain) convolution weights, as in the paper, and zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict perfusion.

        Args:
            x: (B, in_channels, D, H, W) enhanced CT in [0, 1].
            mask: (B, 1, D, H, W) lung ROI (0/1 float or bool); None means the whole volume.
                Used only when ``roi_attention`` is on.

        Returns:
            (B, out_channels, D, H, W) perfusion; in [0, 1] with the sigmoid or clamp activation,
            and exactly 0 outside the mask when ``roi_attention`` is on.
        """
        check_input(x, mask, self.size_multiple, type(self).__name__, self.in_channels)
        # One mask per level. Max-pooling keeps a coarse voxel if any lung voxel falls in it, so
        # features on the lung border (and thin structures) keep their context.
        masks: list[torch.Tensor] | None = None
        if self.roi_attention and mask is not None:
            masks = [mask.to(x.dtype)]
            for _ in range(self.depth - 1):
                masks.append(F.max_pool3d(masks[-1], kernel_size=2))

        skips: list[torch.Tensor] = []
        features = x
        for level, stage in enumerate(self.encoder):
            if level > 0:
                features = F.max_pool3d(features, kernel_size=2)
            features = stage(features)
            if masks is not None:
                features = features * masks[level].to(features.dtype)
            skips.append(features)

        # Decode from the bottleneck up; `features` is the gating signal of the level below.
        for level in reversed(range(self.depth - 1)):
            skip = skips[level]
            if self.skip_gates is not None:
                skip = self.skip_gates[level](skip, features)
            features = self.upsample[level](features)
            features = self.decoder[level](torch.cat([skip, features], dim=1))

        output = self.final_activation(self.head(features))
        if masks is not None:
            output = output * masks[0].to(output.dtype)
        return output

