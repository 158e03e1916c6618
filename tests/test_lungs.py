"""Lung segmentation: the real chest CT, synthetic patients against their truth, touching lungs,
no lung, one lung."""

from __future__ import annotations

import dataclasses
import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from ctpm.data.io import load_image, save_nifti
from ctpm.data.lungs import LEFT, RIGHT, evaluation_mask, segment_lungs
from ctpm.data.manifest import load_manifest
from ctpm.data.preprocess import preprocess_patient
from ctpm.errors import CtpmError, CtpmWarning
from ctpm.synth import make_patient
from tests.conftest import TINY_PREPROCESSING, synth_settings


def _canonical(array, affine):
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array), affine))
    return np.asarray(img.dataobj), img.affine, np.asarray(img.header.get_zooms()[:3], float)


def _truth_sides(lobes: np.ndarray) -> np.ndarray:
    return np.where(np.isin(lobes, [3, 4, 5]), RIGHT, np.where(np.isin(lobes, [1, 2]), LEFT, 0)).astype(np.uint8)


def _dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# --------------------------------------------------------------------------------------------------
# The real chest CT
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(real_ct):
    vol = load_image(real_ct, kind="ct")
    ct, aff, spacing = _canonical(vol.array, vol.affine)
    return ct, aff, spacing, segment_lungs(ct, spacing, patient="C3N")


def test_real_ct_two_lungs_of_plausible_volume(real):
    _, aff, spacing, labels = real
    voxel_l = float(np.prod(spacing)) / 1e6
    for side in (RIGHT, LEFT):
        m = labels == side
        assert 1.0 <= m.sum() * voxel_l <= 4.5, (side, m.sum() * voxel_l)
        sizes = np.bincount(ndi.label(m)[0].ravel())[1:]
        assert sizes.max() >= 0.999 * m.sum()  # one piece each (a few stray voxels at most)
    x = {s: (aff[0, 0] * np.nonzero(labels == s)[0].mean() + aff[0, 3]) for s in (RIGHT, LEFT)}
    assert x[LEFT] < x[RIGHT]  # RAS: x grows towards the patient's right


def test_padding_outside_the_field_of_view_is_air(real, real_ct, tmp_path):
    """Vendors pad the corners outside the reconstruction circle with -2000, -3024 or -32768: the
    CT still reads as HU (padding becomes -1024) and the lungs are the same."""
    vol = load_image(real_ct, kind="ct")
    i, j = np.meshgrid(np.arange(vol.shape[0]), np.arange(vol.shape[1]), indexing="ij")
    outside = np.hypot(i - vol.shape[0] / 2, j - vol.shape[1] / 2) > 0.5 * min(vol.shape[:2])
    padded = vol.array.copy()
    padded[outside] = -32768
    path = save_nifti(padded, vol.affine, tmp_path / "padded.nii.gz", dtype=np.int16)
    back = load_image(path, kind="ct", patient="C3N")
    assert back.array.min() == -1024.0
    ct, _, spacing = _canonical(back.array, back.affine)
    np.testing.assert_array_equal(segment_lungs(ct, spacing, patient="C3N"), real[3])


def _air_nearest_midline(ct_slice: np.ndarray) -> np.ndarray:
    """The air region inside the body nearest to the body's midline (the trachea's lumen)."""
    tissue = ct_slice > -500
    lab, n = ndi.label(tissue)
    body = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)  # the table is not the body
    inner = ~tissue & ndi.binary_fill_holes(body)
    lab, n = ndi.label(inner)
    xs = np.nonzero(body.any(1))[0]
    mid = 0.5 * (xs.min() + xs.max())
    best = min(range(1, n + 1), key=lambda c: abs(np.nonzero(lab == c)[0].mean() - mid))
    return lab == best


def test_real_ct_trachea_is_not_lung(real):
    ct, _, spacing, labels = real
    ks = np.nonzero((labels > 0).any(axis=(0, 1)))[0]
    top_of_scan = list(range(ct.shape[2] - 5, ct.shape[2]))
    top_of_lungs = list(range(ks.max() - 4, ks.max() + 1))
    for k in top_of_scan + top_of_lungs:
        lumen = _air_nearest_midline(ct[:, :, k])
        area = lumen.sum() * spacing[0] * spacing[1]
        assert 80 <= area <= 900, (k, area)  # an airway, not a lung
        assert not (labels[:, :, k][lumen] > 0).any(), k
    # and the lungs do reach up into those slices: the check is not empty
    assert all((labels[:, :, k] > 0).sum() > 100 for k in top_of_lungs)


# --------------------------------------------------------------------------------------------------
# Synthetic patients against their truth
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_patients():
    s = synth_settings()
    small = s["presets"]["small"]
    return [make_patient(pid, c, inst, small, s["physics"], 0) for pid, c, inst in
            (("NC-A-001", "noncancer", "A"), ("LC-B-001", "cancer", "B"))]


@pytest.mark.parametrize("n", [0, 1])
def test_synthetic_lungs_match_the_truth(small_patients, n):
    p = small_patients[n]
    ct, _, spacing = _canonical(p.ct, p.ct_affine)
    lobes, _, _ = _canonical(p.lobes, p.ct_affine)
    labels = segment_lungs(ct, spacing, patient=p.patient_id)
    truth = _truth_sides(lobes)
    for side in (RIGHT, LEFT):
        d = _dice(labels == side, truth == side)
        assert d >= 0.97, (p.patient_id, side, d)
    # the evaluation mask keeps parenchyma, drops vessels and the tumour
    m = evaluation_mask(ct, labels)
    assert m.sum() > 0.7 * (labels > 0).sum() and not m[ct > -300].any()


def test_touching_lungs_are_split(small_patients):
    s = synth_settings()
    phys = {**s["physics"], "lungs": {**s["physics"]["lungs"], "anterior_gap": [0.0, 0.0]}}
    p = make_patient("NC-A-007", "noncancer", "A", s["presets"]["small"], phys, 3)
    ct, _, spacing = _canonical(p.ct, p.ct_affine)
    lobes, _, _ = _canonical(p.lobes, p.ct_affine)
    truth = _truth_sides(lobes)
    # the lungs do touch: the air of both is one connected region
    joined, n = ndi.label(ct < -500)
    assert len(set(np.unique(joined[truth == RIGHT])) & set(np.unique(joined[truth == LEFT])) - {0}) >= 1
    labels = segment_lungs(ct, spacing, patient=p.patient_id)
    for side in (RIGHT, LEFT):
        assert _dice(labels == side, truth == side) >= 0.95


def test_no_lung_is_an_error():
    """A phantom without lungs: a soft-tissue cylinder in air."""
    ct = np.full((64, 64, 40), -1000.0, np.float32)
    X, Y = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    ct[(X - 32) ** 2 + (Y - 32) ** 2 <= 25 ** 2, :] = 40.0
    with pytest.raises(CtpmError, match="no lung") as e:
        segment_lungs(ct, (5.0, 5.0, 5.0), patient="PHANTOM-1")
    assert "patient PHANTOM-1" in str(e.value)


def test_one_lung_warns_and_goes_on(small_patients):
    p = small_patients[0]
    ct, _, spacing = _canonical(p.ct, p.ct_affine)
    lobes, _, _ = _canonical(p.lobes, p.ct_affine)
    ct = ct.astype(np.float32).copy()
    ct[np.isin(lobes, [3, 4, 5])] = 40.0  # the right lung becomes soft tissue
    with pytest.warns(CtpmWarning, match=f"patient {p.patient_id}: only one lung.*no right lung"):
        labels = segment_lungs(ct, spacing, patient=p.patient_id)
    assert not (labels == RIGHT).any()
    assert _dice(labels == LEFT, _truth_sides(lobes) == LEFT) >= 0.97


def test_one_lung_through_the_preprocessing(tiny_cohort, tmp_path):
    """After pneumonectomy: the patient is processed with its one lung and a warning."""
    p = load_manifest(tiny_cohort).patients[0]
    ct, lobes = nib.load(str(p.ct)), nib.load(str(p.lobes))
    arr = np.asarray(ct.dataobj).copy()
    arr[np.isin(np.asarray(lobes.dataobj), [1, 2])] = 40  # the left lung becomes soft tissue
    path = save_nifti(arr, ct.affine, tmp_path / "ct.nii.gz", dtype=np.int16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre = preprocess_patient(dataclasses.replace(p, ct=path), TINY_PREPROCESSING)
    msgs = [str(w.message) for w in caught if issubclass(w.category, CtpmWarning)]
    assert any(f"patient {p.patient_id}" in m and "no left lung" in m for m in msgs), msgs
    assert pre.sides == ["right"] and pre.ct.shape == (1, *TINY_PREPROCESSING["roi_size"])
    assert set(np.unique(pre.ct_lungs)) == {0, RIGHT}
