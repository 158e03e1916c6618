"""Image I/O: NIfTI files and DICOM series into one in-memory form, a `Volume`.

A `Volume` is a 3-D array plus a 4x4 affine that maps voxel indices (i, j, k) to world RAS
coordinates in mm (x to the patient's Right, y to Anterior, z to Superior), the NIfTI convention.
DICOM positions are LPS; they are converted on reading.

MONAI's own readers (``LoadImage`` with ``PydicomReader``/``NibabelReader``) would read most of these
files too, but they neither check what the project needs (one series per folder, HU values, a
3-D volume, no NaN in SPECT) nor name the patient and file when something is wrong, so reading is
written here and wrapped as a MONAI transform in ``ctpm.data.transforms``.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ctpm.errors import CtpmError
from ctpm.geometry import Grid, dicom_affine

KINDS = ("ct", "spect", "label", "dose", "perfusion")
#: NIfTI ``descrip`` of the label maps ctpm writes, so that a reader can tell one map from another
#: (a functional-volume map and a lung label map both hold 0 / 1 / 2).
DESCRIPTIONS = {
    "lungs": "ctpm lungs: 1 right, 2 left",
    "functional": "ctpm functional volumes: 1 low, 2 high",
    "perfusion": "ctpm perfusion (1 = normal lung)",
    "std": "ctpm perfusion SD over models",
}


@dataclass
class Volume:
    """A 3-D image on a grid in world space.

    array: (I, J, K) voxel values (HU for CT, counts or relative perfusion for SPECT, integers for labels).
    affine: 4x4, voxel index -> world RAS mm.
    meta: what is known about where it came from (modality, DICOM UIDs); never patient identity.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def grid(self) -> Grid:
        """Its grid (affine + shape), for ``ctpm.geometry``."""
        return Grid(self.affine, self.shape)

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world box (min, max) spanned by the voxel centres."""
        return self.grid.bounds()


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def load_image(path: str | Path, *, kind: str = "ct", patient: str | None = None) -> Volume:
    """Read a NIfTI file or a folder (or single file) of one DICOM series and check it.

    kind: "ct" (values must be HU), "spect" (finite, not negative), "label" (integers),
    "dose" (Gy, finite) or "perfusion" (finite). Errors name the patient and the file.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    path = Path(path)
    try:
        if not path.exists():
            raise CtpmError("file does not exist")
        if path.is_dir():
            vol = read_dicom_series(path)
        elif path.name.endswith((".nii", ".nii.gz", ".img", ".hdr")):
            vol = read_nifti(path)
        else:
            vol = read_dicom_series(path)
        check_volume(vol, kind)
    except CtpmError as err:
        raise err.with_context(patient=patient, path=path) from None
    vol.meta.setdefault("source", str(path))
    return vol


def read_nifti(path: Path) -> Volume:
    try:
        img = nib.load(str(path))
        data = img.get_fdata(dtype=np.float32, caching="unchanged")
    except Exception as exc:  # nibabel raises many types for truncated / corrupt files
        raise CtpmError(f"cannot read the NIfTI image ({type(exc).__name__}: {exc})") from None
    data = _as_3d(np.asarray(data))
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise CtpmError("the NIfTI header has no valid affine (voxel size or orientation missing)")
    meta = {"format": "nifti"}
    descrip = bytes(np.asarray(img.header.get("descrip", b""))).split(b"\0")[0].decode("latin-1").strip()
    if descrip:
        meta["description"] = descrip
    aux = bytes(np.asarray(img.header.get("aux_file", b""))).split(b"\0")[0].decode("latin-1").strip()
    if aux.startswith(_PATIENT_TAG):
        meta["patient_tag"] = aux
    return Volume(data, affine, meta)


# The maps ctpm writes for a patient carry a tag of the patient id in the header's aux_file (24
# bytes: a hash, so that ids of any length fit and no id is spelled out), so that a reader can tell
# another patient's map put under this patient's name from this patient's own.
_PATIENT_TAG = "ctpm:"


def patient_tag(patient_id: str) -> str:
    import hashlib

    return _PATIENT_TAG + hashlib.sha1(patient_id.encode("utf-8")).hexdigest()[:16]


def check_patient_tag(vol: Volume, patient_id: str, path: str | Path | None = None) -> None:
    """A CtpmError when a map's header says it was written for another patient (maps without a
    tag, from other tools, pass)."""
    tag = vol.meta.get("patient_tag")
    if tag is not None and tag != patient_tag(patient_id):
        raise CtpmError("this map was written by ctpm for another patient (its header's patient tag differs); "
                        "is it another patient's map under this name?", patient=patient_id, path=path)


def _as_3d(data: np.ndarray) -> np.ndarray:
    """Accept (I, J, K) and (I, J, K, 1, ...); refuse 2-D images and 4-D series."""
    if data.ndim > 3:
        extra = data.shape[3:]
        if int(np.prod(extra)) != 1:
            raise CtpmError(
                f"image is {data.ndim}-D with shape {data.shape}; a single 3-D volume is expected "
                "(split a 4-D series and give one volume)"
            )
        data = data.reshape(data.shape[:3])
    if data.ndim < 3 or min(data.shape) < 2:
        raise CtpmError(f"image has shape {data.shape}; a 3-D volume is expected, not a 2-D image")
    return data


def check_volume(vol: Volume, kind: str) -> None:
    """Refuse images that would silently give wrong maps."""
    a = vol.array
    if a.size == 0:
        raise CtpmError("image is empty")
    if kind in ("ct", "label", "dose", "perfusion") and not np.all(np.isfinite(a)):
        raise CtpmError(f"{kind} image holds NaN or infinite values")
    if kind == "ct":
        # Scanners pad the corners outside the reconstruction circle far below air (-2000, -3024,
        # -32768 by vendor); nothing below -1024 HU is physical, so it becomes air.
        lo = float(a.min())
        if lo < -1024.0:
            np.maximum(a, -1024.0, out=a)
        # A chest CT in HU has air around the body near -1000 HU. Stored values without the
        # rescale (e.g. 0..4095) or another unit show no such air.
        sample = a[::4, ::4, ::2] if a.size > 2_000_000 else a
        p1 = float(np.percentile(sample, 1))
        hi = float(a.max())
        if p1 > -500.0 or hi > 40000:
            raise CtpmError(
                f"CT values do not look like Hounsfield units (range {lo:.0f}..{hi:.0f}, "
                f"1st percentile {p1:.0f}; air should be near -1000 HU). Apply the DICOM rescale "
                "slope/intercept or convert the image to HU"
            )
    elif kind == "spect":
        if not np.all(np.isfinite(a)):
            raise CtpmError("SPECT holds NaN or infinite values")
        hi, lo = float(a.max()), float(a.min())
        if hi <= 0:
            raise CtpmError("SPECT has no positive counts")
        # Reconstructions are non-negative; a few tiny negatives from filtered back-projection are
        # tolerated (clipped), anything larger means the image is not a perfusion scan as expected.
        if lo < -0.01 * hi:
            raise CtpmError(f"SPECT holds negative values (min {lo:.4g}, max {hi:.4g})")
        if lo < 0:
            np.clip(a, 0, None, out=a)
    elif kind == "label":
        if not np.allclose(a, np.round(a)):
            raise CtpmError("label image holds non-integer values")
        if a.min() < 0:
            raise CtpmError("label image holds negative labels")


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------

# Attributes that identify a person; never copied into the project's outputs.
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "PatientAddress")


def read_dicom_series(path: Path) -> Volume:
    """Read one DICOM image series (CT, NM/SPECT, PT, MR) from a folder or a single file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    series: dict[str, list[tuple[Path, Any]]] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError):
            continue  # not a DICOM file (a README, a licence): ignore it
        except Exception:  # noqa: BLE001 - a damaged header: also not part of a readable series
            continue
        if "SeriesInstanceUID" not in ds or "Rows" not in ds:
            continue  # DICOMDIR, structured reports, RT objects: not images
        if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
            continue  # a scout view exported with the series: not a slice of the volume
        series.setdefault(str(ds.SeriesInstanceUID), []).append((f, ds))
    if not series:
        raise CtpmError("no DICOM image series found")
    if len(series) > 1:
        desc = "; ".join(
            f"{items[0][1].get('Modality', '?')} '{items[0][1].get('SeriesDescription', '')}' "
            f"({len(items)} files)"
            for items in series.values()
        )
        raise CtpmError(
            f"folder holds {len(series)} DICOM series ({desc}); give a folder with exactly one series"
        )
    (uid, items), = series.items()
    if len(items) == 1 and int(items[0][1].get("NumberOfFrames", 1) or 1) > 1:
        if "PerFrameFunctionalGroupsSequence" in items[0][1]:
            return _read_enhanced(items[0][0])
        return _read_multiframe(items[0][0])
    return _read_slices(items, uid)


def _read_pixels(f: Path):
    import pydicom

    try:
        ds = pydicom.dcmread(f)
        return ds, ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated or compressed without a decoder
        raise CtpmError(f"cannot read DICOM pixel data ({type(exc).__name__}: {exc})", path=f) from None


def _rescale(ds, pixels: np.ndarray) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    out = pixels.astype(np.float32)
    if slope != 1.0:
        out *= slope
    if intercept != 0.0:
        out += intercept
    return out


def _series_meta(ds, uid: str) -> dict[str, Any]:
    return {
        "format": "dicom",
        "modality": str(ds.get("Modality", "")),
        "series_instance_uid": uid,
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "series_description": str(ds.get("SeriesDescription", "")),
    }


def _stack_order(positions: np.ndarray, normal: np.ndarray, paths: list[Path], two: str, what: str) -> np.ndarray:
    """The order that stacks slices (or frames) at `positions` along `normal`; refuses two at one
    position and uneven spacing (a missing slice), naming the file at fault (`paths` per slice)."""
    order = np.argsort(positions @ normal, kind="stable")
    steps = np.diff((positions @ normal)[order])
    if np.any(np.abs(steps) < 1e-3):
        raise CtpmError(f"{two} at the same position (several acquisitions, stacks or time points?); a single "
                        "3-D volume is expected", path=paths[order[int(np.argmin(np.abs(steps)))]])
    med = float(np.median(steps))
    if np.max(np.abs(steps - med)) > 0.1 * abs(med) + 1e-3:
        gap = int(np.argmax(np.abs(steps - med)))
        raise CtpmError(f"{what} are not evenly spaced (step {steps[gap]:.2f} mm where {med:.2f} mm is usual): "
                        "missing slices?", path=paths[order[gap + 1]])
    return order


def _read_slices(items: list[tuple[Path, Any]], uid: str) -> Volume:
    first = items[0][1]
    if "ImageOrientationPatient" not in first or "ImagePositionPatient" not in first:
        raise CtpmError("DICOM slices carry no ImagePositionPatient/ImageOrientationPatient", path=items[0][0])
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    for f, ds in items:
        if "ImageOrientationPatient" not in ds or not np.allclose(
                [float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise CtpmError("DICOM series mixes slices of different orientations", path=f)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
    if len(items) < 2:
        raise CtpmError("DICOM series has a single slice; a 3-D volume is expected", path=items[0][0])
    order = _stack_order(positions, normal, [f for f, _ in items], "DICOM series has two slices", "DICOM slices")
    items = [items[i] for i in order]
    positions = positions[order]
    rows, cols = int(first.Rows), int(first.Columns)
    vol = np.empty((cols, rows, len(items)), dtype=np.float32)
    sop_uids = []
    for k, (f, _) in enumerate(items):
        ds, px = _read_pixels(f)
        if px.shape != (rows, cols):
            raise CtpmError(f"slice has {px.shape} pixels where the series has {(rows, cols)}", path=f)
        vol[:, :, k] = _rescale(ds, px).T  # (row, col) -> (i = col, j = row)
        sop_uids.append(str(ds.get("SOPInstanceUID", "")))
    # the step between slices as a vector: a gantry tilt stays in the affine
    affine = dicom_affine(iop, positions[0], first.PixelSpacing, (positions[-1] - positions[0]) / (len(items) - 1))
    meta = _series_meta(first, uid)
    meta.update(
        sop_instance_uids=sop_uids,
        sop_class_uid=str(first.get("SOPClassUID", "")),
        files=[str(f) for f, _ in items],
    )
    return Volume(vol, affine, meta)


def _read_multiframe(f: Path) -> Volume:
    """A single multi-frame file, as NM (SPECT) reconstructions are usually stored."""
    ds, px = _read_pixels(f)
    if px.ndim != 3:
        raise CtpmError(f"multi-frame DICOM has pixel array of shape {px.shape}", path=f)
    src = ds
    if "ImagePositionPatient" not in ds and "DetectorInformationSequence" in ds:
        src = ds.DetectorInformationSequence[0]  # NM image IOD keeps the geometry here
    if "ImageOrientationPatient" not in src or "ImagePositionPatient" not in src:
        raise CtpmError("multi-frame DICOM carries no ImagePositionPatient/ImageOrientationPatient", path=f)
    step = float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 0)
    if step == 0:
        raise CtpmError("multi-frame DICOM gives neither SpacingBetweenSlices nor SliceThickness", path=f)
    # Frames run along +normal unless the producer said otherwise (negative spacing).
    vol = np.ascontiguousarray(np.transpose(_rescale(ds, px), (2, 1, 0)))  # (frame,row,col) -> (col,row,frame)
    affine = dicom_affine(src.ImageOrientationPatient, src.ImagePositionPatient, ds.PixelSpacing, step)
    meta = _series_meta(ds, str(ds.SeriesInstanceUID))
    meta.update(sop_instance_uids=[str(ds.get("SOPInstanceUID", ""))], files=[str(f)])
    return Volume(vol, affine, meta)


def frame_attribute(ds, k: int, seq: str, item: str):
    """An attribute of frame k of an enhanced multi-frame image: its per-frame functional group,
    else the shared one (where the standard lets either hold it)."""
    shared = ds.get("SharedFunctionalGroupsSequence") or [None]
    for groups in (ds.PerFrameFunctionalGroupsSequence[k], shared[0]):
        items = getattr(groups, seq, None) if groups is not None else None
        if items and item in items[0]:
            return getattr(items[0], item)
    return None


def _read_enhanced(f: Path) -> Volume:
    """An enhanced multi-frame image (Enhanced CT / MR / PET): the geometry and the rescale of
    each frame sit in the functional groups; frames are stacked by their position, which may be
    in any order, and must be one evenly spaced stack of one orientation."""
    ds, px = _read_pixels(f)
    if px.ndim != 3:
        raise CtpmError(f"multi-frame DICOM has pixel array of shape {px.shape}", path=f)
    n = px.shape[0]
    try:
        iops = np.array([[float(v) for v in frame_attribute(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient")]
                         for k in range(n)])
        ipps = np.array([[float(v) for v in frame_attribute(ds, k, "PlanePositionSequence", "ImagePositionPatient")]
                         for k in range(n)])
        dr, dc = (float(v) for v in frame_attribute(ds, 0, "PixelMeasuresSequence", "PixelSpacing"))
    except (TypeError, ValueError, IndexError):
        raise CtpmError("enhanced multi-frame DICOM lacks a frame's position, orientation or pixel spacing",
                        path=f) from None
    if not np.allclose(iops, iops[0], atol=1e-4):
        raise CtpmError("enhanced multi-frame DICOM mixes frames of different orientations", path=f)
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    normal = np.cross(row_dir, col_dir)
    order = _stack_order(ipps, normal, [f] * n, "enhanced multi-frame DICOM holds frames",
                         "enhanced multi-frame DICOM frames")
    vol = np.empty((px.shape[2], px.shape[1], n), np.float32)
    for k, src in enumerate(order):
        slope = frame_attribute(ds, int(src), "PixelValueTransformationSequence", "RescaleSlope")
        intercept = frame_attribute(ds, int(src), "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is None and intercept is None:  # not in the groups: the top-level attributes, if any
            slope, intercept = ds.get("RescaleSlope", 1.0), ds.get("RescaleIntercept", 0.0)
        frame = px[src].astype(np.float32) * float(slope if slope is not None else 1.0)
        vol[:, :, k] = (frame + float(intercept or 0.0)).T  # (row, col) -> (i = col, j = row)
    affine = dicom_affine(iops[0], ipps[order[0]], (dr, dc), (ipps[order[-1]] - ipps[order[0]]) / (n - 1))
    meta = _series_meta(ds, str(ds.SeriesInstanceUID))
    meta.update(sop_instance_uids=[str(ds.get("SOPInstanceUID", ""))], sop_class_uid=str(ds.get("SOPClassUID", "")),
                files=[str(f)])
    return Volume(vol, affine, meta)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype=np.float32, *,
               description: str | None = None, patient: str | None = None) -> Path:
    """Write a NIfTI file atomically: a killed run never leaves a truncated file under the name.
    `description` (<= 80 characters) goes into the header's ``descrip`` (see ``DESCRIPTIONS``),
    `patient` a tag of the patient id into ``aux_file`` (``check_patient_tag``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(array).astype(dtype, copy=False), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description[:80].encode("latin-1", "replace")
    if patient:
        img.header["aux_file"] = patient_tag(patient).encode("ascii")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        if suffix == ".nii.gz":
            # Level 1 compresses CT-like data nearly as well as the default 9 at a fraction of the time.
            # mtime=0: the same image gives the same bytes (reproducible cohorts and caches).
            # Streamed through the compressor (nibabel writes the array in blocks): no second copy
            # of a 512^2 x N float map in memory.
            with open(tmp, "xb") as fh, \
                    gzip.GzipFile(filename="", fileobj=fh, mode="wb", compresslevel=1, mtime=0) as gz:
                img.to_file_map({"image": nib.FileHolder(fileobj=gz)})
        else:
            nib.save(img, tmp)
    return path


# --------------------------------------------------------------------------------------------------
# Atomic files and folders
# --------------------------------------------------------------------------------------------------
# Every file ctpm writes goes to a temporary name beside its final one and is renamed into place
# when complete, so a killed run never leaves a truncated file under a real name. The temporary
# names carry the host and the process id (".<name>.tmp-<host>-<pid>-<random>"), so a later run
# can tell the leftovers of a killed process from the work of a live one (``sweep_temps``).
# Temporaries are created with ``open``/``mkdir`` (not ``mkstemp``/``mkdtemp``, which make them
# 0600/0700), so the outputs get the user's umask: a planning system's import service running
# under another account can read them.

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname().split(".")[0])[:32] or "host"
_TEMP = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}(\.nii(\.gz)?)?$")


def temp_path(final: str | Path, suffix: str = "") -> Path:
    """A fresh temporary name beside `final` (not created). `suffix` keeps an extension a writer
    needs (nibabel picks the format from ``.nii`` / ``.nii.gz``)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = ""):
    """Yield a temporary path beside `final` to write a file or a folder at; on success it is
    renamed onto `final` (a folder there is replaced), on any error removed."""
    final = Path(final)
    tmp = temp_path(final, suffix)
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink() and tmp.is_dir():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically (``atomic_path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "xb") as fh:
        fh.write(raw)
    return path


@contextlib.contextmanager
def atomic_directory(final: str | Path):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename, on any
    error it is removed. A killed process leaves only a dot-named temporary folder, never a
    `final` that looks complete (``sweep_temps`` removes it later)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        yield tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


def sweep_temps(folder: str | Path) -> list[Path]:
    """Remove the temporaries that killed processes of this host left in `folder` (not those of
    live processes, nor of other hosts sharing the file system). Returns what was removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            _remove(entry)
            removed.append(entry)
    return removed


def moved(paths, stage: Path, out: Path):
    """`paths` (a path, or a dict / list of them, nested) written below `stage`, as they are named
    once ``staged_outputs`` moved them into `out`."""
    if isinstance(paths, dict):
        return {k: moved(v, stage, out) for k, v in paths.items()}
    if isinstance(paths, (list, tuple)):
        return type(paths)(moved(v, stage, out) for v in paths)
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        try:
            return Path(out) / p.relative_to(stage)
        except ValueError:
            return paths
    return paths


@contextlib.contextmanager
def staged_outputs(out: str | Path):
    """The outputs of one unit of work (a patient) all or none: yield a staging folder inside
    `out`; when the block succeeds every file and folder written there is moved into `out`
    (replacing what was there), when it fails the staging folder is removed and `out` is as it
    was. Renames do not need disk space, so once every output is written the move cannot fail
    for a full disk."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweep_temps(out)
    stage = temp_path(out / "staged")
    stage.mkdir()
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            dst = out / item.name
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            os.replace(item, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
