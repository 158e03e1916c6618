"""Where a map is judged: the lung interior, and the SPECT's resolution in millimetres.

A SPECT sees the lungs through its point-spread function (PSF), a Gaussian of full width at half
maximum (FWHM) of about 10-15 mm. Near the lungs' outline the SPECT is dominated by that blur (the
counts fall off over one FWHM whatever the perfusion), so any map that knows where the lungs are
correlates well there. The *interior*, farther than one FWHM from the lungs' border, is where
perfusion has to be predicted from the lung itself.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

#: FWHM = 2 sqrt(2 ln 2) sigma for a Gaussian.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: SPECT resolution (mm) used when the manifest gives none (the synthetic world's 12-15 mm range).
DEFAULT_SPECT_FWHM_MM = 13.5


def grid_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) of a grid along its three array axes."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def voxel_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL (|det| of the affine's 3 x 3 part, mm^3 / 1000)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def patient_fwhm_mm(patient, default: float = DEFAULT_SPECT_FWHM_MM) -> float:
    """The SPECT FWHM of a patient: the manifest's ``spect_fwhm_mm`` when it has one, else default."""
    value = getattr(patient, "spect_fwhm_mm", None)
    return float(value) if value is not None else float(default)


def gaussian_mm(volume: np.ndarray, fwhm_mm: float, spacing) -> np.ndarray:
    """volume (float64) convolved with a Gaussian of FWHM fwhm_mm; zero outside the grid."""
    sigma = float(fwhm_mm) / FWHM_PER_SIGMA / np.asarray(spacing, dtype=float)
    return ndi.gaussian_filter(np.asarray(volume, dtype=np.float64), sigma=sigma, mode="constant", cval=0.0)


def normalised_convolution(values: np.ndarray, support: np.ndarray, fwhm_mm: float, spacing) -> np.ndarray:
    """values smoothed to a resolution of fwhm_mm using only the voxels of ``support``
    (Knutsson & Westin's normalised convolution: G * (v 1_S) / G * 1_S): inside the support each
    voxel gets the Gaussian-weighted mean of the support's values around it, so that the HU of
    the chest wall does not leak into the lung. Zero outside the support."""
    s = np.asarray(support, dtype=bool)
    num = gaussian_mm(np.where(s, values, 0.0), fwhm_mm, spacing)
    den = gaussian_mm(s, fwhm_mm, spacing)
    out = np.zeros(s.shape, np.float64)
    ok = s & (den > 1e-12)
    out[ok] = num[ok] / den[ok]
    return out


def border_distance_mm(support: np.ndarray, spacing) -> np.ndarray:
    """Per voxel of ``support``, the distance (mm) from its centre to the nearest voxel centre
    outside it (the grid's outside counts as outside: a support cut by the grid's edge has its
    border there). Zero outside the support."""
    s = np.pad(np.asarray(support, dtype=bool), 1, constant_values=False)
    d = ndi.distance_transform_edt(s, sampling=np.asarray(spacing, dtype=float))
    return d[1:-1, 1:-1, 1:-1]


def interior_mask(mask: np.ndarray, spacing, depth_mm: float, support: np.ndarray | None = None) -> np.ndarray:
    """The voxels of ``mask`` whose centre lies farther than ``depth_mm`` from the border of
    ``support`` (default: the mask itself), the distance measured between voxel centres in mm
    (Euclidean distance transform on the grid spacing). With support = the lungs and depth =
    one SPECT FWHM this is the lung interior of the report: vessels and tumour that the
    evaluation mask leaves out make no border, the lungs' outline does."""
    support = mask if support is None else support
    return np.asarray(mask, dtype=bool) & (border_distance_mm(support, spacing) > float(depth_mm))
