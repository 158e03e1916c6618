"""Every model option of the ablation (backbones, norms, loss terms) composes from the config
tree, trains one fast_dev_run batch on the tiny cohort and predicts a map in CT geometry."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from ctpm.data.cache import PreprocessCache
from ctpm.lightning.train import build, train
from tests.helpers import compose_train, tiny_overrides

OPTIONS = {
    "dynunet": ["model/net=dynunet"],
    "segresnet": ["model/net=segresnet"],
    # five halvings: the ROI must be divisible by 32 (and leave more than one voxel at the bottom)
    "swinunetr": ["model/net=swinunetr", "model.net.heads=[1,1,1,1]", "data.preprocessing.roi_size=[64,32,32]"],
    "batchnorm": ["model.net.norm=batch"],
    "psf": ["model.psf.enabled=true"],
    "correlation_mean": ["model.correlation_weight=0.5", "model.mean_weight=1.0"],
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_model_option_trains_and_predicts_in_ct_geometry(option, tiny_cohort, cache_copy, tmp_path):
    over = [*tiny_overrides(tiny_cohort, cache_copy, tmp_path), *OPTIONS[option], "debug=fdr", "predict=true"]
    cfg = compose_train(over)
    model = build(cfg)["model"]
    assert type(model.net).__name__.lower() == (option if option in ("dynunet", "segresnet", "swinunetr") else "arnn")
    train(cfg)
    maps = sorted((tmp_path / "predictions").glob("*.nii.gz"))
    assert maps, "no patient map written"
    cache = PreprocessCache(cache_copy, cfg.data.preprocessing)
    for path in maps:
        record = cache.load(path.name[: -len(".nii.gz")])
        img = nib.load(str(path))
        assert img.shape == tuple(record.ct_grid.shape)
        np.testing.assert_allclose(img.affine, record.ct_grid.affine, atol=1e-4)
        arr = np.asarray(img.dataobj)
        assert np.all(np.isfinite(arr)) and np.all(arr[np.asarray(record.ct_lungs) == 0] == 0)
        assert np.any(arr[np.asarray(record.ct_lungs) > 0] > 0)


def test_the_dataset_carries_the_roi_voxel_size_and_the_psf(tiny_cohort, tiny_cache, tmp_path):
    """roi_spacing: the crop box's extent in mm over roi_size, per ROI axis; spect_fwhm_mm: the
    manifest's column (synthetic cohorts record the PSF their SPECT was simulated with)."""
    cfg = compose_train(tiny_overrides(tiny_cohort, tiny_cache, tmp_path))
    dm = build(cfg)["datamodule"]
    dm.setup("fit")
    item = dm.train_set[0]
    record = dm.train_set.records[item["patient_id"]]
    inv = record.inverse[item["side"]]
    spacing = record.grid.spacing
    expected = [spacing[g] * (inv.stop[g] - inv.start[g]) / inv.roi_size[a] for a, g in enumerate(inv.transpose)]
    np.testing.assert_allclose(item["roi_spacing"].numpy(), expected, rtol=1e-6)
    fwhm = float(item["spect_fwhm_mm"])
    assert math.isfinite(fwhm) and 3.0 < fwhm < 40.0


def test_context_channels_of_a_hand_made_thorax_are_as_defined():
    """Two box lungs on a 2 x 3 x 4 mm grid (RAS: i right, j anterior, k superior), margins of
    empty grid around them: every channel against its definition, computed here by hand."""
    from ctpm.data.transforms import context_maps

    lungs = np.zeros((12, 9, 10), np.uint8)
    lungs[1:5, 2:8, 1:9] = 1  # right lung: i 1..4, j 2..7, k 1..8
    lungs[6:11, 3:7, 2:9] = 2  # left lung: i 6..10, j 3..6, k 2..8
    spacing = (2.0, 3.0, 4.0)
    height, posterior, pleura, side = context_maps(lungs, spacing, ["height", "posterior", "pleura", "side"])
    # height: 0 at the lowest lung slice (k = 1), 1 at the apex (k = 8), linear in k, everywhere
    for k in range(10):
        assert np.allclose(height[:, :, k], (k - 1) / 7)
    # posterior: mm from the most posterior lung voxel (j = 2), in decimetres
    for j in range(9):
        assert np.allclose(posterior[:, j, :], (j - 2) * 3.0 / 100)
    # pleura: distance to the nearest non-lung voxel (box faces: the nearest outside voxel along an axis)
    for (i, j, k) in [(2, 4, 4), (1, 2, 1), (3, 5, 6), (8, 4, 5)]:
        right = lungs[i, j, k] == 1
        box = (slice(1, 5), slice(2, 8), slice(1, 9)) if right else (slice(6, 11), slice(3, 7), slice(2, 9))
        steps = [min(v - b.start + 1, b.stop - v) * s for v, b, s in zip((i, j, k), box, spacing)]
        assert pleura[i, j, k] == pytest.approx(min(steps) / 100)
    assert np.all(pleura[lungs == 0] == 0)
    # side: 1 in the left lung only
    assert np.array_equal(side, (lungs == 2).astype(np.float32))
    with pytest.raises(Exception, match="unknown context channel"):
        context_maps(lungs, spacing, ["depth"])


def test_context_channels_survive_the_crop_and_feed_the_network(tiny_cohort, cache_copy, tmp_path):
    """preprocessing.context_channels: the channels computed on the evaluation grid, cut and resized
    with each lung (the ROI's height channel spans only that lung's share of the thorax), fed to the
    network as extra input channels; it trains and predicts."""
    over = [*tiny_overrides(tiny_cohort, cache_copy, tmp_path), "data.preprocessing.context_channels=[height,side]",
            "model.net.in_channels=3", "debug=fdr", "predict=true"]
    cfg = compose_train(over)
    dm = build(cfg)["datamodule"]
    dm.prepare_data()
    dm.setup("fit")
    item = dm.train_set[0]
    assert item["ct"].shape[0] == 3
    height, side = item["ct"][1], item["ct"][2]
    lung = item["lung"][0] > 0
    assert 0.0 <= float(height.min()) and float(height.max()) <= 1.0
    assert float(height[lung].max() - height[lung].min()) > 0.3  # it varies along the lung ...
    assert float(side[lung].mean()) == pytest.approx(1.0 if item["side"] == "left" else 0.0, abs=0.05)
    train(cfg)
    assert sorted((tmp_path / "predictions").glob("*.nii.gz"))
    with pytest.raises(Exception, match="in_channels"):
        train(compose_train([*over[:-3], "debug=fdr"]))  # a 1-channel network on 3-channel input
