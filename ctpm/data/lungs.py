"""Lung segmentation: right and left lungs from a CT in HU, and the paper's evaluation mask.

Backends (``segment_lungs(..., backend=...)``):
- ``classical`` (default, offline, no weights): threshold, outside air and the trachea / main
  bronchi removed, vessels filled, two lungs kept and told apart as right and left by world
  position, also when they touch at the anterior junction line.
- ``lungmask``: the R231 U-Net of Hofmanninger et al. (the paper's choice), when the ``lungmask``
  package and a local weights file are given (nothing is downloaded).
A manifest ``lung_mask`` column overrides both (see ``ctpm.data.transforms``).

Labels: 0 background, 1 right lung, 2 left lung. Arrays are in RAS order (i -> patient Right,
j -> anterior, k -> superior), as ``Orientationd(axcodes="RAS")`` leaves them: the patient's right
lung has the larger index i (and world x), the left lung the smaller.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ctpm.errors import CtpmError, warn

RIGHT, LEFT = 1, 2

# In-plane connectivity only: fills holes slice by slice (vessels are enclosed in axial slices
# even where they leave the lung through the hilum in 3-D).
_INPLANE = np.zeros((3, 3, 3), bool)
_INPLANE[:, :, 1] = ndi.generate_binary_structure(2, 1)
# A vessel's cross-section inside a lung is smaller than this (the mediastinum is larger).
_MAX_VESSEL_HOLE_MM2 = 1000.0


@dataclass
class LungSegmentationConfig:
    """Thresholds in HU, sizes in mm / mL (so they hold at any voxel size)."""

    air_threshold: float = -500.0  # lung and airway air is below, soft tissue above
    min_lung_ml: float = 150.0  # smaller air pockets (stomach bubble, oesophagus) are not lungs
    trachea_max_area_mm2: float = 900.0  # an airway cross-section is smaller than this
    closing_mm: float = 3.0
    smooth_mm: float = 1.0  # noise smoothing when the CT is already coarse
    coarse_mm: float = 2.0  # the grid of the connectivity steps (refined to full resolution after)


def segment_lungs(
    ct: np.ndarray,
    spacing,
    *,
    backend: str = "classical",
    patient: str | None = None,
    lungmask_weights: str | None = None,
    config: LungSegmentationConfig | None = None,
) -> np.ndarray:
    """Right (1) / left (2) lung labels of a CT in HU on an RAS-ordered grid with `spacing` (mm)."""
    if backend == "classical":
        labels = _classical(ct, np.asarray(spacing, float), config or LungSegmentationConfig(), patient)
    elif backend == "lungmask":
        labels = _lungmask(ct, lungmask_weights, patient)
    else:
        raise CtpmError(f"unknown lung segmentation backend {backend!r} (classical, lungmask)")
    return check_lungs(labels, spacing, patient=patient)


def check_lungs(labels: np.ndarray, spacing, *, patient: str | None = None, min_ml: float = 50.0) -> np.ndarray:
    """Refuse a CT without lungs; warn (and go on) when only one lung is there."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    vols = {side: float((labels == side).sum()) * voxel_ml for side in (RIGHT, LEFT)}
    present = [s for s, v in vols.items() if v >= min_ml]
    if not present:
        raise CtpmError(
            f"no lung found in the CT (right {vols[RIGHT]:.0f} mL, left {vols[LEFT]:.0f} mL); is it a chest CT in HU?",
            patient=patient,
        )
    if len(present) == 1:
        missing = "left" if present[0] == RIGHT else "right"
        warn(f"only one lung found (no {missing} lung, e.g. after pneumonectomy); processing the one there is", patient=patient)
        labels = np.where(labels == present[0], labels, 0).astype(np.uint8)
    return labels


def evaluation_mask(ct: np.ndarray, lungs: np.ndarray, hu_range=(-1000.0, -300.0)) -> np.ndarray:
    """The paper's evaluation region: lungs within HU [-1000, -300], so tumour and vessels are out."""
    lo, hi = hu_range
    return (lungs > 0) & (ct >= lo) & (ct <= hi)


# --------------------------------------------------------------------------------------------------
# Classical
# --------------------------------------------------------------------------------------------------


def _classical_at(ct: np.ndarray, spacing: np.ndarray, cfg: LungSegmentationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-5 on one grid; returns (labels, airway)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    air = ct < cfg.air_threshold

    # 1. The body: the largest connected non-air region, holes filled slice by slice. Air inside
    #    it is lung, airway or bowel gas; air outside it (around the patient, inside the table) is
    #    not. (A border-touching rule alone fails on hollow tables, whose air is enclosed.)
    tissue = ~air
    lab, n = ndi.label(tissue)
    empty = np.zeros(ct.shape, np.uint8), np.zeros(ct.shape, bool)
    if n == 0:
        return empty
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    body = lab == int(np.argmax(counts))
    del lab, tissue
    body_filled = ndi.binary_fill_holes(body, structure=_INPLANE)
    inner = air & body_filled
    del body_filled

    # 2. Internal air components large enough to be lungs (drops the stomach bubble, bowel gas).
    lab, n = ndi.label(inner)
    if n == 0:
        return empty
    sizes = np.bincount(lab.ravel())[1:] * voxel_ml
    keep = np.nonzero(sizes >= cfg.min_lung_ml)[0] + 1
    cand = np.isin(lab, keep)
    del lab

    # 3. Trachea and main bronchi: follow the airway down from the top, slice by slice, while its
    #    cross-section stays airway-sized; it joins the lungs only where a bronchus enters them.
    airway = _track_airway(cand, spacing, cfg)
    if airway.any():
        grow = np.maximum(1, np.round(1.5 / spacing).astype(int))
        airway = ndi.binary_dilation(airway, structure=np.ones((2 * grow[0] + 1, 2 * grow[1] + 1, 1), bool))
        cand &= ~airway

    # 4. The lungs: the two largest components; split them if they touch.
    lab, n = ndi.label(cand)
    if n == 0:
        return empty
    sizes = np.bincount(lab.ravel())[1:] * voxel_ml
    order = np.argsort(sizes)[::-1]
    big = [int(i) + 1 for i in order if sizes[i] >= cfg.min_lung_ml]
    if not big:
        return empty
    parts: list[np.ndarray] = []
    if len(big) >= 2 and sizes[big[1] - 1] >= 0.2 * sizes[big[0] - 1]:
        parts = [lab == big[0], lab == big[1]]
    else:
        whole = lab == big[0]
        parts = _split_touching(whole, spacing) or [whole]
    del lab

    # 5. Right / left by world position: in RAS, x (index i) grows towards the patient's right.
    labels = np.zeros(ct.shape, np.uint8)
    if len(parts) == 2:
        cx = [np.nonzero(p.any(axis=(1, 2)))[0].mean() for p in parts]
        right, left = (parts[0], parts[1]) if cx[0] > cx[1] else (parts[1], parts[0])
        labels[_fill(right, spacing, cfg)] = RIGHT
        labels[_fill(left, spacing, cfg) & (labels == 0)] = LEFT
    else:
        # one lung: which side is it on? compare with the body's midline
        body_x = np.nonzero(body.any(axis=(1, 2)))[0]
        mid = 0.5 * (body_x.min() + body_x.max()) if len(body_x) else ct.shape[0] / 2
        lung_x = np.nonzero(parts[0].any(axis=(1, 2)))[0].mean()
        labels[_fill(parts[0], spacing, cfg)] = RIGHT if lung_x > mid else LEFT
    return labels, airway


def _classical(ct: np.ndarray, spacing: np.ndarray, cfg: LungSegmentationConfig, patient) -> np.ndarray:
    """Segment on a ~2 mm copy (fast, and the averaging suppresses noise), then refine the lung
    boundary at full resolution by the HU threshold in a band of one coarse voxel around it."""
    f = np.maximum(1, np.floor(cfg.coarse_mm / spacing + 1e-6)).astype(int)
    if np.all(f == 1):
        smooth = ndi.gaussian_filter(ct.astype(np.float32, copy=False), sigma=cfg.smooth_mm / spacing)
        return _classical_at(smooth, spacing, cfg)[0]
    coarse = _block_mean(ct, f)
    labels_c, airway_c = _classical_at(coarse, spacing * f, cfg)
    labels = np.zeros(ct.shape, np.uint8)
    if not labels_c.any():
        return labels
    struct = ndi.generate_binary_structure(3, 1)
    airway_c = ndi.binary_dilation(airway_c, structure=struct) if airway_c.any() else airway_c
    for side in (RIGHT, LEFT):
        m = labels_c == side
        if not m.any():
            continue
        box = ndi.find_objects(m.astype(np.uint8))[0]
        box = tuple(slice(max(0, b.start - 2), b.stop + 2) for b in box)
        region = ndi.binary_dilation(m[box], structure=struct) & (labels_c[box] != (3 - side)) & ~airway_c[box]
        interior = ndi.binary_erosion(m[box], structure=struct)
        fine_box = tuple(slice(b.start * fi, min(n, b.stop * fi)) for b, fi, n in zip(box, f, ct.shape))
        shape = tuple(b.stop - b.start for b in fine_box)
        region_f = _upsample(region, f, shape)
        interior_f = _upsample(interior, f, shape)
        lung = region_f & (interior_f | (ct[fine_box] < cfg.air_threshold))
        view = labels[fine_box]
        view[lung & (view == 0)] = side
    return labels


def _block_mean(a: np.ndarray, f: np.ndarray) -> np.ndarray:
    pad = [(0, (-s) % fi) for s, fi in zip(a.shape, f)]
    if any(p[1] for p in pad):
        a = np.pad(a, pad, mode="edge")
    s = a.shape
    return a.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2]).mean(axis=(1, 3, 5), dtype=np.float32)


def _upsample(m: np.ndarray, f: np.ndarray, shape) -> np.ndarray:
    for ax, fi in enumerate(f):
        if fi > 1:
            m = np.repeat(m, fi, axis=ax)
    return m[: shape[0], : shape[1], : shape[2]]


def _fill(mask: np.ndarray, spacing: np.ndarray, cfg: LungSegmentationConfig) -> np.ndarray:
    """Vessels and nodules inside the lung belong to it: closing, then holes filled per slice."""
    box = ndi.find_objects(mask.astype(np.uint8))[0]
    r = np.maximum(1, np.round(cfg.closing_mm / spacing).astype(int))
    pad = tuple(slice(max(0, s.start - ri - 1), s.stop + ri + 1) for s, ri in zip(box, r))
    sub = mask[pad]
    struct = _ellipsoid(r)
    closed = ndi.binary_closing(np.pad(sub, [(ri + 1, ri + 1) for ri in r]), structure=struct)
    closed = closed[tuple(slice(ri + 1, -(ri + 1)) for ri in r)]
    filled = ndi.binary_fill_holes(closed, structure=_INPLANE)
    out = np.zeros_like(mask)
    out[pad] = filled
    return out


def _ellipsoid(r) -> np.ndarray:
    g = np.ogrid[tuple(slice(-ri, ri + 1) for ri in r)]
    return sum((gi / max(ri, 1)) ** 2 for gi, ri in zip(g, r)) <= 1.0


def _track_airway(cand: np.ndarray, spacing: np.ndarray, cfg: LungSegmentationConfig) -> np.ndarray:
    """Trachea and main bronchi: from the top slice down, follow the small air regions that
    continue the airway; stop each branch where it merges into a large (lung) region."""
    px_area = float(spacing[0] * spacing[1])
    max_px = cfg.trachea_max_area_mm2 / px_area
    airway = np.zeros_like(cand)
    # start: the highest slices where an airway-sized region lies near the middle of the body
    ks = np.nonzero(cand.any(axis=(0, 1)))[0]
    if len(ks) == 0:
        return airway
    front: np.ndarray | None = None
    ci = cand.shape[0] / 2
    for k in range(ks.max(), max(ks.max() - int(80 / spacing[2]), -1), -1):
        lab, n = ndi.label(cand[:, :, k])
        if n == 0:
            continue
        best = None
        for idx, sl in enumerate(ndi.find_objects(lab), start=1):
            reg = lab[sl] == idx
            area = reg.sum()
            if area > max_px or area * px_area < 20:
                continue
            cxi = (sl[0].start + sl[0].stop) / 2
            score = abs(cxi - ci)
            if score < 0.12 * cand.shape[0] and (best is None or score < best[0]):
                best = (score, idx)
        if best is not None:
            front = lab == best[1]
            airway[:, :, k] = front
            start_k = k
            break
    if front is None:
        return airway
    for k in range(start_k - 1, -1, -1):
        lab, n = ndi.label(cand[:, :, k])
        hit = np.unique(lab[front & (lab > 0)])
        if len(hit) == 0:
            break
        nxt = np.zeros_like(front)
        for h in hit:
            reg = lab == h
            if reg.sum() > max_px:
                continue  # this branch has entered a lung: stop following it
            nxt |= reg
        if not nxt.any():
            break
        airway[:, :, k] = nxt
        front = nxt
    return airway


def _split_touching(mask: np.ndarray, spacing: np.ndarray) -> list[np.ndarray] | None:
    """Two lungs joined at the anterior (or posterior) junction: erode a coarse copy until it
    falls apart into two large pieces, then give every voxel to the nearer piece.

    The copy has its vessel holes filled (slice by slice) first: a lung riddled with vessel lumens
    erodes from the inside and is gone before the junction opens. Only vessel-sized holes are
    filled, not the mediastinum where the lungs meet in front and behind in one slice."""
    boxes = ndi.find_objects(mask.astype(np.uint8))
    if not boxes:
        return None
    box = boxes[0]  # work in the mask's box: a fraction of the field of view
    parts = _split_in_box(mask[box], spacing)
    if parts is None:
        return None
    out = []
    for part in parts:
        full = np.zeros_like(mask)
        full[box] = part
        out.append(full)
    return out


def _split_in_box(mask: np.ndarray, spacing: np.ndarray) -> list[np.ndarray] | None:
    step = np.maximum(1, np.round(2.0 / spacing).astype(int))
    coarse = mask[:: step[0], :: step[1], :: step[2]]
    holes, n = ndi.label(ndi.binary_fill_holes(coarse, structure=_INPLANE) & ~coarse, structure=_INPLANE)
    if n:
        area = np.bincount(holes.ravel()) * float(spacing[0] * step[0] * spacing[1] * step[1])
        vessel = area <= _MAX_VESSEL_HOLE_MM2
        vessel[0] = False
        coarse = coarse | vessel[holes]
    del holes
    struct = ndi.generate_binary_structure(3, 1)
    total = coarse.sum()
    eroded = coarse
    for _ in range(12):
        eroded = ndi.binary_erosion(eroded, structure=struct)
        lab, n = ndi.label(eroded)
        if n < 2:
            continue
        sizes = ndi.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
        order = np.argsort(sizes)[::-1]
        if sizes[order[1]] >= 0.15 * sizes[order[0]] and sizes[order[0]] + sizes[order[1]] > 0.2 * total:
            seeds = np.zeros_like(lab)
            seeds[lab == order[0] + 1] = 1
            seeds[lab == order[1] + 1] = 2
            _, ind = ndi.distance_transform_edt(seeds == 0, sampling=spacing * step, return_indices=True)
            near = seeds[tuple(ind)]
            full = np.repeat(np.repeat(np.repeat(near, step[0], 0), step[1], 1), step[2], 2)
            full = full[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
            pad = [(0, s - f) for s, f in zip(mask.shape, full.shape)]
            full = np.pad(full, pad, mode="edge")
            return [mask & (full == 1), mask & (full == 2)]
    return None


# --------------------------------------------------------------------------------------------------
# lungmask (R231)
# --------------------------------------------------------------------------------------------------


def _lungmask(ct: np.ndarray, weights: str | None, patient) -> np.ndarray:
    if not weights:
        raise CtpmError("the lungmask backend needs lungmask_weights=<path to the R231 weights file> (nothing is downloaded)", patient=patient)
    if not Path(weights).is_file():
        raise CtpmError("lungmask weights file does not exist", patient=patient, path=weights)
    try:
        from lungmask import LMInferer  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise CtpmError("the lungmask backend needs the package: pip install 'ctpm[lungmask]'") from None
    inferer = LMInferer(modelname="R231", modelpath=str(weights), tqdm_disable=True)
    # lungmask expects the array as SimpleITK gives a DICOM axial series: (slice, row, col) with
    # rows running anterior -> posterior and columns patient right -> left (RAS i and j reversed).
    arr = np.transpose(ct[::-1, ::-1, :], (2, 1, 0))
    seg = inferer.apply(arr)  # 1 right, 2 left
    return np.ascontiguousarray(np.transpose(seg, (2, 1, 0))[::-1, ::-1, :]).astype(np.uint8)
