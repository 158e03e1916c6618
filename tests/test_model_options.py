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
