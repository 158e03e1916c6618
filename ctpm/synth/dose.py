"""A plausible radiotherapy plan dose around the tumour (for ctpm-flart)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ctpm.geometry import Grid
from ctpm.synth.anatomy import spheres_mask
from ctpm.synth.fields import uniform


def plan_dose(grid: Grid, tumour_spheres: list[tuple[np.ndarray, float]], dose: dict, rng) -> np.ndarray:
    """A plausible conformal plan (Gy): the prescription over the PTV (tumour + margin), a steep
    fall-off around it and a low-dose bath that spreads further, as a multi-field plan gives."""
    rx = uniform(rng, dose["prescription_gy"])
    inside = spheres_mask(grid, [(c, r + float(dose["margin"])) for c, r in tumour_spheres])
    dist = ndi.distance_transform_edt(~inside, sampling=grid.spacing)
    falloff = float(dose["falloff"])
    d = rx * np.exp(-((dist / falloff) ** 1.3)) + float(dose["low_dose_bath_gy"]) * np.exp(-dist / (5 * falloff))
    return np.where(inside, rx, d).astype(np.float32)

