"""DICOM export for the TPS: the RT Structure Set of functional volumes and the perfusion series,
on small hand-written CT series and on the real chest CT, read back with pydicom, with rt-utils
(an independent reader) and with ctpm's own reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as Polygon

from ctpm.data.dicom_export import (
    Roi,
    load_dicom_ct,
    write_perfusion_series,
    write_prediction_dicom,
    write_rtstruct,
)
from ctpm.data.io import Volume, load_image, save_nifti
from ctpm.errors import CtpmError
from ctpm.geometry import LPS_TO_RAS
from tests.data_helpers import IDENTITY, write_ct_series

# Supine (the usual LPS-stored axial series) and prone (rows and columns run the other way).
ORIENTATIONS = {"supine": np.diag([-1.0, -1.0, 3.0, 1.0]), "prone": np.diag([1.0, 1.0, 3.0, 1.0])}


def synthetic_ct(folder: Path, affine: np.ndarray) -> Volume:
    """A 64 x 64 x 10 CT of 1 x 1 x 3 mm (air around a water box) written as a DICOM series with
    a patient identity that must not leak, read back as the exporter sees it."""
    affine = affine.copy()
    affine[:3, 3] = -affine[:3, :3] @ [31.5, 31.5, 4.5]  # centre the grid on the world origin
    hu = np.full((64, 64, 10), -1000.0)
    hu[8:56, 12:52, :] = 0.0
    write_ct_series(folder, hu, affine)
    return load_dicom_ct(folder)


def world_axes(ct: Volume) -> list[np.ndarray]:
    """World RAS x, y, z (mm) of the voxel centres as broadcastable arrays (cheap on a 512^2 CT)."""
    idx = np.ogrid[tuple(slice(0, n) for n in ct.shape)]
    return [sum(a * ix for a, ix in zip(ct.affine[d, :3], idx) if a != 0) + ct.affine[d, 3] for d in range(3)]


def ellipsoid(ct: Volume, centre, radii_mm) -> np.ndarray:
    return sum(((w - c) / r) ** 2 for w, c, r in zip(world_axes(ct), centre, radii_mm)) <= 1.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def rasterise(rs, roi_name: str, ct: Volume) -> np.ndarray:
    """Our own reader: each contour filled at the voxel centres of the slice its SOPInstanceUID
    names, the contours of a slice combined by the even-odd rule (holes)."""
    number = next(r.ROINumber for r in rs.StructureSetROISequence if r.ROIName == roi_name)
    item = next(c for c in rs.ROIContourSequence if c.ReferencedROINumber == number)
    slice_of = {uid: k for k, uid in enumerate(ct.meta["sop_instance_uids"])}
    to_index = np.linalg.inv(LPS_TO_RAS @ ct.affine)
    mask = np.zeros(ct.shape, bool)
    for contour in item.get("ContourSequence", []):
        k = slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        lps = np.asarray(contour.ContourData, float).reshape(-1, 3)
        assert len(lps) == int(contour.NumberOfContourPoints)
        ijk = lps @ to_index[:3, :3].T + to_index[:3, 3]
        np.testing.assert_allclose(ijk[:, 2], k, atol=1e-3)  # every point lies on the slice it references
        # only the voxel centres in the contour's box can be inside it
        lo = np.maximum(np.floor(ijk[:, :2].min(0)).astype(int), 0)
        hi = np.minimum(np.ceil(ijk[:, :2].max(0)).astype(int) + 1, ct.shape[:2])
        box = np.stack(np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij"), -1)
        inside = Polygon(ijk[:, :2]).contains_points(box.reshape(-1, 2)).reshape(box.shape[:2])
        mask[lo[0]:hi[0], lo[1]:hi[1], k] ^= inside
    return mask


def rt_utils_mask(ct_folder: Path, rs_path: Path, roi_name: str) -> np.ndarray:
    """rt-utils' mask is (row, column, slice) in slice-position order; ours is (column, row, slice)."""
    rt_utils = pytest.importorskip("rt_utils")  # dev extra: only these checks need it
    rt = rt_utils.RTStructBuilder.create_from(str(ct_folder), str(rs_path))  # also checks the slice references
    return np.transpose(rt.get_roi_mask_by_name(roi_name), (1, 0, 2))


def assert_references(rs, ct: Volume) -> None:
    uids = ct.meta["sop_instance_uids"]
    assert rs.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and rs.Modality == "RTSTRUCT"
    # anonymous (the default): a study of its own, never the CT's study UID under the placeholder
    assert (rs.StudyInstanceUID == ct.meta["study_instance_uid"]) == (rs.PatientID != "CTPM-ANONYMOUS")
    frame = rs.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == ct.meta["frame_of_reference_uid"]
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == ct.meta["study_instance_uid"]
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == ct.meta["series_instance_uid"]
    assert [c.ReferencedSOPInstanceUID for c in series.ContourImageSequence] == uids
    assert all(r.ReferencedFrameOfReferenceUID == ct.meta["frame_of_reference_uid"] for r in rs.StructureSetROISequence)
    for item in rs.ROIContourSequence:
        for c in item.get("ContourSequence", []):
            assert c.ContourImageSequence[0].ReferencedSOPInstanceUID in uids
            assert c.ContourGeometricType == "CLOSED_PLANAR"


def assert_no_identity(ds, source_identity: dict) -> None:
    """Neither the source's name, ID nor birth date, anywhere in the dataset."""
    values = {str(v) for v in source_identity.values() if str(v)}
    found = []
    ds.walk(lambda _, elem: found.append(elem.keyword) if str(elem.value) in values else None)
    assert not found, f"identity copied into {found}"
    assert str(ds.PatientName) == "ANONYMOUS" and ds.PatientBirthDate == ""


def assert_perfusion_series(folder: Path, ct: Volume, perfusion: np.ndarray, source_identity: dict) -> None:
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == ct.shape[2]
    back = load_image(folder, kind="perfusion")
    np.testing.assert_allclose(back.affine, ct.affine, atol=1e-6)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    slope = float(first.RescaleSlope)
    assert np.abs(back.array - perfusion).max() <= slope / 2 + 1e-6 * np.abs(perfusion).max()
    assert back.meta["series_instance_uid"] != ct.meta["series_instance_uid"]
    assert back.meta["frame_of_reference_uid"] == ct.meta["frame_of_reference_uid"]
    assert back.meta["study_instance_uid"] != ct.meta["study_instance_uid"]  # anonymous: a study of its own
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"] and first.RescaleType == "US"
    for f, ct_file in zip(files, ct.meta["files"]):  # same slice positions as the CT, slice by slice
        ours, theirs = (pydicom.dcmread(p, stop_before_pixels=True) for p in (f, ct_file))
        np.testing.assert_allclose([float(v) for v in ours.ImagePositionPatient],
                                   [float(v) for v in theirs.ImagePositionPatient])
        assert ours.SourceImageSequence[0].ReferencedSOPInstanceUID == theirs.SOPInstanceUID
    assert_no_identity(first, source_identity)


# --------------------------------------------------------------------------------------------------
# A hand-written CT series
# --------------------------------------------------------------------------------------------------


def synthetic_rtstruct(tmp_path: Path, orientation: str) -> tuple[Volume, dict[str, np.ndarray], Path]:
    """A 4 x 3.2 cm elliptic blob through every slice and a ring (a hole in it) on a synthetic series."""
    ct = synthetic_ct(tmp_path / "ct", ORIENTATIONS[orientation])
    outer, inner = (ellipsoid(ct, (0.0, 0.0, 0.0), (r, r, 40.0)) for r in (26.0, 12.0))
    masks = {"Blob": ellipsoid(ct, (-4.0, 6.0, 0.0), (20.0, 16.0, 40.0)), "Ring": outer & ~inner}
    rois = [Roi(name, mask, (255, 0, 0)) for name, mask in masks.items()]
    return ct, masks, write_rtstruct(ct, rois, tmp_path / "out" / "rs.dcm")


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_rtstruct_on_a_synthetic_series(tmp_path, orientation):
    ct, masks, path = synthetic_rtstruct(tmp_path, orientation)
    rs = pydicom.dcmread(path)
    assert_references(rs, ct)
    assert_no_identity(rs, IDENTITY)
    assert [r.ROIName for r in rs.StructureSetROISequence] == ["Blob", "Ring"]
    # marching squares at 0.5 through the voxel edges: filling at the centres gives the mask back,
    # the ring's hole being a contour of its own
    for name, mask in masks.items():
        assert dice(rasterise(rs, name, ct), mask) >= 0.99


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_rtstruct_on_a_synthetic_series_read_by_rt_utils(tmp_path, orientation):
    # rt-utils rounds contour points to whole pixels and fills the outline's own pixels too, which
    # grows a shape by up to a pixel: a few cm at 1 mm still agree to 0.95 (0.97 here), hole included
    ct, masks, path = synthetic_rtstruct(tmp_path, orientation)
    for name, mask in masks.items():
        assert dice(rt_utils_mask(tmp_path / "ct", path, name), mask) >= 0.95


def test_perfusion_series_on_a_synthetic_series(tmp_path):
    ct = synthetic_ct(tmp_path / "ct", ORIENTATIONS["supine"])
    rng = np.random.default_rng(0)
    perfusion = (rng.uniform(0.0, 1.4, ct.shape) * (world_axes(ct)[0] > -10)).astype(np.float32)
    perfusion[0, 0, 0] = -0.05  # a CT-based map may dip below 0: the intercept takes it
    folder = write_perfusion_series(ct, perfusion, tmp_path / "perf")
    assert_perfusion_series(folder, ct, perfusion, IDENTITY)
    # written again: the folder is replaced as a whole, nothing temporary is left beside it
    write_perfusion_series(ct, perfusion, folder)
    assert len(list(folder.iterdir())) == ct.shape[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "perf"]


def test_identity_is_copied_only_when_asked(tmp_path):
    ct = synthetic_ct(tmp_path / "ct", ORIENTATIONS["supine"])
    blob = ellipsoid(ct, (0.0, 0.0, 0.0), (15.0, 15.0, 30.0))
    rs = pydicom.dcmread(write_rtstruct(ct, [Roi("Blob", blob, (255, 0, 0))], tmp_path / "rs.dcm", identity="copy"))
    assert rs.PatientID == IDENTITY["PatientID"] and rs.PatientBirthDate == IDENTITY["PatientBirthDate"]
    with pytest.raises(CtpmError, match="dicom_identity must be one of anonymous, copy"):
        write_rtstruct(ct, [Roi("Blob", blob, (255, 0, 0))], tmp_path / "rs2.dcm", identity="keep")


@pytest.mark.parametrize("mode", ["anonymous", "copy"])
def test_prediction_export_identity_read_back(tmp_path, mode):
    """copy: the CT's patient and study modules, for a direct import; anonymous: the placeholder in
    a fresh study shared by the structure set and the perfusion series. Both keep the CT's frame of
    reference and carry the whole-lung ROI."""
    ct = synthetic_ct(tmp_path / "ct", ORIENTATIONS["supine"])
    src = pydicom.dcmread(ct.meta["files"][0], stop_before_pixels=True)
    lungs = ellipsoid(ct, (0.0, 0.0, 0.0), (25.0, 20.0, 40.0))
    functional = np.where(lungs, np.where(world_axes(ct)[1] > 0, 2, 1), 0)
    perfusion = np.where(lungs, 0.8, 0.0).astype(np.float32)
    files = write_prediction_dicom(tmp_path / "ct", perfusion, functional, ct.affine, tmp_path / "out", "P1",
                                   lungs=lungs.astype(np.uint8) * np.where(world_axes(ct)[0] > 0, 1, 2),
                                   identity=mode)
    rs = pydicom.dcmread(files["rtstruct"])
    series = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(files["perfusion_dicom"].glob("*.dcm"))]
    assert [r.ROIName for r in rs.StructureSetROISequence] == ["Lungs_FuncHigh", "Lungs_FuncLow", "Lungs_CTPM"]
    assert dice(rasterise(rs, "Lungs_CTPM", ct), lungs) >= 0.99
    for ds in [rs, *series]:
        if mode == "copy":
            for key in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID"):
                assert str(ds.get(key)) == str(src.get(key)), key
        else:
            assert str(ds.PatientName) == "ANONYMOUS" and ds.PatientID == "CTPM-ANONYMOUS"
            assert ds.StudyInstanceUID != src.StudyInstanceUID
            assert ds.PatientBirthDate == "" and ds.get("StudyID", "") == "" and ds.get("AccessionNumber", "") == ""
    assert len({ds.StudyInstanceUID for ds in [rs, *series]}) == 1  # one study for the patient's objects
    assert all(ds.FrameOfReferenceUID == ct.meta["frame_of_reference_uid"] for ds in series)
    assert rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == ct.meta["frame_of_reference_uid"]


def test_prediction_export_files_and_refusals(tmp_path):
    ct = synthetic_ct(tmp_path / "ct", ORIENTATIONS["supine"])
    anterior = np.broadcast_to(world_axes(ct)[1], ct.shape)
    perfusion = np.clip(anterior / 30.0 + 0.6, 0, 1.2).astype(np.float32)
    functional = np.where(ellipsoid(ct, (0.0, 0.0, 0.0), (25.0, 20.0, 40.0)), np.where(perfusion >= 0.66, 2, 1), 0)
    files = write_prediction_dicom(tmp_path / "ct", perfusion, functional, ct.affine, tmp_path / "out", "P1")
    assert files["rtstruct"] == tmp_path / "out" / "P1_rtstruct.dcm"
    assert files["perfusion_dicom"] == tmp_path / "out" / "P1_perfusion_dicom"
    rs = pydicom.dcmread(files["rtstruct"])
    assert [r.ROIName for r in rs.StructureSetROISequence] == ["Lungs_FuncHigh", "Lungs_FuncLow"]
    assert dice(rasterise(rs, "Lungs_FuncHigh", ct), functional == 2) >= 0.99
    assert dice(rasterise(rs, "Lungs_FuncLow", ct), functional == 1) >= 0.99
    with pytest.raises(CtpmError, match="not on the grid of this DICOM CT"):
        write_prediction_dicom(tmp_path / "ct", perfusion[:, :, :-1], functional[:, :, :-1], ct.affine,
                               tmp_path / "out", "P1")
    nifti = save_nifti(np.full((8, 8, 8), -1000.0), np.eye(4), tmp_path / "ct.nii.gz")
    with pytest.raises(CtpmError, match="needs the CT as a DICOM series") as err:
        write_prediction_dicom(nifti, np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), np.eye(4), tmp_path / "out", "P2")
    assert err.value.patient == "P2" and err.value.path == str(nifti)


# --------------------------------------------------------------------------------------------------
# The real chest CT
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_export(real_ct, tmp_path_factory) -> dict:
    """The real CT, a 5 cm blob in its right lung, and the RT Structure Set and perfusion series
    written for them."""
    ct = load_dicom_ct(real_ct)
    out = tmp_path_factory.mktemp("real_export")
    source = pydicom.dcmread(ct.meta["files"][0], stop_before_pixels=True)
    # 10 cm right of the scan's centre, 20 cm above its lowest slice
    lo, hi = ct.world_bounds()
    centre = ((lo[0] + hi[0]) / 2 - 100.0, (lo[1] + hi[1]) / 2, lo[2] + 200.0)
    blob = ellipsoid(ct, centre, (25.0, 25.0, 25.0))
    perfusion = np.where(blob, 0.9, 0.0).astype(np.float32)
    return {"ct": ct, "folder": real_ct, "blob": blob, "perfusion": perfusion,
            "identity": {k: source.get(k, "") for k in ("PatientName", "PatientID", "PatientBirthDate")},
            "rtstruct": write_rtstruct(ct, [Roi("Blob", blob, (255, 0, 0))], out / "rs.dcm"),
            "series": write_perfusion_series(ct, perfusion, out / "perf")}


def test_real_ct_rtstruct(real_export):
    ct, blob = real_export["ct"], real_export["blob"]
    assert np.mean(ct.array[blob] < -500) > 0.9  # the blob lies in lung air
    rs = pydicom.dcmread(real_export["rtstruct"])
    assert_references(rs, ct)
    assert_no_identity(rs, real_export["identity"])
    assert dice(rasterise(rs, "Blob", ct), blob) >= 0.99


def test_real_ct_rtstruct_read_by_rt_utils(real_export):
    mask = rt_utils_mask(real_export["folder"], real_export["rtstruct"], "Blob")
    assert dice(mask, real_export["blob"]) >= 0.95


def test_real_ct_perfusion_series(real_export):
    assert_perfusion_series(real_export["series"], real_export["ct"], real_export["perfusion"],
                            real_export["identity"])
