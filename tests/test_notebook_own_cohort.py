"""notebooks/your_own_cohort.ipynb on a tiny synthetic DICOM export (a patient with CT, SPECT and RT
structures, one with a CT only) and a randomly initialised ctpm checkpoint."""

from __future__ import annotations

import csv

import pytest
import torch

from ctpm.data.manifest import load_manifest
from ctpm.models import ARNN
from tests.conftest import TINY_PREPROCESSING
from tests.test_dicom_tree import write_patient
from tests.test_notebooks import _images, execute

pytest.importorskip("nbclient")


def test_your_own_cohort_notebook(tiny_cohort, tmp_path):
    m = load_manifest(tiny_cohort)
    root = tmp_path / "export"
    write_patient(root / "a", m.cohort("cancer")[0], "HOSP-0001", spect=True, rtstruct=True, truth=tmp_path)
    write_patient(root / "b", m.patients[0], "HOSP-0002", spect=False, rtstruct=False)
    # a checkpoint as CTPMModule writes one (random weights: the notebook's mechanics do not depend on training)
    net = ARNN(base_channels=4, depth=3)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "ctpm": {"net_config": {"_target_": "ctpm.models.ARNN", "base_channels": 4, "depth": 3},
                         "preprocessing": TINY_PREPROCESSING}}, ckpt)
    out = tmp_path / "work"
    pre = "preprocessing.spacing=[4.0,4.0,4.0] preprocessing.roi_size=[32,16,16]"
    nb = execute("your_own_cohort.ipynb", {"CTPM_NB_DICOM": str(root), "CTPM_NB_CKPT": str(ckpt),
                                           "CTPM_NB_OUT": str(out), "CTPM_NB_PREPROCESS": pre})
    assert _images(nb) >= 1
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == 2 and sorted(bool(r["spect"]) for r in rows) == [False, True]
    assert any(r["lobes"] for r in rows)
    assert {r["patient_id"] for r in csv.DictReader((out / "predictions" / "predictions.csv").open())} == \
        {r["patient_id"] for r in rows}
    assert (out / "cache" / "roundtrip.csv").is_file()
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "roundtrip" in text or "spearman_r" in text
    assert "$ ctpm-manifest" in text and "$ ctpm-predict" in text and "HOSP-" not in text
