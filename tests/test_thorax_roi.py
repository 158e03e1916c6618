"""preprocessing.roi_mode=thorax: both lungs in one ROI, their box resized by one factor for all
axes and padded to roi_size, never mirrored. On a hand-made two-lung volume (the right lung twice
as wide as the left): the scale, both lungs inside, their relative sizes and places, the exact
inverse (against MONAI's Invertd, constants, the roundtrip R), the context channels, the config
key and its hash; on the tiny cohort: training, the writer and the Predictor in CT geometry."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from monai.utils import TraceKeys
from scipy import ndimage as ndi

from ctpm.data.cache import PreprocessCache, config_hash, roundtrip_r
from ctpm.data.io import save_nifti
from ctpm.data.lungs import LEFT, RIGHT
from ctpm.data.manifest import load_manifest
from ctpm.data.preprocess import preprocess_patient
from ctpm.data.record import LungInverse, restore, to_ct
from ctpm.data.transforms import IMAGE_KEYS, THORAX_MARGIN, PreprocessConfig, lung_stage
from ctpm.errors import CtpmError
from ctpm.lightning.train import build, train
from tests.conftest import TINY_PREPROCESSING
from tests.helpers import compose_train, run_cli, tiny_overrides

SPACING = 4.0
ROI = (32, 24, 32)  # superior-inferior, anterior-posterior, left-right
THORAX = {"spacing": [SPACING] * 3, "roi_size": list(ROI), "roi_mode": "thorax"}
# the hand-made lungs (RAS index boxes: i towards the patient's right, j anterior, k superior):
# the right lung twice as wide (i) as the left, both of the same depth (j) and height (k)
LUNG_BOXES = {RIGHT: (slice(24, 40), slice(8, 32), slice(8, 42)), LEFT: (slice(8, 16), slice(8, 32), slice(8, 42))}


@pytest.fixture(scope="module")
def two_lungs(tmp_path_factory) -> dict:
    """CT (tissue 40 HU, lungs -850 HU), its lung labels and a smooth SPECT on a 4 mm RAS grid."""
    d = tmp_path_factory.mktemp("two_lungs")
    shape = (56, 40, 50)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = (-112.0, -80.0, -100.0)
    labels = np.zeros(shape, np.uint8)
    for value, box in LUNG_BOXES.items():
        labels[box] = value
    ct = np.where(labels > 0, -850.0, 40.0).astype(np.float32)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    spect = (1.0 + 0.04 * (40 - j) + 0.02 * k + 0.3 * np.sin(i / 5.0)).astype(np.float32)  # smooth, > 0
    return {"patient_id": "TWO-LUNGS",
            "ct": save_nifti(ct, affine, d / "ct.nii.gz"),
            "lung_mask": save_nifti(labels, affine, d / "lungs.nii.gz", dtype=np.uint8),
            "spect": save_nifti(spect, affine, d / "spect.nii.gz")}


@pytest.fixture(scope="module")
def thorax(two_lungs):
    return preprocess_patient(two_lungs, {**THORAX, "context_channels": ["height", "posterior", "pleura", "side"]})


def _extent(mask: np.ndarray, axis: int) -> int:
    hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
    return int(hit[-1] - hit[0] + 1) if hit.size else 0


def _roi_lungs(rec) -> dict[int, np.ndarray]:
    """The two lungs of the thorax's ROI mask (connected parts; the right lung at larger W)."""
    lab, n = ndi.label(rec.lung[0] > 0)
    assert n == 2, n
    parts = sorted((lab == v for v in (1, 2)), key=lambda m: np.argwhere(m)[:, 2].mean())
    return {LEFT: parts[0], RIGHT: parts[1]}


def test_one_roi_one_scale_factor_both_lungs_inside(thorax):
    rec = thorax
    assert rec.sides == ["thorax"] and list(rec.inverse) == ["thorax"]
    for name in ("ct", "spect", "lung", "mask"):
        assert getattr(rec, name).shape == (1, *ROI), name
    inv = rec.inverse["thorax"]
    # the box: both lungs' box on the evaluation grid with THORAX_MARGIN, within the grid
    lungs = rec.grid_lungs > 0
    for g in range(3):
        hit = np.flatnonzero(lungs.any(axis=tuple(a for a in range(3) if a != g)))
        assert inv.start[g] == max(0, hit[0] - THORAX_MARGIN)
        assert inv.stop[g] == min(lungs.shape[g], hit[-1] + 1 + THORAX_MARGIN)
    # one scale factor: every ROI axis holds box x s voxels (rounded), the tightest axis fills roi_size
    box = [inv.box_shape[g] for g in inv.transpose]
    s = min(n / b for n, b in zip(ROI, box))
    assert all(abs(f - b * s) <= 0.5 for f, b in zip(inv.fitted, box)), (inv.fitted, box, s)
    assert any(f == n for f, n in zip(inv.fitted, ROI)) and all(f <= n for f, n in zip(inv.fitted, ROI))
    spacing = inv.roi_spacing(rec.grid.spacing)  # mm per ROI voxel: the same on every axis
    assert max(spacing) / min(spacing) < 1 + 1.0 / min(inv.fitted)
    # measured in the ROI itself: each lung's extent in ROI voxels over its extent in mm, per axis
    roi_lungs = _roi_lungs(rec)
    for value, box_ in LUNG_BOXES.items():
        mm = [(b.stop - b.start) * SPACING for b in box_]  # i, j, k
        for a, g in enumerate(inv.transpose):  # within a voxel of the nearest-neighbour resize
            assert abs(_extent(roi_lungs[value], a) - mm[g] / spacing[a]) <= 1.0, (value, a)
    # the padding: outside the fitted box the ROI is empty (the CT reads as air, 0)
    inside = np.zeros(ROI, bool)
    inside[tuple(slice(o, o + f) for o, f in zip(inv.offset, inv.fitted))] = True
    assert not rec.lung[0][~inside].any() and not rec.ct[0][~inside].any() and not rec.spect[0][~inside].any()
    assert rec.ct[0][inside].min() >= 0 and rec.ct[0][rec.lung[0] > 0].mean() < 0.3


def test_left_right_balance_survives_and_nothing_is_mirrored(two_lungs, thorax):
    """The right lung is twice as wide as the left: in the thorax's ROI it stays twice as wide (and
    twice the volume), on the patient's right (larger W, as on the RAS grid); the per-lung ROIs
    stretch both to the same width."""
    parts = _roi_lungs(thorax)
    widths = {v: _extent(m, 2) for v, m in parts.items()}
    assert widths[RIGHT] / widths[LEFT] == pytest.approx(2.0, abs=0.25), widths
    assert parts[RIGHT].sum() / parts[LEFT].sum() == pytest.approx(2.0, rel=0.12)
    assert _extent(parts[RIGHT], 0) == pytest.approx(_extent(parts[LEFT], 0), abs=1)  # same height
    # the right lung is the one at larger W: check it against the labels taken through the ROI
    back = restore({"thorax": np.broadcast_to(np.arange(ROI[2], dtype=np.float32), ROI)}, thorax)
    assert back[thorax.grid_lungs == RIGHT].mean() > back[thorax.grid_lungs == LEFT].mean() + 5
    per_lung = preprocess_patient(two_lungs, {"spacing": [SPACING] * 3, "roi_size": [32, 16, 16]})
    assert per_lung.sides == ["right", "left"]
    assert [_extent(per_lung.lung[i] > 0, 2) for i in range(2)] == [16, 16]  # each lung fills its ROI


def test_the_inverse_is_exact(thorax, two_lungs, tmp_path):
    rec = thorax
    # a constant comes back as that constant in both lungs, exactly 0 outside them
    grid = restore({"thorax": np.full(ROI, 0.6, np.float32)}, rec)
    np.testing.assert_allclose(grid[rec.grid_lungs > 0], 0.6, atol=1e-5)
    assert not grid[rec.grid_lungs == 0].any()
    ct = to_ct(grid, rec)
    assert ct.shape == rec.ct_grid.shape and not ct[np.asarray(rec.ct_lungs) == 0].any()
    inner = ndi.binary_erosion(np.asarray(rec.ct_lungs) > 0, iterations=2)
    np.testing.assert_allclose(ct[inner], 0.6, atol=1e-4)
    # the SPECT through the ROI and back: the evaluation-grid map, R near 1 at this roi_size ...
    assert roundtrip_r(rec) >= 0.98
    back = restore(rec.roi_maps(rec.spect), rec)
    assert not back[rec.grid_lungs == 0].any()
    m = rec.grid_mask > 0
    assert np.median(np.abs(back[m] - rec.grid_spect[m])) < 0.02
    # ... and closer at a larger roi_size
    big = preprocess_patient(two_lungs, {**THORAX, "roi_size": [64, 48, 64]})
    assert roundtrip_r(big) >= roundtrip_r(rec) - 1e-3 and roundtrip_r(big) >= 0.99
    # the inverse survives the cache (meta.json) as it was computed
    cache = PreprocessCache(tmp_path, THORAX)
    cache.write(preprocess_patient(two_lungs, THORAX))
    loaded = cache.load("TWO-LUNGS")
    assert loaded.sides == ["thorax"] and loaded.inverse == {"thorax": rec.inverse["thorax"]}
    assert LungInverse.from_json(rec.inverse["thorax"].to_json()) == rec.inverse["thorax"]
    assert roundtrip_r(loaded) == pytest.approx(roundtrip_r(rec), abs=1e-6)


def test_the_explicit_inverse_matches_invertd_on_the_live_history():
    """The thorax's crop box, fitted size and padding read from the forward's record take a map
    back exactly as MONAI's Invertd replays the live transform history."""
    rng = np.random.default_rng(0)
    shape = (1, 30, 14, 24)
    lung = np.zeros(shape, np.float32)
    lung[:, 3:11, 2:12, 4:22] = 1  # one lung ...
    lung[:, 17:27, 3:12, 5:20] = 1  # ... and the other
    aff = torch.as_tensor(np.diag([4.0, 4.0, 4.0, 1.0]), dtype=torch.float64)
    d = {f"{k}_thorax": MetaTensor(torch.as_tensor(rng.random(shape, dtype=np.float32)), affine=aff.clone())
         for k in IMAGE_KEYS}
    d["lung_thorax"] = MetaTensor(torch.as_tensor(lung), affine=aff.clone())
    stage = lung_stage(PreprocessConfig(**THORAX), "thorax", IMAGE_KEYS)
    out = stage(d)
    live = out["ct_thorax"].applied_operations
    assert [op[TraceKeys.CLASS_NAME] for op in live] == ["CropForeground", "Transposed", "Resize", "SpatialPad"]
    inv = LungInverse.from_operations(live, ROI)
    assert inv.start == (1, 0, 2) and inv.stop == (29, 14, 24) and inv.flip == ()
    # box (z, y, x) = (22, 14, 28) into (32, 24, 32): s = min(32/22, 24/14, 32/28) = 8/7
    assert inv.fitted == (25, 16, 32) and inv.offset == (3, 4, 0)
    assert tuple(out["lung_thorax"].shape[1:]) == ROI
    pred = torch.as_tensor(rng.random((1, *ROI), dtype=np.float32))
    ref = Invertd(keys="pred", transform=stage, orig_keys="ct_thorax", nearest_interp=False)(
        {"pred": MetaTensor(pred.clone()), "ct_thorax": out["ct_thorax"]})["pred"][0].numpy()
    got = np.zeros(shape[1:], np.float32)
    got[1:29, 0:14, 2:24] = inv.to_box(pred[0].numpy())
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_context_channels_in_the_thorax_roi(thorax):
    """Computed over both lungs on the evaluation grid and cut with the one ROI: height spans the
    thorax (0 at the lowest lung voxel, 1 at the apex), side tells the two lungs apart."""
    rec = thorax
    assert rec.context.shape == (1, 4, *ROI)
    height, posterior, pleura, side = rec.context[0]
    parts = _roi_lungs(rec)
    lung = rec.lung[0] > 0
    assert height[lung].min() < 0.1 and height[lung].max() > 0.9
    assert posterior[lung].min() < 0.05 and posterior[lung].max() == pytest.approx(23 * SPACING / 100, abs=0.05)
    assert pleura[lung].max() > 0.1 and pleura[~ndi.binary_dilation(lung, iterations=2)].max() < 0.01  # 0 outside, smoothed
    assert np.median(side[parts[LEFT]]) > 0.9 and np.median(side[parts[RIGHT]]) < 0.1  # edges: interpolated
    assert rec.network_input().shape == (1, 5, *ROI)


def test_roi_mode_key_and_hash():
    assert "roi_mode" not in PreprocessConfig().to_dict()  # the caches of earlier configs keep their hash
    assert config_hash(PreprocessConfig(roi_mode="lung")) == config_hash(PreprocessConfig())
    assert config_hash(PreprocessConfig.from_any(THORAX)) != config_hash(PreprocessConfig.from_any(
        {k: v for k, v in THORAX.items() if k != "roi_mode"}))
    assert PreprocessConfig.from_any(THORAX).to_dict()["roi_mode"] == "thorax"
    with pytest.raises(CtpmError, match="roi_mode must be one of lung, thorax, not 'lobes'"):
        PreprocessConfig.from_any({"roi_mode": "lobes"})


def test_an_unknown_roi_mode_is_one_line(tiny_cohort, tmp_path):
    res = run_cli("ctpm-preprocess", f"manifest={tiny_cohort}", f"out={tmp_path}", "preprocessing.roi_mode=lobes")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        "ctpm-preprocess: error: preprocessing.roi_mode must be one of lung, thorax, not 'lobes'"]


def test_thorax_of_a_synthetic_patient_roundtrips(tiny_cohort):
    p = load_manifest(tiny_cohort).by_id()["LC-B-001"]
    rec = preprocess_patient(p, {**TINY_PREPROCESSING, "roi_size": list(ROI), "roi_mode": "thorax"})
    assert rec.sides == ["thorax"] and rec.ct.shape == (1, *ROI)
    assert roundtrip_r(rec) >= 0.95


def test_thorax_trains_and_predicts_in_ct_geometry(tiny_cohort, cache_copy, tmp_path):
    """ctpm-train's job with roi_mode=thorax (and the PSF-aware loss and context channels, which
    read the thorax's ROI voxel size and channels): one epoch, the writer's maps in CT geometry,
    and the Predictor of its checkpoint makes the same map from the CT alone."""
    from ctpm.lightning.callbacks import write_patient_map
    from ctpm.lightning.predictor import Predictor

    over = [*tiny_overrides(tiny_cohort, cache_copy, tmp_path), "data.preprocessing.roi_mode=thorax",
            f"data.preprocessing.roi_size=[{','.join(map(str, ROI))}]", "model.psf.enabled=true",
            "data.preprocessing.context_channels=[height,side]", "model.net.in_channels=3", "test=false"]
    cfg = compose_train(over)
    dm = build(cfg)["datamodule"]
    dm.prepare_data()
    dm.setup("fit")
    item = dm.train_set[0]
    assert item["side"] == "thorax" and tuple(item["ct"].shape) == (3, *ROI)
    assert len(dm.train_set) == len(dm.train_set.records)  # one item per patient
    sp = item["roi_spacing"].numpy()
    assert sp.max() / sp.min() < 1.1  # the PSF is blurred by the same voxel size on every axis
    train(cfg)
    maps = sorted((tmp_path / "predictions").glob("*.nii.gz"))
    assert maps, "no patient map written"
    cache = PreprocessCache(cache_copy, cfg.data.preprocessing)
    for path in maps:
        record = cache.load(path.name[: -len(".nii.gz")])
        assert record.sides == ["thorax"]
        img = nib.load(str(path))
        assert img.shape == tuple(record.ct_grid.shape)
        arr = np.asarray(img.dataobj)
        lungs = np.asarray(record.ct_lungs)
        assert np.all(np.isfinite(arr)) and not arr[lungs == 0].any()
        assert np.any(arr[lungs == RIGHT] > 0) and np.any(arr[lungs == LEFT] > 0)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    predictor = Predictor([str(ckpt)])
    assert predictor.cfg.roi_mode == "thorax"
    p = load_manifest(tiny_cohort).cohort("cancer")[0]
    pred = predictor.predict({"patient_id": p.patient_id, "ct": p.ct})
    assert not cache.ensure([p], progress=False).failed
    rec = cache.load(p.patient_id)
    assert pred.perfusion.shape == tuple(rec.ct_grid.shape) and not pred.perfusion[np.asarray(rec.ct_lungs) == 0].any()
    assert (pred.perfusion > 0).sum() > 100
    mean, _ = predictor.roi_maps(rec)
    written = np.asarray(nib.load(str(write_patient_map(rec, mean, tmp_path / "w.nii.gz"))).dataobj)
    np.testing.assert_allclose(written, pred.perfusion, atol=1e-5)
