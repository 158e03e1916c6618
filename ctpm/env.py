"""ctpm-env (or ``python -m ctpm.env``): what a bug report needs, in one paste.

Versions of Python and of the libraries ctpm builds on, the devices (CUDA GPUs with their memory,
or "no GPU"), the optional backends with their status (installed or not; lungmask also whether the
weights file named by CTPM_LUNGMASK_WEIGHTS is there: point it at the file given as
preprocessing.lungmask_weights), and the machine (OS, CPU, memory). Nothing
here needs a GPU or the network, and nothing identifying is printed (no user or host names, no paths
but the lungmask weights the user set).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

# (distribution name, label); the first group is always listed, the second only when installed
CORE = [("ctpm", "ctpm"), ("torch", "torch"), ("monai", "MONAI"), ("pytorch-lightning", "Lightning"),
        ("hydra-core", "Hydra"), ("omegaconf", "omegaconf"), ("torchmetrics", "torchmetrics"), ("wandb", "wandb"),
        ("numpy", "numpy"), ("scipy", "scipy"), ("pandas", "pandas"), ("pydicom", "pydicom"),
        ("nibabel", "nibabel"), ("matplotlib", "matplotlib")]
IF_INSTALLED = [("lightning", "lightning"), ("SimpleITK", "SimpleITK"), ("itk-elastix", "itk-elastix"),
                ("pytomography", "pytomography"), ("highdicom", "highdicom"), ("pylibjpeg", "pylibjpeg")]
BACKENDS = [("lungmask", "lungmask", "preprocessing.lung_backend=lungmask"),
            ("optuna", "optuna", "hparams_search=optuna"),
            ("hydra-submitit-launcher", "hydra-submitit-launcher", "hydra/launcher=submitit_slurm"),
            ("TotalSegmentator", "TotalSegmentator", "lobes from a CT; not used by ctpm itself")]
WEIGHTS_ENV = "CTPM_LUNGMASK_WEIGHTS"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _torch_devices() -> tuple[list[tuple[str, str]], list[str]]:
    """(torch build facts, one line per device)."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch install is what the report must show
        return [("torch import", f"failed ({type(exc).__name__}: {exc})")], ["unknown (torch does not import)"]
    facts = [("CUDA (torch build)", torch.version.cuda or "none (CPU build)")]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    facts.append(("cuDNN", str(cudnn) if cudnn else "none"))
    devices = []
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a driver problem: report it, do not fail
        n = 0
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        devices.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
    if not devices:
        devices.append("no GPU (CUDA not available)")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps (Apple GPU) available")
    facts.append(("torch threads", str(torch.get_num_threads())))
    return facts, devices


def _memory_gib() -> str:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return f"{pages * size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        return "unknown"


def _cpu() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {os.cpu_count()} cores ({usable} usable)"


def report() -> str:
    """The report as text."""
    lines = ["ctpm environment (paste this into a bug report)", "", "== Versions =="]
    lines.append(f"  {'python':<24} {platform.python_version()} ({platform.python_implementation()})")
    torch_facts, devices = _torch_devices()
    for dist, label in CORE:
        lines.append(f"  {label:<24} {_version(dist) or 'not installed'}")
        if dist == "torch":
            lines.extend(f"  {k:<24} {v}" for k, v in torch_facts)
    for dist, label in IF_INSTALLED:
        v = _version(dist)
        if v:
            lines.append(f"  {label:<24} {v}")
    lines += ["", "== Devices =="] + [f"  {d}" for d in devices]
    lines += ["", "== Optional backends =="]
    for dist, label, use in BACKENDS:
        v = _version(dist)
        status = f"installed {v}" if v else "not installed"
        lines.append(f"  {label:<24} {status:<24} ({use})")
        if dist == "lungmask":
            weights = os.environ.get(WEIGHTS_ENV)
            if not weights:
                w = f"{WEIGHTS_ENV} not set"
            elif os.path.isfile(weights):
                w = f"{WEIGHTS_ENV}={weights} (present, {os.path.getsize(weights) / 2**20:.1f} MiB)"
            else:
                w = f"{WEIGHTS_ENV}={weights} (MISSING: no such file)"
            lines.append(f"  {'':<24} weights: {w}")
    lines += ["", "== Machine =="]
    lines.append(f"  {'OS':<24} {platform.system()} {platform.release()} ({platform.machine()})")
    libc = " ".join(platform.libc_ver()).strip()
    if libc:
        lines.append(f"  {'libc':<24} {libc}")
    lines.append(f"  {'CPU':<24} {_cpu()}")
    lines.append(f"  {'memory':<24} {_memory_gib()}")
    lines.append(f"  {'python executable':<24} in a virtual env: {'yes' if sys.prefix != sys.base_prefix else 'no'}")
    return "\n".join(lines)


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print("ctpm-env: print the versions, devices, optional backends and machine, for a bug report.\n"
              "  ctpm-env\n  python -m ctpm.env > env.txt")
        return
    print(report())


if __name__ == "__main__":
    main()
