"""What a final labelmap says: structures per slice, tumour counts in 3D, and which slices to show.

Slices are counted as :mod:`vila_m3.imaging.slices` counts them (index along the RAS axis), so
index ``i`` here is the slice ``render_slice(volume, axis, i)`` draws.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

from vila_m3.imaging import Volume
from vila_m3.imaging.slices import ras_view

_AXIS_POSITION = {"axial": 0, "coronal": 1, "sagittal": 2}


def label_ids(labels: Volume) -> list[int]:
    """The label ids (not 0) present in a labelmap, ascending (one pass over the voxels)."""
    array = labels.array
    if array.dtype.kind in "ub":
        return [int(i) for i in np.flatnonzero(np.bincount(array.ravel().astype(np.intp, copy=False))) if i != 0]
    return [int(v) for v in np.unique(array) if int(v) != 0]


def slice_presence(labels: Volume, axis: str, ids: Iterable[int] | None = None) -> dict[int, np.ndarray]:
    """``{label id: (n_slices,) bool}``: on which slices along ``axis`` each label (not 0) appears.

    ``ids``: the labels to look for (default: every label present).
    """
    position = _AXIS_POSITION[axis]
    ras = ras_view(labels.array, labels.geometry)
    others = tuple(i for i in range(3) if i != position)
    ids = label_ids(labels) if ids is None else ids
    return {label_id: (ras == label_id).any(axis=others) for label_id in ids}


def any_present(presence: dict[int, np.ndarray], ids: Iterable[int], n_slices: int) -> np.ndarray:
    """(n_slices,) bool: slices where any of ``ids`` appears."""
    result = np.zeros(n_slices, dtype=bool)
    for label_id in ids:
        if label_id in presence:
            result |= presence[label_id]
    return result


def count_components(mask: np.ndarray, connectivity: int = 1) -> int:
    """Number of 3D connected components of a boolean (z, y, x) mask.

    Args:
        connectivity: 1 = face neighbours (6), 2 = also edges (18), 3 = also corners (26).
    """
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return int(ndimage.label(mask, structure=structure)[1])


def choose_slices(positive: np.ndarray, count: int, positive_fraction: float,
                  rng: np.random.Generator) -> list[tuple[int, bool]]:
    """``count`` distinct slices: a ``positive_fraction`` of them where ``positive`` is True, the rest where not.

    When one kind has too few slices the other fills in. Returns ``(index, positive)`` sorted by index.
    """
    positive = np.asarray(positive, dtype=bool)
    through, away = np.flatnonzero(positive), np.flatnonzero(~positive)
    count = min(count, positive.size)
    wanted = int(round(count * positive_fraction))
    n_through = min(len(through), wanted)
    n_away = min(len(away), count - n_through)
    n_through = min(len(through), count - n_away)
    chosen = [(int(i), True) for i in (rng.choice(through, n_through, replace=False) if n_through else [])]
    chosen += [(int(i), False) for i in (rng.choice(away, n_away, replace=False) if n_away else [])]
    return sorted(chosen)
