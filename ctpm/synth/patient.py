"""One synthetic patient: the anatomy, its vessel trees and disease drawn once in world space, then
rendered on each grid (CT, truth perfusion, SPECT, dose)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctpm.geometry import Grid, resample
from ctpm.synth.anatomy import PHANTOM_TO_RAS, Phantom, spheres_mask
from ctpm.synth.ct import ct_grid, render_ct
from ctpm.synth.dose import plan_dose
from ctpm.synth.fields import LatticeField, smoothstep, stored, uniform
from ctpm.synth.perfusion import (
    draw_tumour,
    draw_wedges,
    emphysema_threshold,
    render_perfusion,
    territory_factor,
)
from ctpm.synth.spect import simulate_spect
from ctpm.synth.vessels import grow_tree


@dataclass
class PatientData:
    patient_id: str
    cohort: str
    institution: str
    ct: np.ndarray
    ct_affine: np.ndarray
    lobes: np.ndarray
    spect: np.ndarray
    spect_affine: np.ndarray
    perfusion: np.ndarray
    perfusion_affine: np.ndarray
    tumor_diameter_mm: float | None
    spect_fwhm_mm: float | None = None  # the effective PSF (FWHM, mm) of the SPECT
    spect_info: dict | None = None      # how the SPECT was made: model, misregistration (RAS), clumps, breathing
    dose: np.ndarray | None = None
    dose_affine: np.ndarray | None = None


def make_patient(
    patient_id: str, cohort: str, institution: str, preset: dict, physics: dict, seed: int, *, with_dose: bool = False
) -> PatientData:
    """Draw one patient. Deterministic in (seed, patient_id)."""
    rng = np.random.default_rng([seed, *patient_id.encode()])
    cgrid = ct_grid(preset, institution)
    z_axis = cgrid.axes()[2]
    ph = Phantom(rng, cohort, institution, physics, (float(z_axis[0]), float(z_axis[-1])))
    em, pf, tu = physics["emphysema"], physics["perfusion"], physics["tumour"]

    # ---- vessel trees, one per lung, a lobar branch per lobe ----
    points = ph.sample_lung_points(int(preset["leaves_per_lung"]))
    trees = {side: grow_tree(rng, ph.hilum[side], points[side], root_radius=10.0, min_radius=0.9) for side in ("right", "left")}

    # ---- disease: a tumour (cancer cohort) compressing the branches it touches, embolic wedges ----
    tumour_spheres: list[tuple[np.ndarray, float]] = []
    diameter = None
    compressed: dict[str, list[tuple[int, float]]] = {"right": [], "left": []}
    if cohort == "cancer":
        tumour_spheres, diameter, compressed = draw_tumour(rng, trees, tu, institution)
    wedges = draw_wedges(rng, trees, pf, cohort)

    # ---- smooth fields shared by all grids ----
    lo, hi = ph.lung_box()
    emph_field = LatticeField(rng, lo, hi, 6.0, float(em["scale"]))
    hetero = LatticeField(rng, lo, hi, 6.0, float(pf["heterogeneity_scale"]))
    texture = LatticeField(rng, lo, hi, 1.5, 1.6)
    has_emph = rng.random() < em["probability"][cohort]
    emph_frac = uniform(rng, em["fraction"]) if has_emph else 0.0
    # upper-lobe predominance: bias the field upwards before thresholding
    def destruction(field_vals, Z):
        if emph_frac <= 0:
            return np.zeros_like(field_vals)
        bias = 0.9 * (Z - (ph.z_apex - 0.5 * ph.height)) / (0.5 * ph.height)
        v = field_vals + bias
        thr = emphysema_threshold(emph_frac)
        return smoothstep((v - thr) / 0.35).astype(np.float32)

    distal_scale = float(tu["distal_vessel_scale"])

    def vessel_radii(side: str) -> np.ndarray:
        tr = trees[side]
        r = tr.r.copy()
        for i, _ in compressed[side]:
            r[tr.descendants(i)] *= distal_scale
        return r

    # ---- territories on the working grid (truth perfusion and, for compressed ones, the CT) ----
    ws = float(preset["work_spacing"])
    wgrid = Grid.around(lo - 24, hi + 24, ws)
    compressed_factor = territory_factor(ph, wgrid, trees, compressed)
    wedge_factor = territory_factor(ph, wgrid, trees, wedges)
    # chronic compression leaves the distal lung oligaemic: less blood, lower density (mosaic
    # attenuation), so this defect has a cause and a sign on CT; acute embolic wedges have neither
    deficit = 1.0 - compressed_factor

    def oligaemia(grid: Grid) -> np.ndarray:
        return float(tu["oligaemia_hu"]) * resample(deficit, wgrid, grid, order=1, edge="clamp")

    # ---- CT ----
    ct = render_ct(ph, cgrid, trees, vessel_radii, tumour_spheres, texture, emph_field, destruction, oligaemia, physics, rng)
    lsl = cgrid.slices_within(*ph.lung_box())
    lobes = np.zeros(cgrid.shape, np.uint8)
    sub = cgrid[lsl]
    Xs, Ys, Zs = sub.mesh()
    lobes[lsl] = ph.lobes(Xs, Ys, Zs)
    if tumour_spheres:
        lobes[lsl][spheres_mask(sub, tumour_spheres)] = 0

    # ---- truth perfusion on the working grid ----
    perf = render_perfusion(ph, wgrid, trees, vessel_radii, tumour_spheres, hetero, emph_field, destruction,
                             compressed_factor * wedge_factor, physics, rng)

    # ---- SPECT on the institution's grid ----
    sp = simulate_spect(perf, wgrid, ph, ct, cgrid, preset, physics, institution, rng)
    ct_to_spect_ras = PHANTOM_TO_RAS @ sp.ct_to_spect @ PHANTOM_TO_RAS  # PHANTOM_TO_RAS is its own inverse
    spect_info = {
        "model": sp.model, "fwhm_mm": round(sp.fwhm_mm, 4),
        "ct_to_spect": np.round(ct_to_spect_ras, 8).tolist(),
        # the same motion in RAS: translation mirrored in x, rotations about y and z change sign
        "translation_mm": (PHANTOM_TO_RAS[:3, :3] @ np.asarray(sp.misregistration["translation_mm"])).round(4).tolist(),
        "rotation_deg": (np.array([1.0, -1.0, -1.0]) * sp.misregistration["rotation_deg"]).round(4).tolist(),
        "rotation_centre_mm": (PHANTOM_TO_RAS[:3, :3] @ np.asarray(sp.misregistration["centre_mm"])).round(4).tolist(),
        "maa_clumps": sp.clumps, "breathing_mm": round(sp.breathing_mm, 3),
    }

    # storage orientations differ by institution (as scanners and converters do)
    ct_flips = (True, True, False) if institution == "A" else (False, True, True)
    ct, ct_aff = stored(ct, cgrid, ct_flips)
    lobes, _ = stored(lobes, cgrid, ct_flips)
    data = PatientData(
        patient_id=patient_id, cohort=cohort, institution=institution,
        ct=ct, ct_affine=PHANTOM_TO_RAS @ ct_aff, lobes=lobes,
        spect=sp.array, spect_affine=PHANTOM_TO_RAS @ sp.affine, spect_fwhm_mm=sp.fwhm_mm, spect_info=spect_info,
        perfusion=perf, perfusion_affine=PHANTOM_TO_RAS @ wgrid.affine, tumor_diameter_mm=diameter,
    )
    if with_dose and cohort == "cancer" and tumour_spheres:
        dgrid = Grid.around(lo - 40, hi + 40, max(ws, 2.5))
        data.dose = plan_dose(dgrid, tumour_spheres, physics["dose"], rng)
        data.dose_affine = PHANTOM_TO_RAS @ dgrid.affine
    return data

