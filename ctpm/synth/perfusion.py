"""The truth perfusion and the disease that shapes it: gravity and craniocaudal gradients,
heterogeneity, emphysema, peripheral pruning, and the territories of occluded (embolic wedges) or
compressed (tumour) branches."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from ctpm.geometry import Grid
from ctpm.synth.anatomy import Phantom, spheres_mask
from ctpm.synth.fields import smoothstep, uniform
from ctpm.synth.vessels import Tree, render_capsules, segment_point_distance


def emphysema_threshold(fraction: float) -> float:
    """Threshold on a unit Gaussian field (+ its vertical bias) that destroys about `fraction` of the lung."""
    from scipy.stats import norm

    return float(norm.ppf(1 - fraction) * 1.15)



def territory_factor(ph: Phantom, grid: Grid, trees: dict[str, Tree], events: dict[str, list[tuple[int, float]]]) -> np.ndarray:
    """Perfusion factor of the territories of occluded or compressed branches (1 elsewhere).

    A branch's territory is the lung its terminal branches supply: every lung voxel belongs to the
    nearest target point of its own lobe's tree (the tree was grown to fill the lobe from those
    points), so the territory of a branch runs from it to the pleura, wedge-shaped as in embolism.
    """
    out = np.ones(grid.shape, np.float32)
    if not any(events.values()):
        return out
    X, Y, Z = grid.mesh()
    side = ph.lung_side(X, Y, Z)
    lobes = ph.lobes(X, Y, Z, side)
    idx = np.nonzero(side > 0)
    axes = grid.axes()
    pts = np.stack([axes[k][idx[k]] for k in range(3)], 1)
    lobe_vals = lobes[idx]
    factor = np.ones(len(pts), np.float32)
    for s_name, s_val in (("right", 1), ("left", 2)):
        tr = trees[s_name]
        if not events[s_name]:
            continue
        sel = side[idx] == s_val
        owner = np.full(len(pts), -1)
        for lb in np.unique(tr.lobe):
            on = sel & (lobe_vals == lb)
            pidx = np.nonzero(tr.lobe == lb)[0]
            if on.any() and len(pidx):
                owner[on] = pidx[cKDTree(tr.points[pidx]).query(pts[on])[1]]
        for seg, f in events[s_name]:
            inside = (owner >= tr.leaf_lo[seg]) & (owner < tr.leaf_hi[seg])
            factor[inside & sel] *= f
    out[idx] = factor
    return out



def render_perfusion(ph, grid, trees, vessel_radii, tumour_spheres, hetero, emph_field, destruction, territory, physics, rng) -> np.ndarray:
    pf = physics["perfusion"]
    X, Y, Z = grid.mesh()
    side = ph.lung_side(X, Y, Z)
    lung = side > 0
    g = uniform(rng, pf["gravity_per_cm"])
    cc = uniform(rng, pf["craniocaudal_per_cm"])
    perf = (1 + g * (ph.cy + ph.acy - Y) / 10.0) * (1 + cc * (ph.z_apex - Z) / 10.0)
    perf = perf * (1 + float(pf["heterogeneity"]) * hetero.on_grid(grid))
    d = destruction(emph_field.on_grid(grid), Z)
    perf = perf * (1 - (1 - float(physics["emphysema"]["perfusion_factor"])) * d)
    # peripheral pruning: perfusion falls towards the pleura
    dist = ndi.distance_transform_edt(lung, sampling=grid.spacing)
    pr = float(pf["pruning_factor"])
    perf = perf * (pr + (1 - pr) * smoothstep(dist / float(pf["pruning_depth"])))
    perf = np.where(lung, perf, 0.0).astype(np.float32)
    perf *= territory
    # large vessels carry blood but trap no MAA; the tumour traps none
    vessel = np.zeros(grid.shape, np.float32)
    lumen = float(pf["vessel_lumen_radius"])
    for s_name, tr in trees.items():
        r = vessel_radii(s_name)
        big = r > lumen
        render_capsules(vessel, grid, tr.p0[big], tr.p1[big], r[big], 1.0, mode="max")
    perf *= 1 - vessel
    if tumour_spheres:
        perf[spheres_mask(grid, tumour_spheres)] = 0.0
    return perf.astype(np.float32)



def draw_tumour(rng: np.random.Generator, trees: dict[str, Tree], tu: dict, institution: str
                ) -> tuple[list[tuple[np.ndarray, float]], float, dict[str, list[tuple[int, float]]]]:
    """A tumour on a branch of one lung's tree (large ones on central branches, small ones further
    out), lobulated, compressing the vessels within its reach: (spheres (centre, radius) of the mass,
    its diameter in mm, per lung the compressed segments with the perfusion factor of their
    territory)."""
    tumour_spheres: list[tuple[np.ndarray, float]] = []
    compressed: dict[str, list[tuple[int, float]]] = {"right": [], "left": []}
    mean, sd = tu["diameter"][institution]
    diameter = float(np.clip(rng.normal(mean, sd), tu["min_diameter"][institution], tu["max_diameter"]))
    side = "right" if rng.random() < 0.55 else "left"  # right-sided tumours are a little more common
    tree = trees[side]
    n_leaves = tree.leaf_hi - tree.leaf_lo
    # large tumours sit on central (segmental) branches, small ones further out
    want = (6, 40) if diameter >= 25 else (1, 8)
    cand = np.nonzero((n_leaves >= want[0]) & (n_leaves <= want[1]) & (tree.depth >= 1))[0]
    if len(cand) == 0:
        cand = np.nonzero(tree.depth >= 1)[0]
    seg = int(rng.choice(cand))
    t = rng.uniform(0.3, 0.9)
    centre = tree.p0[seg] + t * (tree.p1[seg] - tree.p0[seg])
    radius = diameter / 2
    tumour_spheres.append((centre, radius))
    for _ in range(int(rng.integers(2, 5))):  # lobulation
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        tumour_spheres.append((centre + direction * radius * rng.uniform(0.3, 0.6), radius * rng.uniform(0.45, 0.75)))
    # vessels within reach of the mass are compressed; their distal territory loses perfusion
    margin = float(tu["encasement_margin"])
    for s_name, tr in trees.items():
        d = segment_point_distance(tr.p0, tr.p1, centre)
        hit = np.nonzero(d < radius + tr.r + margin)[0]
        # keep the most proximal compressed segments (their subtrees hold the others)
        hit_set = set(hit.tolist())
        for i in hit:
            p = tr.parent[i]
            if p in hit_set:
                continue
            # deeper encasement (vessel axis well inside the mass) -> stronger defect
            depth_in = np.clip((radius + margin - d[i]) / (radius + margin), 0, 1)
            lo_f, hi_f = tu["defect_factor"]
            factor = hi_f - (hi_f - lo_f) * depth_in
            compressed[s_name].append((int(i), float(factor)))
    return tumour_spheres, diameter, compressed


def draw_wedges(rng: np.random.Generator, trees: dict[str, Tree], pf: dict, cohort: str) -> dict[str, list[tuple[int, float]]]:
    """Embolic wedges (invisible on CT): per lung the occluded segments and their territory's factor."""
    wedges: dict[str, list[tuple[int, float]]] = {"right": [], "left": []}
    n_wedges = rng.poisson(pf["wedge_rate"][cohort])
    for _ in range(n_wedges):
        side = "right" if rng.random() < 0.5 else "left"
        tr = trees[side]
        n_leaves = tr.leaf_hi - tr.leaf_lo
        lo_l, hi_l = pf["wedge_leaves"]
        cand = np.nonzero((n_leaves >= lo_l) & (n_leaves <= hi_l))[0]
        if len(cand):
            wedges[side].append((int(rng.choice(cand)), uniform(rng, pf["wedge_factor"])))
    return wedges
