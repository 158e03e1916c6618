"""Vessel trees grown into the lobes, and tubes (vessels, airways) drawn as capsules with
partial-volume edges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctpm.geometry import Grid


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
    half_vox = 0.5 * float(spacing.min())
    for k in range(len(radius)):
        a, b, r = p0[k], p1[k], float(radius[k])
        lo = np.minimum(a, b) - r - spacing
        hi = np.maximum(a, b) + r + spacing
        sl = grid.slices_within(lo, hi)
        if any(s.stop <= s.start for s in sl):
            continue
        sub = grid[sl]
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


def grow_tree(
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




def segment_point_distance(p0: np.ndarray, p1: np.ndarray, c: np.ndarray) -> np.ndarray:
    ab = p1 - p0
    t = np.clip(((c - p0) * ab).sum(1) / ((ab * ab).sum(1) + 1e-12), 0, 1)
    return np.linalg.norm(p0 + t[:, None] * ab - c, axis=1)

