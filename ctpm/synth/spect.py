"""The SPECT: the truth blurred by the camera, sampled on the institution's own grid, Poisson
counts and light reconstruction smoothing."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ctpm.geometry import Grid, sample_at
from ctpm.synth.anatomy import Phantom
from ctpm.synth.fields import stored, uniform


def simulate_spect(perf: np.ndarray, wgrid: Grid, ph: Phantom, preset: dict, physics: dict, institution: str,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """The SPECT of the truth ``perf`` (on ``wgrid``) as the institution's camera records it: the
    counts (stored array), their affine in the phantom frame, and the camera's PSF FWHM (mm) used."""
    sp = physics["spect"]
    fwhm = uniform(rng, sp["fwhm"])
    blurred = ndi.gaussian_filter(perf, sigma=fwhm / 2.3548 / np.asarray(wgrid.spacing), mode="constant")
    shape = tuple(int(v) for v in preset["spect_matrix"][institution])
    vox = tuple(float(v) for v in preset["spect_voxel"][institution])
    lo, hi = ph.lung_box()
    centre = (lo + hi) / 2 + rng.uniform(-1, 1, 3) * float(sp["shift"])
    origin = centre - (np.asarray(shape) - 1) * np.asarray(vox) / 2
    sgrid = Grid.axis_aligned(shape, vox, origin)
    expected = sample_at(blurred, wgrid, sgrid.mesh(), order=1, fill=0.0, edge="centre")
    total = uniform(rng, sp["counts"][institution])
    expected *= total / max(float(expected.sum()), 1e-6)
    counts = rng.poisson(expected).astype(np.float32)
    spect = ndi.gaussian_filter(counts, float(sp["post_filter_voxels"]))
    flips = (False, False, False) if institution == "A" else (True, True, False)
    array, affine = stored(spect, sgrid, flips)
    return array.astype(np.float32), affine, fwhm

