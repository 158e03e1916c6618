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
    sample_at,
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


def test_axis_aligned_helpers_by_hand():
    g = Grid.axis_aligned((4, 3, 2), (2.0, 1.0, 5.0), (10.0, -1.0, 0.0))
    assert g.is_axis_aligned
    x, y, z = g.axes()
    np.testing.assert_array_equal(x, [10, 12, 14, 16])
    np.testing.assert_array_equal(z, [0, 5])
    X, Y, Z = g.mesh()
    assert (X + Y + Z).shape == g.shape
    # centres inside the box [11, 16] x [-1, 0.5] x [1, 9]: x 12, 14, 16; y -1, 0; z 5
    assert g.slices_within([11, -1, 1], [16, 0.5, 9]) == (slice(1, 4), slice(0, 2), slice(1, 2))
    empty = g.slices_within([100, 0, 0], [200, 1, 1])[0]
    assert empty.stop <= empty.start
    sub = g[g.slices_within([11, -1, 1], [16, 0.5, 9])]
    assert sub.shape == (3, 2, 1)
    np.testing.assert_allclose(sub.origin, [12, -1, 5])
    # flipped: the same voxel centres, the flagged axes reversed
    f = g.flipped((True, False, True))
    a = np.arange(24.0).reshape(g.shape)
    ijk = np.argwhere(np.ones(g.shape, bool))
    np.testing.assert_allclose(f.world(ijk), g.world([3, 0, 1] + ijk * [-1, 1, -1]))
    np.testing.assert_allclose(resample(a, g, f), a[::-1, :, ::-1], atol=1e-5)
    assert f.is_axis_aligned  # a flip keeps the grid axis-aligned
    around = Grid.around(np.array([0.0, 0, 0]), np.array([10.0, 4, 1]), 3.0)
    assert around.shape == (5, 3, 2) and np.allclose(around.spacing, 3)
    rot = Grid(np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), (2, 2, 2))
    assert not rot.is_axis_aligned
    with pytest.raises(ValueError):
        rot.axes()


def _monai(a, src, dst, padding):
    """MONAI's own resampling, the reference of the separable fast path."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    img = MetaTensor(torch.as_tensor(a[None]), affine=torch.as_tensor(src.affine))
    return SpatialResample(mode="bilinear", padding_mode=padding, dtype=torch.float32)(
        img, dst_affine=torch.as_tensor(dst.affine), spatial_size=dst.shape).numpy()[0]


def test_separable_fast_path_agrees_with_monai_and_a_hand_case():
    src = Grid.axis_aligned((5, 4, 6), (2.0, 3.0, 1.5), (-4.0, 10.0, 0.0))
    i, j, k = np.meshgrid(*[np.arange(n) for n in src.shape], indexing="ij")
    a = (1.0 + 2 * i - 0.5 * j + 0.25 * k).astype(np.float32)  # linear in the index: interpolation is exact
    # finer, shifted, x flipped, reaching beyond the source on every side
    dst = Grid.axis_aligned((13, 9, 11), (1.1, 1.7, 1.2), (-6.0, 7.0, -1.9)).flipped((True, False, False))
    fast = resample(a, src, dst, order=1, edge="zeros")
    np.testing.assert_allclose(fast, _monai(a, src, dst, "zeros"), atol=1e-4)
    clamp = resample(a, src, dst, order=1, edge="clamp")
    np.testing.assert_allclose(clamp, _monai(a, src, dst, "border"), atol=1e-4)
    # by hand: inside the box of centres the linear field itself; beyond it (clamp) the field at
    # the nearest point of the box
    u = np.clip(src.index(dst.world(np.argwhere(np.ones(dst.shape, bool)))), 0, np.asarray(src.shape) - 1)
    hand = (1.0 + 2 * u[:, 0] - 0.5 * u[:, 1] + 0.25 * u[:, 2]).reshape(dst.shape)
    np.testing.assert_allclose(clamp, hand, atol=1e-4)
    ijk = src.index(dst.world(np.argwhere(np.ones(dst.shape, bool)))).reshape(*dst.shape, 3)
    between = np.all((ijk >= 0) & (ijk <= np.asarray(src.shape) - 1), axis=-1)
    assert between.sum() > 100 and (~between).sum() > 100
    np.testing.assert_allclose(fast[between], hand[between], atol=1e-4)
    # with a fill, what the source does not cover takes it on both paths
    rotated = Grid(dst.affine @ np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]),
                   (dst.shape[1], dst.shape[0], dst.shape[2]))
    assert not rotated.is_axis_aligned
    np.testing.assert_allclose(resample(a, src, rotated, fill=-5.0),
                               np.transpose(resample(a, src, dst, fill=-5.0), (1, 0, 2)), atol=1e-4)


def test_sample_at_edges_by_hand():
    g = Grid.axis_aligned((3, 1, 1), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))  # centres x = 0, 2, 4; voxels -1 .. 5
    a = np.array([10.0, 20.0, 40.0], np.float32).reshape(3, 1, 1)
    pts = np.array([[x, 0, 0] for x in (-2.0, -0.5, 0.0, 1.0, 3.0, 4.0, 4.9, 6.0)])
    np.testing.assert_allclose(sample_at(a, g, pts), [0, 10, 10, 15, 30, 40, 40, 0])
    np.testing.assert_allclose(sample_at(a, g, pts, fill=-1.0, edge="centre"), [-1, -1, 10, 15, 30, 40, -1, -1])
    np.testing.assert_allclose(sample_at(a, g, pts, edge="clamp"), [10, 10, 10, 15, 30, 40, 40, 40])
    near = np.array([[x, 0, 0] for x in (-0.9, 0.9, 1.1, 4.9, 5.1)])
    np.testing.assert_allclose(sample_at(a, g, near, order=0), [10, 10, 20, 40, 0])
    np.testing.assert_array_equal(g.contains(pts), [False, True, True, True, True, True, True, False])
    assert sample_at(a, g, pts.reshape(2, 4, 3)).shape == (2, 4)
    # a rotated grid is sampled through its inverse affine
    rot = Grid(np.array([[0, 2.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), (1, 3, 1))
    np.testing.assert_allclose(sample_at(a.reshape(1, 3, 1), rot, pts), [0, 10, 10, 15, 30, 40, 40, 0])
