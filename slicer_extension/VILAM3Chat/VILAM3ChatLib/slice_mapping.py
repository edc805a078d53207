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
- the volume's own IJK-to-RAS matrix (``GetIJKToRASMatrix``: the image's frame, as the server has it)
  and its dimensions (i, j, k), as ``GetImageData().GetDimensions()`` gives them;
- the volume's parent transform to world (``GetMatrixTransformToWorld``), when it has one: the view
  is in world coordinates, so it is brought into the image's own frame first (the server names axes
  and counts slices in that frame, never in the transformed one).

A view that is not parallel to the server's slices (a rotated view, or an oblique acquisition shown
in patient axes) crosses several of them: :attr:`SlicePosition.oblique_degrees` says by how much,
and the panel says so instead of pretending the view is that slice.

Pure Python (lists of lists); numpy is not needed.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "OBLIQUE_TOLERANCE_DEGREES",
    "SlicePosition",
    "decode_grid",
    "encode_grid",
    "grid_axes_map",
    "grids_match",
    "ras_axis_assignment",
    "slice_centre",
    "slice_position",
    "view_axis",
]

Matrix = Sequence[Sequence[float]]

#: axis names by the patient axis along which their slices are stacked (R = 0, A = 1, S = 2)
AXIS_BY_RAS = {0: "sagittal", 1: "coronal", 2: "axial"}
RAS_BY_AXIS = {name: ras for ras, name in AXIS_BY_RAS.items()}
#: a view within this angle of the server's slices shows one slice (degrees)
OBLIQUE_TOLERANCE_DEGREES = 0.5


@dataclass(frozen=True)
class SlicePosition:
    """The slice a view shows, as the server counts it.

    Attributes:
        axis: ``axial``, ``coronal`` or ``sagittal``.
        index: slice index along the RAS-reoriented axis (0 = inferior / posterior / left).
        count: number of slices along that axis.
        offset_voxels: distance from the view's centre to the chosen slice's centre, in voxels
            (0 when the view is exactly on a slice; up to 0.5 otherwise, more when clipped).
        oblique_degrees: angle between the view's plane and the server's slices (degrees); above
            :data:`OBLIQUE_TOLERANCE_DEGREES` the view crosses several slices and ``index`` is the
            one through the view's centre.
    """

    axis: str
    index: int
    count: int
    offset_voxels: float
    oblique_degrees: float = 0.0

    @property
    def oblique(self) -> bool:
        """True when the view is not parallel to the server's slices."""
        return self.oblique_degrees > OBLIQUE_TOLERANCE_DEGREES

    def note(self, view_name: str = "Red") -> str:
        """What the annotator should know about this position ("" when the view shows the slice)."""
        if not self.oblique:
            return ""
        return (f"The {view_name} view is {self.oblique_degrees:.1f}° oblique to the volume's {self.axis} slices: "
                f"the server is asked about {self.axis} slice {self.index}, the one through the view's centre, "
                "not the tilted plane on screen (Reformat's 'Rotate to volume plane' shows that slice).")


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


def _cross(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]


def _column(m: Sequence[Sequence[float]], column: int) -> list[float]:
    return [m[row][column] for row in range(3)]


def _invert_affine(m: list[list[float]]) -> list[list[float]]:
    """The inverse of a 4x4 affine matrix (last row 0 0 0 1)."""
    linear = [row[:3] for row in m[:3]]
    columns = [_solve3(linear, [1.0 if r == c else 0.0 for r in range(3)]) for c in range(3)]
    inverse = [[columns[c][r] for c in range(3)] for r in range(3)]
    translation = [-sum(inverse[r][c] * m[c][3] for c in range(3)) for r in range(3)]
    return [inverse[r] + [translation[r]] for r in range(3)] + [[0.0, 0.0, 0.0, 1.0]]


def _multiply(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[sum(a[r][k] * b[k][c] for k in range(4)) for c in range(4)] for r in range(4)]


def _angle_degrees(a: Sequence[float], b: Sequence[float]) -> float:
    """The angle between two lines (directions a and b, either sense), degrees."""
    norm = math.sqrt(sum(v * v for v in a)) * math.sqrt(sum(v * v for v in b))
    if norm == 0.0:
        raise ValueError("a direction has zero length")
    cosine = min(abs(sum(x * y for x, y in zip(a, b, strict=True))) / norm, 1.0)
    return math.degrees(math.acos(cosine))


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


def slice_position(slice_to_ras: Matrix, ijk_to_ras: Matrix, dimensions: Sequence[int],
                   to_world: Matrix | None = None) -> SlicePosition:
    """The (axis, index) of the slice at the centre of a view, in the server's counting.

    Args:
        slice_to_ras: the view's 4x4 slice-to-RAS matrix (world coordinates).
        ijk_to_ras: the volume's own 4x4 IJK-to-RAS matrix (mm, RAS), without its parent transform.
        dimensions: the volume's size along i, j, k (voxels).
        to_world: the volume's parent (linear) transform to world, if it has one.

    Returns:
        The nearest slice, clipped to the volume (a view outside the volume gets its first or last
        slice; ``offset_voxels`` says how far away it was), and how oblique the view is to it.
    """
    view = _check_matrix(slice_to_ras, "slice-to-RAS")
    volume = _check_matrix(ijk_to_ras, "IJK-to-RAS")
    if to_world is not None:  # the view in the image's own frame
        view = _multiply(_invert_affine(_check_matrix(to_world, "parent transform")), view)
    dims = [int(n) for n in dimensions]
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"volume dimensions must be 3 positive numbers, got {list(dimensions)}")
    normal = _cross(_column(view, 0), _column(view, 1))  # the plane's normal, whatever the transform did
    axis = view_axis([[view[r][0], view[r][1], normal[r], view[r][3]] for r in range(3)] + [[0.0, 0.0, 0.0, 1.0]])
    patient_axis = RAS_BY_AXIS[axis]
    axis_of, flips = ras_axis_assignment(volume)
    index_axis = axis_of[patient_axis]
    in_plane = [column for column in range(3) if column != index_axis]
    slice_normal = _cross(_column(volume, in_plane[0]), _column(volume, in_plane[1]))
    oblique = _angle_degrees(normal, slice_normal)

    centre = [view[row][3] - volume[row][3] for row in range(3)]
    ijk = _solve3([row[:3] for row in volume[:3]], centre)
    count = dims[index_axis]
    continuous = ijk[index_axis]
    if flips[patient_axis]:
        continuous = count - 1 - continuous
    index = min(max(round(continuous), 0), count - 1)
    return SlicePosition(axis, int(index), count, abs(continuous - index), round(oblique, 3))


def slice_centre(ijk_to_ras: Matrix, dimensions: Sequence[int], axis: str, index: int) -> list[float]:
    """The centre of slice ``index`` along ``axis`` as the server counts it (the inverse of
    :func:`slice_position`): the RAS point (image frame, mm) at the middle of the other two voxel axes.
    A view centred there (``vtkMRMLSliceNode.JumpSliceByCentering``) shows that slice."""
    volume = _check_matrix(ijk_to_ras, "IJK-to-RAS")
    dims = [int(n) for n in dimensions]
    if axis not in RAS_BY_AXIS:
        raise ValueError(f"axis must be one of {sorted(RAS_BY_AXIS)}, got {axis!r}")
    axis_of, flips = ras_axis_assignment(volume)
    patient_axis = RAS_BY_AXIS[axis]
    index_axis = axis_of[patient_axis]
    count = dims[index_axis]
    if not 0 <= int(index) < count:
        raise ValueError(f"{axis} slice {index} is outside the volume's {count} slices")
    ijk = [(n - 1) / 2.0 for n in dims]
    ijk[index_axis] = float(count - 1 - int(index) if flips[patient_axis] else int(index))
    return [sum(volume[row][column] * ijk[column] for column in range(3)) + volume[row][3] for row in range(3)]


def grids_match(ijk_to_ras_a: Matrix, dimensions_a: Sequence[int], ijk_to_ras_b: Matrix,
                dimensions_b: Sequence[int], tolerance_mm: float = 1e-3) -> bool:
    """True when two voxel grids are the same: equal dimensions and IJK-to-RAS within ``tolerance_mm``."""
    if [int(n) for n in dimensions_a] != [int(n) for n in dimensions_b]:
        return False
    a = _check_matrix(ijk_to_ras_a, "IJK-to-RAS")
    b = _check_matrix(ijk_to_ras_b, "IJK-to-RAS")
    return all(abs(a[row][col] - b[row][col]) <= tolerance_mm for row in range(3) for col in range(4))


def grid_axes_map(target_ijk_to_ras: Matrix, target_dimensions: Sequence[int], source_ijk_to_ras: Matrix,
                  source_dimensions: Sequence[int], tolerance_mm: float = 1e-2
                  ) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]] | None:
    """How to read a voxel array on the source grid as one on the target grid, when both grids have
    the same voxel centres in another index order (e.g. 3D Slicer's right-handed copy of a
    left-handed image: k reversed).

    Returns:
        ``(axes, flips)``: target index axis ``a`` is source axis ``axes[a]``, counted backwards
        when ``flips[a]``; None when the grids do not share their voxel centres.
    """
    target = _check_matrix(target_ijk_to_ras, "target IJK-to-RAS")
    source = _check_matrix(source_ijk_to_ras, "source IJK-to-RAS")
    tdims, sdims = [int(n) for n in target_dimensions], [int(n) for n in source_dimensions]
    mapping = _multiply(_invert_affine(source), target)  # target index -> source index
    axes: list[int] = []
    flips: list[bool] = []
    for a in range(3):
        column = [mapping[r][a] for r in range(3)]
        s = max(range(3), key=lambda r: abs(column[r]))
        sign = round(column[s])
        if abs(abs(column[s]) - 1.0) > 1e-4 or any(abs(column[r]) > 1e-4 for r in range(3) if r != s):
            return None
        axes.append(s)
        flips.append(sign < 0)
    if sorted(axes) != [0, 1, 2]:
        return None
    for a in range(3):
        s = axes[a]
        if tdims[a] != sdims[s]:
            return None
        expected_offset = (sdims[s] - 1) if flips[a] else 0
        # the target's origin in source index units must land on the source's first or last voxel
        spacing = math.sqrt(sum(source[r][s] ** 2 for r in range(3)))
        if abs(mapping[s][3] - expected_offset) * spacing > tolerance_mm:
            return None
    return (axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2])


def encode_grid(ijk_to_ras: Matrix, dimensions: Sequence[int]) -> str:
    """A voxel grid (IJK-to-RAS, dimensions) as JSON text, to keep in a node attribute."""
    return json.dumps({"ijkToRas": _check_matrix(ijk_to_ras, "IJK-to-RAS"), "dimensions": [int(n) for n in dimensions]})


def decode_grid(text: str | None) -> tuple[list[list[float]], list[int]] | None:
    """The inverse of :func:`encode_grid`; None for missing or unreadable text."""
    try:
        data = json.loads(text or "")
        return _check_matrix(data["ijkToRas"], "IJK-to-RAS"), [int(n) for n in data["dimensions"]]
    except (ValueError, KeyError, TypeError):
        return None
