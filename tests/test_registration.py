"""SPECT-to-CT registration (ctpm.data.registration): RAS <-> SimpleITK geometry, known rigid
motions recovered, limits, RegisterSpectd in the grid stage, outputs, a misaligned cohort regained."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ctpm.data.registration import (
    LPS_TO_RAS,
    Registration,
    RegisterSpectd,
    from_sitk,
    register_spect,
    rigid_matrix,
    rotation_angle_deg,
    rotation_part,
    to_sitk,
    transform_to_matrix,
    write_qa_png,
    write_registration_json,
    write_registration_table,
)
from ctpm.errors import CtpmError
from ctpm.geometry import Grid, resample


def _oblique_grid() -> Grid:
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", [20, -30, 50], degrees=True).as_matrix() @ np.diag([2.0, -3.0, 1.5])
    a[:3, 3] = [10.0, -20.0, 30.0]
    return Grid(a, (5, 6, 7))


def test_sitk_geometry_hand_case():
    """An oblique grid with a flipped axis: a world point is the same continuous index in ctpm and
    in SimpleITK (whose physical space is LPS), a voxel holds the same value, and back is exact."""
    import SimpleITK as sitk

    g = _oblique_grid()
    arr = np.random.default_rng(0).random(g.shape).astype(np.float32)
    img = to_sitk(arr, g)
    ras = g.world(np.array([[1.3, 2.2, 4.7]]))[0]
    lps = ras * np.array([-1.0, -1.0, 1.0])  # by hand: x and y change sign
    np.testing.assert_allclose(img.TransformPhysicalPointToContinuousIndex(lps.tolist()), [1.3, 2.2, 4.7], atol=1e-9)
    np.testing.assert_allclose(img.TransformContinuousIndexToPhysicalPoint([1.3, 2.2, 4.7]), lps, atol=1e-9)
    assert img.GetPixel(3, 4, 5) == pytest.approx(float(arr[3, 4, 5]))
    assert img.GetSize() == g.shape
    back, g2 = from_sitk(img)
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_allclose(g2.affine, g.affine, atol=1e-12)
    # an ITK transform (LPS, about a centre) as a RAS matrix: the same point mapping
    tx = sitk.Euler3DTransform()
    tx.SetCenter([5.0, -7.0, 2.0])
    tx.SetRotation(0.05, -0.1, 0.2)
    tx.SetTranslation([3.0, -4.0, 1.5])
    m = transform_to_matrix(tx)
    y_lps = np.asarray(tx.TransformPoint(lps.tolist()))
    np.testing.assert_allclose((m @ np.r_[ras, 1.0])[:3], LPS_TO_RAS[:3, :3] @ y_lps, atol=1e-9)


# --------------------------------------------------------------------------------------------------
# A phantom whose SPECT is a function of its CT's anatomy (so the metric's optimum is the truth)
# --------------------------------------------------------------------------------------------------


def _ellipsoid(xyz, centre, radii):
    return (((xyz - np.asarray(centre)) / np.asarray(radii)) ** 2).sum(-1) <= 1.0


def _phantom_world(xyz):
    """CT HU and perfusion at world points (RAS mm): a body, two unequal lungs, a heart, a spine and
    a tumour in the left lung (a cold spot in the SPECT)."""
    body = _ellipsoid(xyz, (0, 0, 0), (160, 110, 200))
    right = _ellipsoid(xyz, (70, 0, 10), (55, 70, 110))
    left = _ellipsoid(xyz, (-65, -5, 0), (45, 65, 95)) & ~_ellipsoid(xyz, (-35, 30, -30), (45, 40, 45))
    tumour = _ellipsoid(xyz, (-70, -20, 40), (18, 15, 20))
    spine = _ellipsoid(xyz, (0, -85, 0), (18, 18, 200))
    hu = np.where(body, 40.0, -1000.0)
    hu = np.where(right | left, -850.0, hu)
    hu = np.where(tumour, 30.0, hu)
    hu = np.where(spine, 600.0, hu)
    perf = np.where(right | left, 1.0, 0.0) * np.where(tumour, 0.0, 1.0) + 0.08 * body
    return hu, perf, (right | left) & ~tumour


@pytest.fixture(scope="module")
def phantom():
    from scipy import ndimage

    ct_grid = Grid.axis_aligned((66, 50, 72), (4.0, 4.0, 4.0), (-132.0, -100.0, -144.0))
    hu, _, lungs = _phantom_world(ct_grid.world(np.argwhere(np.ones(ct_grid.shape, bool))))
    hu, lungs = hu.reshape(ct_grid.shape), lungs.reshape(ct_grid.shape)
    fine = Grid.axis_aligned((150, 110, 170), (2.0, 2.0, 2.0), (-149.0, -109.0, -169.0))
    _, perf, _ = _phantom_world(fine.world(np.argwhere(np.ones(fine.shape, bool))))
    perf = ndimage.gaussian_filter(perf.reshape(fine.shape), 12.0 / 2.355 / 2.0)  # a 12 mm FWHM camera
    spect_grid = Grid.axis_aligned((52, 40, 58), (6.0, 6.0, 6.0), (-153.0, -117.0, -171.0))
    spect = resample(perf, fine, spect_grid) * 100.0
    return {"ct": hu.astype(np.float32), "ct_grid": ct_grid, "lungs": lungs, "spect": spect.astype(np.float32),
            "spect_grid": spect_grid, "centre": ct_grid.world(np.argwhere(lungs)).mean(0)}


def _errors(found: np.ndarray, applied: np.ndarray, centre: np.ndarray) -> tuple[float, float]:
    """Distance (mm) between the two transforms' images of the lungs' centre, and the angle (deg)
    of R_found^T R_applied."""
    c = np.r_[centre, 1.0]
    return (float(np.linalg.norm((found @ c - applied @ c)[:3])),
            rotation_angle_deg(found[:3, :3].T @ applied[:3, :3]))


MOTIONS = [  # (Euler angles deg, translation mm at the lungs' centre)
    ((0.0, 0.0, 5.0), (15.0, 0.0, 0.0)),
    ((4.0, -3.0, 0.0), (0.0, -10.0, 9.0)),
    ((-3.0, 2.0, 3.0), (-6.0, 8.0, -10.0)),
    ((2.0, 4.0, -2.0), (5.0, 3.0, 12.0)),
]


@pytest.mark.parametrize("rotation, translation", MOTIONS)
def test_known_rigid_motion_is_recovered(phantom, rotation, translation):
    """The SPECT moved by a known rigid motion (its affine: the anatomy now lies at M x) is found
    again: the registration maps CT points to where the anatomy went."""
    p = phantom
    applied = rigid_matrix(rotation, translation, p["centre"])
    moved = Grid(applied @ p["spect_grid"].affine, p["spect_grid"].shape)
    reg = register_spect(p["ct"], p["ct_grid"], p["spect"], moved, p["lungs"], kind="rigid")
    shift, angle = _errors(reg.matrix, applied, p["centre"])
    assert shift < 2.0 and angle < 1.0, (shift, angle, reg)
    assert reg.metric_after > reg.metric_before
    # the registered affine puts the SPECT back where it was
    np.testing.assert_allclose(reg.registered_affine(moved.affine), p["spect_grid"].affine, atol=0.5 * 6.0)


def test_no_motion_stays_put(phantom):
    p = phantom
    reg = register_spect(p["ct"], p["ct_grid"], p["spect"], p["spect_grid"], p["lungs"], kind="rigid")
    shift, angle = _errors(reg.matrix, np.eye(4), p["centre"])
    assert shift < 1.0 and angle < 0.5, (shift, angle)
    assert np.linalg.norm(reg.translation_mm) < 1.0


def test_affine_recovers_a_rigid_motion(phantom):
    p = phantom
    applied = rigid_matrix(*MOTIONS[2], p["centre"])
    moved = Grid(applied @ p["spect_grid"].affine, p["spect_grid"].shape)
    reg = register_spect(p["ct"], p["ct_grid"], p["spect"], moved, p["lungs"], kind="affine")
    shift, _ = _errors(reg.matrix, applied, p["centre"])
    rotation = rotation_part(reg.matrix[:3, :3])[0]  # an affine's linear part is no rotation: its polar factor
    angle = rotation_angle_deg(rotation.T @ applied[:3, :3])
    assert shift < 2.0 and angle < 1.0 and np.all(np.abs(reg.scale - 1.0) < 0.03), (shift, angle, reg.scale)
    assert reg.kind == "affine" and reg.rotation_angle_deg == pytest.approx(rotation_angle_deg(rotation))


def test_beyond_the_limits_is_one_clean_error(phantom):
    p = phantom
    applied = rigid_matrix(*MOTIONS[0], p["centre"])
    moved = Grid(applied @ p["spect_grid"].affine, p["spect_grid"].shape)
    with pytest.raises(CtpmError) as err:
        register_spect(p["ct"], p["ct_grid"], p["spect"], moved, p["lungs"], patient="P-7", path="/x/spect.nii.gz",
                       settings={"max_translation_mm": 5.0, "max_rotation_deg": 2.0})
    msg = str(err.value)
    assert "\n" not in msg and "P-7" in msg and "/x/spect.nii.gz" in msg
    assert "translation of 1" in msg and "rotation of" in msg and "limit 5 mm" in msg


def test_register_spectd_moves_the_affine_only(phantom, tmp_path):
    """In a data dict: the SPECT keeps its voxels, its affine becomes inv(T) @ affine (the one
    resampling later puts it back in place); outputs written from the result."""
    import torch
    from monai.data import MetaTensor

    p = phantom
    applied = rigid_matrix(*MOTIONS[1], p["centre"])
    moved_aff = applied @ p["spect_grid"].affine
    d = {
        "patient_id": "P-1",
        "ct": MetaTensor(torch.from_numpy(p["ct"])[None], affine=torch.as_tensor(p["ct_grid"].affine)),
        "lungs": MetaTensor(torch.from_numpy(p["lungs"].astype(np.float32))[None], affine=torch.as_tensor(p["ct_grid"].affine)),
        "spect": MetaTensor(torch.from_numpy(p["spect"])[None], affine=torch.as_tensor(moved_aff)),
    }
    out = RegisterSpectd("spect")(d)
    reg = out["registration"]
    assert isinstance(reg, Registration)
    assert torch.equal(out["spect"].as_tensor(), d["spect"].as_tensor())
    np.testing.assert_allclose(out["spect"].affine.numpy(), np.linalg.inv(reg.matrix) @ moved_aff, atol=1e-9)
    # resampled through the registered affine, the SPECT matches the unmoved one on the CT grid
    back = resample(p["spect"], Grid.of(out["spect"]), p["ct_grid"])
    truth = resample(p["spect"], p["spect_grid"], p["ct_grid"])
    err = np.abs(back - truth)[p["lungs"]].mean() / truth[p["lungs"]].mean()
    assert err < 0.03, err
    j = json.loads(write_registration_json(reg, tmp_path / "registration.json", patient="P-1").read_text())
    np.testing.assert_allclose(j["matrix_ras"], reg.matrix, atol=1e-6)
    assert j["metric_after"] > j["metric_before"] and j["settings"]["max_translation_mm"] == 30.0
    png = write_qa_png(reg, tmp_path / "registration_qa.png", patient="P-1")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = write_registration_table([j], tmp_path / "registration.csv")
    with table.open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["patient_id"] == "P-1"
    np.testing.assert_allclose([float(rows[0][k]) for k in ("tx_mm", "ty_mm", "tz_mm")], reg.translation_mm, atol=1e-3)


# --------------------------------------------------------------------------------------------------
# The grid stage: a misaligned copy of the tiny cohort, registration on
# --------------------------------------------------------------------------------------------------


def test_misaligned_cohort_regains_the_roundtrip(tiny_cohort, tmp_path):
    """Two tiny patients, their SPECT moved (affine only, as another scanner's frame would be):
    with register_spect=rigid the roundtrip R of the aligned cohort comes back (within 0.02), and
    the registered SPECT on the evaluation grid agrees with the aligned one."""
    from ctpm.data.cache import PreprocessCache
    from ctpm.data.manifest import load_manifest
    from ctpm.data.preprocess import preprocess_patient
    from ctpm.metrics import spearman_r
    from tests.conftest import TINY_PREPROCESSING
    from tests.data_helpers import absolute_manifest

    ids = ["NC-A-002", "LC-B-002"]
    by_id = load_manifest(tiny_cohort).by_id()
    manifest = absolute_manifest(tiny_cohort, tmp_path / "moved" / "manifest.csv", ids)
    rows = list(csv.DictReader(manifest.open()))
    for r, (rot, tr) in zip(rows, MOTIONS[1:3]):
        img = nib.load(r["spect"])
        aff = rigid_matrix(rot, tr, img.affine[:3, :3] @ (np.asarray(img.shape) - 1) / 2 + img.affine[:3, 3]) @ img.affine
        dst = tmp_path / "moved" / f"{r['patient_id']}_spect.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32), aff), dst)
        r["spect"] = str(dst)
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    moved = load_manifest(manifest).by_id()

    cfg = {**TINY_PREPROCESSING, "register_spect": "rigid"}
    aligned_run = PreprocessCache(tmp_path / "aligned", TINY_PREPROCESSING).ensure(
        [by_id[i] for i in ids], progress=False, roundtrip=True)
    moved_run = PreprocessCache(tmp_path / "cache", cfg).ensure([moved[i] for i in ids], progress=False, roundtrip=True)
    assert not moved_run.failed and all(s == "built" for s, _ in moved_run.ok.values()), moved_run
    rt_aligned = {pid: r for pid, (_, r) in aligned_run.ok.items()}
    rt_moved = {pid: r for pid, (_, r) in moved_run.ok.items()}
    for pid in ids:
        assert abs(rt_moved[pid] - rt_aligned[pid]) < 0.02, (pid, rt_moved[pid], rt_aligned[pid])
        entry = tmp_path / "cache" / pid / PreprocessCache(tmp_path / "cache", cfg).key
        j = json.loads((entry / "registration.json").read_text())
        assert j["patient_id"] == pid and (entry / "registration_qa.png").is_file()
    aligned = preprocess_patient(by_id[ids[0]], TINY_PREPROCESSING)
    registered = preprocess_patient(moved[ids[0]], cfg)
    unregistered = preprocess_patient(moved[ids[0]], TINY_PREPROCESSING)
    m = aligned.grid_mask > 0
    r_reg = float(spearman_r(registered.grid_spect[m], aligned.grid_spect[m]))
    r_raw = float(spearman_r(unregistered.grid_spect[m], aligned.grid_spect[m]))
    assert r_reg > 0.95 and r_reg > r_raw + 0.05, (r_reg, r_raw)
    shutil.rmtree(tmp_path / "aligned")


def test_config_option_and_cache_key():
    """register_spect: none keeps the hash of caches built before the option existed; rigid has
    another; an unknown value is an error."""
    from ctpm.data.cache import config_hash
    from ctpm.data.transforms import PreprocessConfig, grid_stage

    none = PreprocessConfig.from_any({"register_spect": "none"})
    assert "register_spect" not in none.to_dict()
    assert config_hash(none) == config_hash(PreprocessConfig())
    rigid = PreprocessConfig.from_any({"register_spect": "rigid", "registration": {"max_rotation_deg": 5}})
    assert config_hash(rigid) != config_hash(none)
    assert any(isinstance(t, RegisterSpectd) for t in grid_stage(rigid, with_spect=True).transforms)
    assert not any(isinstance(t, RegisterSpectd) for t in grid_stage(rigid, with_spect=False).transforms)
    with pytest.raises(CtpmError, match="register_spect must be one of none, rigid, affine"):
        grid_stage(PreprocessConfig(register_spect="elastic"), with_spect=True)
    with pytest.raises(CtpmError, match="unknown registration option"):
        grid_stage(PreprocessConfig(register_spect="rigid", registration={"max_shift": 3}), with_spect=True)
