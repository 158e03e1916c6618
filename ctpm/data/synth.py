"""Synthetic SPECT/CT patients that behave like the paper's cohorts (``ctpm-synth``).

Real perfusion SPECT/CT cannot be shipped, so ctpm trains and is tested on phantoms. Each patient
is a set of analytic shapes in world coordinates (mm), so that the same anatomy can be drawn
on any grid: the CT on the institution's CT grid, the truth perfusion on a working grid, the SPECT
on the camera's own grid. What the phantom holds, and why:

- CT anatomy (HU): body with fat and muscle, ribs, spine, sternum, table; heart, aorta, pulmonary
  trunk, vena cava, oesophagus; trachea and main bronchi whose air touches the lungs (the classic
  segmentation trap); two lungs of different shape (right dome higher, left with the cardiac
  notch), oblique and horizontal fissures giving five lobes; a branching, tapering vessel tree per
  lobe; parenchyma near -850 HU with texture and a denser dependent (posterior) side.
- Truth perfusion: gravity gradient (a few % per cm towards the posterior lung), emphysema
  (destroyed parenchyma below -900 HU, visible on CT, poorly perfused), peripheral pruning near the
  pleura, no trapped tracer in large vessels, embolic wedge defects (the territory of an occluded
  branch: invisible on CT, what no model can learn) and, in the cancer cohort, a tumour that
  compresses the vessels it touches, so that their whole distal territory is hypo-perfused (a cause
  visible on CT, with thinner distal vessels): the shifted domain that fine-tuning must learn.
- SPECT: truth blurred by the camera (Gaussian PSF), sampled on the institution's grid (its own
  size, origin and orientation), Poisson counts, light reconstruction smoothing.

Every number comes from ``conf/synth.yaml``. The same seed gives the same bytes.

The shapes are drawn in a frame whose x points to the patient's LEFT (heart, stomach, descending
aorta and the lower diaphragm dome at +x); the files are RAS (x to the patient's right), so every
stored affine mirrors x (``PHANTOM_TO_RAS``).
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from ctpm.data.io import save_nifti
from ctpm.data.manifest import write_manifest
from ctpm.errors import CtpmError

LOBES = {1: "LUL", 2: "LLL", 3: "RUL", 4: "RML", 5: "RLL"}
# phantom frame (x to the patient's left) -> world RAS (x to the patient's right)
PHANTOM_TO_RAS = np.diag([-1.0, 1.0, 1.0, 1.0])


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """An axis-aligned grid in the phantom frame: world = origin + index * spacing."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axes(self) -> list[np.ndarray]:
        return [self.origin[d] + self.spacing[d] * np.arange(self.shape[d]) for d in range(3)]

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable coordinate arrays X (n,1,1), Y (1,n,1), Z (1,1,n)."""
        x, y, z = self.axes()
        return x[:, None, None], y[None, :, None], z[None, None, :]

    @property
    def affine(self) -> np.ndarray:
        a = np.diag([*self.spacing, 1.0])
        a[:3, 3] = self.origin
        return a

    def index_range(self, lo: Iterable[float], hi: Iterable[float]) -> tuple[slice, ...]:
        """Index slices of the voxels whose centres lie in the world box [lo, hi]."""
        out = []
        for d, (a, b) in enumerate(zip(lo, hi)):
            i0 = max(0, int(math.ceil((a - self.origin[d]) / self.spacing[d])))
            i1 = min(self.shape[d], int(math.floor((b - self.origin[d]) / self.spacing[d])) + 1)
            out.append(slice(i0, max(i0, i1)))
        return tuple(out)

    def sub(self, sl: tuple[slice, ...]) -> "Grid":
        return Grid(
            tuple(s.stop - s.start for s in sl),  # type: ignore[arg-type]
            self.spacing,
            tuple(self.origin[d] + sl[d].start * self.spacing[d] for d in range(3)),  # type: ignore[arg-type]
        )

    @staticmethod
    def around(lo: np.ndarray, hi: np.ndarray, spacing: float) -> "Grid":
        shape = tuple(int(np.ceil((hi[d] - lo[d]) / spacing)) + 1 for d in range(3))
        return Grid(shape, (spacing,) * 3, tuple(float(v) for v in lo))  # type: ignore[arg-type]


def stored_affine(grid: Grid, flips: tuple[bool, bool, bool]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Affine and array flips that store a canonical grid with some axes reversed.

    Scanners and converters store images in many orientations (LPS-like, feet-first ...); the
    cohorts use several so that every reader and resampler is exercised on each patient.
    """
    aff = grid.affine.copy()
    sl = []
    for d, f in enumerate(flips):
        if f:
            aff[:3, 3] += aff[:3, d] * (grid.shape[d] - 1)
            aff[:3, d] *= -1
            sl.append(slice(None, None, -1))
        else:
            sl.append(slice(None))
    return aff, tuple(sl)


class LatticeField:
    """A smooth random field defined on a coarse world lattice, sampled anywhere by trilinear
    interpolation. The same field is seen by the CT grid and the perfusion grid."""

    def __init__(self, rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, spacing: float, scale: float):
        self.lo = np.asarray(lo, float) - 2 * spacing
        self.spacing = float(spacing)
        shape = tuple(int(np.ceil((hi[d] - self.lo[d]) / spacing)) + 3 for d in range(3))
        f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=scale / spacing, mode="wrap")
        self.field = (f - f.mean()) / (f.std() + 1e-12)

    def on_grid(self, grid: Grid) -> np.ndarray:
        return sample_on_grid(self.field, self.lo, (self.spacing,) * 3, grid)

    def at(self, pts: np.ndarray) -> np.ndarray:
        u = ((pts - self.lo) / self.spacing).T
        return ndi.map_coordinates(self.field, u, order=1, mode="nearest")


def sample_on_grid(field: np.ndarray, origin, spacing, grid: Grid) -> np.ndarray:
    """Separable trilinear interpolation of a field on one axis-aligned grid onto another (cheap
    for large grids: three 1-D passes instead of a 3-D gather); edge values beyond the field."""
    out = field
    for d, ax in enumerate(grid.axes()):
        u = np.clip((ax - origin[d]) / spacing[d], 0, field.shape[d] - 1.001)
        i0 = np.floor(u).astype(np.intp)
        shape = [1, 1, 1]
        shape[d] = -1
        w = (u - i0).astype(np.float32).reshape(shape)
        out = np.take(out, i0, axis=d) * (1 - w) + np.take(out, i0 + 1, axis=d) * w
    return out


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


# --------------------------------------------------------------------------------------------------
# Tubes (vessels, airways) as capsules
# --------------------------------------------------------------------------------------------------


@dataclass
class Tree:
    """A vessel tree: segment i runs p0[i] -> p1[i] with radius r[i]; its subtree's terminal
    branches own the target points leaf_lo[i]:leaf_hi[i] (points are ordered so that every subtree
    is a contiguous range), which defines its perfusion territory."""

    p0: np.ndarray
    p1: np.ndarray
    r: np.ndarray
    parent: np.ndarray
    depth: np.ndarray
    leaf_lo: np.ndarray
    leaf_hi: np.ndarray
    points: np.ndarray
    lobe: np.ndarray  # lobe label of each target point

    def descendants(self, i: int) -> np.ndarray:
        """Segments whose territory lies inside segment i's (i included)."""
        return np.nonzero((self.leaf_lo >= self.leaf_lo[i]) & (self.leaf_hi <= self.leaf_hi[i]))[0]


def render_capsules(
    out: np.ndarray,
    grid: Grid,
    p0: np.ndarray,
    p1: np.ndarray,
    radius: np.ndarray,
    value: float | np.ndarray,
    *,
    mode: str = "set",
    within: np.ndarray | None = None,
) -> None:
    """Draw capsules (tubes with round ends) into `out` with partial-volume edges.

    mode "set": blend `value` in by the covered fraction; "max": out = max(out, fraction) (masks).
    within: optional bool array; only voxels where it is True are changed.
    """
    spacing = np.asarray(grid.spacing)
    origin = np.asarray(grid.origin)
    half_vox = 0.5 * float(spacing.min())
    for k in range(len(radius)):
        a, b, r = p0[k], p1[k], float(radius[k])
        lo = np.minimum(a, b) - r - spacing
        hi = np.maximum(a, b) + r + spacing
        sl = grid.index_range(lo, hi)
        if any(s.stop <= s.start for s in sl):
            continue
        sub = grid.sub(sl)
        X, Y, Z = sub.mesh()
        ab = b - a
        L2 = float(ab @ ab) + 1e-12
        t = ((X - a[0]) * ab[0] + (Y - a[1]) * ab[1] + (Z - a[2]) * ab[2]) / L2
        t = np.clip(t, 0.0, 1.0)
        d2 = (X - a[0] - t * ab[0]) ** 2 + (Y - a[1] - t * ab[1]) ** 2 + (Z - a[2] - t * ab[2]) ** 2
        # covered fraction: 1 inside, 0 outside, linear over one voxel across the wall
        frac = np.clip((r - np.sqrt(d2)) / (2 * half_vox) + 0.5, 0.0, 1.0).astype(np.float32)
        if within is not None:
            frac = frac * within[sl]
        view = out[sl]
        if mode == "max":
            np.maximum(view, frac, out=view)
        else:
            v = value if np.isscalar(value) else float(value[k])  # type: ignore[index]
            view += frac * (np.float32(v) - view)


def _grow_tree(
    rng: np.random.Generator,
    root: np.ndarray,
    lobe_points: dict[int, np.ndarray],
    root_radius: float,
    min_radius: float,
) -> Tree:
    """A space-filling tree from the hilum into each lobe by recursive bisection of target points.

    Each branch runs from its parent's end towards the centroid of the points it supplies; its
    radius follows Murray's law (r^3 proportional to the territory it feeds), so the tree tapers
    from ~10 mm at the hilum to ~1 mm at the periphery.
    """
    p0, p1, rr, parent, depth, lo_i, hi_i = [], [], [], [], [], [], []
    ordered: list[np.ndarray] = []
    lobes_of: list[np.ndarray] = []
    total = sum(len(p) for p in lobe_points.values())
    counter = [0]

    def add(a, b, r, par, dep, n_lo, n_hi):
        p0.append(a)
        p1.append(b)
        rr.append(r)
        parent.append(par)
        depth.append(dep)
        lo_i.append(n_lo)
        hi_i.append(n_hi)
        return len(p0) - 1

    def grow(start, pts, lobe, r, par, dep):
        n = len(pts)
        centroid = pts.mean(0)
        if n == 1 or r <= min_radius:
            base = counter[0]
            ordered.append(pts)
            lobes_of.append(np.full(n, lobe))
            counter[0] += n
            add(start, centroid, max(r, min_radius * 0.7), par, dep, base, base + n)
            return
        frac = rng.uniform(0.35, 0.6) if dep > 0 else rng.uniform(0.45, 0.6)
        end = start + frac * (centroid - start)
        idx = add(start, end, r, par, dep, counter[0], -1)
        # split along the principal axis of the points this branch supplies
        c = pts - centroid
        axis = np.linalg.svd(c, full_matrices=False)[2][0] if n > 2 else c[0]
        proj = c @ axis
        order = np.argsort(proj)
        cut = int(np.clip(round(n * rng.uniform(0.4, 0.6)), 1, n - 1))
        for part in (pts[order[:cut]], pts[order[cut:]]):
            rc = r * (len(part) / n) ** (1 / 3)
            grow(end, part, lobe, rc, idx, dep + 1)
        hi_i[idx] = counter[0]

    for lobe, pts in lobe_points.items():
        r_lobe = root_radius * (len(pts) / total) ** (1 / 3)
        grow(np.asarray(root, float), pts, lobe, r_lobe, -1, 0)
    return Tree(
        np.array(p0), np.array(p1), np.array(rr), np.array(parent), np.array(depth),
        np.array(lo_i), np.array(hi_i), np.concatenate(ordered), np.concatenate(lobes_of),
    )


# --------------------------------------------------------------------------------------------------
# The patient
# --------------------------------------------------------------------------------------------------


def _u(rng: np.random.Generator, lohi) -> float:
    lo, hi = (float(v) for v in lohi)
    return float(rng.uniform(lo, hi))


class Phantom:
    """One synthetic patient: anatomy drawn from `physics`, in phantom-frame mm (x to the patient's
    left, y anterior, z superior) around (cx, cy)."""

    def __init__(self, rng: np.random.Generator, cohort: str, institution: str, physics: dict, fov_z: tuple[float, float]):
        self.rng, self.cohort, self.institution = rng, cohort, institution
        ph = physics
        b, lu = ph["body"], ph["lungs"]
        s = float(b["shift"])
        self.cx, self.cy = _u(rng, (-s, s)), _u(rng, (-s, s))
        self.ax, self.ay = _u(rng, b["half_width"]), _u(rng, b["half_depth"])
        self.fat = _u(rng, b["fat_thickness"])
        self.wall = _u(rng, b["wall_thickness"])
        self.acx = self.ax - self.fat - self.wall  # pleural cavity semi-axes
        self.acy = self.ay - self.fat - self.wall
        z_lo, z_hi = fov_z
        self.height = _u(rng, lu["height"])
        self.z_apex = z_hi - _u(rng, lu["apex_margin"])
        self.z_base = self.z_apex - self.height
        if self.z_base < z_lo + 15:  # keep the whole lung inside the field of view
            self.z_base = z_lo + 15
            self.height = self.z_apex - self.z_base
        self.dome_h = _u(rng, lu["dome_height"])
        self.right_up = _u(rng, lu["right_dome_higher"])
        self.gap = _u(rng, lu["anterior_gap"])
        self.w_med = _u(rng, lu["mediastinum_half_width"])
        self.r_vb = rng.uniform(17, 22)  # vertebral body
        self.spine_c = np.array([self.cx, self.cy - self.acy + 0.55 * self.r_vb])
        # heart: sits on the left hemidiaphragm, anterior: it carves the cardiac notch
        self.heart_c = np.array([self.cx + rng.uniform(18, 30), self.cy + 0.25 * self.acy, self.z_base + self.dome_h + rng.uniform(35, 50)])
        self.heart_r = np.array([rng.uniform(50, 62), rng.uniform(42, 52), rng.uniform(48, 58)])
        self.z_carina = self.z_apex - rng.uniform(45, 65)
        self.trachea_r = _u(rng, lu["trachea_radius"])
        self.bronchus_r = _u(rng, lu["bronchus_radius"])
        self.trachea_xy = np.array([self.cx + rng.uniform(-4, 4), self.cy - 0.12 * self.acy])
        hy = self.cy - 0.08 * self.acy
        self.hilum = {
            "right": np.array([self.cx - self.w_med - 8, hy, self.z_carina - rng.uniform(20, 30)]),
            "left": np.array([self.cx + self.w_med + 8, hy, self.z_carina - rng.uniform(28, 38)]),
        }
        self.parenchyma_hu = _u(rng, lu["parenchyma_hu"])
        self.gradient_hu = _u(rng, lu["dependent_gradient_hu"])
        # fissures: oblique in both lungs (upper/anterior lobe above), horizontal on the right
        self.obl = {side: (rng.uniform(0.85, 1.3), rng.uniform(-5, 20)) for side in ("right", "left")}
        self.horiz = rng.uniform(-5, 12)
        self.stomach_bubble = rng.random() < 0.5

    # ---- implicit shapes; X, Y, Z broadcastable arrays (grid meshes or point lists) ----

    def diaphragm_z(self, X, Y):
        """Height of the diaphragm under each (x, y): two domes, the right one higher."""
        xs_r, xs_l = self.cx - 0.5 * self.acx, self.cx + 0.5 * self.acx
        out = []
        for xs, up in ((xs_r, self.right_up), (xs_l, 0.0)):
            r2 = ((X - xs) / (0.75 * self.acx)) ** 2 + ((Y - self.cy) / (0.95 * self.acy)) ** 2
            dome = self.dome_h * np.clip(1 - r2, 0, 1)
            posterior = 18.0 * np.clip((Y - self.cy) / self.acy, -1, 1)  # deeper posterior recess
            out.append(self.z_base + 8 + up + dome + posterior)
        return np.where(X < self.cx, out[0], out[1])

    def lung_side(self, X, Y, Z):
        """0 outside the lungs, 1 right lung, 2 left lung (before lobes and tumour)."""
        # the thorax widens from the apex to the base
        taper = 0.82 + 0.18 * _smoothstep((self.z_apex - Z) / (0.6 * self.height))
        e = ((X - self.cx) / (self.acx * taper)) ** 2 + ((Y - self.cy) / self.acy) ** 2
        inside = e <= 1.0
        # apex: each lung closes in a dome over its own centre
        xs = np.where(X < self.cx, self.cx - 0.5 * self.acx, self.cx + 0.5 * self.acx)
        ys = self.cy - 0.15 * self.acy  # apices sit posteriorly
        r_side = np.sqrt(((X - xs) / (0.5 * self.acx)) ** 2 + ((Y - ys) / self.acy) ** 2)
        R = 0.42 * self.height
        t = np.clip((Z - (self.z_apex - R)) / R, 0, 1)
        inside = inside & (r_side <= 1.3 * np.sqrt(np.clip(1 - t**2, 0, 1)) + 1e-6) & (Z <= self.z_apex)
        inside = inside & (Z > self.diaphragm_z(X, Y))
        # mediastinum: a central band, narrower above the heart, and narrow in front (the lungs
        # may touch there: the anterior junction line)
        upper = _smoothstep((Z - (self.z_carina - 10)) / 40.0)
        w = self.w_med * (1 - 0.4 * upper)
        ant = _smoothstep((Y - (self.cy + 0.1 * self.acy)) / (0.35 * self.acy))
        half = w * (1 - ant) + 0.5 * self.gap * ant
        inside = inside & (np.abs(X - self.cx) > half)
        # heart (+3 mm pleura), vertebral body, aorta
        hc, hr = self.heart_c, self.heart_r + 3
        inside = inside & (((X - hc[0]) / hr[0]) ** 2 + ((Y - hc[1]) / hr[1]) ** 2 + ((Z - hc[2]) / hr[2]) ** 2 > 1)
        inside = inside & ((X - self.spine_c[0]) ** 2 + (Y - self.spine_c[1]) ** 2 > (self.r_vb + 6) ** 2)
        ao = np.array([self.cx + 24, self.cy - self.acy + 34])
        inside = inside & ((X - ao[0]) ** 2 + (Y - ao[1]) ** 2 > 17.0**2)
        return np.where(inside, np.where(X < self.cx, 1, 2), 0).astype(np.uint8)

    def fissure_distance(self, X, Y, Z, side: str):
        """Signed distance (mm) to the oblique fissure; > 0 on the upper/anterior side."""
        h = self.hilum[side]
        slope, off = self.obl[side]
        return (Z - h[2] - off + slope * (Y - h[1])) / math.sqrt(1 + slope**2)

    def horizontal_distance(self, X, Y, Z):
        h = self.hilum["right"]
        return Z - (h[2] + self.horiz + 0.1 * (Y - h[1]))

    def lobes(self, X, Y, Z, side_map=None):
        side = self.lung_side(X, Y, Z) if side_map is None else side_map
        upper_l = self.fissure_distance(X, Y, Z, "left") > 0
        upper_r = self.fissure_distance(X, Y, Z, "right") > 0
        rul = self.horizontal_distance(X, Y, Z) > 0
        left = np.where(upper_l, 1, 2)
        right = np.where(upper_r, np.where(rul, 3, 4), 5)
        return np.where(side == 2, left, np.where(side == 1, right, 0)).astype(np.uint8)

    def lung_box(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.array([self.cx - self.acx, self.cy - self.acy, self.z_base - 5])
        hi = np.array([self.cx + self.acx, self.cy + self.acy, self.z_apex + 1])
        return lo, hi

    def sample_lung_points(self, n_per_lung: int) -> dict[str, dict[int, np.ndarray]]:
        """Target points of the vessel trees, uniform in each lobe."""
        lo, hi = self.lung_box()
        out: dict[str, dict[int, list]] = {"right": {}, "left": {}}
        need = {"right": n_per_lung, "left": n_per_lung}
        got = {"right": 0, "left": 0}
        tries = 0
        while min(got[s] - need[s] for s in need) < 0 and tries < 50:
            pts = lo + self.rng.random((20 * n_per_lung, 3)) * (hi - lo)
            side = self.lung_side(pts[:, 0], pts[:, 1], pts[:, 2])
            lobe = self.lobes(pts[:, 0], pts[:, 1], pts[:, 2], side)
            for s_name, s_val in (("right", 1), ("left", 2)):
                sel = pts[side == s_val][: max(0, need[s_name] - got[s_name])]
                for lb in np.unique(lobe[side == s_val][: len(sel)]):
                    keep = sel[lobe[side == s_val][: len(sel)] == lb]
                    out[s_name].setdefault(int(lb), []).append(keep)
                got[s_name] += len(sel)
            tries += 1
        return {s: {lb: np.concatenate(v) for lb, v in d.items() if sum(len(x) for x in v) > 0} for s, d in out.items()}


# --------------------------------------------------------------------------------------------------
# Building one patient
# --------------------------------------------------------------------------------------------------


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
    dose: np.ndarray | None = None
    dose_affine: np.ndarray | None = None


def _ct_grid(preset: dict, institution: str) -> Grid:
    n, px = int(preset["ct_matrix"]), float(preset["ct_pixel"])
    dz = float(preset["ct_slice"][institution])
    nz = int(round(float(preset["ct_fov_z"]) / dz))
    half = (n - 1) * px / 2
    return Grid((n, n, nz), (px, px, dz), (-half, -half, -(nz - 1) * dz / 2))


def make_patient(
    patient_id: str, cohort: str, institution: str, preset: dict, physics: dict, seed: int, *, with_dose: bool = False
) -> PatientData:
    """Draw one patient. Deterministic in (seed, patient_id)."""
    rng = np.random.default_rng([seed, *patient_id.encode()])
    ct_grid = _ct_grid(preset, institution)
    z_axis = ct_grid.axes()[2]
    ph = Phantom(rng, cohort, institution, physics, (float(z_axis[0]), float(z_axis[-1])))
    lu, em, pf, tu = physics["lungs"], physics["emphysema"], physics["perfusion"], physics["tumour"]

    # ---- vessel trees, one per lung, a lobar branch per lobe ----
    points = ph.sample_lung_points(int(preset["leaves_per_lung"]))
    trees = {side: _grow_tree(rng, ph.hilum[side], points[side], root_radius=10.0, min_radius=0.9) for side in ("right", "left")}

    # ---- tumour (cancer cohort): on a branch, compressing what it touches ----
    tumour_spheres: list[tuple[np.ndarray, float]] = []
    diameter = None
    compressed: dict[str, list[tuple[int, float]]] = {"right": [], "left": []}
    if cohort == "cancer":
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
            d = _segment_point_distance(tr.p0, tr.p1, centre)
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

    # ---- embolic wedges (invisible on CT) ----
    wedges: dict[str, list[tuple[int, float]]] = {"right": [], "left": []}
    n_wedges = rng.poisson(pf["wedge_rate"][cohort])
    for _ in range(n_wedges):
        side = "right" if rng.random() < 0.5 else "left"
        tr = trees[side]
        n_leaves = tr.leaf_hi - tr.leaf_lo
        lo_l, hi_l = pf["wedge_leaves"]
        cand = np.nonzero((n_leaves >= lo_l) & (n_leaves <= hi_l))[0]
        if len(cand):
            wedges[side].append((int(rng.choice(cand)), _u(rng, pf["wedge_factor"])))

    # ---- smooth fields shared by all grids ----
    lo, hi = ph.lung_box()
    emph_field = LatticeField(rng, lo, hi, 6.0, float(em["scale"]))
    hetero = LatticeField(rng, lo, hi, 6.0, float(pf["heterogeneity_scale"]))
    texture = LatticeField(rng, lo, hi, 1.5, 1.6)
    has_emph = rng.random() < em["probability"][cohort]
    emph_frac = _u(rng, em["fraction"]) if has_emph else 0.0
    # upper-lobe predominance: bias the field upwards before thresholding
    def destruction(field_vals, Z):
        if emph_frac <= 0:
            return np.zeros_like(field_vals)
        bias = 0.9 * (Z - (ph.z_apex - 0.5 * ph.height)) / (0.5 * ph.height)
        v = field_vals + bias
        thr = _emph_threshold(emph_frac)
        return _smoothstep((v - thr) / 0.35).astype(np.float32)

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
        return float(tu["oligaemia_hu"]) * sample_on_grid(deficit, wgrid.origin, wgrid.spacing, grid)

    # ---- CT ----
    ct = _render_ct(ph, ct_grid, trees, vessel_radii, tumour_spheres, texture, emph_field, destruction, oligaemia, physics, rng)
    X, Y, Z = ct_grid.mesh()
    lsl = ct_grid.index_range(*ph.lung_box())
    lobes = np.zeros(ct_grid.shape, np.uint8)
    sub = ct_grid.sub(lsl)
    Xs, Ys, Zs = sub.mesh()
    lobes[lsl] = ph.lobes(Xs, Ys, Zs)
    if tumour_spheres:
        lobes[lsl][_spheres_mask(sub, tumour_spheres)] = 0

    # ---- truth perfusion on the working grid ----
    perf = _render_perfusion(ph, wgrid, trees, vessel_radii, tumour_spheres, hetero, emph_field, destruction,
                             compressed_factor * wedge_factor, physics, rng)

    # ---- SPECT on the institution's grid ----
    spect, spect_aff = _simulate_spect(perf, wgrid, ph, preset, physics, institution, rng)

    # storage orientations differ by institution (as scanners and converters do)
    ct_aff, ct_flip = stored_affine(ct_grid, (True, True, False) if institution == "A" else (False, True, True))
    data = PatientData(
        patient_id=patient_id, cohort=cohort, institution=institution,
        ct=np.ascontiguousarray(ct[ct_flip]), ct_affine=PHANTOM_TO_RAS @ ct_aff,
        lobes=np.ascontiguousarray(lobes[ct_flip]),
        spect=spect, spect_affine=PHANTOM_TO_RAS @ spect_aff,
        perfusion=perf, perfusion_affine=PHANTOM_TO_RAS @ wgrid.affine, tumor_diameter_mm=diameter,
    )
    if with_dose and cohort == "cancer" and tumour_spheres:
        dgrid = Grid.around(lo - 40, hi + 40, max(ws, 2.5))
        data.dose = plan_dose(dgrid, tumour_spheres, physics["dose"], rng)
        data.dose_affine = PHANTOM_TO_RAS @ dgrid.affine
    return data


def plan_dose(grid: Grid, tumour_spheres: list[tuple[np.ndarray, float]], dose: dict, rng) -> np.ndarray:
    """A plausible conformal plan (Gy): the prescription over the PTV (tumour + margin), a steep
    fall-off around it and a low-dose bath that spreads further, as a multi-field plan gives."""
    rx = _u(rng, dose["prescription_gy"])
    inside = _spheres_mask(grid, [(c, r + float(dose["margin"])) for c, r in tumour_spheres])
    dist = ndi.distance_transform_edt(~inside, sampling=grid.spacing)
    falloff = float(dose["falloff"])
    d = rx * np.exp(-((dist / falloff) ** 1.3)) + float(dose["low_dose_bath_gy"]) * np.exp(-dist / (5 * falloff))
    return np.where(inside, rx, d).astype(np.float32)


def _emph_threshold(fraction: float) -> float:
    """Threshold on a unit Gaussian field (+ its vertical bias) that destroys about `fraction` of the lung."""
    from scipy.stats import norm

    return float(norm.ppf(1 - fraction) * 1.15)


def _segment_point_distance(p0: np.ndarray, p1: np.ndarray, c: np.ndarray) -> np.ndarray:
    ab = p1 - p0
    t = np.clip(((c - p0) * ab).sum(1) / ((ab * ab).sum(1) + 1e-12), 0, 1)
    return np.linalg.norm(p0 + t[:, None] * ab - c, axis=1)


def _spheres_mask(grid: Grid, spheres: list[tuple[np.ndarray, float]]) -> np.ndarray:
    X, Y, Z = grid.mesh()
    m = np.zeros(grid.shape, bool)
    for c, r in spheres:
        m |= (X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2 <= r * r
    return m


def _render_ct(ph: Phantom, grid: Grid, trees, vessel_radii, tumour_spheres, texture, emph_field, destruction, oligaemia, physics, rng) -> np.ndarray:
    b, lu = physics["body"], physics["lungs"]
    x, y, z = grid.axes()
    nz = grid.shape[2]
    X2, Y2 = x[:, None], y[None, :]
    # 2-D cross-section, constant along z: air, table, fat, muscle, mediastinal soft tissue
    base = np.full(grid.shape[:2], -1000.0, np.float32)
    e_body = ((X2 - ph.cx) / ph.ax) ** 2 + ((Y2 - ph.cy) / ph.ay) ** 2
    e_musc = ((X2 - ph.cx) / (ph.ax - ph.fat)) ** 2 + ((Y2 - ph.cy) / (ph.ay - ph.fat)) ** 2
    e_cav = ((X2 - ph.cx) / ph.acx) ** 2 + ((Y2 - ph.cy) / ph.acy) ** 2
    table_top = ph.cy - ph.ay - 1.0
    table = (Y2 < table_top) & (Y2 > table_top - 12) & (np.abs(X2 - ph.cx) < 230)
    base[np.broadcast_to(table, base.shape)] = b["table_hu"]
    base[e_body <= 1] = b["fat_hu"]
    base[e_musc <= 1] = b["muscle_hu"]
    base[e_cav <= 1] = 38.0
    # vertebral body (marrow with a cortical rim) and spinal canal
    sc = ph.spine_c
    d_vb = np.sqrt((X2 - sc[0]) ** 2 + (Y2 - sc[1]) ** 2)
    base[d_vb <= ph.r_vb] = b["bone_hu"]
    base[d_vb <= ph.r_vb - 3] = b["marrow_hu"]
    canal = (X2 - sc[0]) ** 2 + (Y2 - (sc[1] - ph.r_vb - 9)) ** 2 <= 8.0**2
    lamina = (np.abs(X2 - sc[0]) < 14) & (Y2 < sc[1] - ph.r_vb - 3) & (Y2 > sc[1] - ph.r_vb - 24) & ~canal
    base[lamina] = b["bone_hu"]
    base[canal] = 25.0
    hu = np.repeat(base[:, :, None], nz, axis=2)
    Z3 = z[None, None, :]

    # intervertebral discs every ~30 mm
    disc = ((z - ph.z_apex) % 30.0) < 6.0
    vb3 = (d_vb <= ph.r_vb)[:, :, None] & disc[None, None, :]
    hu[vb3] = 80.0
    # ribs: slanted bands in the chest wall, every ~24 mm, not at the anterior midline (cartilage)
    band = (e_cav > 1.02) & (e_musc <= 1.0)
    ii, jj = np.nonzero(band)
    if len(ii):
        radial = np.sqrt(e_cav[ii, jj]) - 1.0
        rib_depth = (radial > 0.02) & (radial < 0.02 + 7.0 / min(ph.acx, ph.acy))
        ii, jj = ii[rib_depth], jj[rib_depth]
        yy = y[jj]
        phase = (Z3[0, 0][None, :] + 0.45 * (yy[:, None] - ph.cy) - ph.z_apex) % 24.0
        rib = (phase < 9.0) & (Z3[0, 0][None, :] > ph.z_base - 10) & (Z3[0, 0][None, :] < ph.z_apex + 10)
        anterior_mid = (np.abs(x[ii] - ph.cx) < 28) & (yy > ph.cy)
        vals = np.where(anterior_mid[:, None], 110.0, b["bone_hu"]).astype(np.float32)
        sub = hu[ii, jj, :]
        sub[rib] = np.broadcast_to(vals, rib.shape)[rib]
        hu[ii, jj, :] = sub
    # sternum
    st = ((X2 - ph.cx) / 16.0) ** 2 + ((Y2 - (ph.cy + ph.acy + 6)) / 7.0) ** 2 <= 1
    zst = (z > ph.z_base + 40) & (z < ph.z_apex - 10)
    hu[st[:, :, None] & zst[None, None, :]] = b["bone_hu"]

    # abdomen below the diaphragm (liver right, spleen/stomach left), inside the cavity outline
    csl = grid.index_range([ph.cx - ph.acx, ph.cy - ph.acy, z[0]], [ph.cx + ph.acx, ph.cy + ph.acy, ph.z_base + ph.dome_h + ph.right_up + 30])
    csub = grid.sub(csl)
    Xc, Yc, Zc = csub.mesh()
    abd = (((Xc - ph.cx) / ph.acx) ** 2 + ((Yc - ph.cy) / ph.acy) ** 2 <= 1) & (Zc <= ph.diaphragm_z(Xc, Yc))
    view = hu[csl]
    view[abd] = 58.0
    if ph.stomach_bubble:
        c = np.array([ph.cx + 0.45 * ph.acx, ph.cy + 0.2 * ph.acy, ph.z_base + ph.dome_h * 0.5])
        gas = ((Xc - c[0]) / 30) ** 2 + ((Yc - c[1]) / 22) ** 2 + ((Zc - c[2]) / 14) ** 2 <= 1
        view[gas & abd] = -1000.0

    # lungs: parenchyma with texture, dependent density, fissures, emphysema
    lsl = grid.index_range(*ph.lung_box())
    lsub = grid.sub(lsl)
    Xl, Yl, Zl = lsub.mesh()
    side = ph.lung_side(Xl, Yl, Zl)
    lung = side > 0
    dep = (ph.cy + ph.acy - Yl) / (2 * ph.acy)  # 0 anterior .. 1 posterior
    par = ph.parenchyma_hu + ph.gradient_hu * dep + float(lu["texture_hu"]) * texture.on_grid(lsub)
    fis = np.minimum(
        np.abs(np.where(side == 2, ph.fissure_distance(Xl, Yl, Zl, "left"), ph.fissure_distance(Xl, Yl, Zl, "right"))),
        np.where((side == 1) & (ph.fissure_distance(Xl, Yl, Zl, "right") > 0), np.abs(ph.horizontal_distance(Xl, Yl, Zl)), 1e3),
    )
    par = par + float(lu["fissure_hu"]) * np.exp(-((fis / 0.8) ** 2))
    par = par - oligaemia(lsub)
    d = destruction(emph_field.on_grid(lsub), Zl)
    par = par * (1 - d) + float(physics["emphysema"]["hu"]) * d
    view = hu[lsl]
    view[lung] = par[lung] if par.shape == lung.shape else np.broadcast_to(par, lung.shape)[lung]

    # mediastinal vessels and the heart
    vhu = float(lu["vessel_hu"])
    heart = ph.heart_c
    hsl = grid.index_range(heart - ph.heart_r, heart + ph.heart_r)
    hsub = grid.sub(hsl)
    Xh, Yh, Zh = hsub.mesh()
    hm = ((Xh - heart[0]) / ph.heart_r[0]) ** 2 + ((Yh - heart[1]) / ph.heart_r[1]) ** 2 + ((Zh - heart[2]) / ph.heart_r[2]) ** 2 <= 1
    hu[hsl][hm] = vhu
    top = z[-1] + 5
    ao_desc = np.array([ph.cx + 24, ph.cy - ph.acy + 34])
    h_top = heart[2] + ph.heart_r[2] * 0.6
    arch = ph.z_carina + 18
    pts0 = np.array([
        [ph.cx + 6, ph.cy + 18, h_top], [ph.cx + 6, ph.cy + 14, arch], [ph.cx + 16, ph.cy - 12, arch + 10],
        [ao_desc[0], ao_desc[1], arch], [ph.cx - 24, ph.cy + 14, top], [ph.cx + 12, heart[1] + 12, h_top - 6],
        [ph.cx + 6, ph.cy - 2, ph.z_carina - 18], [ph.cx + 6, ph.cy - 2, ph.z_carina - 18],
        [ph.cx + 2, ph.spine_c[1] + ph.r_vb + 8, top],
    ])
    pts1 = np.array([
        [ph.cx + 6, ph.cy + 14, arch], [ph.cx + 16, ph.cy - 12, arch + 10], [ao_desc[0], ao_desc[1], arch],
        [ao_desc[0], ao_desc[1], z[0] - 5], [ph.cx - 24, ph.cy + 14, h_top], [ph.cx + 6, ph.cy - 2, ph.z_carina - 18],
        ph.hilum["right"], ph.hilum["left"], [ph.cx + 2, ph.spine_c[1] + ph.r_vb + 8, z[0] - 5],
    ])
    radii = np.array([14, 13, 13, 12, 10, 14, 10.5, 10, 7.5])
    render_capsules(hu, grid, pts0, pts1, radii, vhu)
    # pulmonary vessel trees (thinner distal to a compressing tumour)
    for side_name, tr in trees.items():
        render_capsules(hu, grid, tr.p0, tr.p1, vessel_radii(side_name), vhu)
    # airways: trachea, main and lobar bronchi; soft-tissue wall, air lumen
    tr_xy = ph.trachea_xy
    carina = np.array([tr_xy[0], tr_xy[1], ph.z_carina])
    a0 = [np.array([tr_xy[0], tr_xy[1], top])]
    a1 = [carina]
    ar = [ph.trachea_r]
    for side_name in ("right", "left"):
        h = ph.hilum[side_name]
        entry = h + np.array([0, -12, 2])  # bronchus lies behind the artery at the hilum
        a0.append(carina)
        a1.append(entry)
        ar.append(ph.bronchus_r)
        tr = trees[side_name]
        for i in np.nonzero(tr.depth == 0)[0]:  # lobar bronchi alongside the lobar arteries
            direction = tr.p1[i] - tr.p0[i]
            a0.append(entry)
            a1.append(entry + 0.8 * direction)
            ar.append(max(2.0, 0.6 * tr.r[i]))
    a0, a1, ar = np.array(a0), np.array(a1), np.array(ar)
    render_capsules(hu, grid, a0, a1, ar + 2.0, float(lu["airway_wall_hu"]))
    render_capsules(hu, grid, a0, a1, ar, -1000.0)
    # tumour
    if tumour_spheres:
        c0, r0 = tumour_spheres[0]
        tsl = grid.index_range(c0 - 2.2 * r0, c0 + 2.2 * r0)
        tsub = grid.sub(tsl)
        tm = _spheres_mask(tsub, tumour_spheres)
        hu[tsl][tm] = float(physics["tumour"]["hu"]) + 12.0 * texture.on_grid(tsub)[tm]
    # scanner noise, then integer HU as scanners store them
    noise = float(physics["ct"]["noise_hu"][ph.institution])
    hu += noise * rng.standard_normal(hu.shape, dtype=np.float32)
    np.clip(hu, -1024, 3071, out=hu)
    return np.rint(hu).astype(np.int16)


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
    pts = np.stack([grid.origin[k] + idx[k] * grid.spacing[k] for k in range(3)], 1)
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


def _render_perfusion(ph, grid, trees, vessel_radii, tumour_spheres, hetero, emph_field, destruction, territory, physics, rng) -> np.ndarray:
    pf = physics["perfusion"]
    X, Y, Z = grid.mesh()
    side = ph.lung_side(X, Y, Z)
    lung = side > 0
    g = _u(rng, pf["gravity_per_cm"])
    cc = _u(rng, pf["craniocaudal_per_cm"])
    perf = (1 + g * (ph.cy + ph.acy - Y) / 10.0) * (1 + cc * (ph.z_apex - Z) / 10.0)
    perf = perf * (1 + float(pf["heterogeneity"]) * hetero.on_grid(grid))
    d = destruction(emph_field.on_grid(grid), Z)
    perf = perf * (1 - (1 - float(physics["emphysema"]["perfusion_factor"])) * d)
    # peripheral pruning: perfusion falls towards the pleura
    dist = ndi.distance_transform_edt(lung, sampling=grid.spacing)
    pr = float(pf["pruning_factor"])
    perf = perf * (pr + (1 - pr) * _smoothstep(dist / float(pf["pruning_depth"])))
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
        perf[_spheres_mask(grid, tumour_spheres)] = 0.0
    return perf.astype(np.float32)


def _simulate_spect(perf, wgrid: Grid, ph: Phantom, preset: dict, physics: dict, institution: str, rng):
    sp = physics["spect"]
    fwhm = _u(rng, sp["fwhm"])
    blurred = ndi.gaussian_filter(perf, sigma=fwhm / 2.3548 / np.asarray(wgrid.spacing), mode="constant")
    shape = tuple(int(v) for v in preset["spect_matrix"][institution])
    vox = tuple(float(v) for v in preset["spect_voxel"][institution])
    lo, hi = ph.lung_box()
    centre = (lo + hi) / 2 + rng.uniform(-1, 1, 3) * float(sp["shift"])
    origin = centre - (np.asarray(shape) - 1) * np.asarray(vox) / 2
    sgrid = Grid(shape, vox, tuple(origin))  # type: ignore[arg-type]
    xs = [(ax - wgrid.origin[d]) / wgrid.spacing[d] for d, ax in enumerate(sgrid.axes())]
    coords = np.meshgrid(*xs, indexing="ij")
    expected = ndi.map_coordinates(blurred, coords, order=1, mode="constant", cval=0.0)
    total = _u(rng, sp["counts"][institution])
    expected *= total / max(float(expected.sum()), 1e-6)
    counts = rng.poisson(expected).astype(np.float32)
    spect = ndi.gaussian_filter(counts, float(sp["post_filter_voxels"]))
    flips = (False, False, False) if institution == "A" else (True, True, False)
    aff, sl = stored_affine(sgrid, flips)
    return np.ascontiguousarray(spect[sl]).astype(np.float32), aff


# --------------------------------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------------------------------


def cohort_plan(n_noncancer: int, n_cancer: int, cancer_institutions: dict[str, float]) -> list[tuple[str, str, str]]:
    """(patient_id, cohort, institution) for every patient; institutions split as in the paper."""
    plan = [(f"NC-A-{i + 1:03d}", "noncancer", "A") for i in range(n_noncancer)]
    shares = {k: float(v) for k, v in cancer_institutions.items()}
    total = sum(shares.values())
    counts = {k: int(round(n_cancer * v / total)) for k, v in shares.items()}
    first = next(iter(counts))
    counts[first] += n_cancer - sum(counts.values())
    for inst, n in counts.items():
        plan += [(f"LC-{inst}-{i + 1:03d}", "cancer", inst) for i in range(n)]
    return plan


def write_patient(data: PatientData, out: Path) -> dict[str, Any]:
    pdir = out / data.patient_id
    pdir.mkdir(parents=True, exist_ok=True)
    save_nifti(data.ct, data.ct_affine, pdir / "ct.nii.gz", dtype=np.int16)
    save_nifti(data.spect, data.spect_affine, pdir / "spect.nii.gz", dtype=np.float32)
    save_nifti(data.lobes, data.ct_affine, pdir / "lobes.nii.gz", dtype=np.uint8)
    save_nifti(data.perfusion, data.perfusion_affine, pdir / "perfusion.nii.gz", dtype=np.float32)
    row = {
        "patient_id": data.patient_id,
        "cohort": data.cohort,
        "institution": data.institution,
        "ct": f"{data.patient_id}/ct.nii.gz",
        "spect": f"{data.patient_id}/spect.nii.gz",
        "lobes": f"{data.patient_id}/lobes.nii.gz",
        "perfusion": f"{data.patient_id}/perfusion.nii.gz",
        "tumor_diameter_mm": "" if data.tumor_diameter_mm is None else f"{data.tumor_diameter_mm:.1f}",
    }
    if data.dose is not None:
        save_nifti(data.dose, data.dose_affine, pdir / "dose.nii.gz", dtype=np.float32)
        row["dose"] = f"{data.patient_id}/dose.nii.gz"
    return row


def _one(args) -> dict[str, Any]:
    pid, cohort, inst, preset, physics, seed, out, with_dose = args
    data = make_patient(pid, cohort, inst, preset, physics, seed, with_dose=with_dose)
    return write_patient(data, Path(out))


def synthesise(
    out: str | Path,
    *,
    preset: str,
    presets: dict,
    physics: dict,
    n_noncancer: int,
    n_cancer: int,
    seed: int = 0,
    workers: int = 1,
    cancer_institutions: dict[str, float] | None = None,
    with_dose: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a two-cohort synthetic set and its manifest; returns the manifest path."""
    from tqdm.auto import tqdm

    if preset not in presets:
        raise CtpmError(f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    if n_noncancer < 0 or n_cancer < 0 or n_noncancer + n_cancer == 0:
        raise CtpmError("ask for at least one patient (n_noncancer, n_cancer >= 0)")
    out = Path(out)
    manifest = out / "manifest.csv"
    if manifest.exists() and not overwrite:
        raise CtpmError("a cohort already exists here; choose another out= or pass overwrite=true", path=out)
    out.mkdir(parents=True, exist_ok=True)
    plan = cohort_plan(n_noncancer, n_cancer, cancer_institutions or {"A": 14, "B": 19})
    jobs = [(pid, c, inst, dict(presets[preset]), physics, int(seed), str(out), with_dose) for pid, c, inst in plan]
    rows: list[dict] = []
    bar = tqdm(total=len(jobs), desc=f"ctpm-synth {preset}", unit="patient", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for row in pool.map(_one, jobs):
                rows.append(row)
                bar.update()
    else:
        for job in jobs:
            rows.append(_one(job))
            bar.update()
    bar.close()
    write_manifest(manifest, rows)  # last: a cohort without its manifest is visibly incomplete
    return manifest
