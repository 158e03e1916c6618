"""The preprocessing cache: one entry per patient, keyed by a hash of the preprocessing config.

Layout under the cache folder (``ctpm-preprocess out=DIR``)::

    DIR/<patient>/lungs.nii.gz           lung labels used (1 right, 2 left) in the CT's geometry, for QA
    DIR/<patient>/<config-hash>/          one entry per preprocessing config
        ct.npy spect.npy lung.npy mask.npy   (sides, D, H, W), memory-mapped on load
        grid_lungs.npz                       lung labels on the evaluation grid (for the inverse)
        registration.json registration_qa.png   with register_spect: the SPECT-to-CT transform, QA overlay
        meta.json                            geometry, transform history, checksums
    DIR/<config-hash>.json                the config behind a hash, for people

A changed config has another hash, so it never reads a stale entry. An entry is written into a
temporary folder and renamed into place, so a killed run leaves nothing that looks complete;
checksums in meta.json catch entries damaged later, which are then rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ctpm.data.io import atomic_directory, save_nifti
from ctpm.data.manifest import Patient
from ctpm.data.preprocess import Preprocessed, preprocess_patient
from ctpm.data.transforms import PreprocessConfig, ops_from_json, ops_to_json
from ctpm.errors import CtpmError, warn

# Bump when the code changes what an entry holds for the same config.
CACHE_VERSION = 3
ARRAYS = ("ct", "spect", "lung", "mask")


def config_hash(cfg: PreprocessConfig) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **cfg.to_dict()}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


@dataclass
class CacheEntry:
    """A cached patient: per-lung arrays (memory-mapped) and what it takes to invert predictions."""

    patient_id: str
    path: Path
    meta: dict[str, Any]
    ct: np.ndarray
    lung: np.ndarray
    mask: np.ndarray
    spect: np.ndarray | None

    @property
    def sides(self) -> list[str]:
        return list(self.meta["sides"])

    def lung_ops(self) -> dict[str, list]:
        return {s: ops_from_json(json.dumps(o)) for s, o in self.meta["lung_ops"].items()}

    def grid_lungs(self) -> np.ndarray:
        with np.load(self.path / "grid_lungs.npz") as z:
            return z["labels"]

    @property
    def grid_affine(self) -> np.ndarray:
        return np.asarray(self.meta["grid_affine"], float)

    @property
    def ct_affine(self) -> np.ndarray:
        return np.asarray(self.meta["ct_affine"], float)

    @property
    def ct_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["ct_shape"])  # type: ignore[return-value]


class PreprocessCache:
    def __init__(self, root: str | Path, cfg: PreprocessConfig | dict | None = None):
        self.root = Path(root)
        self.cfg = PreprocessConfig.from_any(cfg)
        self.key = config_hash(self.cfg)

    # ---- paths ----
    def entry_dir(self, patient_id: str) -> Path:
        return self.root / patient_id / self.key

    def qa_lungs_path(self, patient_id: str) -> Path:
        return self.root / patient_id / "lungs.nii.gz"

    # ---- validity ----
    def problem(self, patient_id: str, *, need_spect: bool = True, patient: Patient | None = None) -> str | None:
        """Why the entry cannot be used (None when it can). With `patient`, an entry made from other
        input files (a regenerated cohort, an edited image) is stale too."""
        d = self.entry_dir(patient_id)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            return "missing"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return "meta.json unreadable"
        if meta.get("config_hash") != self.key:
            return "config mismatch"
        if need_spect and "spect.npy" not in meta.get("files", {}):
            return "no SPECT in entry"
        if patient is not None and meta.get("inputs") is not None and meta["inputs"] != input_fingerprint(patient):
            return "inputs changed since it was built"
        for name, info in meta.get("files", {}).items():
            f = d / name
            if not f.is_file() or f.stat().st_size != info["bytes"]:
                return f"{name} damaged (size)"
            if _crc(f) != info["crc32"]:
                return f"{name} damaged (checksum)"
        return None

    # ---- writing ----
    def write(self, pre: Preprocessed, patient: Patient | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / f"{self.key}.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        final = self.entry_dir(pre.patient_id)
        with atomic_directory(final, prefix=f".{self.key}.tmp-") as tmp:
            files: dict[str, Any] = {}
            arrays = {"ct": pre.ct, "lung": pre.lung, "mask": pre.mask}
            if pre.spect is not None:
                arrays["spect"] = pre.spect
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
            np.savez_compressed(tmp / "grid_lungs.npz", labels=pre.grid_lungs.astype(np.uint8))
            if pre.registration is not None:  # register_spect: the transform and its QA overlay
                from ctpm.data.registration import write_qa_png, write_registration_json

                write_registration_json(pre.registration, tmp / "registration.json", patient=pre.patient_id)
                write_qa_png(pre.registration, tmp / "registration_qa.png", patient=pre.patient_id)
            for f in sorted(tmp.iterdir()):
                files[f.name] = {"bytes": f.stat().st_size, "crc32": _crc(f)}
            meta = {
                "patient_id": pre.patient_id,
                "config_hash": self.key,
                "version": CACHE_VERSION,
                "sides": pre.sides,
                "roi_size": list(pre.ct.shape[1:]),
                "lung_ops": {s: json.loads(ops_to_json(o)) for s, o in pre.lung_ops.items()},
                "grid_affine": pre.grid_affine.tolist(),
                "grid_shape": list(pre.grid_lungs.shape),
                "ct_shape": list(pre.ct_shape),
                "ct_affine": np.asarray(pre.ct_affine).tolist(),
                "spect_percentile": pre.spect_percentile,
                "dicom": pre.dicom,
                "inputs": input_fingerprint(patient) if patient is not None else None,
                "files": files,
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
        if pre.ct_lungs is not None:
            save_nifti(pre.ct_lungs, pre.ct_affine, self.qa_lungs_path(pre.patient_id), dtype=np.uint8)
        return final

    # ---- reading ----
    def load(self, patient_id: str, *, mmap: bool = True) -> CacheEntry:
        d = self.entry_dir(patient_id)
        try:
            meta = json.loads((d / "meta.json").read_text())
            mode = "r" if mmap else None
            arr = {n: np.load(d / f"{n}.npy", mmap_mode=mode) for n in ARRAYS if (d / f"{n}.npy").is_file()}
        except (OSError, ValueError) as exc:
            raise CtpmError(f"cache entry unreadable ({exc}); run ctpm-preprocess again", patient=patient_id, path=d) from None
        return CacheEntry(patient_id, d, meta, arr["ct"], arr["lung"], arr["mask"], arr.get("spect"))

    def ensure(
        self,
        patients: Iterable[Patient],
        *,
        with_spect: bool = True,
        workers: int = 1,
        progress: bool = True,
        roundtrip: bool = False,
        force: list[str] | None = None,
    ) -> tuple[dict[str, str], dict[str, float]]:
        """Build the entries that are missing or damaged (all of them with roundtrip, which needs
        the evaluation grid). Returns ({patient_id: status}, {patient_id: roundtrip R}); status is
        "cached", "built", "rebuilt" or "failed: <message>". Failures do not stop the others."""
        from tqdm.auto import tqdm

        patients = list(patients)
        status: dict[str, str] = {}
        rt: dict[str, float] = {}
        todo: list[Patient] = []
        for p in patients:
            why = self.problem(p.patient_id, need_spect=with_spect, patient=p)
            if why is None and not roundtrip and not (force and p.patient_id in force):
                status[p.patient_id] = "cached"
                continue
            if why not in (None, "missing"):
                warn(f"cache entry {why}; rebuilding it", patient=p.patient_id)
                status[p.patient_id] = "rebuilt"
            todo.append(p)
        bar = tqdm(total=len(todo), desc="ctpm-preprocess", unit="patient", disable=not progress or not todo)
        args = [(self.root, self.cfg, p, with_spect, roundtrip) for p in todo]

        def record(pid: str, result):
            if isinstance(result, str):
                status[pid] = f"failed: {result}"
            else:
                status.setdefault(pid, "built")
                if result is not None:
                    rt[pid] = result
            bar.update()

        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init) as pool:
                futures = {pool.submit(_build_one, *a): a[2].patient_id for a in args}
                for fut in as_completed(futures):
                    record(futures[fut], fut.result())
        else:
            for a in args:
                record(a[2].patient_id, _build_one(*a))
        bar.close()
        return status, rt


def _worker_init():
    import torch

    torch.set_num_threads(1)


def _build_one(root, cfg, patient: Patient, with_spect: bool, roundtrip: bool):
    """Preprocess and write one patient. Returns the roundtrip R (or None); a user error comes back
    as its message, so one bad patient does not stop a cohort."""
    try:
        pre = preprocess_patient(patient, cfg, with_spect=with_spect, keep_grid=roundtrip)
        PreprocessCache(root, cfg).write(pre, patient)
    except CtpmError as err:
        return str(err.with_context(patient=patient.patient_id))
    return roundtrip_r(pre, cfg) if roundtrip else None


def roundtrip_r(pre: Preprocessed, cfg) -> float:
    """Spearman R between the standardised SPECT on the evaluation grid and the same SPECT taken
    through crop, resample to roi_size and the inverse: the best any model can reach at roi_size."""
    from ctpm.data.preprocess import restore_to_grid
    from ctpm.metrics import spearman_r

    back = restore_to_grid({s: pre.spect[i] for i, s in enumerate(pre.sides)}, pre.lung_ops, pre.grid_lungs, cfg)
    m = pre.grid_mask > 0
    return float(spearman_r(back[m], pre.grid_spect[m]))


def input_fingerprint(patient: Patient) -> dict[str, list]:
    """Size and modification time of every input of a patient (all files of a DICOM folder)."""
    out: dict[str, list] = {}
    for name in ("ct", "spect", "lung_mask"):
        path = getattr(patient, name, None)
        if path is None:
            continue
        path = Path(path)
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        stats = [f.stat() for f in files]
        out[name] = [str(path.resolve()), sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]
    return out


def _crc(path: Path) -> int:
    c = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            c = zlib.crc32(chunk, c)
    return c
