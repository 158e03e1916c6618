"""Perfusion defects: what functional avoidance planning needs a CT-based map to find.

A **SPECT defect** is a connected region (26-connected: voxels sharing a face, an edge or a
corner) of SPECT-low voxels (standardised SPECT < threshold, 0.66) inside the evaluation mask
whose volume is at least ``min_defect_ml`` (5 mL by default); smaller low regions are noise and
partial volume, not defects.

For one map, with *map-low* = the mask voxels where the map is < threshold:

- **sensitivity** = volume(defects ∩ map-low) / volume(defects): the share of the SPECT's defect
  volume that the map also calls low (NaN when the patient has no defect);
- **precision** = volume(map-low ∩ SPECT-low) / volume(map-low): the share of the map's low calls
  that the SPECT also calls low, *any* SPECT-low voxel counting (a call in a SPECT-low region
  below the defect size is not a false call); NaN when the map calls nothing low;
- ``defects_found``: how many defects have at least half their volume called low.

The interior versions restrict every volume above to the lung interior
(:func:`ctpm.evaluation.regions.interior_mask`); the defects themselves are still found on the
whole mask (a defect reaching into the interior is judged on its interior part).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ctpm.evaluation.regions import grid_spacing, interior_mask, voxel_ml

DEFAULT_MIN_DEFECT_ML = 5.0
#: share of a defect's volume that must be called low for it to count as found
FOUND_FRACTION = 0.5
_CONNECTIVITY = ndi.generate_binary_structure(3, 3)


@dataclass
class SpectDefects:
    """The SPECT-low voxels and the defects (labels 1..n) of one patient on the evaluation grid."""

    spect_low: np.ndarray  # bool, inside the mask
    labels: np.ndarray  # int32, 0 = no defect
    n: int
    voxel_ml: float

    @property
    def defect(self) -> np.ndarray:
        return self.labels > 0


def find_defects(spect: np.ndarray, mask: np.ndarray, voxel_ml: float, threshold: float = 0.66,
                 min_defect_ml: float = DEFAULT_MIN_DEFECT_ML) -> SpectDefects:
    """The SPECT defects of one patient (module docstring): connected SPECT-low regions in the
    mask of at least min_defect_ml."""
    low = np.asarray(mask, bool) & (np.asarray(spect) < threshold)
    labels, n = ndi.label(low, structure=_CONNECTIVITY)
    if n:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * voxel_ml
        keep = np.zeros(n + 1, bool)
        keep[1:] = sizes >= min_defect_ml
        new = np.zeros(n + 1, np.int32)
        new[keep] = np.arange(1, int(keep.sum()) + 1)
        labels = new[labels]
        n = int(keep.sum())
    return SpectDefects(low, labels.astype(np.int32), int(n), float(voxel_ml))


def _share(num: int, den: int) -> float:
    return num / den if den else math.nan


def defect_metrics(pred: np.ndarray, mask: np.ndarray, defects: SpectDefects, threshold: float = 0.66,
                   interior: np.ndarray | None = None) -> dict[str, float]:
    """Sensitivity and precision of one map's low calls against the SPECT defects (module
    docstring), with ``_interior`` versions when an interior mask is given. Keys: n_defects,
    defect_ml, defects_found, defect_sensitivity, defect_precision, low_call_ml and, with the
    interior, defect_sensitivity_interior, defect_precision_interior."""
    m = np.asarray(mask, bool)
    called = m & (np.asarray(pred) < threshold)
    defect = defects.defect
    row: dict[str, float] = {
        "n_defects": defects.n,
        "defect_ml": float(defect.sum() * defects.voxel_ml),
        "low_call_ml": float(called.sum() * defects.voxel_ml),
        "defect_sensitivity": _share(int((defect & called).sum()), int(defect.sum())),
        "defect_precision": _share(int((called & defects.spect_low).sum()), int(called.sum())),
    }
    if defects.n:
        size = np.bincount(defects.labels.ravel(), minlength=defects.n + 1)[1:]
        hit = np.bincount(defects.labels[called], minlength=defects.n + 1)[1:]
        row["defects_found"] = int((hit >= FOUND_FRACTION * size).sum())
    else:
        row["defects_found"] = 0
    if interior is not None:
        inner = np.asarray(interior, bool)
        row["defect_sensitivity_interior"] = _share(int((defect & called & inner).sum()), int((defect & inner).sum()))
        row["defect_precision_interior"] = _share(int((called & defects.spect_low & inner).sum()),
                                                  int((called & inner).sum()))
    return row


@dataclass
class PatientRegions:
    """What every map of one patient is judged against, computed once: the lung interior and
    the SPECT defects."""

    interior: np.ndarray
    defects: SpectDefects
    fwhm_mm: float


def patient_regions(gv, fwhm_mm: float, threshold: float = 0.66,
                    min_defect_ml: float = DEFAULT_MIN_DEFECT_ML) -> PatientRegions:
    """The interior (evaluation-mask voxels farther than one SPECT FWHM from the lungs' border)
    and the SPECT defects of a patient on its evaluation grid (``affine, spect, mask, lungs``)."""
    mask = np.asarray(gv.mask, bool)
    lungs = (np.asarray(gv.lungs) > 0) | mask
    interior = interior_mask(mask, grid_spacing(gv.affine), fwhm_mm, support=lungs)
    return PatientRegions(interior, find_defects(gv.spect, mask, voxel_ml(gv.affine), threshold, min_defect_ml),
                          float(fwhm_mm))
