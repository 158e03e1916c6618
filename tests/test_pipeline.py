"""The study as library stages (ctpm.pipeline): each stage's folder records its provenance, the
next stage reads it, finished stages are kept, and the configs come from Hydra's compose API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from ctpm import pipeline
from ctpm.conf import conf_dir
from ctpm.data.cache import PreprocessCache
from ctpm.errors import CtpmError
from ctpm.pipeline import Study
from ctpm.provenance import read_provenance, resolve_in

TINY_TRAINING = ["data.preprocessing.spacing=[4.0,4.0,4.0]", "data.preprocessing.roi_size=[32,16,16]",
                 "data.batch_size=2", "model.net.base_channels=4", "model.net.depth=3", "logger=none",
                 "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                 "data.progress=false"]


def _commands(log: Path) -> list[str]:
    return [line[2:] for line in log.read_text().splitlines() if line.startswith("$ ")]


def test_compose_inside_a_running_hydra_app_leaves_it_as_it_was():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        gh = GlobalHydra.instance().hydra
        cfg = pipeline.compose("train", ["experiment=finetune", "scale=demo", "model.init_from=x.ckpt"])
        assert GlobalHydra.instance().is_initialized() and GlobalHydra.instance().hydra is not None
        assert type(GlobalHydra.instance().hydra) is type(gh)
    assert cfg.data.cohort == "cancer" and list(cfg.data.preprocessing.roi_size) == [64, 32, 32]
    assert not GlobalHydra.instance().is_initialized()


def test_the_preprocessing_is_the_composed_training_block(tmp_path):
    study = Study(tmp_path, scale="demo", train_overrides=["data.preprocessing.lung_backend=lungmask",
                                                          "data.preprocessing.lungmask_weights=/w.pth"])
    prep = pipeline.training_preprocessing(study)
    # every key of the block, not a hand-kept list: the lungmask backend and its weights travel too
    assert prep["lung_backend"] == "lungmask" and prep["lungmask_weights"] == "/w.pth"
    assert prep["spacing"] == [2.0, 2.0, 2.0]
    assert set(prep) == set(OmegaConf.load(Path(conf_dir()) / "preprocessing" / "default.yaml"))


def test_study_cli_composes(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ctpm.cli.study", "--cfg", "job", "train_scale=demo",
                          f"out={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = OmegaConf.create(res.stdout)
    assert cfg.train_scale == "demo" and cfg.out == str(tmp_path)


def test_a_study_without_its_manifest_is_refused(tmp_path):
    with pytest.raises(CtpmError, match="manifest does not exist"):
        pipeline.run_study(Study(tmp_path / "s", manifest=tmp_path / "nope.csv"))


@pytest.mark.slow
def test_stages_record_provenance_and_are_kept_when_done(tiny_cohort, tmp_path):
    study = Study(tmp_path / "study", scale="demo", folds=2, workers=1, train_overrides=TINY_TRAINING,
                  manifest=tiny_cohort)
    cache = pipeline.preprocess(study)
    assert cache["cache_hash"] == PreprocessCache(study.cache, cache["preprocessing"]).key
    assert cache["spacing"] == [4.0, 4.0, 4.0] and (study.cache / "roundtrip.csv").is_file()

    pre = pipeline.pretrain(study)
    assert pre["cache_hash"] == cache["cache_hash"] and pre["manifest"] == str(tiny_cohort)
    ckpt = resolve_in(study.out / "pretrain", pre["checkpoint"])
    assert ckpt == study.out / "pretrain" / "checkpoints" / "last.ckpt" and ckpt.is_file()

    ft = pipeline.finetune(study)
    assert ft["folds"] == [0, 1] and ft["init_from"] == str(ckpt.absolute())
    for k in (0, 1):
        fold = read_provenance(study.out / "finetune" / str(k), "finetune")
        assert fold["fold"] == k and fold["init_from"] == str(ckpt.absolute())
        assert resolve_in(study.out / "finetune", ft["checkpoints"][k]).is_file()
    splits = json.loads((study.cache / "splits.json").read_text())
    predicted = sorted(p.stem.removesuffix(".nii") for d in ft["predictions"]
                       for p in resolve_in(study.out / "finetune", d).glob("*.nii.gz"))
    assert predicted == sorted(pid for f in splits["folds"] for pid in f["test"])

    base = pipeline.predict_pretrained(study)
    assert base["checkpoint"] == str(ckpt.absolute())
    assert all((study.out / "predictions_pretrained" / f"{pid}.nii.gz").is_file() for pid in predicted)

    cmd = pipeline.evaluate_command(study)
    assert f"cache={study.cache}" in cmd and not any(a.startswith("evaluation.") for a in cmd)

    # done stages are kept: nothing runs again
    n = len(_commands(study.log))
    pipeline.preprocess(study), pipeline.pretrain(study), pipeline.finetune(study), pipeline.predict_pretrained(study)
    assert len(_commands(study.log)) == n
    # a fold whose record is gone (an interrupted multirun) runs again, alone
    (study.out / "finetune" / "1" / "provenance.json").unlink()
    pipeline.finetune(study)
    last = _commands(study.log)[-1]
    assert "data.fold=1 " in last + " " and "data.fold=0," not in last
    assert read_provenance(study.out / "finetune" / "1", "finetune")["fold"] == 1

    if "cache" not in OmegaConf.load(Path(conf_dir()) / "evaluate.yaml"):
        pytest.skip("ctpm-evaluate does not take cache= yet")
    pipeline.evaluate(study)
    assert (study.out / "report.md").is_file() and read_provenance(study.out, "evaluate")


def test_seeds_run_one_study_each_and_aggregate(tmp_path, monkeypatch):
    """seeds=[...]: one whole study per cohort seed in seed-<k>/, each synthesised with its seed,
    then seeds.md / seeds_summary.json across them (the studies themselves are stood in for here:
    test_stages_record_provenance_and_are_kept_when_done runs a real one)."""
    calls = []

    def fake_study(study, *, synth=None, fresh=False):
        calls.append((Path(study.out).name, synth["seed"], study.scale))
        r = 0.7 + 0.01 * synth["seed"]
        Path(study.out).mkdir(parents=True)
        (Path(study.out) / "summary.json").write_text(json.dumps(
            {"sets": {"model": {"summary": {"metrics": {"spearman_r": {"mean": r}}}}}}))
        return Path(study.out) / "report.md"

    monkeypatch.setattr(pipeline, "run_study", fake_study)
    report = pipeline.run_seeds(Study(tmp_path / "s", scale="demo"), [3, 5], synth={"preset": "tiny", "seed": 0})
    assert calls == [("seed-3", 3, "demo"), ("seed-5", 5, "demo")]
    agg = json.loads((tmp_path / "s" / "seeds_summary.json").read_text())
    assert agg["values"]["sets.model.summary.metrics.spearman_r.mean"]["mean"] == pytest.approx(0.74)
    assert report.name == "seeds.md" and read_provenance(tmp_path / "s", "seeds")["seeds"] == [3, 5]
    with pytest.raises(CtpmError, match="seeds"):
        pipeline.run_seeds(Study(tmp_path / "t"), [])
