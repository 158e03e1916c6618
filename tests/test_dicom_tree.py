"""ctpm-manifest: a synthetic DICOM export (CT, NM SPECT, RT structures, a scout, a second study, a
thicker second CT, junk) into the expected manifest and skip table; the real CT as a CT-only patient."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctpm.data.dicom_export import Roi, load_dicom_ct, write_rtstruct
from ctpm.data.dicom_tree import (
    LOBE_LABELS,
    PatientIds,
    build_plan,
    ct_geometry,
    lung_labels,
    rasterise_contours,
    structure_masks,
)
from ctpm.data.io import load_image
from ctpm.data.manifest import load_manifest
from ctpm.errors import CtpmError
from tests.data_helpers import reorient, write_ct_series, write_nm_multiframe
from tests.helpers import run_cli
from tests.test_flart import write_rtdose

LOBE_ROI = {"LUL": "Lung_L_Upper", "LLL": "left lower lobe", "RUL": "RUL", "RML": "Lung_R_Middle", "RLL": "Lung_RLL"}


def retag(files, **attrs) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in attrs.items():
            setattr(ds, k, v)
        ds.save_as(f)


def on_grid(values: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, shape) -> np.ndarray:
    """`values` (on `affine`) at the voxels of a grid that is the same up to axis flips."""
    idx = np.indices(shape).reshape(3, -1)
    src = np.rint(np.linalg.inv(affine) @ target_affine @ np.vstack([idx, np.ones(idx.shape[1])]))[:3].astype(int)
    return values[tuple(src)].reshape(shape)


def write_patient(root: Path, p, dicom_id: str, *, spect: bool, rtstruct: bool, study=None, frame=None,
                  folder="ct", step=1, truth: Path | None = None) -> tuple[list[Path], str, str]:
    ct = nib.load(str(p.ct))
    hu, aff = np.asarray(ct.dataobj, np.float32)[:, :, ::step], ct.affine.copy()
    aff[:3, 2] *= step
    files = write_ct_series(root / folder, hu, aff)
    first = pydicom.dcmread(files[0])
    study, frame = study or first.StudyInstanceUID, frame or first.FrameOfReferenceUID
    retag(files, PatientID=dicom_id, StudyInstanceUID=study, FrameOfReferenceUID=frame,
          SeriesDescription=f"CT {step}")
    if spect:
        sp = nib.load(str(p.spect))
        counts, saff = np.asarray(sp.dataobj, np.float32), sp.affine
        lps = np.diag([-1.0, -1, 1, 1]) @ saff
        if np.dot(np.cross(lps[:3, 0], lps[:3, 1]), lps[:3, 2]) < 0:
            counts, saff = reorient(counts, saff, (0, 1, 2), (False, True, False))
        nm = write_nm_multiframe(root / "nm" / "spect.dcm", counts, saff, slope=float(counts.max()) / 60000)
        retag([nm], PatientID=dicom_id, StudyInstanceUID=study, FrameOfReferenceUID=frame)
    if rtstruct:
        vol = load_dicom_ct(root / folder)
        lobes_nii = nib.load(str(p.lobes))
        lobes = on_grid(np.asarray(lobes_nii.dataobj), lobes_nii.affine, vol.affine, vol.shape)
        rois = [Roi(LOBE_ROI[name], lobes == label, (255, 0, 0)) for name, label in LOBE_LABELS.items()]
        write_rtstruct(vol, rois, root / "rtstruct" / "rs.dcm", identity="copy")
        np.save(truth / f"{dicom_id}_lobes.npy", lobes)
    return files, study, frame


@pytest.fixture(scope="module")
def export(tiny_cohort, tmp_path_factory) -> Path:
    m = load_manifest(tiny_cohort)
    a, b, c, d = m.patients[0], m.cohort("cancer")[0], m.patients[1], m.patients[2]
    top = tmp_path_factory.mktemp("export")
    root = top / "dicom"
    # patient 1: CT + SPECT + RT structures, a scout beside the CT, a thicker second CT, junk
    files, study, frame = write_patient(root / "p1" / "study1", a, "SECRET-1", spect=True, rtstruct=True, truth=top)
    write_patient(root / "p1" / "study1", a, "SECRET-1", spect=False, rtstruct=False, study=study, frame=frame,
                  folder="ct_thick", step=2)
    scout = write_ct_series(root / "p1" / "study1" / "ct", np.full((8, 8, 2), -1000.0), np.eye(4), prefix="SC")
    retag(scout, PatientID="SECRET-1", StudyInstanceUID=study, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    for name, summation in (("plan", "PLAN"), ("beam1", "BEAM")):  # the plan dose and one beam's
        (root / "p1" / "study1" / "dose").mkdir(parents=True, exist_ok=True)
        rd = write_rtdose(root / "p1" / "study1" / "dose" / f"{name}.dcm", np.full((4, 6, 5), 20.0),
                          position=(-100, -100, -150), offsets=[0, 5, 10, 15], summation=summation)
        retag([rd], PatientID="SECRET-1", StudyInstanceUID=study, FrameOfReferenceUID=frame,
              SeriesInstanceUID=pydicom.uid.generate_uid())
    (root / "p1" / "README.txt").write_text("exported by the PACS\n")
    (root / "p1" / "broken.dcm").write_bytes(Path(files[0]).read_bytes()[:400])
    # patient 2: study 1 CT + SPECT of another frame of reference (paired by study); study 2 a CT only
    _, study2, _ = write_patient(root / "p2" / "s1", b, "SECRET-2", spect=False, rtstruct=False)
    write_patient(root / "p2" / "s1", b, "SECRET-2", spect=True, rtstruct=False, study=study2,
                  frame=pydicom.uid.generate_uid(), folder="ct_unused")
    for f in (root / "p2" / "s1" / "ct_unused").iterdir():
        f.unlink()
    (root / "p2" / "s1" / "ct_unused").rmdir()
    write_patient(root / "p2" / "s2", b, "SECRET-2", spect=False, rtstruct=False)
    # patient 3: a CT only, sharing its folder with a planar NM image (so its row links its files)
    write_patient(root / "p3", c, "SECRET-3", spect=False, rtstruct=False, folder="mixed")
    planar = write_nm_multiframe(root / "p3" / "mixed" / "planar.dcm", np.ones((8, 8, 1)), np.eye(4))
    retag([planar], PatientID="SECRET-3", ImageType=["ORIGINAL", "PRIMARY", "STATIC"])
    # patient 4: two CT series of one spacing and no SPECT -> ambiguous
    write_patient(root / "p4", d, "SECRET-4", spect=False, rtstruct=False, folder="ct_a")
    write_patient(root / "p4", d, "SECRET-4", spect=False, rtstruct=False, folder="ct_b")
    # patient 5: one series that mixes orientations
    mixed = write_ct_series(root / "p5", np.full((8, 8, 4), -1000.0), np.diag([2.0, 2.0, 60.0, 1.0]))
    retag(mixed[:1], PatientID="SECRET-5", ImageOrientationPatient=["0", "1", "0", "1", "0", "0"])
    retag(mixed[1:], PatientID="SECRET-5")
    return root


@pytest.fixture(scope="module")
def built(export) -> tuple[Path, list[dict], list[dict]]:
    out = export.parent / "cohort" / "manifest.csv"
    res = run_cli("ctpm-manifest", f"dicom={export}", f"out={out}", "institution=X", "id_salt=s3cret")
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(out.open()))
    skipped = list(csv.DictReader((out.parent / "skipped.csv").open()))
    return out, rows, skipped


def test_manifest_rows_and_ids(built, export):
    out, rows, _ = built
    ids = PatientIds("hash", salt="s3cret")
    by = {r["patient_id"]: r for r in rows}
    assert set(by) == {ids("SECRET-1"), ids("SECRET-2"), ids("SECRET-3")}
    text = out.read_text() + (out.parent / "skipped.csv").read_text()
    assert "SECRET" not in text  # no raw PatientID anywhere
    p1, p2, p3 = by[ids("SECRET-1")], by[ids("SECRET-2")], by[ids("SECRET-3")]
    assert p1["ct"] == "../dicom/p1/study1/ct" and p1["spect"] == "../dicom/p1/study1/nm/spect.dcm"
    assert p1["lobes"] and p1["lung_mask"] and p1["institution"] == "X" and p1["cohort"] == "cancer"
    assert p1["dose"] == "../dicom/p1/study1/dose/plan.dcm" and p2["dose"] == p3["dose"] == ""
    assert p2["ct"] == "../dicom/p2/s1/ct" and p2["spect"] == "../dicom/p2/s1/nm/spect.dcm"  # by study
    assert p3["spect"] == "" and p3["ct"] == f"series/{ids('SECRET-3')}/ct"  # links: the folder is shared
    m = load_manifest(out, require_spect=False)
    assert len(m) == 3
    from ctpm.evaluation.flart import load_dose

    assert float(load_dose(m.by_id()[ids("SECRET-1")].dose).array.mean()) == pytest.approx(20.0)
    with pytest.raises(CtpmError, match="spect"):
        load_manifest(out)  # preprocessing needs a SPECT for every row
    # the CT through the links reads as the series itself
    ref = pydicom.dcmread(export / "p3" / "mixed" / "IM0000.dcm", stop_before_pixels=True)
    linked = load_image(m.by_id()[ids("SECRET-3")].ct, kind="ct")
    assert linked.shape[2] == len(list((export / "p3" / "mixed").glob("IM*.dcm")))
    assert linked.meta["series_instance_uid"] == ref.SeriesInstanceUID


def test_skip_table_reasons(built):
    _, _, skipped = built
    ids = PatientIds("hash", salt="s3cret")
    reasons = [(s["patient_id"], s["reason"]) for s in skipped]

    def has(pid, text):
        return any(p == pid and text in r for p, r in reasons)

    assert has(ids("SECRET-1"), "scout (LOCALIZER)")
    assert has(ids("SECRET-1"), "RT Dose of one beam, not the plan's")
    assert has(ids("SECRET-1"), "another CT series was chosen (thicker slices)")
    assert has("", "not a DICOM file")
    assert any(s["path"].endswith("broken.dcm") and not s["patient_id"] for s in skipped)  # truncated
    assert has(ids("SECRET-2"), "another CT series was chosen (no SPECT beside it)")
    assert has(ids("SECRET-3"), "not a reconstructed SPECT") and has(ids("SECRET-3"), "CT-only row")
    assert sum(p == ids("SECRET-4") and "two candidate CTs" in r for p, r in reasons) == 2
    assert has(ids("SECRET-5"), "mixed orientations") and has(ids("SECRET-5"), "no CT series covering the lungs")


def test_lobes_and_lungs_on_the_ct_grid(built, export):
    out, _, _ = built
    p = load_manifest(out, require_spect=False).by_id()[PatientIds("hash", salt="s3cret")("SECRET-1")]
    ct = load_image(p.ct, kind="ct")
    lobes, lungs = nib.load(str(p.lobes)), nib.load(str(p.lung_mask))
    np.testing.assert_allclose(lobes.affine, ct.affine, atol=1e-4)
    np.testing.assert_allclose(lungs.affine, ct.affine, atol=1e-4)
    got, truth = np.asarray(lobes.dataobj), np.load(export.parent / "SECRET-1_lobes.npy")
    assert got.shape == ct.shape
    assert all((truth == label).sum() > 20 for label in LOBE_LABELS.values())
    # contours traced half-way between voxels (ctpm.data.dicom_export) hold exactly the voxel centres inside
    np.testing.assert_array_equal(got, truth)
    lung = np.asarray(lungs.dataobj)
    np.testing.assert_array_equal(lung == 1, np.isin(got, [3, 4, 5]))
    np.testing.assert_array_equal(lung == 2, np.isin(got, [1, 2]))


def test_rasterise_hand_case():
    """A square ring (outer contour and a hole) in LPS on a 1 mm grid: exactly the ring's voxels."""
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # RAS; LPS: i -> +x, j -> +y, k -> 2 mm along z
    def square(a, b, z):
        return np.array([[a, a, z], [b, a, z], [b, b, z], [a, b, z]], float)
    m = rasterise_contours([square(1.5, 7.5, 4.0), square(3.5, 5.5, 4.0)], affine, (10, 10, 4))
    want = np.zeros((10, 10, 4), bool)
    want[2:8, 2:8, 2] = True
    want[4:6, 4:6, 2] = False
    np.testing.assert_array_equal(m, want)


def test_real_ct_is_a_ct_only_patient(real_ct, tmp_path):
    plan = build_plan(real_ct, tmp_path / "manifest.csv")
    (row,) = plan.rows
    assert row["spect"] == "" and (tmp_path / row["ct"]).resolve() == real_ct.resolve()
    assert row["patient_id"].startswith("P") and "C3N" not in row["patient_id"]


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CtpmError, match="no files"):
        build_plan(tmp_path / "empty", tmp_path / "m.csv")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(CtpmError, match="no DICOM files"):
        build_plan(tmp_path / "junk", tmp_path / "m.csv")
    nm = write_nm_multiframe(tmp_path / "nm" / "x.dcm", np.ones((4, 4, 3)), np.eye(4))
    with pytest.raises(CtpmError, match="no CT series"):
        build_plan(nm.parent, tmp_path / "m.csv")
    res = run_cli("ctpm-manifest", f"dicom={tmp_path / 'missing'}", f"out={tmp_path / 'm.csv'}")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "does not exist" in res.stderr
    with pytest.raises(CtpmError, match="id_mapping"):
        PatientIds("mapping")


def test_patient_id_modes(tmp_path):
    h = PatientIds("hash", salt="a")
    assert h("X1") == h("X1") != PatientIds("hash", salt="b")("X1") and re.fullmatch(r"P[0-9a-f]{12}", h("X1"))
    table = tmp_path / "ids.csv"
    table.write_text("dicom_patient_id,patient_id\nX1,site-001\n")
    mapped = PatientIds("mapping", mapping=table)
    assert mapped("X1") == "site-001" and mapped("X2") is None
    table.write_text("dicom_patient_id,patient_id\nX1,../etc\n")
    with pytest.raises(CtpmError, match="may only hold"):
        PatientIds("mapping", mapping=table)
    assert PatientIds("patient_id")("C3N-00249") == "C3N-00249"
    with pytest.raises(CtpmError, match="not a safe file name"):
        PatientIds("patient_id")("Doe^Jane")


def test_lung_rois_without_lobes_and_partial_lobes():
    right, left = np.zeros((6, 4, 3), bool), np.zeros((6, 4, 3), bool)
    right[:3, 1:3, 1], left[3:, 1:3, 1] = True, True
    lobes, lungs, note = lung_labels({"right": right, "left": left})
    assert lobes is None and note == ""
    np.testing.assert_array_equal(lungs, right * 1 + left * 2)
    lobes, lungs, note = lung_labels({"LUL": left, "RUL": right})
    assert lobes is None and lungs is None and "LLL" in note and "RML" in note


def test_structure_set_names_matched_by_aliases(tmp_path):
    """An RT structure set written by ctpm.data.dicom_export with TG-263 lung names and an unrelated
    ROI: the lungs come back on the CT grid, the other ROI is ignored."""
    from tests.data_helpers import write_ct_series

    hu = np.full((12, 10, 5), -1000.0)
    write_ct_series(tmp_path / "ct", hu, np.diag([-2.0, -2.0, 3.0, 1.0]))
    vol = load_dicom_ct(tmp_path / "ct")
    right, left, cord = (np.zeros(vol.shape, bool) for _ in range(3))
    right[1:5, 2:8, 1:4], left[7:11, 2:8, 1:4], cord[5:7, 8:10, :] = True, True, True
    rs = write_rtstruct(vol, [Roi("Lung_R", right, (0, 0, 255)), Roi("Left Lung", left, (0, 255, 0)),
                              Roi("SpinalCord", cord, (255, 0, 0))], tmp_path / "rs.dcm")
    geom = ct_geometry(_series_of(tmp_path / "ct"))
    np.testing.assert_allclose(geom.affine, vol.affine, atol=1e-6)
    masks = structure_masks(rs, geom, {"right": ["lung_r"], "left": ["left_lung"]})
    assert set(masks) == {"right", "left"}
    np.testing.assert_array_equal(masks["right"], right)
    np.testing.assert_array_equal(masks["left"], left)


def _series_of(folder):
    from ctpm.data.dicom_tree import scan

    (s,), _, _ = scan(folder)
    return s


def test_enhanced_ct_is_taken_as_its_file(tmp_path):
    from tests.data_helpers import write_enhanced_ct

    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 500, size=(6, 5, 4)).astype(np.float32)
    aff = np.array([[-0.7, 0, 0, 120.0], [0, -0.7, 0, 80.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    f = write_enhanced_ct(tmp_path / "dicom" / "enh.dcm", hu, aff, order=[2, 0, 3, 1])
    plan = build_plan(tmp_path / "dicom", tmp_path / "manifest.csv", min_z_extent_mm=5)
    (row,) = plan.rows
    assert row["ct"] == "dicom/enh.dcm"
    geom = ct_geometry(_series_of(tmp_path / "dicom"))
    vol = load_image(f, kind="perfusion")
    np.testing.assert_allclose(geom.affine, vol.affine, atol=1e-6)
    assert geom.shape == vol.shape and abs(geom.extent_mm - 10.0) < 1e-6


def test_nothing_to_write_is_one_error_and_no_files(tmp_path):
    from hydra import compose, initialize_config_dir

    from ctpm.cli.manifest import run
    from tests.conftest import CONF

    scout = write_ct_series(tmp_path / "dicom", np.full((8, 8, 2), -1000.0), np.eye(4))
    retag(scout, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    out = tmp_path / "cohort" / "manifest.csv"
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("manifest", overrides=[f"dicom={tmp_path / 'dicom'}", f"out={out}"])
    with pytest.raises(CtpmError, match=r"no patient could be put in the manifest: scout \(LOCALIZER\) \(1\); no CT series covering"):
        run(cfg)
    assert not out.parent.exists()


def test_ct_only_rows_can_be_left_out(export, tmp_path):
    plan = build_plan(export, tmp_path / "manifest.csv", ct_only_rows=False, ids=PatientIds("hash", salt="s3cret"))
    assert len(plan.rows) == 2 and all(r["spect"] for r in plan.rows)
    assert any("left out (ct_only_rows=false)" in s.reason for s in plan.skipped)
    assert plan.links == [] and len(plan.rois) == 2  # nothing is made for the patients left out
