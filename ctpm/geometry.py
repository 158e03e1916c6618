"""The one geometry core of ctpm: a grid in world space and the operations on it.

Every part that moves an image between grids (preprocessing, evaluation, the functional dose
metrics, the synthetic world) calls this module; nothing else builds affines or resamples.

Conventions: a grid is a 4x4 affine (voxel index (i, j, k) -> world RAS mm as nibabel
writes it: x grows towards the patient's right) and a shape. A voxel *centre* has integer indices; the
voxel itself covers index +-0.5, so a grid's field of view reaches half a voxel beyond its
outermost centres.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

# DICOM patient coordinates are LPS (x to the patient's left, y posterior); ctpm's world is RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Grid:
    """A 3-D voxel grid in world space: ``affine`` (4x4, index -> world RAS mm) and ``shape``."""

    affine: np.ndarray
    shape: tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64).reshape(4, 4))
        object.__setattr__(self, "shape", tuple(int(s) for s in tuple(self.shape)[-3:]))

    @classmethod
    def of(cls, obj) -> "Grid":
        """The grid of anything with ``affine`` and ``shape`` (a Volume, a MetaTensor, a Grid)."""
        if isinstance(obj, Grid):
            return obj
        aff = obj.affine
        aff = aff.numpy() if hasattr(aff, "numpy") else aff
        return cls(np.asarray(aff, np.float64), tuple(obj.shape)[-3:])

    @classmethod
    def axis_aligned(cls, shape: Sequence[int], spacing: Sequence[float], origin: Sequence[float]) -> "Grid":
        """world = origin + index * spacing (no rotation, no flip)."""
        a = np.diag([*[float(s) for s in spacing], 1.0])
        a[:3, 3] = [float(o) for o in origin]
        return cls(a, tuple(int(s) for s in shape))

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def voxel_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def world(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices -> (N, 3) world mm."""
        ijk = np.asarray(ijk, np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def index(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) continuous voxel indices."""
        inv = np.linalg.inv(self.affine)
        return np.asarray(xyz, np.float64) @ inv[:3, :3].T + inv[:3, 3]

    def corners(self, *, edges: bool = False) -> np.ndarray:
        """World coordinates (8 x 3) of the corner voxels' centres, or with ``edges`` of the grid's
        outer faces (half a voxel further out)."""
        h = 0.5 if edges else 0.0
        idx = np.array(np.meshgrid(*[[-h, s - 1 + h] for s in self.shape], indexing="ij")).reshape(3, -1).T
        return self.world(idx)

    def bounds(self, *, edges: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world box (min, max) of the grid (voxel centres, or outer faces with ``edges``)."""
        c = self.corners(edges=edges)
        return c.min(0), c.max(0)

    def crop(self, lo: Sequence[int], hi: Sequence[int]) -> "Grid":
        """The sub-grid of indices lo <= ijk < hi."""
        lo = np.asarray(lo, int)
        a = self.affine.copy()
        a[:3, 3] = self.affine[:3, :3] @ lo + self.affine[:3, 3]
        return Grid(a, tuple(int(v) for v in np.asarray(hi, int) - lo))

    def same_as(self, other: "Grid", atol: float = 1e-4) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)

    def __repr__(self) -> str:
        return f"Grid(shape={self.shape}, spacing={np.round(self.spacing, 3).tolist()}, origin={np.round(self.affine[:3, 3], 2).tolist()})"


def footprint(src: Grid, dst: Grid, where: np.ndarray | None = None) -> np.ndarray:
    """Voxels of ``dst`` whose centres lie inside the field of view of ``src`` (any orientation);
    with ``where``, only those voxels are tested (the rest are False)."""
    src, dst = Grid.of(src), Grid.of(dst)
    idx = np.argwhere(where) if where is not None else np.argwhere(np.ones(dst.shape, bool))
    ijk = src.index(dst.world(idx))
    ok = np.all((ijk > -0.5) & (ijk < np.asarray(src.shape, np.float64) - 0.5), axis=1)
    out = np.zeros(dst.shape, bool)
    out[tuple(idx[ok].T)] = True
    return out


def coverage(src: Grid, dst: Grid, where: np.ndarray) -> float:
    """Share of the ``where`` voxels of ``dst`` that ``src`` covers (0 when ``where`` is empty)."""
    if not np.any(where):
        return 0.0
    return float(footprint(src, dst, where)[where].mean())


def resample(array: np.ndarray, src: Grid, dst: Grid, *, order: int = 1, fill: float = 0.0) -> np.ndarray:
    """``array`` on ``src`` -> the same field on ``dst``, in world coordinates.

    order 1 is (tri)linear, 0 nearest. Voxels of ``dst`` outside the field of view of ``src`` take
    ``fill``. A leading channel axis is allowed ((C, I, J, K)). MONAI's ``SpatialResample`` does the
    interpolation; it is run only over the part of ``dst`` that the source's box covers, which is
    what makes putting a lung-sized map onto a 512 x 512 x N CT grid take a fraction of a second.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    src, dst = Grid.of(src), Grid.of(dst)
    arr = np.asarray(array, np.float32)
    squeeze = arr.ndim == 3
    if squeeze:
        arr = arr[None]
    if tuple(arr.shape[1:]) != src.shape:
        raise ValueError(f"array of shape {arr.shape[1:]} is not on the source grid {src.shape}")
    out = np.full((arr.shape[0], *dst.shape), fill, np.float32)
    idx = dst.index(src.corners(edges=True))
    lo = np.maximum(np.floor(idx.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(idx.max(0)).astype(int) + 2, np.asarray(dst.shape))
    if np.all(hi > lo):
        sub = dst.crop(lo, hi)
        img = MetaTensor(torch.as_tensor(arr), affine=torch.as_tensor(src.affine))
        mode = "nearest" if order == 0 else "bilinear"
        res = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float32)(
            img, dst_affine=torch.as_tensor(sub.affine), spatial_size=sub.shape).numpy()
        if fill != 0.0:  # voxels the source does not cover take `fill` (SpatialResample pads with 0)
            seen = footprint(src, sub)
            res[:, ~seen] = fill
        out[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = res
    return out[0] if squeeze else out


def reorientation(src: Grid, dst: Grid) -> Callable[[np.ndarray], np.ndarray] | None:
    """When ``dst`` holds the voxels of ``src`` in another axis order or direction (a reoriented
    copy), the exact array mapping src -> dst; None otherwise."""
    import nibabel.orientations as nio

    src, dst = Grid.of(src), Grid.of(dst)
    if sorted(src.shape) != sorted(dst.shape):
        return None
    transform = nio.ornt_transform(nio.io_orientation(src.affine), nio.io_orientation(dst.affine))
    if not np.allclose(src.affine @ nio.inv_ornt_aff(transform, src.shape), dst.affine, atol=1e-3):
        return None
    return lambda a: np.ascontiguousarray(nio.apply_orientation(a, transform))


def resample_labels(labels: np.ndarray, src: Grid, dst: Grid) -> np.ndarray:
    """Integer labels onto ``dst``: an exact permutation / flip when ``dst`` is ``src`` reoriented,
    nearest neighbour otherwise (0 outside ``src``)."""
    src, dst = Grid.of(src), Grid.of(dst)
    same = reorientation(src, dst)
    if same is not None:
        return same(np.asarray(labels)).astype(np.uint8)
    return np.rint(resample(np.asarray(labels, np.float32), src, dst, order=0)).astype(np.uint8)


def resample_masked(values: np.ndarray, mask: np.ndarray, src: Grid, dst: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Linear resampling of ``values`` normalised by ``mask`` (normalised convolution), so that voxels
    at the mask's border are not pulled towards the zeros outside it. Returns (values, weight) on
    ``dst``; values are 0 where the weight is below 1e-3."""
    m = (np.asarray(mask) > 0).astype(np.float32)
    both = resample(np.stack([np.asarray(values, np.float32) * m, m]), src, dst, order=1)
    num, den = both[0], both[1]
    out = np.zeros_like(num)
    ok = den > 1e-3
    out[ok] = num[ok] / den[ok]
    return out, den


def dicom_affine(orientation: Sequence[float], position: Sequence[float], pixel_spacing: Sequence[float],
                 slice_step: float | Sequence[float]) -> np.ndarray:
    """The RAS affine of a DICOM image stack, array axes (i = column, j = row, k = slice).

    orientation: ImageOrientationPatient (row direction, then column direction, LPS); position: the
    ImagePositionPatient of the first slice; pixel_spacing: PixelSpacing (between rows, between
    columns); slice_step: mm between consecutive slices along the slice normal (row x column), or
    the step vector (LPS) itself, which keeps a gantry tilt.
    """
    iop = np.asarray([float(v) for v in orientation], np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    dr, dc = (float(v) for v in pixel_spacing)
    step = np.asarray(slice_step, np.float64)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = np.cross(row_dir, col_dir) * float(step) if step.ndim == 0 else step
    lps[:3, 3] = [float(v) for v in position]
    return LPS_TO_RAS @ lps
