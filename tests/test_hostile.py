"""A catalogue of hostile inputs and faults across the tools, on tiny data: for each, one line that
names the patient and the file, status 2, no traceback, and nothing half-written; the good patients
of a batch are still processed. Grow it with every new way of breaking a tool."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra

from ctpm.data.cache import PreprocessCache
from ctpm.data.io import load_image, patient_tag, save_nifti, sweep_temps, temp_path
from ctpm.data.manifest import check_patient_id, load_manifest
from ctpm.errors import CtpmError
from tests.conftest import TINY_PREPROCESSING
from tests.data_helpers import absolute_manifest
from tests.test_predict_evaluate import NET, make_checkpoint

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def cli(main, *args: str, capsys) -> tuple[int, str, str]:
    """A console script's entry point run in this process, as from the shell: (status, stdout, stderr)."""
    GlobalHydra.instance().clear()
    argv, env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = ["ctpm", *args]
    os.environ["HYDRA_FULL_ERROR"] = "0"
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        if env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = env
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, prog: str) -> str:
    """The error line of a failed run; fails the test on a traceback or a second error line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def files_below(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and ".hydra" not in p.parts
                  and not p.name.endswith(".log"))  # Hydra's job log


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.ckpt", 0)


@pytest.fixture(scope="module")
def patient(tiny_cohort):
    return load_manifest(tiny_cohort).by_id()["LC-A-001"]


# --------------------------------------------------------------------------------------------------
# Names that become paths
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pid", ["../x", "a/b", "/abs", "..", ".hidden", "", "a\n", "a b", "x" * 129, "é", "a\\b",
                                 "-rf", "a\0b"])
def test_unsafe_patient_ids_are_refused(pid):
    with pytest.raises(CtpmError, match="may only hold"):
        check_patient_id(pid)


def test_predict_patient_id_cannot_leave_out(patient, ckpt, tmp_path, capsys):
    from ctpm.cli.predict import main

    out = tmp_path / "out"
    code, _, err = cli(main, f"ct={patient.ct}", f"ckpt={ckpt}", f"out={out}", "patient_id=../x", "qa=false",
                       "progress=false", capsys=capsys)
    assert code == 2 and "patient_id=" in one_line_error(err, "ctpm-predict")
    assert not list(tmp_path.glob("x*")) and not (out.exists() and files_below(out))


def test_predict_refuses_to_replace_its_input(patient, ckpt, tmp_path, capsys):
    from ctpm.cli.predict import main

    ct = tmp_path / "P1.nii.gz"
    shutil.copy(patient.ct, ct)
    before = ct.read_bytes()
    code, _, err = cli(main, f"ct={ct}", f"ckpt={ckpt}", f"out={tmp_path}", "qa=false", "overwrite=true",
                       "progress=false", capsys=capsys)
    assert code == 2 and "would replace an input" in one_line_error(err, "ctpm-predict")
    assert ct.read_bytes() == before


# --------------------------------------------------------------------------------------------------
# A patient's outputs: all or none
# --------------------------------------------------------------------------------------------------


def test_dicom_export_of_a_nifti_ct_writes_nothing_and_a_rerun_needs_no_overwrite(patient, ckpt, tmp_path, capsys):
    from ctpm.cli.predict import main

    out = tmp_path / "out"
    args = [f"ct={patient.ct}", f"ckpt={ckpt}", f"out={out}", "qa=false", "progress=false"]
    code, _, err = cli(main, *args, "dicom=true", capsys=capsys)
    assert code == 2 and "needs the CT as a DICOM series" in one_line_error(err, "ctpm-predict")
    assert files_below(out) == []
    code, _, err = cli(main, *args, capsys=capsys)
    assert code == 0, err
    assert "ct.nii.gz" in files_below(out)


def test_a_batch_goes_on_past_a_bad_patient(tiny_cohort, ckpt, tmp_path, capsys):
    from ctpm.cli.predict import main

    manifest = absolute_manifest(tiny_cohort, tmp_path / "m.csv", ids=["LC-A-001", "LC-B-001"])
    text = manifest.read_text()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image" * 10)
    bad_ct = str(load_manifest(tiny_cohort).by_id()["LC-B-001"].ct.resolve())
    manifest.write_text(text.replace(bad_ct, str(broken)))
    out = tmp_path / "out"
    code, _, err = cli(main, f"manifest={manifest}", f"ckpt={ckpt}", f"out={out}", "qa=false", "progress=false",
                       capsys=capsys)
    line = one_line_error(err, "ctpm-predict")
    assert code == 2 and "LC-B-001" in line and "broken.nii.gz" in line
    written = files_below(out)
    assert "LC-A-001.nii.gz" in written and not any(f.startswith("LC-B-001") for f in written)
    assert "LC-A-001" in (out / "predictions.csv").read_text()


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT])
def test_os_errors_while_writing_are_one_line_and_leave_nothing(patient, ckpt, tmp_path, capsys, monkeypatch, fault):
    """A full disk, a read-only folder, a quota: the OS error names the file; the patient's files
    written before it are gone (the staging folder), and no temporary is left."""
    import ctpm.lightning.predictor as predictor
    from ctpm.cli.predict import main

    real = predictor.save_nifti

    def failing(array, affine, path, *a, **k):
        if str(path).endswith("_lungs.nii.gz"):
            raise OSError(fault, os.strerror(fault), str(path))
        return real(array, affine, path, *a, **k)

    monkeypatch.setattr(predictor, "save_nifti", failing)
    out = tmp_path / "out"
    code, _, err = cli(main, f"ct={patient.ct}", f"ckpt={ckpt}", f"out={out}", "qa=false", "progress=false",
                       capsys=capsys)
    line = one_line_error(err, "ctpm-predict")
    assert code == 2 and os.strerror(fault) in line and "_lungs.nii.gz" in line
    assert files_below(out) == [] and not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".hydra"]


@pytest.mark.skipif(ROOT, reason="permissions do not bind root")
def test_read_only_output_folder(patient, ckpt, tmp_path, capsys):
    from ctpm.cli.predict import main

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = cli(main, f"ct={patient.ct}", f"ckpt={ckpt}", f"out={ro / 'x'}", "qa=false", capsys=capsys)
    finally:
        ro.chmod(0o755)
    assert code == 2 and "Permission denied" in one_line_error(err, "ctpm-predict")


def test_output_folder_below_a_file(patient, ckpt, tmp_path, capsys):
    from ctpm.cli.predict import main

    (tmp_path / "afile").write_text("x")
    code, _, err = cli(main, f"ct={patient.ct}", f"ckpt={ckpt}", f"out={tmp_path / 'afile' / 'x'}", "qa=false",
                       capsys=capsys)
    line = one_line_error(err, "ctpm-predict")
    assert code == 2 and "Not a directory" in line and "afile" in line


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_file_modes_follow_the_umask(patient, ckpt, tmp_path, capsys, umask):
    from ctpm.cli.predict import main

    old = os.umask(umask)
    try:
        code, _, err = cli(main, f"ct={patient.ct}", f"ckpt={ckpt}", f"out={tmp_path / 'out'}", "progress=false",
                           capsys=capsys)
        cache = PreprocessCache(tmp_path / "cache", TINY_PREPROCESSING)
        cache.ensure([patient], progress=False)
    finally:
        os.umask(old)
    assert code == 0, err
    for f in [*(tmp_path / "out").iterdir(), cache.entry_dir(patient.patient_id), cache.qa_lungs_path(patient.patient_id),
              cache.entry_dir(patient.patient_id) / "meta.json"]:
        if f.name.startswith("."):
            continue
        want = (0o777 if f.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(f.stat().st_mode) == want, (f, oct(f.stat().st_mode))


# --------------------------------------------------------------------------------------------------
# The cache: one commit point per entry, and a rerun that repairs what a kill left
# --------------------------------------------------------------------------------------------------

KILL_AT = {  # where a preprocessing process is killed: after this function returned
    "qa_copy": "ctpm.data.cache:PreprocessCache._copy_qa_lungs",
    "lungs_in_entry": "ctpm.data.cache:save_nifti",
}


@pytest.mark.parametrize("where", list(KILL_AT))
def test_kill_9_mid_entry_then_rerun_repairs(patient, tmp_path, where):
    module, func = KILL_AT[where].split(":")
    manifest = Path(patient.ct).parents[1] / "manifest.csv"
    script = f"""
import importlib, os, signal
import ctpm.data.cache as cache
from ctpm.data.manifest import load_manifest
obj = importlib.import_module({module!r})
for part in {func!r}.split(".")[:-1]:
    obj = getattr(obj, part)
real = getattr(obj, {func.split(".")[-1]!r})
def killed(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(obj, {func.split(".")[-1]!r}, killed)
patient = load_manifest({str(manifest)!r}).by_id()[{patient.patient_id!r}]
cache.PreprocessCache({str(tmp_path / "cache")!r}, {TINY_PREPROCESSING!r}).ensure([patient], progress=False)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == -9, run.stderr
    cache = PreprocessCache(tmp_path / "cache", TINY_PREPROCESSING)
    assert cache.problem(patient.patient_id) is not None  # killed before the commit: no entry that looks complete
    result = cache.ensure([patient], progress=False)
    assert result.ok[patient.patient_id][0] == "built" and cache.problem(patient.patient_id) is None
    assert cache.qa_lungs_path(patient.patient_id).is_file()
    leftovers = [p for p in (tmp_path / "cache").rglob(".*")]
    assert leftovers == [], leftovers


def test_sweep_removes_only_the_temporaries_of_dead_processes(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = temp_path(tmp_path / "a.nii.gz", ".nii.gz")
    mine.write_bytes(b"")
    theirs = Path(str(temp_path(tmp_path / "b.nii.gz")).replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    theirs.write_bytes(b"")
    folder = Path(str(temp_path(tmp_path / "entry")).replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    folder.mkdir()
    (folder / "x.npy").write_bytes(b"1")
    live = Path(str(temp_path(tmp_path / "c")).replace(f"-{os.getpid()}-", f"-{os.getppid()}-"))
    live.write_bytes(b"")
    other_host = tmp_path / f".d.tmp-otherhost-{dead_pid}-0123abcd"
    other_host.write_bytes(b"")
    user_file = tmp_path / ".mine.tmp"
    user_file.write_bytes(b"")
    removed = sweep_temps(tmp_path)
    assert sorted(removed) == sorted([theirs, folder])
    assert mine.exists() and live.exists() and other_host.exists() and user_file.exists()


# --------------------------------------------------------------------------------------------------
# Checkpoints and config values
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04broken zip"])
def test_bad_checkpoint_files(patient, tmp_path, capsys, content):
    from ctpm.cli.predict import main

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    code, _, err = cli(main, f"ct={patient.ct}", f"ckpt={bad}", f"out={tmp_path / 'o'}", capsys=capsys)
    line = one_line_error(err, "ctpm-predict")
    assert code == 2 and "bad.ckpt" in line


def test_a_roi_size_the_network_cannot_take(patient, tmp_path, capsys):
    import torch

    from ctpm.cli.predict import main
    from ctpm.models import ARNN

    net = ARNN(base_channels=4, depth=3)
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "ctpm": {"net_config": NET, "preprocessing": {**TINY_PREPROCESSING, "roi_size": [30, 16, 16]}}}, path)
    code, _, err = cli(main, f"ct={patient.ct}", f"ckpt={path}", f"out={tmp_path / 'o'}", capsys=capsys)
    line = one_line_error(err, "ctpm-predict")
    assert code == 2 and "roi_size=[30, 16, 16]" in line and "multiples of 4" in line


@pytest.mark.parametrize(("tool", "args", "message"), [
    ("predict", ["threshold=abc"], "threshold=abc: a number expected"),
    ("predict", ["threshold=[1,2]"], "threshold=[1,2]: a number expected"),
    ("predict", ["qa=maybe"], "qa=maybe: true or false expected"),
    ("predict", ["foo=1"], "Could not override 'foo'"),
    ("predict", ["threshold=[1,"], "no viable alternative"),
    ("predict", ["preprocessing.roi_size=[8,8,8]"], "Could not override 'preprocessing.roi_size'"),
    ("predict", ["+preprocessing.roi_size=[8,8,8]"], "cannot be changed at prediction time"),
    ("predict", ["preprocessing=3"], "the command line does not compose: Config group override"),
    ("flart", ["thresholds_gy=[5,x]"], "thresholds_gy=[5,x]: a list of numbers expected"),
    ("flart", ["min_dose_coverage=all"], "min_dose_coverage=all: a number expected"),
    ("evaluate", ["bootstrap.n_resamples=many"], "bootstrap.n_resamples=many: a number expected"),
    ("synth", ["n_cancer=abc"], "n_cancer=abc: a number expected"),
    ("preprocess", ["workers=two"], "workers=two: a number expected"),
])
def test_malformed_config_values_are_one_line(patient, ckpt, tmp_path, capsys, tool, args, message):
    import importlib

    main = importlib.import_module(f"ctpm.cli.{tool}").main
    base = {"predict": [f"ct={patient.ct}", f"ckpt={ckpt}"], "flart": ["dose=d.nii.gz", "perfusion=p.nii.gz"],
            "evaluate": ["manifest=m.csv", "predictions=p"], "synth": [], "preprocess": ["manifest=m.csv"]}[tool]
    code, _, err = cli(main, *base, f"out={tmp_path / 'o'}", *args, capsys=capsys)
    line = one_line_error(err, f"ctpm-{tool}")
    assert code == 2 and message in line, line
    assert not (tmp_path / "o").exists() or files_below(tmp_path / "o") == []


def test_a_mandatory_value_not_given(patient, tmp_path, capsys):
    from ctpm.cli.predict import main

    code, _, err = cli(main, f"ct={patient.ct}", f"out={tmp_path / 'o'}", capsys=capsys)
    assert code == 2 and "ckpt has no default" in one_line_error(err, "ctpm-predict")


@pytest.mark.parametrize("form", ["'preprocessing={lung_backend: classical}'", "preprocessing.lung_backend=classical"])
def test_the_documented_preprocessing_override_forms_work(patient, ckpt, tmp_path, capsys, form):
    from ctpm.cli.predict import main

    code, _, err = cli(main, f"ct={patient.ct}", f"ckpt={ckpt}", f"out={tmp_path / 'o'}", form.strip("'"),
                       "qa=false", "progress=false", capsys=capsys)
    assert code == 0, err


# --------------------------------------------------------------------------------------------------
# Training: a resume from a damaged checkpoint, a splits file that is not ours, a ROI the net cannot take
# --------------------------------------------------------------------------------------------------


def test_training_faults_are_one_line(tiny_cohort, cache_copy, tmp_path, capsys):
    from ctpm.cli.train import main
    from tests.helpers import tiny_overrides

    base = [*tiny_overrides(tiny_cohort, cache_copy, tmp_path / "run"), "debug=fdr"]
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    code, _, err = cli(main, *base, f"ckpt_path={empty}", capsys=capsys)
    assert code == 2 and "empty" in one_line_error(err, "ctpm-train")

    code, _, err = cli(main, *[o for o in base if "roi_size" not in o], "data.preprocessing.roi_size=[30,16,16]",
                       capsys=capsys)
    assert code == 2 and "multiples of 4" in one_line_error(err, "ctpm-train")

    for text in ("[1, 2, 3]", "{not json", '{"cohort": "cancer", "folds": 3}'):
        (cache_copy / "splits.json").write_text(text)
        code, _, err = cli(main, *base, "data.mode=fold", "data.fold=0", capsys=capsys)
        assert code == 2 and "splits.json" in one_line_error(err, "ctpm-train"), err


# --------------------------------------------------------------------------------------------------
# Evaluation and planner outputs: inputs that would give blank or meaningless numbers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_prediction(tiny_cohort, tmp_path_factory) -> tuple[Path, Path]:
    """A manifest of two cancer patients and a folder of their ctpm-style maps (the truth, tagged)."""
    d = tmp_path_factory.mktemp("hostile-eval")
    manifest = absolute_manifest(tiny_cohort, d / "m.csv", ids=["LC-A-001", "LC-B-001", "NC-A-001", "NC-A-002"])
    preds = d / "pred"
    for p in load_manifest(manifest):
        if p.cohort == "cancer":
            from ctpm.geometry import resample

            ct, truth = load_image(p.ct), load_image(p.perfusion, kind="perfusion")
            save_nifti(resample(truth.array, truth.grid, ct.grid) + 0.01, ct.affine, preds / f"{p.patient_id}.nii.gz",
                       patient=p.patient_id)
    return manifest, preds


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"folds": [1, 2]}', "\xff\xfe"])
def test_evaluate_refuses_a_bad_splits_file_before_scoring(one_prediction, tmp_path, capsys, monkeypatch, text):
    import ctpm.evaluation.evaluate as ev
    from ctpm.cli.evaluate import main

    monkeypatch.setattr(ev, "_evaluate_records", lambda *a, **k: pytest.fail("scored before the splits check"))
    manifest, preds = one_prediction
    splits = tmp_path / "splits.json"
    splits.write_bytes(text.encode("latin-1"))
    code, _, err = cli(main, f"manifest={manifest}", f"predictions={preds}", f"splits={splits}", f"out={tmp_path / 'o'}",
                       "evaluation.spacing=[4,4,4]", "evaluation.roi_size=[32,16,16]", "progress=false", capsys=capsys)
    line = one_line_error(err, "ctpm-evaluate")
    assert code == 2 and "splits.json" in line


def test_another_patients_map_under_this_name_is_refused(one_prediction, tmp_path, capsys):
    from ctpm.cli.evaluate import main

    manifest, preds = one_prediction
    swapped = tmp_path / "pred"
    swapped.mkdir()
    shutil.copy(preds / "LC-A-001.nii.gz", swapped / "LC-A-001.nii.gz")
    shutil.copy(preds / "LC-A-001.nii.gz", swapped / "LC-B-001.nii.gz")  # A's map under B's name
    code, _, err = cli(main, f"manifest={manifest}", f"predictions={swapped}", f"out={tmp_path / 'o'}",
                       "evaluation.spacing=[4,4,4]", "evaluation.roi_size=[32,16,16]", "progress=false", capsys=capsys)
    line = one_line_error(err, "ctpm-evaluate")
    assert code == 2 and "LC-B-001" in line and "another patient" in line


def _shifted_lobes(p, folder: Path, shift_mm: float = 0.0, relabel: dict | None = None) -> Path:
    lobes = load_image(p.lobes, kind="label")
    arr = lobes.array.copy()
    for a, b in (relabel or {}).items():
        arr[lobes.array == a] = b
    affine = lobes.affine.copy()
    affine[0, 3] += shift_mm
    return save_nifti(arr, affine, folder / f"{p.patient_id}_lobes.nii.gz", dtype=np.uint8)


@pytest.mark.parametrize(("shift", "relabel", "message"), [
    (2000.0, None, "covers 0% of the lungs"),
    (0.0, {3: 7}, r"label\(s\) 7"),
])
def test_lobes_off_the_ct_are_refused(one_prediction, tmp_path, shift, relabel, message):
    from ctpm.evaluation.evaluate import evaluate

    manifest_path, preds = one_prediction
    m = load_manifest(manifest_path)
    bad = _shifted_lobes(m.by_id()["LC-B-001"], tmp_path, shift, relabel)
    text = manifest_path.read_text().replace(str(m.by_id()["LC-B-001"].lobes), str(bad))
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(CtpmError, match=message) as err:
        evaluate(load_manifest(tmp_path / "m.csv"), preds, cfg=TINY_PREPROCESSING, progress=False, ceilings=False)
    assert "LC-B-001" in str(err.value) and "_lobes.nii.gz" in str(err.value)


def test_a_lobe_missing_from_the_lungs_is_warned(one_prediction, tmp_path):
    from ctpm.evaluation.evaluate import evaluate

    manifest_path, preds = one_prediction
    m = load_manifest(manifest_path)
    bad = _shifted_lobes(m.by_id()["LC-B-001"], tmp_path, relabel={4: 3})  # RML merged into RUL
    (tmp_path / "m.csv").write_text(manifest_path.read_text().replace(str(m.by_id()["LC-B-001"].lobes), str(bad)))
    with pytest.warns(UserWarning, match=r"lobe\(s\) RML"):
        evaluate(load_manifest(tmp_path / "m.csv"), preds, cfg=TINY_PREPROCESSING, progress=False, ceilings=False)


def test_flart_cohort_with_one_bad_dose_still_gives_the_others(tiny_cohort, one_prediction, tmp_path, capsys):
    from ctpm.cli.flart import main

    manifest_path, preds = one_prediction
    m = load_manifest(manifest_path)
    broken = tmp_path / "dose.nii.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    (tmp_path / "m.csv").write_text(manifest_path.read_text().replace(str(m.by_id()["LC-B-001"].dose), str(broken)))
    out = tmp_path / "flart"
    code, _, err = cli(main, f"manifest={tmp_path / 'm.csv'}", f"predictions={preds}", f"out={out}", "progress=false",
                       capsys=capsys)
    line = one_line_error(err, "ctpm-flart")
    assert code == 2 and "LC-B-001" in line and "dose.nii.gz" in line
    table = (out / "flart.csv").read_text()
    assert "LC-A-001" in table and "LC-B-001" not in table
    assert json.loads((out / "summary.json").read_text())["failed"][0]["patient_id"] == "LC-B-001"


def test_flart_refuses_another_patients_map_in_a_cohort(one_prediction, tmp_path, capsys):
    from ctpm.cli.flart import main

    manifest, preds = one_prediction
    swapped = tmp_path / "pred"
    swapped.mkdir()
    shutil.copy(preds / "LC-A-001.nii.gz", swapped / "LC-A-001.nii.gz")
    shutil.copy(preds / "LC-A-001.nii.gz", swapped / "LC-B-001.nii.gz")
    code, _, err = cli(main, f"manifest={manifest}", f"predictions={swapped}", f"out={tmp_path / 'f'}",
                       "progress=false", capsys=capsys)
    line = one_line_error(err, "ctpm-flart")
    assert code == 2 and "LC-B-001" in line and "another patient" in line
    assert "LC-A-001" in (tmp_path / "f" / "flart.csv").read_text()


def test_flart_lobes_off_the_lungs(one_prediction, tmp_path, capsys):
    from ctpm.cli.flart import main

    manifest_path, preds = one_prediction
    p = load_manifest(manifest_path).by_id()["LC-A-001"]
    lobes = load_image(p.lobes, kind="label")
    lungs = save_nifti(np.where(lobes.array >= 3, 1, np.where(lobes.array > 0, 2, 0)), lobes.affine,
                       tmp_path / "lungs.nii.gz", dtype=np.uint8)  # right lobes 3-5, left 1-2
    off = _shifted_lobes(p, tmp_path, 2000.0)
    args = [f"dose={p.dose}", f"perfusion={preds / 'LC-A-001.nii.gz'}", f"lungs={lungs}", "patient_id=LC-A-001"]
    code, _, err = cli(main, *args, f"lobes={off}", f"out={tmp_path / 'f'}", capsys=capsys)
    line = one_line_error(err, "ctpm-flart")
    assert code == 2 and "lobe map covers 0%" in line and "_lobes.nii.gz" in line
    code, _, err = cli(main, *args, f"lobes={p.lobes}", f"out={tmp_path / 'g'}", capsys=capsys)
    assert code == 0, err


def test_maps_carry_their_patient(one_prediction):
    _, preds = one_prediction
    vol = load_image(preds / "LC-A-001.nii.gz", kind="perfusion")
    assert vol.meta["patient_tag"] == patient_tag("LC-A-001") != patient_tag("LC-B-001")
