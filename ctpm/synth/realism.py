"""Numbers that say how much a CT looks like a chest CT, for any CT and lung mask (synthetic or
real): the lung HU histogram, the vessel volume fraction and the parenchyma's texture power
spectrum, the vessels' calibre spectrum and the visible fissures (plate-like sheets). The README's
table of synthetic against real (``python -m ctpm.synth.realism``) and
notebooks/synthetic_vs_real_ct.ipynb come from ``ct_realism``."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

HIST_EDGES = np.arange(-1025.0, 1.0, 10.0)
# spatial frequencies (cycles / mm) of the texture spectrum's bins: up to the 2 mm grid's Nyquist
FREQ_EDGES = np.linspace(0.0, 0.25, 11)
# vessel diameters (mm) of the calibre spectrum's bins
CALIBRE_EDGES = np.array([0.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 40.0])


def ct_realism(hu: np.ndarray, spacing, lungs: np.ndarray, *, texture_spacing: float = 2.0,
               vessel_hu: float = -500.0, max_slices: int = 24, sheets: bool = False) -> dict:
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
      (HU, the parenchyma's standard deviation, noise and texture together);
    - with ``sheets``, the visible fissures: :func:`sheet_numbers` (``sheet_share``,
      ``sheet_largest_ml``, ``sheet_count``; tens of seconds on a clinical CT).
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
    if sheets:
        out.update(sheet_numbers(hu, spacing, filled, vessel_hu=vessel_hu))
    return out


def sheet_numbers(hu: np.ndarray, spacing, lungs: np.ndarray, *, grid_mm: float = 1.0, sigma_mm: float = 1.0,
                  gamma: float = 20.0, min_ml: float = 1.0, vessel_hu: float = -500.0) -> dict:
    """How much of the lung shows bright, plate-like sheets, the way fissures look on CT.

    On a common isotropic ``grid_mm`` grid (linear resampling; the fissures' visibility depends
    on the grid, so compare CTs on the same one), Frangi's objectness for bright plates
    (SimpleITK ``ObjectnessMeasure``, object dimension 2, unscaled, so in 0..1; ``gamma`` the
    Hessian norm, HU/mm^2, at which structure counts as contrast) of the CT smoothed by
    ``sigma_mm``. Voxels above 0.5 inside the parenchyma (the lung eroded by 3 mm, below
    ``vessel_hu``) that form connected sheets of at least ``min_ml`` mL are the visible sheets:
    ``sheet_share`` (their share of the parenchyma), ``sheet_largest_ml`` (the largest, mL: a
    continuous fissure plane is one large sheet) and ``sheet_count``. Noise and texture give
    small, scattered responses, vessels tubes; both stay below ``min_ml``."""
    import SimpleITK as sitk  # the Hessian objectness filter (ITK's), not written here

    def image(a: np.ndarray, pixel) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(a, pixel).transpose(2, 1, 0)))
        img.SetSpacing(tuple(float(v) for v in spacing))
        return img

    ct, mask = image(hu, np.float32), image(np.asarray(lungs) > 0, np.uint8)
    size = [max(1, int(round(n * v / grid_mm))) for n, v in zip(ct.GetSize(), ct.GetSpacing())]
    resample = lambda img, how: sitk.Resample(img, size, sitk.Transform(), how, img.GetOrigin(),  # noqa: E731
                                              (grid_mm,) * 3, img.GetDirection(), 0)
    ct, mask = resample(ct, sitk.sitkLinear), resample(mask, sitk.sitkNearestNeighbor)
    plate = sitk.ObjectnessMeasure(sitk.SmoothingRecursiveGaussian(ct, sigma_mm), alpha=0.5, beta=0.5,
                                   gamma=gamma, scaleObjectnessMeasure=False, objectDimension=2,
                                   brightObject=True)
    par = ndi.binary_erosion(sitk.GetArrayViewFromImage(mask) > 0, iterations=max(1, int(round(3 / grid_mm))))
    par &= sitk.GetArrayViewFromImage(ct) < vessel_hu
    if not par.any():
        return {"sheet_share": float("nan"), "sheet_largest_ml": float("nan"), "sheet_count": 0}
    labels, _ = ndi.label((sitk.GetArrayViewFromImage(plate) > 0.5) & par, structure=np.ones((3, 3, 3)))
    ml = np.bincount(labels.ravel())[1:] * grid_mm**3 / 1000.0
    big = ml[ml >= min_ml]
    return {"sheet_share": float(big.sum() / (par.sum() * grid_mm**3 / 1000.0)),
            "sheet_largest_ml": float(ml.max()) if ml.size else 0.0, "sheet_count": int(big.size)}


def canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A volume in RAS+ array order (x to the patient's right, y anterior, z superior: what
    ``ct_realism`` and the notebook's views expect) and its voxel sizes (mm)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, np.float32), affine))
    return img.get_fdata(dtype=np.float32), np.asarray(img.header.get_zooms()[:3], float)


def summary_row(name: str, r: dict) -> dict:
    """The scalar numbers of ``ct_realism`` as one table row."""
    return {"ct": name, **{k: round(v, 4) for k, v in r.items() if np.isscalar(v)}}


COLUMNS = ("p5", "p25", "median", "p75", "p95", "laa950", "vessel_fraction", "calibre_over_6mm",
           "texture_centroid", "texture_std", "sheet_share", "sheet_largest_ml", "sheet_count")


def realism_table(real_ct: str | None, *, preset: str = "small", patients: tuple[str, ...] = ("NC-A-001", "NC-A-002", "LC-B-001"),
                  seed: int = 0, sheets: bool = True) -> list[dict]:
    """The README's realism rows: the real CT (ctpm's lung segmentation) at its own resolution and
    resampled to the preset's CT grid (institution A's), and synthetic patients of the preset
    (truth lobes) as ``ctpm-synth seed=`` draws them."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from ctpm.conf import conf_dir
    from ctpm.synth import make_patient

    cfg = OmegaConf.to_container(OmegaConf.load(Path(conf_dir()) / "synth.yaml"))
    pre = cfg["presets"][preset]
    rows = []
    if real_ct:
        from ctpm.data.io import load_image
        from ctpm.data.lungs import segment_lungs

        name = Path(real_ct).parent.name if Path(real_ct).name == "dicom" else Path(real_ct).name
        real = load_image(real_ct, kind="ct", patient=name)
        ct, sp = canonical(real.array, real.affine)
        lungs = segment_lungs(ct, sp)
        rows.append(summary_row(f"{name} ({'x'.join(f'{v:.2f}' for v in sp)} mm)",
                                ct_realism(ct, sp, lungs, sheets=sheets)))
        target = np.array([pre["ct_pixel"], pre["ct_pixel"], pre["ct_slice"]["A"]], float)
        zoom = sp / target
        rows.append(summary_row(f"real, resampled to the `{preset}` grid ({'x'.join(f'{v:g}' for v in target)} mm)",
                                ct_realism(ndi.zoom(ct, zoom, order=1), target, ndi.zoom(lungs, zoom, order=0),
                                           sheets=sheets)))
    for pid in patients:
        cohort = "noncancer" if pid.startswith("NC") else "cancer"
        p = make_patient(pid, cohort, pid.split("-")[1], pre, cfg["physics"], seed)
        ct, sp = canonical(p.ct, p.ct_affine)
        lobes, _ = canonical(p.lobes, p.ct_affine)
        rows.append(summary_row(f"synthetic `{preset}` {pid}", ct_realism(ct, sp, lobes, sheets=sheets)))
    return rows


def markdown(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    fmt = lambda v: "n/a" if v is None else (f"{v:.0f}" if abs(v) >= 10 else f"{v:.3g}")  # noqa: E731
    lines = ["| CT | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += ["| " + r["ct"] + " | " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m ctpm.synth.realism [--real DICOM_DIR] [--preset small] [--no-sheets]``: the table."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ctpm.synth.realism", description=main.__doc__)
    ap.add_argument("--real", default=None, help="a real chest CT (DICOM folder or NIfTI)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--patients", nargs="*", default=["NC-A-001", "NC-A-002", "LC-B-001"])
    ap.add_argument("--no-sheets", action="store_true", help="skip the fissure sheets (the slow part)")
    a = ap.parse_args(argv)
    print(markdown(realism_table(a.real, preset=a.preset, patients=tuple(a.patients), sheets=not a.no_sheets)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
