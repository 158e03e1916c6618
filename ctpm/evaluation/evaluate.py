"""Multi-level evaluation at the paper's definitions (Ren et al. 2022, "Quantitative evaluation").

Every map is compared on the isotropic grid of the CT (1 mm by default), inside the evaluation mask
(lungs within -1000..-300 HU: tumour and vessels out), against the SPECT standardised to its 75th
percentile in the mask and clipped to 1:
- voxel-wise Spearman R (Eq. 1), per patient and per lung;
- Dice of the high (>= 0.66) and low (< 0.66) functional volumes (Eq. 2);
- mean perfusion of each lobe (LUL, LLL, RUL, RML, RLL) and of each lung;
and beyond the paper: Pearson r beside Spearman R, the same over the lung interior (farther than
one SPECT FWHM from the lungs' border), and the detection of the SPECT's perfusion defects
(:mod:`ctpm.evaluation.defects`). Beside the predictions, every evaluation scores the baselines
of :mod:`ctpm.evaluation.baselines` (the geometry prior, the density baseline) and, on synthetic
patients, the ceilings: the true perfusion, and the true perfusion seen through the SPECT's PSF.
The CT, SPECT, lungs and lobes of a patient are the evaluation-grid part of its record
(``ctpm.data.record.PatientRecord``): read from the preprocessing cache (``cache=``), or computed
by the same preprocessing when it is not there, once, for every prediction set being compared and
for every baseline.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctpm.batch import run_batch
from ctpm.data.cache import PreprocessCache
from ctpm.data.lungs import LEFT, RIGHT
from ctpm.data.manifest import Manifest, Patient
from ctpm.data.preprocess import preprocess_patient
from ctpm.data.record import EvaluationGrid
from ctpm.data.transforms import PreprocessConfig
from ctpm.errors import CtpmError, first_line
from ctpm.evaluation.baselines import (  # noqa: F401
    DensityBaseline,
    GeometryPrior,
    ceiling_maps,
    density_features,
    oracle_map,
)
from ctpm.evaluation.defects import (
    DEFAULT_MIN_DEFECT_ML,
    PatientRegions,
    defect_metrics,
    patient_regions,
)
from ctpm.evaluation.regions import DEFAULT_SPECT_FWHM_MM, patient_fwhm_mm
from ctpm.evaluation.stats import pearson_r
from ctpm.metrics import functional_dice, spearman_r

LOBE_NAMES = {1: "LUL", 2: "LLL", 3: "RUL", 4: "RML", 5: "RLL"}
SIDE_NAMES = {RIGHT: "right", LEFT: "left"}


# One patient on the evaluation grid: the evaluation-grid part of its record (attributes affine,
# ct, spect, mask, lungs, lobes, truth, shape, grid; ``on_grid`` resamples a map onto it).
GridVolumes = EvaluationGrid


def grid_volumes(patient: Patient, cfg: PreprocessConfig | dict | None = None) -> GridVolumes:
    """A patient on the evaluation grid, computed now (``evaluate`` reads the cache instead)."""
    return preprocess_patient(patient, cfg).evaluation(patient)


def map_metrics(gv: GridVolumes, pred: np.ndarray, threshold: float = 0.66, *,
                regions: PatientRegions | None = None, fwhm_mm: float | None = None,
                min_defect_ml: float = DEFAULT_MIN_DEFECT_ML) -> dict[str, float]:
    """The paper's three levels for one predicted map on the evaluation grid, Pearson r beside
    Spearman R, the voxel-wise metrics again over the lung interior, and defect detection.

    ``regions`` (the patient's interior and SPECT defects, :func:`patient_regions`) is computed
    here when not given, with the patient's SPECT FWHM (``fwhm_mm``, else the manifest's
    ``spect_fwhm_mm``, else 13.5 mm); pass it to score several maps of one patient at the cost of one.
    A metric that a region cannot support (an empty interior, no defect) is NaN.
    """
    m = gv.mask
    if not m.any():
        raise CtpmError("evaluation mask is empty", patient=getattr(gv.patient, "patient_id", None))
    if regions is None:
        fwhm = fwhm_mm if fwhm_mm is not None else patient_fwhm_mm(gv.patient, DEFAULT_SPECT_FWHM_MM)
        regions = patient_regions(gv, fwhm, threshold, min_defect_ml)
    row: dict[str, float] = {
        "spearman_r": float(spearman_r(pred[m], gv.spect[m])),
        "pearson_r": pearson_r(pred[m], gv.spect[m]),
    }
    hi, lo = functional_dice(pred[m], gv.spect[m], threshold=threshold)
    row["dice_high"], row["dice_low"] = float(hi), float(lo)
    inner = regions.interior
    row["n_voxels_interior"] = int(inner.sum())
    if inner.sum() > 1:
        row["spearman_r_interior"] = float(spearman_r(pred[inner], gv.spect[inner], undefined="nan"))
        row["pearson_r_interior"] = pearson_r(pred[inner], gv.spect[inner])
        hi, lo = functional_dice(pred[inner], gv.spect[inner], threshold=threshold)
        row["dice_high_interior"], row["dice_low_interior"] = float(hi), float(lo)
    else:
        row.update(spearman_r_interior=float("nan"), pearson_r_interior=float("nan"),
                   dice_high_interior=float("nan"), dice_low_interior=float("nan"))
    row.update(defect_metrics(pred, m, regions.defects, threshold, interior=inner))
    for value, side in SIDE_NAMES.items():
        sm = m & (gv.lungs == value)
        if sm.sum() > 1:
            row[f"spearman_r_{side}"] = float(spearman_r(pred[sm], gv.spect[sm]))
            row[f"mean_pred_{side}"] = float(pred[sm].mean())
            row[f"mean_spect_{side}"] = float(gv.spect[sm].mean())
    if gv.lobes is not None:
        for value, lobe in LOBE_NAMES.items():
            lm = m & (gv.lobes == value)
            if lm.any():
                row[f"mean_pred_{lobe}"] = float(pred[lm].mean())
                row[f"mean_spect_{lobe}"] = float(gv.spect[lm].mean())
    return row


# --------------------------------------------------------------------------------------------------
# Prediction sets
# --------------------------------------------------------------------------------------------------


def find_predictions(dirs: str | Path | Sequence[str | Path], ids: Iterable[str]) -> tuple[dict[str, Path], list[str]]:
    """Map patient ids to `<id>.nii.gz` across one or several folders (the fold jobs' outputs).
    A patient predicted in two folders is an error: out-of-fold predictions must not overlap."""
    if isinstance(dirs, (str, Path)):
        dirs = [dirs]
    folders: list[Path] = []
    for d in dirs:
        matches = sorted(Path().glob(str(d))) if any(ch in str(d) for ch in "*?[") else [Path(d)]
        folders += [m for m in matches if m.is_dir()]
    if not folders:
        raise CtpmError(f"no prediction folder found at {', '.join(str(d) for d in dirs)}")
    found: dict[str, Path] = {}
    for pid in ids:
        hits = [f / f"{pid}.nii.gz" for f in folders if (f / f"{pid}.nii.gz").is_file()]
        if len(hits) > 1:
            raise CtpmError(f"predicted in {len(hits)} folders ({hits[0].parent}, {hits[1].parent}): "
                            "out-of-fold predictions must not overlap", patient=pid)
        if hits:
            found[pid] = hits[0]
    missing = [pid for pid in ids if pid not in found]
    return found, missing


def read_splits(path: str | Path) -> dict:
    """A splits.json (``ctpm.data.datamodule.load_or_make_splits``), checked: a JSON object whose
    ``folds`` is a list of objects, each with a ``test`` list of patient ids."""
    path = Path(path)
    if not path.is_file():
        raise CtpmError("splits file does not exist", path=path)
    try:
        splits = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise CtpmError("splits file is not JSON text", path=path) from None
    except ValueError as exc:
        raise CtpmError(f"splits file is not valid JSON ({first_line(exc)})", path=path) from None
    folds = splits.get("folds") if isinstance(splits, dict) else None
    if not isinstance(folds, list) or not all(isinstance(f, dict) and isinstance(f.get("test"), list) for f in folds):
        raise CtpmError("not a splits.json of ctpm (a JSON object whose 'folds' lists objects with a 'test' list)",
                        path=path)
    return splits


def missing_folds(splits_path: str | Path | None, missing: list[str]) -> list[int]:
    """Folds of splits.json whose test patients have no prediction (e.g. a failed fold job)."""
    if not splits_path or not missing:
        return []
    gone = set(missing)
    return [k for k, f in enumerate(read_splits(splits_path)["folds"]) if gone & {str(t) for t in f["test"]}]


def evaluate(
    manifest: Manifest,
    predictions: Any,
    *,
    cfg: PreprocessConfig | dict | None = None,
    cache: PreprocessCache | str | Path | None = None,
    cohort: str | None = None,
    baseline_predictions: Any = None,
    density_baseline: bool = True,
    density_fit_cohort: str | None = "noncancer",
    threshold: float = 0.66,
    splits: str | None = None,
    progress: bool = True,
    keep_case: str | None = "median",
    min_coverage: float = 0.95,
    geometry_prior: bool = True,
    smooth_density: bool = True,
    default_spect_fwhm_mm: float = DEFAULT_SPECT_FWHM_MM,
    min_defect_ml: float = DEFAULT_MIN_DEFECT_ML,
    ceilings: bool = True,
) -> dict[str, Any]:
    """Evaluate one prediction set (and optionally a second to compare, the baselines and, for
    synthetic patients, the ceilings) on the manifest's patients (of `cohort`, when given) that
    have predictions. The baselines (the geometry prior, the density baseline on HU smoothed to
    the SPECT's resolution unless `smooth_density` is false) are fitted on `density_fit_cohort` of
    the manifest, leave-one-out on the evaluated patients when it has none. Each patient's SPECT
    FWHM is the manifest's `spect_fwhm_mm`, else `default_spect_fwhm_mm`. A prediction whose grid
    covers less than `min_coverage` of a patient's lungs is refused.

    The patients' records come from `cache` (a PreprocessCache, or a cache folder with `cfg`);
    patients missing there are preprocessed into it first. Without `cache`, they are computed into
    a temporary one. Either way each patient is preprocessed at most once.

    Returns {"rows": {set name: [per-patient rows]}, "missing": [...], "missing_folds": [...],
    "case": arrays of a representative patient for the figure}; the sets are "model",
    "baseline", "density", "geometry", "truth_psf", "oracle_psf" and "truth", those evaluated.
    """
    if splits:
        read_splits(splits)  # a bad splits file is refused before the scoring work
    ids = [p.patient_id for p in manifest if cohort is None or p.cohort == cohort]
    if not ids:
        raise CtpmError(f"the manifest has no patient of cohort {cohort!r}", path=manifest.path)
    pred_paths, missing = find_predictions(predictions, ids)
    if not pred_paths:
        raise CtpmError("no prediction matches a patient of the manifest")
    base_paths: dict[str, Path] = {}
    if baseline_predictions:
        base_paths, base_missing = find_predictions(baseline_predictions, list(pred_paths))
        if base_missing:
            raise CtpmError(f"the baseline predictions lack {len(base_missing)} patient(s) that the predictions have "
                            f"(e.g. {base_missing[0]}); a paired comparison needs both")
    patients = [p for p in manifest if p.patient_id in pred_paths]
    fit_patients = [p for p in manifest.patients if (density_baseline or geometry_prior) and density_fit_cohort
                    and p.cohort == density_fit_cohort and p.patient_id not in pred_paths]
    with tempfile.TemporaryDirectory(prefix="ctpm-evaluate-") as tmp:
        if isinstance(cache, PreprocessCache):
            store = cache
        else:
            store = PreprocessCache(cache if cache is not None else tmp, cfg)
        built = store.ensure(patients + fit_patients, with_spect=True, progress=progress,
                             desc="ctpm-evaluate: preprocessing")
        built.raise_if_failed("preprocessed")
        fitted: dict[str, Any] = {}  # the fitted baselines (ctpm.evaluation.baselines)
        if density_baseline:
            fitted["density"] = DensityBaseline(smooth=smooth_density, default_fwhm_mm=default_spect_fwhm_mm)
        if geometry_prior:
            fitted["geometry"] = GeometryPrior(default_fwhm_mm=default_spect_fwhm_mm)
        result = _evaluate_records(store, patients, fit_patients, pred_paths, base_paths, fitted=fitted,
                                   threshold=threshold, progress=progress, keep_case=keep_case,
                                   min_coverage=min_coverage, default_spect_fwhm_mm=default_spect_fwhm_mm,
                                   min_defect_ml=min_defect_ml, ceilings=ceilings)
    result.update(missing=missing, missing_folds=missing_folds(splits, missing),
                  spect_fwhm={"default_mm": float(default_spect_fwhm_mm),
                              "from_manifest": sum(getattr(p, "spect_fwhm_mm", None) is not None for p in patients)},
                  min_defect_ml=float(min_defect_ml), smooth_density=bool(smooth_density))
    if fitted:
        result["density_fit"] = f"{density_fit_cohort} cohort" if fit_patients else "leave-one-out on the evaluated patients"
    else:
        result["density_fit"] = None
    return result


def _info(p: Patient, gv: GridVolumes) -> dict[str, Any]:
    return {"patient_id": p.patient_id, "cohort": p.cohort, "institution": p.institution,
            "tumor_diameter_mm": p.tumor_diameter_mm, "n_voxels": int(gv.mask.sum())}


def _evaluate_records(store: PreprocessCache, patients: list[Patient], fit_patients: list[Patient],
                      pred_paths: dict[str, Path], base_paths: dict[str, Path], *, fitted: dict[str, Any],
                      threshold: float, progress: bool, keep_case: str | None, min_coverage: float,
                      default_spect_fwhm_mm: float, min_defect_ml: float, ceilings: bool) -> dict[str, Any]:
    """The scores of every patient from its record (no preprocessing here)."""
    from tqdm.auto import tqdm

    fit_separately = bool(fit_patients)
    for p in tqdm(fit_patients, desc="baseline fit", unit="patient", disable=not progress or not fit_patients or not fitted):
        gv = store.load(p.patient_id).evaluation(p)
        for b in fitted.values():
            b.add(gv)

    def regions_of(p: Patient, gv: GridVolumes) -> tuple[dict[str, Any], PatientRegions, float]:
        fwhm = patient_fwhm_mm(p, default_spect_fwhm_mm)
        return {**_info(p, gv), "spect_fwhm_mm": fwhm}, patient_regions(gv, fwhm, threshold, min_defect_ml), fwhm

    def score(p: Patient) -> dict[str, Any]:
        gv = store.load(p.patient_id).evaluation(p)
        info, regions, fwhm = regions_of(p, gv)

        def metrics(volume: np.ndarray) -> dict[str, Any]:
            return {**info, **map_metrics(gv, volume, threshold, regions=regions)}

        pred = gv.on_grid(pred_paths[p.patient_id], min_coverage=min_coverage)
        out: dict[str, Any] = {"model": {**metrics(pred), "prediction": str(pred_paths[p.patient_id])}}
        # --- ceilings of synthetic patients: the truth, and the truth seen through the SPECT's PSF ---
        if gv.truth is not None:
            if ceilings:
                for name, volume in ceiling_maps(gv, fwhm).items():
                    out[name] = metrics(volume)
                # one definition of each ceiling: the R of its row in the report's tables
                out["model"]["ceiling_r"] = out["truth"]["spearman_r"]
                out["model"]["ceiling_psf_r"] = out["truth_psf"]["spearman_r"]
            else:
                out["model"]["ceiling_r"] = float(spearman_r(gv.truth[gv.mask], gv.spect[gv.mask]))
        if ceilings and getattr(p, "oracle", None) is not None:  # what CT can know, seen through the PSF
            out["oracle_psf"] = metrics(oracle_map(gv.on_grid(p.oracle), gv, fwhm))
            out["model"]["ceiling_oracle_r"] = out["oracle_psf"]["spearman_r"]
        if base_paths:
            out["baseline"] = metrics(gv.on_grid(base_paths[p.patient_id], min_coverage=min_coverage))
        # --- fitted baselines: scored now, or after all patients for a leave-one-out fit ---
        for name, b in fitted.items():
            if fit_separately:
                out[name] = metrics(b.predict(gv))
            else:
                b.add(gv)  # leave-one-out fit on the evaluated patients themselves
        out["case"] = _light(gv, pred) if keep_case else None
        return out

    scored = run_batch(score, patients, progress=progress, desc="ctpm-evaluate")
    scored.raise_if_failed("evaluated")
    rows: dict[str, list[dict]] = {"model": [v["model"] for v in scored.ok.values()]}
    for name in ("baseline", "truth_psf", "oracle_psf", "truth", *fitted):
        found = [v[name] for v in scored.ok.values() if name in v]
        if found or name in fitted:
            rows[name] = found
    if fitted and not fit_separately:
        for p in tqdm(patients, desc="baselines (leave-one-out)", unit="patient", disable=not progress):
            gv = store.load(p.patient_id).evaluation(p)  # the record again, memory-mapped: no preprocessing
            info, regions, _ = regions_of(p, gv)
            for name, b in fitted.items():
                rows[name].append({**info, **map_metrics(gv, b.predict(gv, leave_out=p.patient_id), threshold,
                                                         regions=regions)})
    case = None
    if keep_case and rows["model"]:
        order = sorted(rows["model"], key=lambda r: r["spearman_r"])
        pick = order[len(order) // 2] if keep_case == "median" else order[-1]
        case = scored.ok[pick["patient_id"]]["case"]
    return {"rows": rows, "case": case}


def _light(gv: GridVolumes, pred: np.ndarray) -> dict[str, Any]:
    """The central slices of a patient (for the representative-case figure), not the whole volumes."""
    c = [int(np.mean(np.nonzero(gv.mask.any(axis=tuple(a for a in range(3) if a != k)))[0])) for k in range(3)]
    one_lung = gv.mask & (gv.lungs == (RIGHT if (gv.mask & (gv.lungs == RIGHT)).any() else LEFT))
    if one_lung.any():  # the sagittal view through the middle of one lung, not the mediastinum
        c[0] = int(np.mean(np.nonzero(one_lung.any(axis=(1, 2)))[0]))
    out: dict[str, Any] = {"patient_id": gv.patient.patient_id, "spacing": np.linalg.norm(gv.affine[:3, :3], axis=0).tolist()}
    for name, arr in (("ct", gv.ct), ("spect", gv.spect), ("pred", pred), ("mask", gv.mask.astype(np.uint8))):
        out[name] = {"axial": arr[:, :, c[2]].copy(), "coronal": arr[:, c[1], :].copy(), "sagittal": arr[c[0], :, :].copy()}
    return out
