"""Bad input through the command-line tools: exit status 2, one clear message that names the
patient and the file, no traceback, no half-written output; the good patients of a cohort are
still built and every bad one is reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctpm.data.cache import PreprocessCache
from ctpm.data.io import save_nifti
from ctpm.data.manifest import load_manifest
from tests.conftest import TINY_PREPROCESSING
from tests.data_helpers import absolute_manifest, run_cli, write_slices

PREFIX = "ctpm-preprocess: error:"
TINY = ("preprocessing.spacing=[4,4,4]", "preprocessing.roi_size=[32,16,16]", "progress=false")

# patient -> (the file at fault: "ct" or "spect", what the message says)
BAD = {
    "BAD-TRUNCATED": ("ct", "cannot read the NIfTI image"),
    "BAD-GARBAGE": ("ct", "cannot read the NIfTI image"),
    "BAD-DICOM-TWO": ("ct", "2 DICOM series"),
    "BAD-DICOM-NONE": ("ct", "no DICOM image series"),
    "BAD-2D": ("ct", "a 3-D volume is expected"),
    "BAD-4D": ("spect", "4-D"),
    "BAD-RAW": ("ct", "Hounsfield"),
    "BAD-NAN": ("spect", "NaN"),
    "BAD-NEGATIVE": ("spect", "negative"),
    "BAD-FAR": ("spect", "does not overlap"),
    "BAD-NOLUNG": ("ct", "no lung found"),
}
GOOD = {"GOOD-A": "NC-A-004", "GOOD-B": "LC-B-001"}


def _make_bad(pid: str, src, folder: Path) -> tuple[Path, Path]:
    """Copies of a good patient's CT and SPECT, one of them broken as `pid` says."""
    d = folder / pid
    d.mkdir(parents=True)
    ct, spect = d / "ct.nii.gz", d / "spect.nii.gz"
    shutil.copy(src.ct, ct)
    shutil.copy(src.spect, spect)
    ct_img, sp_img = nib.load(str(src.ct)), nib.load(str(src.spect))
    hu, counts = np.asarray(ct_img.dataobj), np.asarray(sp_img.dataobj, dtype=np.float32)
    if pid == "BAD-TRUNCATED":
        data = ct.read_bytes()
        ct.write_bytes(data[: len(data) // 3])
    elif pid == "BAD-GARBAGE":
        ct.write_bytes(b"this is not an image\n" * 50)
    elif pid == "BAD-DICOM-TWO":
        ct = d / "ct_dicom"
        px = [np.full((4, 5), 24, np.uint16)] * 3
        for series in ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"):
            write_slices(ct, px, [[0, 0, z] for z in (0.0, 2.0, 4.0)], [1, 0, 0, 0, 1, 0], [1, 1],
                         series_uid=series, prefix=f"S{series[-1]}-")
    elif pid == "BAD-DICOM-NONE":
        ct = d / "ct_dicom"
        ct.mkdir()
        (ct / "README.txt").write_text("the images were not exported\n")
    elif pid == "BAD-2D":
        save_nifti(hu[:, :, hu.shape[2] // 2], ct_img.affine, ct, dtype=np.int16)
    elif pid == "BAD-4D":
        save_nifti(np.stack([counts] * 3, axis=-1), sp_img.affine, spect)
    elif pid == "BAD-RAW":
        save_nifti((hu.astype(np.int32) + 1024).astype(np.uint16), ct_img.affine, ct, dtype=np.uint16)
    elif pid == "BAD-NAN":
        counts = counts.copy()
        counts[10:20, 10:20, 10:20] = np.nan
        save_nifti(counts, sp_img.affine, spect)
    elif pid == "BAD-NEGATIVE":
        save_nifti(counts - 0.5 * counts.max(), sp_img.affine, spect)
    elif pid == "BAD-FAR":
        aff = sp_img.affine.copy()
        aff[:3, 3] += [0.0, 0.0, 1500.0]
        save_nifti(counts, aff, spect)
    elif pid == "BAD-NOLUNG":
        lobes = np.asarray(nib.load(str(src.lobes)).dataobj)
        save_nifti(np.where(lobes > 0, 40, hu), ct_img.affine, ct, dtype=np.int16)
    return ct, spect


@pytest.fixture(scope="module")
def bad_set(tiny_cohort, tmp_path_factory) -> tuple[Path, dict]:
    """manifest.csv with the good and the bad patients; {pid: (ct, spect)}."""
    folder = tmp_path_factory.mktemp("bad")
    by_id = load_manifest(tiny_cohort).by_id()
    files = {pid: _make_bad(pid, by_id["NC-A-003"], folder) for pid in BAD}
    rows = ["patient_id,cohort,institution,ct,spect"]
    for pid, src in GOOD.items():
        p = by_id[src]
        rows.append(f"{pid},{p.cohort},{p.institution},{p.ct},{p.spect}")
        files[pid] = (p.ct, p.spect)
    for pid, (ct, spect) in files.items():
        if pid in BAD:
            rows.append(f"{pid},noncancer,A,{ct.relative_to(folder)},{spect.relative_to(folder)}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv", files


def _single(bad_set, pid: str, folder: Path) -> Path:
    manifest, _ = bad_set
    return absolute_manifest(manifest, folder / f"{pid}.csv", ids=[pid])


def _assert_clean_failure(proc, out: Path, bad_ids) -> list[str]:
    """Exit 2, one error line, no traceback, nothing half-written for the bad patients."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    starts = [ln for ln in proc.stderr.splitlines() if ln.startswith(PREFIX)]
    assert len(starts) == 1, proc.stderr
    for pid in bad_ids:
        assert not (out / pid).exists(), pid
    if out.exists():
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    return proc.stderr.splitlines()


# --------------------------------------------------------------------------------------------------
# A cohort with many bad patients: all reported at once, the good ones built
# --------------------------------------------------------------------------------------------------


def test_every_bad_patient_reported_and_the_good_ones_built(bad_set, tmp_path):
    manifest, files = bad_set
    out = tmp_path / "cache"
    proc = run_cli("ctpm-preprocess", f"manifest={manifest}", f"out={out}", *TINY)
    lines = _assert_clean_failure(proc, out, BAD)
    first = next(ln for ln in lines if ln.startswith(PREFIX))
    assert f"{len(BAD)} of {len(BAD) + len(GOOD)} patients could not be preprocessed" in first
    for pid, (which, text) in BAD.items():
        ct, spect = files[pid]
        mine = [ln for ln in lines if f"patient {pid}," in ln or f"patient {pid}:" in ln]
        assert len(mine) == 1, (pid, proc.stderr)
        assert f"file {ct if which == 'ct' else spect}" in mine[0], (pid, mine[0])
        assert text in mine[0], (pid, mine[0])
    cache = PreprocessCache(out, TINY_PREPROCESSING)
    for pid in GOOD:
        assert cache.problem(pid) is None, pid
        assert cache.qa_lungs_path(pid).is_file()
    assert "2 built" in proc.stdout and f"{len(BAD)} failed" in proc.stdout


# --------------------------------------------------------------------------------------------------
# One bad patient: the one line says it all
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pid", ["BAD-TRUNCATED", "BAD-FAR"])
def test_single_bad_patient_one_line(bad_set, tmp_path, pid):
    _, files = bad_set
    out = tmp_path / "cache"
    proc = run_cli("ctpm-preprocess", f"manifest={_single(bad_set, pid, tmp_path)}", f"out={out}", *TINY)
    lines = _assert_clean_failure(proc, out, [pid])
    (line,) = [ln for ln in lines if ln.startswith(PREFIX)]
    which, text = BAD[pid]
    ct, spect = (Path(f).resolve() for f in files[pid])
    assert f"patient {pid}" in line and f"file {ct if which == 'ct' else spect}" in line and text in line, line


# --------------------------------------------------------------------------------------------------
# Bad manifests: stop before any work
# --------------------------------------------------------------------------------------------------


def _manifest_case(case: str, good_manifest: Path, folder: Path) -> tuple[Path, list[str]]:
    """A broken copy of a good manifest and what its message must hold."""
    path = folder / f"{case}.csv"
    text = good_manifest.read_text().splitlines()
    if case == "missing_column":
        header = text[0].split(",")
        i = header.index("institution")
        path.write_text("\n".join(",".join(c for n, c in enumerate(r.split(",")) if n != i) for r in text) + "\n")
        return path, ["institution", "column"]
    if case == "empty":
        path.write_text("")
        return path, ["empty"]
    if case == "duplicate":
        path.write_text("\n".join(text + [text[1]]) + "\n")
        pid = text[1].split(",")[0]
        return path, [f"row {len(text) + 1}", f"patient {pid}", "duplicate"]
    if case == "no_such_file":
        row = text[2].split(",")
        row[4] = str(folder / "nowhere" / "spect.nii.gz")
        path.write_text("\n".join([text[0], text[1], ",".join(row)]) + "\n")
        return path, ["row 3", f"patient {row[0]}", "does not exist", str(folder / "nowhere" / "spect.nii.gz")]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_column", "empty", "duplicate", "no_such_file"])
def test_bad_manifest(bad_set, tmp_path, case):
    manifest, _ = bad_set
    good = absolute_manifest(manifest, tmp_path / "good.csv", ids=list(GOOD))
    path, needles = _manifest_case(case, good, tmp_path)
    out = tmp_path / "cache"
    proc = run_cli("ctpm-preprocess", f"manifest={path}", f"out={out}", *TINY)
    lines = _assert_clean_failure(proc, out, list(GOOD))
    (line,) = [ln for ln in lines if ln.startswith(PREFIX)]
    assert f"file {path}" in line, line
    for n in needles:
        assert n in line, (n, line)


def test_synth_bad_request_is_one_line(tmp_path):
    out = tmp_path / "cohort"
    proc = run_cli("ctpm-synth", f"out={out}", "preset=huge")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("ctpm-synth: error:")]
    assert "unknown preset 'huge'" in line and "tiny" in line
    assert not (out / "manifest.csv").exists() and not list(out.glob("*/*.nii.gz"))
