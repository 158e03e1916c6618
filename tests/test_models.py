"""Tests of the networks in ctpm.models: the ARNN, its ablation switches, and the U-Net baseline.

Networks are built with few channels and small volumes so that the whole file runs in seconds.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from ctpm.models import ARNN, AttentionGate, ResidualBlock, UNet, count_parameters

SMALL = dict(base_channels=4)  # a narrow ARNN: same structure as the default, fast on CPU


def make_batch(shape=(2, 1, 16, 16, 16), seed=0, mask_fraction=0.5):
    """A CT-like input in [0, 1] and a random 0/1 float lung mask of the same shape."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator)
    mask = (torch.rand(shape, generator=generator) < mask_fraction).float()
    return x, mask


@pytest.mark.parametrize(
    "depth, spatial",
    [(1, (5, 6, 7)), (2, (16, 16, 16)), (3, (32, 16, 16)), (4, (16, 16, 16)), (4, (24, 16, 8))],
)
def test_arnn_output_shape_matches_input(depth, spatial):
    model = ARNN(depth=depth, **SMALL)
    x, mask = make_batch((2, 1, *spatial))
    assert model(x, mask).shape == (2, 1, *spatial)


def test_arnn_multichannel_input_and_output():
    model = ARNN(in_channels=2, out_channels=3, depth=3, **SMALL)
    x, mask = make_batch((1, 2, 16, 16, 16))
    assert model(x, mask[:, :1]).shape == (1, 3, 16, 16, 16)


@pytest.mark.parametrize("final_activation", ["sigmoid", "clamp"])
def test_arnn_output_in_unit_interval(final_activation):
    model = ARNN(final_activation=final_activation, roi_attention=False, **SMALL)
    x, _ = make_batch()
    output = model(x * 10 - 5)  # inputs far outside [0, 1] push the raw output around
    assert output.min() >= 0 and output.max() <= 1


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool])
def test_arnn_output_is_exactly_zero_outside_mask(mask_dtype):
    model = ARNN(**SMALL)
    x, mask = make_batch()
    output = model(x, mask.to(mask_dtype))
    assert torch.all(output[mask == 0] == 0)
    assert torch.all(output[mask == 1] > 0)  # sigmoid never reaches 0 inside the lung


def test_arnn_without_mask_equals_all_ones_mask():
    model = ARNN(**SMALL)
    x, _ = make_batch()
    torch.testing.assert_close(model(x), model(x, torch.ones_like(x)))


def test_arnn_roi_attention_off_ignores_the_mask():
    """The ablation is real: without ROI attention the mask changes nothing, not even the output."""
    model = ARNN(roi_attention=False, **SMALL)
    x, mask = make_batch()
    output = model(x, mask)
    torch.testing.assert_close(output, model(x))
    assert torch.all(output[mask == 0] > 0)


@pytest.mark.parametrize("roi_attention", [True, False])
def test_roi_attention_gates_the_encoder_features_of_every_level(roi_attention):
    """Encoder features (the skips and the bottleneck) are zero where the pooled mask is zero."""
    model = ARNN(depth=3, skip_attention=False, roi_attention=roi_attention, **SMALL)
    x, _ = make_batch((1, 1, 16, 16, 16))
    mask = torch.zeros_like(x)
    mask[:, :, :8] = 1  # the upper half in D: whole cells at every level
    encoder_features = {}

    def keep_skip(level):  # a decoder stage's input is cat([skip, upsampled]); keep the skip
        return lambda _module, inputs: encoder_features.__setitem__(level, inputs[0][:, : 4 * 2**level])

    hooks = [model.decoder[level].register_forward_pre_hook(keep_skip(level)) for level in range(2)]
    hooks.append(
        model.upsample[1].register_forward_pre_hook(
            lambda _module, inputs: encoder_features.__setitem__(2, inputs[0])
        )
    )
    with torch.no_grad():
        model(x, mask)
    for hook in hooks:
        hook.remove()
    for level, features in encoder_features.items():
        outside = features[:, :, 8 // 2**level :]
        assert torch.all(outside == 0) == roi_attention, f"level {level}"


def test_skip_attention_switch_adds_or_removes_attention_gates():
    with_gates = ARNN(depth=4, skip_attention=True, **SMALL)
    without_gates = ARNN(depth=4, skip_attention=False, **SMALL)
    assert sum(isinstance(m, AttentionGate) for m in with_gates.modules()) == 3  # one per skip
    assert not any(isinstance(m, AttentionGate) for m in without_gates.modules())


def test_residual_switch_adds_or_removes_shortcuts():
    residual = ARNN(residual=True, **SMALL)
    plain = ARNN(residual=False, **SMALL)
    residual_blocks = [m for m in residual.modules() if isinstance(m, ResidualBlock)]
    plain_blocks = [m for m in plain.modules() if isinstance(m, ResidualBlock)]
    assert len(residual_blocks) == len(plain_blocks) == 7  # 4 encoder + 3 decoder levels
    assert all(block.shortcut is not None for block in residual_blocks)
    # Blocks that change the channel count need a 1x1x1 projection on the shortcut.
    assert any(isinstance(block.shortcut, nn.Sequential) for block in residual_blocks)
    assert all(block.shortcut is None for block in plain_blocks)


def test_blocks_per_level_and_dropout_change_the_structure():
    model = ARNN(depth=3, blocks_per_level=2, dropout=0.2, **SMALL)
    assert all(len(stage) == 2 for stage in [*model.encoder, *model.decoder])
    assert any(isinstance(m, nn.Dropout3d) for m in model.modules())
    assert not any(isinstance(m, nn.Dropout3d) for m in ARNN(**SMALL).modules())
    x, mask = make_batch()
    assert model(x, mask).shape == x.shape


@pytest.mark.parametrize(
    "residual, roi_attention, skip_attention", list(itertools.product([True, False], repeat=3))
)
def test_every_ablation_trains_every_parameter(residual, roi_attention, skip_attention):
    model = ARNN(
        depth=3, residual=residual, roi_attention=roi_attention, skip_attention=skip_attention, **SMALL
    )
    x, mask = make_batch()
    model(x, mask).mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_every_norm_runs_forward_and_backward(norm):
    model = ARNN(norm=norm, depth=3, base_channels=6)  # 6 channels: group norm must find a divisor
    x, mask = make_batch()
    output = model(x, mask)
    output.mean().backward()
    assert output.shape == x.shape


def test_gradient_reaches_the_first_convolution():
    model = ARNN(**SMALL)
    x, mask = make_batch()
    ((model(x, mask) - 0.5) ** 2).mean().backward()
    first_conv = model.encoder[0][0].conv1
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("norm", ["instance", "none"])  # "none" keeps the biases of the block convolutions
def test_convolutions_use_kaiming_uniform_init_and_zero_bias(norm):
    model = ARNN(norm=norm)
    convolutions = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert convolutions
    for conv in convolutions:
        weight = conv.weight.detach()
        fan_in = weight.shape[1] * math.prod(weight.shape[2:])  # torch's fan_in, also for transposed convs
        bound = math.sqrt(6.0 / fan_in)  # kaiming_uniform_ with the ReLU gain sqrt(2)
        assert weight.abs().max() <= bound
        if weight.numel() >= 1000:
            # PyTorch's default init is bounded by 1 / sqrt(fan_in) = 0.41 * bound; uniform samples
            # of this size reach beyond 0.9 * bound, and their variance is bound**2 / 3.
            assert weight.abs().max() > 0.9 * bound
            assert weight.var().item() == pytest.approx(bound**2 / 3, rel=0.15)
        if conv.bias is not None:
            assert torch.all(conv.bias == 0)
    if norm == "none":
        assert all(conv.bias is not None for conv in convolutions if conv.kernel_size == (3, 3, 3))


@pytest.mark.parametrize("spatial", [(30, 16, 16), (16, 12, 16), (16, 16, 4)])
def test_arnn_rejects_sizes_not_divisible_by_the_downsampling(spatial):
    model = ARNN(depth=4, **SMALL)
    x, mask = make_batch((1, 1, *spatial))
    with pytest.raises(ValueError, match="divisible by 8"):
        model(x, mask)


def test_arnn_rejects_bad_inputs_and_arguments():
    model = ARNN(**SMALL)
    x, mask = make_batch()
    with pytest.raises(ValueError, match="mask"):
        model(x, mask[:, :, :8])
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        model(x[0])
    with pytest.raises(ValueError, match="norm"):
        ARNN(norm="layer")
    with pytest.raises(ValueError, match="final_activation"):
        ARNN(final_activation="relu")
    with pytest.raises(ValueError, match="depth"):
        ARNN(depth=0)


def test_same_seed_gives_the_same_network_and_output():
    x, mask = make_batch()
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        outputs.append(ARNN(**SMALL)(x, mask))
    torch.manual_seed(124)
    other = ARNN(**SMALL)(x, mask)
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], other)


def test_arnn_runs_under_bfloat16_autocast():
    model = ARNN(**SMALL)
    x, mask = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(x, mask.bool())
    assert output.shape == x.shape
    assert torch.isfinite(output).all()
    assert output.min() >= 0 and output.max() <= 1
    assert torch.all(output[mask == 0] == 0)
    # bfloat16 keeps about 3 significant digits: close to float32 on average, not voxel by voxel.
    assert (output.float() - model(x, mask)).abs().mean() < 0.01


def test_default_arnn_has_one_to_three_million_parameters():
    model = ARNN()
    n_parameters = count_parameters(model)
    assert 1_000_000 <= n_parameters <= 3_000_000
    assert n_parameters == sum(p.numel() for p in model.parameters())
    model.head.requires_grad_(False)
    assert count_parameters(model) == n_parameters - sum(p.numel() for p in model.head.parameters())
    assert count_parameters(model, trainable_only=False) == n_parameters


def test_arnn_is_instantiable_from_a_hydra_config():
    from hydra.utils import instantiate

    config = {
        "_target_": "ctpm.models.ARNN",
        "in_channels": 1,
        "out_channels": 1,
        "base_channels": 4,
        "depth": 3,
        "channel_multiplier": 2,
        "blocks_per_level": 1,
        "norm": "group",
        "residual": False,
        "roi_attention": True,
        "skip_attention": False,
        "dropout": 0.1,
        "final_activation": "clamp",
    }
    model = instantiate(config)
    assert isinstance(model, ARNN)
    x, mask = make_batch()
    assert model(x, mask).shape == x.shape


# --- U-Net baseline ---------------------------------------------------------------------------

UNET_SMALL = dict(channels=(4, 8, 16), strides=(2, 2))


@pytest.mark.parametrize("spatial", [(16, 16, 16), (32, 16, 8)])
def test_unet_output_shape_and_range(spatial):
    model = UNet(**UNET_SMALL)
    x, mask = make_batch((2, 1, *spatial))
    output = model(x, mask)
    assert output.shape == x.shape
    assert output.min() >= 0 and output.max() <= 1


def test_unet_masks_the_output_only_when_asked():
    x, mask = make_batch()
    torch.manual_seed(0)
    masked = UNet(mask_output=True, **UNET_SMALL)(x, mask.bool())
    torch.manual_seed(0)
    unmasked = UNet(mask_output=False, **UNET_SMALL)(x, mask)
    assert torch.all(masked[mask == 0] == 0)
    assert torch.all(unmasked[mask == 0] > 0)
    torch.testing.assert_close(masked[mask == 1], unmasked[mask == 1])


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_unet_norms_and_residual_units_run_forward_and_backward(norm):
    model = UNet(norm=norm, num_res_units=1, dropout=0.1, **UNET_SMALL)
    x, mask = make_batch()
    model(x, mask).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unet_rejects_bad_sizes_and_arguments():
    x, mask = make_batch((1, 1, 16, 16, 14))
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet(**UNET_SMALL)(x, mask)
    with pytest.raises(ValueError, match="strides"):
        UNet(channels=(4, 8, 16), strides=(2,))
    with pytest.raises(ValueError, match="norm"):
        UNet(norm="layer", **UNET_SMALL)


def test_unet_default_is_a_drop_in_for_arnn_and_runs_under_bfloat16_autocast():
    model = UNet()  # default channels (16, 32, 64, 128): 8 is the size multiple, as for ARNN()
    x, mask = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(x, mask)
    assert output.shape == x.shape
    assert torch.isfinite(output).all()
    assert torch.all(output[mask == 0] == 0)
