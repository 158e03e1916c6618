"""Baselines a CT-based perfusion map has to beat, fitted by least squares on standardised SPECT.

- :class:`GeometryPrior`: no CT intensity at all. The lung mask blurred to the SPECT's resolution
  (a Gaussian of the SPECT's FWHM) times a linear gradient along the vertical (anterior ->
  posterior, i.e. towards the dependent lung of a supine patient) and the cranio-caudal axis:
  ``pred = b (c0 + c1 dep + c2 cc)`` with b the blurred mask. It needs the lungs only, so it runs
  on real cohorts too; what a CNN adds over it is what it learned from the CT's content.
- :class:`DensityBaseline`: CT density and vertical position (a quadratic in HU and dependent
  position). With ``smooth=True`` (the report's "fair" density baseline) the HU are first
  smoothed to the SPECT's resolution by normalised convolution inside the lungs, since a
  correlation against a blurred SPECT punishes a map at CT resolution for its sharpness alone.

Both accumulate the normal equations (X'X, X'y) per patient, so that one patient can be left out
of its own fit exactly (leave-one-out at no extra cost). Features are computed from the grid
arrays (``affine, ct, mask, lungs`` and ``patient`` for the per-patient SPECT FWHM) of a
:class:`ctpm.evaluation.evaluate.GridVolumes` or any object with those attributes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctpm.errors import CtpmError
from ctpm.evaluation.regions import (
    DEFAULT_SPECT_FWHM_MM,
    gaussian_mm,
    grid_spacing,
    normalised_convolution,
    patient_fwhm_mm,
)


def lung_position(gv: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per evaluation-mask voxel: dependent position ``dep`` (0 at the lungs' most anterior
    voxel, 1 at the most posterior) and cranio-caudal position ``cc`` (0 most inferior, 1 most
    superior), from world (RAS) coordinates of the voxel centres, over the lungs' extent."""
    m = np.asarray(gv.mask, bool)
    lungs = np.asarray(gv.lungs) > 0
    ref = lungs if lungs.any() else m
    aff = np.asarray(gv.affine, dtype=float)

    def world(sel: np.ndarray, axis: int) -> np.ndarray:
        idx = np.stack(np.nonzero(sel)).astype(np.float64)
        return aff[axis, :3] @ idx + aff[axis, 3]

    out = []
    for axis, sign in ((1, -1.0), (2, 1.0)):  # y: anterior is larger -> dep grows posteriorly; z: superior
        extent = world(ref, axis)
        lo, hi = float(extent.min()), float(extent.max())
        v = world(m, axis)
        frac = (v - lo) / max(hi - lo, 1e-6)
        out.append(1.0 - frac if sign < 0 else frac)
    return out[0], out[1]


def density_features(gv: Any, fwhm_mm: float | None = None) -> np.ndarray:
    """Per mask voxel: 1, HU, HU^2, dependent position, its square, HU x position (posterior = 1),
    HU scaled as (HU + 850) / 100. With ``fwhm_mm`` the HU are smoothed to that resolution inside
    the lungs first (:func:`ctpm.evaluation.regions.normalised_convolution`)."""
    m = np.asarray(gv.mask, bool)
    ct = np.asarray(gv.ct, dtype=np.float64)
    if fwhm_mm is not None:
        support = (np.asarray(gv.lungs) > 0) | m
        ct = normalised_convolution(ct, support, fwhm_mm, grid_spacing(gv.affine))
    hu = (ct[m] + 850.0) / 100.0
    dep, _ = lung_position(gv)
    return np.stack([np.ones_like(hu), hu, hu * hu, dep, dep * dep, hu * dep], 1).astype(np.float64)


def geometry_features(gv: Any, fwhm_mm: float) -> np.ndarray:
    """Per mask voxel: b, b dep, b cc with b the lung mask (lungs > 0) blurred by a Gaussian of
    FWHM fwhm_mm, dep and cc the positions of :func:`lung_position`. No CT intensity."""
    m = np.asarray(gv.mask, bool)
    blurred = gaussian_mm(np.asarray(gv.lungs) > 0, fwhm_mm, grid_spacing(gv.affine))[m]
    dep, cc = lung_position(gv)
    return np.stack([blurred, blurred * dep, blurred * cc], 1).astype(np.float64)


class LeastSquaresBaseline:
    """Least squares of standardised SPECT on per-voxel features, accumulated per patient.
    Subclasses define :meth:`features`. At most ``max_voxels`` voxels of a patient (a seeded
    random subset) enter the fit, so that large patients do not dominate it."""

    #: what the baseline is, for the report
    description = "least squares"

    def __init__(self, max_voxels: int = 50_000, seed: int = 0):
        self.stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.max_voxels, self.rng = max_voxels, np.random.default_rng(seed)

    def features(self, gv: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def add(self, gv: Any) -> None:
        X = self.features(gv)
        y = np.asarray(gv.spect, dtype=np.float64)[np.asarray(gv.mask, bool)]
        if len(y) > self.max_voxels:
            idx = self.rng.choice(len(y), self.max_voxels, replace=False)
            X, y = X[idx], y[idx]
        self.stats[gv.patient.patient_id] = (X.T @ X, X.T @ y)

    def coefficients(self, leave_out: str | None = None) -> np.ndarray:
        keys = [k for k in self.stats if k != leave_out]
        if not keys:
            raise CtpmError(f"the {self.description} has no patient to be fitted on")
        A = sum(self.stats[k][0] for k in keys)
        b = sum(self.stats[k][1] for k in keys)
        return np.linalg.lstsq(A, b, rcond=None)[0]

    def predict(self, gv: Any, leave_out: str | None = None) -> np.ndarray:
        out = np.zeros(np.asarray(gv.mask).shape, np.float32)
        out[np.asarray(gv.mask, bool)] = np.clip(self.features(gv) @ self.coefficients(leave_out), 0, 1)
        return out


class DensityBaseline(LeastSquaresBaseline):
    """What CT density and vertical position alone predict (:func:`density_features`); with
    ``smooth=True`` on HU smoothed to each patient's SPECT FWHM (``spect_fwhm_mm`` of the
    manifest, else ``default_fwhm_mm``)."""

    description = "density baseline"

    def __init__(self, max_voxels: int = 50_000, seed: int = 0, *, smooth: bool = False,
                 default_fwhm_mm: float = DEFAULT_SPECT_FWHM_MM):
        super().__init__(max_voxels, seed)
        self.smooth, self.default_fwhm_mm = smooth, float(default_fwhm_mm)

    def features(self, gv: Any) -> np.ndarray:
        fwhm = patient_fwhm_mm(gv.patient, self.default_fwhm_mm) if self.smooth else None
        return density_features(gv, fwhm)


class GeometryPrior(LeastSquaresBaseline):
    """Perfusion from the lungs' geometry alone (:func:`geometry_features`): the lung mask blurred
    by each patient's SPECT FWHM times a vertical and a cranio-caudal linear gradient."""

    description = "geometry prior"

    def __init__(self, max_voxels: int = 50_000, seed: int = 0, *, default_fwhm_mm: float = DEFAULT_SPECT_FWHM_MM):
        super().__init__(max_voxels, seed)
        self.default_fwhm_mm = float(default_fwhm_mm)

    def features(self, gv: Any) -> np.ndarray:
        return geometry_features(gv, patient_fwhm_mm(gv.patient, self.default_fwhm_mm))


def ceiling_maps(gv: Any, fwhm_mm: float, percentile: float = 75.0) -> dict[str, np.ndarray]:
    """The two ceilings of a synthetic patient (``gv.truth`` the true perfusion on the grid),
    standardised like the SPECT (divided by their ``percentile`` in the mask, clipped to 1):

    - "truth": the true perfusion itself (how far the SPECT is from physiology);
    - "truth_psf": the truth blurred by the patient's SPECT PSF (a Gaussian of FWHM fwhm_mm), the
      best any map can do against the SPECT (what is attainable).
    """
    from ctpm.data.transforms import standardise_spect

    truth = np.asarray(gv.truth, dtype=np.float64)
    mask = np.asarray(gv.mask, bool)
    blurred = gaussian_mm(truth, fwhm_mm, grid_spacing(gv.affine))
    return {name: standardise_spect(vol.astype(np.float32), mask, percentile)[0]
            for name, vol in (("truth_psf", blurred), ("truth", truth))}
