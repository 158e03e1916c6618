"""ctpm-predict and ctpm-evaluate: outputs in CT geometry, the paper's metrics against independent
computations (scipy, hand-computed cases), the report, missing patients and folds."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from ctpm.data.cache import PreprocessCache
from ctpm.data.io import save_nifti
from ctpm.data.manifest import load_manifest
from ctpm.errors import CtpmError
from ctpm.evaluation.evaluate import GridVolumes, evaluate, grid_volumes, map_metrics
from ctpm.lightning.predictor import HIGH, LOW, Predictor, write_prediction
from ctpm.models import ARNN
from tests.conftest import TINY_PREPROCESSING
from tests.helpers import run_cli

NET = {"_target_": "ctpm.models.ARNN", "base_channels": 4, "depth": 3}


def make_checkpoint(path: Path, seed: int) -> Path:
    """A ctpm checkpoint (as CTPMModule writes it) with random weights: prediction mechanics do
    not depend on training."""
    torch.manual_seed(seed)
    net = ARNN(base_channels=4, depth=3)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "ctpm": {"net_config": NET, "preprocessing": TINY_PREPROCESSING}}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("ckpt")
    return [make_checkpoint(d / f"m{i}.ckpt", i) for i in range(2)]


def test_predict_writes_maps_in_ct_geometry(tiny_cohort, ckpts, tmp_path):
    p = load_manifest(tiny_cohort).cohort("cancer")[0]
    pred = Predictor([str(c) for c in ckpts]).predict({"patient_id": p.patient_id, "ct": p.ct})
    files = write_prediction(pred, tmp_path)
    ct = nib.load(str(p.ct))
    for name in ("perfusion", "functional", "std"):
        img = nib.load(str(files[name]))
        assert img.shape == ct.shape
        np.testing.assert_allclose(img.affine, ct.affine, atol=1e-5)
    perf = np.asarray(nib.load(str(files["perfusion"])).dataobj)
    func = np.asarray(nib.load(str(files["functional"])).dataobj)
    assert perf.dtype == np.float32 and 0 <= perf.min() and perf.max() <= 1
    assert set(np.unique(func)) <= {0, LOW, HIGH}
    assert np.all(perf[func == HIGH] >= 0.66) and np.all(perf[func == LOW] < 0.66)
    assert (perf[pred.lungs == 0] == 0).all()  # nothing outside the lungs
    assert pred.std is not None and pred.std.max() > 0  # two different models disagree somewhere


def test_predict_cli_on_dicom_and_manifest(tiny_cohort, ckpts, real_ct, tmp_path):
    res = run_cli("ctpm-predict", f"ct={real_ct}", f"ckpt={ckpts[0]}", f"out={tmp_path / 'real'}", "patient_id=real")
    assert res.returncode == 0, res.stderr[-2000:]
    img = nib.load(str(tmp_path / "real" / "real.nii.gz"))
    assert img.shape == (512, 512, 102)
    func = np.asarray(nib.load(str(tmp_path / "real" / "real_functional.nii.gz")).dataobj)
    assert (func > 0).sum() * np.prod(img.header.get_zooms()) / 1000 > 1000  # > 1 L of evaluated lung
    res = run_cli("ctpm-predict", f"manifest={tiny_cohort}", "cohort=cancer", f"ckpt={ckpts[0]}", f"out={tmp_path / 'm'}")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "m" / "predictions.csv")
    assert len(rows) == 6 and (rows.low_ml + rows.high_ml > 0).all()
    # outputs are never replaced silently
    res = run_cli("ctpm-predict", f"manifest={tiny_cohort}", "cohort=cancer", f"ckpt={ckpts[0]}", f"out={tmp_path / 'm'}")
    assert res.returncode == 2 and "exist already" in res.stderr and "Traceback" not in res.stderr


def test_predict_refuses_bad_checkpoints(tiny_cohort, ckpts, tmp_path):
    with pytest.raises(CtpmError, match="does not exist"):
        Predictor([str(tmp_path / "none.ckpt")])
    torch.save({"state_dict": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(CtpmError, match="not a ctpm checkpoint"):
        Predictor([str(tmp_path / "bare.ckpt")])
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": torch.load(ckpts[0], weights_only=True)["state_dict"],
                "ctpm": {"net_config": NET, "preprocessing": {"spacing": [3.0, 3.0, 3.0], "roi_size": [32, 16, 16]}}}, other)
    with pytest.raises(CtpmError, match="different preprocessing"):
        Predictor([str(ckpts[0]), str(other)])


def _spect_as_prediction(gv: GridVolumes, path: Path) -> None:
    save_nifti(gv.spect, gv.affine, path)


def test_prediction_equal_to_spect_scores_one(tiny_cohort, tmp_path):
    m = load_manifest(tiny_cohort)
    cfg = {"spacing": TINY_PREPROCESSING["spacing"]}
    for p in m.cohort("cancer"):
        _spect_as_prediction(grid_volumes(p, cfg), tmp_path / f"{p.patient_id}.nii.gz")
    result = evaluate(m, tmp_path, cfg=cfg, cohort="cancer", density_baseline=False, progress=False)
    for row in result["rows"]["model"]:
        assert row["spearman_r"] == pytest.approx(1.0, abs=1e-9)
        assert row["dice_high"] == pytest.approx(1.0) and row["dice_low"] == pytest.approx(1.0)
        for lobe in ("LUL", "LLL", "RUL", "RML", "RLL"):
            if f"mean_pred_{lobe}" in row:
                assert row[f"mean_pred_{lobe}"] == pytest.approx(row[f"mean_spect_{lobe}"], abs=1e-6)


@pytest.mark.parametrize("fault", ["elsewhere", "small grid", "zero"])
def test_prediction_not_on_the_patient_is_refused(tiny_cohort, tmp_path, fault):
    """A map of another geometry or an empty one would score silently as R = 0: one clear message
    naming the patient and the file, exit 2, no report."""
    p = load_manifest(tiny_cohort).cohort("cancer")[0]
    cfg = {"spacing": TINY_PREPROCESSING["spacing"]}
    gv = grid_volumes(p, cfg)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    aff = gv.affine.copy()
    pred = np.clip(gv.spect, 0, 1)
    if fault == "elsewhere":
        aff[:3, 3] += [0.0, 0.0, 400.0]
    elif fault == "small grid":
        pred = pred[: pred.shape[0] // 2]  # the same origin, half the field of view
    else:
        pred = np.zeros_like(pred)
    path = save_nifti(pred, aff, pred_dir / f"{p.patient_id}.nii.gz")
    expected = "zero everywhere" if fault == "zero" else "covers only"
    with pytest.raises(CtpmError, match=expected) as err:
        evaluate(load_manifest(tiny_cohort), pred_dir, cfg=cfg, cohort="cancer", density_baseline=False,
                 progress=False)
    assert p.patient_id in str(err.value) and str(path) in str(err.value)
    out = tmp_path / "report"
    res = run_cli("ctpm-evaluate", f"manifest={tiny_cohort}", f"predictions={pred_dir}", f"out={out}",
                  "evaluation.spacing=[4.0,4.0,4.0]", "density_baseline=false", "progress=false")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert expected in res.stderr and p.patient_id in res.stderr
    assert not (out / "metrics.csv").exists()


def test_r_dice_and_lobe_means_against_independent_computations(tiny_cohort):
    p = load_manifest(tiny_cohort).cohort("cancer")[1]
    gv = grid_volumes(p, {"spacing": TINY_PREPROCESSING["spacing"]})
    rng = np.random.default_rng(0)
    pred = np.clip(gv.spect + rng.normal(0, 0.2, gv.shape), 0, 1).astype(np.float32)
    pred[rng.random(gv.shape) < 0.15] = 0.0  # ties
    row = map_metrics(gv, pred)
    m = gv.mask
    assert row["spearman_r"] == pytest.approx(scipy.stats.spearmanr(pred[m], gv.spect[m])[0], abs=1e-9)
    for name, sel_p, sel_y in (("dice_high", pred[m] >= 0.66, gv.spect[m] >= 0.66), ("dice_low", pred[m] < 0.66, gv.spect[m] < 0.66)):
        expected = 2 * (sel_p & sel_y).sum() / (sel_p.sum() + sel_y.sum())
        assert row[name] == pytest.approx(expected, abs=1e-12)
    lm = m & (gv.lobes == 3)
    assert row["mean_pred_RUL"] == pytest.approx(float(np.float64(pred[lm]).mean()), rel=1e-6)


def test_metrics_on_a_hand_computed_case():
    """4 voxels in the mask: prediction (0.9, 0.7, 0.2, 0.1), SPECT (1.0, 0.5, 0.6, 0.0).
    Ranks (4,3,2,1) vs (4,2,3,1): R = 1 - 6*2/(4*15) = 0.8. High: {0,1} vs {0}: DSC 2/3.
    Low: {2,3} vs {1,2,3}: DSC 2*2/5 = 0.8. Lobe 1 = voxels 0,1: means 0.8 and 0.75."""
    shape = (2, 2, 2)
    mask = np.zeros(shape, bool)
    mask.flat[:4] = True
    pred = np.zeros(shape, np.float32)
    spect = np.zeros(shape, np.float32)
    pred.flat[:4] = [0.9, 0.7, 0.2, 0.1]
    spect.flat[:4] = [1.0, 0.5, 0.6, 0.0]
    lobes = np.zeros(shape, np.uint8)
    lobes.flat[:2] = 1
    lungs = np.where(mask, 2, 0).astype(np.uint8)
    gv = GridVolumes(patient=None, affine=np.eye(4), ct=np.zeros(shape), spect=spect, mask=mask, lungs=lungs, lobes=lobes, truth=None)  # type: ignore[arg-type]
    row = map_metrics(gv, pred)
    assert row["spearman_r"] == pytest.approx(0.8)
    assert row["dice_high"] == pytest.approx(2 / 3)
    assert row["dice_low"] == pytest.approx(0.8)
    assert row["mean_pred_LUL"] == pytest.approx(0.8) and row["mean_spect_LUL"] == pytest.approx(0.75)


def test_evaluate_cli_report_and_missing_folds(tiny_cohort, tmp_path):
    m = load_manifest(tiny_cohort)
    cfg = {"spacing": TINY_PREPROCESSING["spacing"]}
    cancer = m.cohort("cancer")
    fold_dirs = [tmp_path / "f0" / "predictions", tmp_path / "f1" / "predictions"]
    base = tmp_path / "base"
    rng = np.random.default_rng(1)
    for i, p in enumerate(cancer):
        gv = grid_volumes(p, cfg)
        noisy = np.clip(gv.spect + rng.normal(0, 0.15, gv.shape), 0, 1).astype(np.float32)
        worse = np.clip(gv.spect + rng.normal(0, 0.4, gv.shape), 0, 1).astype(np.float32)
        if i < 4:  # the third fold's patients (4, 5) have no prediction: a failed fold job
            d = fold_dirs[i % 2]
            d.mkdir(parents=True, exist_ok=True)
            save_nifti(noisy, gv.affine, d / f"{p.patient_id}.nii.gz")
        base.mkdir(exist_ok=True)
        save_nifti(worse, gv.affine, base / f"{p.patient_id}.nii.gz")
    splits = tmp_path / "splits.json"
    ids = [p.patient_id for p in cancer]
    splits.write_text(json.dumps({"folds": [{"test": ids[0:4:2]}, {"test": ids[1:4:2]}, {"test": ids[4:]}]}))
    out = tmp_path / "report"
    res = run_cli("ctpm-evaluate", f"manifest={tiny_cohort}", f"predictions=[{fold_dirs[0]},{fold_dirs[1]}]",
                  f"baseline_predictions={base}", f"out={out}", f"splits={splits}", "evaluation.spacing=[4.0,4.0,4.0]",
                  "progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 4 and set(metrics.patient_id) == set(ids[:4])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["missing"]) == set(ids[4:])
    assert summary["missing_folds"] == [2]
    # the report's mean R is the mean of metrics.csv (re-derived)
    text = (out / "report.md").read_text()
    assert f"{metrics.spearman_r.mean():.4f}" in text
    top = text.split("## ")[0]
    assert "have no prediction" in top and "Folds without predictions: 2" in top
    assert (out / "density_metrics.csv").exists() and (out / "baseline_metrics.csv").exists()
    # the fine-tuned (less noisy) set beats the baseline set
    b = pd.read_csv(out / "baseline_metrics.csv").set_index("patient_id").loc[metrics.patient_id]
    assert (metrics.spearman_r.values > b.spearman_r.values).all()
    # overlapping fold predictions are refused
    res = run_cli("ctpm-evaluate", f"manifest={tiny_cohort}", f"predictions=[{fold_dirs[0]},{fold_dirs[0]}]",
                  f"out={tmp_path / 'r2'}", "evaluation.spacing=[4.0,4.0,4.0]", "density_baseline=false")
    assert res.returncode == 2 and "must not overlap" in res.stderr


# --------------------------------------------------------------------------------------------------
# Records from the cache
# --------------------------------------------------------------------------------------------------


def _spect_predictions(cache: PreprocessCache, patients, folder: Path, noise: float = 0.1) -> Path:
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    for p in patients:
        gv = cache.load(p.patient_id).evaluation(p)
        save_nifti(np.clip(gv.spect + rng.normal(0, noise, gv.shape), 0, 1), gv.affine, folder / f"{p.patient_id}.nii.gz")
    return folder


@pytest.mark.parametrize("fit", ["noncancer", None])
def test_evaluate_from_the_cache_never_segments_and_scores_as_computed(tiny_cohort, tiny_cache, tmp_path, monkeypatch, fit):
    """From the cache: no lung segmentation (nor any preprocessing) for a cached patient, also for
    the density baseline's fit and leave-one-out; the same rows as the evaluation that computes
    every patient now."""
    import ctpm.data.transforms as transforms

    m = load_manifest(tiny_cohort)
    cache = PreprocessCache(tiny_cache, TINY_PREPROCESSING)
    preds = _spect_predictions(cache, m.cohort("cancer"), tmp_path / "pred")
    computed = evaluate(m, preds, cfg=TINY_PREPROCESSING, cohort="cancer", density_fit_cohort=fit, progress=False)

    def no_segmentation(*a, **k):
        raise AssertionError("lung segmentation ran for a cached patient")

    monkeypatch.setattr(transforms, "segment_lungs", no_segmentation)
    cached = evaluate(m, preds, cache=cache, cohort="cancer", density_fit_cohort=fit, progress=False)
    for name in ("model", "density"):
        a, b = pd.DataFrame(computed["rows"][name]), pd.DataFrame(cached["rows"][name])
        assert len(b) == 6
        pd.testing.assert_frame_equal(a, b)
    assert cached["density_fit"] == computed["density_fit"]


def test_evaluate_builds_missing_patients_into_the_cache(tiny_cohort, tmp_path):
    m = load_manifest(tiny_cohort)
    cancer = m.cohort("cancer")
    cache = PreprocessCache(tmp_path / "cache", TINY_PREPROCESSING)
    cache.ensure(cancer[:2], progress=False)
    preds = _spect_predictions(cache, cancer[:2], tmp_path / "pred")
    evaluate(m, preds, cache=cache, cohort="cancer", progress=False)
    noncancer = [p.patient_id for p in m.cohort("noncancer")]
    assert all(cache.problem(pid) is None for pid in noncancer)  # the density fit's patients, built


def test_evaluate_cli_takes_the_config_of_the_cache(tiny_cohort, tiny_cache, tmp_path):
    """cache=DIR: the preprocessing comes from the cache (no evaluation.* keys); with two configs
    there, an error lists them, and an evaluation.* key chooses."""
    import shutil

    m = load_manifest(tiny_cohort)
    cache = PreprocessCache(tiny_cache, TINY_PREPROCESSING)
    preds = _spect_predictions(cache, m.cohort("cancer"), tmp_path / "pred", noise=0.0)
    local = tmp_path / "cache"
    shutil.copytree(tiny_cache, local)
    res = run_cli("ctpm-evaluate", f"manifest={tiny_cohort}", f"predictions={preds}", f"cache={local}",
                  f"out={tmp_path / 'r1'}", "progress=false")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "r1" / "metrics.csv")
    assert len(metrics) == 6 and np.allclose(metrics.spearman_r, 1.0)
    other = PreprocessCache(local, {**TINY_PREPROCESSING, "roi_size": [16, 8, 8]})
    (local / f"{other.key}.json").write_text(json.dumps(other.cfg.to_dict()))
    res = run_cli("ctpm-evaluate", f"manifest={tiny_cohort}", f"predictions={preds}", f"cache={local}",
                  f"out={tmp_path / 'r2'}", "progress=false")
    assert res.returncode == 2 and "holds 2 preprocessing configs" in res.stderr and other.key in res.stderr
    res = run_cli("ctpm-evaluate", f"manifest={tiny_cohort}", f"predictions={preds}", f"cache={local}",
                  f"out={tmp_path / 'r3'}", "progress=false", "evaluation.roi_size=[32,16,16]", "density_baseline=false")
    assert res.returncode == 0, res.stderr[-3000:]


def test_training_writer_and_predictor_write_the_same_map(tiny_cohort, tiny_cache, ckpts, tmp_path):
    """The inverse is one function: a network's ROI maps of a cached patient written by the
    training's writer equal what ctpm-predict makes of the CT alone."""
    from ctpm.lightning.callbacks import write_patient_map

    p = load_manifest(tiny_cohort).cohort("cancer")[2]
    predictor = Predictor([str(ckpts[0])])
    rec = PreprocessCache(tiny_cache, TINY_PREPROCESSING).load(p.patient_id)
    mean, _ = predictor.roi_maps(rec)
    written = write_patient_map(rec, mean, tmp_path / "w.nii.gz")
    pred = predictor.predict({"patient_id": p.patient_id, "ct": p.ct})
    a = np.asarray(nib.load(str(written)).dataobj)
    assert (a > 0).sum() > 1000
    np.testing.assert_allclose(a, pred.perfusion, atol=1e-5)
    np.testing.assert_allclose(nib.load(str(written)).affine, pred.affine, atol=1e-6)


def test_prediction_folders_name_their_preprocessing(tiny_cache, tmp_path):
    """provenance.json beside the training's predictions: the cache hash that ctpm-evaluate cache=
    picks the records by."""
    from types import SimpleNamespace

    from ctpm.cli.evaluate import _provenance_hashes
    from ctpm.lightning.callbacks import PerfusionWriter

    cache = PreprocessCache(tiny_cache, TINY_PREPROCESSING)
    writer = PerfusionWriter(str(tmp_path / "pred"))
    writer.written = ["x"]
    writer.on_predict_end(SimpleNamespace(datamodule=SimpleNamespace(cache=cache), ckpt_path="last.ckpt", is_global_zero=True, world_size=1), None)
    info = json.loads((tmp_path / "pred" / "provenance.json").read_text())
    assert info["preprocessing_hash"] == cache.key and info["checkpoints"] == ["last.ckpt"]
    assert _provenance_hashes([str(tmp_path / "pred"), str(tmp_path / "none")]) == [cache.key]
