"""Cohorts: which patients (the paper's institutions and cohorts), their files and the manifest."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ctpm.data.io import atomic_write, save_nifti
from ctpm.data.manifest import write_manifest
from ctpm.errors import CtpmError
from ctpm.synth.patient import PatientData, make_patient
from ctpm.synth.spect import Scatter


def cohort_plan(n_noncancer: int, n_cancer: int, cancer_institutions: dict[str, float]) -> list[tuple[str, str, str]]:
    """(patient_id, cohort, institution) for every patient; institutions split as in the paper."""
    plan = [(f"NC-A-{i + 1:03d}", "noncancer", "A") for i in range(n_noncancer)]
    shares = {k: float(v) for k, v in cancer_institutions.items()}
    total = sum(shares.values())
    counts = {k: int(round(n_cancer * v / total)) for k, v in shares.items()}
    first = next(iter(counts))
    counts[first] += n_cancer - sum(counts.values())
    for inst, n in counts.items():
        plan += [(f"LC-{inst}-{i + 1:03d}", "cancer", inst) for i in range(n)]
    return plan


def write_patient(data: PatientData, out: Path) -> dict[str, Any]:
    """The patient's files under ``out/<patient_id>/``; returns its manifest row (paths relative to
    ``out``; ``spect_fwhm_mm``: the camera PSF its SPECT was simulated with)."""
    pdir = out / data.patient_id
    pdir.mkdir(parents=True, exist_ok=True)
    save_nifti(data.ct, data.ct_affine, pdir / "ct.nii.gz", dtype=np.int16)
    save_nifti(data.spect, data.spect_affine, pdir / "spect.nii.gz", dtype=np.float32)
    save_nifti(data.lobes, data.ct_affine, pdir / "lobes.nii.gz", dtype=np.uint8)
    save_nifti(data.perfusion, data.perfusion_affine, pdir / "perfusion.nii.gz", dtype=np.float32)
    row = {
        "patient_id": data.patient_id,
        "cohort": data.cohort,
        "institution": data.institution,
        "ct": f"{data.patient_id}/ct.nii.gz",
        "spect": f"{data.patient_id}/spect.nii.gz",
        "lobes": f"{data.patient_id}/lobes.nii.gz",
        "perfusion": f"{data.patient_id}/perfusion.nii.gz",
        "tumor_diameter_mm": "" if data.tumor_diameter_mm is None else f"{data.tumor_diameter_mm:.1f}",
        "spect_fwhm_mm": "" if data.spect_fwhm_mm is None else f"{data.spect_fwhm_mm:.3f}",
    }
    if data.oracle is not None:  # the perfusion the CT-visible causes alone give (truth's grid)
        save_nifti(data.oracle, data.perfusion_affine, pdir / "oracle.nii.gz", dtype=np.float32)
        row["oracle"] = f"{data.patient_id}/oracle.nii.gz"
    if data.causes is not None:
        row["causes"] = " ".join(data.causes)
    if data.spect_info is not None:
        atomic_write(pdir / "spect.json", json.dumps(data.spect_info, indent=1, sort_keys=True) + "\n")
        row["spect_info"] = f"{data.patient_id}/spect.json"
        row["spect_model"] = data.spect_info["model"]
    if data.dose is not None:
        save_nifti(data.dose, data.dose_affine, pdir / "dose.nii.gz", dtype=np.float32)
        row["dose"] = f"{data.patient_id}/dose.nii.gz"
    return row


def _one(args) -> dict[str, Any]:
    pid, cohort, inst, preset, physics, seed, out, with_dose = args
    data = make_patient(pid, cohort, inst, preset, physics, seed, with_dose=with_dose)
    return write_patient(data, Path(out))


def synthesise(
    out: str | Path,
    *,
    preset: str,
    presets: dict,
    physics: dict,
    n_noncancer: int,
    n_cancer: int,
    seed: int = 0,
    workers: int = 1,
    cancer_institutions: dict[str, float] | None = None,
    with_dose: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a two-cohort synthetic set and its manifest; returns the manifest path."""
    from tqdm.auto import tqdm

    if preset not in presets:
        raise CtpmError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    if n_noncancer < 0 or n_cancer < 0 or n_noncancer + n_cancer == 0:
        raise CtpmError("ask for at least one patient (n_noncancer, n_cancer >= 0)")
    for cam in physics["spect"]["camera"].values():  # bad scatter settings: before the first patient
        Scatter.from_config(physics["spect"], cam)
    out = Path(out)
    manifest = out / "manifest.csv"
    if manifest.exists() and not overwrite:
        raise CtpmError("a cohort already exists here; choose another out= or pass overwrite=true", path=out)
    out.mkdir(parents=True, exist_ok=True)
    plan = cohort_plan(n_noncancer, n_cancer, cancer_institutions or {"A": 14, "B": 19})
    jobs = [(pid, c, inst, dict(presets[preset]), physics, int(seed), str(out), with_dose) for pid, c, inst in plan]
    rows: list[dict] = []
    bar = tqdm(total=len(jobs), desc=f"ctpm-synth {preset}", unit="patient", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for row in pool.map(_one, jobs):
                rows.append(row)
                bar.update()
    else:
        for job in jobs:
            rows.append(_one(job))
            bar.update()
    bar.close()
    write_manifest(manifest, rows)  # last: a cohort without its manifest is visibly incomplete
    return manifest
