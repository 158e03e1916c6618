"""From a DICOM export (a folder tree of CT, NM/SPECT, RT structure sets, scouts, several patients and
studies mixed) to a cohort manifest.

Only headers are read (``dcmread(stop_before_pixels=True)`` with the few tags needed), so a tree of
thousands of files is indexed in seconds. Per patient:

- the **CT**: an axial CT image series that is not a scout (``ImageType`` LOCALIZER), has one
  orientation, and covers the lungs (its slices span at least ``min_z_extent_mm`` along the slice
  normal). Of several candidates, one with a perfusion SPECT beside it wins, then the thinnest slice
  spacing; two equal candidates are refused (the patient is skipped, both named).
- the **SPECT**: a reconstructed NM series sharing the CT's FrameOfReferenceUID, else one of the
  CT's study. None: a CT-only row (``spect`` empty), which ``ctpm-predict`` uses.
- **lungs and lobes** from an RT Structure Set that references the CT series (else shares its frame
  of reference): ROI names are matched by a configurable map of aliases; the contours are rasterised
  onto the CT grid (``<id>_lobes.nii.gz``: 1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL; ``<id>_lung_mask.nii.gz``:
  1 right, 2 left).
- the **plan dose**: an RT Dose (DoseSummationType not of one beam or fraction, in Gy) in the CT's
  frame of reference, as the ``dose`` column that ``ctpm-flart`` reads.

Everything not used goes to a skip table with the reason. Patient ids in the manifest are safe file
names: a salted hash of the DICOM PatientID by default, or a mapping from a CSV; raw PatientIDs only
when asked for.

The manifest's ``ct`` (and ``spect``) is the series' own folder when that folder holds no other
image series (``ctpm.data.io.read_dicom_series`` reads every file under it); otherwise a folder of
links to the series' files is made beside the manifest (``series/<id>/ct``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctpm.data.io import atomic_directory, atomic_write, frame_attribute, save_nifti
from ctpm.data.manifest import COHORTS, safe_id, write_manifest
from ctpm.errors import CtpmError
from ctpm.geometry import LPS_TO_RAS, dicom_affine

LOBE_LABELS = {"LUL": 1, "LLL": 2, "RUL": 3, "RML": 4, "RLL": 5}  # as ctpm.evaluation.flart reads them
RIGHT, LEFT = 1, 2  # as ctpm.data.lungs
RIGHT_LOBES, LEFT_LOBES = ("RUL", "RML", "RLL"), ("LUL", "LLL")
# The ROI names of a typical planning export (TG-263 and common vendor spellings); config roi_names replaces it.
DEFAULT_ROI_NAMES: dict[str, list[str]] = {
    "LUL": ["LUL", "Lung_L_Upper", "Lung_LUL", "Left upper lobe", "LungUpperLobeL"],
    "LLL": ["LLL", "Lung_L_Lower", "Lung_LLL", "Left lower lobe", "LungLowerLobeL"],
    "RUL": ["RUL", "Lung_R_Upper", "Lung_RUL", "Right upper lobe", "LungUpperLobeR"],
    "RML": ["RML", "Lung_R_Middle", "Lung_RML", "Right middle lobe", "LungMiddleLobeR"],
    "RLL": ["RLL", "Lung_R_Lower", "Lung_RLL", "Right lower lobe", "LungLowerLobeR"],
    "right": ["Lung_R", "Right lung", "Lung right", "RLung", "Lung_Right"],
    "left": ["Lung_L", "Left lung", "Lung left", "LLung", "Lung_Left"],
}
# RT Dose summation types that are a part of the plan's dose (as ctpm.evaluation.flart refuses them)
PARTIAL_DOSE_TYPES = ("BEAM", "FRACTION", "CONTROL_POINT", "BEAM_SESSION", "FRACTION_SESSION", "BRACHY_SESSION")
# NM image types that are not a reconstructed 3-D SPECT
_NM_NOT_RECON = {"STATIC", "WHOLE BODY", "DYNAMIC", "GATED"}
SKIP_COLUMNS = ("patient_id", "modality", "series_description", "series_uid", "path", "reason")


@dataclass
class Series:
    """What the headers say about one series (or one RT structure set file)."""

    uid: str
    patient: str  # the DICOM PatientID (never written out)
    study: str
    frame: str
    modality: str
    description: str
    image_types: set[str] = field(default_factory=set)
    files: list[Path] = field(default_factory=list)
    headers: list[Any] = field(default_factory=list)

    @property
    def is_image(self) -> bool:
        return all("Rows" in h for h in self.headers)

    @property
    def frames(self) -> int:
        return sum(int(h.get("NumberOfFrames", 1) or 1) for h in self.headers)


@dataclass
class CtGeometry:
    """The grid that ``ctpm.data.io.read_dicom_series`` builds from a slice series, from headers only."""

    shape: tuple[int, int, int]
    affine: np.ndarray  # voxel -> RAS mm
    sop_uids: list[str]
    step_mm: float
    extent_mm: float


@dataclass
class Skip:
    patient_id: str
    series: Series | None
    path: str
    reason: str

    def row(self) -> dict[str, str]:
        s = self.series
        return {"patient_id": self.patient_id, "modality": s.modality if s else "",
                "series_description": s.description if s else "", "series_uid": s.uid if s else "",
                "path": self.path, "reason": self.reason}


# --------------------------------------------------------------------------------------------------
# Indexing the tree
# --------------------------------------------------------------------------------------------------


def scan(root: str | Path, *, progress: bool = False) -> tuple[list[Series], list[Path], list[tuple[Path, str]]]:
    """Every DICOM series under `root` from its headers; also the files that are not DICOM and those
    whose header cannot be read (with why)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from tqdm.auto import tqdm

    root = Path(root)
    if not root.is_dir():
        raise CtpmError("DICOM folder does not exist", path=root)
    bar = tqdm(desc="ctpm-manifest: headers", unit="file", disable=not progress)
    series: dict[str, Series] = {}
    not_dicom: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    n_files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            f = Path(dirpath) / name
            n_files += 1
            bar.update()
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except InvalidDicomError:
                not_dicom.append(f)
                continue
            except Exception as exc:  # noqa: BLE001 - a truncated or damaged header
                unreadable.append((f, f"unreadable DICOM header ({type(exc).__name__})"))
                continue
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            if not uid:
                unreadable.append((f, "no SeriesInstanceUID"))
                continue
            modality = str(ds.get("Modality", "") or "").upper()
            # RT objects are one file each, several in one series (e.g. a dose per beam)
            key = uid if modality not in ("RTSTRUCT", "RTDOSE") else f"{uid}/{ds.get('SOPInstanceUID', f)}"
            s = series.get(key)
            if s is None:
                s = series[key] = Series(uid=uid, patient=str(ds.get("PatientID", "") or ""),
                                         study=str(ds.get("StudyInstanceUID", "") or ""),
                                         frame=str(ds.get("FrameOfReferenceUID", "") or ""), modality=modality,
                                         description=str(ds.get("SeriesDescription", "") or ""))
            s.files.append(f)
            s.headers.append(ds)
            s.image_types |= {str(v).upper() for v in (ds.get("ImageType") or [])}
            if not s.frame and modality == "RTSTRUCT":
                refs = ds.get("ReferencedFrameOfReferenceSequence") or []
                s.frame = str(refs[0].get("FrameOfReferenceUID", "")) if refs else ""
    bar.close()
    if n_files == 0:
        raise CtpmError("DICOM folder holds no files", path=root)
    if not series:
        raise CtpmError(f"no DICOM files found among {n_files} file(s) ({len(unreadable)} unreadable)", path=root)
    return list(series.values()), not_dicom, unreadable


def ct_geometry(s: Series) -> CtGeometry:
    """The RAS grid of a CT series (single-frame slices or one Enhanced CT file), as
    ``read_dicom_series`` stacks it (columns i, rows j, slices k along the normal of the rows and
    columns), or a CtpmError why it is no axial volume."""
    hs = s.headers
    if len(hs) == 1 and int(hs[0].get("NumberOfFrames", 1) or 1) > 1 and "PerFrameFunctionalGroupsSequence" in hs[0]:
        return _enhanced_geometry(hs[0])
    if any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in hs):
        raise CtpmError("multi-frame CT that is neither one Enhanced CT file nor single-frame slices")
    if any("ImageOrientationPatient" not in h or "ImagePositionPatient" not in h for h in hs):
        raise CtpmError("slices carry no ImagePositionPatient/ImageOrientationPatient")
    iops = np.array([[float(v) for v in h.ImageOrientationPatient] for h in hs])
    if not np.allclose(iops, iops[0], atol=1e-4):
        raise CtpmError("mixed orientations (slices of more than one orientation)")
    if len({(int(h.Rows), int(h.Columns)) for h in hs}) > 1:
        raise CtpmError("slices of different sizes")
    spacing = {tuple(float(v) for v in h.PixelSpacing) for h in hs if "PixelSpacing" in h}
    if len(spacing) != 1:
        raise CtpmError("slices without PixelSpacing or of different pixel sizes")
    pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in hs])
    return _stack(iops[0], pos, int(hs[0].Rows), int(hs[0].Columns), spacing.pop(),
                  [str(h.get("SOPInstanceUID", "")) for h in hs], order_uids=True)


def _enhanced_geometry(ds) -> CtGeometry:
    """The grid of an Enhanced CT file, as ``read_dicom_series`` stacks its frames (by position)."""
    n = int(ds.NumberOfFrames)
    try:
        iops = np.array([[float(v) for v in frame_attribute(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient")]
                         for k in range(n)])
        pos = np.array([[float(v) for v in frame_attribute(ds, k, "PlanePositionSequence", "ImagePositionPatient")]
                        for k in range(n)])
        dr, dc = (float(v) for v in frame_attribute(ds, 0, "PixelMeasuresSequence", "PixelSpacing"))
    except (TypeError, ValueError, IndexError):
        raise CtpmError("Enhanced CT lacks a frame's position, orientation or pixel spacing") from None
    if not np.allclose(iops, iops[0], atol=1e-4):
        raise CtpmError("mixed orientations (frames of more than one orientation)")
    return _stack(iops[0], pos, int(ds.Rows), int(ds.Columns), (dr, dc), [str(ds.get("SOPInstanceUID", ""))])


def _stack(iop: np.ndarray, pos: np.ndarray, rows: int, cols: int, spacing, sop_uids: list[str],
           order_uids: bool = False) -> CtGeometry:
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(normal[2]) < 0.9:
        raise CtpmError(f"not axial (slice normal {np.round(normal, 2).tolist()})")
    if len(pos) < 2:
        raise CtpmError("a single slice")
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    if np.any(np.abs(steps) < 1e-3):
        raise CtpmError("two slices at the same position (several stacks or time points)")
    med = float(np.median(steps))
    if np.max(np.abs(steps - med)) > 0.1 * abs(med) + 1e-3:
        raise CtpmError("slices not evenly spaced (missing slices?)")
    affine = dicom_affine(iop, pos[order[0]], spacing, (pos[order[-1]] - pos[order[0]]) / (len(pos) - 1))
    return CtGeometry(shape=(cols, rows, len(pos)), affine=affine,
                      sop_uids=[sop_uids[i] for i in order] if order_uids else sop_uids, step_mm=med,
                      extent_mm=float(along[order[-1]] - along[order[0]]) + med)


# --------------------------------------------------------------------------------------------------
# RT structures
# --------------------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def rasterise_contours(contours: Iterable[np.ndarray], affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A mask (I, J, K) on the grid of the RAS `affine` from closed planar contours ((M, 3) patient
    LPS mm each, as ContourData). Voxel centres inside a contour are set; contours on one slice
    combine by the even-odd rule (a hole is its own contour), as ``ctpm.data.dicom_export`` writes them.

    Written here with matplotlib's point-in-polygon on the voxel centres of each slice: the
    maintained RT-structure readers (rt-utils, dicompyler-core, platipy) rasterise onto the grid of
    the DICOM files they load themselves (pixel data included), not onto a grid given by its affine,
    and pull in OpenCV or SimpleITK for it.
    """
    from matplotlib.path import Path as MplPath

    mask = np.zeros(shape, bool)
    to_voxel = np.linalg.inv(LPS_TO_RAS @ affine)
    ii, jj = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    centres = np.column_stack([ii.ravel(), jj.ravel()]).astype(float)
    for pts in contours:
        pts = np.asarray(pts, float).reshape(-1, 3)
        if len(pts) < 3:
            continue
        ijk = pts @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        k = int(np.rint(np.median(ijk[:, 2])))
        if not 0 <= k < shape[2] or np.max(np.abs(ijk[:, 2] - k)) > 0.25:
            continue  # not on a slice of this grid
        lo = np.floor(ijk[:, :2].min(0)).astype(int)
        hi = np.ceil(ijk[:, :2].max(0)).astype(int)
        if (hi < 0).any() or lo[0] >= shape[0] or lo[1] >= shape[1]:
            continue
        inside = MplPath(ijk[:, :2]).contains_points(centres).reshape(shape[:2])
        mask[:, :, k] ^= inside
    return mask


def structure_masks(rtstruct: Path, geometry: CtGeometry, roi_names: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """The ROIs of an RT structure set whose names match `roi_names` (key -> aliases, compared in
    lower case without spaces or punctuation), rasterised onto the CT grid."""
    import pydicom

    ds = pydicom.dcmread(rtstruct)
    wanted = {_norm(alias): key for key, aliases in roi_names.items() for alias in [key, *aliases]}
    numbers = {int(r.ROINumber): wanted.get(_norm(str(r.get("ROIName", ""))))
               for r in ds.get("StructureSetROISequence") or []}
    out: dict[str, np.ndarray] = {}
    for rc in ds.get("ROIContourSequence") or []:
        key = numbers.get(int(rc.get("ReferencedROINumber", -1)))
        if key is None or key in out:
            continue
        contours = [np.asarray([float(v) for v in c.ContourData]) for c in rc.get("ContourSequence") or []
                    if str(c.get("ContourGeometricType", "CLOSED_PLANAR")).upper() == "CLOSED_PLANAR"]
        m = rasterise_contours(contours, geometry.affine, geometry.shape)
        if m.any():
            out[key] = m
    return out


def lung_labels(masks: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(lobes 1..5 or None, lungs 1 right / 2 left or None, what is missing) from matched ROIs."""
    lobes = None
    missing = [k for k in LOBE_LABELS if k not in masks]
    if not missing:
        any_mask = next(iter(masks.values()))
        lobes = np.zeros(any_mask.shape, np.uint8)
        for name, label in LOBE_LABELS.items():
            lobes[masks[name] & (lobes == 0)] = label
    lungs = None
    if "right" in masks and "left" in masks:
        lungs = np.zeros(masks["right"].shape, np.uint8)
        lungs[masks["right"]] = RIGHT
        lungs[masks["left"] & (lungs == 0)] = LEFT
    elif lobes is not None:
        lungs = np.where(np.isin(lobes, [LOBE_LABELS[k] for k in RIGHT_LOBES]), RIGHT,
                         np.where(lobes > 0, LEFT, 0)).astype(np.uint8)
    note = ""
    if lobes is None and missing and len(missing) < len(LOBE_LABELS):
        note = f"lobe(s) {', '.join(missing)} not found: no lobe map"
    if lungs is None and ("right" in masks) != ("left" in masks):
        note = (note + "; " if note else "") + "only one lung ROI found: no lung mask"
    return lobes, lungs, note


# --------------------------------------------------------------------------------------------------
# Patient ids
# --------------------------------------------------------------------------------------------------


class PatientIds:
    """Safe manifest ids from DICOM PatientIDs: ``hash`` (a salted SHA-256, 'P' + 12 hex digits),
    ``mapping`` (a CSV with columns ``dicom_patient_id,patient_id``) or ``patient_id`` (the raw
    PatientID: only when it is not identifying and already a safe file name)."""

    def __init__(self, mode: str = "hash", salt: str = "", mapping: str | Path | None = None):
        if mode not in ("hash", "mapping", "patient_id"):
            raise CtpmError(f"id_mode must be hash, mapping or patient_id, not {mode!r}")
        self.mode, self.salt = mode, str(salt or "")
        self.table: dict[str, str] = {}
        if mode == "mapping":
            if not mapping or not Path(mapping).is_file():
                raise CtpmError("id_mode=mapping needs id_mapping=CSV (columns dicom_patient_id,patient_id)",
                                path=mapping)
            with Path(mapping).open(newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                if not {"dicom_patient_id", "patient_id"} <= set(reader.fieldnames or []):
                    raise CtpmError("the id mapping needs the columns dicom_patient_id,patient_id", path=mapping)
                for r in reader:
                    pid = (r["patient_id"] or "").strip()
                    if not safe_id(pid):
                        raise CtpmError(f"mapped patient_id {pid!r} may only hold letters, digits, '.', '_', '-'",
                                        path=mapping)
                    self.table[(r["dicom_patient_id"] or "").strip()] = pid
            if len(set(self.table.values())) < len(self.table):
                raise CtpmError("the id mapping gives two PatientIDs the same patient_id", path=mapping)

    def __call__(self, dicom_id: str) -> str | None:
        """The manifest id, or None (not in the mapping)."""
        if self.mode == "hash":
            return "P" + hashlib.sha256(f"{self.salt}\0{dicom_id}".encode()).hexdigest()[:12]
        if self.mode == "mapping":
            return self.table.get(dicom_id)
        if not safe_id(dicom_id):
            raise CtpmError(f"PatientID {dicom_id!r} is not a safe file name; use id_mode=hash or mapping")
        return dicom_id


# --------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    rows: list[dict] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    rois: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)  # (relative path, labels, affine)
    links: list[tuple[str, list[Path]]] = field(default_factory=list)  # (relative folder, files)


def _is_spect(s: Series) -> str | None:
    """None when `s` is a reconstructed 3-D NM series; else why not."""
    if not s.is_image:
        return "not an image"
    if s.image_types & _NM_NOT_RECON or ("TOMO" in s.image_types and "RECON" not in " ".join(s.image_types)):
        return f"NM but not a reconstructed SPECT (ImageType {'/'.join(sorted(s.image_types))})"
    if s.frames < 2:
        return "NM with a single frame (planar)"
    return None


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()


def _series_path(s: Series, pid: str, kind: str, image_files: dict[Path, str], out_dir: Path,
                 links: list[tuple[str, list[Path]]]) -> str:
    """The manifest entry for series `s`: the single file of a multi-frame series, the folder that
    holds it alone, or a folder of links to be made beside the manifest (added to `links`)."""
    if len(s.files) == 1 and s.frames > 1:
        return _rel(s.files[0], out_dir)
    folder = Path(os.path.commonpath([str(f.parent) for f in s.files]))
    prefix = str(folder) + os.sep
    if all(uid == s.uid for f, uid in image_files.items() if str(f).startswith(prefix)):
        return _rel(folder, out_dir)
    rel = f"series/{pid}/{kind}"
    links.append((rel, list(s.files)))
    return rel


@dataclass
class _Candidates:
    """A patient's series by what they may become in the manifest."""

    cts: list[tuple[Series, CtGeometry]] = field(default_factory=list)
    spects: list[Series] = field(default_factory=list)
    structs: list[Series] = field(default_factory=list)
    doses: list[Series] = field(default_factory=list)

    def partners(self, ct: Series) -> list[Series]:
        """SPECTs of the CT's frame of reference, else of its study."""
        same_frame = [s for s in self.spects if ct.frame and s.frame == ct.frame]
        return same_frame or [s for s in self.spects if s.study == ct.study]


def _candidates(group: list[Series], skip, min_z_extent_mm: float) -> _Candidates:
    c = _Candidates()
    for s in group:
        if s.modality == "CT":
            if "LOCALIZER" in s.image_types:
                skip(s, "scout (LOCALIZER)")
                continue
            if not s.is_image:
                skip(s, "not an image")
                continue
            try:
                g = ct_geometry(s)
            except CtpmError as err:
                skip(s, str(err))
                continue
            if g.extent_mm < min_z_extent_mm:
                skip(s, f"does not cover the lungs: {g.extent_mm:.0f} mm along z < min_z_extent_mm={min_z_extent_mm:g}")
                continue
            c.cts.append((s, g))
        elif s.modality == "NM":
            why = _is_spect(s)
            if why:
                skip(s, why)
            else:
                c.spects.append(s)
        elif s.modality == "RTSTRUCT":
            c.structs.append(s)
        elif s.modality == "RTDOSE":
            h = s.headers[0]
            summation = str(h.get("DoseSummationType", "")).upper()
            if summation in PARTIAL_DOSE_TYPES:
                skip(s, f"RT Dose of one {summation.lower()}, not the plan's")
            elif str(h.get("DoseUnits", "")).upper() != "GY":
                skip(s, f"RT Dose not in Gy (DoseUnits {h.get('DoseUnits', 'missing')})")
            else:
                c.doses.append(s)
        else:
            skip(s, f"{s.modality or 'unknown'} series: not used" if s.is_image else
                 f"not an image ({s.modality or 'unknown modality'})")
    return c


def _choose_ct(c: _Candidates, skip) -> tuple[Series, CtGeometry] | None:
    """The CT with a SPECT beside it, then the thinnest slices; None (all skipped) on a tie."""
    def rank(item):
        return (not c.partners(item[0]), round(item[1].step_mm, 2))

    cts = sorted(c.cts, key=rank)
    ties = [x for x in cts if rank(x) == rank(cts[0])]
    if len(ties) > 1:
        for s, _ in ties:
            skip(s, f"two candidate CTs ({len(ties)} series of {rank(cts[0])[1]:g} mm slices): none chosen")
        for s, _ in cts[len(ties):]:
            skip(s, "another CT series was preferred")
        for s in c.spects + c.structs + c.doses:
            skip(s, "the patient's CT is ambiguous")
        return None
    ct, geom = cts[0]
    for s, g in cts[1:]:
        why = "thicker slices" if g.step_mm > geom.step_mm + 1e-2 else "no SPECT beside it"
        skip(s, f"another CT series was chosen ({why})")
    return ct, geom


def _lung_rois(ct: Series, geom: CtGeometry, structs: list[Series], pid: str, roi_names, skip,
               row: dict, rois: list) -> None:
    """Lobes and lungs from the structure set on this CT (referencing its series, else sharing its
    frame of reference): into `row` and `rois`."""
    refs = [s for s in structs if ct.uid in _referenced_series(s.headers[0])]
    if not refs:
        refs = [s for s in structs if ct.frame and s.frame == ct.frame]
    for s in structs:
        if s not in refs:
            skip(s, "RT structure set not on the chosen CT")
    if len(refs) > 1:
        for s in refs:
            skip(s, f"{len(refs)} RT structure sets on the CT: none used")
        return
    if not refs:
        return
    lobes, lungs, note = lung_labels(structure_masks(refs[0].files[0], geom, roi_names))
    for column, labels in (("lobes", lobes), ("lung_mask", lungs)):
        if labels is not None:
            row[column] = f"rois/{pid}_{column}.nii.gz"
            rois.append((row[column], labels, geom.affine))
    if lobes is None and lungs is None:
        skip(refs[0], note or "no lung or lobe ROI matched roi_names")
    elif note:
        skip(refs[0], note)


def _plan_dose(ct: Series, doses: list[Series], skip) -> Series | None:
    """The plan dose (for ctpm-flart): the one RT Dose in the CT's frame of reference."""
    on_ct = [s for s in doses if ct.frame and s.frame == ct.frame]
    for s in doses:
        if s not in on_ct:
            skip(s, "RT Dose not in the chosen CT's frame of reference")
    if len(on_ct) > 1:
        for s in on_ct:
            skip(s, f"{len(on_ct)} plan doses on the CT: none chosen")
    return on_ct[0] if len(on_ct) == 1 else None


def build_plan(root: str | Path, out: str | Path, *, cohort: str = "cancer", institution: str = "local",
               min_z_extent_mm: float = 150.0, roi_names: dict[str, list[str]] | None = None,
               ids: PatientIds | None = None, ct_only_rows: bool = True, progress: bool = False) -> Plan:
    """Index the tree and decide every row, ROI file, link folder and skip; writes nothing."""
    if cohort not in COHORTS:
        raise CtpmError(f"unknown cohort {cohort!r}; expected one of {', '.join(COHORTS)}")
    if not str(institution or "").strip():
        raise CtpmError("institution is empty")
    root, out_dir = Path(root), Path(out).parent
    ids = ids or PatientIds()
    roi_names = roi_names or DEFAULT_ROI_NAMES
    series, not_dicom, unreadable = scan(root, progress=progress)
    plan = Plan()
    plan.skipped += [Skip("", None, _rel(f, out_dir), "not a DICOM file") for f in not_dicom]
    plan.skipped += [Skip("", None, _rel(f, out_dir), why) for f, why in unreadable]
    if not any(s.modality == "CT" for s in series):
        raise CtpmError(f"no CT series among the {len(series)} DICOM series found", path=root)
    # image files that read_dicom_series would take from a folder (it leaves out scouts and non-images)
    image_files = {f: s.uid for s in series if s.is_image for f, h in zip(s.files, s.headers, strict=True)
                   if "LOCALIZER" not in [str(v).upper() for v in (h.get("ImageType") or [])]}
    by_patient: dict[str, list[Series]] = defaultdict(list)
    for s in series:
        by_patient[s.patient].append(s)
    used_ids: dict[str, str] = {}
    for dicom_id in sorted(by_patient):
        group = by_patient[dicom_id]
        pid = ids(dicom_id)
        if pid is None:
            plan.skipped += [Skip("", s, _rel(s.files[0].parent, out_dir), "PatientID not in the id mapping")
                             for s in group]
            continue
        if pid in used_ids:
            raise CtpmError(f"two PatientIDs give the patient_id {pid!r}")
        used_ids[pid] = dicom_id

        def skip(s: Series, reason: str, _pid=pid) -> None:
            plan.skipped.append(Skip(_pid, s, _rel(s.files[0].parent, out_dir), reason))

        c = _candidates(group, skip, min_z_extent_mm)
        if not c.cts:
            plan.skipped.append(Skip(pid, None, _rel(group[0].files[0].parent, out_dir),
                                     "no CT series covering the lungs"))
            for s in c.spects + c.structs + c.doses:
                skip(s, "no chest CT for this patient")
            continue
        chosen = _choose_ct(c, skip)
        if chosen is None:
            continue
        ct, geom = chosen
        links: list[tuple[str, list[Path]]] = []
        rois: list[tuple[str, np.ndarray, np.ndarray]] = []
        row = {"patient_id": pid, "cohort": cohort, "institution": institution,
               "ct": _series_path(ct, pid, "ct", image_files, out_dir, links), "spect": ""}
        cand = c.partners(ct)
        for s in c.spects:
            if s not in cand:
                skip(s, "SPECT not in the chosen CT's frame of reference or study")
        if len(cand) == 1:
            row["spect"] = _series_path(cand[0], pid, "spect", image_files, out_dir, links)
        for s in cand if len(cand) > 1 else []:
            skip(s, f"{len(cand)} candidate SPECT series for the CT: none chosen")
        _lung_rois(ct, geom, c.structs, pid, roi_names, skip, row, rois)
        dose = _plan_dose(ct, c.doses, skip)
        if dose is not None:
            row["dose"] = _rel(dose.files[0], out_dir)
        if not row["spect"]:
            plan.skipped.append(Skip(pid, None, row["ct"], "no SPECT: CT-only row (for ctpm-predict)"
                                     if ct_only_rows else "no SPECT: left out (ct_only_rows=false)"))
            if not ct_only_rows:
                continue
        plan.rows.append(row)
        plan.links += links
        plan.rois += rois
    return plan


def _referenced_series(ds) -> set[str]:
    out = set()
    for fr in ds.get("ReferencedFrameOfReferenceSequence") or []:
        for st in fr.get("RTReferencedStudySequence") or []:
            for se in st.get("RTReferencedSeriesSequence") or []:
                out.add(str(se.get("SeriesInstanceUID", "")))
    return out


def write_plan(plan: Plan, out: str | Path, skipped: str | Path | None = None) -> tuple[Path, Path]:
    """Write the link folders, the ROI images, the manifest and the skip table (each atomically)."""
    out = Path(out)
    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for rel, files in plan.links:
        with atomic_directory(out_dir / rel) as tmp:
            for n, f in enumerate(files):
                dst = tmp / f"{n:05d}_{f.name}"
                try:
                    os.symlink(f.resolve(), dst)
                except OSError:  # no symbolic links on this file system: copy
                    shutil.copy2(f, dst)
    for rel, labels, affine in plan.rois:
        save_nifti(labels, affine, out_dir / rel, dtype=np.uint8)
    skipped = Path(skipped) if skipped else out_dir / "skipped.csv"
    fh = io.StringIO(newline="")
    w = csv.DictWriter(fh, fieldnames=SKIP_COLUMNS)
    w.writeheader()
    w.writerows(s.row() for s in plan.skipped)
    atomic_write(skipped, fh.getvalue())
    if plan.rows:
        write_manifest(out, plan.rows)
    return out, skipped
