"""ctpm-flart: dose metrics against hand-computed cases, dose grids in other geometries, the DICOM
RT Dose reader, the cohort run on the tiny synthetic cohort and its error messages."""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import stats as sps

from ctpm.cli._common import CONF_DIR
from ctpm.data.io import Volume, load_image, save_nifti
from ctpm.data.manifest import load_manifest
from ctpm.errors import CtpmError, CtpmWarning
from ctpm.evaluation.flart import (
    FlartSettings,
    cumulative_dvh,
    dose_at,
    dose_metrics,
    flart_patient,
    load_dose,
    lung_regions,
    lungs_file,
    read_rtdose,
    region_metrics,
)
from ctpm.geometry import resample

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------------


def test_dose_metrics_of_four_voxels_by_hand():
    # doses 0, 10, 20, 30 Gy with perfusion 1, 2, 3, 4 (sum 10, sum D*p = 200)
    m = dose_metrics(np.array([0.0, 10, 20, 30]), np.array([1.0, 2, 3, 4]))
    assert m["MLD"] == pytest.approx(15.0)
    assert (m["V5"], m["V20"], m["V30"]) == pytest.approx((75.0, 50.0, 25.0))
    assert m["fMLD"] == pytest.approx(20.0)
    assert (m["fV5"], m["fV20"], m["fV30"]) == pytest.approx((90.0, 70.0, 40.0))
    # Vx counts D >= x: a voxel at exactly 20 Gy is in V20
    assert dose_metrics(np.array([20.0, 19.999]))["V20"] == pytest.approx(50.0)
    # negative perfusion weighs nothing; no perfusion at all leaves the weighted metrics undefined
    assert dose_metrics(np.array([0.0, 10.0]), np.array([-0.2, 1.0]))["fMLD"] == pytest.approx(10.0)
    assert math.isnan(dose_metrics(np.array([5.0, 10.0]), np.zeros(2))["fMLD"])


def hand_case(tmp_path: Path) -> dict[str, Path]:
    """A 4 x 4 x 4 grid of 2 mm voxels (8 uL). Lungs: slices k = 1, 2; the right lung is i = 0, 1
    and the left lung i = 2, 3 (16 voxels each). Dose 10 * i Gy, perfusion 1 + i, so every i column
    of 8 voxels has one dose and one perfusion. Lobes: i = 0 RUL, 1 RLL, 2 LUL, 3 LLL (no RML)."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    i = np.arange(4)[:, None, None] * np.ones((4, 4, 4))
    lungs = np.zeros((4, 4, 4), np.uint8)
    lungs[:, :, 1:3] = np.where(i[:, :, 1:3] < 2, 1, 2)
    lobes = np.where(lungs > 0, np.array([3, 5, 1, 2])[i.astype(int)], 0)
    files = {"dose": save_nifti(10.0 * i, affine, tmp_path / "dose.nii.gz"),
             "perfusion": save_nifti(1.0 + i, affine, tmp_path / "perf.nii.gz"),
             "lungs": save_nifti(lungs, affine, tmp_path / "lungs.nii.gz", np.uint8),
             "lobes": save_nifti(lobes, affine, tmp_path / "lobes.nii.gz", np.uint8)}
    return files


def test_hand_computed_patient_whole_lungs_sides_and_lobes(tmp_path):
    f = hand_case(tmp_path)
    row = flart_patient(f["dose"], f["perfusion"], lungs=f["lungs"], lobes=f["lobes"], patient_id="P1")
    # whole lungs: doses 0/10/20/30 on 8 voxels each, perfusion 1/2/3/4
    assert row["volume_ml"] == pytest.approx(32 * 0.008)
    assert row["MLD"] == pytest.approx(15.0)
    assert (row["V5"], row["V20"], row["V30"]) == pytest.approx((75.0, 50.0, 25.0))
    assert row["fMLD"] == pytest.approx(1600 / 80)
    assert row["fV20"] == pytest.approx(100 * 7 / 10)
    # right lung: doses 0, 10 with perfusion 1, 2; left: 20, 30 with 3, 4
    assert row["MLD_right"] == pytest.approx(5.0)
    assert row["fMLD_right"] == pytest.approx(20 / 3)
    assert row["V20_right"] == 0.0
    assert row["MLD_left"] == pytest.approx(25.0)
    assert row["fMLD_left"] == pytest.approx(180 / 7)
    assert row["fV30_left"] == pytest.approx(100 * 4 / 7)
    # lobes: one dose each; the missing middle lobe has no volume and no metric
    assert row["MLD_LLL"] == pytest.approx(30.0) and row["V30_LLL"] == 100.0 and row["V5_RUL"] == 0.0
    assert row["volume_ml_RML"] == 0.0 and math.isnan(row["MLD_RML"])
    assert row["lungs_from"] == "lung labels" and row["dose_coverage"] == 1.0


def test_dvh_of_the_hand_case(tmp_path):
    """Doses 0 / 10 / 20 / 30 Gy on 8 voxels each, perfusion 1 / 2 / 3 / 4: at 15 Gy half the volume
    and 7/10 of the perfusion; the right lung (0, 10 Gy; perfusion 1, 2) has 2/3 of its perfusion at
    5 Gy. The curves pass through Vx and fVx, and the CLI writes them as CSV and PNG."""
    from ctpm.cli.flart import run

    f = hand_case(tmp_path)
    curves: dict = {}
    row = flart_patient(f["dose"], f["perfusion"], lungs=f["lungs"], patient_id="P1", dvh=curves)
    t = curves["P1"].set_index("dose_gy")
    assert t.loc[15.0, "V_lungs"] == pytest.approx(50.0) and t.loc[15.0, "fV_lungs_prediction"] == pytest.approx(70.0)
    assert t.loc[5.0, "fV_right_prediction"] == pytest.approx(100 * 2 / 3)
    assert t.loc[0.0, "V_left"] == 100.0 and t.loc[30.0, "V_lungs"] == pytest.approx(25.0)
    for x in (5.0, 20.0, 30.0):
        assert t.loc[x, "V_lungs"] == pytest.approx(row[f"V{x:g}"])
        assert t.loc[x, "fV_lungs_prediction"] == pytest.approx(row[f"fV{x:g}"])
    assert np.all(np.diff(t["V_lungs"].to_numpy()) <= 0)  # cumulative: never rises
    # against a direct count at doses between the levels
    d = np.repeat([0.0, 10, 20, 30], 8)
    np.testing.assert_allclose(cumulative_dvh(d, [0.05, 9.99, 10.0, 29.9, 30.01]), [75.0, 75.0, 75.0, 25.0, 0.0])
    out = tmp_path / "out"
    run(flart_cfg([f"dose={f['dose']}", f"perfusion={f['perfusion']}", f"lungs={f['lungs']}", "patient_id=P1",
                   f"out={out}"]))
    written = pd.read_csv(out / "dvh" / "P1_dvh.csv")
    assert written.loc[np.isclose(written.dose_gy, 15.0), "fV_lungs_prediction"].item() == pytest.approx(70.0)
    assert (out / "dvh" / "P1_dvh.png").stat().st_size > 5000


def test_functional_map_is_refused_as_lungs(tmp_path):
    """ctpm-predict's functional map (0 / 1 / 2 too) is refused as the lungs: by its header's
    descrip, and by its name for a file without one."""
    from ctpm.data.io import DESCRIPTIONS

    f = hand_case(tmp_path)
    lungs = load_image(f["lungs"], kind="label")
    tagged = save_nifti(lungs.array, lungs.affine, tmp_path / "anything.nii.gz", np.uint8,
                        description=DESCRIPTIONS["functional"])
    named = save_nifti(lungs.array, lungs.affine, tmp_path / "P1_functional.nii.gz", np.uint8)
    for path in (tagged, named):
        with pytest.raises(CtpmError, match="functional-volume map .* not the lungs") as err:
            flart_patient(f["dose"], f["perfusion"], lungs=path, patient_id="P1")
        assert err.value.path == str(path)
    # a lung label map that ctpm-predict wrote says so and is read whatever its name
    ok = save_nifti(lungs.array, lungs.affine, tmp_path / "P2_functional.nii.gz", np.uint8,
                    description=DESCRIPTIONS["lungs"])
    assert flart_patient(f["dose"], f["perfusion"], lungs=ok)["MLD"] == pytest.approx(15.0)


def test_spect_is_placed_by_the_cache_entry_registration(tmp_path):
    """A SPECT stored 2 mm off (its affine shifted, as an unregistered scan is) gives other
    weights; the registration.json of the lungs' cache entry (matrix: CT point -> SPECT point)
    puts it back, so the metrics equal those of the SPECT in place."""
    import json

    f = hand_case(tmp_path)
    perf = load_image(f["perfusion"], kind="perfusion")
    in_place = save_nifti(perf.array * 100.0, perf.affine, tmp_path / "spect.nii.gz")
    shift = np.eye(4)
    shift[:3, 3] = [2.0, 0.0, 0.0]  # one voxel along x
    moved = save_nifti(perf.array * 100.0, shift @ perf.affine, tmp_path / "spect_moved.nii.gz")
    entry = tmp_path / "cache" / "P1" / "0123abcd"
    entry.mkdir(parents=True)
    lungs = Path(f["lungs"]).replace(tmp_path / "cache" / "P1" / "lungs.nii.gz")
    settings = FlartSettings(min_perfusion_coverage=0.5)
    reference = flart_patient(f["dose"], in_place, lungs=lungs, kind="spect", settings=settings)
    unregistered = flart_patient(f["dose"], moved, lungs=lungs, kind="spect", settings=settings)
    assert unregistered["fMLD"] != pytest.approx(reference["fMLD"], abs=0.1)
    (entry / "registration.json").write_text(json.dumps({"kind": "rigid", "matrix_ras": shift.tolist()}))
    placed = flart_patient(f["dose"], moved, lungs=lungs, kind="spect", settings=settings)
    for key in ("fMLD", "fV20", "fMLD_left"):
        assert placed[key] == pytest.approx(reference[key], abs=1e-4)


def test_lobes_alone_give_the_same_lungs_and_sides(tmp_path):
    f = hand_case(tmp_path)
    with_labels = flart_patient(f["dose"], f["perfusion"], lungs=f["lungs"], lobes=f["lobes"])
    from_lobes = flart_patient(f["dose"], f["perfusion"], lobes=f["lobes"])
    assert from_lobes["lungs_from"] == "lobes"
    for key in ("MLD", "fMLD", "fV20_left", "MLD_right", "fMLD_LUL"):
        assert from_lobes[key] == pytest.approx(with_labels[key])


def test_binary_mask_takes_its_sides_from_the_lobes(tmp_path):
    f = hand_case(tmp_path)
    lungs = load_image(f["lungs"], kind="label")
    binary = save_nifti(np.where(lungs.array > 0, 255, 0), lungs.affine, tmp_path / "mask.nii.gz", np.uint8)
    alone = flart_patient(f["dose"], f["perfusion"], lungs=binary)
    assert alone["lungs_from"] == "lung mask" and "MLD_right" not in alone
    with_lobes = flart_patient(f["dose"], f["perfusion"], lungs=binary, lobes=f["lobes"])
    assert with_lobes["lungs_from"] == "lung mask, sides from lobes"
    assert (with_lobes["fMLD"], with_lobes["MLD_right"], with_lobes["fMLD_left"]) == pytest.approx((20.0, 5.0, 180 / 7))


def test_spect_weights_are_standardised_and_may_come_on_another_grid(tmp_path):
    """A uniform SPECT (any count level) on a coarse grid weighs every lung voxel alike: fMLD = MLD."""
    f = hand_case(tmp_path)
    coarse = np.diag([5.0, 5.0, 5.0, 1.0])
    coarse[:3, 3] = -4.0
    spect = save_nifti(np.full((4, 4, 4), 3700.0), coarse, tmp_path / "spect.nii.gz")
    row = flart_patient(f["dose"], spect, lungs=f["lungs"], kind="spect")
    assert row["source"] == "spect"
    assert row["fMLD"] == pytest.approx(row["MLD"]) and row["fV20"] == pytest.approx(row["V20"])


# --------------------------------------------------------------------------------------------------
# Dose on another grid
# --------------------------------------------------------------------------------------------------


def linear_dose(world: np.ndarray) -> np.ndarray:
    """A dose linear in world RAS mm: trilinear interpolation reproduces it exactly."""
    return 2.0 + 0.5 * world[..., 0] + 0.25 * world[..., 2]


def grid_world(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def test_dose_on_a_shifted_coarser_mirrored_grid_is_interpolated_in_world_coordinates():
    lung_affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 10^3 voxels of 2 mm, centres at 0..18 mm
    lungs = Volume(np.ones((10, 10, 10), np.float32), lung_affine)
    # 4 mm dose voxels, stored with x mirrored (as an LPS DICOM grid is) and shifted by a fraction
    dose_affine = np.diag([-4.0, 4.0, 4.0, 1.0])
    dose_affine[:3, 3] = [23.0, -5.0, -7.0]
    dose = Volume(linear_dose(grid_world((8, 8, 8), dose_affine)).astype(np.float32), dose_affine)
    regions = lung_regions(lungs, None)
    values, coverage = dose_at(regions, dose)
    assert coverage == 1.0
    np.testing.assert_allclose(values, linear_dose(regions.world), atol=1e-4)
    # mean of 2 + 0.5 x + 0.25 z over centres whose x and z average 9 mm
    row = region_metrics(values, np.ones_like(values), regions)
    assert row["MLD"] == pytest.approx(2 + 0.5 * 9 + 0.25 * 9, abs=1e-4)
    assert row["fMLD"] == pytest.approx(row["MLD"])


def test_dose_grid_that_misses_the_lungs_is_refused_or_warned(tmp_path):
    lungs = Volume(np.ones((10, 10, 10), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    regions = lung_regions(lungs, None, patient="P7")
    far = np.diag([2.0, 2.0, 2.0, 1.0])
    far[:3, 3] = [500.0, 0.0, 0.0]
    with pytest.raises(CtpmError, match="does not overlap the lungs") as err:
        dose_at(regions, Volume(np.full((10, 10, 10), 5.0, np.float32), far, {"source": "d.nii.gz"}), patient="P7")
    assert err.value.patient == "P7" and err.value.path == "d.nii.gz"
    # the dose grid ends one lung slice early: 90% covered
    short = Volume(np.full((10, 10, 9), 5.0, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    with pytest.raises(CtpmError, match="covers only 90.0%"):
        dose_at(regions, short, patient="P7")
    with pytest.warns(CtpmWarning, match="misses 10.00%"):
        values, coverage = dose_at(regions, short, patient="P7", min_coverage=0.8)
    assert coverage == pytest.approx(0.9) and np.count_nonzero(values == 0) == 100


# --------------------------------------------------------------------------------------------------
# DICOM RT Dose
# --------------------------------------------------------------------------------------------------


def write_rtdose(path: Path, gy: np.ndarray, *, position, offsets, pixel_spacing=(2.5, 3.0),
                 orientation=(1, 0, 0, 0, 1, 0), scaling=1e-3, units="GY", summation="PLAN",
                 frame_uid: str | None = None) -> Path:
    """gy: (frames, rows, columns) dose in Gy, stored as uint32 / scaling."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTDOSE"
    ds.FrameOfReferenceUID = frame_uid or generate_uid()
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = units, "PHYSICAL", summation
    ds.DoseGridScaling = f"{scaling:g}"
    ds.ImagePositionPatient = [f"{v:g}" for v in position]
    ds.ImageOrientationPatient = [f"{v:g}" for v in orientation]
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.GridFrameOffsetVector = [f"{v:g}" for v in offsets]
    ds.NumberOfFrames = gy.shape[0]
    ds.FrameIncrementPointer = 0x3004000C
    ds.Rows, ds.Columns = gy.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.PixelData = np.rint(gy / scaling).astype(np.uint32).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("form", ["relative", "absolute", "descending"])
def test_rtdose_reader_scaling_and_geometry(tmp_path, form):
    frames, rows, cols = 6, 4, 5
    gy = np.random.default_rng(1).uniform(0, 70, (frames, rows, cols)).round(3)
    position = (-10.0, -20.0, 30.0)
    step = -4.0 if form == "descending" else 4.0
    offsets = [step * k + (position[2] if form == "absolute" else 0.0) for k in range(frames)]
    vol = read_rtdose(write_rtdose(tmp_path / "rd.dcm", gy, position=position, offsets=offsets))
    assert vol.shape == (cols, rows, frames)
    # voxel (i = column, j = row, k = frame) holds pixel (row j, column i) of frame k
    np.testing.assert_allclose(vol.array[3, 2, 4], gy[4, 2, 3], atol=1e-5)
    # LPS: column i at x = -10 + 3 i (row spacing 2.5 mm, column spacing 3 mm), row j at y = -20 + 2.5 j
    lps = np.array([-10.0 + 3 * 3, -20.0 + 2.5 * 2, 30.0 + step * 4, 1.0])
    np.testing.assert_allclose(vol.affine @ [3, 2, 4, 1], LPS_TO_RAS @ lps, atol=1e-6)


def test_rtdose_and_nifti_of_one_dose_give_the_same_metrics(tmp_path):
    f = hand_case(tmp_path)
    dose = load_image(f["dose"], kind="dose")
    # the hand case's dose as an LPS RT Dose: frame k = slice k, row j, column i
    lps = LPS_TO_RAS @ dose.affine
    (tmp_path / "plan").mkdir()
    rd = write_rtdose(tmp_path / "plan" / "rd.dcm", np.transpose(dose.array, (2, 1, 0)), position=lps[:3, 3],
                      offsets=[2.0 * k for k in range(4)], pixel_spacing=(2.0, 2.0), orientation=(-1, 0, 0, 0, -1, 0))
    from_nifti = flart_patient(f["dose"], f["perfusion"], lungs=f["lungs"])
    for dose_path in (rd, rd.parent):  # the file, or the folder holding it
        from_rtdose = flart_patient(dose_path, f["perfusion"], lungs=f["lungs"])
        for key in ("MLD", "V20", "fMLD", "fV30", "MLD_left"):
            assert from_rtdose[key] == pytest.approx(from_nifti[key], abs=1e-4)


@pytest.mark.parametrize("change, message", [
    ({"units": "RELATIVE"}, "an absolute dose in Gy"),
    ({"summation": "BEAM"}, "is a BEAM dose"),
])
def test_rtdose_that_is_not_a_plan_dose_in_gy_is_refused(tmp_path, change, message):
    path = write_rtdose(tmp_path / "rd.dcm", np.ones((3, 2, 2)), position=(0, 0, 0), offsets=[0, 3, 6], **change)
    with pytest.raises(CtpmError, match=message) as err:
        load_dose(path, patient="P9")
    assert err.value.patient == "P9" and str(path) in str(err.value)


def test_nifti_dose_in_cgy(tmp_path):
    path = save_nifti(np.full((3, 3, 3), 6000.0), np.eye(4), tmp_path / "d.nii.gz")
    with pytest.raises(CtpmError, match="dose_unit=cGy"):
        load_dose(path)
    assert float(load_dose(path, unit="cGy").array.max()) == pytest.approx(60.0)


# --------------------------------------------------------------------------------------------------
# The command line on the tiny cohort
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort_predictions(tiny_cohort, tmp_path_factory) -> Path:
    """Stand-ins for ctpm-predict's maps: each cancer patient's truth perfusion on its CT grid."""
    out = tmp_path_factory.mktemp("predictions")
    for p in load_manifest(tiny_cohort):
        if p.dose is None:
            continue
        ct, truth = load_image(p.ct), load_image(p.perfusion, kind="perfusion")
        on_ct = resample(truth.array, truth.grid, ct.grid)
        save_nifti(on_ct, ct.affine, out / f"{p.patient_id}.nii.gz")
    return out


def flart_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("flart", overrides=["progress=false", *overrides])


@pytest.fixture(scope="module")
def cohort_run(tiny_cohort, cohort_predictions, tmp_path_factory):
    from ctpm.cli.flart import run

    out = tmp_path_factory.mktemp("flart")
    result = run(flart_cfg([f"manifest={tiny_cohort}", f"predictions={cohort_predictions}", f"out={out}"]))
    return out, result


def test_cohort_rows_and_an_independent_mld(tiny_cohort, cohort_run):
    out, _ = cohort_run
    df = pd.read_csv(out / "flart.csv")
    cancer = [p for p in load_manifest(tiny_cohort) if p.dose is not None]
    assert sorted(df["patient_id"].unique()) == sorted(p.patient_id for p in cancer)
    for _, sources in df.groupby("patient_id")["source"]:
        assert sorted(sources) == ["ct", "spect", "spect_minus_ct"]
    assert (df["lungs_from"] == "lobes").all()
    ct, spect, diff = (df[df["source"] == s].set_index("patient_id") for s in ("ct", "spect", "spect_minus_ct"))
    np.testing.assert_allclose(ct["MLD"], spect["MLD"])  # same dose, same lungs
    np.testing.assert_allclose(diff["fMLD"], spect["fMLD"] - ct["fMLD"], atol=1e-5)
    assert diff["MLD"].isna().all()  # the difference is of the perfusion-weighted metrics only
    for col in ("V5", "V20", "fV20", "fV20_LUL"):
        assert ((ct[col] >= 0) & (ct[col] <= 100)).all()
    # MLD of one patient recomputed another way: MONAI's resampling of the whole dose onto the CT grid
    p = cancer[0]
    dose, lobes = load_image(p.dose, kind="dose"), load_image(p.lobes, kind="label")
    on_ct = resample(dose.array, dose.grid, lobes.grid)
    lung = lobes.array > 0
    assert ct.loc[p.patient_id, "MLD"] == pytest.approx(float(on_ct[lung].mean()), rel=1e-3)
    assert ct.loc[p.patient_id, "MLD_RML"] == pytest.approx(float(on_ct[lobes.array == 4].mean()), rel=1e-3)


def test_cohort_summary_statistics(cohort_run):
    out, _ = cohort_run
    df = pd.read_csv(out / "flart.csv")
    summary = json.loads((out / "summary.json").read_text())
    ct, spect, diff = (df[df["source"] == s].set_index("patient_id") for s in ("ct", "spect", "spect_minus_ct"))
    assert summary["n_patients"] == len(ct)
    assert summary["units"]["fMLD"] == "Gy" and summary["units"]["fV20"] == "%"
    assert summary["metrics"]["ct"]["fMLD"]["mean"] == pytest.approx(ct["fMLD"].mean(), rel=1e-5)
    assert summary["metrics"]["spect"]["V20"]["sd"] == pytest.approx(spect["V20"].std(ddof=1), rel=1e-5)
    assert summary["difference"]["fV20"]["mean"] == pytest.approx(diff["fV20"].mean(), rel=1e-4, abs=1e-6)
    for metric in ("fMLD", "fV20"):
        test = summary["tests"][metric]
        expected = sps.wilcoxon(spect[metric], ct.loc[spect.index, metric]).pvalue
        assert test["n"] == len(ct) and test["wilcoxon_p"] == pytest.approx(expected, rel=1e-3)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_cohort_with_a_lungs_folder_gives_the_lobes_lungs(tiny_cohort, cohort_predictions, cohort_run, tmp_path):
    """lungs=DIR reads DIR/<id>/lungs.nii.gz (ctpm-preprocess's layout): labels made from the lobes
    give the same per-lung metrics."""
    from ctpm.cli.flart import run

    for p in load_manifest(tiny_cohort):
        if p.dose is not None:
            lobes = load_image(p.lobes, kind="label")
            labels = np.where(np.isin(lobes.array, (3, 4, 5)), 1, np.where(lobes.array > 0, 2, 0))
            save_nifti(labels, lobes.affine, tmp_path / "cache" / p.patient_id / "lungs.nii.gz", np.uint8)
    result = run(flart_cfg([f"manifest={tiny_cohort}", f"predictions={cohort_predictions}", f"out={tmp_path / 'o'}",
                            f"lungs={tmp_path / 'cache'}"]))
    again = pd.DataFrame(result["rows"]).set_index(["patient_id", "source"])
    first = pd.read_csv(cohort_run[0] / "flart.csv").set_index(["patient_id", "source"])
    assert set(again["lungs_from"]) == {"lung labels"}
    np.testing.assert_allclose(again["fMLD_left"], first.loc[again.index, "fMLD_left"], rtol=1e-5)


def test_lungs_folder_or_pattern():
    assert lungs_file("cache", "P1") == Path("cache/P1/lungs.nii.gz")  # ctpm-preprocess's layout
    assert lungs_file("masks/{patient_id}_lungs.nii.gz", "P1") == Path("masks/P1_lungs.nii.gz")


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming the patient and file, exit status 2, no traceback
# --------------------------------------------------------------------------------------------------


def run_main(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    from ctpm.cli.flart import main

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["ctpm-flart", "progress=false", *args])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def shifted_dose_manifest(tiny_cohort: Path, tmp_path: Path) -> tuple[Path, str, Path]:
    """A copy of the manifest whose first dose patient's dose lies 1 m away from the lungs."""
    rows = list(csv.DictReader(tiny_cohort.open()))
    victim = next(r for r in rows if r.get("dose"))
    dose = load_image(tiny_cohort.parent / victim["dose"], kind="dose")
    dose.affine[:3, 3] += [0.0, 0.0, 1000.0]
    moved = save_nifti(dose.array, dose.affine, tmp_path / "moved_dose.nii.gz")
    for r in rows:
        for c in ("ct", "spect", "lobes", "perfusion", "dose", "oracle"):
            if r.get(c):
                r[c] = str(tiny_cohort.parent / r[c])
        if r is victim:
            r["dose"] = str(moved)
    path = tmp_path / "manifest.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path, victim["patient_id"], moved


def test_dose_away_from_the_lungs_names_patient_and_file(tiny_cohort, cohort_predictions, tmp_path, monkeypatch,
                                                         capsys):
    manifest, pid, moved = shifted_dose_manifest(tiny_cohort, tmp_path)
    code, err = run_main(monkeypatch, capsys, [f"manifest={manifest}", f"predictions={cohort_predictions}",
                                               f"out={tmp_path / 'out'}"])
    assert code == 2 and "Traceback" not in err
    assert f"patient {pid}" in err and str(moved) in err and "does not overlap the lungs" in err
    table = (tmp_path / "out" / "flart.csv").read_text()  # the good patients are still tabulated
    assert pid not in table and "LC-" in table


@pytest.mark.parametrize("case", ["missing perfusion", "empty lungs", "lobes as lungs", "no mode"])
def test_bad_single_patient_input(tmp_path, monkeypatch, capsys, case):
    f = hand_case(tmp_path)
    args = {"dose": f["dose"], "perfusion": f["perfusion"], "lungs": f["lungs"], "patient_id": "P3"}
    expect = []
    if case == "missing perfusion":
        args["perfusion"] = tmp_path / "nowhere.nii.gz"
        expect = ["patient P3", str(args["perfusion"]), "does not exist"]
    elif case == "empty lungs":
        args["lungs"] = save_nifti(np.zeros((4, 4, 4)), np.eye(4), tmp_path / "empty.nii.gz", np.uint8)
        expect = ["patient P3", str(args["lungs"]), "lung mask is empty"]
    elif case == "lobes as lungs":
        args["lungs"] = f["lobes"]
        expect = ["patient P3", str(f["lobes"]), "give lobes as lobes="]
    else:
        args = {}
        expect = ["give either dose=PATH"]
    code, err = run_main(monkeypatch, capsys, [f"{k}={v}" for k, v in args.items()] + [f"out={tmp_path / 'out'}"])
    assert code == 2 and "Traceback" not in err and err.startswith("ctpm-flart: error:")
    for text in expect:
        assert text in err


def test_settings_are_checked():
    with pytest.raises(CtpmError, match="min_dose_coverage"):
        FlartSettings(min_dose_coverage=0.0)
    with pytest.raises(CtpmError, match="thresholds_gy"):
        FlartSettings(thresholds_gy=())
