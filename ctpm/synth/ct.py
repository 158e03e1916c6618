"""The CT: the institution's grid, and the phantom rendered in HU with scanner noise."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ctpm.geometry import Grid
from ctpm.synth.anatomy import Phantom, spheres_mask
from ctpm.synth.vessels import render_capsules


def ct_grid(preset: dict, institution: str) -> Grid:
    """The institution's CT grid in the phantom frame, centred on the scanner axis."""
    n, px = int(preset["ct_matrix"]), float(preset["ct_pixel"])
    dz = float(preset["ct_slice"][institution])
    nz = int(round(float(preset["ct_fov_z"]) / dz))
    half = (n - 1) * px / 2
    return Grid.axis_aligned((n, n, nz), (px, px, dz), (-half, -half, -(nz - 1) * dz / 2))



def render_ct(ph: Phantom, grid: Grid, trees, vessel_radii, tumour_spheres, texture, emph_field, destruction, lung_hu, physics, rng) -> np.ndarray:
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
    csl = grid.slices_within([ph.cx - ph.acx, ph.cy - ph.acy, z[0]], [ph.cx + ph.acx, ph.cy + ph.acy, ph.z_base + ph.dome_h + ph.right_up + 30])
    csub = grid[csl]
    Xc, Yc, Zc = csub.mesh()
    abd = (((Xc - ph.cx) / ph.acx) ** 2 + ((Yc - ph.cy) / ph.acy) ** 2 <= 1) & (Zc <= ph.diaphragm_z(Xc, Yc))
    view = hu[csl]
    view[abd] = 58.0
    if ph.stomach_bubble:
        c = np.array([ph.cx + 0.45 * ph.acx, ph.cy + 0.2 * ph.acy, ph.z_base + ph.dome_h * 0.5])
        gas = ((Xc - c[0]) / 30) ** 2 + ((Yc - c[1]) / 22) ** 2 + ((Zc - c[2]) / 14) ** 2 <= 1
        view[gas & abd] = -1000.0

    # lungs: parenchyma with texture, dependent density, fissures, emphysema
    lsl = grid.slices_within(*ph.lung_box())
    lsub = grid[lsl]
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
    d = destruction(emph_field.on_grid(lsub), Zl)
    par = par * (1 - d) + float(physics["emphysema"]["hu"]) * d
    par = lung_hu(lsub, par, side, Xl, Yl, Zl)  # the CT signs of the visible causes
    view = hu[lsl]
    view[lung] = par[lung] if par.shape == lung.shape else np.broadcast_to(par, lung.shape)[lung]

    # mediastinal vessels and the heart
    vhu = float(lu["vessel_hu"])
    heart = ph.heart_c
    hsl = grid.slices_within(heart - ph.heart_r, heart + ph.heart_r)
    hsub = grid[hsl]
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
    radii[5:8] *= ph.pa_scale  # pulmonary trunk and main arteries (enlarged in PH)
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
        tsl = grid.slices_within(c0 - 2.2 * r0, c0 + 2.2 * r0)
        tsub = grid[tsl]
        tm = spheres_mask(tsub, tumour_spheres)
        hu[tsl][tm] = float(physics["tumour"]["hu"]) + 12.0 * texture.on_grid(tsub)[tm]
    # the reconstruction kernel (in-plane sharpening) and its noise texture, then integer HU
    ctc = physics["ct"]
    kernel = ctc["kernel"][ph.institution]
    px = float(grid.spacing[0])
    sharpen = float(kernel["sharpen"])
    if sharpen > 0:  # edge enhancement of a sharp (lung) kernel: unsharp masking in-plane
        hu += sharpen * (hu - ndi.gaussian_filter(hu, (1.0, 1.0, 0.0)))
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    corr = float(kernel["noise_corr_mm"]) / px
    if corr > 0.3:  # soft kernels correlate the noise in-plane (blotchy); sharp ones leave it fine-grained
        noise = ndi.gaussian_filter(noise, (corr, corr, 0.0))
        noise /= max(float(noise.std()), 1e-6)
    hu += float(ctc["noise_hu"][ph.institution]) * noise
    np.clip(hu, -1024, 3071, out=hu)
    return np.rint(hu).astype(np.int16)

