"""DICOM out, for the treatment planning system (TPS): functional volumes and the perfusion map.

When the CT came as a DICOM series, the planner imports two objects beside it, both in the CT's
frame of reference, so the TPS overlays them on the planning CT without a registration:

- an **RT Structure Set** with the high and low functional lung volumes and the whole lungs the
  prediction used (``Lungs_CTPM``) as ROIs, one closed planar
  contour per connected outline per CT slice, each referencing that slice's SOPInstanceUID. The
  outlines are traced by marching squares at the 0.5 level of the mask (``contourpy``, which
  matplotlib already depends on), so they pass half-way between voxels inside and outside; a
  hole is its own contour on the same slice, which TPSs and readers combine by the even-odd
  (XOR) rule. Points on straight runs are dropped (lossless, and lighter for the TPS to draw and edit).
- the **perfusion map as a CT image series**: one single-frame image per CT slice with the CT
  slice's ImagePositionPatient, ImageOrientationPatient and PixelSpacing, a new SeriesInstanceUID,
  unsigned 16-bit stored values and a RescaleSlope/Intercept for the float perfusion, RescaleType
  "US" (unspecified: not HU). CT Image Storage, rather than Secondary Capture (no geometry: a TPS
  cannot place it) or a Parametric Map (floats, but multi-frame with per-frame geometry that few
  TPSs import), because every TPS imports a CT series and fuses it with the planning CT through
  the shared FrameOfReferenceUID. ImageType DERIVED\\SECONDARY and the series description say
  it is not an image to calculate dose on.

Identity (``dicom_identity``, ctpm-predict's ``dicom_identity=``):

- ``anonymous`` (default): a fixed placeholder patient (ANONYMOUS / CTPM-ANONYMOUS) in a study of
  its own (a fresh StudyInstanceUID shared by the objects of one patient, no study date, ID or
  accession number). Never the CT's StudyInstanceUID under the placeholder: a TPS or PACS may
  refuse, or merge, one study UID under two patient IDs. For a research copy or a TPS that
  accepts objects of an unknown patient and fuses them by frame of reference.
- ``copy``: the CT's patient and study modules (PatientName, PatientID, PatientBirthDate,
  PatientSex, StudyInstanceUID, StudyID, StudyDate, StudyTime, AccessionNumber,
  ReferringPhysicianName, StudyDescription), so that the TPS files the objects with the planning
  CT: the direct clinical import.

Either way the CT's Frame of Reference UID and the references to its study, series and slices
(``ReferencedFrameOfReferenceSequence`` with its ``RTReferencedStudySequence``,
``ContourImageSequence``, ``SourceImageSequence``) are kept: the overlay and the contours need them,
and a reference names the CT's study without filing the object in it.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctpm.data.io import Volume, atomic_directory, atomic_path, load_image
from ctpm.errors import CtpmError, warn
from ctpm.geometry import LPS_TO_RAS

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# RTReferencedStudySequence refers to the study through this (retired) SOP class, as TPS exports do.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
PLACEHOLDER = {"PatientName": "ANONYMOUS", "PatientID": "CTPM-ANONYMOUS", "PatientBirthDate": "", "PatientSex": ""}
IDENTITY = tuple(PLACEHOLDER)
STUDY_IDENTITY = ("StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription")
IDENTITY_MODES = ("anonymous", "copy")
LUNGS_ROI = ("Lungs_CTPM", (0, 200, 120), "ctpm: the lungs the prediction used (right and left)")
# Labels of the functional map that ctpm-predict writes (ctpm.lightning.predictor: LOW, HIGH).
FUNCTIONAL_ROIS = (
    (2, "Lungs_FuncHigh", (255, 80, 0), "ctpm: perfusion at or above the threshold"),
    (1, "Lungs_FuncLow", (0, 120, 255), "ctpm: perfusion below the threshold"),
)
STORED_MAX = 65535  # unsigned 16-bit stored values of the perfusion images
# What a perfusion image takes from its CT slice, so that both lie exactly on each other (and the
# patient's position on the table, which the CT IOD asks of every image).
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation",
            "PatientPosition")
# High series numbers list the derived series after the scanner's in a TPS.
PERFUSION_SERIES_NUMBER, RTSTRUCT_SERIES_NUMBER = 9001, 9002


@dataclass(frozen=True)
class Roi:
    """One structure: a mask on the CT grid (I, J, K), a name (<= 16 characters, TG-263 style), a
    display colour (RGB 0-255) and what it is."""

    name: str
    mask: np.ndarray
    colour: tuple[int, int, int]
    description: str = ""
    interpreted_type: str = "ORGAN"


# --------------------------------------------------------------------------------------------------
# What ctpm-predict calls
# --------------------------------------------------------------------------------------------------


def write_prediction_dicom(ct_path: str | Path, perfusion: np.ndarray, functional: np.ndarray,
                           affine: np.ndarray, out: str | Path, patient_id: str, *,
                           lungs: np.ndarray | None = None, identity: str = "anonymous") -> dict[str, Path]:
    """``<out>/<id>_rtstruct.dcm`` (high / low functional volumes and, with `lungs`, the whole lungs
    as ``Lungs_CTPM``) and ``<out>/<id>_perfusion_dicom/`` for a prediction on the grid of the DICOM
    CT at `ct_path` (perfusion, functional, lungs and affine as ``ctpm.lightning.predictor.Prediction``
    holds them). identity: "anonymous" or "copy" (see the module's docstring); both objects share it."""
    ct = load_dicom_ct(ct_path, patient=patient_id)
    if ct.shape != tuple(functional.shape) or not np.allclose(ct.affine, affine, atol=1e-3):
        raise CtpmError("the prediction is not on the grid of this DICOM CT", patient=patient_id, path=ct_path)
    out = Path(out)
    rois = [Roi(name, functional == label, colour, text) for label, name, colour, text in FUNCTIONAL_ROIS]
    if lungs is not None:
        rois.append(Roi(LUNGS_ROI[0], np.asarray(lungs) > 0, LUNGS_ROI[1], LUNGS_ROI[2]))
    ident = dicom_identity(ct, identity)
    return {
        "rtstruct": write_rtstruct(ct, rois, out / f"{patient_id}_rtstruct.dcm", identity=ident),
        "perfusion_dicom": write_perfusion_series(ct, perfusion, out / f"{patient_id}_perfusion_dicom",
                                                  identity=ident),
    }


def load_dicom_ct(path: str | Path, *, patient: str | None = None) -> Volume:
    """The CT with what the references need: a DICOM series of single-frame slices."""
    ct = load_image(path, kind="ct", patient=patient)
    if ct.meta.get("format") != "dicom":
        raise CtpmError("DICOM export needs the CT as a DICOM series (this one is NIfTI)", patient=patient, path=path)
    if len(ct.meta.get("sop_instance_uids", [])) != ct.shape[2]:
        raise CtpmError("DICOM export needs a CT of one file per slice (multi-frame CTs are not supported)",
                        patient=patient, path=path)
    return ct


# --------------------------------------------------------------------------------------------------
# Contours
# --------------------------------------------------------------------------------------------------


def slice_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2-D mask (I, J) as (M, 2) arrays of continuous (i, j) voxel indices,
    without the repeated last point and without points on straight runs."""
    import contourpy

    # Zero padding closes outlines that touch the grid's edge.
    padded = np.pad(np.asarray(mask2d, np.float64), 1)
    gen = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    out = []
    for line in gen.lines(0.5):
        pts = np.asarray(line, np.float64)
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]
        ij = pts[:, ::-1] - 1.0  # contourpy gives (x = axis 1, y = axis 0) of the padded array
        ij = _drop_collinear(ij)
        if len(ij) >= 3:
            out.append(ij)
    return out


def _drop_collinear(pts: np.ndarray) -> np.ndarray:
    before, after = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
    a, b = pts - before, after - pts
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    return pts[np.abs(cross) > 1e-9]


def mask_contours(mask: np.ndarray, affine: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(slice k, (M, 3) patient LPS mm) for every outline of every axial slice of a mask (I, J, K)
    on a grid with the RAS `affine`."""
    lps_affine = LPS_TO_RAS @ affine  # LPS_TO_RAS is its own inverse
    out = []
    for k in np.nonzero(np.asarray(mask).any(axis=(0, 1)))[0]:
        for ij in slice_contours(mask[:, :, k]):
            ijk = np.column_stack([ij, np.full(len(ij), float(k))])
            out.append((int(k), ijk @ lps_affine[:3, :3].T + lps_affine[:3, 3]))
    return out


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


def write_rtstruct(ct: Volume, rois: Sequence[Roi], path: str | Path, *, identity: str | dict = "anonymous",
                   label: str = "CTPM") -> Path:
    """An RT Structure Set of `rois` (masks on the CT grid) that references the DICOM CT `ct` (a
    Volume from ``load_dicom_ct``): its study, series, frame of reference and, per contour, slice.
    identity: "anonymous", "copy" or a dict from ``dicom_identity``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    path = Path(path)
    uids = ct.meta["sop_instance_uids"]
    ct_class = ct.meta.get("sop_class_uid") or CT_IMAGE_STORAGE
    frame_uid = ct.meta["frame_of_reference_uid"]
    ds = _new_dataset(ct, RT_STRUCTURE_SET_STORAGE, "RTSTRUCT", _as_identity(ct, identity))
    ds.SeriesNumber = RTSTRUCT_SERIES_NUMBER
    ds.SeriesDescription = "CTPM functional lung volumes"
    ds.StructureSetLabel = label
    ds.StructureSetName = "functional lung"
    ds.StructureSetDate, ds.StructureSetTime = ds.InstanceCreationDate, ds.InstanceCreationTime

    def image_ref(uid: str) -> Dataset:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ct_class
        ref.ReferencedSOPInstanceUID = uid
        return ref

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = ct.meta["series_instance_uid"]
    series_ref.ContourImageSequence = DicomSequence([image_ref(u) for u in uids])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study_ref.ReferencedSOPInstanceUID = ct.meta["study_instance_uid"]
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_uid
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])

    structure_rois, roi_contours, observations = [], [], []
    for number, roi in enumerate(rois, start=1):
        if roi.mask.shape != ct.shape:
            raise CtpmError(f"ROI {roi.name}: mask has shape {roi.mask.shape}, the CT {ct.shape}")
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = frame_uid
        item.ROIName = roi.name
        item.ROIDescription = roi.description
        item.ROIGenerationAlgorithm = "AUTOMATIC"
        structure_rois.append(item)

        contour_item = Dataset()
        contour_item.ROIDisplayColor = list(roi.colour)
        contour_item.ReferencedROINumber = number
        contours = []
        for k, lps in mask_contours(roi.mask, ct.affine):
            c = Dataset()
            c.ContourImageSequence = DicomSequence([image_ref(uids[k])])
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(lps)
            c.ContourData = [f"{v:.3f}" for v in lps.ravel()]  # 1 µm: far below any voxel, fits DS
            contours.append(c)
        if contours:
            contour_item.ContourSequence = DicomSequence(contours)
        else:
            warn(f"ROI {roi.name} is empty; it is written without contours")
        roi_contours.append(contour_item)

        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = roi.interpreted_type
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(structure_rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"  # automatic contours: a person reviews them in the TPS
    return _save_atomic(ds, path)


def write_perfusion_series(ct: Volume, perfusion: np.ndarray, folder: str | Path, *,
                           identity: str | dict = "anonymous",
                           description: str = "CTPM perfusion (1 = normal lung), not for dose calculation") -> Path:
    """The perfusion map (I, J, K) on the grid of the DICOM CT `ct` as a CT image series, one file
    per CT slice, in `folder` (replaced as a whole: written beside it and renamed).

    Values are stored as unsigned 16-bit with one RescaleSlope/Intercept for the whole series
    (value = stored x slope + intercept), so a read-back is exact to slope / 2 (about 1e-5 for a
    map up to 1.5); a viewer shows 0..1 by default (WindowCenter 0.5, WindowWidth 1).
    """
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    folder = Path(folder)
    values = np.asarray(perfusion, np.float32)
    if values.shape != ct.shape:
        raise CtpmError(f"perfusion has shape {values.shape}, the CT {ct.shape}")
    if not np.all(np.isfinite(values)):
        raise CtpmError("perfusion holds NaN or infinite values")
    # The DS strings are what a reader gets; quantise with their parsed values, not the floats.
    intercept = float(_ds(min(0.0, float(values.min()))))
    span = float(values.max()) - intercept
    slope = float(_ds(span / STORED_MAX)) if span > 0 else 1.0
    # float32 resolves (value - intercept) / slope <= 65535 to 0.004, well within the rounding
    stored = np.clip(np.rint((values - intercept) / slope), 0, STORED_MAX).astype(np.uint16)
    frames = np.ascontiguousarray(stored.transpose(2, 1, 0))  # (i = col, j = row, k) -> (k, row, col)

    series_uid, identity = generate_uid(), _as_identity(ct, identity)
    with atomic_directory(folder) as tmp:
        for k, (src_file, ct_uid) in enumerate(zip(ct.meta["files"], ct.meta["sop_instance_uids"], strict=True)):
            src = pydicom.dcmread(src_file, stop_before_pixels=True, specific_tags=list(GEOMETRY))
            ds = _new_dataset(ct, CT_IMAGE_STORAGE, "CT", identity, series_uid=series_uid)
            ds.SeriesNumber = PERFUSION_SERIES_NUMBER
            ds.SeriesDescription = description
            ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
            ds.DerivationDescription = "CT-to-perfusion mapping (ctpm): perfusion standardised to normal lung = 1"
            source = Dataset()
            source.ReferencedSOPClassUID = ct.meta.get("sop_class_uid") or CT_IMAGE_STORAGE
            source.ReferencedSOPInstanceUID = ct_uid
            ds.SourceImageSequence = [source]
            ds.FrameOfReferenceUID = ct.meta["frame_of_reference_uid"]
            ds.PositionReferenceIndicator = ""
            for key in GEOMETRY:
                if key in src:
                    setattr(ds, key, src[key].value)
            ds.InstanceNumber = k + 1
            ds.KVP = ""
            ds.AcquisitionNumber = ""
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = ct.shape[1], ct.shape[0]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(intercept), _ds(slope), "US"
            ds.WindowCenter, ds.WindowWidth = "0.5", "1"
            ds.PixelData = frames[k].tobytes()
            ds.save_as(tmp / f"perfusion_{k + 1:04d}.dcm", enforce_file_format=True)
    return folder


# --------------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------------


def _ds(value: float) -> str:
    """A decimal string that fits DICOM's 16-character DS."""
    return f"{float(value):.10g}"


def dicom_identity(ct: Volume, mode: str = "anonymous") -> dict:
    """Patient and study modules of the new objects (StudyInstanceUID included): "anonymous" the
    placeholder in a fresh study, "copy" the CT's own (see the module's docstring)."""
    from pydicom.uid import generate_uid

    if mode not in IDENTITY_MODES:
        raise CtpmError(f"dicom_identity must be one of {', '.join(IDENTITY_MODES)}, not {mode!r}")
    if mode == "anonymous":
        return dict(PLACEHOLDER) | {k: "" for k in STUDY_IDENTITY} | {"StudyInstanceUID": generate_uid()}
    import pydicom

    src = pydicom.dcmread(ct.meta["files"][0], stop_before_pixels=True)
    own = {k: src.get(k, "") for k in (*IDENTITY, *STUDY_IDENTITY)}
    return own | {"StudyInstanceUID": ct.meta["study_instance_uid"]}


def _as_identity(ct: Volume, identity: str | dict) -> dict:
    return dict(identity) if isinstance(identity, dict) else dicom_identity(ct, identity)


def _new_dataset(ct: Volume, sop_class: str, modality: str, identity: dict, series_uid: str | None = None):
    """The modules every object shares: SOP common, patient, study (`identity`'s), series, equipment."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.Modality = modality
    ds.Manufacturer = "ctpm"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.OperatorsName = ""
    for key, value in identity.items():
        setattr(ds, key, value)
    return ds


def _save_atomic(ds, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------------
# Reading a plan's RT Structure Set back onto the CT grid
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StructureSet:
    """An RT Structure Set as far as rasterising it needs: its frame of reference and, per ROI
    name, the contours ((M, 3) patient LPS mm, closed planar)."""

    path: Path
    frame_of_reference_uid: str
    contours: dict[str, list[np.ndarray]]


def read_structure_set(path: str | Path, *, patient: str | None = None) -> StructureSet:
    """The ROIs and frame of reference of an RT Structure Set file (the plan's ``RS*.dcm``)."""
    import pydicom

    path = Path(path)
    if not path.is_file():
        raise CtpmError("RT Structure Set file does not exist", patient=patient, path=path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        raise CtpmError(f"cannot read the DICOM file ({type(exc).__name__}: {exc})", patient=patient,
                        path=path) from None
    if ds.get("Modality") != "RTSTRUCT":
        raise CtpmError(f"not an RT Structure Set (Modality {ds.get('Modality', 'missing')})", patient=patient,
                        path=path)
    frames = {str(f.FrameOfReferenceUID) for f in ds.get("ReferencedFrameOfReferenceSequence", [])}
    frames |= {str(r.ReferencedFrameOfReferenceUID) for r in ds.get("StructureSetROISequence", [])
               if "ReferencedFrameOfReferenceUID" in r}
    if len(frames) != 1:
        raise CtpmError(f"the RT Structure Set names {len(frames)} frames of reference; one is needed",
                        patient=patient, path=path)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    contours: dict[str, list[np.ndarray]] = {name: [] for name in names.values()}
    for item in ds.get("ROIContourSequence", []):
        name = names.get(int(item.ReferencedROINumber))
        if name is None:
            continue
        for c in item.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
                continue  # points and open lines enclose no volume
            contours[name].append(np.asarray([float(v) for v in c.ContourData], np.float64).reshape(-1, 3))
    return StructureSet(path, frames.pop(), contours)


def rasterise_rois(structures: StructureSet, names: Sequence[str], grid_affine: np.ndarray,
                   shape: Sequence[int], *, patient: str | None = None) -> np.ndarray:
    """The union of the ROIs `names` as a mask on an axial grid (I, J, K) with the RAS `grid_affine`:
    each contour filled at the voxel centres of its slice, the contours of one ROI on one slice
    combined by the even-odd rule (a hole is a contour inside another), as TPSs read them. A
    contour lies on the slice nearest its plane; one more than a quarter voxel off every slice is
    refused (the structures belong to another CT)."""
    from matplotlib.path import Path as Polygon

    shape = tuple(int(n) for n in shape)
    missing = [n for n in names if n not in structures.contours]
    if missing:
        raise CtpmError(f"the RT Structure Set has no ROI {', '.join(map(repr, missing))}; it holds "
                        f"{', '.join(map(repr, sorted(structures.contours))) or 'none'}",
                        patient=patient, path=structures.path)
    to_index = np.linalg.inv(LPS_TO_RAS @ np.asarray(grid_affine, np.float64))
    out = np.zeros(shape, bool)
    for name in names:
        if not structures.contours[name]:
            raise CtpmError(f"ROI {name!r} has no closed contours", patient=patient, path=structures.path)
        roi = np.zeros(shape, bool)
        for lps in structures.contours[name]:
            ijk = lps @ to_index[:3, :3].T + to_index[:3, 3]
            k = int(np.rint(ijk[:, 2].mean()))
            if np.max(np.abs(ijk[:, 2] - k)) > 0.25 or not 0 <= k < shape[2]:
                raise CtpmError(f"ROI {name!r} has a contour off the CT's slices (at slice index "
                                f"{ijk[:, 2].mean():.2f}); are these the structures of this CT?",
                                patient=patient, path=structures.path)
            # only the centres in the contour's box can lie inside it
            lo = np.maximum(np.floor(ijk[:, :2].min(0)).astype(int), 0)
            hi = np.minimum(np.ceil(ijk[:, :2].max(0)).astype(int) + 1, shape[:2])
            if np.any(hi <= lo):
                continue
            box = np.stack(np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij"), -1)
            inside = Polygon(ijk[:, :2]).contains_points(box.reshape(-1, 2)).reshape(box.shape[:2])
            roi[lo[0]:hi[0], lo[1]:hi[1], k] ^= inside
        out |= roi
    return out
