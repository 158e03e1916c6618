"""The one geometry core of ctpm: a grid in world space and the operations on it.

Every part that moves an image between grids (preprocessing, evaluation, the functional dose
metrics, the synthetic world) calls this module; nothing else builds affines or resamples.

Conventions: a grid is a 4x4 affine (voxel index (i, j, k) -> world RAS mm as nibabel
writes it: x grows towards the patient's right) and a shape. A voxel *centre* has integer indices; the
voxel itself covers index +-0.5, so a grid's field of view reaches half a voxel beyond its
outermost centres.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
        m = self.affine
        object.__setattr__(self, "_axis_aligned", not (m[0, 1] or m[0, 2] or m[1, 0] or m[1, 2] or m[2, 0] or m[2, 1]))

    @classmethod
    def of(cls, obj) -> Grid:
        """The grid of anything with ``affine`` and ``shape`` (a Volume, a MetaTensor, a Grid)."""
        if isinstance(obj, Grid):
            return obj
        aff = obj.affine
        aff = aff.numpy() if hasattr(aff, "numpy") else aff
        return cls(np.asarray(aff, np.float64), tuple(obj.shape)[-3:])

    @classmethod
    def axis_aligned(cls, shape: Sequence[int], spacing: Sequence[float], origin: Sequence[float]) -> Grid:
        """world = origin + index * spacing (no rotation, no flip)."""
        a = np.diag([*[float(s) for s in spacing], 1.0])
        a[:3, 3] = [float(o) for o in origin]
        return cls(a, tuple(int(s) for s in shape))

    @classmethod
    def around(cls, lo: Sequence[float], hi: Sequence[float], spacing: float) -> Grid:
        """The axis-aligned grid of isotropic ``spacing`` whose first centre is ``lo`` and whose last
        centres reach ``hi`` (or just beyond)."""
        shape = tuple(int(np.ceil((hi[d] - lo[d]) / spacing)) + 1 for d in range(3))
        return cls.axis_aligned(shape, (spacing,) * 3, tuple(float(v) for v in lo))

    @property
    def is_axis_aligned(self) -> bool:
        """Each index axis runs along one world axis (a diagonal direction matrix; flips allowed)."""
        return self._axis_aligned  # type: ignore[attr-defined]

    @property
    def origin(self) -> np.ndarray:
        """World position (mm) of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

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

    def axes(self) -> list[np.ndarray]:
        """World coordinates of the voxel centres along each axis (axis-aligned grids only)."""
        self._require_axis_aligned("axes")
        return [self.affine[d, 3] + self.affine[d, d] * np.arange(self.shape[d]) for d in range(3)]

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable world coordinates X (I, 1, 1), Y (1, J, 1), Z (1, 1, K) of the voxel centres
        (axis-aligned grids only): shapes written as functions of (X, Y, Z) evaluate on the grid."""
        x, y, z = self.axes()
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def slices_within(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice]:
        """Index slices of the voxels whose centres lie in the world box [lo, hi] (axis-aligned grids
        only; empty slices when the box misses the grid)."""
        self._require_axis_aligned("slices_within")
        out = []
        for d, (a, b) in enumerate(zip(lo, hi)):
            o, s = float(self.affine[d, 3]), float(self.affine[d, d])
            u0, u1 = sorted(((float(a) - o) / s, (float(b) - o) / s))
            i0 = max(0, int(math.ceil(u0)))
            i1 = min(self.shape[d], int(math.floor(u1)) + 1)
            out.append(slice(i0, max(i0, i1)))
        return tuple(out)  # type: ignore[return-value]

    def flipped(self, flips: Sequence[bool]) -> Grid:
        """The grid that stores the same voxels with the flagged axes reversed (``array[::-1]`` along
        them), as scanners and converters store images in many orientations."""
        a = self.affine.copy()
        for d, f in enumerate(flips):
            if f:
                a[:3, 3] += a[:3, d] * (self.shape[d] - 1)
                a[:3, d] *= -1
        return Grid(a, self.shape)

    def contains(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) world points -> (N,) bool: inside the grid's field of view (within half a voxel of
        the outermost centres, the boundary included)."""
        return _inside(_index_rows(self, np.asarray(xyz, np.float64).reshape(-1, 3)), self.shape)

    def _require_axis_aligned(self, what: str) -> None:
        if not self._axis_aligned:  # type: ignore[attr-defined]
            raise ValueError(f"Grid.{what} needs an axis-aligned grid, not {self!r}")

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

    def crop(self, lo: Sequence[int], hi: Sequence[int]) -> Grid:
        """The sub-grid of indices lo <= ijk < hi."""
        lo = np.asarray(lo, int)
        a = self.affine.copy()
        a[:3, 3] = self.affine[:3, :3] @ lo + self.affine[:3, 3]
        g = object.__new__(Grid)  # same orientation: the checks of __post_init__ hold already
        object.__setattr__(g, "affine", a)
        object.__setattr__(g, "shape", tuple(int(v) for v in np.asarray(hi, int) - lo))
        object.__setattr__(g, "_axis_aligned", self._axis_aligned)  # type: ignore[attr-defined]
        return g

    def __getitem__(self, sl: tuple[slice, slice, slice]) -> Grid:
        """The sub-grid of ``array[sl]`` (three slices with step 1, as ``slices_within`` gives)."""
        if len(sl) != 3 or any(s.step not in (None, 1) for s in sl):
            raise ValueError("a sub-grid takes three slices with step 1")
        rng = [s.indices(n) for s, n in zip(sl, self.shape)]
        return self.crop([r[0] for r in rng], [max(r[0], r[1]) for r in rng])

    def same_as(self, other: Grid, atol: float = 1e-4) -> bool:
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


EDGES = ("zeros", "clamp")


def resample(array: np.ndarray, src: Grid, dst: Grid, *, order: int = 1, fill: float = 0.0,
             edge: str = "zeros") -> np.ndarray:
    """``array`` on ``src`` -> the same field on ``dst``, in world coordinates.

    order 1 is (tri)linear, 0 nearest. A leading channel axis is allowed ((C, I, J, K)).
    edge "zeros" (images): linear interpolation fades to 0 over the voxel beyond the outermost
    centres, and voxels of ``dst`` outside the field of view of ``src`` take ``fill``; "clamp"
    (fields defined everywhere): every voxel of ``dst`` takes the value of the nearest point of
    ``src``'s box of centres, and ``fill`` is not used.

    Linear interpolation between two axis-aligned grids (diagonal affines: no rotation, flips
    allowed) is three separable 1-D passes; anything else goes to MONAI's ``SpatialResample``. With
    "zeros", either runs only over the part of ``dst`` that the source's box covers, which is what
    makes putting a lung-sized map onto a 512 x 512 x N CT grid take a fraction of a second.
    """
    if edge not in EDGES:
        raise ValueError(f"edge must be one of {EDGES}, not {edge!r}")
    src, dst = Grid.of(src), Grid.of(dst)
    arr = np.asarray(array, np.float32)
    squeeze = arr.ndim == 3
    if squeeze:
        arr = arr[None]
    if tuple(arr.shape[1:]) != src.shape:
        raise ValueError(f"array of shape {arr.shape[1:]} is not on the source grid {src.shape}")
    if edge == "clamp":
        out = _interpolate(arr, src, dst, order, "border")
        return out[0] if squeeze else out
    out = np.full((arr.shape[0], *dst.shape), fill, np.float32)
    idx = dst.index(src.corners(edges=True))
    lo = np.maximum(np.floor(idx.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(idx.max(0)).astype(int) + 2, np.asarray(dst.shape))
    if np.all(hi > lo):
        sub = dst.crop(lo, hi)
        res = _interpolate(arr, src, sub, order, "zeros")
        if fill != 0.0:  # voxels the source does not cover take `fill` (the padding is 0)
            seen = footprint(src, sub)
            res[:, ~seen] = fill
        out[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = res
    return out[0] if squeeze else out


def _interpolate(arr: np.ndarray, src: Grid, dst: Grid, order: int, padding: str) -> np.ndarray:
    """(C, *src.shape) float32 -> (C, *dst.shape) at dst's voxel centres; padding as MONAI's
    ("zeros" or "border")."""
    if order == 1 and src.is_axis_aligned and dst.is_axis_aligned:
        return _separable_linear(arr, src, dst, clamp=padding == "border")
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    img = MetaTensor(torch.as_tensor(arr), affine=torch.as_tensor(src.affine))
    mode = "nearest" if order == 0 else "bilinear"
    return SpatialResample(mode=mode, padding_mode=padding, dtype=torch.float32)(
        img, dst_affine=torch.as_tensor(dst.affine), spatial_size=dst.shape).numpy()


def _separable_linear(arr: np.ndarray, src: Grid, dst: Grid, *, clamp: bool) -> np.ndarray:
    """Trilinear interpolation between axis-aligned grids as three 1-D passes (one gather and one
    blend per axis instead of a 3-D gather), as MONAI's bilinear resampling with padding "border"
    (``clamp``) or "zeros" (the field is 0 one voxel beyond its outermost centres)."""
    out = arr
    for d, ax in enumerate(dst.axes()):
        n = src.shape[d]
        u = (ax - src.affine[d, 3]) / src.affine[d, d]
        if clamp:
            u = np.clip(u, 0, n - 1)
        i0 = np.floor(u).astype(np.intp)
        if clamp:
            i0 = np.minimum(i0, max(n - 2, 0))
        shape = [1, 1, 1, 1]
        shape[d + 1] = -1
        w = (u - i0).astype(np.float32)
        w0, w1 = 1 - w, w
        i1 = i0 + 1
        if not clamp:  # neighbours beyond the field are 0
            w0 = np.where((i0 >= 0) & (i0 < n), w0, np.float32(0))
            w1 = np.where((i1 >= 0) & (i1 < n), w1, np.float32(0))
        i0, i1 = np.clip(i0, 0, n - 1), np.clip(i1, 0, n - 1)
        out = np.take(out, i0, axis=d + 1) * w0.reshape(shape) + np.take(out, i1, axis=d + 1) * w1.reshape(shape)
    return out


POINT_EDGES = ("voxel", "centre", "clamp")


def sample_at(array: np.ndarray, grid: Grid, xyz, *, order: int = 1, fill: float = 0.0,
              edge: str = "voxel") -> np.ndarray:
    """``array`` on ``grid`` at world points -> their values (scipy's ``map_coordinates``: order 1
    trilinear, 0 nearest).

    xyz: points (..., 3), or a tuple (X, Y, Z) of broadcastable coordinate arrays (``Grid.mesh`` of
    another grid: the values at its voxel centres); the values have the points' shape.
    edge "voxel": a point inside the grid's field of view (within half a voxel of the outermost
    centres, what the grid's voxels cover) takes the edge value there, a point further out ``fill``;
    "centre": only points between the outermost centres are interpolated, the others take ``fill``;
    "clamp": every point takes the value of the nearest point of the box of centres.
    """
    from scipy import ndimage as ndi

    if edge not in POINT_EDGES:
        raise ValueError(f"edge must be one of {POINT_EDGES}, not {edge!r}")
    grid = Grid.of(grid)
    arr = np.asarray(array)
    if arr.shape != grid.shape:
        raise ValueError(f"array of shape {arr.shape} is not on the grid {grid.shape}")
    if isinstance(xyz, tuple) and grid.is_axis_aligned:  # index each coordinate axis, then broadcast
        axes = [(np.asarray(c, np.float64) - grid.affine[d, 3]) / grid.affine[d, d] for d, c in enumerate(xyz)]
        ijk = np.stack(np.broadcast_arrays(*axes))
        shape = ijk.shape[1:]
        ijk = ijk.reshape(3, -1)
    else:
        pts = np.stack(np.broadcast_arrays(*xyz), axis=-1) if isinstance(xyz, tuple) else np.asarray(xyz, np.float64)
        shape = pts.shape[:-1]
        ijk = _index_rows(grid, pts.reshape(-1, 3))
    if edge == "clamp":
        values = ndi.map_coordinates(arr, ijk, order=order, mode="nearest")
    elif edge == "centre":
        values = ndi.map_coordinates(arr, ijk, order=order, mode="constant", cval=fill)
    else:
        inside = _inside(ijk, grid.shape)
        values = np.full(ijk.shape[1], fill, arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float32)
        if inside.any():
            values[inside] = ndi.map_coordinates(arr, ijk[:, inside], order=order, mode="nearest")
    return values.reshape(shape)


def _inside(ijk: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """(3, N) continuous indices -> (N,) within half a voxel of the outermost centres (inclusive)."""
    n = np.asarray(shape, np.float64)[:, None]
    return np.all((ijk >= -0.5) & (ijk <= n - 0.5), axis=0)


def _index_rows(grid: Grid, xyz: np.ndarray) -> np.ndarray:
    """(N, 3) world mm -> (3, N) continuous voxel indices (the layout ``map_coordinates`` takes);
    (x - origin) / spacing on axis-aligned grids (exact where the inverse affine would round)."""
    if not grid.is_axis_aligned:
        return np.ascontiguousarray(grid.index(xyz).T)
    out = np.empty((3, len(xyz)), np.float64)
    for d in range(3):
        np.subtract(xyz[:, d], grid.affine[d, 3], out=out[d])
        out[d] /= grid.affine[d, d]
    return out


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
