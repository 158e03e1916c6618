"""The geometry core against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from ctpm.geometry import (
    LPS_TO_RAS,
    Grid,
    coverage,
    dicom_affine,
    footprint,
    reorientation,
    resample,
    resample_labels,
    resample_masked,
)


def test_grid_bounds_crop_and_world_index_roundtrip():
    g = Grid.axis_aligned((10, 20, 5), (2.0, 1.0, 3.0), (-10.0, 0.0, 100.0))
    lo, hi = g.bounds()
    np.testing.assert_allclose(lo, [-10, 0, 100])
    np.testing.assert_allclose(hi, [8, 19, 112])
    lo, hi = g.bounds(edges=True)
    np.testing.assert_allclose(lo, [-11, -0.5, 98.5])
    np.testing.assert_allclose(hi, [9, 19.5, 113.5])
    c = g.crop([2, 3, 1], [5, 10, 4])
    assert c.shape == (3, 7, 3)
    np.testing.assert_allclose(c.affine[:3, 3], [-6, 3, 103])
    pts = np.array([[1.5, 2.0, 3.25], [0, 0, 0]])
    np.testing.assert_allclose(g.index(g.world(pts)), pts)
    assert g.voxel_ml == pytest.approx(6.0 / 1000)


def test_resample_identity_shift_and_fill():
    g = Grid.axis_aligned((6, 6, 6), (1, 1, 1), (0, 0, 0))
    a = np.arange(216, dtype=np.float32).reshape(6, 6, 6)
    np.testing.assert_allclose(resample(a, g, g), a, atol=1e-4)
    # destination shifted by exactly one voxel along x: out[i] = a[i + 1]
    shifted = Grid.axis_aligned((6, 6, 6), (1, 1, 1), (1, 0, 0))
    out = resample(a, g, shifted)
    np.testing.assert_allclose(out[:5], a[1:], atol=1e-4)
    # half a voxel: linear interpolation is the mean of the neighbours (a is linear in i)
    half = Grid.axis_aligned((5, 6, 6), (1, 1, 1), (0.5, 0, 0))
    np.testing.assert_allclose(resample(a, g, half), 0.5 * (a[:-1] + a[1:]), atol=1e-3)
    # far away: all fill
    far = Grid.axis_aligned((3, 3, 3), (1, 1, 1), (100, 0, 0))
    assert np.all(resample(a, g, far, fill=-7.0) == -7.0)
    assert np.all(resample(a, g, far) == 0.0)


def test_resample_flipped_grid_is_exact_permutation():
    g = Grid.axis_aligned((4, 5, 6), (1, 2, 3), (0, 0, 0))
    a = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    # the same voxels stored with x reversed (as LPS-like files do)
    aff = g.affine.copy()
    aff[:3, 3] += aff[:3, 0] * 3
    aff[:3, 0] *= -1
    flipped = Grid(aff, g.shape)
    np.testing.assert_allclose(resample(a, g, flipped), a[::-1], atol=1e-5)
    np.testing.assert_array_equal(reorientation(g, flipped)(a), a[::-1])
    labels = (a > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(resample_labels(labels, g, flipped), labels[::-1])
    assert reorientation(g, Grid.axis_aligned((4, 5, 6), (1, 2, 3), (0.3, 0, 0))) is None


def test_footprint_and_coverage():
    src = Grid.axis_aligned((4, 4, 4), (1, 1, 1), (0, 0, 0))  # covers -0.5 .. 3.5 mm
    dst = Grid.axis_aligned((8, 1, 1), (1, 1, 1), (-2, 0, 0))  # centres -2 .. 5
    fp = footprint(src, dst)
    np.testing.assert_array_equal(fp[:, 0, 0], [False, False, True, True, True, True, False, False])
    where = np.zeros(dst.shape, bool)
    where[:4] = True  # -2, -1, 0, 1: two inside
    assert coverage(src, dst, where) == pytest.approx(0.5)
    assert coverage(src, dst, np.zeros(dst.shape, bool)) == 0.0


def test_resample_masked_keeps_border_values():
    g = Grid.axis_aligned((8, 8, 8), (1, 1, 1), (0, 0, 0))
    mask = np.zeros(g.shape, bool)
    mask[2:6, 2:6, 2:6] = True
    values = np.where(mask, 0.8, 0.0).astype(np.float32)
    fine = Grid.axis_aligned((16, 16, 16), (0.5, 0.5, 0.5), (-0.25, -0.25, -0.25))
    out, weight = resample_masked(values, mask, g, fine)
    inside = weight > 0.05
    np.testing.assert_allclose(out[inside], 0.8, atol=1e-5)  # no pull towards the 0 outside


def test_dicom_affine_by_hand():
    # axial, rows along +x (LPS), columns along +y, 0.7 mm pixels, 2.5 mm slices, first slice at (-100, -120, 30)
    aff = dicom_affine([1, 0, 0, 0, 1, 0], [-100, -120, 30], [0.7, 0.7], 2.5)
    # voxel (i=col 10, j=row 20, k=slice 4) -> LPS (-100 + 7, -120 + 14, 30 + 10) -> RAS (93, 106, 40)
    np.testing.assert_allclose(aff @ [10, 20, 4, 1], [93, 106, 40, 1], atol=1e-9)
    # a step vector keeps a gantry tilt
    tilted = dicom_affine([1, 0, 0, 0, 1, 0], [0, 0, 0], [1, 1], [0, 0.5, 2.0])
    np.testing.assert_allclose(LPS_TO_RAS @ tilted @ [0, 0, 2, 1], [0, 1.0, 4.0, 1], atol=1e-9)
