"""A new patient from CT to the planning system: ctpm-predict (lungs, QA picture, page, an ensemble
from a fold multirun folder, DICOM out) -> ctpm-flart (NIfTI dose with the predicted lungs; RT Dose
with the plan's RT Structure Set), on one tiny synthetic CT-only patient."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ctpm.cli._common import CONF_DIR
from ctpm.data.io import DESCRIPTIONS, load_image
from ctpm.errors import CtpmError
from ctpm.geometry import LPS_TO_RAS, resample
from tests.conftest import synth_settings
from tests.data_helpers import write_ct_series
from tests.test_flart import write_rtdose
from tests.test_predict_evaluate import make_checkpoint


def cfg_of(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=["progress=false", *overrides])


@pytest.fixture(scope="module")
def patient(tmp_path_factory) -> dict:
    """One tiny synthetic cancer patient (CT, dose), its CT also as a DICOM series."""
    from ctpm.synth import synthesise

    root = tmp_path_factory.mktemp("planner")
    manifest = synthesise(root / "cohort", preset="tiny", n_noncancer=0, n_cancer=1, seed=3, progress=False,
                          **synth_settings())
    row = pd.read_csv(manifest).iloc[0]
    ct_nifti = manifest.parent / row["ct"]
    ct = load_image(ct_nifti)
    write_ct_series(root / "ct_dicom", np.clip(ct.array, -1024, 3000), ct.affine)
    return {"root": root, "id": row["patient_id"], "ct": ct_nifti, "dose": manifest.parent / row["dose"],
            "lobes": manifest.parent / row["lobes"], "ct_dicom": root / "ct_dicom"}


@pytest.fixture(scope="module")
def multirun(patient) -> Path:
    """A fold multirun folder as ctpm-train leaves it: <n>/checkpoints/last.ckpt and <n>/provenance.json,
    plus an unfinished run (a checkpoint, no record) that must be left out."""
    root = patient["root"] / "multirun"
    for fold in (1, 0, 2):
        run = root / str(fold)
        (run / "checkpoints").mkdir(parents=True)
        make_checkpoint(run / "checkpoints" / "last.ckpt", seed=fold)
        if fold < 2:
            (run / "provenance.json").write_text(json.dumps(
                {"stage": "finetune", "fold": fold, "checkpoint": "checkpoints/last.ckpt"}))
    return root


@pytest.fixture(scope="module")
def predicted(patient, multirun) -> Path:
    from ctpm.cli.predict import run

    out = patient["root"] / "pred"
    with pytest.warns(Warning, match="no provenance.json"):
        run(cfg_of("predict", [f"ct={patient['ct_dicom']}", f"patient_id={patient['id']}", f"ckpt={multirun}",
                               f"lobes={patient['lobes']}", f"out={out}", "dicom=true", "dicom_identity=copy"]))
    return out


def test_predict_writes_lungs_qa_page_and_lists_the_fold_models(patient, multirun, predicted, capsys):
    pid = predicted / patient["id"]
    lungs = nib.load(f"{pid}_lungs.nii.gz")
    ct = load_image(patient["ct_dicom"])
    assert lungs.shape == ct.shape and np.allclose(lungs.affine, ct.affine, atol=1e-4)
    assert set(np.unique(np.asarray(lungs.dataobj))) == {0, 1, 2}
    assert load_image(f"{pid}_lungs.nii.gz", kind="label").meta["description"] == DESCRIPTIONS["lungs"]
    assert load_image(f"{pid}_functional.nii.gz", kind="label").meta["description"] == DESCRIPTIONS["functional"]
    assert Path(f"{pid}_std.nii.gz").is_file()  # two models: an SD map
    # the two finished folds in fold order, the unfinished run left out
    record = json.loads((predicted / "provenance.json").read_text())
    assert record["checkpoints"] == [str((multirun / f / "checkpoints" / "last.ckpt").absolute()) for f in ("0", "1")]
    # the QA picture: slices, wash, SD row: an image of some size with colour in it
    img = pytest.importorskip("matplotlib.image").imread(f"{pid}_qa.png")
    assert img.shape[0] > 500 and img.shape[1] > 900
    rgb = img[..., :3]
    assert np.mean(np.abs(rgb[..., 0] - rgb[..., 2]) > 0.2) > 0.01  # a colour wash, not only grey
    # per-lung and per-lobe numbers in predictions.csv, equal to a count on the written maps
    row = pd.read_csv(predicted / "predictions.csv").set_index("patient_id").loc[patient["id"]]
    labels = np.asarray(lungs.dataobj)
    perf = np.asarray(nib.load(f"{pid}.nii.gz").dataobj)
    voxel_ml = float(np.prod(lungs.header.get_zooms())) / 1000
    assert row["volume_ml_right"] == pytest.approx((labels == 1).sum() * voxel_ml, rel=1e-4)
    assert row["mean_perfusion_left"] == pytest.approx(float(perf[labels == 2].mean()), abs=1e-3)
    assert "volume_ml_RML" in row and "mean_perfusion_LUL" in row
    page = (predicted / "index.html").read_text()
    assert f'src="{patient["id"]}_qa.png"' in page and "file://" not in page and "<script" not in page


def test_index_page_renders_in_headless_chromium(predicted, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    shot = tmp_path / "page.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1400,1000", (predicted / "index.html").as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    img = pytest.importorskip("matplotlib.image").imread(shot)[..., :3]
    assert img.std() > 0.05  # not a blank page
    assert np.mean(np.abs(img[..., 0] - img[..., 2]) > 0.2) > 0.005  # the QA picture's colours are on it


def test_nifti_dose_with_the_predicted_lungs(patient, predicted, tmp_path):
    """ctpm-flart on ctpm-predict's outputs: MLD and fMLD equal a hand computation (the dose resampled
    onto the CT grid, means over the lung labels), the DVH passes through V20 and fV20, and the
    functional map given as the lungs is refused."""
    from ctpm.cli.flart import run

    pid = predicted / patient["id"]
    out = tmp_path / "flart"
    result = run(cfg_of("flart", [f"dose={patient['dose']}", f"perfusion={pid}.nii.gz", f"lungs={pid}_lungs.nii.gz",
                                  f"patient_id={patient['id']}", f"out={out}"]))
    row = result["rows"][0]
    lungs = load_image(f"{pid}_lungs.nii.gz", kind="label")
    dose = load_image(patient["dose"], kind="dose")
    d = resample(dose.array, dose.grid, lungs.grid)[lungs.array > 0].astype(np.float64)
    p = np.clip(load_image(f"{pid}.nii.gz", kind="perfusion").array[lungs.array > 0], 0, None).astype(np.float64)
    assert row["MLD"] == pytest.approx(d.mean(), rel=1e-4)
    assert row["fMLD"] == pytest.approx((d * p).sum() / p.sum(), rel=1e-4)
    assert row["V20"] == pytest.approx(100 * np.mean(d >= 20), abs=0.2)
    dvh = pd.read_csv(out / "dvh" / f"{patient['id']}_dvh.csv").set_index("dose_gy")
    assert dvh.loc[20.0, "V_lungs"] == pytest.approx(row["V20"], rel=1e-5)  # CSV keeps 6 digits
    assert dvh.loc[20.0, "fV_lungs_prediction"] == pytest.approx(row["fV20"], rel=1e-5)
    with pytest.raises(CtpmError, match="functional-volume map"):
        run(cfg_of("flart", [f"dose={patient['dose']}", f"perfusion={pid}.nii.gz",
                             f"lungs={pid}_functional.nii.gz", f"out={tmp_path / 'no'}"]))
    assert not (tmp_path / "no" / "flart.csv").exists()


def rtdose_on(patient: dict, tmp_path: Path, frame_uid: str) -> Path:
    """The synthetic dose as a DICOM RT Dose (LPS) on the CT's axes at twice its voxel size."""
    from ctpm.geometry import Grid

    ct = load_image(patient["ct_dicom"])
    dose = load_image(patient["dose"], kind="dose")
    ras = ct.affine.copy()
    ras[:3, :3] *= 2.0
    grid = Grid(ras, tuple(int(n) // 2 for n in ct.shape))
    on = resample(dose.array, dose.grid, grid)
    lps = LPS_TO_RAS @ ras
    size = np.linalg.norm(lps[:3, :3], axis=0)
    row_dir, col_dir = lps[:3, 0] / size[0], lps[:3, 1] / size[1]
    step = float(np.cross(row_dir, col_dir) @ lps[:3, 2])
    return write_rtdose(tmp_path / f"rd_{frame_uid[-6:]}.dcm", np.transpose(on, (2, 1, 0)), position=lps[:3, 3],
                        offsets=[step * k for k in range(grid.shape[2])], pixel_spacing=(size[1], size[0]),
                        orientation=(*row_dir, *col_dir), frame_uid=frame_uid)


def test_rtdose_with_the_plans_structures(patient, predicted, tmp_path):
    """structures=RS.dcm lungs_roi=Lungs_CTPM on the DICOM CT gives the metrics of the lung labels
    it was drawn from; an RT Dose of another frame of reference is refused, naming both UIDs."""
    from ctpm.cli.flart import run

    pid = predicted / patient["id"]
    rs_path = Path(f"{pid}_rtstruct.dcm")
    rs = pydicom.dcmread(rs_path)
    frame = rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    rd = rtdose_on(patient, tmp_path, frame)
    common = [f"dose={rd}", f"perfusion={pid}.nii.gz", f"ct={patient['ct_dicom']}", f"patient_id={patient['id']}"]
    from_rs = run(cfg_of("flart", [*common, f"structures={rs_path}", "lungs_roi=Lungs_CTPM",
                                   f"out={tmp_path / 'rs'}"]))["rows"][0]
    from_labels = run(cfg_of("flart", [*common, f"lungs={pid}_lungs.nii.gz", f"out={tmp_path / 'labels'}"]))["rows"][0]
    assert from_rs["lungs_from"] == "structures Lungs_CTPM"
    assert from_rs["volume_ml"] == pytest.approx(from_labels["volume_ml"], rel=0.01)
    for key in ("MLD", "fMLD", "V20", "fV20"):
        assert from_rs[key] == pytest.approx(from_labels[key], rel=0.02, abs=0.2), key
    other = rtdose_on(patient, tmp_path, pydicom.uid.generate_uid())
    other_uid = pydicom.dcmread(other, stop_before_pixels=True).FrameOfReferenceUID
    with pytest.raises(CtpmError, match="frames of reference differ") as err:
        run(cfg_of("flart", [f"dose={other}", *common[1:], f"structures={rs_path}", "lungs_roi=Lungs_CTPM",
                             f"out={tmp_path / 'bad'}"]))
    assert frame in str(err.value) and other_uid in str(err.value)
    with pytest.raises(CtpmError, match="has no ROI 'Lungs-GTV'.*Lungs_CTPM"):
        run(cfg_of("flart", [*common, f"structures={rs_path}", "lungs_roi=Lungs-GTV", f"out={tmp_path / 'x'}"]))
    # copy: the CT's own patient and study, for a direct import
    ct_first = pydicom.dcmread(sorted(patient["ct_dicom"].glob("*.dcm"))[0], stop_before_pixels=True)
    assert rs.PatientID == ct_first.PatientID and rs.StudyInstanceUID == ct_first.StudyInstanceUID
