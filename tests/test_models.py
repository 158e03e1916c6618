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


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "layer", "none"])
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
        ARNN(norm="weight")
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


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "layer", "none"])
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
        UNet(norm="weight", **UNET_SMALL)


def test_unet_default_is_a_drop_in_for_arnn_and_runs_under_bfloat16_autocast():
    model = UNet()  # default channels (16, 32, 64, 128): 8 is the size multiple, as for ARNN()
    x, mask = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(x, mask)
    assert output.shape == x.shape
    assert torch.isfinite(output).all()
    assert torch.all(output[mask == 0] == 0)


# ---- MONAI backbones behind the ARNN's interface ----

from ctpm.models import DynUNet, SegResNet, SwinUNETR  # noqa: E402

BACKBONES = {
    "dynunet": lambda **kw: DynUNet(base_channels=4, depth=3, **kw),
    "segresnet": lambda **kw: SegResNet(base_channels=4, depth=3, **kw),
    "swinunetr": lambda **kw: SwinUNETR(base_channels=12, heads=(1, 1, 1, 1), **kw),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_takes_the_mask_as_a_channel_and_masks_its_output(name):
    net = BACKBONES[name]()
    x, mask = make_batch((2, 1, 64, 32, 32))  # the demo ROI; SwinUNETR's 5 halvings leave 2 x 1 x 1
    out = net(x, mask)
    assert out.shape == x.shape
    assert torch.all(out[mask == 0] == 0) and torch.all(out[mask == 1] > 0)
    # the mask is an input: changing it changes the prediction inside the lung, not only its outline
    other = mask.clone()
    other[:, :, :32] = 1
    assert not torch.allclose(net(x, other)[mask == 1], out[mask == 1])
    # first layer sees image + mask
    first = next(m for m in net.modules() if isinstance(m, nn.Conv3d))
    assert first.in_channels == 2


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_without_mask_channel_or_output_mask(name):
    net = BACKBONES[name](mask_channel=False, mask_output=False)
    x, mask = make_batch((1, 1, 64, 32, 32))
    out = net(x, mask)
    torch.testing.assert_close(out, net(x))  # the mask is not used at all
    assert torch.all(out > 0)


@pytest.mark.parametrize("name, multiple", [("dynunet", 4), ("segresnet", 4), ("swinunetr", 32)])
def test_backbone_rejects_sizes_it_cannot_take(name, multiple):
    net = BACKBONES[name]()
    x, mask = make_batch((1, 1, 64, 32, 32 + multiple // 2))
    with pytest.raises(ValueError, match=f"divisible by {multiple}"):
        net(x, mask)


@pytest.mark.parametrize("norm", ["instance", "batch", "group", "layer", "none"])
@pytest.mark.parametrize("name", ["arnn", "dynunet", "segresnet"])
def test_every_norm_of_every_convolutional_backbone_trains(name, norm):
    if name == "dynunet" and norm == "none":
        with pytest.raises(ValueError, match="always normalises"):
            BACKBONES[name](norm=norm)
        return
    net = ARNN(depth=3, norm=norm, **SMALL) if name == "arnn" else BACKBONES[name](norm=norm)
    x, mask = make_batch((2, 1, 16, 16, 16))
    net(x, mask).sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("norm, keeps", [("instance", False), ("group", False), ("layer", False),
                                         ("batch", True), ("none", True)])
def test_which_norms_keep_the_global_density_level(norm, keeps):
    """Per-sample norms (instance, group, layer) map the features of a lung and of the same lung
    uniformly denser (a constant added) to the same output; batch norm (running statistics at
    inference) and none keep the difference."""
    from ctpm.models.arnn import make_norm

    layer = make_norm(norm, 8).eval()
    f = torch.rand(2, 8, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (layer(f + 0.3) - layer(f)).abs().max().item()
    assert (diff > 1e-3) == keeps, diff


# ---- the training module's loss options ----

from ctpm.lightning.module import gaussian_blur3d, masked_pearson, psf_sigma_voxels  # noqa: E402


def test_gaussian_blur_matches_scipy_per_sample_and_axis():
    import numpy as np
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 12, 10, 8))
    sigmas = np.array([[1.3, 0.7, 2.0], [0.0, 1.0, 0.4]])
    got = gaussian_blur3d(torch.from_numpy(x), torch.from_numpy(sigmas)).numpy()
    for b in range(2):
        ref = ndi.gaussian_filter(x[b, 0], sigma=sigmas[b], mode="constant", truncate=3.0)
        np.testing.assert_allclose(got[b, 0], ref, atol=1e-10)


def test_psf_sigma_is_the_fwhm_in_roi_voxels_per_axis():
    sigma = psf_sigma_voxels(torch.tensor([2.3548200450309493 * 6.0]), torch.tensor([[3.0, 1.5, 2.0]]))
    torch.testing.assert_close(sigma, torch.tensor([[2.0, 4.0, 3.0]]))


def test_masked_pearson_matches_scipy():
    import numpy as np
    from scipy.stats import pearsonr

    rng = np.random.default_rng(1)
    a = rng.random((2, 1, 6, 6, 6))
    b = a + rng.random(a.shape)
    m = rng.random(a.shape) > 0.3
    got = masked_pearson(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(m)).numpy()
    np.testing.assert_allclose(got, [pearsonr(a[i][m[i]], b[i][m[i]])[0] for i in range(2)], rtol=1e-6)


def _module(**kw):
    from functools import partial

    from ctpm.lightning.module import CTPMModule

    return CTPMModule(net=ARNN(depth=2, **SMALL), optimizer=partial(torch.optim.Adam, lr=1e-3), **kw)


def test_psf_aware_loss_is_minimised_by_the_truth_not_by_the_blurred_truth():
    """Hand case: the SPECT is the truth blurred by the patient's PSF (FWHM 8 mm in an ROI of
    2 x 4 x 3 mm voxels). With the PSF-aware loss the truth scores ~0 and the blurred truth (what
    a camera-blind loss would ask for) scores worse; without it, the other way round."""
    g = torch.Generator().manual_seed(0)
    truth = torch.zeros(1, 1, 24, 16, 16)
    truth[:, :, 4:20, 3:13, 3:13] = 0.5 + 0.5 * torch.rand(1, 1, 16, 10, 10, generator=g)
    truth[:, :, 8:12, 5:9, 5:9] = 0.0  # a defect
    spacing = torch.tensor([[2.0, 4.0, 3.0]])
    fwhm = torch.tensor([8.0])
    spect = gaussian_blur3d(truth, psf_sigma_voxels(fwhm, spacing))
    batch = {"spect": spect, "mask": torch.ones_like(truth), "roi_spacing": spacing, "spect_fwhm_mm": fwhm}
    aware = _module(psf={"enabled": True})
    assert aware.objective(truth, batch) < 1e-12
    assert aware.objective(spect, batch) > 1e-4
    assert aware.objective(truth, batch) < aware.objective(spect, batch)
    blind = _module()
    assert blind.objective(spect, batch) < 1e-12 < blind.objective(truth, batch)


def test_psf_fwhm_falls_back_to_the_config_and_is_required():
    from ctpm.errors import CtpmError

    x = torch.rand(1, 1, 8, 8, 8)
    batch = {"spect": x, "mask": torch.ones_like(x), "roi_spacing": torch.tensor([[2.0, 2.0, 2.0]]),
             "spect_fwhm_mm": torch.tensor([float("nan")])}
    with pytest.raises(CtpmError, match="fwhm_mm"):
        _module(psf={"enabled": True}).objective(x, batch)
    assert _module(psf={"enabled": True, "fwhm_mm": 6.0}).objective(x, batch) > 0
    with pytest.raises(CtpmError, match="unknown model.psf"):
        _module(psf={"fwhm": 6.0})


def test_correlation_and_mean_terms_add_what_they_say():
    g = torch.Generator().manual_seed(2)
    t = torch.rand(2, 1, 8, 8, 8, generator=g)
    p = torch.rand(2, 1, 8, 8, 8, generator=g)
    mask = torch.ones_like(t)
    batch = {"spect": t, "mask": mask}
    base = _module().objective(p, batch)
    r = masked_pearson(p, t, mask)
    corr = _module(correlation_weight=0.5).objective(p, batch)
    torch.testing.assert_close(corr, base + 0.5 * (1 - r).mean())
    mean = _module(mean_weight=2.0).objective(p, batch)
    d = p.flatten(1).mean(1) - t.flatten(1).mean(1)
    torch.testing.assert_close(mean, base + 2.0 * d.square().mean())
    # a prediction off by a constant: perfect correlation, only the mean term sees it
    assert _module(correlation_weight=1.0).objective(t + 0.2, batch) - _module().objective(t + 0.2, batch) < 1e-6
