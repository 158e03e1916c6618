"""Numbers that say how much a CT looks like a chest CT, for any CT and lung mask (synthetic or
real): the lung HU histogram, the vessel volume fraction and the parenchyma's texture power
spectrum. The README's table of synthetic against real, and notebooks/synthetic_vs_real_ct.ipynb,
come from ``ct_realism``."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

HIST_EDGES = np.arange(-1025.0, 1.0, 10.0)
# spatial frequencies (cycles / mm) of the texture spectrum's bins: up to the 2 mm grid's Nyquist
FREQ_EDGES = np.linspace(0.0, 0.25, 11)
# vessel diameters (mm) of the calibre spectrum's bins
CALIBRE_EDGES = np.array([0.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 40.0])


def ct_realism(hu: np.ndarray, spacing, lungs: np.ndarray, *, texture_spacing: float = 2.0,
               vessel_hu: float = -500.0, max_slices: int = 24) -> dict:
    """Realism numbers of a CT (HU, RAS-ordered or any axis order with ``spacing`` in mm; axis 2 the
    slices) inside ``lungs`` (any non-zero label; holes such as vessels are filled first):

    - ``hist``: lung HU density over ``HIST_EDGES``; ``p5 .. p95``, ``median``, ``laa950`` (share
      below -950 HU, the emphysema index);
    - ``vessel_fraction``: share of the filled lung mask above ``vessel_hu`` (vessels, airway walls,
      fissures: the structure of the lung);
    - ``calibre``: the vessels' calibre spectrum: share of the vessel centre-line points (local
      maxima of the distance to the vessel wall, in mm) per diameter bin of ``CALIBRE_EDGES``;
      ``calibre_median`` (mm; on coarse grids the one-voxel vessels set it) and
      ``calibre_over_6mm`` (share of centre-line points in vessels of 6 mm or more);
    - ``spectrum``: radially averaged 2-D power spectrum of the parenchyma (HU between -1000 and
      -500, mean removed, lung voxels only, each axial slice resampled in-plane to
      ``texture_spacing`` mm) in ``FREQ_EDGES`` bins, normalised to sum 1; ``texture_centroid``:
      its power-weighted mean frequency (cycles / mm: higher is finer texture) and ``texture_std``
      (HU, the parenchyma's standard deviation, noise and texture together).
    """
    hu = np.asarray(hu, np.float32)
    spacing = np.asarray(spacing, float)
    filled = ndi.binary_fill_holes(np.asarray(lungs) > 0)
    for k in range(filled.shape[2]):  # vessels reaching the surface of a slice: fill per slice too
        filled[:, :, k] = ndi.binary_fill_holes(filled[:, :, k])
    values = hu[filled]
    if values.size == 0:
        raise ValueError("the lung mask is empty")
    hist, _ = np.histogram(values, bins=HIST_EDGES, density=True)
    pct = np.percentile(values, [5, 25, 50, 75, 95])
    out = {
        "hist": hist, "p5": float(pct[0]), "p25": float(pct[1]), "median": float(pct[2]), "p75": float(pct[3]),
        "p95": float(pct[4]), "laa950": float(np.mean(values < -950)), "vessel_fraction": float(np.mean(values > vessel_hu)),
    }
    # calibre: diameters at the vessels' centre lines (ridges of the distance to their wall)
    vessels = filled & (hu > vessel_hu)
    dist = ndi.distance_transform_edt(vessels, sampling=spacing)
    ridge = vessels & (dist >= ndi.maximum_filter(dist, size=3)) & (dist > 0)
    diam = 2 * dist[ridge]
    cal, _ = np.histogram(diam, bins=CALIBRE_EDGES)
    out["calibre"] = cal / max(cal.sum(), 1)
    out["calibre_median"] = float(np.median(diam)) if diam.size else float("nan")
    out["calibre_over_6mm"] = float(np.mean(diam >= 6.0)) if diam.size else float("nan")
    # texture: in-plane spectra of the parenchyma on a common pixel size
    zoom = spacing[:2] / texture_spacing
    area = filled.sum(axis=(0, 1))
    slices = np.nonzero(area > 0.3 * area.max())[0]
    slices = slices[np.linspace(0, len(slices) - 1, min(max_slices, len(slices))).astype(int)]
    power = np.zeros(len(FREQ_EDGES) - 1)
    stds = []
    for k in slices:
        img = ndi.zoom(hu[:, :, k], zoom, order=1)
        m = ndi.zoom(filled[:, :, k].astype(np.float32), zoom, order=1) > 0.5
        m &= (img > -1000) & (img < vessel_hu)
        m = ndi.binary_erosion(m, iterations=1)
        if m.sum() < 200:
            continue
        v = np.where(m, img - img[m].mean(), 0.0)
        stds.append(float(img[m].std()))
        spec = np.abs(np.fft.fft2(v)) ** 2 / m.sum()
        fy = np.fft.fftfreq(v.shape[0], texture_spacing)[:, None]
        fx = np.fft.fftfreq(v.shape[1], texture_spacing)[None, :]
        f = np.sqrt(fy**2 + fx**2)
        power += np.histogram(f, bins=FREQ_EDGES, weights=spec)[0]
    centres = (FREQ_EDGES[:-1] + FREQ_EDGES[1:]) / 2
    total = power.sum()
    out["spectrum"] = power / total if total > 0 else power
    out["texture_centroid"] = float((out["spectrum"] * centres).sum()) if total > 0 else float("nan")
    out["texture_std"] = float(np.median(stds)) if stds else float("nan")
    return out


def summary_row(name: str, r: dict) -> dict:
    """The scalar numbers of ``ct_realism`` as one table row."""
    return {"ct": name, **{k: round(v, 4) for k, v in r.items() if np.isscalar(v)}}
