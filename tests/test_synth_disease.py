"""Disease in the synthetic world, cause by cause: each changes the perfusion and the CT as
ctpm/synth/perfusion.py CAUSES documents (hand checks on one tiny phantom per cause), and the
CT-visible oracle holds the visible causes only."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ctpm.geometry import Grid, resample
from ctpm.synth import make_patient
from ctpm.synth.perfusion import CAUSES
from tests.conftest import synth_settings


def _patient(cohort: str, on: str | None, seed: int = 0, pid: str | None = None):
    """A tiny patient with cause ``on`` forced (probability 1) and the optional causes off."""
    s = synth_settings()
    ph = copy.deepcopy(s["physics"])
    for c in ("cteph", "pulmonary_hypertension"):
        ph[c]["probability"] = {"noncancer": 0.0, "cancer": 0.0}
    for c in ("atelectasis", "hypoxic_vasoconstriction", "effusion"):
        ph[c]["probability"] = 0.0
    ph["perfusion"]["wedge_rate"] = {"noncancer": 0.0, "cancer": 0.0}
    ph["emphysema"]["probability"] = {"noncancer": 0.0, "cancer": 0.0}
    if on in ("cteph", "pulmonary_hypertension"):
        ph[on]["probability"][cohort] = 1.0
    elif on == "embolic_wedge":
        ph["perfusion"]["wedge_rate"][cohort] = 3.0
    elif on is not None:
        ph[on]["probability"] = 1.0
        if on in ("atelectasis", "hypoxic_vasoconstriction"):
            ph[on]["reach_mm"] = 80.0
    pid = pid or ("NC-A-001" if cohort == "noncancer" else "LC-A-001")
    return make_patient(pid, cohort, "A", s["presets"]["tiny"], ph, seed)


def _ct_on_truth_grid(d) -> np.ndarray:
    return resample(d.ct.astype(np.float32), Grid(d.ct_affine, d.ct.shape), Grid(d.perfusion_affine, d.perfusion.shape),
                    order=1, fill=-1000.0)


def _inside_outside(d, cause: str):
    f = d.cause_maps[cause]
    lung = d.oracle > 0
    return f < 0.95, lung & (f >= 0.999)


def test_every_cause_is_documented_with_its_visibility():
    for cohort, visible, how in CAUSES.values():
        assert cohort in ("both", "noncancer", "cancer") and isinstance(visible, bool) and len(how) > 20
    assert not CAUSES["embolic_wedge"][1] and not CAUSES["heterogeneity"][1]


def test_embolic_wedge_lowers_perfusion_invisibly():
    d = _patient("noncancer", "embolic_wedge", seed=1)
    assert "embolic_wedge" in d.causes
    region, rest = _inside_outside(d, "embolic_wedge")
    assert d.perfusion[region & (d.perfusion > 0)].mean() < 0.5 * d.perfusion[rest & (d.perfusion > 0)].mean()
    # not in the oracle, and no vessel remodelling (acute)
    assert d.oracle[region].mean() > 0.8 * d.oracle[rest].mean()
    assert all(np.allclose(v, 1.0) for v in d.vessel_scale.values())


def test_cteph_mosaic_lowers_perfusion_density_and_calibre():
    d = _patient("noncancer", "cteph", seed=2)
    assert "cteph_mosaic" in d.causes
    region, rest = _inside_outside(d, "cteph_mosaic")
    hu = _ct_on_truth_grid(d)
    inner = region & (d.oracle > 0)
    assert d.perfusion[inner].mean() < 0.75 * d.perfusion[rest].mean()
    assert d.oracle[inner].mean() < 0.75 * d.oracle[rest].mean()  # visible: in the oracle
    parench = (hu > -990) & (hu < -600)
    assert np.median(hu[inner & parench]) < np.median(hu[rest & parench]) - 10  # mosaic attenuation
    assert min(v.min() for v in d.vessel_scale.values()) < 0.9  # pruned vessels


def test_pulmonary_hypertension_enlarges_central_arteries():
    base, d = _patient("noncancer", None, seed=3), _patient("noncancer", "pulmonary_hypertension", seed=3)
    assert "pulmonary_hypertension" in d.causes and "pulmonary_hypertension" not in base.causes
    assert max(v.max() for v in d.vessel_scale.values()) >= 1.3
    # more soft tissue in the mediastinum/hila from the wider arteries (same anatomy, same seed)
    assert (d.ct > -300).sum() > (base.ct > -300).sum()


@pytest.mark.parametrize("cause", ["tumour_compression", "atelectasis", "hypoxic_vasoconstriction", "effusion"])
def test_cancer_causes(cause):
    d = _patient("cancer", None if cause == "tumour_compression" else cause, seed=4)
    assert cause in d.causes, d.causes
    region, rest = _inside_outside(d, cause)
    hu = _ct_on_truth_grid(d)
    lung_rest = rest & (d.perfusion > 0)
    assert d.perfusion[region].mean() < 0.7 * d.perfusion[lung_rest].mean()
    assert d.oracle[region].mean() < 0.7 * d.oracle[lung_rest].mean()  # visible causes are in the oracle
    if cause == "atelectasis":
        core = d.cause_maps[cause] < 0.2
        assert np.median(hu[core]) > -300  # dense
    if cause == "effusion":
        fluid = d.cause_maps[cause] == 0.0
        assert abs(np.median(hu[fluid]) - 12) < 60  # water density
    if cause in ("tumour_compression", "hypoxic_vasoconstriction"):
        assert min(v.min() for v in d.vessel_scale.values()) < 0.9  # thinner distal vessels


def test_oracle_holds_only_the_visible_causes():
    d = _patient("noncancer", "embolic_wedge", seed=1)
    no_wedge = d.oracle > 0
    # oracle: no heterogeneity, no wedges: smooth where the truth is not
    assert np.corrcoef(d.oracle[no_wedge], d.perfusion[no_wedge])[0, 1] < 0.999
    assert d.oracle.shape == d.perfusion.shape
