"""What every part of the synthetic world shares: draws from a configured range, a smooth step, smooth
random fields defined in world space, and storage orientations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from ctpm.geometry import Grid, resample


def uniform(rng: np.random.Generator, lohi) -> float:
    """One draw from the range [lo, hi] of the config."""
    lo, hi = (float(v) for v in lohi)
    return float(rng.uniform(lo, hi))


def smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


class LatticeField:
    """A smooth random field defined on a coarse world lattice, sampled on any axis-aligned grid by
    trilinear interpolation (the edge value beyond the lattice). The same field is seen by the CT
    grid and the perfusion grid."""

    def __init__(self, rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, spacing: float, scale: float):
        origin = np.asarray(lo, float) - 2 * spacing
        shape = tuple(int(np.ceil((hi[d] - origin[d]) / spacing)) + 3 for d in range(3))
        self.grid = Grid.axis_aligned(shape, (float(spacing),) * 3, origin)
        f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=scale / spacing, mode="wrap")
        self.field = (f - f.mean()) / (f.std() + 1e-12)

    def on_grid(self, grid: Grid) -> np.ndarray:
        return resample(self.field, self.grid, grid, order=1, edge="clamp")


def stored(array: np.ndarray, grid: Grid, flips: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """``array`` on the canonical ``grid`` as a file stores it with the flagged axes reversed, and
    that file's affine. Scanners and converters store images in many orientations (LPS-like,
    feet-first ...); the cohorts use several so that every reader and resampler is exercised."""
    sl = tuple(slice(None, None, -1) if f else slice(None) for f in flips)
    return np.ascontiguousarray(array[sl]), grid.flipped(flips).affine
