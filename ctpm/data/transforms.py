"""The paper's preprocessing (Fig. 1B) as MONAI dictionary transforms, and its inverse.

Forward, per patient (keys in brackets):

    grid stage    LoadVolumed [ct, spect, lung_mask]  ->  Orientationd RAS
                  ->  Spacingd to the isotropic grid of the CT (1 mm)  [ct, lung_mask]
                  ->  SegmentLungsd [ct -> lungs]  (or the manifest's lung_mask)
                  ->  CropForegroundd to the lungs  [ct, lungs]
                  ->  [RegisterSpectd: the SPECT's affine registered to the CT]  (register_spect)
                  ->  CheckOverlapd, ResampleToMatchd [spect -> grid of ct]   (world coordinates)
                  ->  EvaluationMaskd [mask = lungs within HU -1000..-300]
                  ->  StandardiseSpectd [spect / 75th percentile in mask, clipped to 1]
    lung stage    SplitLungsd -> per side s: CropForegroundd to lung s -> Transposed to (z, y, x)
                  ->  Resized to roi_size (128 x 64 x 64)  ->  Flipd (left lung mirrored, optional)
                  ->  ScaleIntensityRanged (CT enhancement: HU window -> [0, 1])
    roi_mode thorax  the same stage with one "side", ``thorax``: both lungs in one ROI. The crop is
                  to the box of both lungs (a margin of THORAX_MARGIN voxels), FitResized scales it
                  by one factor for all three axes (the largest box that fits roi_size keeping
                  the aspect ratio), SpatialPadd pads the rest of roi_size (zeros: -1000 HU after
                  the enhancement), no mirror: the lungs' shapes, sizes, places in the box and
                  left/right balance are in the ROI as in the patient, up to that one factor.

The geometric steps record what they did (``MetaTensor.applied_operations``); from that record
``ctpm.data.record.LungInverse`` keeps each lung's (or the thorax's) crop box, axis order, mirror,
padding and ROI size as plain numbers, and ``ctpm.data.record.restore`` / ``to_ct`` take the ROI
predictions back onto the evaluation grid and the original CT grid. Intensity steps are not
inverted: perfusion maps stay standardised (1.0 = normal-functioning lung), as the design card fixes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    Flipd,
    MapTransform,
    Orientationd,
    ResampleToMatchd,
    Resized,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    Transposed,
)

from ctpm.data.io import Volume, load_image
from ctpm.data.lungs import LEFT, RIGHT, LungSegmentationConfig, _split_touching, evaluation_mask, segment_lungs
from ctpm.data.registration import KINDS, RegisterSpectd
from ctpm.errors import CtpmError, warn
from ctpm.geometry import Grid, footprint

SIDES = {"right": RIGHT, "left": LEFT}
# preprocessing.roi_mode: the ROIs ("sides") each mode cuts, and the lung labels each ROI holds
ROI_MODES = {"lung": {"right": (RIGHT,), "left": (LEFT,)}, "thorax": {"thorax": (RIGHT, LEFT)}}
THORAX = "thorax"
THORAX_MARGIN = 2  # voxels of the evaluation grid around both lungs (interpolation support)


@dataclass
class PreprocessConfig:
    """The preprocessing parameters; their hash keys the cache."""

    spacing: Sequence[float] = (1.0, 1.0, 1.0)  # mm, the evaluation grid of the paper
    roi_size: Sequence[int] = (128, 64, 64)  # per ROI, (superior-inferior, anterior-posterior, left-right)
    hu_window: Sequence[float] = (-1000.0, 0.0)  # CT enhancement: this HU window -> [0, 1]
    eval_hu_range: Sequence[float] = (-1000.0, -300.0)  # the evaluation mask (tumour and vessels out)
    spect_percentile: float = 75.0  # SPECT standardisation: divide by this percentile in the mask ...
    spect_clip: float = 1.0  # ... and clip to this
    mirror_left: bool = True  # left lungs flipped to the right lung's orientation
    lung_backend: str = "classical"  # classical | lungmask
    lungmask_weights: str | None = None
    lung: dict = field(default_factory=dict)  # LungSegmentationConfig overrides
    register_spect: str = "none"  # none | rigid | affine: SPECT-to-CT registration (ctpm.data.registration)
    registration: dict = field(default_factory=dict)  # RegistrationSettings overrides
    context_channels: Sequence[str] = ()  # extra ROI channels of CONTEXT_CHANNELS (see context_maps)
    roi_mode: str = "lung"  # lung: one ROI per lung (the paper's) | thorax: both lungs in one ROI, aspect kept

    def __post_init__(self) -> None:
        if self.roi_mode not in ROI_MODES:
            raise CtpmError(f"preprocessing.roi_mode must be one of {', '.join(ROI_MODES)}, not {self.roi_mode!r}")

    @classmethod
    def from_any(cls, cfg: Any) -> PreprocessConfig:
        if isinstance(cfg, cls):
            return cfg
        if cfg is None:
            return cls()
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        known = {k: v for k, v in dict(cfg).items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(dict(cfg)) - set(known))
        if unknown:
            raise CtpmError(f"unknown preprocessing option(s): {', '.join(unknown)}")
        return cls(**known)

    def to_dict(self) -> dict:
        return {
            "spacing": [float(v) for v in self.spacing],
            "roi_size": [int(v) for v in self.roi_size],
            "hu_window": [float(v) for v in self.hu_window],
            "eval_hu_range": [float(v) for v in self.eval_hu_range],
            "spect_percentile": float(self.spect_percentile),
            "spect_clip": float(self.spect_clip),
            "mirror_left": bool(self.mirror_left),
            "lung_backend": self.lung_backend,
            "lungmask_weights": self.lungmask_weights,
            "lung": dict(sorted(self.lung.items())),
            # only when on: the caches built without registration keep their hash
            **({"register_spect": self.register_spect, "registration": dict(sorted(self.registration.items()))}
               if self.register_spect != "none" else {}),
            # only when asked for: the caches built without context channels keep their hash
            **({"context_channels": [str(c) for c in self.context_channels]} if self.context_channels else {}),
            # only when not the paper's per-lung ROI: the caches built before roi_mode keep their hash
            **({"roi_mode": self.roi_mode} if self.roi_mode != "lung" else {}),
        }


# --------------------------------------------------------------------------------------------------
# Custom dictionary transforms (what MONAI does not have)
# --------------------------------------------------------------------------------------------------


def volume_to_metatensor(vol: Volume, source: str | None = None) -> MetaTensor:
    t = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[None]
    meta = {"filename_or_obj": source or vol.meta.get("source", "")}
    return MetaTensor(t, affine=torch.as_tensor(vol.affine, dtype=torch.float64), meta=meta)


class LoadVolumed(MapTransform):
    """Read each key's path with ``ctpm.data.io.load_image`` (NIfTI or DICOM series, checked) into
    a channel-first MetaTensor. ``kinds`` maps keys to image kinds (ct, spect, label). The paths
    are kept in ``sources`` ({key: path}), so that later errors can name the file."""

    def __init__(self, keys, kinds: Mapping[str, str], allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.kinds = dict(kinds)

    def __call__(self, data):
        d = dict(data)
        sources = dict(d.get("sources", {}))
        for key in self.key_iterator(d):
            value = d[key]
            if value is None or isinstance(value, MetaTensor):
                continue
            if isinstance(value, Volume):
                d[key] = volume_to_metatensor(value)
                continue
            sources[key] = str(value)
            vol = load_image(value, kind=self.kinds.get(key, "ct"), patient=d.get("patient_id"))
            if key == "ct":
                d["dicom_ct"] = {k: v for k, v in vol.meta.items() if k != "files"}
            d[key] = volume_to_metatensor(vol, str(value))
        d["sources"] = sources
        for key in list(d):
            if d[key] is None:
                del d[key]
        return d


class SegmentLungsd(MapTransform):
    """Right (1) / left (2) lung labels of the CT into ``lungs``, a copy of the CT's geometry (so the
    same inverse applies). A given ``lung_mask`` (manifest column) is used instead: binary masks are
    split into right and left, 1/2 label maps kept."""

    def __init__(self, ct_key: str = "ct", out_key: str = "lungs", mask_key: str = "lung_mask",
                 backend: str = "classical", lungmask_weights: str | None = None, lung: dict | None = None):
        super().__init__([ct_key])
        self.ct_key, self.out_key, self.mask_key = ct_key, out_key, mask_key
        self.backend, self.weights = backend, lungmask_weights
        self.lung_cfg = LungSegmentationConfig(**(lung or {}))

    def __call__(self, data):
        d = dict(data)
        ct = d[self.ct_key]
        spacing = np.asarray(ct.pixdim, float)[:3]
        pid = d.get("patient_id")
        sources = d.get("sources", {})
        given_mask = self.mask_key in d
        try:
            if given_mask:
                mask_img = d.pop(self.mask_key)
                given = np.rint(mask_img[0].numpy()).astype(np.uint8)
                if given.shape != tuple(ct.shape[1:]):
                    raise CtpmError(
                        f"lung_mask has shape {given.shape}, the CT {tuple(ct.shape[1:])}: it must be on the CT's grid",
                        patient=pid,
                    )
                # same shape is not enough: a mask saved without the CT's affine lies elsewhere
                off = float(np.abs(mask_img.affine.numpy() - ct.affine.numpy()).max())
                if off > 0.01:
                    raise CtpmError(f"lung_mask is not on the CT's grid (its affine differs from the CT's by up to "
                                    f"{off:.3g} mm); save it with the CT's affine", patient=pid)
                labels = _labels_from_mask(given, spacing, pid)
            else:
                labels = segment_lungs(ct[0].numpy(), spacing, backend=self.backend, patient=pid,
                                       lungmask_weights=self.weights, config=self.lung_cfg)
        except CtpmError as err:  # no lung in this CT (or mask): name that file
            raise err.with_context(patient=pid, path=sources.get(self.mask_key if given_mask else self.ct_key)) from None
        # the labels on the CT's own grid, kept for the QA mask written in the CT's geometry
        d["native_lungs"] = (labels, ct.affine.numpy().copy(), ct[0].numpy())
        onehot = np.stack([labels == RIGHT, labels == LEFT]).astype(np.float32)
        d[self.out_key] = _like(ct, torch.from_numpy(onehot))
        return d


class LabelsFromOneHotd(MapTransform):
    """(2, ...) right/left membership after linear resampling -> one label channel (1 right, 2 left)."""

    def __init__(self, keys):
        super().__init__(keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            oh = d[key]
            right, left = oh[0].as_tensor(), oh[1].as_tensor()
            lab = torch.where((right >= 0.5) & (right >= left), 1.0, torch.where(left >= 0.5, 2.0, 0.0))
            d[key] = _like(oh, lab[None])
        return d


def _labels_from_mask(mask: np.ndarray, spacing, pid) -> np.ndarray:
    from ctpm.data.lungs import check_lungs

    values = set(np.unique(mask).tolist())
    if values <= {0, 1, 2} and 2 in values:
        return check_lungs(mask, spacing, patient=pid)
    binary = mask > 0
    parts = _split_touching(binary, spacing)
    from scipy import ndimage as ndi

    if parts is None:
        lab, n = ndi.label(binary)
        sizes = np.bincount(lab.ravel())[1:]
        order = np.argsort(sizes)[::-1]
        parts = [lab == (i + 1) for i in order[:2] if sizes[i] > 0.2 * sizes[order[0]]]
    labels = np.zeros(mask.shape, np.uint8)
    if len(parts) == 2:
        cx = [np.nonzero(p.any(axis=(1, 2)))[0].mean() for p in parts]
        right, left = (parts[0], parts[1]) if cx[0] > cx[1] else (parts[1], parts[0])  # RAS: right lung at larger i
        labels[right], labels[left] = RIGHT, LEFT
    elif len(parts) == 1:
        x = np.nonzero(parts[0].any(axis=(1, 2)))[0].mean()
        labels[parts[0]] = RIGHT if x > mask.shape[0] / 2 else LEFT
    return check_lungs(labels, spacing, patient=pid)


def _like(ref: MetaTensor, array: torch.Tensor) -> MetaTensor:
    """A new image on `ref`'s grid that carries `ref`'s transform history (hence the same inverse)."""
    out = MetaTensor(array, affine=ref.affine.clone(), meta=dict(ref.meta))
    out.applied_operations = [dict(op) for op in ref.applied_operations]
    return out


class CheckOverlapd(MapTransform):
    """How much of the lungs (`ref_key`, on the grid) an image (SPECT) covers in world space, before
    it is resampled there. Less than `min_fraction`: an error naming the patient and file (not this
    patient's scan, or not registered). Less than all of it (a field of view that cuts a lung
    base): a warning, and `<key>_fov` marks the covered voxels, so that the evaluation mask leaves
    out lung that the SPECT did not see rather than count it as unperfused."""

    def __init__(self, keys, ref_key: str = "lungs", min_fraction: float = 0.5, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.min_fraction = ref_key, min_fraction

    def __call__(self, data):
        d = dict(data)
        ref = d[self.ref_key]
        lungs = ref[0].numpy() > 0
        for key in self.key_iterator(d):
            img = d[key]
            inside = footprint(Grid.of(img), Grid.of(ref), where=lungs)
            frac = float(inside[lungs].mean()) if lungs.any() else 0.0
            who = {"patient": d.get("patient_id"), "path": d.get("sources", {}).get(key)}
            if frac < self.min_fraction:
                lo, hi = Grid.of(img).bounds(edges=True)
                ref_lo, ref_hi = Grid.of(ref).bounds(edges=True)
                raise CtpmError(
                    f"{key} does not overlap the lungs of the CT in world coordinates (covers {100 * frac:.0f}% "
                    f"of them; {key} spans {np.round(lo).tolist()}..{np.round(hi).tolist()} mm, lungs "
                    f"{np.round(ref_lo).tolist()}..{np.round(ref_hi).tolist()} mm); is it registered to this CT?",
                    **who)
            if frac < 1.0:
                warn(f"{key} covers {100 * frac:.1f}% of the lungs ({who['path']}); the lung outside its field of "
                     "view is left out of the evaluation mask", patient=d.get("patient_id"))
                d[f"{key}_fov"] = inside
        return d


class EvaluationMaskd(MapTransform):
    """``mask`` = lungs within the HU range (the paper's -1000..-300: tumour and vessels out)."""

    def __init__(self, ct_key="ct", lungs_key="lungs", out_key="mask", hu_range=(-1000.0, -300.0)):
        super().__init__([ct_key])
        self.ct_key, self.lungs_key, self.out_key, self.hu_range = ct_key, lungs_key, out_key, tuple(hu_range)

    def __call__(self, data):
        d = dict(data)
        m = evaluation_mask(d[self.ct_key][0].numpy(), d[self.lungs_key][0].numpy(), self.hu_range)
        if d.get("spect_fov") is not None:  # lung the SPECT did not see (CheckOverlapd)
            m &= d["spect_fov"]
        d[self.out_key] = _like(d[self.ct_key], torch.from_numpy(m.astype(np.float32))[None])
        return d


def standardise_spect(spect: np.ndarray, mask: np.ndarray, percentile: float = 75.0, clip: float = 1.0) -> tuple[np.ndarray, float]:
    """The paper's SPECT standardisation: divide by the 75th percentile inside the mask (close to
    normal-functioning lung), clip to 1. Returns the map and the percentile value."""
    values = spect[mask > 0]
    if values.size == 0:
        raise CtpmError("the evaluation mask is empty: no lung voxel within the HU range")
    p = float(np.percentile(values, percentile))
    if not p > 0:
        raise CtpmError(f"SPECT has no counts in the lungs ({percentile:g}th percentile is {p:g}); is it registered to this CT?")
    return np.clip(spect / p, 0.0, clip).astype(np.float32), p


class StandardiseSpectd(MapTransform):
    def __init__(self, keys="spect", mask_key="mask", percentile=75.0, clip=1.0, allow_missing_keys=True):
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.percentile, self.clip = mask_key, percentile, clip

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                arr, p = standardise_spect(d[key][0].numpy(), d[self.mask_key][0].numpy(), self.percentile, self.clip)
            except CtpmError as err:
                raise err.with_context(patient=d.get("patient_id"), path=d.get("sources", {}).get(key)) from None
            d[key] = _like(d[key], torch.from_numpy(arr)[None])
            d[f"percentile_{key}"] = p
        return d


class SplitLungsd(MapTransform):
    """Copy every image into one key per ROI of `roi_mode` (``ct_right``, ``ct_left``, ... or
    ``ct_thorax``); the lung keys hold the lung(s) of that ROI only (the thorax: both) and the
    evaluation mask is cut to them. Sides without a lung (pneumonectomy) are left out."""

    def __init__(self, keys: Sequence[str], lungs_key: str = "lungs", roi_mode: str = "lung"):
        super().__init__(list(keys), allow_missing_keys=True)
        self.lungs_key = lungs_key
        self.groups = ROI_MODES[roi_mode]

    def __call__(self, data):
        d = dict(data)
        lungs = d[self.lungs_key]
        d["sides"] = []
        for side, values in self.groups.items():
            m = (lungs == values[0]).float()
            for v in values[1:]:
                m = m + (lungs == v).float()
            if not bool(m.any()):
                continue
            d["sides"].append(side)
            d[f"lung_{side}"] = _like(lungs, m.as_tensor() if isinstance(m, MetaTensor) else m)
            for key in self.key_iterator(d):
                img = d[key]
                value_t = img.as_tensor().clone()
                if key == "mask":
                    value_t = value_t * m.as_tensor()
                d[f"{key}_{side}"] = _like(img, value_t)
        return d


# --------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------

IMAGE_KEYS = ("ct", "spect", "mask")  # per-lung images besides the lung itself


def grid_stage(cfg: PreprocessConfig, *, with_spect: bool) -> Compose:
    """CT (and SPECT) onto the isotropic grid of the CT, lungs, crop, evaluation mask, SPECT standardised.

    The lungs are segmented on the CT's own grid and the CT is cropped to them before it is
    resampled: the result is the same as resampling the whole field of view first, at a fraction of
    the cost (a chest CT's field of view is 5-7 times the lungs' box). Labels are carried through
    the resampling as one-hot channels with linear interpolation, so thick-slice CTs do not give
    staircase lung borders on the 1 mm grid.
    """
    t: list = [
        LoadVolumed(["ct", "spect", "lung_mask"], kinds={"ct": "ct", "spect": "spect", "lung_mask": "label"}),
        # labels: RAS+ as NIfTI means it (x grows towards the patient's Right), stated so that
        # MONAI's coming default (labels=None: the MetaTensor's space) cannot change it
        Orientationd(keys=["ct", "lung_mask"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")),
                     allow_missing_keys=True),
        SegmentLungsd(backend=cfg.lung_backend, lungmask_weights=cfg.lungmask_weights, lung=cfg.lung),
        CropForegroundd(keys=["ct", "lungs"], source_key="lungs", margin=2, allow_smaller=True),  # 2 voxels: interpolation support
        Spacingd(keys=["ct", "lungs"], pixdim=tuple(cfg.spacing), mode=("bilinear", "bilinear"),
                 dtype=torch.float32),
        LabelsFromOneHotd("lungs"),
    ]
    if with_spect and cfg.register_spect not in KINDS:
        raise CtpmError(f"preprocessing.register_spect must be one of {', '.join(KINDS)}, not {cfg.register_spect!r}")
    if with_spect and cfg.register_spect != "none":  # the SPECT's affine only; resampled once below
        t.append(RegisterSpectd(["spect"], kind=cfg.register_spect, settings=cfg.registration))
    if with_spect:
        t += [
            CheckOverlapd(["spect"], ref_key="lungs"),
            ResampleToMatchd(keys=["spect"], key_dst="ct", mode="bilinear", padding_mode="zeros", dtype=torch.float32),
        ]
    t.append(EvaluationMaskd(hu_range=cfg.eval_hu_range))
    if with_spect:
        t.append(StandardiseSpectd(percentile=cfg.spect_percentile, clip=cfg.spect_clip))
    return Compose(t)


CONTEXT_CHANNELS = ("height", "posterior", "pleura", "side")


def context_maps(lungs: np.ndarray, spacing: Sequence[float], names: Sequence[str]) -> np.ndarray:
    """Context channels of the whole thorax on the evaluation grid (RAS axes: i to the right,
    j anterior, k superior), computed before the per-lung crop, so that every lung's ROI carries
    where it lies in the patient (the crop and resize to roi_size hide that). In roi_mode thorax
    they are cut with the thorax's ROI alike (``side`` then tells the two lungs of the one ROI apart).

    - ``height``: (k - k_min) / (k_max - k_min) over both lungs: 0 at the lowest lung voxel, 1 at
      the apex;
    - ``posterior``: (j - j_min) * spacing_j / 100: the distance in decimetres from the most
      posterior lung voxel (the gravity-dependent height of a supine patient);
    - ``pleura``: the Euclidean distance in decimetres from a lung voxel to the nearest voxel
      outside the lungs (scipy's distance transform with the grid's spacing); 0 outside;
    - ``side``: 1 in the left lung, 0 elsewhere.

    Args: lungs (X, Y, Z) labels (1 right, 2 left); spacing (3,) mm; names of CONTEXT_CHANNELS.
    Returns (len(names), X, Y, Z) float32.
    """
    from scipy import ndimage as ndi

    unknown = [n for n in names if n not in CONTEXT_CHANNELS]
    if unknown:
        raise CtpmError(f"unknown context channel(s) {', '.join(map(str, unknown))}; "
                        f"known: {', '.join(CONTEXT_CHANNELS)}")
    lungs = np.asarray(lungs)
    inside = lungs > 0
    if not inside.any():
        raise CtpmError("no lung voxel to compute the context channels from")
    idx = [np.nonzero(inside.any(axis=tuple(b for b in range(3) if b != a)))[0] for a in range(3)]
    shape = lungs.shape
    out = []
    for name in names:
        if name == "height":
            k = np.arange(shape[2], dtype=np.float64)
            lo, hi = idx[2][0], idx[2][-1]
            arr = np.broadcast_to((k - lo) / max(hi - lo, 1), shape)
        elif name == "posterior":
            j = np.arange(shape[1], dtype=np.float64)
            arr = np.broadcast_to(((j - idx[1][0]) * float(spacing[1]) / 100.0)[:, None], shape)
        elif name == "pleura":
            arr = ndi.distance_transform_edt(inside, sampling=[float(v) for v in spacing]) / 100.0
        else:  # side
            arr = (lungs == LEFT).astype(np.float64)
        out.append(np.asarray(arr, np.float32))
    return np.stack(out)


def fit_size(shape: Sequence[int], into: Sequence[int]) -> tuple[int, ...]:
    """The largest shape of `shape`'s aspect ratio that fits `into`: every axis scaled by one
    factor, min(into / shape), and rounded (at least 1, at most `into`)."""
    scale = min(float(n) / float(s) for s, n in zip(shape, into))
    return tuple(min(int(n), max(1, int(round(float(s) * scale)))) for s, n in zip(shape, into))


class FitResized(Resized):
    """MONAI's Resized to the largest size that fits `spatial_size` keeping the aspect ratio (one
    scale factor for all axes, ``fit_size``), from `ref_key`'s spatial shape at call time; the rest
    of `spatial_size` is for a SpatialPadd after it. MONAI records the operation as a Resize (the
    size it made), so its inverse (and Invertd) is Resized's."""

    def __init__(self, keys, spatial_size: Sequence[int], ref_key: str, **kwargs):
        super().__init__(keys, spatial_size=tuple(int(v) for v in spatial_size), **kwargs)
        self.fit_into = tuple(int(v) for v in spatial_size)
        self.ref_key = ref_key

    def __call__(self, data, lazy: bool | None = None):
        self.resizer.spatial_size = fit_size(data[self.ref_key].shape[1:], self.fit_into)
        return super().__call__(data, lazy)


def lung_stage(cfg: PreprocessConfig, side: str, keys: Sequence[str]) -> Compose:
    """One ROI: crop to its box, (z, y, x) order, resize to roi_size, mirror the left lung. The
    thorax (roi_mode thorax): the box of both lungs with THORAX_MARGIN, resized by one factor for
    every axis to fit roi_size, padded to it, never mirrored."""
    thorax = side == THORAX
    ks = [f"{k}_{side}" for k in keys] + [f"lung_{side}"]
    # CT: trilinear with anti-aliasing (its record is what the inverse replays, so it must be a
    # smooth interpolator); SPECT: area averaging, the natural downsampling of counts; masks: nearest.
    # Context channels (ctx_): smooth maps, trilinear.
    modes = ["trilinear" if k.startswith(("ct_", "ctx_")) else "area" if k.startswith("spect_") else "nearest"
             for k in ks]
    roi = tuple(int(v) for v in cfg.roi_size)
    resize = dict(keys=ks, mode=modes, anti_aliasing=[m == "trilinear" for m in modes], allow_missing_keys=True)
    t: list = [
        CropForegroundd(keys=ks, source_key=f"lung_{side}", allow_missing_keys=True,
                        # the thorax's margin stops at the evaluation grid's edge (no padding to invert)
                        **({"margin": THORAX_MARGIN, "allow_smaller": True} if thorax else {"margin": 0})),
        # channel, x, y, z -> channel, z, y, x: the network sees (superior-inferior, A-P, L-R)
        Transposed(keys=ks, indices=(0, 3, 2, 1), allow_missing_keys=True),
        FitResized(spatial_size=roi, ref_key=f"lung_{side}", **resize) if thorax else
        Resized(spatial_size=roi, **resize),
    ]
    if side == "left" and cfg.mirror_left:
        t.append(Flipd(keys=ks, spatial_axis=2, allow_missing_keys=True))  # L-R mirror
    if "ct" in keys:
        lo, hi = cfg.hu_window
        t.append(ScaleIntensityRanged(keys=[f"ct_{side}"], a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    if thorax:  # after the enhancement: the CT's padding reads as air (0)
        t.append(SpatialPadd(keys=ks, spatial_size=roi, method="symmetric", mode="constant", allow_missing_keys=True))
    return Compose(t)
