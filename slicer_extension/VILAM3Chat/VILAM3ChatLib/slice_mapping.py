"""From a 3D Slicer slice view to the slice the server renders: (axis name, slice index).

The server counts slices along the volume's **RAS-reoriented** axes (nearest axis-aligned
reorientation, no resampling): axial index 0 is the most inferior slice, coronal 0 the most
posterior, sagittal 0 the patient's far left. It finds, for each patient axis R, A, S, the voxel
index axis (i, j or k) closest to it, choosing the assignment with the largest total |cosine|
(so oblique acquisitions get a consistent one), and counts backwards when that index axis runs
against the patient axis. This module repeats that rule with Slicer's matrices:

- the view's slice-to-RAS matrix (``vtkMRMLSliceNode.GetSliceToRAS()``): its third column is the
  view's normal, which picks the axis (the closest of R, A, S); its fourth column is the centre of
  the view, the point whose slice is sent;
- the volume's IJK-to-RAS matrix (``GetIJKToRASMatrix``, including any parent linear transform) and
  its dimensions (i, j, k), as ``GetImageData().GetDimensions()`` gives them.

Pure Python (lists of lists); numpy is not needed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["SlicePosition", "grids_match", "ras_axis_assignment", "slice_position", "view_axis"]

Matrix = Sequence[Sequence[float]]

#: axis names by the patient axis along which their slices are stacked (R = 0, A = 1, S = 2)
AXIS_BY_RAS = {0: "sagittal", 1: "coronal", 2: "axial"}
RAS_BY_AXIS = {name: ras for ras, name in AXIS_BY_RAS.items()}


@dataclass(frozen=True)
class SlicePosition:
    """The slice a view shows, as the server counts it.

    Attributes:
        axis: ``axial``, ``coronal`` or ``sagittal``.
        index: slice index along the RAS-reoriented axis (0 = inferior / posterior / left).
        count: number of slices along that axis.
        offset_voxels: distance from the view's centre to the chosen slice's centre, in voxels
            (0 when the view is exactly on a slice; up to 0.5 otherwise, more when clipped).
    """

    axis: str
    index: int
    count: int
    offset_voxels: float


def _check_matrix(matrix: Matrix, name: str) -> list[list[float]]:
    rows = [[float(value) for value in row] for row in matrix]
    if len(rows) != 4 or any(len(row) != 4 for row in rows):
        raise ValueError(f"{name} must be a 4x4 matrix")
    if not all(math.isfinite(value) for row in rows for value in row):
        raise ValueError(f"{name} has values that are not finite numbers")
    return rows


def _solve3(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """x with matrix @ x = vector, for a 3x3 matrix (Cramer's rule)."""

    def det(m: list[list[float]]) -> float:
        return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
                - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))

    full = det(matrix)
    if abs(full) < 1e-12:
        raise ValueError("the volume's IJK-to-RAS matrix is singular")
    result = []
    for column in range(3):
        replaced = [[vector[r] if c == column else matrix[r][c] for c in range(3)] for r in range(3)]
        result.append(det(replaced) / full)
    return result


def view_axis(slice_to_ras: Matrix) -> str:
    """The axis a view shows: the patient axis (R, A, S) closest to its normal."""
    m = _check_matrix(slice_to_ras, "slice-to-RAS")
    normal = [abs(m[row][2]) for row in range(3)]
    if max(normal) == 0.0:
        raise ValueError("the slice view has no normal (zero third column)")
    return AXIS_BY_RAS[normal.index(max(normal))]


def ras_axis_assignment(ijk_to_ras: Matrix) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For each patient axis p (R, A, S): the voxel index axis that counts along it, and whether
    it counts backwards. The server's rule: the permutation with the largest total |cosine|, the
    first one (in ``itertools.permutations`` order) among equals."""
    m = _check_matrix(ijk_to_ras, "IJK-to-RAS")
    cosines = [[0.0] * 3 for _ in range(3)]
    for column in range(3):
        length = math.sqrt(sum(m[row][column] ** 2 for row in range(3)))
        if length == 0.0:
            raise ValueError("the volume's IJK-to-RAS matrix has a zero column")
        for row in range(3):
            cosines[row][column] = m[row][column] / length
    best: tuple[int, ...] | None = None
    best_score = -1.0
    for perm in itertools.permutations(range(3)):
        score = sum(abs(cosines[p][perm[p]]) for p in range(3))
        if score > best_score:
            best, best_score = perm, score
    assert best is not None
    flips = tuple(not cosines[p][best[p]] > 0 for p in range(3))  # the server flips a zero cosine too
    return (best[0], best[1], best[2]), (flips[0], flips[1], flips[2])


def slice_position(slice_to_ras: Matrix, ijk_to_ras: Matrix, dimensions: Sequence[int]) -> SlicePosition:
    """The (axis, index) of the slice at the centre of a view, in the server's counting.

    Args:
        slice_to_ras: the view's 4x4 slice-to-RAS matrix.
        ijk_to_ras: the volume's 4x4 IJK-to-RAS matrix (mm, RAS).
        dimensions: the volume's size along i, j, k (voxels).

    Returns:
        The nearest slice, clipped to the volume (a view outside the volume gets its first or last
        slice; ``offset_voxels`` says how far away it was).
    """
    view = _check_matrix(slice_to_ras, "slice-to-RAS")
    volume = _check_matrix(ijk_to_ras, "IJK-to-RAS")
    dims = [int(n) for n in dimensions]
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"volume dimensions must be 3 positive numbers, got {list(dimensions)}")
    axis = view_axis(view)
    patient_axis = RAS_BY_AXIS[axis]
    axis_of, flips = ras_axis_assignment(volume)
    index_axis = axis_of[patient_axis]

    centre = [view[row][3] - volume[row][3] for row in range(3)]
    ijk = _solve3([row[:3] for row in volume[:3]], centre)
    count = dims[index_axis]
    continuous = ijk[index_axis]
    if flips[patient_axis]:
        continuous = count - 1 - continuous
    index = min(max(round(continuous), 0), count - 1)
    return SlicePosition(axis, int(index), count, abs(continuous - index))


def grids_match(ijk_to_ras_a: Matrix, dimensions_a: Sequence[int], ijk_to_ras_b: Matrix,
                dimensions_b: Sequence[int], tolerance_mm: float = 1e-3) -> bool:
    """True when two voxel grids are the same: equal dimensions and IJK-to-RAS within ``tolerance_mm``."""
    if [int(n) for n in dimensions_a] != [int(n) for n in dimensions_b]:
        return False
    a = _check_matrix(ijk_to_ras_a, "IJK-to-RAS")
    b = _check_matrix(ijk_to_ras_b, "IJK-to-RAS")
    return all(abs(a[row][col] - b[row][col]) <= tolerance_mm for row in range(3) for col in range(4))
