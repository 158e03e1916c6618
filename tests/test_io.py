"""Image I/O: NIfTI round trip, the real chest CT (DICOM), hand-made DICOM series, multi-frame NM,
and DICOM privacy."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctpm.data.io import IDENTIFYING, load_image, read_nifti, save_nifti
from ctpm.data.lungs import LEFT, RIGHT, segment_lungs
from ctpm.errors import CtpmError
from tests.data_helpers import IDENTITY, write_ct_series, write_enhanced_ct, write_nm_multiframe, write_slices


def _assert_private(meta: dict, values) -> None:
    """No identifying attribute name among the keys, no identifying value anywhere."""
    text = json.dumps(meta, default=str)
    for name in IDENTIFYING:
        assert name not in meta
    for v in values:
        assert v and v not in text, f"identifying value {v!r} in Volume.meta"


# --------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_nifti_round_trip_keeps_affine_dtype_and_values(tmp_path, dtype):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 200, size=(7, 5, 4)).astype(dtype)
    # an oblique affine with anisotropic voxels and a negative axis
    c, s = np.cos(0.3), np.sin(0.3)
    aff = np.array([[0.8 * c, -1.1 * s, 0, -12.5], [0.8 * s, 1.1 * c, 0, 40.25], [0, 0, -3.0, 101.0], [0, 0, 0, 1]])
    path = save_nifti(arr, aff, tmp_path / "x.nii.gz", dtype=dtype)
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.dtype(dtype)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    vol = load_image(path, kind="label")
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    np.testing.assert_array_equal(vol.array, arr.astype(np.float32))
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.spacing, [0.8, 1.1, 3.0], atol=1e-5)
    # same image, same bytes (mtime 0 in the gzip header): reproducible cohorts and caches
    again = save_nifti(arr, aff, tmp_path / "y.nii.gz", dtype=dtype)
    assert again.read_bytes() == path.read_bytes()
    assert not list(tmp_path.glob(".tmp-*"))


def test_nifti_4d_with_one_volume_is_accepted(tmp_path):
    arr = np.zeros((4, 5, 6, 1), np.float32)
    arr[1, 2, 3, 0] = 7
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "a.nii"))
    vol = read_nifti(tmp_path / "a.nii")
    assert vol.shape == (4, 5, 6) and vol.array[1, 2, 3] == 7


# --------------------------------------------------------------------------------------------------
# The real chest CT (DICOM, 102 slices)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(real_ct):
    vol = load_image(real_ct, kind="ct", patient="C3N")
    canon = nib.as_closest_canonical(nib.Nifti1Image(vol.array, vol.affine))
    ct = np.asarray(canon.dataobj, dtype=np.float32)
    labels = segment_lungs(ct, canon.header.get_zooms()[:3], patient="C3N")
    return vol, ct, canon.affine, labels


def test_real_ct_hu_spacing_and_size(real):
    vol, ct, _, _ = real
    assert vol.shape == (512, 512, 102)
    np.testing.assert_allclose(vol.spacing, [0.883, 0.883, 3.0], atol=1e-3)
    # air around the patient near -1000 HU (the scanner pads with -1024)
    corner = vol.array[:40, :40, :]
    assert -1030 <= float(np.median(corner)) <= -970
    # tissue peaks of the histogram: fat near -100 HU, soft tissue (muscle, liver, blood) in 0..100 HU
    def peak(lo, hi):
        hist, edges = np.histogram(vol.array, bins=np.arange(lo, hi + 1, 5))
        return edges[int(np.argmax(hist))] + 2.5

    assert -130 <= peak(-200, 200) <= -60
    assert 0 <= peak(-30, 150) <= 100
    assert vol.meta["modality"] == "CT"


def test_real_ct_affine_maps_voxel_0_to_first_slice_position(real, real_ct):
    vol = real[0]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(real_ct.glob("*.dcm"))]
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    first = min(headers, key=lambda h: np.dot(normal, [float(v) for v in h.ImagePositionPatient]))
    ipp_lps = np.array([float(v) for v in first.ImagePositionPatient])
    expected = np.array([-ipp_lps[0], -ipp_lps[1], ipp_lps[2]])  # LPS -> RAS
    np.testing.assert_allclose(vol.affine[:3, 3], expected, atol=1e-4)
    # the first slice's pixels are voxel plane k = 0 (i = column, j = row), in HU
    px = pydicom.dcmread(first.filename).pixel_array.astype(np.float32) * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(vol.array[:, :, 0], px.T)
    # superior slices have larger world z
    z = [(vol.affine @ [0, 0, k, 1])[2] for k in range(vol.shape[2])]
    assert np.all(np.diff(z) > 0)
    last = max(headers, key=lambda h: np.dot(normal, [float(v) for v in h.ImagePositionPatient]))
    assert z[-1] == pytest.approx(float(last.ImagePositionPatient[2]), abs=1e-3)


def test_real_ct_left_lung_is_on_the_patients_left(real):
    """World RAS+ (NIfTI, nibabel, MONAI): x grows towards the patient's Right, so the patient's
    left lies at smaller x (DICOM's LPS x, towards the Left, is -x). The liver, under the right
    hemidiaphragm, is the anatomical check of that: it lies on the side of the right lung."""
    _, ct, aff, labels = real
    assert set(np.unique(labels)) == {0, RIGHT, LEFT}

    def world_x(i):
        return aff[0, 0] * np.asarray(i, float) + aff[0, 3]

    x_right = world_x(np.nonzero(labels == RIGHT)[0]).mean()
    x_left = world_x(np.nonzero(labels == LEFT)[0]).mean()
    assert x_left < x_right - 80, (x_left, x_right)
    # liver: soft tissue (40..90 HU) in the slices at the lung bases sits right of the body midline
    ks = np.nonzero((labels > 0).any(axis=(0, 1)))[0]
    base = slice(int(ks.min()), int(ks.min() + 0.2 * (ks.max() - ks.min())))
    sub = ct[:, :, base]
    body_x = world_x(np.nonzero((sub > -300).any(axis=(1, 2)))[0])
    mid = 0.5 * (body_x.min() + body_x.max())
    liver_x = world_x(np.nonzero((sub > 40) & (sub < 90))[0]).mean()
    assert liver_x > mid + 20, (liver_x, mid)
    # superior slices at larger z: the lung apices are above the bases
    assert aff[2, 2] > 0


def test_real_ct_meta_holds_no_identity(real, real_ct):
    vol = real[0]
    h = pydicom.dcmread(next(real_ct.glob("*.dcm")), stop_before_pixels=True)
    values = [str(h.get(k, "")) for k in ("PatientName", "PatientID", "PatientBirthDate")]
    meta = {k: v for k, v in vol.meta.items() if k not in ("files", "source")}  # paths are the user's own
    _assert_private(meta, [v for v in values if v])


# --------------------------------------------------------------------------------------------------
# A hand-written DICOM CT series
# --------------------------------------------------------------------------------------------------


def test_hand_written_ct_series_affine_and_values(tmp_path):
    """3 slices of 4 rows x 5 columns; the row direction is flipped (patient right, -x of LPS), the
    slices are written in scrambled order and stack downwards in z."""
    rows, cols = 4, 5
    stored = [np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) + 1000 + 100 * n for n in range(3)]
    positions = [[10.0, 20.0, 30.0 + 2.5 * n] for n in range(3)]  # z = 30, 32.5, 35 (LPS)
    orientation = [-1, 0, 0, 0, 1, 0]  # rows run to the patient's right, columns to posterior
    # PixelSpacing = [between rows, between columns]
    write_slices(tmp_path / "ct", stored, positions, orientation, [0.7, 0.6], order=[2, 0, 1])
    vol = load_image(tmp_path / "ct", kind="perfusion")  # no HU plausibility check on 60 voxels

    # by hand: normal = row x col = (-1,0,0) x (0,1,0) = (0,0,-1), so slices are ordered by
    # decreasing LPS z: k = 0 is the slice at z = 35, k = 2 the one at z = 30.
    # i (column index) steps 0.6 mm along the row direction (-1,0,0) LPS = (+0.6,0,0) RAS;
    # j (row index) steps 0.7 mm along (0,1,0) LPS = (0,-0.7,0) RAS; k steps (0,0,-2.5);
    # voxel 0 sits at LPS (10, 20, 35) = RAS (-10, -20, 35).
    expected = np.array([[0.6, 0, 0, -10.0], [0, -0.7, 0, -20.0], [0, 0, -2.5, 35.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(vol.affine, expected, atol=1e-6)
    assert vol.shape == (cols, rows, 3)
    for k, n in enumerate([2, 1, 0]):
        np.testing.assert_array_equal(vol.array[:, :, k], stored[n].T.astype(np.float32) - 1024)
    assert vol.array[3, 1, 0] == stored[2][1, 3] - 1024  # (i=col 3, j=row 1) of the top slice
    _assert_private(vol.meta, IDENTITY.values())
    assert vol.meta["modality"] == "CT" and len(vol.meta["sop_instance_uids"]) == 3


def test_dicom_slices_with_a_gap_or_duplicate_are_refused(tmp_path):
    px = [np.zeros((4, 5), np.uint16)] * 4
    write_slices(tmp_path / "gap", px, [[0, 0, z] for z in (0, 2, 4, 10)], [1, 0, 0, 0, 1, 0], [1, 1])
    with pytest.raises(CtpmError, match="not evenly spaced"):
        load_image(tmp_path / "gap", kind="perfusion", patient="P9")
    write_slices(tmp_path / "dup", px[:3], [[0, 0, z] for z in (0, 2, 2)], [1, 0, 0, 0, 1, 0], [1, 1])
    with pytest.raises(CtpmError, match="same position") as e:
        load_image(tmp_path / "dup", kind="perfusion", patient="P9")
    assert "patient P9" in str(e.value)


def test_gantry_tilt_is_kept_in_the_affine(tmp_path):
    """Tilted acquisition: each slice is shifted 2.5 * tan(15 deg) mm along LPS y while the rows
    and columns stay axial, so the slice axis of the affine is sheared, and voxels land at the
    positions the files give."""
    shift = 2.5 * np.tan(np.deg2rad(15))
    px = [np.full((4, 5), 1000 + n, np.uint16) for n in range(4)]
    positions = [[0.0, n * shift, 2.5 * n] for n in range(4)]
    write_slices(tmp_path / "ct", px, positions, [1, 0, 0, 0, 1, 0], [1, 1], order=[3, 1, 0, 2])
    vol = load_image(tmp_path / "ct", kind="perfusion")
    np.testing.assert_allclose(vol.affine[:3, 2], [0.0, -shift, 2.5], atol=1e-6)  # RAS y = -LPS y
    for n, pos in enumerate(positions):
        np.testing.assert_allclose(vol.affine @ [0, 0, n, 1], [-pos[0], -pos[1], pos[2], 1], atol=1e-6)
        assert vol.array[0, 0, n] == 1000 + n - 1024


def test_localizer_in_the_series_is_skipped_and_mixed_orientations_refused(tmp_path):
    px = [np.full((4, 5), 1000 + n, np.uint16) for n in range(3)]
    write_slices(tmp_path / "ct", px, [[0, 0, z] for z in (0, 2, 4)], [1, 0, 0, 0, 1, 0], [1, 1],
                 series_uid="1.2.826.0.1.3680043.8.498.7")
    scout = write_slices(tmp_path / "scout", [np.zeros((6, 5), np.uint16)], [[0, 0, 0]], [1, 0, 0, 0, 0, -1], [1, 1],
                         series_uid="1.2.826.0.1.3680043.8.498.7", prefix="SCOUT")[0]
    ds = pydicom.dcmread(scout)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(tmp_path / "ct" / "SCOUT.dcm")
    vol = load_image(tmp_path / "ct", kind="perfusion")
    assert vol.shape == (5, 4, 3)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]  # the same slice, not marked as a scout
    ds.save_as(tmp_path / "ct" / "SCOUT.dcm")
    with pytest.raises(CtpmError, match="different orientations"):
        load_image(tmp_path / "ct", kind="perfusion", patient="P3")


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "RLELossless"])
def test_compressed_ct_series_reads_like_the_uncompressed_one(tmp_path, syntax):
    """Archives send CT compressed; the decoders come with ctpm's dependencies."""
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 1500, size=(64, 48, 3)).astype(np.float32)  # J2K needs >= 32 px a side
    aff = np.diag([0.8, 0.8, 2.0, 1.0])
    files = write_ct_series(tmp_path / "ct", hu, aff)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(getattr(pydicom.uid, syntax))
        ds.save_as(f)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == getattr(pydicom.uid, syntax)
    vol = load_image(tmp_path / "ct", kind="perfusion")
    np.testing.assert_array_equal(vol.array, hu)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-6)


@pytest.mark.parametrize("per_frame_rescale", [True, False])
def test_enhanced_ct_reads_like_its_slice_series(tmp_path, per_frame_rescale):
    """Enhanced CT: one file, frames in scrambled order, geometry and rescale in the functional
    groups. By hand: frames are stacked by position, so the volume and affine equal the slice
    series of the same CT."""
    rng = np.random.default_rng(4)
    hu = rng.integers(-1000, 1000, size=(6, 5, 4)).astype(np.float32)
    aff = np.array([[-0.7, 0, 0, 120.0], [0, -0.7, 0, 80.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    f = write_enhanced_ct(tmp_path / "enh" / "ct.dcm", hu, aff, order=[2, 0, 3, 1], per_frame_rescale=per_frame_rescale)
    write_ct_series(tmp_path / "series", hu, aff)
    vol, ref = load_image(f.parent, kind="perfusion"), load_image(tmp_path / "series", kind="perfusion")
    np.testing.assert_array_equal(vol.array, hu)
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-6)
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-6)
    _assert_private(vol.meta, IDENTITY.values())
    # two frames at one position (two phases in one file) and a missing slice are refused
    write_enhanced_ct(tmp_path / "twice" / "ct.dcm", hu, aff, order=[0, 1, 1, 2, 3])
    with pytest.raises(CtpmError, match="same position") as err:
        load_image(tmp_path / "twice", kind="perfusion", patient="P5")
    assert "patient P5" in str(err.value) and "ct.dcm" in str(err.value)
    write_enhanced_ct(tmp_path / "gap" / "ct.dcm", hu, aff, order=[0, 1, 3])
    with pytest.raises(CtpmError, match="not evenly spaced"):
        load_image(tmp_path / "gap", kind="perfusion", patient="P5")


# --------------------------------------------------------------------------------------------------
# Multi-frame NM (SPECT)
# --------------------------------------------------------------------------------------------------


def test_multiframe_nm_spect(tmp_path):
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 500, size=(6, 5, 4)).astype(np.float32)  # (I, J, K)
    # the SPECT grid of a typical LPS reconstruction: RAS x and y columns negative
    aff = np.array([[-4.42, 0, 0, 150.0], [0, -4.42, 0, 90.0], [0, 0, 4.42, -200.0], [0, 0, 0, 1]])
    f = write_nm_multiframe(tmp_path / "spect" / "nm.dcm", counts * 2, aff, slope=2.0)
    for target in (f, f.parent):  # a single file or its folder
        vol = load_image(target, kind="spect", patient="P1")
        assert vol.shape == (6, 5, 4)
        np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
        np.testing.assert_allclose(vol.array, counts * 2)  # stored counts x RescaleSlope 2
        assert vol.meta["modality"] == "NM"
        _assert_private(vol.meta, IDENTITY.values())
    # by hand: voxel (i, j, k) = (2, 3, 1) is at RAS (150 - 8.84, 90 - 13.26, -200 + 4.42)
    np.testing.assert_allclose(vol.affine @ [2, 3, 1, 1], [141.16, 76.74, -195.58, 1], atol=1e-4)


# --------------------------------------------------------------------------------------------------
# The same patient as DICOM (CT slices, NM multi-frame SPECT) and as NIfTI
# --------------------------------------------------------------------------------------------------


def test_dicom_patient_preprocesses_like_its_nifti(tiny_cohort, tmp_path):
    import dataclasses

    from ctpm.data.manifest import load_manifest
    from ctpm.data.preprocess import preprocess_patient
    from tests.conftest import TINY_PREPROCESSING
    from tests.data_helpers import reorient, write_ct_series

    p = load_manifest(tiny_cohort).by_id()["LC-B-001"]
    ct, sp = nib.load(str(p.ct)), nib.load(str(p.spect))
    write_ct_series(tmp_path / "ct", np.asarray(ct.dataobj), ct.affine)
    # an NM reconstruction's frames run along the normal of its rows and columns: store it so
    counts, aff = np.asarray(sp.dataobj, np.float32), sp.affine
    lps = np.diag([-1.0, -1, 1, 1]) @ aff
    if np.dot(np.cross(lps[:3, 0], lps[:3, 1]), lps[:3, 2]) < 0:
        counts, aff = reorient(counts, aff, (0, 1, 2), (False, True, False))
    write_nm_multiframe(tmp_path / "spect" / "nm.dcm", counts, aff, slope=0.01)  # stored: counts x 100
    a = preprocess_patient(p, TINY_PREPROCESSING)
    b = preprocess_patient(dataclasses.replace(p, ct=tmp_path / "ct", spect=tmp_path / "spect"), TINY_PREPROCESSING)
    # the DICOM reader stacks slices along the normal (the NIfTI may run the other way): compare
    # the lungs used in world space
    ca = nib.as_closest_canonical(nib.Nifti1Image(a.ct_lungs, a.ct_grid.affine))
    cb = nib.as_closest_canonical(nib.Nifti1Image(b.ct_lungs, b.ct_grid.affine))
    np.testing.assert_allclose(cb.affine, ca.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(cb.dataobj), np.asarray(ca.dataobj))
    np.testing.assert_allclose(b.grid_affine, a.grid_affine, atol=1e-4)
    np.testing.assert_allclose(b.ct, a.ct, atol=1e-4)
    np.testing.assert_allclose(b.spect, a.spect, atol=2e-3)  # counts stored as integers x 0.01
    np.testing.assert_array_equal(b.mask, a.mask)
    assert b.dicom["modality"] == "CT"
    _assert_private(b.dicom, IDENTITY.values())
