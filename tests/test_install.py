"""A real, non-editable install (a wheel, as `pip install .` builds it) gives working commands: the
configs travel inside the package (ctpm.conf), found without the repository beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built into a wheel from a copy of its sources (nothing written into the
    checkout) and installed with pip into a folder of its own; returns that folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for d in ("ctpm", "conf", "hydra_plugins"):
        shutil.copytree(REPO / d, src / d, ignore=ignore)
    for f in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / f, src / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=120)
    wheel = next((tmp / "dist").glob("ctpm-*.whl"))
    target = tmp / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    return target


def _run(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # the installed folder first on the path: its ctpm, not the checkout's, is imported
    env = {**os.environ, "PYTHONPATH": str(installed), "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_its_commands_work(installed, tmp_path):
    assert (installed / "ctpm" / "conf" / "train.yaml").is_file()
    assert (installed / "ctpm" / "conf" / "scale" / "demo.yaml").is_file()
    assert (installed / "ctpm" / "conf" / "hydra" / "launcher" / "slurm.yaml").is_file()

    where = _run(installed, tmp_path, sys.executable, "-c",
                 "import ctpm, ctpm.conf; print(ctpm.__file__); print(ctpm.conf.conf_dir())")
    assert where.returncode == 0, where.stderr
    module, conf = where.stdout.split()
    assert Path(module).is_relative_to(installed) and Path(conf) == installed / "ctpm" / "conf"

    job = _run(installed, tmp_path, str(installed / "bin" / "ctpm-train"), "--cfg", "job",
               "experiment=finetune", "scale=demo")
    assert job.returncode == 0, job.stderr[-2000:]
    assert "cohort: cancer" in job.stdout and "max_epochs: 10" in job.stdout and "lr: 0.0001" in job.stdout

    synth = _run(installed, tmp_path, str(installed / "bin" / "ctpm-synth"), "--help")
    assert synth.returncode == 0, synth.stderr[-2000:]
    assert "n_noncancer" in synth.stdout
    assert not (tmp_path / "outputs").exists()  # --cfg and --help write nothing
