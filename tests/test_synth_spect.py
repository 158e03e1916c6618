"""The synthetic SPECT's physics: projection-space SPECT (pytomography) of phantoms shows the
attenuation and the resolution the camera's config implies; counts, misregistration, clumps and
breathing as configured."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from scipy.optimize import curve_fit

from ctpm.errors import CtpmError
from ctpm.synth import make_patient
from ctpm.synth.spect import Camera, Scatter, breathing_blur, collimator_fwhm, hu_to_mu
from tests.conftest import synth_settings

pytest.importorskip("pytomography", reason="the projection SPECT model needs pytomography")

PIXEL = 4.0
RADIUS = 260.0


def _camera(shape, scatter: Scatter | None = None, pixel: float = PIXEL, **over) -> Camera:
    cam = dict(synth_settings()["physics"]["spect"]["camera"]["A"], **over)
    return Camera(shape, pixel, cam, RADIUS, scatter)


def _axis(n: int) -> np.ndarray:
    return (np.arange(n) - (n - 1) / 2) * PIXEL


def _fwhm(x: np.ndarray, profile: np.ndarray, centre: float) -> float:
    """FWHM of a Gaussian fitted (least squares) to a profile."""
    def g(u, a, m, s):
        return a * np.exp(-((u - m) ** 2) / (2 * s * s))

    p, _ = curve_fit(g, x, profile, p0=(profile.max(), centre, 6.0))
    return float(2 * np.sqrt(2 * np.log(2)) * abs(p[2]))


@pytest.mark.parametrize("offset", [0.0, 80.0])
def test_line_source_resolution_matches_the_collimator(offset):
    # (post-filter: a Gaussian of its own FWHM, added in quadrature by effective_fwhm)
    """A line source along the axis of rotation (and 80 mm off it) in air, 60 views, OSEM without
    post-filter: the measured FWHM (mean of radial and tangential; on the axis each) within 15 % of
    the configured collimator's at the orbit radius with the pixel term; the collimator alone by
    hand: D (L_eff + d) / L_eff (+) intrinsic."""
    n, nz = 64, 3
    cam = _camera((n, n, nz), post_filter_fwhm_mm=0.0)
    x = _axis(n)
    i, j = int(np.argmin(abs(x - offset))), int(np.argmin(abs(x)))
    act = np.zeros((n, n, nz), np.float32)
    act[i, j, :] = 1.0
    air = np.zeros_like(act)
    rec = cam.reconstruct(cam.acquire(act, air, 1e9, np.random.default_rng(0)), None)
    expected = cam.effective_fwhm()
    radial, tangential = _fwhm(x, rec[:, j, 1], x[i]), _fwhm(x, rec[i, :, 1], 0.0)
    assert (radial + tangential) / 2 == pytest.approx(expected, rel=0.15)
    if offset == 0:
        assert radial == pytest.approx(expected, rel=0.05) and tangential == pytest.approx(expected, rel=0.05)
    # the collimator model itself, by hand: GE LEHR 1.5 mm holes, 35 mm long, lead 2.83 / mm
    l_eff = 35.0 - 2 / 2.83
    geometric = 1.5 * (l_eff + RADIUS) / l_eff
    assert collimator_fwhm(cam.cam, RADIUS) == pytest.approx(np.hypot(geometric, 3.9), rel=1e-6)


def test_uniform_cylinder_shows_attenuation_and_correction_recovers_it():
    """A uniform water cylinder (r 120 mm): without attenuation correction the centre reads far
    below the rim (photons from the centre cross more water); with it the cylinder is flat."""
    n, nz = 64, 3
    cam = _camera((n, n, nz))
    x = _axis(n)
    r = np.hypot(x[:, None], x[None, :])
    act = np.repeat((r <= 120)[:, :, None], nz, 2).astype(np.float32)
    mu = act * hu_to_mu(np.array(0.0), synth_settings()["physics"]["spect"]["attenuation"])
    proj = cam.acquire(act, mu, 2e8, np.random.default_rng(1))
    centre, rim = r < 30, (r > 75) & (r < 100)
    no_ac, ac = cam.reconstruct(proj, None)[:, :, 1], cam.reconstruct(proj, mu)[:, :, 1]
    assert no_ac[centre].mean() / no_ac[rim].mean() < 0.8
    assert ac[centre].mean() / ac[rim].mean() == pytest.approx(1.0, abs=0.1)


def test_counts_scale_as_configured():
    n, nz = 32, 2
    cam = _camera((n, n, nz))
    act = np.zeros((n, n, nz), np.float32)
    act[10:20, 12:22] = 1.0
    air = np.zeros_like(act)
    for counts in (1e4, 1e6):
        proj = cam.acquire(act, air, counts, np.random.default_rng(2))
        assert proj.shape == (int(cam.cam["projections"]), n, nz)
        assert proj.sum() == pytest.approx(counts, abs=5 * np.sqrt(counts))
        assert np.array_equal(proj, np.round(proj)) and proj.min() >= 0


def test_hu_to_mu_is_bilinear():
    att = synth_settings()["physics"]["spect"]["attenuation"]
    mu = hu_to_mu(np.array([-1000.0, -500.0, 0.0, 500.0, 1000.0]), att)
    w, b = att["mu_water_per_cm"], att["mu_bone_per_cm"]
    np.testing.assert_allclose(mu, [0.0, w / 2, w, (w + b) / 2, b], rtol=1e-6)


def _com(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.indices(array.shape).reshape(3, -1).astype(np.float64)
    w = array.reshape(-1).astype(np.float64)
    ijk = (idx * w).sum(1) / w.sum()
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_recorded_misregistration_is_the_one_applied():
    """Without clumps and breathing the SPECT's centre of mass is the truth's moved by the recorded
    ct_to_spect (RAS), not the truth's own: the record is what was applied."""
    s = synth_settings()
    physics = copy.deepcopy(s["physics"])
    sp = physics["spect"]
    sp["misregistration"] = {"translation_mm": 12.0, "rotation_deg": 3.0}
    sp["clumps"]["rate"] = 0.0
    sp["breathing_mm"] = [0.0, 0.0]
    d = make_patient("NC-A-001", "noncancer", "A", s["presets"]["tiny"], physics, 3)
    m = np.asarray(d.spect_info["ct_to_spect"])
    truth = _com(d.perfusion, d.perfusion_affine)
    spect = _com(d.spect, d.spect_affine)
    assert np.linalg.norm(spect - (m[:3, :3] @ truth + m[:3, 3])) < 1.5
    assert np.linalg.norm(spect - truth) > 4.0
    np.testing.assert_allclose(m[:3, 3] - (np.eye(3) - m[:3, :3]) @ d.spect_info["rotation_centre_mm"],
                               d.spect_info["translation_mm"], atol=1e-3)
    json.dumps(d.spect_info)  # the record is plain JSON


def test_breathing_blurs_the_bases_not_the_apex():
    s = synth_settings()
    d = make_patient("NC-A-001", "noncancer", "A", s["presets"]["tiny"], s["physics"], 0)
    from ctpm.geometry import Grid

    # a row of thin axial slabs: after the blur the slab at the base spreads, the apical one does not
    class Ph:  # the two numbers of the phantom the blur reads
        z_apex, height = 100.0, 200.0

    grid = Grid.axis_aligned((4, 4, 101), (2.0, 2.0, 2.0), (0.0, 0.0, -100.0))
    act = np.zeros(grid.shape, np.float32)
    z = grid.axes()[2]
    for level in (90.0, -90.0):
        act[:, :, int(np.argmin(abs(z - level)))] = 1.0
    out = breathing_blur(act, grid, Ph, 16.0)
    prof = out[0, 0]

    def spread(level):
        near = abs(z - level) < 20
        w = prof[near]
        return float(np.sqrt((w * (z[near] - level) ** 2).sum() / w.sum()))

    assert spread(-90.0) > 3.5 and spread(90.0) < 1.5
    assert out.sum() == pytest.approx(act.sum(), rel=0.01)  # resampled, not pushed: mass to ~0.5 %
    assert d.spect_info["breathing_mm"] > 0


def test_projection_model_same_seed_same_bytes():
    n, nz = 32, 2
    cam = _camera((n, n, nz))
    act = np.zeros((n, n, nz), np.float32)
    act[8:20, 10:22] = 1.0
    mu = act * 0.15
    a, b = (cam.reconstruct(cam.acquire(act, mu, 1e5, np.random.default_rng(7)), mu) for _ in range(2))
    assert a.tobytes() == b.tobytes()


def test_ct_realism_numbers_by_hand():
    """A block of lung at -850 HU with a 40 HU tube of known volume: the vessel fraction is the
    tube's share; smoothed noise has a lower texture centroid than white noise."""
    from ctpm.synth.realism import ct_realism

    rng = np.random.default_rng(0)
    shape = (64, 64, 8)
    lungs = np.zeros(shape, np.uint8)
    lungs[8:56, 8:56] = 1
    hu = np.full(shape, -850.0, np.float32)
    hu[20:24, 20:24] = 40.0  # 16 of 48*48 voxels per slice
    white = hu + 20 * rng.standard_normal(shape).astype(np.float32)
    r = ct_realism(white, (2.0, 2.0, 2.0), lungs)
    assert r["vessel_fraction"] == pytest.approx(16 / 48**2, abs=1e-9)
    assert r["median"] == pytest.approx(-850, abs=3)
    from scipy import ndimage as ndi

    smooth = hu + 20 * ndi.gaussian_filter(rng.standard_normal(shape), (2, 2, 0)).astype(np.float32) * 5
    assert ct_realism(smooth, (2.0, 2.0, 2.0), lungs)["texture_centroid"] < r["texture_centroid"] - 0.02


def test_projection_patient_same_seed_same_bytes_and_its_fwhm():
    """A whole tiny patient through the projection model: reproducible to the byte, and its
    recorded FWHM is the camera's at an orbit radius within the configured range."""
    from ctpm.synth.spect import effective_fwhm

    s = synth_settings()
    preset = dict(s["presets"]["tiny"], spect_model="projection")
    a, b = (make_patient("LC-B-001", "cancer", "B", preset, s["physics"], 0) for _ in range(2))
    assert a.spect.tobytes() == b.spect.tobytes() and a.spect_info == b.spect_info
    assert a.spect_info["model"] == "projection" and a.spect.shape == tuple(preset["spect_matrix"]["B"])
    assert a.spect_info["scatter"] == {"fraction": s["physics"]["spect"]["camera"]["B"]["scatter_fraction"],
                                       "kernel": "exponential", "fwhm_mm": 40.0, "correction": "tew"}
    cam, pixel = s["physics"]["spect"]["camera"]["B"], preset["camera_pixel"]["B"]
    lo, hi = (effective_fwhm(cam, r, pixel) for r in cam["radius_mm"])
    assert lo <= a.spect_fwhm_mm <= hi


def test_ct_realism_calibre_of_a_tube():
    """A straight tube of 8 mm diameter: its centre-line diameter is 8 mm (to a voxel)."""
    from ctpm.synth.realism import ct_realism

    shape = (48, 48, 12)
    lungs = np.ones(shape, np.uint8)
    hu = np.full(shape, -850.0, np.float32)
    X, Y = np.meshgrid(np.arange(48) - 23.5, np.arange(48) - 23.5, indexing="ij")
    hu[(X**2 + Y**2) <= 4.0**2] = 40.0  # 1 mm voxels
    r = ct_realism(hu, (1.0, 1.0, 1.0), lungs)
    assert r["calibre_median"] == pytest.approx(8.0, abs=1.5)


# ---- scatter ----

def _half_max_width(x: np.ndarray, profile: np.ndarray) -> float:
    """Full width at half maximum of a peaked profile, by linear interpolation of its two crossings."""
    half = profile.max() / 2
    above = np.nonzero(profile >= half)[0]
    lo, hi = above[0], above[-1]
    left = np.interp(half, [profile[lo - 1], profile[lo]], [x[lo - 1], x[lo]])
    right = np.interp(half, [profile[hi + 1], profile[hi]], [x[hi + 1], x[hi]])
    return float(right - left)


@pytest.mark.parametrize("kernel", ["exponential", "gaussian"])
def test_scatter_kernel_has_the_configured_shape(kernel):
    """The detector-plane kernel: sum 1, radially symmetric, the configured FWHM (1 mm pixels)."""
    k = Scatter(fraction=0.35, kernel=kernel, fwhm_mm=40.0).kernel_2d(1.0)
    c = k.shape[0] // 2
    assert k.sum() == pytest.approx(1.0) and np.allclose(k, k.T) and np.allclose(k, k[::-1])
    x = np.arange(k.shape[0]) - c
    assert _half_max_width(x, k[:, c]) == pytest.approx(40.0, rel=0.03)
    if kernel == "exponential":  # exp(-r / l): the profile falls by e over l = FWHM / (2 ln 2)
        ell = 40.0 / (2 * np.log(2))
        assert k[c + 60, c] / k[c + 60 + round(ell), c] == pytest.approx(np.e, rel=0.03)


def test_scatter_counts_are_the_configured_fraction():
    """A line source in a water cylinder, scatter-to-primary 0.35: the expected terms hold it
    exactly; the Poisson photopeak's counts beyond a scatter-free acquisition of the same primary are
    0.35 of the primary within 2 %, and lie far outside the primary's footprint; the TEW estimate's
    counts are the scatter's within 3 %."""
    n, nz, pixel = 32, 8, 8.0
    x = (np.arange(n) - (n - 1) / 2) * pixel
    X, Y = np.meshgrid(x, x, indexing="ij")
    water = np.repeat((np.hypot(X, Y) <= 110)[:, :, None], nz, 2).astype(np.float32) * 0.153
    act = np.zeros((n, n, nz), np.float32)
    act[n // 2, n // 2, :] = 1.0
    counts = 2e7
    cam = _camera((n, n, nz), Scatter(fraction=0.35), pixel=pixel)
    acq = cam.acquire_windows(act, water, counts, np.random.default_rng(3))
    assert acq.scatter.sum() / acq.primary.sum() == pytest.approx(0.35, rel=1e-9)
    assert acq.photopeak.sum() == pytest.approx(counts, abs=5 * np.sqrt(counts))
    plain = _camera((n, n, nz), pixel=pixel).acquire(act, water, counts / 1.35, np.random.default_rng(4))
    assert (acq.photopeak.sum() - plain.sum()) / acq.primary.sum() == pytest.approx(0.35, rel=0.02)
    far = np.abs(x) > 50  # detector bins over 5 cm from the line's projection (in every view: the axis)
    assert plain[:, far].sum() < 1e-3 * plain.sum()  # the collimated primary stays within them
    assert (acq.photopeak - plain)[:, far].sum() > 0.2 * acq.scatter.sum()  # scatter spreads beyond
    assert acq.scatter_estimate.sum() == pytest.approx(acq.scatter.sum(), rel=0.03)
    assert acq.scatter_estimate.shape == acq.photopeak.shape and acq.scatter_estimate.min() >= 0


def _hot_cold(scatter: Scatter) -> tuple[float, float]:
    """A water cylinder (r 120 mm, activity 0.25) holding a hot disk (1.0) and a cold one (0.0), each
    35 mm in radius, 55 mm left and right of the axis; OSEM with attenuation correction and the
    acquisition's scatter estimate, if any. Returns the (hot - cold) / (hot + cold) contrast of the
    disks' cores (20 mm) and cold / hot."""
    n, nz, pixel = 32, 3, 8.0
    x = (np.arange(n) - (n - 1) / 2) * pixel
    X, Y = np.meshgrid(x, x, indexing="ij")
    body = np.hypot(X, Y) <= 120
    hot, cold = np.hypot(X + 55, Y), np.hypot(X - 55, Y)
    act = np.where(hot <= 35, 1.0, np.where(cold <= 35, 0.0, np.where(body, 0.25, 0.0)))
    act = np.repeat(act[:, :, None], nz, 2).astype(np.float32)
    mu = np.repeat(body[:, :, None], nz, 2).astype(np.float32) * 0.153
    cam = _camera((n, n, nz), scatter, pixel=pixel)
    acq = cam.acquire_windows(act, mu, 1e7, np.random.default_rng(1))
    rec = cam.reconstruct(acq.photopeak, mu, acq.scatter_estimate)[:, :, 1]
    h, c = float(rec[hot <= 20].mean()), float(rec[cold <= 20].mean())
    return (h - c) / (h + c), c / h


def test_scatter_without_correction_loses_contrast_and_tew_recovers_it():
    """Scatter (0.35) reconstructed without correction fills the cold disk (a low-frequency haze:
    cold / hot at least 1.5x the scatter-free one) and lowers the hot-cold contrast; with the TEW
    estimate as OSEM's additive term most (>= 60 %) of the lost contrast comes back."""
    ref, ref_ratio = _hot_cold(Scatter(fraction=0.0))
    none, none_ratio = _hot_cold(Scatter(fraction=0.35, correction="none"))
    tew, tew_ratio = _hot_cold(Scatter(fraction=0.35, correction="tew"))
    assert none < ref - 0.03 and none_ratio > 1.5 * ref_ratio
    assert tew - none >= 0.6 * (ref - none) and tew <= ref + 0.02
    assert tew_ratio < none_ratio


def test_scatter_off_is_the_camera_without_scatter():
    """scatter_fraction 0 is the camera without scatter: the same projections, the same draws from
    the generator, the same reconstruction to the byte (cohorts made without scatter do not change);
    the patient's record then has no scatter entry."""
    n, nz = 32, 2
    act = np.zeros((n, n, nz), np.float32)
    act[8:20, 10:22] = 1.0
    mu = act * 0.15
    out = []
    for scatter in (None, Scatter(fraction=0.0, correction="tew")):
        cam = _camera((n, n, nz), scatter)
        rng = np.random.default_rng(7)
        acq = cam.acquire_windows(act, mu, 1e5, rng)
        assert acq.scatter is None and acq.scatter_estimate is None
        out.append((cam.reconstruct(acq.photopeak, mu, acq.scatter_estimate).tobytes(), rng.random()))
    assert out[0] == out[1]
    s = synth_settings()
    physics = copy.deepcopy(s["physics"])
    for inst in ("A", "B"):
        physics["spect"]["camera"][inst]["scatter_fraction"] = 0.0
    d = make_patient("NC-A-001", "noncancer", "A", dict(s["presets"]["tiny"], spect_model="projection"), physics, 0)
    assert "scatter" not in d.spect_info


def test_projection_patient_with_scatter_same_seed_same_bytes():
    """Scatter on, without correction: reproducible to the byte, and unlike the TEW-corrected one."""
    s = synth_settings()
    physics = copy.deepcopy(s["physics"])
    preset = dict(s["presets"]["tiny"], spect_model="projection")
    physics["spect"]["camera"]["A"]["scatter_correction"] = "none"
    a, b = (make_patient("NC-A-002", "noncancer", "A", preset, physics, 1) for _ in range(2))
    assert a.spect.tobytes() == b.spect.tobytes() and a.spect_info["scatter"]["correction"] == "none"
    tew = make_patient("NC-A-002", "noncancer", "A", preset, s["physics"], 1)
    assert tew.spect.tobytes() != a.spect.tobytes()


@pytest.mark.parametrize("where, key, value", [
    ("camera", "scatter_fraction", -0.1), ("camera", "scatter_fraction", "lots"), ("camera", "scatter_correction", "dew"),
    ("scatter", "kernel", "lorentzian"), ("scatter", "fwhm_mm", 0.0),
])
def test_bad_scatter_settings_are_one_line_errors(where, key, value):
    """Checked for either SPECT model (the image model of ``tiny`` too): CtpmError, one line."""
    s = synth_settings()
    physics = copy.deepcopy(s["physics"])
    target = physics["spect"]["camera"]["A"] if where == "camera" else physics["spect"]["scatter"]
    target[key] = value
    with pytest.raises(CtpmError) as e:
        make_patient("NC-A-001", "noncancer", "A", s["presets"]["tiny"], physics, 0)
    assert "\n" not in str(e.value) and key.split("_")[0] in str(e.value)


def test_ct_realism_sees_a_fissure_as_one_sheet_and_a_tube_as_none():
    """A 1 mm fissure of +150 HU across a noisy lung block is one sheet of about its area x its
    thickness; the same block with a vessel instead, or with noise alone, has no sheet of 1 mL."""
    from ctpm.synth.realism import sheet_numbers

    rng = np.random.default_rng(0)
    shape = (60, 60, 60)  # 1 mm voxels
    lungs = np.ones(shape, bool)
    noise = np.full(shape, -850.0, np.float32) + 25 * rng.standard_normal(shape).astype(np.float32)
    fissure = noise.copy()
    X, Y, Z = np.meshgrid(*(np.arange(60.0),) * 3, indexing="ij")
    fissure[np.abs(Z - 0.5 * X - 15) < 0.6] += 150.0  # an oblique plane, about one voxel thick
    vessel = noise.copy()
    vessel[(X - 30) ** 2 + (Y - 30) ** 2 <= 3.0**2] = 40.0
    f = sheet_numbers(fissure, (1.0, 1.0, 1.0), lungs)
    assert f["sheet_count"] == 1 and f["sheet_largest_ml"] > 2.0 and f["sheet_share"] > 0.01
    for other in (noise, vessel):
        r = sheet_numbers(other, (1.0, 1.0, 1.0), lungs)
        assert r["sheet_count"] == 0 and r["sheet_share"] == 0.0 and r["sheet_largest_ml"] < 1.0


def test_the_realism_table_command(capsys):
    """``python -m ctpm.synth.realism`` prints one markdown row per CT with every column."""
    from ctpm.synth.realism import COLUMNS, main

    assert main(["--preset", "tiny", "--patients", "NC-A-001", "LC-B-001", "--no-sheets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| synthetic `tiny` NC-A-001 |")
    assert lines[0].count("|") == len(COLUMNS) - 3 + 2  # no sheet columns without sheets
