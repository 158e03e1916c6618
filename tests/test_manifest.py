"""The cohort manifest: a valid one loads (relative paths against its folder); every bad one stops
with a CtpmError that names the file, and the row and patient where there is one."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctpm.data.manifest import REQUIRED, load_manifest, write_manifest
from ctpm.errors import CtpmError

HEADER = "patient_id,cohort,institution,ct,spect,tumor_diameter_mm"


@pytest.fixture
def folder(tmp_path) -> Path:
    """Images (empty files suffice: the manifest checks that they exist, not what they hold)."""
    for pid in ("P1", "P2", "P3"):
        (tmp_path / "img" / pid).mkdir(parents=True)
        for name in ("ct.nii.gz", "spect.nii.gz", "lungs.nii.gz"):
            (tmp_path / "img" / pid / name).write_bytes(b"")
    (tmp_path / "lists").mkdir()
    return tmp_path


def _row(pid, cohort="noncancer", inst="A", diameter=""):
    return f"{pid},{cohort},{inst},../img/{pid}/ct.nii.gz,../img/{pid}/spect.nii.gz,{diameter}"


def _write(folder: Path, *lines: str, name="manifest.csv") -> Path:
    path = folder / "lists" / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _error(path, **kw) -> str:
    with pytest.raises(CtpmError) as e:
        load_manifest(path, **kw)
    msg = str(e.value)
    assert str(path) in msg, msg  # the file is always named
    return msg


def test_valid_manifest_resolves_paths_against_its_folder(folder, monkeypatch):
    path = _write(folder, HEADER, _row("P1"), "", _row("P2", "cancer", "B", "23.5"))
    monkeypatch.chdir(folder / "img")  # the working directory must not matter
    m = load_manifest(path)
    assert m.ids() == ["P1", "P2"] and len(m) == 2
    p1, p2 = m.patients
    assert p1.ct.is_absolute() and p1.ct.resolve() == (folder / "img/P1/ct.nii.gz").resolve()
    assert p1.spect.resolve() == (folder / "img/P1/spect.nii.gz").resolve()
    assert p1.tumor_diameter_mm is None and p2.tumor_diameter_mm == 23.5
    assert (p1.cohort, p1.institution, p2.cohort, p2.institution) == ("noncancer", "A", "cancer", "B")
    assert (p1.row, p2.row) == (2, 4)  # the blank line is skipped, row numbers stay the file's
    assert [p.patient_id for p in load_manifest(path, cohort="cancer")] == ["P2"]


def test_optional_columns_absolute_paths_and_bom(folder):
    lung = folder / "img/P1/lungs.nii.gz"
    text = "\ufeff" + HEADER + ",lung_mask\n" + _row("P1") + f",{lung}\n"
    path = folder / "lists" / "m.csv"
    path.write_text(text, encoding="utf-8")
    (p,) = load_manifest(path).patients
    assert p.lung_mask == lung and p.lobes is None


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_or_tab_separated_manifest(folder, sep):
    """A spreadsheet in a decimal-comma locale saves ';'-separated CSV: it reads the same."""
    lines = [HEADER, _row("P1"), _row("P2", "cancer", "B", "23.5")]
    path = _write(folder, *(ln.replace(",", sep) for ln in lines), name="semi.csv")
    m = load_manifest(path)
    assert m.ids() == ["P1", "P2"] and m.patients[1].tumor_diameter_mm == 23.5
    assert m.patients[0].ct.resolve() == (folder / "img/P1/ct.nii.gz").resolve()


def test_write_manifest_round_trip(folder):
    rows = [{"patient_id": "P1", "cohort": "noncancer", "institution": "A", "ct": "../img/P1/ct.nii.gz",
             "spect": "../img/P1/spect.nii.gz", "tumor_diameter_mm": ""}]
    path = write_manifest(folder / "lists" / "w.csv", rows)
    assert load_manifest(path).ids() == ["P1"]


def test_missing_column(folder):
    path = _write(folder, "patient_id,cohort,ct,spect", "P1,noncancer,../img/P1/ct.nii.gz,../img/P1/spect.nii.gz")
    msg = _error(path)
    assert "institution" in msg and "column" in msg


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(folder, text):
    path = folder / "lists" / "empty.csv"
    path.write_text(text)
    assert "empty" in _error(path)


def test_header_only(folder):
    path = _write(folder, HEADER)
    assert "no patients" in _error(path)


def test_missing_manifest(folder):
    assert "does not exist" in _error(folder / "lists" / "nope.csv")


def test_duplicate_ids(folder):
    path = _write(folder, HEADER, _row("P1"), _row("P2"), _row("P1"))
    msg = _error(path)
    assert "row 4" in msg and "patient P1" in msg and "duplicate" in msg and "row 2" in msg


def test_path_that_does_not_exist(folder):
    path = _write(folder, HEADER, _row("P1"), "P2,noncancer,A,../img/P2/ct.nii.gz,../img/P2/nothere.nii.gz,")
    msg = _error(path)
    assert "row 3" in msg and "patient P2" in msg and "spect" in msg and "nothere.nii.gz" in msg


def test_unknown_cohort(folder):
    path = _write(folder, HEADER, _row("P1", cohort="healthy"))
    msg = _error(path)
    assert "row 2" in msg and "patient P1" in msg and "healthy" in msg


@pytest.mark.parametrize("value", ["abc", "-3", "nan", "inf", "12mm"])
def test_bad_tumor_diameter(folder, value):
    path = _write(folder, HEADER, _row("P1"), _row("P2", "cancer", "B", value))
    msg = _error(path)
    assert "row 3" in msg and "patient P2" in msg and "tumor_diameter_mm" in msg and value in msg


@pytest.mark.parametrize("pid", ["../x", "a/b", ".hidden", "x y", "x" * 200])
def test_unsafe_patient_id(folder, pid):
    path = _write(folder, HEADER, f"{pid},noncancer,A,../img/P1/ct.nii.gz,../img/P1/spect.nii.gz,")
    msg = _error(path)
    assert "row 2" in msg and f"patient {pid}" in msg and "patient_id" in msg


def test_extra_fields(folder):
    path = _write(folder, HEADER, _row("P1"), _row("P2") + ",surplus")
    msg = _error(path)
    assert "row 3" in msg and "patient P2" in msg and "more fields" in msg


def test_empty_required_values(folder):
    msg = _error(_write(folder, HEADER, "P1,noncancer,,../img/P1/ct.nii.gz,../img/P1/spect.nii.gz,"))
    assert "row 2" in msg and "patient P1" in msg and "institution" in msg
    msg = _error(_write(folder, HEADER, ",noncancer,A,../img/P1/ct.nii.gz,../img/P1/spect.nii.gz,"))
    assert "row 2" in msg and "patient_id" in msg
    msg = _error(_write(folder, HEADER, "P1,noncancer,A,../img/P1/ct.nii.gz,,"))
    assert "row 2" in msg and "patient P1" in msg and "spect" in msg
    # prediction needs no SPECT
    assert load_manifest(folder / "lists" / "manifest.csv", require_spect=False).patients[0].spect is None


def test_error_names_the_column_set(folder):
    path = _write(folder, "id,cohort,institution,ct,spect", _row("P1"))
    msg = _error(path)
    assert "patient_id" in msg and all(c in msg for c in REQUIRED)


def test_unknown_cohort_filter(folder):
    path = _write(folder, HEADER, _row("P1"))
    with pytest.raises(CtpmError, match="unknown cohort"):
        load_manifest(path, cohort="healthy")
    assert "no patients of cohort 'cancer'" in _error(path, cohort="cancer")
