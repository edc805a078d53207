"""Nearest-neighbour resampling of a label grid onto another grid with the same axes, in one gather.

An expert's labels come back on the model's grid (e.g. VISTA3D's 1.5 mm resampling of the CT) and
must be put on the input's grid. MONAI's ``Invertd`` does that with ``SpatialResample``: an
``affine_grid`` of three float64 coordinates per *target* voxel (1.2 GB for a 512 × 512 × 200 CT),
then ``grid_sample``. When the two grids share their axes (the target-index → source-index map scales
and shifts each axis on its own, which is what ``Spacingd`` without ``diagonal`` gives), the source
index along an axis depends on that axis alone: three index vectors and one gather do the same job.

The index vectors are computed by the very operations MONAI runs — ``to_norm_affine``, the reversed
indexing of MONAI's ``AffineTransform``, ``torch.nn.functional.affine_grid`` and ``grid_sample``
(``mode="nearest"``, ``align_corners=False``, the recorded padding and dtype) — on one-voxel-thick
grids, one per axis, so samples that fall exactly between two voxels (common: 0.8 mm resampled to
4 mm puts every fifth sample on a midpoint) round the way MONAI rounds them. For an oblique grid the
affine also carries round-off terms (~1e-17) for the other axes, which MONAI adds and which can decide
a midpoint sample: the planes with midpoint samples on such an axis (:func:`tie_planes`, a few per
volume at most) are recomputed with MONAI's full arithmetic for that plane. The result equals MONAI's
voxel for voxel (``tests/test_expert_latency_path.py``). Works on any torch device (CPU or GPU).

The way in (the CT onto the model's coarser grid, trilinear) has the same per-axis shape:
:func:`linear_to_grid_zyx` interpolates one axis at a time straight from the (z, y, x) pixel array
(int16 for a CT), reading only the input rows the interpolation touches (2 of every 5 along x and y
for 0.8 → 4 mm) instead of MONAI's full float64 copy of the volume. Separable interpolation sums the
same eight weighted voxels in another order: the float64 result differs from ``grid_sample``'s by
round-off (≤ 1e-12 relative), below float32's resolution, so the float32 image MONAI's ``Spacingd``
returns is the same but for a rare last-bit rounding (``tests/test_expert_latency_path.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.networks.utils import to_norm_affine

__all__ = ["axis_aligned", "linear_to_grid_zyx", "nearest_indices", "nearest_to_grid_zyx", "tie_planes"]

#: Target planes (z) interpolated together by :func:`linear_to_grid_zyx`.
_LINEAR_PLANES = 8
#: Largest off-diagonal entry (relative to the largest diagonal one) for an index map to count as per-axis.
_AXIS_ALIGNED_RTOL = 1e-9


def axis_aligned(xform: np.ndarray) -> bool:
    """Whether the (4, 4) target-index → source-index map scales and shifts each axis on its own."""
    linear = np.asarray(xform, dtype=float)[:3, :3]
    diagonal = np.abs(np.diag(linear))
    off = np.abs(linear - np.diag(np.diag(linear)))
    return bool(np.all(diagonal > 0) and np.all(off <= _AXIS_ALIGNED_RTOL * diagonal.max()))


def nearest_indices(
    xform: np.ndarray,
    source_shape: Sequence[int],
    target_shape: Sequence[int],
    padding: str = "border",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """For each axis, the source voxel index MONAI's nearest-neighbour ``SpatialResample`` reads for every
    target index on it; -1 where the sample is outside the source grid (``padding="zeros"``).

    Args:
        xform: (4, 4) target voxel index → continuous source voxel index (``solve(source_affine,
            target_affine)``, as MONAI computes it); must be :func:`axis_aligned`.
        source_shape: (X', Y', Z') voxels of the grid sampled from.
        target_shape: (X, Y, Z) voxels of the grid sampled onto.
        padding: ``"border"`` (clamped to the edge voxel) or ``"zeros"``, as recorded by the resampling.
        dtype: the resampling's computation dtype (MONAI's ``Spacingd`` records float64).
        device: where the computation and the returned int64 vectors are.

    Raises:
        ValueError: the map is not axis-aligned, or an unknown padding mode.
    """
    if padding not in ("border", "zeros"):
        raise ValueError(f"padding must be 'border' or 'zeros', got {padding!r}")
    if not axis_aligned(xform):
        raise ValueError("the index map rotates or shears the axes; only per-axis scaling and shifts are supported")
    source_shape = [int(n) for n in source_shape]
    target_shape = [int(n) for n in target_shape]
    # as MONAI's AffineTransform(normalized=False, reverse_indexing=True, align_corners=False)
    theta = _normalized_theta(xform, source_shape, target_shape, dtype, device)
    indices = []
    for axis in range(3):
        thin_target = [n if a == axis else 1 for a, n in enumerate(target_shape)]
        thin_source = [n if a == axis else 1 for a, n in enumerate(source_shape)]
        grid = torch.nn.functional.affine_grid(theta, size=[1, 1, *thin_target], align_corners=False)
        component = 2 - axis  # grid components are (W, H, D): reversed tensor axes
        thin_grid = torch.zeros_like(grid)
        thin_grid[..., component] = grid[..., component]  # the other axes' terms: 0 here (see module doc)
        positions = torch.arange(1, thin_source[axis] + 1, dtype=dtype, device=theta.device)
        source = positions.reshape([1, 1, *thin_source])  # voxel i holds i + 1; 0 is "outside"
        sampled = torch.nn.functional.grid_sample(source, thin_grid, mode="nearest", padding_mode=padding,
                                                  align_corners=False)
        indices.append(sampled.reshape(-1).round().to(torch.int64) - 1)
    return indices


def _gather(source: torch.Tensor, iz: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
    """``source[iz][:, iy][:, :, ix]``, smallest intermediate first, as a new contiguous tensor.

    On the CPU with numpy's ``take`` (torch's ``index_select`` along the last axis of a uint8 tensor
    runs element by element: 9 s instead of 0.1 s for a 512 × 512 × 200 labelmap); elsewhere with torch.
    """
    if source.device.type == "cpu":
        array = source.numpy()
        array = np.take(np.take(array, iz.numpy(), axis=0), iy.numpy(), axis=1)
        return torch.from_numpy(np.take(array, ix.numpy(), axis=2))
    return source[iz][:, iy][:, :, ix].contiguous()


def _linspace_from_neg_one(n: int, like: torch.Tensor) -> torch.Tensor:
    """The base coordinates of ``affine_grid(align_corners=False)`` along an axis of ``n`` voxels."""
    if n <= 1:
        return torch.zeros(1, dtype=like.dtype, device=like.device)
    return torch.linspace(-1, 1, n, dtype=like.dtype, device=like.device) * (n - 1) / n


def _normalized_theta(xform: np.ndarray, source_shape: Sequence[int], target_shape: Sequence[int],
                      dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """MONAI's (1, 3, 4) ``affine_grid`` matrix for ``xform`` (normalised, axes reversed)."""
    theta = torch.as_tensor(np.asarray(xform, dtype=np.float64), device=device).to(dtype)[None]
    theta = to_norm_affine(theta, [int(n) for n in source_shape], [int(n) for n in target_shape], align_corners=False)
    return theta[:, [2, 1, 0]][:, :, [2, 1, 0, 3]][:, :3]


def tie_planes(xform: np.ndarray, target_shape: Sequence[int]) -> list[tuple[int, int]]:
    """(axis, target index) of the planes where MONAI's rounding may depend on the other axes: the axis's
    row of ``xform`` has (round-off) terms for the other axes, and its samples fall within 1e-6 voxel of
    a midpoint between two source voxels. An axis-aligned row (exact zeros) has none."""
    xform = np.asarray(xform, dtype=np.float64)
    planes = []
    for axis, n in enumerate(target_shape):
        if not np.any(np.delete(xform[axis, :3], axis)):
            continue
        coords = xform[axis, axis] * np.arange(int(n)) + xform[axis, 3]
        for index in np.flatnonzero(np.abs(np.abs(coords - np.floor(coords)) - 0.5) < 1e-6):
            planes.append((axis, int(index)))
    return planes


def _plane_as_monai(values: torch.Tensor, xform: np.ndarray, target_shape: Sequence[int], axis: int, index: int,
                    padding: str, dtype: torch.dtype) -> torch.Tensor:
    """One target plane (``axis`` = ``index``) exactly as MONAI's full ``affine_grid`` + ``grid_sample``
    computes it (the same base coordinates, the same ``bmm`` with the full matrix), in (Z, Y, X) order
    with a length-1 ``axis``."""
    theta = _normalized_theta(xform, values.shape, target_shape, dtype, values.device)
    bases = [_linspace_from_neg_one(int(n), theta) for n in target_shape]
    bases[axis] = bases[axis][index:index + 1]
    dx, dy, dz = (len(b) for b in bases)
    base = torch.empty((1, dx, dy, dz, 4), dtype=theta.dtype, device=theta.device)
    base[..., 0] = bases[2].view(1, 1, 1, -1)  # W: the last tensor axis
    base[..., 1] = bases[1].view(1, 1, -1, 1)
    base[..., 2] = bases[0].view(1, -1, 1, 1)
    base[..., 3] = 1
    grid = base.view(1, -1, 4).bmm(theta.transpose(1, 2)).view(1, dx, dy, dz, 3)
    source = values.to(dtype).reshape(1, 1, *values.shape)
    plane = torch.nn.functional.grid_sample(source, grid, mode="nearest", padding_mode=padding, align_corners=False)
    return plane[0, 0].permute(2, 1, 0)


def nearest_to_grid_zyx(
    values: torch.Tensor,
    xform: np.ndarray,
    target_shape: Sequence[int],
    padding: str = "border",
    fill: int = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``values`` (X', Y', Z') resampled (nearest neighbour, as MONAI's ``SpatialResample``) onto a
    (X, Y, Z) target grid, returned in (Z, Y, X) order (the array order of
    :class:`~vila_m3.imaging.Volume`), contiguous, same dtype and device as ``values``.

    Args:
        values: the source grid's voxels (labels: an integer dtype keeps the result small).
        xform: (4, 4) map from target voxel index to continuous source index; must be :func:`axis_aligned`.
        target_shape: (X, Y, Z) voxels of the target grid.
        padding: ``"border"`` (the nearest edge voxel) or ``"zeros"`` (``fill``) outside the source grid.
        fill: value for target voxels outside the source grid with ``padding="zeros"``.
        dtype: the computation dtype of the coordinates (see :func:`nearest_indices`).

    Raises:
        ValueError: not a 3D grid, the map is not axis-aligned, or an unknown padding mode.
    """
    if values.ndim != 3:
        raise ValueError(f"values must be a (X, Y, Z) grid, got shape {tuple(values.shape)}")
    values = values.as_tensor() if hasattr(values, "as_tensor") else values  # no MetaTensor bookkeeping
    ix, iy, iz = nearest_indices(xform, values.shape, target_shape, padding, dtype, values.device)
    source = values.permute(2, 1, 0)  # (Z', Y', X') view
    if padding == "zeros":  # one voxel of `fill` after the end of every axis; "outside" (-1) reads it
        padded = torch.full([n + 1 for n in source.shape], fill, dtype=values.dtype, device=values.device)
        padded[: source.shape[0], : source.shape[1], : source.shape[2]] = source
        source = padded
        ix, iy, iz = (torch.where(i < 0, n, i) for i, n in zip((ix, iy, iz), values.shape, strict=True))
    out = _gather(source, iz, iy, ix)
    for axis, index in tie_planes(xform, target_shape):  # midpoint samples: MONAI's own arithmetic
        plane = _plane_as_monai(values, xform, target_shape, axis, index, padding, dtype)
        if padding == "zeros":
            plane = torch.nan_to_num(plane, nan=float(fill))
        selector = [slice(None)] * 3
        selector[2 - axis] = slice(index, index + 1)
        out[tuple(selector)] = plane.round().to(out.dtype)
    return out


def _linear_axis(scale: float, shift: float, n_target: int, n_source: int,
                 padding: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis: for every target index, the two source indices and their weights of
    ``grid_sample``'s linear interpolation (``align_corners=False``) at ``scale * i + shift``.

    ``border`` clamps the coordinate to the grid; ``zeros`` gives a neighbour outside the grid weight 0.
    Indices are clamped into the grid either way, so they can always be read.
    """
    coords = scale * np.arange(n_target, dtype=np.float64) + shift
    if padding == "border":
        coords = np.clip(coords, 0.0, n_source - 1)
    low = np.floor(coords)
    w_high = coords - low
    w_low = (low + 1) - coords
    low = low.astype(np.int64)
    high = low + 1
    if padding == "zeros":
        w_low = np.where((low >= 0) & (low < n_source), w_low, 0.0)
    w_high = np.where((high >= 0) & (high < n_source), w_high, 0.0)
    return np.clip(low, 0, n_source - 1), np.clip(high, 0, n_source - 1), w_low, w_high


def linear_to_grid_zyx(pixels: np.ndarray, xform: np.ndarray, target_shape: Sequence[int],
                       padding: str = "border") -> np.ndarray:
    """A (z, y, x) pixel array resampled trilinearly (as MONAI's ``SpatialResample`` with
    ``mode="bilinear"``, ``align_corners=False``, float64) onto a (X, Y, Z) target grid, returned as a
    float64 (Z, Y, X) array.

    One axis at a time: the y rows the interpolation needs are gathered first (no conversion), then x,
    y and z are interpolated in turn on ever smaller float64 arrays; only the touched input voxels are
    read once.

    Args:
        pixels: (z, y, x) source voxels, any real dtype (a CT's int16 stays int16 until interpolated).
        xform: (4, 4) map from target voxel index (x, y, z) to continuous source index; must be
            :func:`axis_aligned`.
        target_shape: (X, Y, Z) voxels of the target grid.
        padding: ``"border"`` or ``"zeros"``, as ``grid_sample``'s ``padding_mode``.

    Raises:
        ValueError: not a 3D array, the map is not axis-aligned, or an unknown padding mode.
    """
    if padding not in ("border", "zeros"):
        raise ValueError(f"padding must be 'border' or 'zeros', got {padding!r}")
    if not axis_aligned(xform):
        raise ValueError("the index map rotates or shears the axes; only per-axis scaling and shifts are supported")
    pixels = np.asarray(pixels)
    if pixels.ndim != 3:
        raise ValueError(f"pixels must be a (z, y, x) array, got shape {pixels.shape}")
    xform = np.asarray(xform, dtype=np.float64)
    source_xyz = pixels.shape[::-1]
    (x0, x1, wx0, wx1), (y0, y1, wy0, wy1), (z0, z1, wz0, wz1) = (
        _linear_axis(xform[a, a], xform[a, 3], int(target_shape[a]), source_xyz[a], padding) for a in range(3)
    )
    rows, inverse = np.unique(np.concatenate([y0, y1]), return_inverse=True)
    y0, y1 = inverse[: len(y0)], inverse[len(y0):]
    out = np.empty((len(z0), len(y0), len(x0)), dtype=np.float64)
    # a few target planes at a time: every temporary stays a few MB (in cache, no fresh pages per call)
    for start in range(0, len(z0), _LINEAR_PLANES):
        stop = min(start + _LINEAR_PLANES, len(z0))
        planes, inverse = np.unique(np.concatenate([z0[start:stop], z1[start:stop]]), return_inverse=True)
        k0, k1 = inverse[: stop - start], inverse[stop - start:]
        sub = np.take(np.take(pixels, planes, axis=0), rows, axis=1)  # touched (z, y) rows, source dtype
        # np.take, not fancy indexing: 3x faster along the last axis
        part = np.take(sub, x0, axis=2) * wx0 + np.take(sub, x1, axis=2) * wx1  # (z'', y'', X)
        part = np.take(part, y0, axis=1) * wy0[:, None] + np.take(part, y1, axis=1) * wy1[:, None]  # (z'', Y, X)
        out[start:stop] = (np.take(part, k0, axis=0) * wz0[start:stop, None, None]
                           + np.take(part, k1, axis=0) * wz1[start:stop, None, None])
    return out
