"""Helpers of the data-layer tests: small DICOM files (pydicom only: CT slice series, multi-frame
NM), console scripts in a subprocess, manifests with absolute paths, re-oriented copies of images.

DICOM geometry: positions and directions in LPS mm; a pixel array is (row, column).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
# Values that must never reach ctpm's outputs.
IDENTITY = {"PatientName": "Doe^Jane^Secret", "PatientID": "ID-4711-SECRET", "PatientBirthDate": "19450317"}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _ds(s: float) -> str:
    return f"{float(s):.10g}"


def _base(sop_class: str, modality: str, series_uid: str, study_uid: str, frame_uid: str, identity: dict) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = study_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.SeriesDescription = f"test {modality}"
    for k, v in identity.items():
        setattr(ds, k, v)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def write_slices(folder: Path, pixels: list[np.ndarray], positions: list, orientation, pixel_spacing, *,
                 intercept: float = -1024.0, slope: float = 1.0, modality: str = "CT", series_uid: str | None = None,
                 identity: dict | None = None, order: list[int] | None = None, prefix: str = "IM") -> list[Path]:
    """One file per slice. pixels[n]: stored values (rows, columns), uint16; positions[n]: LPS
    ImagePositionPatient; files are written in `order` (shuffled names must not matter)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study, frame = generate_uid(), generate_uid()
    out = []
    for n in order if order is not None else range(len(pixels)):
        px = np.asarray(pixels[n], np.uint16)
        ds = _base(CT_STORAGE, modality, series_uid, study, frame, IDENTITY if identity is None else identity)
        ds.Rows, ds.Columns = px.shape
        ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.ImagePositionPatient = [_ds(v) for v in positions[n]]
        ds.SliceThickness = "1"
        ds.InstanceNumber = n + 1
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.PixelData = px.tobytes()
        path = folder / f"{prefix}{len(out):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def write_ct_series(folder: Path, hu: np.ndarray, affine_ras: np.ndarray, *, raw: bool = False, **kw) -> list[Path]:
    """A CT volume (I, J, K) on a RAS affine as a slice series. Voxel (i, j, k) is pixel
    (row j, column i) of slice k; stored as HU + 1024 (raw=True: stored as given, no rescale)."""
    lps = LPS_TO_RAS @ np.asarray(affine_ras, float)
    cols = [lps[:3, d] for d in range(3)]
    dc, dr = np.linalg.norm(cols[0]), np.linalg.norm(cols[1])
    orientation = [*(cols[0] / dc), *(cols[1] / dr)]
    positions = [lps[:3, 3] + k * cols[2] for k in range(hu.shape[2])]
    stored = np.asarray(hu, float) if raw else np.asarray(hu, float) + 1024.0
    assert stored.min() >= 0 and stored.max() <= 65535, "HU + 1024 must fit in 16 bits"
    pixels = [np.rint(stored[:, :, k].T) for k in range(hu.shape[2])]
    return write_slices(folder, pixels, positions, orientation, [dr, dc], intercept=0.0 if raw else -1024.0, **kw)


def write_nm_multiframe(path: Path, counts: np.ndarray, affine_ras: np.ndarray, *, slope: float = 1.0,
                        identity: dict | None = None) -> Path:
    """A SPECT volume (I, J, K) as one multi-frame NM file: frame k = slice k, geometry in the
    DetectorInformationSequence as the NM image IOD keeps it. The slice axis must be the normal
    of the row and column directions (as for any NM reconstruction)."""
    lps = LPS_TO_RAS @ np.asarray(affine_ras, float)
    cols = [lps[:3, d] for d in range(3)]
    dc, dr, dz = (np.linalg.norm(c) for c in cols)
    row_dir, col_dir = cols[0] / dc, cols[1] / dr
    assert np.allclose(np.cross(row_dir, col_dir) * dz, cols[2]), "NM slices run along the normal"
    ds = _base(NM_STORAGE, "NM", generate_uid(), generate_uid(), generate_uid(), IDENTITY if identity is None else identity)
    stored = np.rint(np.asarray(counts, float) / slope)
    assert stored.min() >= 0 and stored.max() <= 65535, "counts / slope must fit in 16 bits"
    stored = stored.astype(np.uint16)
    frames = np.ascontiguousarray(np.transpose(stored, (2, 1, 0)))  # (frame, row, column)
    ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.PixelSpacing = [_ds(dr), _ds(dc)]
    ds.SpacingBetweenSlices = _ds(dz)
    ds.SliceThickness = _ds(dz)
    ds.RescaleSlope = _ds(slope)
    ds.RescaleIntercept = "0"
    det = Dataset()
    det.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    det.ImagePositionPatient = [_ds(v) for v in lps[:3, 3]]
    ds.DetectorInformationSequence = [det]
    ds.PixelData = frames.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


def write_enhanced_ct(path: Path, hu: np.ndarray, affine_ras: np.ndarray, *, order=None,
                      per_frame_rescale: bool = True) -> Path:
    """A CT volume (I, J, K) as one Enhanced CT file: frames written in `order` (slice k of the
    volume is frame position order.index(k)), geometry in the functional groups; the rescale per
    frame (intercept -1024 - k, so each frame needs its own) or shared (-1024)."""
    lps = LPS_TO_RAS @ np.asarray(affine_ras, float)
    cols = [lps[:3, d] for d in range(3)]
    dc, dr = np.linalg.norm(cols[0]), np.linalg.norm(cols[1])
    order = list(range(hu.shape[2])) if order is None else list(order)
    ds = _base(ENHANCED_CT_STORAGE, "CT", generate_uid(), generate_uid(), generate_uid(), IDENTITY)
    shared = Dataset()
    measures, orient = Dataset(), Dataset()
    measures.PixelSpacing = [_ds(dr), _ds(dc)]
    measures.SliceThickness = _ds(np.linalg.norm(cols[2]))
    orient.ImageOrientationPatient = [_ds(v) for v in (*(cols[0] / dc), *(cols[1] / dr))]
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [orient]
    if not per_frame_rescale:
        pvt = Dataset()
        pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = "-1024", "1", "HU"
        shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames, groups = [], []
    for k in order:
        intercept = -1024.0 - k if per_frame_rescale else -1024.0
        stored = np.rint(np.asarray(hu[:, :, k], float).T - intercept)
        assert stored.min() >= 0 and stored.max() <= 65535
        frames.append(stored.astype(np.uint16))
        g, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [_ds(v) for v in lps[:3, 3] + k * cols[2]]
        g.PlanePositionSequence = [pos]
        if per_frame_rescale:
            pvt = Dataset()
            pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = _ds(intercept), "1", "HU"
            g.PixelValueTransformationSequence = [pvt]
        groups.append(g)
    ds.PerFrameFunctionalGroupsSequence = groups
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames[0].shape
    ds.PixelData = np.stack(frames).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------------
# Not DICOM: console scripts, manifests, re-oriented copies
# --------------------------------------------------------------------------------------------------

BIN = Path(sys.executable).parent


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A ctpm console script in a subprocess, as the user runs it (exit code, stdout, stderr)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, env=env)


def absolute_manifest(src_manifest: Path, dst: Path, ids=None) -> Path:
    """A copy of a manifest with absolute paths (so it can live anywhere), optionally restricted
    to `ids` (in that order)."""
    src_manifest = Path(src_manifest)
    with src_manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    cols = list(rows[0])
    out = []
    for r in rows:
        if ids is not None and r["patient_id"] not in ids:
            continue
        r = dict(r)
        for c in ("ct", "spect", "lung_mask", "lobes", "perfusion", "dose", "oracle"):
            if r.get(c):
                r[c] = str((src_manifest.parent / r[c]).resolve())
        out.append(r)
    if ids is not None:
        order = {pid: n for n, pid in enumerate(ids)}
        out.sort(key=lambda r: order.get(r["patient_id"], 0))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with dst.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(out)
    return dst


def reorient(array: np.ndarray, affine: np.ndarray, perm, flips) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with its axes permuted (new axis n = old axis perm[n]) and flipped
    (flips[n] for new axis n), with the affine that keeps every voxel at its world position."""
    arr = np.transpose(array, perm)
    aff = np.eye(4)
    aff[:3, 3] = affine[:3, 3]
    for n, old in enumerate(perm):
        aff[:3, n] = affine[:3, old]
    sl = []
    for n, f in enumerate(flips):
        if f:
            aff[:3, 3] += aff[:3, n] * (arr.shape[n] - 1)
            aff[:3, n] *= -1
            sl.append(slice(None, None, -1))
        else:
            sl.append(slice(None))
    return np.ascontiguousarray(arr[tuple(sl)]), aff
