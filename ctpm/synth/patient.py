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
    Effusion,
    Event,
    Territories,
    draw_cteph,
    draw_tumour,
    draw_tumour_neighbours,
    draw_wedges,
    emphysema_threshold,
    flow_radius_scale,
    render_perfusion,
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
    oracle: np.ndarray | None = None    # perfusion from the CT-visible causes only (on the truth's grid)
    causes: list[str] | None = None     # the disease causes this patient has (perfusion.CAUSES)
    cause_maps: dict | None = None      # in memory only: per cause its perfusion factor on the truth's grid
    vessel_scale: dict | None = None    # in memory only: per lung the calibre factor of each tree segment
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
    lu = physics["lungs"]
    trees = {side: grow_tree(rng, ph.hilum[side], points[side], root_radius=float(lu["artery_root_radius"]),
                             min_radius=float(lu["artery_min_radius"])) for side in ("right", "left")}

    # ---- disease, cause by cause (perfusion.CAUSES: which CT can see, and how) ----
    events: list[Event] = []
    tumour_spheres: list[tuple[np.ndarray, float]] = []
    diameter = None
    pf_g, pf_pr = 1.0, float(pf["pruning_factor"])
    if cohort == "cancer":
        tumour_spheres, diameter, t_side, compression = draw_tumour(rng, trees, tu, institution)
        events += compression
        events += draw_tumour_neighbours(rng, trees, t_side, tumour_spheres[0][0], tumour_spheres[0][1], physics, events)
    cte, pht = physics["cteph"], physics["pulmonary_hypertension"]
    if rng.random() < float(cte["probability"][cohort]):
        events += draw_cteph(rng, trees, cte)
    if rng.random() < float(pht["probability"][cohort]):
        ph.pa_scale = uniform(rng, pht["artery_scale"])
        pf_g, pf_pr = float(pht["gravity_scale"]), float(pht["pruning_factor"])
    events += draw_wedges(rng, trees, pf, cohort)
    eff_cfg = physics["effusion"]
    effusion = None
    if cohort == "cancer" and rng.random() < float(eff_cfg["probability"]):
        eff_side = t_side if rng.random() < 0.7 else ("left" if t_side == "right" else "right")
        effusion = Effusion(ph, eff_side, uniform(rng, eff_cfg["thickness"]), uniform(rng, eff_cfg["top"]),
                            uniform(rng, eff_cfg["band"]))
    causes = sorted({e.cause for e in events} | ({"effusion"} if effusion else set())
                    | ({"pulmonary_hypertension"} if ph.pa_scale > 1 else set()))

    # ---- smooth fields shared by all grids ----
    lo, hi = ph.lung_box()
    emph_field = LatticeField(rng, lo, hi, 6.0, float(em["scale"]))
    hetero = LatticeField(rng, lo, hi, 6.0, float(pf["heterogeneity_scale"]))
    texture = LatticeField(rng, lo, hi, 1.5, 1.6)
    has_emph = rng.random() < em["probability"][cohort]
    emph_frac = uniform(rng, em["fraction"]) if has_emph else 0.0
    if emph_frac > 0:
        causes = sorted({*causes, "emphysema"})
    # upper-lobe predominance: bias the field upwards before thresholding
    def destruction(field_vals, Z):
        if emph_frac <= 0:
            return np.zeros_like(field_vals)
        bias = 0.9 * (Z - (ph.z_apex - 0.5 * ph.height)) / (0.5 * ph.height)
        v = field_vals + bias
        thr = emphysema_threshold(emph_frac)
        return smoothstep((v - thr) / 0.35).astype(np.float32)

    # vessel calibre follows the flow the chronic causes leave (Murray); PH enlarges the central arteries
    scales = {side: flow_radius_scale(trees[side], side, events) for side in trees}

    def vessel_radii(side: str) -> np.ndarray:
        tr = trees[side]
        central = np.where(tr.depth <= 1, ph.pa_scale, 1.0)
        return tr.r * scales[side] * central

    # ---- territories on the working grid (truth, oracle, and the CT signs of the visible causes) ----
    ws = float(preset["work_spacing"])
    wgrid = Grid.around(lo - 24, hi + 24, ws)
    terr = Territories(ph, wgrid, trees)
    visible = [e for e in events if e.visible]
    deficit = {c: 1.0 - terr.factor([e for e in events if e.cause == c])
               for c in ("cteph_mosaic", "hypoxic_vasoconstriction", "atelectasis")}

    def lung_hu(grid: Grid, par: np.ndarray, side: np.ndarray, X, Y, Z) -> np.ndarray:
        """The parenchyma's HU with the signs of the visible causes."""
        def on(c):
            return resample(deficit[c], wgrid, grid, order=1, edge="clamp")
        if cte["probability"][cohort] > 0 and deficit["cteph_mosaic"].any():
            par = par - float(cte["mosaic_hu"]) * on("cteph_mosaic")  # mosaic attenuation
        if deficit["hypoxic_vasoconstriction"].any():
            par = par - float(physics["hypoxic_vasoconstriction"]["air_trapping_hu"]) * on("hypoxic_vasoconstriction")
        if deficit["atelectasis"].any():
            a = np.clip(on("atelectasis") / 0.9, 0, 1)
            par = par * (1 - a) + float(physics["atelectasis"]["hu"]) * a
        if effusion is not None:
            fluid, band = effusion.masks(X, Y, Z, side)
            par = np.broadcast_to(par, side.shape).copy()
            par[band] += float(eff_cfg["compressed_hu"])
            par[fluid] = float(eff_cfg["fluid_hu"])
        return par

    # ---- CT ----
    ct = render_ct(ph, cgrid, trees, vessel_radii, tumour_spheres, texture, emph_field, destruction, lung_hu, physics, rng)
    lsl = cgrid.slices_within(*ph.lung_box())
    lobes = np.zeros(cgrid.shape, np.uint8)
    sub = cgrid[lsl]
    Xs, Ys, Zs = sub.mesh()
    lab = ph.lobes(Xs, Ys, Zs)
    if effusion is not None:  # pleural fluid is not lung
        lab[effusion.masks(Xs, Ys, Zs, ph.lung_side(Xs, Ys, Zs))[0]] = 0
    lobes[lsl] = lab
    if tumour_spheres:
        lobes[lsl][spheres_mask(sub, tumour_spheres)] = 0

    # ---- truth perfusion and the CT-visible oracle on the working grid ----
    params = {"g": uniform(rng, pf["gravity_per_cm"]) * pf_g, "cc": uniform(rng, pf["craniocaudal_per_cm"]),
              "pruning_factor": pf_pr}
    Zw = wgrid.mesh()[2]
    dmap = destruction(emph_field.on_grid(wgrid), Zw)
    # every factor multiplies, so the oracle is the same base without the invisible ones
    base = render_perfusion(ph, wgrid, trees, vessel_radii, tumour_spheres, dmap, 1.0, params, physics, effusion=effusion)
    perf = (base * terr.factor(events) * (1 + float(pf["heterogeneity"]) * hetero.on_grid(wgrid))).astype(np.float32)
    oracle = (base * terr.factor(visible)).astype(np.float32)
    cause_maps = {c: terr.factor([e for e in events if e.cause == c]) for c in {e.cause for e in events}}
    if effusion is not None:
        Xw, Yw, Zw = wgrid.mesh()
        fluid, band = effusion.masks(Xw, Yw, Zw, ph.lung_side(Xw, Yw, Zw))
        cause_maps["effusion"] = np.where(fluid, 0.0, np.where(band, float(eff_cfg["compressed_factor"]), 1.0)).astype(np.float32)
    vessel_scale = {side: scales[side] * np.where(trees[side].depth <= 1, ph.pa_scale, 1.0) for side in trees}

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
    if sp.scatter is not None:  # (absent: no scatter in the projections)
        spect_info["scatter"] = {"fraction": sp.scatter.fraction, "kernel": sp.scatter.kernel,
                                 "fwhm_mm": sp.scatter.fwhm_mm, "correction": sp.scatter.correction}

    # storage orientations differ by institution (as scanners and converters do)
    ct_flips = (True, True, False) if institution == "A" else (False, True, True)
    ct, ct_aff = stored(ct, cgrid, ct_flips)
    lobes, _ = stored(lobes, cgrid, ct_flips)
    data = PatientData(
        patient_id=patient_id, cohort=cohort, institution=institution,
        ct=ct, ct_affine=PHANTOM_TO_RAS @ ct_aff, lobes=lobes,
        spect=sp.array, spect_affine=PHANTOM_TO_RAS @ sp.affine, spect_fwhm_mm=sp.fwhm_mm, spect_info=spect_info,
        perfusion=perf, perfusion_affine=PHANTOM_TO_RAS @ wgrid.affine, tumor_diameter_mm=diameter,
        oracle=oracle, causes=causes, cause_maps=cause_maps, vessel_scale=vessel_scale,
    )
    if with_dose and cohort == "cancer" and tumour_spheres:
        dgrid = Grid.around(lo - 40, hi + 40, max(ws, 2.5))
        data.dose = plan_dose(dgrid, tumour_spheres, physics["dose"], rng)
        data.dose_affine = PHANTOM_TO_RAS @ dgrid.affine
    return data

