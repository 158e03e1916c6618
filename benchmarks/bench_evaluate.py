"""ctpm-evaluate from the preprocessing cache against the preprocessing that built it, per patient.

A synthetic cohort of the demo's preset (small) and preprocessing (2 mm grid, ROIs 64 x 32 x 32),
non-cancer patients (the density baseline's fit) and cancer patients (evaluated), as the demo's
study has them. In one fresh process the cache is built (``PreprocessCache.ensure`` of every
patient: what ``ctpm-preprocess`` does); in another the cancer patients are evaluated from it as
``ctpm-evaluate cache=DIR`` does (``evaluate`` + ``write_report``: two prediction sets in CT
geometry, the density baseline fitted on the non-cancer patients, the noise ceiling, metrics,
statistics, figures, report). The reference row evaluates without the cache (every patient
preprocessed then, once).

Seconds per patient: preprocessing over every patient of the cohort, evaluation over the patients
evaluated (the accounting of the demo's ``study.log``). Target: evaluation per patient <= 1.65x
preprocessing per patient (a quarter of the demo's 6.6 before the cache was read).

Run: ``python -m benchmarks.bench_evaluate [--quick]``; ``run()`` returns the rows for the README table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_synth import SEED, synth_settings
from benchmarks.run import bench_main, row, run_child
from ctpm.data.cache import PreprocessCache
from ctpm.data.io import save_nifti
from ctpm.data.manifest import load_manifest
from ctpm.data.record import restore, to_ct

CHILD_MODULE = "benchmarks.bench_evaluate"  # not __name__: that is "__main__" under python -m
MAX_RATIO = 1.65
DEMO_PREPROCESSING = {"spacing": [2.0, 2.0, 2.0], "roi_size": [64, 32, 32]}
QUICK_PREPROCESSING = {"spacing": [4.0, 4.0, 4.0], "roi_size": [32, 16, 16]}
SIZES = {"full": ("small", 5, 5), "quick": ("tiny", 1, 2)}  # preset, non-cancer (fit), cancer (evaluated)


def _child(task: dict) -> dict:
    """One measurement in this (fresh) process: "preprocess", "evaluate" (from the cache) or
    "evaluate_nocache"."""
    import torch

    from ctpm.evaluation.evaluate import evaluate
    from ctpm.evaluation.report import write_report

    torch.set_num_threads(2)
    manifest = load_manifest(task["manifest"])
    start = time.perf_counter()  # imports excluded, as in every bench
    if task["measure"] == "preprocess":
        built = PreprocessCache(task["cache"], task["preprocessing"]).ensure(manifest.patients, progress=False)
        if built.failed:
            raise RuntimeError(built.message("preprocessed"))
    else:
        cache = PreprocessCache(task["cache"], task["preprocessing"]) if task["measure"] == "evaluate" else None
        result = evaluate(manifest, task["predictions"], cfg=task["preprocessing"], cache=cache, cohort="cancer",
                          baseline_predictions=task["baseline"], progress=False)
        write_report(result, task["out"])
    return {"seconds": time.perf_counter() - start}


def _predictions(cache: PreprocessCache, patients, folder: Path, noise: float, seed: int) -> str:
    """Maps in CT geometry as the prediction writer makes them: the ROI SPECT with noise, put back
    through the inverse."""
    rng = np.random.default_rng(seed)
    for p in patients:
        rec = cache.load(p.patient_id)
        roi = np.clip(np.asarray(rec.spect) + rng.normal(0, noise, rec.spect.shape), 0, 1).astype(np.float32)
        save_nifti(to_ct(restore(rec.roi_maps(roi), rec), rec), rec.ct_grid.affine, folder / f"{p.patient_id}.nii.gz")
    return str(folder)


def run(quick: bool = False) -> list[dict]:
    """Evaluation from the cache per patient against preprocessing per patient.

    Args:
        quick: the tiny preset, 1 + 2 patients, a 4 mm grid, instead of the demo's small preset
            and preprocessing with 5 + 5 patients.
    """
    from ctpm.data.synth import synthesise

    preset, n_fit, n_eval = SIZES["quick" if quick else "full"]
    prep = QUICK_PREPROCESSING if quick else DEMO_PREPROCESSING
    settings = synth_settings()
    with tempfile.TemporaryDirectory(prefix="ctpm-bench-evaluate-") as tmp:
        tmp = Path(tmp)
        manifest = synthesise(tmp / "cohort", preset=preset, presets=settings["presets"], physics=settings["physics"],
                              n_noncancer=n_fit, n_cancer=n_eval, seed=SEED, with_dose=False, progress=False)
        task = {"manifest": str(manifest), "cache": str(tmp / "cache"), "preprocessing": prep}
        pre = run_child(CHILD_MODULE, {**task, "measure": "preprocess"}, fast_malloc=False)
        cache = PreprocessCache(tmp / "cache", prep)
        cancer = load_manifest(manifest).cohort("cancer")
        for name in ("pred", "base"):
            (tmp / name).mkdir()
        task["predictions"] = _predictions(cache, cancer, tmp / "pred", 0.1, 0)
        task["baseline"] = _predictions(cache, cancer, tmp / "base", 0.3, 1)
        ev = run_child(CHILD_MODULE, {**task, "measure": "evaluate", "out": str(tmp / "eval")}, fast_malloc=False)
        ev0 = run_child(CHILD_MODULE, {**task, "measure": "evaluate_nocache", "out": str(tmp / "eval0")},
                        fast_malloc=False)
    n_all = n_fit + n_eval
    pre_s, ev_s, ev0_s = pre["seconds"] / n_all, ev["seconds"] / n_eval, ev0["seconds"] / n_eval
    grid = "x".join(f"{v:g}" for v in prep["spacing"])
    roi = "x".join(str(v) for v in prep["roi_size"])
    what = f"{preset} preset, {grid} mm grid, ROIs {roi}"
    ref = f"preprocessing (PreprocessCache.ensure) per patient, {n_all} patients ({n_fit} non-cancer + {n_eval} cancer)"
    return [
        row("evaluate", f"evaluate + write_report from the cache per evaluated patient ({n_eval} cancer patients, two "
            f"prediction sets, density baseline fitted on {n_fit}, report and figures; {what}; 1 run)",
            ev_s, "s", ref, pre_s, ev_s / pre_s, f"<= {MAX_RATIO:g}x preprocessing", ev_s / pre_s <= MAX_RATIO),
        row("evaluate", f"the same without cache= (each patient preprocessed then, once); {what}; 1 run",
            ev0_s, "s", ref, pre_s, ev0_s / pre_s),
    ]


if __name__ == "__main__":
    bench_main(run, _child)
