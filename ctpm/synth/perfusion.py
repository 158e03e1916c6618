"""The truth perfusion and the disease that shapes it, cause by cause, each with whether CT can see
it and how (``CAUSES``). A cause acts on the territory of a branch of the vessel tree (the lung its
terminal branches supply), on a region of lung, or on the whole lung; chronic causes also narrow
the vessels that carry less flow (Murray: r^3 follows the flow, ``flow_radius_scale``), so the
vessels seen on CT carry information about perfusion; acute embolism does not.

The "CT-visible oracle" is the same perfusion rebuilt from the CT-visible causes only (no random
heterogeneity, no embolic wedges, no MAA clumps): what a perfect CT reader could know."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from ctpm.geometry import Grid
from ctpm.synth.anatomy import Phantom, spheres_mask
from ctpm.synth.fields import smoothstep, uniform
from ctpm.synth.vessels import Tree, render_capsules, segment_point_distance

# cause: (cohort, visible on CT, how)
CAUSES = {
    "gravity": ("both", True, "the dependent lung is denser; perfusion follows the same gradient"),
    "pruning": ("both", True, "perfusion falls towards the pleura (position in the lung)"),
    "heterogeneity": ("both", False, "random regional variation: no CT sign"),
    "emphysema": ("both", True, "destroyed parenchyma below -900 HU, few vessels; poorly perfused"),
    "embolic_wedge": ("both", False, ("acute embolism: a wedge-shaped territory without flow; no sign on "
                                    "non-contrast CT, vessel calibre unchanged")),
    "cteph_mosaic": ("noncancer", True, ("chronic thrombo-embolic disease: hypo-perfused territories are "
                                        "lower in density (mosaic attenuation) with pruned, thinner vessels")),
    "pulmonary_hypertension": ("noncancer", True, ("enlarged central pulmonary arteries and trunk; the "
                                                  "gravity gradient flattens, the periphery prunes")),
    "tumour_compression": ("cancer", True, ("the tumour on or beside an artery (visible at the hilum for "
                                           "central tumours): its whole distal territory loses flow, distal "
                                           "vessels thinner; no density change")),
    "atelectasis": ("cancer", True, "collapsed lung distal to the tumour: dense (soft tissue), unperfused"),
    "effusion": ("cancer", True, ("pleural fluid in the dependent base (water density), the lung above it "
                                 "compressed: denser, less perfused")),
    "hypoxic_vasoconstriction": ("cancer", True, ("the segment of an airway the tumour obstructs: arteries "
                                                 "constrict (thinner vessels), air trapping lowers its density")),
}


def emphysema_threshold(fraction: float) -> float:
    """Threshold on a unit Gaussian field (+ its vertical bias) that destroys about `fraction` of the lung."""
    from scipy.stats import norm

    return float(norm.ppf(1 - fraction) * 1.15)



class Territories:
    """Which branch supplies each lung voxel of ``grid``: every lung voxel belongs to the nearest
    target point of its own lobe's tree (the tree was grown to fill the lobe from those points), so
    the territory of a branch runs from it to the pleura, wedge-shaped as in embolism."""

    def __init__(self, ph: Phantom, grid: Grid, trees: dict[str, Tree]):
        self.grid, self.trees = grid, trees
        X, Y, Z = grid.mesh()
        side = ph.lung_side(X, Y, Z)
        lobes = ph.lobes(X, Y, Z, side)
        self.idx = np.nonzero(side > 0)
        axes = grid.axes()
        pts = np.stack([axes[k][self.idx[k]] for k in range(3)], 1)
        lobe_vals = lobes[self.idx]
        self.side = side[self.idx]
        self.owner = np.full(len(pts), -1)
        for s_name, s_val in (("right", 1), ("left", 2)):
            tr = trees[s_name]
            sel = self.side == s_val
            for lb in np.unique(tr.lobe):
                on = sel & (lobe_vals == lb)
                pidx = np.nonzero(tr.lobe == lb)[0]
                if on.any() and len(pidx):
                    self.owner[on] = pidx[cKDTree(tr.points[pidx]).query(pts[on])[1]]

    def factor(self, events: list[Event]) -> np.ndarray:
        """Perfusion factor of the events' territories (their factors multiply; 1 elsewhere)."""
        out = np.ones(self.grid.shape, np.float32)
        if not events:
            return out
        f = np.ones(len(self.owner), np.float32)
        for e in events:
            tr = self.trees[e.side]
            inside = (self.side == (1 if e.side == "right" else 2)) & (self.owner >= tr.leaf_lo[e.seg]) & (self.owner < tr.leaf_hi[e.seg])
            f[inside] *= e.factor
        out[self.idx] = f
        return out


@dataclass(frozen=True)
class Event:
    """A cause acting on the territory of segment ``seg`` of one lung's tree: its perfusion x factor."""

    cause: str
    side: str
    seg: int
    factor: float

    @property
    def visible(self) -> bool:
        return CAUSES[self.cause][1]

    @property
    def chronic(self) -> bool:
        """Chronic causes remodel the vessels (calibre follows flow); acute embolism does not."""
        return self.cause != "embolic_wedge"


def flow_radius_scale(tree: Tree, side: str, events: list[Event]) -> np.ndarray:
    """Per segment, (the flow it carries / the flow it would carry)^(1/3) under the chronic events:
    Murray's law (r^3 follows the flow) applied to the remodelled tree."""
    point_f = np.ones(len(tree.points))
    for e in events:
        if e.side == side and e.chronic:
            point_f[tree.leaf_lo[e.seg]:tree.leaf_hi[e.seg]] *= e.factor
    csum = np.concatenate([[0.0], np.cumsum(point_f)])
    n = np.maximum(tree.leaf_hi - tree.leaf_lo, 1)
    mean = (csum[tree.leaf_hi] - csum[tree.leaf_lo]) / n
    return np.clip(mean, 1e-3, None) ** (1.0 / 3.0)


class Effusion:
    """A supine pleural effusion: fluid layering along the posterior chest wall of one lung, thickest
    at the base, thinning to nothing at ``top`` mm above the lung base; the lung within ``band`` mm
    of the fluid is compressed (denser, less perfused)."""

    def __init__(self, ph: Phantom, side: str, thickness: float, top: float, band: float):
        self.ph, self.side_val, self.t, self.top, self.band = ph, 1 if side == "right" else 2, thickness, top, band

    def masks(self, X, Y, Z, side) -> tuple[np.ndarray, np.ndarray]:
        """(fluid, compressed band) as bool arrays on the lung voxels of one side."""
        ph = self.ph
        wall_y = ph.cy - ph.acy * np.sqrt(np.clip(1 - ((X - ph.cx) / ph.acx) ** 2, 0, 1))
        depth = Y - wall_y  # distance anterior of the posterior wall
        thick = self.t * np.clip((ph.z_base + self.top - Z) / self.top, 0, 1)
        on = side == self.side_val
        fluid = on & (depth < thick)
        band = on & ~fluid & (depth < thick + self.band) & (thick > 0)
        return fluid, band


def render_perfusion(ph, grid, trees, vessel_radii, tumour_spheres, destruction_map, territory, params, physics, *,
                     heterogeneity=None, effusion: Effusion | None = None) -> np.ndarray:
    """Perfusion on ``grid``: gradients (gravity ``g``, cranio-caudal ``cc`` per cm), peripheral
    pruning, emphysema (``destruction_map``), the causes' ``territory`` factor, the effusion, no
    trapped tracer in large vessels or the tumour; x (1 + ``heterogeneity``) if given."""
    pf = physics["perfusion"]
    X, Y, Z = grid.mesh()
    side = ph.lung_side(X, Y, Z)
    lung = side > 0
    perf = (1 + params["g"] * (ph.cy + ph.acy - Y) / 10.0) * (1 + params["cc"] * (ph.z_apex - Z) / 10.0)
    if heterogeneity is not None:
        perf = perf * (1 + heterogeneity)
    perf = perf * (1 - (1 - float(physics["emphysema"]["perfusion_factor"])) * destruction_map)
    # peripheral pruning: perfusion falls towards the pleura
    dist = ndi.distance_transform_edt(lung, sampling=grid.spacing)
    pr = float(params["pruning_factor"])
    perf = perf * (pr + (1 - pr) * smoothstep(dist / float(pf["pruning_depth"])))
    perf = np.where(lung, perf, 0.0).astype(np.float32)
    perf *= territory
    if effusion is not None:
        fluid, band = effusion.masks(X, Y, Z, side)
        perf[fluid] = 0.0
        perf[band] *= float(physics["effusion"]["compressed_factor"])
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
                ) -> tuple[list[tuple[np.ndarray, float]], float, str, list[Event]]:
    """A tumour on or beside a branch of one lung's tree (large ones on central, lobar/segmental
    branches near the hilum, small ones further out), lobulated, compressing the arteries within its
    reach: (spheres (centre, radius) of the mass, its diameter in mm, its lung, the compression
    events: each compressed branch's whole distal territory loses flow)."""
    tumour_spheres: list[tuple[np.ndarray, float]] = []
    mean, sd = tu["diameter"][institution]
    diameter = float(np.clip(rng.normal(mean, sd), tu["min_diameter"][institution], tu["max_diameter"]))
    side = "right" if rng.random() < 0.55 else "left"  # right-sided tumours are a little more common
    tree = trees[side]
    n_leaves = tree.leaf_hi - tree.leaf_lo
    # large tumours sit on central (segmental) branches, small ones further out
    lo_n, hi_n = leaf_range(tree, tu["branch_share"]["large" if diameter >= 25 else "small"])
    cand = np.nonzero((n_leaves >= lo_n) & (n_leaves <= hi_n) & (tree.depth >= 1))[0]
    if len(cand) == 0:
        cand = np.nonzero(tree.depth >= 1)[0]
    seg = int(rng.choice(cand))
    t = rng.uniform(0.3, 0.9)
    centre = tree.p0[seg] + t * (tree.p1[seg] - tree.p0[seg])
    radius = diameter / 2
    # on the artery, or beside it (up to its radius off the axis)
    off = rng.standard_normal(3)
    centre = centre + off / np.linalg.norm(off) * rng.uniform(0, 0.8) * radius
    tumour_spheres.append((centre, radius))
    for _ in range(int(rng.integers(2, 5))):  # lobulation
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        tumour_spheres.append((centre + direction * radius * rng.uniform(0.3, 0.6), radius * rng.uniform(0.45, 0.75)))
    # vessels within reach of the mass are compressed; their distal territory loses perfusion
    margin = float(tu["encasement_margin"])
    events: list[Event] = []
    for s_name, tr in trees.items():
        d = segment_point_distance(tr.p0, tr.p1, centre)
        hit = np.nonzero(d < radius + tr.r + margin)[0]
        hit_set = set(hit.tolist())
        for i in hit:
            if tr.parent[i] in hit_set:  # keep the most proximal (their subtrees hold the others)
                continue
            # deeper encasement (vessel axis well inside the mass) -> stronger defect
            depth_in = np.clip((radius + margin - d[i]) / (radius + margin), 0, 1)
            lo_f, hi_f = tu["defect_factor"]
            events.append(Event("tumour_compression", s_name, int(i), float(hi_f - (hi_f - lo_f) * depth_in)))
    return tumour_spheres, diameter, side, events


def leaf_range(tree: Tree, share) -> tuple[int, int]:
    """A territory size given as a share [lo, hi] of one lung (its tree's terminal branches) -> a
    range of terminal-branch counts (at least one), the same lung volume on every preset."""
    n = len(tree.points)
    lo = max(1, int(np.floor(float(share[0]) * n)))
    return lo, max(lo, int(np.ceil(float(share[1]) * n)))


def _segments(tree: Tree, share, exclude: set[int] = frozenset()) -> np.ndarray:
    n = tree.leaf_hi - tree.leaf_lo
    lo, hi = leaf_range(tree, share)
    ok = (n >= lo) & (n <= hi)
    return np.array([i for i in np.nonzero(ok)[0] if i not in exclude], int)


def draw_wedges(rng: np.random.Generator, trees: dict[str, Tree], pf: dict, cohort: str) -> list[Event]:
    """Acute embolic wedges (invisible on CT): occluded branches, each territory x factor."""
    events = []
    for _ in range(rng.poisson(pf["wedge_rate"][cohort])):
        side = "right" if rng.random() < 0.5 else "left"
        cand = _segments(trees[side], pf["wedge_share"])
        if len(cand):
            events.append(Event("embolic_wedge", side, int(rng.choice(cand)), uniform(rng, pf["wedge_factor"])))
    return events


def draw_cteph(rng: np.random.Generator, trees: dict[str, Tree], cfg: dict) -> list[Event]:
    """Chronic thrombo-embolic disease: several segmental / subsegmental branches narrowed by
    organised thrombus, in both lungs (mosaic perfusion)."""
    events = []
    for _ in range(int(rng.integers(cfg["branches"][0], cfg["branches"][1] + 1))):
        side = "right" if rng.random() < 0.5 else "left"
        cand = _segments(trees[side], cfg["share"])
        if len(cand):
            events.append(Event("cteph_mosaic", side, int(rng.choice(cand)), uniform(rng, cfg["factor"])))
    return events


def _near_tumour(tree: Tree, centre: np.ndarray, reach: float, share, exclude: set[int]) -> np.ndarray:
    cand = _segments(tree, share, exclude)
    if len(cand) == 0:
        return cand
    d = segment_point_distance(tree.p0[cand], tree.p1[cand], centre)
    return cand[d < reach]


def draw_tumour_neighbours(rng: np.random.Generator, trees: dict[str, Tree], side: str, centre: np.ndarray, radius: float,
                           physics: dict, taken: list[Event]) -> list[Event]:
    """What a tumour does beside compressing arteries: collapses the lung a small branch supplies
    (atelectasis) and, by obstructing an airway, makes the segment's arteries constrict (hypoxic
    vasoconstriction)."""
    tree = trees[side]
    exclude = {e.seg for e in taken if e.side == side}
    events = []
    for cause in ("atelectasis", "hypoxic_vasoconstriction"):
        cfg = physics[cause]
        if rng.random() >= float(cfg["probability"]):
            continue
        cand = _near_tumour(tree, centre, radius + float(cfg["reach_mm"]), cfg["share"], exclude)
        if len(cand):
            seg = int(rng.choice(cand))
            exclude |= {int(i) for i in tree.descendants(seg)}
            events.append(Event(cause, side, seg, uniform(rng, cfg["factor"])))
    return events
