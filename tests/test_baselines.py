"""The geometry prior and the fair density baseline (ctpm.evaluation.baselines), the lung interior
and the SPECT-resolution helpers (ctpm.evaluation.regions), on hand-made volumes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats
from scipy import ndimage as ndi

from ctpm.evaluation.baselines import (
    DensityBaseline,
    GeometryPrior,
    ceiling_maps,
    lung_position,
)
from ctpm.evaluation.evaluate import map_metrics
from ctpm.evaluation.regions import (
    FWHM_PER_SIGMA,
    border_distance_mm,
    gaussian_mm,
    interior_mask,
    normalised_convolution,
    voxel_ml,
)


def phantom(pid: str, size: float, fwhm: float = 12.0, spacing=(3.0, 3.0, 3.0), seed: int = 0):
    """Two ellipsoidal lungs (1 right at larger x, 2 left) in a RAS grid, some 'vessel' voxels
    out of the evaluation mask, random CT, and a SPECT that IS the lung mask blurred by fwhm
    times a posterior and a cranio-caudal gradient."""
    rng = np.random.default_rng(seed)
    shape = (44, 30, 40)
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = (-60.0, 10.0, -200.0)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    lungs = np.zeros(shape, np.uint8)
    for label, ci in ((1, 32), (2, 12)):
        inside = ((i - ci) / (8 * size)) ** 2 + ((j - 15) / (11 * size)) ** 2 + ((k - 20) / (16 * size)) ** 2 < 1
        lungs[inside] = label
    mask = (lungs > 0) & (rng.random(shape) > 0.1)
    gv = SimpleNamespace(patient=SimpleNamespace(patient_id=pid, spect_fwhm_mm=fwhm), affine=aff, lungs=lungs,
                         mask=mask, lobes=None, truth=None, ct=rng.normal(-800, 60, shape))
    dep, cc = lung_position(gv)
    blurred = gaussian_mm(lungs > 0, fwhm, spacing)
    spect = np.zeros(shape, np.float32)
    spect[mask] = blurred[mask] * (0.3 + 0.35 * dep + 0.2 * cc)
    gv.spect, gv.shape = spect, shape
    return gv


def test_lung_position_in_world_coordinates():
    gv = phantom("p", 1.0)
    dep, cc = lung_position(gv)
    j = np.nonzero(gv.mask)[1]
    k = np.nonzero(gv.mask)[2]
    # RAS: larger j is anterior, so the most posterior voxel (smallest j) is dep = 1; larger k superior
    assert dep[j == j.min()].max() == pytest.approx(1.0) and dep[j == j.max()].min() == pytest.approx(0.0)
    assert cc[k == k.max()].min() == pytest.approx(1.0) and cc[k == k.min()].max() == pytest.approx(0.0)
    flipped = SimpleNamespace(**{**vars(gv), "affine": gv.affine @ np.diag([1.0, -1.0, 1.0, 1.0])})
    assert np.allclose(lung_position(flipped)[0], 1.0 - dep)  # an A-P flipped grid: the same anatomy


def test_geometry_prior_recovers_a_blurred_mask_times_a_gradient():
    cohort = [phantom(f"p{n}", size, seed=n) for n, size in enumerate((0.8, 0.9, 1.0, 1.1))]
    prior = GeometryPrior(default_fwhm_mm=99.0)  # the manifest's FWHM (12 mm) must be the one used
    for gv in cohort:
        prior.add(gv)
    coef = prior.coefficients(leave_out="p2")
    assert coef == pytest.approx([0.3, 0.35, 0.2], abs=1e-6)  # exact: the phantom is in the model
    gv = cohort[2]
    pred = prior.predict(gv, leave_out="p2")
    m = gv.mask
    assert scipy.stats.spearmanr(pred[m], gv.spect[m]).statistic > 0.999
    assert np.abs(pred[m] - gv.spect[m]).max() < 1e-5
    assert (pred[~m] == 0).all()
    # no CT intensity enters: another CT, the same map
    other = SimpleNamespace(**{**vars(gv), "ct": np.zeros_like(gv.ct)})
    assert np.array_equal(prior.predict(other, leave_out="p2"), pred)
    # a wrong resolution fits worse
    wrong = GeometryPrior()
    for g in cohort:
        g.patient = SimpleNamespace(patient_id=g.patient.patient_id, spect_fwhm_mm=None)  # default 13.5 mm used
        wrong.add(g)
    assert np.abs(wrong.predict(gv, leave_out="p2")[m] - gv.spect[m]).max() > 1e-3


def test_density_baseline_smoothed_to_the_spect_resolution():
    """A SPECT that is linear in the HU seen at the SPECT's resolution: the fair (smoothed) density
    baseline recovers it; the raw one, fitted on voxel HU with their CT-resolution noise, cannot."""
    cohort = []
    for n, size in enumerate((0.9, 1.0, 1.1, 1.0)):
        gv = phantom(f"p{n}", size, seed=n)
        rng = np.random.default_rng(10 + n)
        gv.ct = -850.0 + 150.0 * rng.normal(size=gv.shape)
        smooth = normalised_convolution(gv.ct, gv.lungs > 0, 12.0, (3.0, 3.0, 3.0))
        gv.spect = np.where(gv.mask, 0.6 + 0.02 * (smooth + 850.0), 0.0).astype(np.float32)
        cohort.append(gv)
    raw, fair = DensityBaseline(), DensityBaseline(smooth=True)
    for gv in cohort:
        raw.add(gv)
        fair.add(gv)
    gv, m = cohort[3], cohort[3].mask
    r_fair = scipy.stats.spearmanr(fair.predict(gv, leave_out="p3")[m], gv.spect[m]).statistic
    r_raw = scipy.stats.spearmanr(raw.predict(gv, leave_out="p3")[m], gv.spect[m]).statistic
    assert r_fair > 0.999 and r_raw < 0.5
    assert raw.coefficients().shape == fair.coefficients().shape == (6,)


def test_normalised_convolution_stays_inside_the_support():
    shape = (20, 20, 20)
    support = np.zeros(shape, bool)
    support[5:15, 5:15, 5:15] = True
    values = np.where(support, -850.0, 40.0)  # chest wall outside
    out = normalised_convolution(values, support, 10.0, (2.0, 2.0, 2.0))
    assert np.allclose(out[support], -850.0) and (out[~support] == 0).all()
    # against the definition at one voxel: the Gaussian-weighted mean of the support's values
    rng = np.random.default_rng(1)
    values = rng.normal(size=shape)
    out = normalised_convolution(values, support, 6.0, (2.0, 1.0, 3.0))
    sigma = 6.0 / FWHM_PER_SIGMA / np.array([2.0, 1.0, 3.0])
    w_num = ndi.gaussian_filter(np.where(support, values, 0.0), sigma, mode="constant")
    w_den = ndi.gaussian_filter(support.astype(float), sigma, mode="constant")
    assert out[7, 9, 11] == pytest.approx(w_num[7, 9, 11] / w_den[7, 9, 11], rel=1e-12)


@pytest.mark.parametrize("spacing, depth, expected", [((2.0, 2.0, 2.0), 4.0, (8, 8, 8)),
                                                      ((1.0, 2.0, 4.0), 4.0, (4, 8, 10)),
                                                      ((2.0, 2.0, 2.0), 3.9, (10, 10, 10))])
def test_interior_of_a_box(spacing, depth, expected):
    """A box of 12^3 voxels: the voxel in layer k from a face (k = 0 on the face) lies (k + 1) x
    spacing from the nearest voxel outside; it is interior when that exceeds depth."""
    shape = (20, 20, 20)
    box = np.zeros(shape, bool)
    box[4:16, 4:16, 4:16] = True
    inner = interior_mask(box, spacing, depth)
    idx = np.nonzero(inner)
    assert tuple(int(i.max() - i.min() + 1) for i in idx) == expected and inner.sum() == np.prod(expected)
    assert border_distance_mm(box, spacing)[4, 10, 10] == pytest.approx(spacing[0])


def test_interior_border_is_the_lungs_and_the_grid_edge():
    box = np.ones((12, 12, 12), bool)  # the lungs cut by the grid's edge: the edge is a border
    assert interior_mask(box, (2.0, 2.0, 2.0), 4.0).sum() == 8 ** 3
    mask = box.copy()
    mask[6, 6, 6] = False  # a vessel out of the evaluation mask makes no border of the lungs
    inner = interior_mask(mask, (2.0, 2.0, 2.0), 4.0, support=box)
    assert inner.sum() == 8 ** 3 - 1 and not inner[6, 6, 6]
    assert interior_mask(mask, (2.0, 2.0, 2.0), 4.0).sum() < inner.sum()  # eroding the mask itself loses more


def test_map_metrics_interior_and_pearson_against_scipy():
    gv = phantom("p", 1.0, fwhm=9.0)
    gv.lobes = None
    rng = np.random.default_rng(3)
    pred = np.clip(gv.spect + rng.normal(0, 0.05, gv.shape), 0, 1).astype(np.float32)
    row = map_metrics(gv, pred)
    m = gv.mask
    pred64, spect64 = pred.astype(np.float64), gv.spect.astype(np.float64)  # scipy's reference in float64
    inner = interior_mask(m, (3.0, 3.0, 3.0), 9.0, support=gv.lungs > 0)
    assert 0 < inner.sum() < m.sum() and row["n_voxels_interior"] == inner.sum()
    assert row["pearson_r"] == pytest.approx(scipy.stats.pearsonr(pred64[m], spect64[m]).statistic, abs=1e-9)
    assert row["spearman_r_interior"] == pytest.approx(scipy.stats.spearmanr(pred[inner], gv.spect[inner]).statistic,
                                                       abs=1e-9)
    assert row["pearson_r_interior"] == pytest.approx(scipy.stats.pearsonr(pred64[inner], spect64[inner]).statistic,
                                                      abs=1e-9)
    hi_p, hi_s = pred[inner] >= 0.66, gv.spect[inner] >= 0.66
    if hi_p.sum() + hi_s.sum():
        assert row["dice_high_interior"] == pytest.approx(2 * (hi_p & hi_s).sum() / (hi_p.sum() + hi_s.sum()))
    # the blur at the border makes the interior harder than the whole mask
    assert row["spearman_r_interior"] < row["spearman_r"]


def test_ceiling_maps_blur_by_the_psf_and_standardise():
    gv = phantom("p", 1.0)
    truth = np.where(gv.lungs > 0, 1.0, 0.0).astype(np.float32)
    gv.truth = truth
    maps = ceiling_maps(gv, 12.0)
    m = gv.mask
    assert np.percentile(maps["truth_psf"][m], 75) <= 1.0 and maps["truth_psf"].max() == pytest.approx(1.0)
    blurred = gaussian_mm(truth, 12.0, (3.0, 3.0, 3.0))
    p75 = np.percentile(blurred[m], 75)
    assert np.allclose(maps["truth_psf"][m], np.clip(blurred[m] / p75, 0, 1), atol=1e-6)
    assert np.allclose(maps["truth"][m], 1.0)
    assert voxel_ml(gv.affine) == pytest.approx(0.027)
