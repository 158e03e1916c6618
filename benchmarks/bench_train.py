"""Training throughput: the train step of the default ARNN against the data loader.

- Train step: forward, ``masked_loss`` (as ``CTPMModule`` computes it), backward and Adam, batch 2,
  on random inputs (the speed of a step does not depend on the values), in a fresh process on
  2 CPU threads. At the paper's 128 x 64 x 64 once with glibc's malloc thresholds raised (see
  ``benchmarks.run.FAST_MALLOC``) and once with glibc's defaults, which shows what the thresholds
  change in speed and in memory; and at 64 x 32 x 32, the demo's size.
- Data loader: ``DataLoader(LungDataset(...), batch_size=2, num_workers=0)`` over a preprocessing cache
  of 2 small-preset synthetic patients (4 lungs at 128 x 64 x 64), many epochs. Target: at least 5x
  the samples per second of the train step, so that loading never holds training up.
- With a GPU: the 128 x 64 x 64 step in float32, with bf16 autocast, with ``torch.compile`` and with
  both, and each one's peak GPU memory.

Run: ``python -m benchmarks.bench_train [--quick]``; ``run()`` returns the rows for the README table.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.bench_synth import SEED, synth_settings
from benchmarks.run import GB, bench_main, median, repeats_text, row, run_child
from ctpm.data.cache import PreprocessCache
from ctpm.data.datamodule import LungDataset
from ctpm.data.manifest import load_manifest
from ctpm.data.transforms import PreprocessConfig
from ctpm.lightning.module import masked_loss
from ctpm.models import ARNN
from ctpm.synth import synthesise

CHILD_MODULE = "benchmarks.bench_train"  # not __name__: that is "__main__" under python -m
BATCH = 2
MIN_LOADER_RATIO = 5.0
CACHE_PATIENTS = 2
GPU_VARIANTS = {  # name: (bf16 autocast, torch.compile)
    "float32": (False, False),
    "bf16 autocast": (True, False),
    "torch.compile": (False, True),
    "torch.compile + bf16 autocast": (True, True),
}


@dataclass(frozen=True)
class Plan:
    """Sizes and repeats of one run. Steps are (size, warm-up steps, timed steps)."""

    roi_step: tuple[tuple[int, int, int], int, int]
    demo_step: tuple[tuple[int, int, int], int, int]
    gpu_step: tuple[tuple[int, int, int], int, int]
    cache_preset: str
    preprocessing: dict
    loader_epochs: int


FULL = Plan(
    roi_step=((128, 64, 64), 1, 3),  # ~10-40 s a step on 2 shared cores: 3 timed steps give a median
    demo_step=((64, 32, 32), 2, 6),
    gpu_step=((128, 64, 64), 5, 30),  # the compiled variants compile during the warm-up
    cache_preset="small",
    preprocessing={},  # the default config: 1 mm grid, 128 x 64 x 64 per lung
    loader_epochs=50,
)
QUICK = Plan(  # 16x8x8 is about the smallest the default ARNN takes (instance norm needs > 1 voxel at 1/8)
    roi_step=((32, 16, 16), 1, 1),
    demo_step=((16, 8, 8), 1, 1),
    gpu_step=((32, 16, 16), 1, 1),
    cache_preset="tiny",
    preprocessing={"spacing": [4.0, 4.0, 4.0], "roi_size": [32, 16, 16]},
    loader_epochs=2,
)


def _size(size) -> str:
    return "x".join(str(n) for n in size)


# --------------------------------------------------------------------------------------------------
# Train step (in a child process)
# --------------------------------------------------------------------------------------------------


def _child(task: dict) -> dict:
    """Time train steps of a default ARNN in this (fresh) process at each of ``task["steps"]``.

    task: device ("cpu" or "cuda"), bf16 (autocast), compile (torch.compile), steps
    [[size, warm-up, timed], ...]. Returns the timed steps' seconds per size and, on a GPU, the
    GPU's name and the peak memory allocated during each size's timed steps.
    """
    torch.set_num_threads(2)
    device = torch.device(task["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(SEED)
    net = ARNN().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    model = torch.compile(net) if task["compile"] else net
    result: dict = {"step_seconds": [], "peak_gpu_bytes": []}
    for size, warmup, steps in task["steps"]:
        shape = (BATCH, 1, *size)
        ct, spect = torch.rand(shape, device=device), torch.rand(shape, device=device)
        lung = (torch.rand(shape, device=device) > 0.3).float()

        def train_step(ct=ct, lung=lung, spect=spect) -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=task["bf16"]):
                pred = model(ct, lung)
            masked_loss(pred.float(), spect, lung).backward()
            optimizer.step()
            if cuda:
                torch.cuda.synchronize(device)  # kernels run asynchronously: wait for them

        for _ in range(warmup):
            train_step()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            train_step()
            seconds.append(time.perf_counter() - start)
        result["step_seconds"].append(seconds)
        if cuda:
            result["peak_gpu_bytes"].append(torch.cuda.max_memory_allocated(device))
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(device)
    return result


def _step_children(plan: Plan) -> dict[str, dict]:
    """Results of every train-step child: CPU with and without the malloc thresholds, GPU variants."""
    cpu = {"device": "cpu", "bf16": False, "compile": False}
    results = {
        "cpu": run_child(CHILD_MODULE, {**cpu, "steps": [plan.roi_step, plan.demo_step]}, fast_malloc=True),
        "cpu glibc": run_child(CHILD_MODULE, {**cpu, "steps": [plan.roi_step]}, fast_malloc=False),
    }
    if torch.cuda.is_available():
        for name, (bf16, compile_) in GPU_VARIANTS.items():
            task = {"device": "cuda", "bf16": bf16, "compile": compile_, "steps": [plan.gpu_step]}
            results[name] = run_child(CHILD_MODULE, task, fast_malloc=True)
    return results


def _samples_per_s(step_seconds: list[float]) -> float:
    return BATCH / median(step_seconds)


# --------------------------------------------------------------------------------------------------
# Data loader (in this process)
# --------------------------------------------------------------------------------------------------


def loader_samples_per_s(plan: Plan) -> tuple[float, int]:
    """Samples per second of the training DataLoader over a fresh cache, median epoch, and the
    number of lungs in the cache."""
    settings = synth_settings()
    with tempfile.TemporaryDirectory(prefix="ctpm-bench-loader-") as tmp:
        manifest = synthesise(Path(tmp) / "cohort", preset=plan.cache_preset, presets=settings["presets"],
                              physics=settings["physics"], n_noncancer=CACHE_PATIENTS, n_cancer=0, seed=SEED,
                              with_dose=settings["with_dose"], progress=False)
        patients = load_manifest(manifest).patients
        cache = PreprocessCache(Path(tmp) / "cache", plan.preprocessing)
        built = cache.ensure(patients, progress=False)
        if built.failed:
            raise RuntimeError("could not build the loader's cache: " + built.message("preprocessed"))
        dataset = LungDataset(cache, [p.patient_id for p in patients])
        loader = DataLoader(dataset, batch_size=BATCH, num_workers=0)
        for _ in loader:  # the first epoch faults the memory-mapped entries in
            pass
        epoch_seconds = []
        for _ in range(plan.loader_epochs):
            start = time.perf_counter()
            samples = sum(batch["ct"].shape[0] for batch in loader)
            epoch_seconds.append(time.perf_counter() - start)
    return samples / median(epoch_seconds), len(dataset)


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def run(quick: bool = False) -> list[dict]:
    """Train-step and loader throughput (samples/s), the malloc comparison and, with a GPU, its variants.

    Args:
        quick: tiny sizes, a tiny-preset cache and single steps instead of the paper's sizes.
    """
    torch.set_num_threads(2)
    plan = QUICK if quick else FULL
    steps = _step_children(plan)
    loader_rate, lungs = loader_samples_per_s(plan)

    roi_size, _, roi_steps = plan.roi_step
    demo_size, _, demo_steps = plan.demo_step
    cache_roi = PreprocessConfig.from_any(plan.preprocessing).roi_size
    step_what = f"train step (forward + masked_loss + backward + Adam), default ARNN, batch {BATCH}"
    cpu_rate = _samples_per_s(steps["cpu"]["step_seconds"][0])
    glibc_rate = _samples_per_s(steps["cpu glibc"]["step_seconds"][0])
    cpu_peak, glibc_peak = steps["cpu"]["peak_rss_bytes"] / GB, steps["cpu glibc"]["peak_rss_bytes"] / GB
    cpu_ref = f"train step {_size(roi_size)}, CPU"
    rows = [
        row("train", f"{step_what}, {_size(roi_size)}, CPU 2 threads, malloc thresholds raised "
            f"({repeats_text(roi_steps, 'steps')})", cpu_rate, "samples/s"),
        row("train", f"same with glibc's default malloc thresholds ({repeats_text(roi_steps, 'steps')})",
            glibc_rate, "samples/s", "thresholds raised", cpu_rate, glibc_rate / cpu_rate),
        row("train", "peak RSS of the train-step process, glibc's default malloc thresholds", glibc_peak, "GB",
            "thresholds raised", cpu_peak, glibc_peak / cpu_peak),
        row("train", f"{step_what}, {_size(demo_size)} (the demo's size), CPU 2 threads, thresholds raised "
            f"({repeats_text(demo_steps, 'steps')})", _samples_per_s(steps["cpu"]["step_seconds"][1]),
            "samples/s", cpu_ref, cpu_rate, _samples_per_s(steps["cpu"]["step_seconds"][1]) / cpu_rate),
        row("train", f"DataLoader(LungDataset), batch {BATCH}, num_workers=0, cache of {CACHE_PATIENTS} "
            f"{plan.cache_preset}-preset patients ({lungs} lungs at {_size(cache_roi)}; "
            f"{repeats_text(plan.loader_epochs, 'epochs')})", loader_rate, "samples/s",
            cpu_ref, cpu_rate, loader_rate / cpu_rate, f">= {MIN_LOADER_RATIO:g}x the step",
            loader_rate >= MIN_LOADER_RATIO * cpu_rate),
    ]
    if torch.cuda.is_available():
        rows += _gpu_rows(steps, plan, step_what, loader_rate)
    return rows


def _gpu_rows(steps: dict[str, dict], plan: Plan, step_what: str, loader_rate: float) -> list[dict]:
    """Per GPU variant: samples/s and peak memory against float32's; the loader against the fastest."""
    size, _, timed = plan.gpu_step
    gpu = steps["float32"]["gpu"]
    rates = {name: _samples_per_s(steps[name]["step_seconds"][0]) for name in GPU_VARIANTS}
    peaks = {name: steps[name]["peak_gpu_bytes"][0] / GB for name in GPU_VARIANTS}
    rows = []
    for name in GPU_VARIANTS:
        step = f"{step_what}, {_size(size)}, {gpu}, {name} ({repeats_text(timed, 'steps')})"
        memory = f"peak GPU memory allocated during those steps, {name}"
        if name == "float32":  # the reference of the others
            rows += [row("train (GPU)", step, rates[name], "samples/s"), row("train (GPU)", memory, peaks[name], "GB")]
            continue
        rows += [
            row("train (GPU)", step, rates[name], "samples/s", "float32", rates["float32"],
                rates[name] / rates["float32"]),
            row("train (GPU)", memory, peaks[name], "GB", "float32", peaks["float32"], peaks[name] / peaks["float32"]),
        ]
    fastest = max(rates, key=rates.get)
    rows.append(row("train (GPU)", f"DataLoader (as above) against the fastest GPU step ({fastest})",
                    loader_rate, "samples/s", f"train step, {gpu}, {fastest}", rates[fastest],
                    loader_rate / rates[fastest]))
    return rows


if __name__ == "__main__":
    bench_main(run, _child)
