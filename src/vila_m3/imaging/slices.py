"""The 2D slice the model sees: orientation, windowing, rendering.

Orientation. A volume is first viewed in **RAS** voxel order without resampling (the same
permutation and flips as ``SimpleITK.DICOMOrient(image, "RAS")``, computed from the direction
cosines and applied as a numpy view, so nothing is copied): in ``ras[s, a, r]`` the index ``r``
runs from the patient's left to right, ``a`` from posterior to anterior, ``s`` from inferior to
superior. The slice ``index`` of each axis counts along that RAS axis:

======== ======================= =========================================================
axis     index 0 is ...          rendered image (rows × columns)
======== ======================= =========================================================
axial    the most inferior slice anterior at the top, the patient's right on the image left
coronal  the most posterior      superior at the top, the patient's right on the image left
sagittal the patient's far left  superior at the top, anterior on the image left
======== ======================= =========================================================

This is the radiological display convention. For the axial axis it equals the reference
pipeline of the expert protocol (§7: orient to RAS, take the slice, transpose, rotate 180°).
Pixels are voxels: there is no resampling, so an anisotropic voxel gives a stretched picture,
and a labelmap on the same grid lands pixel-for-pixel on the image (:func:`extract_slice` is the
one path for both).

A 2D volume (``Volume.is_2d``: an X-ray or photo) has one slice, index 0, and is rendered as
stored (row 0 at the top), whatever the axis: projection images are displayed as stored.
"""

from __future__ import annotations

import functools
import itertools
from typing import Literal

import numpy as np
from PIL import Image

from vila_m3.imaging.volume import Geometry, Volume

__all__ = [
    "AXES",
    "Axis",
    "ras_view",
    "slice_index_count",
    "slice_index_at",
    "extract_slice",
    "window_ct",
    "minmax_uint8",
    "to_rgb",
    "normalize_modality",
    "render_gray",
    "render_slice",
    "render_slice_gray",
    "render_label_slice",
]

Axis = Literal["axial", "coronal", "sagittal"]
AXES: tuple[str, ...] = ("axial", "coronal", "sagittal")

#: position of each display axis in a RAS view ``ras[s, a, r]``
_RAS_POS = {"axial": 0, "coronal": 1, "sagittal": 2}
#: LPS sign of the RAS axes R, A, S (R = -L, A = -P, S = +S), by LPS physical axis
_RAS_SIGN = np.array([-1.0, -1.0, 1.0])

#: modality names accepted by :func:`render_slice`, → rendering family
_MODALITY = {
    "CT": "CT",
    "MR": "MRI", "MRI": "MRI",
    "CXR": "CXR", "CR": "CXR", "DX": "CXR", "XR": "CXR", "CR/DX": "CXR",
}


def _ras_permutation(direction: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """For each LPS physical axis p, the voxel index axis closest to it, and whether it runs backwards.

    Returns (axis_of, flip): ``axis_of[p]`` is the index axis (0 = i/x, 1 = j/y, 2 = k/z) that
    best aligns with physical axis p; ``flip[p]`` is True when that index axis increases
    opposite to RAS axis p. The permutation maximises the total |cosine| (robust for oblique
    acquisitions, where a per-axis arg-max could pick one physical axis twice).
    """
    absd = np.abs(direction)
    best = max(itertools.permutations(range(3)), key=lambda perm: sum(absd[p, perm[p]] for p in range(3)))
    flip = np.array([np.sign(direction[p, best[p]]) != _RAS_SIGN[p] for p in range(3)])
    return best, flip


def ras_view(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    """View a (z, y, x) array in RAS voxel order, shape (n_s, n_a, n_r); no copy, no resampling.

    ``ras[s, a, r]``: r increases towards the patient's right, a towards anterior, s towards
    superior (nearest axis-aligned reorientation, like ``sitk.DICOMOrient(image, "RAS")``).
    """
    if array.shape != tuple(geometry.shape[::-1]):
        raise ValueError(f"array shape (z, y, x) {array.shape} does not match geometry shape {geometry.shape}")
    axis_of, flip = _ras_permutation(geometry.direction_matrix)
    # numpy axis of index axis c is 2 - c; RAS view axes are ordered (S, A, R) = physical (2, 1, 0)
    view = np.transpose(array, [2 - axis_of[p] for p in (2, 1, 0)])
    flips = tuple(slice(None, None, -1) if flip[p] else slice(None) for p in (2, 1, 0))
    return view[flips]


def _check_axis(axis: str) -> int:
    if axis not in _RAS_POS:
        raise ValueError(f"axis must be one of {', '.join(AXES)}; got {axis!r}")
    return _RAS_POS[axis]


def slice_index_count(volume: Volume, axis: str) -> int:
    """Number of slices along ``axis`` ("axial" / "coronal" / "sagittal"); 1 for a 2D volume."""
    pos = _check_axis(axis)
    if volume.is_2d:
        return 1
    return ras_view(volume.array, volume.geometry).shape[pos]


def slice_index_at(volume: Volume, axis: str, point_lps: tuple[float, float, float]) -> int:
    """Slice index along ``axis`` nearest a physical point (mm, LPS), clipped to the valid range.

    3D Slicer reports positions in RAS: pass ``(-r, -a, s)``.
    """
    pos = _check_axis(axis)
    if volume.is_2d:
        return 0
    axis_of, flip = _ras_permutation(volume.geometry.direction_matrix)
    physical = 2 - pos  # view position 0/1/2 is physical S/A/R = 2/1/0
    c = axis_of[physical]
    idx = float(volume.geometry.physical_to_index(point_lps)[c])
    n = volume.geometry.shape[c]
    if flip[physical]:
        idx = n - 1 - idx
    return int(np.clip(np.rint(idx), 0, n - 1))


def extract_slice(volume: Volume, axis: str, index: int) -> np.ndarray:
    """The 2D slice in display orientation (see the module docstring), shape (rows, columns).

    Args:
        volume: the image or labelmap volume.
        axis: "axial", "coronal" or "sagittal".
        index: slice number along the RAS axis (0 = inferior / posterior / left).

    Returns:
        A new contiguous (rows, columns) array of the volume's dtype (only the slice is copied).

    Raises:
        ValueError: unknown axis, or index outside ``0 .. slice_index_count - 1``.
    """
    pos = _check_axis(axis)
    count = slice_index_count(volume, axis)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
        raise ValueError(f"{axis} slice index must be an integer in 0..{count - 1}; got {index!r}")
    if volume.is_2d:
        return np.array(volume.array[0])
    ras = ras_view(volume.array, volume.geometry)
    if pos == 0:  # axial: rows anterior→posterior, columns right→left
        plane = ras[index, ::-1, ::-1]
    elif pos == 1:  # coronal: rows superior→inferior, columns right→left
        plane = ras[::-1, index, ::-1]
    else:  # sagittal: rows superior→inferior, columns anterior→posterior
        plane = ras[::-1, ::-1, index]
    return np.ascontiguousarray(plane)


def window_ct(slice_hu: np.ndarray, center: float = 50.0, width: float = 400.0) -> np.ndarray:
    """CT window: HU in [center - width/2, center + width/2] → 0..255 linearly, clipped, truncated.

    Truncation (not rounding) matches the reference rendering the model was trained on
    (a 0..255 float scale cast to uint8). With the defaults −150 HU → 0, 50 HU → 127
    (127.5 truncated), 250 HU → 255. Any shape; returns uint8 of the same shape. NaN → 0.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    values = np.asarray(slice_hu)
    if values.dtype in _LUT_DTYPES:  # 8/16-bit integers (CT in HU): the same formula, tabulated per value
        table = _window_table(values.dtype.str, center, width)
        return table.take(values.view(_LUT_DTYPES[values.dtype]))
    return _window(values, center, width)


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    low = center - width / 2.0
    scaled = (np.asarray(values, dtype=np.float64) - low) * 255.0 / width
    return np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 255.0).astype(np.uint8)


#: integer types :func:`window_ct` looks up in a table, → the unsigned type whose view indexes it
_LUT_DTYPES = {np.dtype(t): np.dtype(u) for t, u in
               ((np.int8, np.uint8), (np.uint8, np.uint8), (np.int16, np.uint16), (np.uint16, np.uint16))}


@functools.lru_cache(maxsize=16)
def _window_table(dtype: str, center: float, width: float) -> np.ndarray:
    """``_window`` of every value of an 8/16-bit integer type, indexed by the value's unsigned bit
    pattern (so ``table.take(array.view(unsigned))`` equals ``_window(array)`` element for element)."""
    unsigned = _LUT_DTYPES[np.dtype(dtype)]
    every = np.arange(np.iinfo(unsigned).max + 1, dtype=unsigned).view(np.dtype(dtype))
    return _window(every, center, width)


def finite_range(values: np.ndarray) -> tuple[float, float] | None:
    """(min, max) over the finite values of an array, or None when it has none."""
    arr = np.asarray(values)
    finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
    return (float(finite.min()), float(finite.max())) if finite.size else None


def minmax_uint8(slice_: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Min-max scale to 0..255 uint8 (truncated, as the reference); a constant (or all-NaN) image gives zeros.

    NaN → 0. ``value_range`` is the (min, max) to map to 0 and 255, e.g. those of the whole volume
    (the reference scales an MRI volume as a whole); default: those of the finite values of ``slice_``.
    """
    arr = np.asarray(slice_, dtype=np.float64)
    value_range = value_range or finite_range(arr)
    if value_range is None:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = value_range
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr - lo) * 255.0 / (hi - lo)
    return np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 255.0).astype(np.uint8)


def to_rgb(gray: np.ndarray) -> np.ndarray:
    """Replicate a (H, W) uint8 grey image to (H, W, 3) uint8."""
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"to_rgb needs a (H, W) uint8 image, got shape {gray.shape} dtype {gray.dtype}")
    return np.repeat(gray[:, :, np.newaxis], 3, axis=2)


def normalize_modality(modality: str | None) -> str:
    """Map a modality name ("CT"; "MR"/"MRI"; "CXR"/"CR"/"DX"/"XR") to "CT", "MRI" or "CXR"."""
    if modality is None:
        raise ValueError("modality not known (the file does not say); pass one of CT, MRI, CXR")
    key = modality.strip().upper()
    if key not in _MODALITY:
        raise ValueError(
            f"unknown modality {modality!r}; expected one of CT, MR/MRI, CXR/CR/DX (CT window 50/400, "
            "MRI min-max, CXR as is)"
        )
    return _MODALITY[key]


def render_gray(plane: np.ndarray, modality: str, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Intensity rendering of a display-oriented 2D slice → (H, W) uint8.

    CT: window 50/400 HU. MRI: min-max over ``value_range`` (the whole volume's, when given).
    CXR: uint8 passes through unchanged, other types min-max.
    """
    family = normalize_modality(modality)
    if family == "CT":
        return window_ct(plane)
    if family == "CXR" and plane.dtype == np.uint8:
        return plane
    return minmax_uint8(plane, value_range)


def render_slice(volume: Volume, axis: str, index: int, modality: str | None = None) -> Image.Image:
    """The RGB picture of one slice, as the model sees it.

    Args:
        volume: image volume (CT in HU).
        axis, index: see :func:`extract_slice`.
        modality: "CT", "MRI"/"MR" or "CXR"/"CR"/"DX"; default ``volume.modality``.

    Returns:
        PIL RGB image, size (columns, rows) of the display-oriented slice; grey replicated to 3 channels.
    """
    gray = render_slice_gray(volume, axis, index, modality)
    return Image.fromarray(gray, mode="L").convert("RGB")  # grey replicated to R, G and B, as to_rgb does


def render_slice_gray(volume: Volume, axis: str, index: int, modality: str | None = None) -> np.ndarray:
    """The (rows, columns) uint8 grey of :func:`render_slice` (the picture before RGB).

    The whole volume's range is only looked at where the rendering uses it (MRI, non-8-bit CXR);
    a CT window needs nothing but the slice.
    """
    plane = extract_slice(volume, axis, index)
    family = normalize_modality(modality or volume.modality)
    needs_range = family == "MRI" or (family == "CXR" and plane.dtype != np.uint8)
    return render_gray(plane, family, volume_range(volume) if needs_range else None)


def volume_range(volume: Volume) -> tuple[float, float] | None:
    """The (min, max) the reference scales a 3D volume's intensities by (MRI: the whole volume); None for 2D.

    Scanned once per volume (:meth:`Volume.derived`).
    """
    return None if volume.is_2d else volume.derived("finite_range", finite_range)


def render_label_slice(labels: Volume, axis: str, index: int) -> np.ndarray:
    """The labelmap slice matching :func:`render_slice` pixel-for-pixel, (rows, columns) ids.

    ``labels`` must share the image's geometry (e.g. made by ``labelmap_like``); the same
    orientation path as the image is used.
    """
    if not np.issubdtype(labels.array.dtype, np.integer) and labels.array.dtype != bool:
        raise ValueError(f"labels must have an integer dtype, got {labels.array.dtype}")
    return extract_slice(labels, axis, index)
