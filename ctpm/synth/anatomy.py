"""The phantom's anatomy: body outline, lungs of different shape, fissures and five lobes, drawn as
implicit shapes in phantom-frame mm so that the same patient can be drawn on any grid.

The phantom frame's x points to the patient's LEFT (heart, stomach, descending aorta and the lower
diaphragm dome at +x); the files are RAS (x to the patient's right), so every stored affine mirrors
x (``PHANTOM_TO_RAS``).
"""

from __future__ import annotations

import math

import numpy as np

from ctpm.geometry import Grid
from ctpm.synth.fields import smoothstep, uniform

LOBES = {1: "LUL", 2: "LLL", 3: "RUL", 4: "RML", 5: "RLL"}
# phantom frame (x to the patient's left) -> world RAS (x to the patient's right)
PHANTOM_TO_RAS = np.diag([-1.0, 1.0, 1.0, 1.0])


class Phantom:
    """One synthetic patient: anatomy drawn from `physics`, in phantom-frame mm (x to the patient's
    left, y anterior, z superior) around (cx, cy)."""

    def __init__(self, rng: np.random.Generator, cohort: str, institution: str, physics: dict, fov_z: tuple[float, float]):
        self.rng, self.cohort, self.institution = rng, cohort, institution
        ph = physics
        b, lu = ph["body"], ph["lungs"]
        s = float(b["shift"])
        self.cx, self.cy = uniform(rng, (-s, s)), uniform(rng, (-s, s))
        self.ax, self.ay = uniform(rng, b["half_width"]), uniform(rng, b["half_depth"])
        self.fat = uniform(rng, b["fat_thickness"])
        self.wall = uniform(rng, b["wall_thickness"])
        self.acx = self.ax - self.fat - self.wall  # pleural cavity semi-axes
        self.acy = self.ay - self.fat - self.wall
        z_lo, z_hi = fov_z
        self.height = uniform(rng, lu["height"])
        self.z_apex = z_hi - uniform(rng, lu["apex_margin"])
        self.z_base = self.z_apex - self.height
        if self.z_base < z_lo + 15:  # keep the whole lung inside the field of view
            self.z_base = z_lo + 15
            self.height = self.z_apex - self.z_base
        self.dome_h = uniform(rng, lu["dome_height"])
        self.right_up = uniform(rng, lu["right_dome_higher"])
        self.gap = uniform(rng, lu["anterior_gap"])
        self.w_med = uniform(rng, lu["mediastinum_half_width"])
        self.r_vb = rng.uniform(17, 22)  # vertebral body
        self.spine_c = np.array([self.cx, self.cy - self.acy + 0.55 * self.r_vb])
        # heart: sits on the left hemidiaphragm, anterior: it carves the cardiac notch
        self.heart_c = np.array([self.cx + rng.uniform(18, 30), self.cy + 0.25 * self.acy, self.z_base + self.dome_h + rng.uniform(35, 50)])
        self.heart_r = np.array([rng.uniform(50, 62), rng.uniform(42, 52), rng.uniform(48, 58)])
        self.z_carina = self.z_apex - rng.uniform(45, 65)
        self.trachea_r = uniform(rng, lu["trachea_radius"])
        self.bronchus_r = uniform(rng, lu["bronchus_radius"])
        self.trachea_xy = np.array([self.cx + rng.uniform(-4, 4), self.cy - 0.12 * self.acy])
        hy = self.cy - 0.08 * self.acy
        self.hilum = {
            "right": np.array([self.cx - self.w_med - 8, hy, self.z_carina - rng.uniform(20, 30)]),
            "left": np.array([self.cx + self.w_med + 8, hy, self.z_carina - rng.uniform(28, 38)]),
        }
        self.parenchyma_hu = uniform(rng, lu["parenchyma_hu"])
        self.gradient_hu = uniform(rng, lu["dependent_gradient_hu"])
        # fissures: oblique in both lungs (upper/anterior lobe above), horizontal on the right
        self.obl = {side: (rng.uniform(0.85, 1.3), rng.uniform(-5, 20)) for side in ("right", "left")}
        self.horiz = rng.uniform(-5, 12)
        self.stomach_bubble = rng.random() < 0.5
        self.pa_scale = 1.0  # calibre of the central pulmonary arteries (> 1 in pulmonary hypertension)

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
        taper = 0.82 + 0.18 * smoothstep((self.z_apex - Z) / (0.6 * self.height))
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
        upper = smoothstep((Z - (self.z_carina - 10)) / 40.0)
        w = self.w_med * (1 - 0.4 * upper)
        ant = smoothstep((Y - (self.cy + 0.1 * self.acy)) / (0.35 * self.acy))
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



def spheres_mask(grid: Grid, spheres: list[tuple[np.ndarray, float]]) -> np.ndarray:
    X, Y, Z = grid.mesh()
    m = np.zeros(grid.shape, bool)
    for c, r in spheres:
        m |= (X - c[0]) ** 2 + (Y - c[1]) ** 2 + (Z - c[2]) ** 2 <= r * r
    return m

