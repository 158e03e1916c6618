"""The preprocessing cache: one ``PatientRecord`` per patient, keyed by a hash of the preprocessing config.

Layout under the cache folder (``ctpm-preprocess out=DIR``)::

    DIR/<patient>/lungs.nii.gz           the lungs used (1 right, 2 left) in the CT's geometry, for QA:
                                         a copy of the entry's own, written before the entry is committed
    DIR/<patient>/<config-hash>/          one entry (one record) per preprocessing config
        ct.npy spect.npy lung.npy mask.npy   per ROI (sides: each lung, or the thorax; D, H, W) at roi_size
        grid_ct.npy grid_spect.npy grid_mask.npy grid_lungs.npy [grid_lobes.npy grid_truth.npy]
                                             the evaluation grid (HU, standardised SPECT, masks, lobes, truth)
        lungs.nii.gz ct_mask.npy             lungs and evaluation mask (bits) on the CT grid
        registration.json registration_qa.png   with register_spect: the SPECT-to-CT transform, QA overlay
        meta.json                            geometry (grids, each ROI's inverse), SPECT percentile, DICOM
                                             meta, input fingerprint, checksums of every file
    DIR/<config-hash>.json                the config behind a hash (ctpm-evaluate cache=DIR reads it)

Every array is memory-mapped on load. A changed config has another hash, so it never reads a stale
entry. An entry is written into a temporary folder and renamed into place in one step, the commit
point of every file of it (the patient's QA copy of the lungs is written before that rename), so a
killed run leaves nothing that looks complete; checksums in meta.json catch entries damaged
later, which are then rebuilt, and a rerun restores a missing QA copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ctpm.batch import BatchResult, run_batch
from ctpm.data.io import atomic_directory, atomic_path, atomic_write, save_nifti, sweep_temps
from ctpm.data.manifest import Patient, check_patient_id
from ctpm.data.preprocess import preprocess_patient
from ctpm.data.record import GRID_ARRAYS, ROI_ARRAYS, LungInverse, PatientRecord, restore
from ctpm.data.transforms import PreprocessConfig
from ctpm.errors import CtpmError, warn
from ctpm.geometry import Grid

# Bump when the code changes what an entry holds for the same config.
CACHE_VERSION = 4
# inputs of a patient whose change makes its entry stale
INPUTS = ("ct", "spect", "lung_mask", "lobes", "perfusion")


def config_hash(cfg: PreprocessConfig) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **cfg.to_dict()}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


class PreprocessCache:
    def __init__(self, root: str | Path, cfg: PreprocessConfig | dict | None = None):
        self.root = Path(root)
        self.cfg = PreprocessConfig.from_any(cfg)
        self.key = config_hash(self.cfg)

    # ---- paths ----
    def entry_dir(self, patient_id: str) -> Path:
        return self.root / check_patient_id(patient_id) / self.key

    def qa_lungs_path(self, patient_id: str) -> Path:
        return self.root / check_patient_id(patient_id) / "lungs.nii.gz"

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
    def write(self, rec: PatientRecord, patient: Patient | None = None) -> Path:
        """Write one record as an entry, in one commit (see the module docstring)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / f"{self.key}.json", json.dumps(self.cfg.to_dict(), indent=1))
        final = self.entry_dir(rec.patient_id)
        with atomic_directory(final) as tmp:
            for name in ROI_ARRAYS + GRID_ARRAYS:
                arr = getattr(rec, name)
                if arr is not None:
                    np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
            save_nifti(rec.ct_lungs, rec.ct_grid.affine, tmp / "lungs.nii.gz", dtype=np.uint8)
            np.save(tmp / "ct_mask.npy", np.packbits(np.asarray(rec.ct_mask, bool).ravel()))
            if rec.registration is not None:  # register_spect: the transform and its QA overlay
                from ctpm.data.registration import write_qa_png, write_registration_json

                write_registration_json(rec.registration, tmp / "registration.json", patient=rec.patient_id)
                write_qa_png(rec.registration, tmp / "registration_qa.png", patient=rec.patient_id)
            files = {f.name: {"bytes": f.stat().st_size, "crc32": _crc(f)} for f in sorted(tmp.iterdir())}
            meta = {
                "patient_id": rec.patient_id,
                "config_hash": self.key,
                "version": CACHE_VERSION,
                "sides": rec.sides,
                "roi_size": list(rec.ct.shape[1:]),
                "inverse": rec.inverse_json(),
                "grid_affine": np.asarray(rec.grid_affine).tolist(),
                "grid_shape": list(rec.grid.shape),
                "ct_affine": rec.ct_grid.affine.tolist(),
                "ct_shape": list(rec.ct_grid.shape),
                "spect_percentile": rec.spect_percentile,
                "dicom": rec.dicom,
                "inputs": input_fingerprint(patient) if patient is not None else None,
                "files": files,
            }
            (tmp / "meta.json").write_text(json.dumps(meta))
            self._copy_qa_lungs(tmp / "lungs.nii.gz", rec.patient_id)  # before the commit
        return final

    def _copy_qa_lungs(self, src: Path, patient_id: str) -> None:
        with atomic_path(self.qa_lungs_path(patient_id)) as part:
            shutil.copyfile(src, part)

    # ---- reading ----
    def load(self, patient_id: str, *, mmap: bool = True) -> PatientRecord:
        """The patient's record, its arrays memory-mapped (read-only)."""
        d = self.entry_dir(patient_id)
        try:
            meta = json.loads((d / "meta.json").read_text())
            mode = "r" if mmap else None
            arr = {n: np.load(d / f"{n}.npy", mmap_mode=mode) if (d / f"{n}.npy").is_file() else None
                   for n in ROI_ARRAYS + GRID_ARRAYS}
            inverse = {s: LungInverse.from_json(v) for s, v in meta["inverse"].items()}
        except (OSError, ValueError, KeyError) as exc:
            raise CtpmError(f"cache entry unreadable ({exc}); run ctpm-preprocess again", patient=patient_id, path=d) from None
        return PatientRecord(
            patient_id=patient_id, sides=list(meta["sides"]), inverse=inverse,
            grid_affine=np.asarray(meta["grid_affine"], np.float64),
            ct_grid=Grid(np.asarray(meta["ct_affine"], np.float64), tuple(meta["ct_shape"])),
            spect_percentile=meta.get("spect_percentile"), dicom=meta.get("dicom", {}), path=d,
            **arr,
        )

    def ensure(
        self,
        patients: Iterable[Patient],
        *,
        with_spect: bool = True,
        workers: int = 1,
        progress: bool = True,
        roundtrip: bool = False,
        force: list[str] | None = None,
        desc: str = "ctpm-preprocess",
    ) -> BatchResult:
        """Build the entries that are missing, stale or damaged (with ``roundtrip``, all of them, and
        measure the roundtrip R). Failures do not stop the others.

        Returns a BatchResult: ``ok`` is {patient_id: (status, roundtrip R or None)}, status
        "cached", "built" or "rebuilt"; ``failed`` the patients that could not be preprocessed.
        """
        patients = list(patients)
        status: dict[str, str] = {}
        todo: list[Patient] = []
        sweep_temps(self.root)
        for p in patients:
            sweep_temps(self.root / p.patient_id)  # what a killed run left (temporary entries, copies)
            why = self.problem(p.patient_id, need_spect=with_spect, patient=p)
            if why is None and not roundtrip and not (force and p.patient_id in force):
                status[p.patient_id] = "cached"
                if not self.qa_lungs_path(p.patient_id).is_file():  # a QA copy removed: restore it
                    self._copy_qa_lungs(self.entry_dir(p.patient_id) / "lungs.nii.gz", p.patient_id)
                continue
            if why not in (None, "missing"):
                warn(f"cache entry {why}; rebuilding it", patient=p.patient_id)
                status[p.patient_id] = "rebuilt"
            todo.append(p)
        built = run_batch(_Builder(self.root, self.cfg, with_spect, roundtrip), todo, workers=workers,
                          progress=progress, desc=desc, initializer=_worker_init)
        result = BatchResult(failed=built.failed)
        for p in patients:
            pid = p.patient_id
            if pid in built.ok:
                result.ok[pid] = (status.get(pid, "built"), built.ok[pid])
            elif status.get(pid) == "cached":
                result.ok[pid] = ("cached", None)
        return result


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (0 <= K < N, e.g. ``$SLURM_ARRAY_TASK_ID/N``) -> (K, N); None -> None."""
    if spec is None or str(spec).strip() == "":
        return None
    try:
        k, n = (int(v) for v in str(spec).split("/"))
    except ValueError:
        raise CtpmError(f"shard={spec!r} is not K/N (shard K of N, counted from 0)") from None
    if not (n >= 1 and 0 <= k < n):
        raise CtpmError(f"shard={spec}: K must be in 0..N-1 (0..{n - 1}), e.g. shard=$SLURM_ARRAY_TASK_ID/{n}")
    return k, n


def shard_patients(patients: Iterable[Patient], index: int, count: int) -> list[Patient]:
    """Shard ``index`` of ``count``: the patients at positions index, index + count, ... of the
    manifest's patients sorted by id. A deterministic partition (every patient in exactly one
    shard, sizes differ by at most one), so the shards of a SLURM array never write the same entry."""
    ordered = sorted(patients, key=lambda p: p.patient_id)
    return ordered[index::count]


def _worker_init():
    import torch

    torch.set_num_threads(1)


class _Builder:
    """Preprocess and write one patient (picklable, for the process pool); returns the roundtrip R
    with ``roundtrip``, else None."""

    def __init__(self, root, cfg, with_spect: bool, roundtrip: bool):
        self.root, self.cfg, self.with_spect, self.roundtrip = root, cfg, with_spect, roundtrip

    def __call__(self, patient: Patient) -> float | None:
        rec = preprocess_patient(patient, self.cfg, with_spect=self.with_spect)
        PreprocessCache(self.root, self.cfg).write(rec, patient)
        return roundtrip_r(rec) if self.roundtrip else None


def roundtrip_r(rec: PatientRecord) -> float:
    """Spearman R between the standardised SPECT on the evaluation grid and the same SPECT taken
    through crop, resample to roi_size and the inverse: the best any model can reach at roi_size."""
    from ctpm.metrics import spearman_r

    back = restore(rec.roi_maps(rec.spect), rec)
    m = np.asarray(rec.grid_mask) > 0
    return float(spearman_r(back[m], np.asarray(rec.grid_spect)[m]))


def cached_configs(root: str | Path) -> dict[str, dict]:
    """{hash: preprocessing config} of the configs a cache folder holds entries of."""
    out = {}
    for f in sorted(Path(root).glob("*.json")):
        if len(f.stem) == 12 and all(c in "0123456789abcdef" for c in f.stem):
            try:
                out[f.stem] = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
    return out


def select_config(root: str | Path, *, explicit: dict | None = None, hashes: Iterable[str] = ()) -> PreprocessConfig:
    """The preprocessing config of a cache folder, from its ``<hash>.json`` files.

    One config there: that one. Several: the one named by ``hashes`` (what the predictions record
    they were made with), else the one that agrees with every key of ``explicit`` (options the
    user set), else an error listing them. With ``explicit`` keys that no cached config agrees
    with, the config they describe (the cache's entries for it are then built)."""
    configs = cached_configs(root)
    explicit = dict(explicit or {})
    named = [h for h in dict.fromkeys(hashes) if h in configs]
    if len(named) == 1:
        return PreprocessConfig.from_any(configs[named[0]])
    candidates = {h: c for h, c in configs.items() if h in named} if named else configs
    if explicit:
        want = PreprocessConfig.from_any({**PreprocessConfig().to_dict(), **explicit}).to_dict()
        agree = {h: c for h, c in candidates.items() if all(c.get(k) == want[k] for k in explicit)}
        if not agree:
            return PreprocessConfig.from_any(want)
        candidates = agree
    if len(candidates) == 1:
        return PreprocessConfig.from_any(next(iter(candidates.values())))
    if not candidates:
        raise CtpmError("no preprocessing config (<hash>.json) in the cache folder; run ctpm-preprocess out=DIR first",
                        path=root)
    listing = "; ".join(f"{h}: " + ", ".join(f"{k}={v}" for k, v in c.items() if k in ("spacing", "roi_size", "roi_mode", "lung_backend"))
                        for h, c in sorted(candidates.items()))
    raise CtpmError(f"the cache holds {len(candidates)} preprocessing configs ({listing}); choose one with "
                    "evaluation.<key>=... (e.g. evaluation.roi_size=[64,32,32])", path=root)


def input_fingerprint(patient: Patient) -> dict[str, list]:
    """Size and modification time of every input of a patient (all files of a DICOM folder)."""
    out: dict[str, list] = {}
    for name in INPUTS:
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

