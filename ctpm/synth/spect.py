"""The SPECT: what the camera records of the truth perfusion, on the institution's own grid.

Both models see the same activity: the truth perfusion plus MAA clumps (hot spots: aggregates
larger than the capillaries, lodged where the flow carries them), blurred cranio-caudally by free
breathing (the bases move, the apices hardly), displaced by a rigid SPECT/CT misregistration of a
few mm (recorded: ``ct_to_spect`` maps a point of the CT's world to where the same anatomy lies in
the SPECT's world, so registration can be tested).

``projection`` (``physics.spect.model``; ``pytomography``): the activity and the attenuation map
(the CT, moved with the patient, HU -> mu at 140 keV by a bilinear water/bone model) on the
camera's own grid; projections through ``SPECTSystemMatrix`` with ``SPECTAttenuationTransform`` and
``SPECTPSFTransform`` (a parallel-hole collimator whose blur grows with the distance from its face,
plus the crystal's intrinsic resolution) at the camera's number of views and radius; Poisson counts
scaled to the institution's total; OSEM (iterations / subsets of the camera) with attenuation
correction from the CT as it was acquired (not moved: misregistration artefacts are real); a
Gaussian post-filter; the reconstruction resampled onto the institution's grid. Compton scatter in
the photopeak window (``physics.spect.scatter``, see ``Scatter``): the primary projections spread by
a broad kernel in the detector plane, ``scatter_fraction`` of the primary counts (per camera), in
the Poisson counts; the camera's ``scatter_correction`` is a triple-energy-window estimate given to
OSEM as its additive term (``tew``) or nothing (``none``: a low-frequency haze, lost contrast). The
recorded PSF FWHM is derived from the collimator model at the lungs' mean depth
(the orbit's radius), the post-filter and the camera pixel (see ``effective_fwhm``); tests
measure it on line sources.

``image`` (fast; the ``tiny`` preset): the activity blurred by a stationary Gaussian PSF, sampled
on the institution's grid, Poisson counts, light smoothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from ctpm.errors import CtpmError
from ctpm.geometry import Grid, resample, sample_at
from ctpm.synth.anatomy import Phantom
from ctpm.synth.fields import stored, uniform

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
MODELS = ("projection", "image")
SCATTER_KERNELS = ("exponential", "gaussian")
SCATTER_CORRECTIONS = ("tew", "none")


@dataclass
class SpectData:
    array: np.ndarray               # stored array (the institution's orientation)
    affine: np.ndarray              # its affine in the phantom frame
    fwhm_mm: float                  # effective PSF FWHM of the reconstruction (mm)
    model: str
    ct_to_spect: np.ndarray         # 4x4, phantom frame: CT world point -> SPECT world point
    misregistration: dict = field(default_factory=dict)   # translation_mm, rotation_deg, centre_mm
    clumps: int = 0                 # MAA clumps drawn
    breathing_mm: float = 0.0       # cranio-caudal excursion of the lung bases
    scatter: Scatter | None = None  # the photopeak window's scatter and its correction (projection model)


# ---- activity: what the camera sees ----

def rigid(translation_mm, rotation_deg, centre) -> np.ndarray:
    """4x4: rotate by rotation_deg (about x, then y, then z) around ``centre``, then translate."""
    ax, ay, az = np.deg2rad(np.asarray(rotation_deg, float))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    r = rz @ ry @ rx
    c = np.asarray(centre, float)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(translation_mm, float)
    return m


def draw_misregistration(rng: np.random.Generator, cfg: dict, centre: np.ndarray) -> tuple[np.ndarray, dict]:
    """A random rigid SPECT/CT misregistration: uniform translation (+-translation_mm per axis) and
    rotation (+-rotation_deg per axis) about the lungs' centre."""
    t = rng.uniform(-1, 1, 3) * float(cfg["translation_mm"])
    a = rng.uniform(-1, 1, 3) * float(cfg["rotation_deg"])
    return rigid(t, a, centre), {"translation_mm": t.round(4).tolist(), "rotation_deg": a.round(4).tolist(),
                                 "centre_mm": np.asarray(centre, float).round(4).tolist()}


def add_clumps(rng: np.random.Generator, activity: np.ndarray, grid: Grid, cfg: dict) -> tuple[np.ndarray, int]:
    """MAA clumps: a Poisson number of hot spots, each at a lung voxel drawn in proportion to its
    perfusion, holding a drawn share of the lungs' total activity, a Gaussian of ``fwhm_mm``."""
    n = int(rng.poisson(float(cfg["rate"])))
    if n == 0 or activity.sum() <= 0:
        return activity, 0
    flat = activity.ravel().astype(np.float64)
    idx = rng.choice(flat.size, size=n, p=flat / flat.sum())
    spots = np.zeros(activity.shape, np.float32)
    total = float(activity.sum())
    for i in idx:
        spots.flat[i] += total * uniform(rng, cfg["fraction"])
    sigma = float(cfg["fwhm_mm"]) / FWHM_PER_SIGMA / np.asarray(grid.spacing)
    return activity + ndi.gaussian_filter(spots, sigma, mode="constant"), n


def breathing_blur(activity: np.ndarray, grid: Grid, ph: Phantom, amplitude_mm: float, steps: int = 9) -> np.ndarray:
    """Free breathing against a breath-hold CT: each axial level moves cranio-caudally by up to
    ``amplitude_mm`` x w(z), w growing from 0 at the apex to 1 at the diaphragm (squared), and the
    camera averages the positions over the cycle (uniform over [-1/2, 1/2] of the excursion)."""
    if amplitude_mm <= 0:
        return activity
    z = grid.axes()[2]
    w = np.clip((ph.z_apex - z) / ph.height, 0, 1) ** 2
    n = activity.shape[2]
    dz = float(grid.affine[2, 2])
    out = np.zeros_like(activity, dtype=np.float32)
    for t in (np.arange(steps) + 0.5) / steps - 0.5:
        u = np.clip((z - t * amplitude_mm * w - grid.affine[2, 3]) / dz, 0, n - 1)
        i0 = np.minimum(np.floor(u).astype(int), n - 2)
        f = (u - i0).astype(np.float32)
        out += np.take(activity, i0, axis=2) * (1 - f) + np.take(activity, i0 + 1, axis=2) * f
    return out / steps


def hu_to_mu(hu: np.ndarray, cfg: dict) -> np.ndarray:
    """Linear attenuation (1/cm) at the photon energy: bilinear in HU, air (-1000) -> 0, water (0) ->
    mu_water; above water the slope of bone (mu_bone at bone_hu)."""
    mw, mb, hb = float(cfg["mu_water_per_cm"]), float(cfg["mu_bone_per_cm"]), float(cfg["bone_hu"])
    hu = np.asarray(hu, np.float32)
    mu = np.where(hu <= 0, mw * (1 + hu / 1000.0), mw + hu * (mb - mw) / hb)
    return np.clip(mu, 0, None).astype(np.float32)


# ---- Compton scatter in the photopeak window ----

@dataclass(frozen=True)
class Scatter:
    """Scatter in the photopeak window, modelled in projection space, and its correction.

    The scatter component of every view is the primary (attenuated, collimated) projection
    convolved with a broad radially symmetric 2-D kernel in the detector plane, scaled so that the
    scatter counts are ``fraction`` (the scatter-to-primary ratio; Tc-99m in a 20 % window in the
    chest ~0.3-0.5) of the primary counts. The default kernel is mono-exponential, exp(-r / l): the
    shape of the scatter line-spread functions of Tc-99m in water (cusp at the source, long tails;
    the convolution-subtraction kernels of Axelsson et al., J Nucl Med 1984; Msaki et al., Phys
    Med Biol 1987), ``fwhm_mm`` = 2 l ln 2. 40 mm (l ~ 29 mm, mean displacement ~6 cm): photons
    accepted by a 20 % window scatter by less than ~55 degrees, a few cm above the collimator face
    for a lung at 5-15 cm depth. ``gaussian`` is the smooth alternative of the same FWHM. The model
    is stationary: it ignores that scatter depends on the depth and the density along the path
    (lung scatters little, the mediastinum and the chest wall much).

    ``correction``: ``tew`` (Ogawa et al., IEEE Trans Med Imaging 1991) estimates the scatter from
    two narrow windows beside the photopeak: here the lower one, ``lower_kev`` wide, records the
    scatter term at the density that makes the trapezoid estimate unbiased (the upper window of
    Tc-99m is empty: nothing is emitted above 140 keV, so the trapezoid is a triangle,
    S = C_lower / w_lower x w_peak / 2), with its own Poisson noise at those few counts, then
    smoothed (``smoothing_fwhm_mm`` in r and z; pytomography's ``compute_EW_scatter``) and given to
    OSEM as the additive term. ``none``: OSEM without one.
    """

    fraction: float = 0.0
    kernel: str = "exponential"
    fwhm_mm: float = 40.0
    correction: str = "tew"
    peak_kev: float = 28.0
    lower_kev: float = 4.2
    smoothing_fwhm_mm: float = 20.0

    @classmethod
    def from_config(cls, sp: dict, cam: dict) -> Scatter:
        """The camera's ``scatter_fraction`` and ``scatter_correction`` with ``physics.spect.scatter``
        (kernel, fwhm_mm, tew); bad values raise CtpmError."""
        cfg = dict(sp.get("scatter") or {})
        tew = dict(cfg.get("tew") or {})
        try:
            s = cls(fraction=float(cam.get("scatter_fraction", 0.0)), kernel=str(cfg.get("kernel", cls.kernel)),
                    fwhm_mm=float(cfg.get("fwhm_mm", cls.fwhm_mm)),
                    correction=str(cam.get("scatter_correction", cls.correction)),
                    peak_kev=float(tew.get("peak_kev", cls.peak_kev)), lower_kev=float(tew.get("lower_kev", cls.lower_kev)),
                    smoothing_fwhm_mm=float(tew.get("smoothing_fwhm_mm", cls.smoothing_fwhm_mm)))
        except (TypeError, ValueError) as e:
            raise CtpmError(f"physics.spect scatter settings must be numbers: {e}") from e
        s.validate()
        return s

    def validate(self) -> None:
        if not (0.0 <= self.fraction <= 3.0) or not math.isfinite(self.fraction):
            raise CtpmError(f"scatter_fraction (scatter-to-primary ratio) must be in [0, 3], not {self.fraction}")
        if self.kernel not in SCATTER_KERNELS:
            raise CtpmError(f"physics.spect.scatter.kernel must be one of {', '.join(SCATTER_KERNELS)}, not {self.kernel!r}")
        if self.correction not in SCATTER_CORRECTIONS:
            raise CtpmError(f"scatter_correction must be one of {', '.join(SCATTER_CORRECTIONS)}, not {self.correction!r}")
        if not self.fwhm_mm > 0:
            raise CtpmError(f"physics.spect.scatter.fwhm_mm must be > 0, not {self.fwhm_mm}")
        if not (self.peak_kev > 0 and self.lower_kev > 0 and self.smoothing_fwhm_mm >= 0):
            raise CtpmError("physics.spect.scatter.tew: peak_kev and lower_kev must be > 0, smoothing_fwhm_mm >= 0")

    @property
    def on(self) -> bool:
        return self.fraction > 0

    def kernel_2d(self, pixel_mm: float, max_half: int | None = None) -> np.ndarray:
        """The kernel on the detector's pixels (each the mean over 5 x 5 points of the pixel), sum 1;
        out to where it falls below 1e-3 of its peak (exponential: 6.9 l; Gaussian: 3.7 sigma), at
        most ``max_half`` pixels from the centre."""
        if self.kernel == "exponential":
            scale = self.fwhm_mm / (2.0 * math.log(2.0))
            reach = scale * math.log(1e3)
        else:
            scale = self.fwhm_mm / FWHM_PER_SIGMA
            reach = scale * math.sqrt(2.0 * math.log(1e3))
        half = max(1, math.ceil(reach / pixel_mm))
        if max_half is not None:
            half = max(1, min(half, int(max_half)))
        sub = (np.arange(5) - 2) / 5.0
        u = ((np.arange(-half, half + 1)[:, None] + sub[None, :]) * pixel_mm).ravel()
        r = np.hypot(u[:, None], u[None, :])
        k = np.exp(-r / scale) if self.kernel == "exponential" else np.exp(-0.5 * (r / scale) ** 2)
        n = 2 * half + 1
        k = k.reshape(n, 5, n, 5).mean(axis=(1, 3))
        return (k / k.sum()).astype(np.float64)

    def spread(self, primary: np.ndarray, pixel_mm: float) -> np.ndarray:
        """The scatter term of projections ``primary`` (views, r, z): each view convolved with the
        kernel in (r, z) (scatter beyond the detector's edge is lost), scaled to ``fraction`` of the
        primary counts."""
        from scipy.signal import fftconvolve

        k = self.kernel_2d(pixel_mm, max_half=max(primary.shape[1:]))
        scatter = np.clip(fftconvolve(primary, k[None], mode="same", axes=(1, 2)), 0.0, None)
        total = float(scatter.sum())
        return scatter * (self.fraction * float(primary.sum()) / total) if total > 0 else scatter

    def lower_window(self, scatter: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Poisson counts of the lower TEW window given the photopeak's scatter term: the scatter
        spectrum falls linearly to zero across the photopeak (the triangle TEW assumes), so the
        window's expected counts are scatter x 2 w_lower / w_peak."""
        return rng.poisson(scatter * (2.0 * self.lower_kev / self.peak_kev)).astype(np.float32)


@dataclass
class Acquisition:
    """One acquisition: the photopeak window's Poisson counts and what made them (views, r, z)."""

    photopeak: np.ndarray                       # Poisson(primary + scatter), what the camera records
    primary: np.ndarray                         # expected primary counts
    scatter: np.ndarray | None = None           # expected scatter counts in the photopeak window
    scatter_estimate: np.ndarray | None = None  # the additive term OSEM is given (TEW), if any


# ---- the camera ----

def collimator_sigma_params(cam: dict) -> tuple[float, float, float]:
    """(a, b, c) in mm of the Gaussian PSF sigma(d) = sqrt((a d + b)^2 + c^2) at distance d from the
    collimator face: a parallel-hole collimator of hole diameter D and length L (effective length
    L - 2 / mu_septa, as pytomography's collimator model) gives FWHM = D (L_eff + d) / L_eff; c is
    the intrinsic resolution."""
    d_hole, length = float(cam["hole_diameter_mm"]), float(cam["hole_length_mm"])
    l_eff = length - 2.0 / float(cam["septa_mu_per_mm"])
    return d_hole / l_eff / FWHM_PER_SIGMA, d_hole / FWHM_PER_SIGMA, float(cam["intrinsic_fwhm_mm"]) / FWHM_PER_SIGMA


def collimator_fwhm(cam: dict, distance_mm) -> np.ndarray:
    a, b, c = collimator_sigma_params(cam)
    d = np.asarray(distance_mm, float)
    return FWHM_PER_SIGMA * np.sqrt((a * d + b) ** 2 + c * c)


def effective_fwhm(cam: dict, radius_mm: float, pixel_mm: float) -> float:
    """Effective FWHM (mm) of the reconstruction at the lungs' mean depth: over a circular orbit of
    ``radius_mm`` (axis of rotation to collimator face) every point's mean distance from the
    collimator is the radius, so the collimator's FWHM there (geometric and intrinsic), the
    post-filter and the pixel (sampling of the object and the projections and the interpolation of
    the rotations: pixel / 2) in quadrature. Measured on line sources (tests): on the axis within
    a few %; off the axis OSEM resolves a little better (radial and tangential mean ~10 % finer at
    80 mm), so this is the lungs' resolution to within ~10 %, erring broad."""
    fwhm2 = float(collimator_fwhm(cam, radius_mm)) ** 2 + float(cam["post_filter_fwhm_mm"]) ** 2 + (0.5 * float(pixel_mm)) ** 2
    return float(math.sqrt(fwhm2))


def camera_grid(centre_xy, z_lo: float, z_hi: float, matrix: int, pixel: float) -> Grid:
    """The camera's isotropic object grid: ``matrix`` x ``matrix`` around the axis of rotation
    (``centre_xy``), axially over [z_lo, z_hi]."""
    nz = math.ceil((z_hi - z_lo) / pixel) + 1
    origin = (centre_xy[0] - (matrix - 1) * pixel / 2, centre_xy[1] - (matrix - 1) * pixel / 2, z_lo)
    return Grid.axis_aligned((matrix, matrix, nz), (pixel,) * 3, origin)


class Camera:
    """An institution's camera and its reconstruction, on an isotropic object grid of ``pixel_mm``
    ([x, y, z], z the axis of rotation, the grid's centre on it): pytomography's rotate-and-sum
    SPECT system matrices on the CPU, one thread (deterministic). ``scatter``: Compton scatter in the
    photopeak window and its correction (none if None or its fraction is 0)."""

    def __init__(self, shape, pixel_mm: float, cam: dict, radius_mm: float, scatter: Scatter | None = None):
        from pytomography.metadata.SPECT import (
            SPECTObjectMeta,
            SPECTProjMeta,
            SPECTPSFMeta,
        )

        self.shape, self.pixel_mm, self.cam, self.radius_mm = tuple(int(v) for v in shape), float(pixel_mm), cam, float(radius_mm)
        self.scatter = scatter if scatter is not None and scatter.on else None
        dr_cm = [self.pixel_mm / 10.0] * 3
        n_views = int(cam["projections"])
        angles = np.linspace(0.0, 360.0, n_views, endpoint=False)
        self.object_meta = SPECTObjectMeta(dr_cm, list(self.shape))
        self.proj_meta = SPECTProjMeta((self.shape[1], self.shape[2]), dr_cm[1:], angles,
                                       radii=np.full(n_views, self.radius_mm / 10.0))
        a, b, c = collimator_sigma_params(cam)
        self.psf_meta = SPECTPSFMeta(sigma_fit_params=[a, b / 10.0, c / 10.0],  # slope, cm, cm
                                     sigma_fit=lambda r, a, b, c: np.sqrt((a * r + b) ** 2 + c**2))

    def _run(self, fn):
        import pytomography
        import torch

        threads, device = torch.get_num_threads(), pytomography.device
        torch.set_num_threads(1)
        pytomography.device = torch.device("cpu")
        try:
            with torch.no_grad():
                return fn(torch)
        finally:
            torch.set_num_threads(threads)
            pytomography.device = device

    def acquire(self, activity: np.ndarray, mu_true: np.ndarray, counts: float, rng: np.random.Generator) -> np.ndarray:
        """Projections (views, r, z) of ``activity`` through the attenuating body ``mu_true`` (1/cm)
        and the collimator: Poisson counts whose expected total is ``counts`` (primary + scatter)."""
        return self.acquire_windows(activity, mu_true, counts, rng).photopeak

    def acquire_windows(self, activity: np.ndarray, mu_true: np.ndarray, counts: float,
                        rng: np.random.Generator) -> Acquisition:
        """The photopeak window's Poisson counts (expected total ``counts``: primary + scatter), its
        expected primary and scatter terms and, with TEW correction, the scatter estimate from the
        lower window's own counts."""
        from pytomography.projectors.SPECT import SPECTSystemMatrix
        from pytomography.transforms.SPECT import (
            SPECTAttenuationTransform,
            SPECTPSFTransform,
        )

        def fn(torch):
            system = SPECTSystemMatrix(
                obj2obj_transforms=[SPECTAttenuationTransform(torch.from_numpy(np.ascontiguousarray(mu_true, np.float32))),
                                    SPECTPSFTransform(self.psf_meta)],
                proj2proj_transforms=[], object_meta=self.object_meta, proj_meta=self.proj_meta)
            return system.forward(torch.from_numpy(np.ascontiguousarray(activity, np.float32))).numpy()

        primary = self._run(fn).astype(np.float64)
        sc = self.scatter
        if sc is None:  # (exactly the arithmetic and the draws of the camera without scatter)
            primary *= counts / max(float(primary.sum()), 1e-12)
            return Acquisition(photopeak=rng.poisson(primary).astype(np.float32), primary=primary)
        primary *= counts / (1.0 + sc.fraction) / max(float(primary.sum()), 1e-12)
        scatter = sc.spread(primary, self.pixel_mm)
        photopeak = rng.poisson(primary + scatter).astype(np.float32)
        estimate = self.tew_estimate(sc.lower_window(scatter, rng)) if sc.correction == "tew" else None
        return Acquisition(photopeak=photopeak, primary=primary, scatter=scatter, scatter_estimate=estimate)

    def tew_estimate(self, lower: np.ndarray) -> np.ndarray:
        """The TEW scatter estimate of the photopeak window from the lower window's counts (upper
        window empty), smoothed in r and z: pytomography's ``compute_EW_scatter``."""
        from pytomography.utils.scatter import compute_EW_scatter

        sc = self.scatter
        sigma_cm = sc.smoothing_fwhm_mm / FWHM_PER_SIGMA / 10.0

        def fn(torch):
            return compute_EW_scatter(torch.from_numpy(np.ascontiguousarray(lower, np.float32)), None,
                                      sc.lower_kev, None, sc.peak_kev, proj_meta=self.proj_meta,
                                      sigma_r=sigma_cm, sigma_z=sigma_cm).numpy()

        return np.clip(self._run(fn), 0.0, None).astype(np.float32)

    def reconstruct(self, projections: np.ndarray, mu_ac: np.ndarray | None,
                    additive: np.ndarray | None = None) -> np.ndarray:
        """OSEM (the camera's iterations and subsets) with attenuation correction from ``mu_ac`` (none
        if None) and the additive term ``additive`` (a scatter estimate, projections' shape; none if
        None) in its likelihood, then the Gaussian post-filter."""
        from pytomography.algorithms import OSEM
        from pytomography.likelihoods import PoissonLogLikelihood
        from pytomography.projectors.SPECT import SPECTSystemMatrix
        from pytomography.transforms.SPECT import SPECTAttenuationTransform

        def fn(torch):
            transforms = [] if mu_ac is None else [
                SPECTAttenuationTransform(torch.from_numpy(np.ascontiguousarray(mu_ac, np.float32)))]
            system = SPECTSystemMatrix(obj2obj_transforms=transforms, proj2proj_transforms=[],
                                       object_meta=self.object_meta, proj_meta=self.proj_meta)
            extra = None if additive is None else torch.from_numpy(np.ascontiguousarray(additive, np.float32))
            osem = OSEM(PoissonLogLikelihood(system, torch.from_numpy(projections), additive_term=extra))
            return osem(n_iters=int(self.cam["iterations"]), n_subsets=int(self.cam["subsets"])).numpy()

        recon = self._run(fn).astype(np.float32)
        sigma = float(self.cam["post_filter_fwhm_mm"]) / FWHM_PER_SIGMA / self.pixel_mm
        return ndi.gaussian_filter(recon, sigma, mode="constant") if sigma > 0 else recon

    def effective_fwhm(self) -> float:
        return effective_fwhm(self.cam, self.radius_mm, self.pixel_mm)


def spect_grid(ph: Phantom, preset: dict, sp: dict, institution: str, rng: np.random.Generator) -> Grid:
    """The institution's reconstruction grid, centred near the lungs (origin drawn +-shift)."""
    shape = tuple(int(v) for v in preset["spect_matrix"][institution])
    vox = tuple(float(v) for v in preset["spect_voxel"][institution])
    lo, hi = ph.lung_box()
    centre = (lo + hi) / 2 + rng.uniform(-1, 1, 3) * float(sp["shift"])
    origin = centre - (np.asarray(shape) - 1) * np.asarray(vox) / 2
    return Grid.axis_aligned(shape, vox, origin)


def simulate_spect(perf: np.ndarray, wgrid: Grid, ph: Phantom, ct: np.ndarray | None, cgrid: Grid | None,
                   preset: dict, physics: dict, institution: str, rng: np.random.Generator) -> SpectData:
    """The SPECT of the truth ``perf`` (on ``wgrid``) as the institution's camera records it; ``ct``
    (HU on ``cgrid``, canonical orientation) gives the attenuation (projection model)."""
    sp = physics["spect"]
    model = str(preset.get("spect_model", sp["model"]))
    if model not in MODELS:
        raise ValueError(f"spect model must be one of {MODELS}, not {model!r}")
    scatter = Scatter.from_config(sp, sp["camera"][institution])  # (checked whatever the model)
    sgrid = spect_grid(ph, preset, sp, institution, rng)
    lo, hi = ph.lung_box()
    ct_to_spect, misreg = draw_misregistration(rng, sp["misregistration"], (lo + hi) / 2)
    spect_to_ct = np.linalg.inv(ct_to_spect)
    activity, n_clumps = add_clumps(rng, perf, wgrid, sp["clumps"])
    amplitude = uniform(rng, sp["breathing_mm"])
    activity = breathing_blur(activity, wgrid, ph, amplitude)
    total = uniform(rng, sp["counts"][institution])

    def moved(grid: Grid) -> np.ndarray:
        """World points (N, 3) in the CT frame of the anatomy the SPECT sees at ``grid``'s voxels."""
        X, Y, Z = np.broadcast_arrays(*grid.mesh())
        pts = np.stack([X.ravel(), Y.ravel(), Z.ravel()], 1)
        return pts @ spect_to_ct[:3, :3].T + spect_to_ct[:3, 3]

    if model == "image":
        fwhm = uniform(rng, sp["fwhm"])
        blurred = ndi.gaussian_filter(activity, sigma=fwhm / FWHM_PER_SIGMA / np.asarray(wgrid.spacing), mode="constant")
        expected = sample_at(blurred, wgrid, moved(sgrid), order=1, fill=0.0, edge="centre").reshape(sgrid.shape)
        expected *= total / max(float(expected.sum()), 1e-6)
        counts = rng.poisson(expected).astype(np.float32)
        spect = ndi.gaussian_filter(counts, float(sp["post_filter_voxels"]))
        scatter = None  # (image space: no scatter)
    else:
        if ct is None or cgrid is None:
            raise ValueError("the projection model needs the CT (attenuation)")
        try:
            import pytomography  # noqa: F401
        except ImportError as e:
            raise CtpmError("the projection SPECT model needs pytomography (pip install pytomography), "
                            "or choose physics.spect.model=image") from e
        cam = dict(sp["camera"][institution])
        pixel = float(preset["camera_pixel"][institution])
        matrix = int(preset["camera_matrix"][institution])
        radius = uniform(rng, cam["radius_mm"])
        centre_xy = sgrid.bounds()[0][:2] / 2 + sgrid.bounds()[1][:2] / 2  # axis of rotation: the SPECT grid's centre
        margin = float(sp["axial_margin_mm"])
        cam_grid = camera_grid(centre_xy, lo[2] - margin, hi[2] + margin, matrix, pixel)
        # the activity averaged over a camera pixel (box of width pixel: sigma pixel / sqrt(12)), then sampled
        extra = max(pixel**2 - float(wgrid.spacing[0]) ** 2, 0.0) / 12.0
        smooth = ndi.gaussian_filter(activity, math.sqrt(extra) / np.asarray(wgrid.spacing), mode="constant")
        pts = moved(cam_grid)
        act_cam = sample_at(smooth, wgrid, pts, order=1, fill=0.0, edge="centre").reshape(cam_grid.shape)
        mu = physics["spect"]["attenuation"]
        ct32 = ct.astype(np.float32)
        mu_true = hu_to_mu(sample_at(ct32, cgrid, pts, order=1, fill=-1000.0, edge="centre").reshape(cam_grid.shape), mu)
        X, Y, Z = np.broadcast_arrays(*cam_grid.mesh())
        still = np.stack([X.ravel(), Y.ravel(), Z.ravel()], 1)
        mu_ac = hu_to_mu(sample_at(ct32, cgrid, still, order=1, fill=-1000.0, edge="centre").reshape(cam_grid.shape), mu)
        camera = Camera(cam_grid.shape, pixel, cam, radius, scatter)
        acq = camera.acquire_windows(act_cam, mu_true, total, rng)
        recon = camera.reconstruct(acq.photopeak, mu_ac, acq.scatter_estimate)
        spect = resample(recon, cam_grid, sgrid, order=1)
        fwhm = camera.effective_fwhm()
    flips = (False, False, False) if institution == "A" else (True, True, False)
    array, affine = stored(np.asarray(spect, np.float32), sgrid, flips)
    return SpectData(array=array.astype(np.float32), affine=affine, fwhm_mm=float(fwhm), model=model,
                     ct_to_spect=ct_to_spect, misregistration=misreg, clumps=n_clumps, breathing_mm=amplitude,
                     scatter=scatter if scatter is not None and scatter.on else None)
