"""The preprocessing (Fig. 1B) and its inverse: ROI arrays, SPECT standardisation, restoring maps to
the evaluation grid and the CT grid, world-space placement of the SPECT, orientation independence,
a given lung mask, and the explicit per-lung inverse against MONAI's own (Invertd)."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from monai.utils import TraceKeys
from scipy import ndimage as ndi

from ctpm.data.cache import roundtrip_r
from ctpm.data.io import save_nifti
from ctpm.data.lungs import LEFT, RIGHT
from ctpm.data.manifest import load_manifest
from ctpm.data.preprocess import preprocess_patient
from ctpm.data.record import LungInverse, restore, to_ct
from ctpm.data.transforms import IMAGE_KEYS, PreprocessConfig, lung_stage, standardise_spect
from ctpm.errors import CtpmError, CtpmWarning
from tests.conftest import TINY_PREPROCESSING
from tests.data_helpers import reorient

ROI = tuple(TINY_PREPROCESSING["roi_size"])


@pytest.fixture(scope="module")
def patients(tiny_cohort):
    by_id = load_manifest(tiny_cohort).by_id()
    return {"A": by_id["NC-A-001"], "B": by_id["LC-B-001"]}


@pytest.fixture(scope="module")
def pre(patients):
    return {inst: preprocess_patient(p, TINY_PREPROCESSING) for inst, p in patients.items()}


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inst", ["A", "B"])
def test_roi_arrays(pre, inst):
    p = pre[inst]
    assert p.sides == ["right", "left"]
    for name in ("ct", "spect", "lung", "mask"):
        assert getattr(p, name).shape == (2, *ROI), name
    assert p.ct.dtype == np.float32 and 0.0 <= p.ct.min() and p.ct.max() <= 1.0
    assert 0.0 <= p.spect.min() and p.spect.max() <= 1.0
    for m in (p.lung, p.mask):
        assert set(np.unique(m)) == {0, 1}
    assert not (p.mask & (1 - p.lung)).any()  # the evaluation mask lies inside the lung
    # inside the lung the CT is parenchyma (dark), outside it is cropped-in surroundings or 0
    assert p.ct[p.mask > 0].mean() < 0.4
    # each lung fills its ROI: the crop is to the lung's own box
    for s in range(2):
        lung = p.lung[s] > 0
        for ax in range(3):
            extent = np.nonzero(lung.any(axis=tuple(a for a in range(3) if a != ax)))[0]
            assert extent.min() <= 1 and extent.max() >= ROI[ax] - 2


@pytest.mark.parametrize("inst", ["A", "B"])
def test_spect_standardised_to_the_75th_percentile_in_the_mask(pre, inst):
    p = pre[inst]
    m = p.grid_mask > 0
    v = p.grid_spect[m]
    assert 0.0 <= p.grid_spect.min() and p.grid_spect.max() <= 1.0
    assert np.percentile(v, 75) == pytest.approx(1.0, abs=1e-4)  # clipped above it
    assert np.percentile(v, 70) < 0.999 and (v >= 0.9999).mean() == pytest.approx(0.25, abs=0.03)
    assert p.spect_percentile > 0


def test_standardise_spect_by_hand():
    spect = np.array([[[1.0, 2.0, 3.0, 4.0, 5.0, 100.0]]])
    mask = np.array([[[1, 1, 1, 1, 1, 0]]])
    out, p = standardise_spect(spect, mask)
    assert p == 4.0  # numpy's linear percentile of 1..5: 1 + 0.75 * 4
    np.testing.assert_allclose(out, [[[0.25, 0.5, 0.75, 1.0, 1.0, 1.0]]])
    out, p = standardise_spect(spect, mask, percentile=50.0, clip=2.0)
    assert p == 3.0
    np.testing.assert_allclose(out, [[[1 / 3, 2 / 3, 1.0, 4 / 3, 5 / 3, 2.0]]], rtol=1e-6)
    with pytest.raises(CtpmError, match="mask is empty"):
        standardise_spect(spect, np.zeros_like(mask))
    with pytest.raises(CtpmError, match="no counts"):
        standardise_spect(np.zeros_like(spect), mask)


# --------------------------------------------------------------------------------------------------
# Inverse
# --------------------------------------------------------------------------------------------------


def test_constant_per_lung_restores_to_that_constant(pre):
    p = pre["B"]
    values = {"right": 0.7, "left": 0.3}
    grid = restore({s: np.full(ROI, values[s], np.float32) for s in p.sides}, p)
    assert grid.shape == p.grid_lungs.shape
    np.testing.assert_allclose(grid[p.grid_lungs == RIGHT], 0.7, atol=1e-5)
    np.testing.assert_allclose(grid[p.grid_lungs == LEFT], 0.3, atol=1e-5)
    assert not grid[p.grid_lungs == 0].any()

    ct = to_ct(grid, p)
    assert ct.shape == p.ct_grid.shape
    struct = ndi.generate_binary_structure(3, 1)
    for side, v in ((RIGHT, 0.7), (LEFT, 0.3)):
        inner = ndi.binary_erosion(p.ct_lungs == side, structure=struct, iterations=2)
        assert inner.sum() > 1000
        np.testing.assert_allclose(ct[inner], v, atol=1e-4)
    far = ~ndi.binary_dilation(p.ct_lungs > 0, structure=struct, iterations=2)
    assert not ct[far].any()


def _roi_world(p, side: str, axis: int) -> np.ndarray:
    """By hand: the world coordinate (mm along RAS axis `axis`) at the centre of each ROI voxel
    along the ROI axis that holds it (crop to the lung's box on the evaluation grid, (z, y, x)
    order, resize with half-voxel alignment, left lungs mirrored in x)."""
    value = RIGHT if side == "right" else LEFT
    idx = np.nonzero((p.grid_lungs == value).any(axis=tuple(a for a in range(3) if a != axis)))[0]
    lo, n = idx.min(), idx.max() - idx.min() + 1
    roi_axis = {2: 0, 1: 1, 0: 2}[axis]
    size = ROI[roi_axis]
    r = np.arange(size, dtype=float)
    if axis == 0 and side == "left":
        r = size - 1 - r  # the mirror
    crop = (r + 0.5) * n / size - 0.5
    aff = p.grid_affine
    assert np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3]))) and np.all(np.diag(aff)[:3] > 0)  # RAS grid
    world = aff[axis, axis] * (lo + crop) + aff[axis, 3]
    shape = [1, 1, 1]
    shape[roi_axis] = size
    return world.reshape(shape), n


@pytest.mark.parametrize("inst", ["A", "B"])
def test_linear_function_of_world_position_restores_to_itself(pre, inst):
    """f = z + 0.5 x (world mm) built by hand in ROI space comes back as f of each voxel's world
    position: the crop, the axis order, the resize and the mirror of the left lung are inverted."""
    p = pre[inst]
    roi, worst = {}, 0.0
    for side in p.sides:
        z, nz = _roi_world(p, side, 2)
        x, nx = _roi_world(p, side, 0)
        roi[side] = (z + 0.5 * x + np.zeros(ROI)).astype(np.float32)
        sp = p.grid_affine[0, 0]
        worst = max(worst, 0.5 * max(nz / ROI[0], 1) * sp + 0.25 * max(nx / ROI[2], 1) * sp)
    grid = restore(roi, p)
    ijk = np.argwhere(p.grid_lungs > 0)
    world = ijk @ p.grid_affine[:3, :3].T + p.grid_affine[:3, 3]
    truth = world[:, 2] + 0.5 * world[:, 0]
    err = np.abs(grid[tuple(ijk.T)] - truth)
    assert np.median(err) < 1e-3 and err.max() <= worst + 1e-3, (np.median(err), err.max(), worst)

    # ... and on the original CT grid, within one evaluation voxel of interpolation
    ct = to_ct(grid, p)
    inner = ndi.binary_erosion(p.ct_lungs > 0, iterations=2)
    ijk = np.argwhere(inner)
    world = p.ct_grid.world(ijk)
    err = np.abs(ct[tuple(ijk.T)] - (world[:, 2] + 0.5 * world[:, 0]))
    assert np.median(err) < 1.0 and err.max() < 1.5 * p.grid_affine[0, 0] + worst, (np.median(err), err.max())


@pytest.mark.parametrize("inst", ["A", "B"])
def test_roundtrip_of_the_standardised_spect(pre, inst):
    assert roundtrip_r(pre[inst]) >= 0.95


# --------------------------------------------------------------------------------------------------
# World space
# --------------------------------------------------------------------------------------------------


def _shifted_spect(patient, tmp_path, shift_mm) -> object:
    img = nib.load(str(patient.spect))
    aff = img.affine.copy()
    aff[:3, 3] += shift_mm
    path = save_nifti(np.asarray(img.dataobj), aff, tmp_path / "spect_shifted.nii.gz")
    return dataclasses.replace(patient, spect=path)


def test_spect_lands_where_it_belongs_in_world_space(patients, pre, tmp_path):
    """The same SPECT with its affine moved 32 mm up (8 evaluation voxels): the SPECT on the
    evaluation grid moves 8 voxels up, the values otherwise the same (up to the new percentile)."""
    p0 = pre["A"]
    p1 = preprocess_patient(_shifted_spect(patients["A"], tmp_path, [0.0, 0.0, 32.0]), TINY_PREPROCESSING)
    assert p1.grid_spect.shape == p0.grid_spect.shape
    np.testing.assert_allclose(p1.grid_affine, p0.grid_affine)
    a = p0.grid_spect[:, :, :-8]  # original at z
    b = p1.grid_spect[:, :, 8:]  # shifted at z + 32
    unclipped = a < 0.999
    expected = np.clip(a * p0.spect_percentile / p1.spect_percentile, 0, 1)
    np.testing.assert_allclose(b[unclipped], expected[unclipped], atol=1e-3)
    assert not np.allclose(p1.spect, p0.spect, atol=0.05)  # what the network sees changed


def test_spect_far_away_is_refused(patients, tmp_path):
    with pytest.raises(CtpmError, match="does not overlap") as e:
        preprocess_patient(_shifted_spect(patients["A"], tmp_path, [2000.0, 0.0, 0.0]), TINY_PREPROCESSING)
    assert "patient NC-A-001" in str(e.value)


def _spect_above(patient, tmp_path, z_mm: float):
    """The patient's SPECT with its slices below world z (RAS) `z_mm` removed: a field of view
    that cuts the lung bases."""
    img = nib.load(str(patient.spect))
    aff = img.affine
    assert np.allclose(aff[2, :2], 0) and aff[2, 2] > 0  # slices along +z
    k0 = int(np.ceil((z_mm - aff[2, 3]) / aff[2, 2]))
    out = aff.copy()
    out[:3, 3] = (aff @ [0, 0, k0, 1])[:3]
    path = save_nifti(np.asarray(img.dataobj)[:, :, k0:], out, tmp_path / "spect_cut.nii.gz")
    return dataclasses.replace(patient, spect=path), float(out[2, 3] - aff[2, 2] / 2)


def test_spect_that_misses_the_lung_bases_warns_and_leaves_them_out(patients, pre, tmp_path):
    """A SPECT whose field of view ends above the lung bases: a warning naming the patient, the
    evaluation mask loses the lung below the field of view (not counted as unperfused), the rest
    is unchanged; a SPECT that covers less than half the lungs is refused."""
    p0 = pre["A"]
    z = (p0.grid_affine @ np.c_[np.argwhere(p0.grid_mask), np.ones(int(p0.grid_mask.sum()))].T)[2]
    cut = np.percentile(z, 25)
    patient, edge = _spect_above(patients["A"], tmp_path, cut)
    with pytest.warns(CtpmWarning, match=r"patient NC-A-001: spect covers [0-9.]+% of the lungs") as rec:
        p1 = preprocess_patient(patient, TINY_PREPROCESSING)
    (msg,) = [str(w.message) for w in rec if issubclass(w.category, CtpmWarning)]
    covered = float(msg.split("covers ")[1].split("%")[0])
    assert 60 < covered < 90
    gz = (p1.grid_affine @ np.c_[np.indices(p1.grid_mask.shape).reshape(3, -1).T,
                                 np.ones(p1.grid_mask.size)].T)[2].reshape(p1.grid_mask.shape)
    assert not p1.grid_mask[gz < edge - 1e-3].any()  # nothing below the field of view
    above = gz > edge + 1e-3
    np.testing.assert_array_equal(p1.grid_mask[above], p0.grid_mask[above])  # the rest as before
    assert p1.mask.sum() < p0.mask.sum()  # the training ROI follows
    patient, _ = _spect_above(patients["A"], tmp_path, np.percentile(z, 70))
    with pytest.raises(CtpmError, match="does not overlap"):
        preprocess_patient(patient, TINY_PREPROCESSING)


@pytest.mark.parametrize("perm,flips", [((2, 0, 1), (True, False, True)), ((1, 0, 2), (False, True, False))])
def test_ct_in_another_orientation_gives_the_same_result(patients, pre, tmp_path, perm, flips):
    p = patients["A"]
    img = nib.load(str(p.ct))
    arr, aff = reorient(np.asarray(img.dataobj), img.affine, perm, flips)
    path = save_nifti(arr, aff, tmp_path / "ct_reoriented.nii.gz", dtype=np.int16)
    q = preprocess_patient(dataclasses.replace(p, ct=path), TINY_PREPROCESSING)
    ref = pre["A"]
    assert q.ct_grid.shape == arr.shape
    np.testing.assert_allclose(q.ct_grid.affine, aff, atol=1e-6)
    # the lungs used, in the reoriented CT's own geometry, are the same voxels in world space
    np.testing.assert_array_equal(q.ct_lungs, reorient(ref.ct_lungs, ref.ct_grid.affine, perm, flips)[0])
    np.testing.assert_allclose(q.grid_affine, ref.grid_affine, atol=1e-5)
    np.testing.assert_array_equal(q.grid_lungs, ref.grid_lungs)
    for name in ("ct", "spect"):
        np.testing.assert_allclose(getattr(q, name), getattr(ref, name), atol=1e-4)
    for name in ("lung", "mask"):
        np.testing.assert_array_equal(getattr(q, name), getattr(ref, name))


# --------------------------------------------------------------------------------------------------
# A given lung mask
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["labels", "binary"])
def test_lung_mask_column_replaces_the_segmentation(patients, tmp_path, kind):
    """The upper lobes only, as a 1/2 label map or a binary mask: the preprocessing must use exactly
    these voxels (the segmentation would give whole lungs)."""
    p = patients["B"]
    lobes = nib.load(str(p.lobes))
    lob = np.asarray(lobes.dataobj)
    labels = np.where(lob == 3, RIGHT, np.where(lob == 1, LEFT, 0)).astype(np.uint8)  # RUL right, LUL left
    given = labels if kind == "labels" else (labels > 0).astype(np.uint8)
    path = save_nifti(given, lobes.affine, tmp_path / "mask.nii.gz", dtype=np.uint8)
    q = preprocess_patient(dataclasses.replace(p, lung_mask=path), TINY_PREPROCESSING)
    assert q.sides == ["right", "left"]
    np.testing.assert_array_equal(q.ct_lungs, labels)


@pytest.mark.parametrize("grid", ["shape", "affine"])
def test_lung_mask_on_another_grid_is_refused(patients, tmp_path, grid):
    p = patients["B"]
    lobes = nib.load(str(p.lobes))
    if grid == "shape":
        mask, aff = np.ones((10, 10, 10), np.uint8), lobes.affine
    else:  # the right voxels, saved without the CT's affine (as a bare array would be)
        mask, aff = (np.asarray(lobes.dataobj) > 0).astype(np.uint8), np.eye(4)
    path = save_nifti(mask, aff, tmp_path / "mask.nii.gz", dtype=np.uint8)
    with pytest.raises(CtpmError, match="grid") as e:
        preprocess_patient(dataclasses.replace(p, lung_mask=path), TINY_PREPROCESSING)
    assert "patient LC-B-001" in str(e.value) and str(path) in str(e.value)


# --------------------------------------------------------------------------------------------------
# The explicit inverse against MONAI's own
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_explicit_inverse_matches_invertd_on_the_live_history(side):
    """The crop box, transpose, flip and ROI size read from the forward's record take a map back
    exactly as MONAI's Invertd replays the live transform history."""
    rng = np.random.default_rng(0)
    shape = (1, 20, 14, 24)
    lung = np.zeros(shape, np.float32)
    lung[:, 3:17, 2:12, 4:22] = 1
    aff = torch.as_tensor(np.diag([4.0, 4.0, 4.0, 1.0]), dtype=torch.float64)
    d = {f"{k}_{side}": MetaTensor(torch.as_tensor(rng.random(shape, dtype=np.float32)), affine=aff.clone())
         for k in IMAGE_KEYS}
    d[f"lung_{side}"] = MetaTensor(torch.as_tensor(lung), affine=aff.clone())
    cfg = PreprocessConfig(**TINY_PREPROCESSING)
    stage = lung_stage(cfg, side, IMAGE_KEYS)
    out = stage(d)
    live = out[f"ct_{side}"].applied_operations
    names = [op[TraceKeys.CLASS_NAME] for op in live]
    assert names == ["CropForeground", "Transposed", "Resize"] + (["Flip"] if side == "left" else []), names

    inv = LungInverse.from_operations(live, ROI)
    assert inv.start == (3, 2, 4) and inv.stop == (17, 12, 22) and inv.grid_shape == shape[1:]
    assert LungInverse.from_json(inv.to_json()) == inv
    pred = torch.as_tensor(rng.random((1, *ROI), dtype=np.float32))
    ref = Invertd(keys="pred", transform=stage, orig_keys=f"ct_{side}", nearest_interp=False)(
        {"pred": MetaTensor(pred.clone()), f"ct_{side}": out[f"ct_{side}"]})["pred"][0].numpy()
    got = np.zeros(shape[1:], np.float32)
    got[3:17, 2:12, 4:22] = inv.to_box(pred[0].numpy())
    np.testing.assert_allclose(got, ref, atol=1e-6)
