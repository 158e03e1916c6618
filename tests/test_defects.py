"""Defect detection (ctpm.evaluation.defects) on hand-made volumes: a 2 mm grid (a voxel is
0.008 mL, 5 mL = 625 voxels), a mask of 40^3 voxels, SPECT 1 except for three defects of 10^3
voxels (8 mL each) and one low speck of 3^3 voxels (0.216 mL, below the defect size)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctpm.evaluation.defects import defect_metrics, find_defects

VOXEL_ML = 0.008
A = (slice(2, 12), slice(2, 12), slice(2, 12))
B = (slice(2, 12), slice(20, 30), slice(2, 12))
C = (slice(20, 30), slice(2, 12), slice(20, 30))
SPECK = (slice(30, 33), slice(30, 33), slice(30, 33))
FALSE = (slice(30, 35), slice(10, 15), slice(2, 7))  # 125 voxels where the SPECT is high


@pytest.fixture()
def volumes():
    mask = np.ones((40, 40, 40), bool)
    spect = np.ones(mask.shape, np.float32)
    for region in (A, B, C, SPECK):
        spect[region] = 0.3
    return mask, spect


def test_find_defects_keeps_regions_of_the_minimum_volume(volumes):
    mask, spect = volumes
    d = find_defects(spect, mask, VOXEL_ML, threshold=0.66, min_defect_ml=5.0)
    assert d.n == 3 and d.defect.sum() == 3000 and d.spect_low.sum() == 3027
    assert set(np.unique(d.labels[A])) == {d.labels[A][0, 0, 0]} and d.labels[SPECK].max() == 0
    assert find_defects(spect, mask, VOXEL_ML, min_defect_ml=0.2).n == 4  # the speck is 0.216 mL
    assert find_defects(spect, mask, VOXEL_ML, min_defect_ml=9.0).n == 0
    outside = mask.copy()
    outside[C] = False  # a low region outside the mask is no defect
    assert find_defects(spect, outside, VOXEL_ML).n == 2


def test_found_half_found_missed_and_a_false_call(volumes):
    mask, spect = volumes
    d = find_defects(spect, mask, VOXEL_ML)
    pred = np.ones(mask.shape, np.float32)
    pred[A] = 0.2  # found
    pred[2:7, 20:30, 2:12] = 0.2  # half of B
    # C missed
    pred[FALSE] = 0.2  # a false call
    pred[SPECK] = 0.2  # a call in a SPECT-low speck is no false call
    row = defect_metrics(pred, mask, d)
    assert row["n_defects"] == 3 and row["defect_ml"] == pytest.approx(3000 * VOXEL_ML)
    assert row["defect_sensitivity"] == pytest.approx((1000 + 500 + 0) / 3000)
    assert row["defect_precision"] == pytest.approx((1000 + 500 + 27) / (1000 + 500 + 125 + 27))
    assert row["defects_found"] == 2  # A, and B with exactly half its volume called
    assert row["low_call_ml"] == pytest.approx((1000 + 500 + 125 + 27) * VOXEL_ML)
    # the interior: only A and the false call lie in it
    interior = np.zeros(mask.shape, bool)
    interior[0:36, 0:16, 0:13] = True
    row = defect_metrics(pred, mask, d, interior=interior)
    assert row["defect_sensitivity_interior"] == pytest.approx(1.0)
    assert row["defect_precision_interior"] == pytest.approx(1000 / (1000 + 125))


def test_each_case_alone(volumes):
    mask, spect = volumes
    d = find_defects(spect, mask, VOXEL_ML)
    perfect = spect.copy()
    row = defect_metrics(perfect, mask, d)
    assert row["defect_sensitivity"] == 1.0 and row["defect_precision"] == 1.0 and row["defects_found"] == 3
    nothing = np.ones(mask.shape, np.float32)
    row = defect_metrics(nothing, mask, d)
    assert row["defect_sensitivity"] == 0.0 and math.isnan(row["defect_precision"]) and row["defects_found"] == 0
    everything = np.zeros(mask.shape, np.float32)
    row = defect_metrics(everything, mask, d)
    assert row["defect_sensitivity"] == 1.0 and row["defect_precision"] == pytest.approx(3027 / 40 ** 3)
    healthy = find_defects(np.ones(mask.shape), mask, VOXEL_ML)
    row = defect_metrics(everything, mask, healthy, interior=np.zeros(mask.shape, bool))
    assert healthy.n == 0 and math.isnan(row["defect_sensitivity"]) and row["defect_precision"] == 0.0
    assert math.isnan(row["defect_sensitivity_interior"]) and math.isnan(row["defect_precision_interior"])
