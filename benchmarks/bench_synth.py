"""Time to synthesise one patient: ``make_patient`` and ``write_patient`` (CT, SPECT, lobes, truth
perfusion, dose), per preset and institution.

Targets per patient, files included: ``small`` < 7 s (the demo's 48 patients within 3 minutes on
2 workers), ``clinical`` < 60 s; for both SPECT models (``projection``: pytomography, the default;
``image``: the fast Gaussian one; the projection model with the config's scatter and TEW
correction, which add one convolution of the projections). The reference is the writing alone (compressed NIfTI), the part
no phantom generator can avoid.

Also the helpers the other benchmarks use to get a synthetic patient on disk.

Run: ``python -m benchmarks.bench_synth [--quick]``; ``run()`` returns the rows for the README table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from benchmarks.run import REPO, bench_main, median, repeats_text, row
from ctpm.synth import PatientData, make_patient, write_patient

TARGETS_S = {"small": 7.0, "clinical": 60.0}
MODELS = ("projection", "image")
QUICK_TARGETS_S = {"tiny": TARGETS_S["small"]}  # smoke run: the small preset's bound holds for tiny
INSTITUTIONS = ("A", "B")
SEED = 0


def synth_settings() -> dict[str, Any]:
    """Presets, physics and the dose switch of ``conf/synth.yaml``, as ``ctpm-synth`` uses them."""
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "synth.yaml"), resolve=False)
    return {"presets": cfg["presets"], "physics": cfg["physics"], "with_dose": bool(cfg["dose"])}


def make_cancer_patient(preset: str, institution: str, settings: dict[str, Any] | None = None,
                        model: str | None = None) -> PatientData:
    """The first cancer-cohort patient of ``institution`` (the cancer cohort spans both); ``model``
    overrides the preset's SPECT model."""
    s = settings or synth_settings()
    p = dict(s["presets"][preset])
    if model is not None:
        p["spect_model"] = model
    return make_patient(f"LC-{institution}-001", "cancer", institution, p, s["physics"], SEED, with_dose=s["with_dose"])


def write_synthetic_patient(preset: str, institution: str, out: Path) -> dict[str, Any]:
    """Write one cancer patient under ``out``: patient_id, absolute ct and spect paths, CT shape."""
    data = make_cancer_patient(preset, institution)
    files = write_patient(data, out)
    return {"patient_id": data.patient_id, "ct": str(out / files["ct"]), "spect": str(out / files["spect"]),
            "ct_shape": list(data.ct.shape)}


def time_patient(preset: str, institution: str, settings: dict[str, Any], model: str | None = None
                 ) -> tuple[float, float, tuple, float]:
    """Seconds for make + write and for the write alone, the CT's shape, and the CPU seconds of make
    + write (this process; the SPECT projector runs on one thread)."""
    with tempfile.TemporaryDirectory(prefix="ctpm-bench-synth-") as tmp:
        cpu = time.process_time()
        start = time.perf_counter()
        data = make_cancer_patient(preset, institution, settings, model)
        made = time.perf_counter()
        write_patient(data, Path(tmp))
        done = time.perf_counter()
        cpu = time.process_time() - cpu
    return done - start, done - made, data.ct.shape, cpu


def run(quick: bool = False) -> list[dict]:
    """One row per preset and institution: median seconds per patient against the write alone.

    Args:
        quick: the tiny preset, one run, instead of small and clinical, median of 3.
    """
    settings = synth_settings()
    repeats = 1 if quick else 3
    time_patient("tiny", "A", settings, "projection")  # first calls pay one-off costs (imports) that are not synth's
    rows = []
    for preset, target in (QUICK_TARGETS_S if quick else TARGETS_S).items():
        for model in MODELS:
            for institution in INSTITUTIONS:
                runs = [time_patient(preset, institution, settings, model) for _ in range(repeats)]
                total, write = median([r[0] for r in runs]), median([r[1] for r in runs])
                cpu = median([r[3] for r in runs])
                shape = "x".join(str(n) for n in runs[0][2])
                # the target holds for the CPU time: wall-clock on a shared machine measures the others too
                rows.append(row(
                    "synth", f"one {preset} patient, institution {institution} (CT {shape}), {model} SPECT: "
                    f"make_patient + write_patient ({repeats_text(repeats)}; CPU {cpu:.3g} s)", total, "s",
                    "write_patient alone", write, total / write, f"CPU < {target:g} s", cpu < target,
                ))
    return rows


if __name__ == "__main__":
    bench_main(run)
