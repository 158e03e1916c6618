"""The notebooks run top to bottom on tiny data (as a user would run them on the demo's output)."""

from __future__ import annotations

import os

import nbformat
import numpy as np
import pytest

from ctpm.data.io import save_nifti
from ctpm.data.manifest import load_manifest
from ctpm.evaluation.evaluate import evaluate, grid_volumes
from ctpm.evaluation.report import write_report
from tests.conftest import REPO, TINY_PREPROCESSING

nbclient = pytest.importorskip("nbclient")


def execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _images(nb) -> int:
    return sum(1 for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {}))


def test_synthetic_vs_real_ct_notebook(real_ct):
    nb = execute("synthetic_vs_real_ct.ipynb", {"CTPM_NB_PRESET": "tiny", "CTPM_REAL_CT": str(real_ct)})
    assert _images(nb) >= 3


def test_study_figures_notebook(tiny_cohort, tmp_path):
    m = load_manifest(tiny_cohort)
    cfg = {"spacing": TINY_PREPROCESSING["spacing"]}
    rng = np.random.default_rng(0)
    for name, noise in (("model", 0.15), ("base", 0.3)):
        for p in m.cohort("cancer"):
            gv = grid_volumes(p, cfg)
            save_nifti(np.clip(gv.spect + rng.normal(0, noise, gv.shape), 0, 1), gv.affine, tmp_path / name / f"{p.patient_id}.nii.gz")
    result = evaluate(m, tmp_path / "model", cfg=cfg, cohort="cancer", baseline_predictions=tmp_path / "base", progress=False)
    write_report(result, tmp_path / "study")
    nb = execute("study_figures.ipynb", {"CTPM_STUDY_DIR": str(tmp_path / "study")})
    assert _images(nb) >= 4
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Wilcoxon p" in text
