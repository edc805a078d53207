"""Volumes and their geometry.

A :class:`Volume` is a voxel array plus the :class:`Geometry` that places it in the patient.
Geometry follows SimpleITK / DICOM conventions: physical coordinates are millimetres in the
patient's **LPS** frame (x towards the patient's Left, y towards Posterior, z towards Superior),
and the direction matrix holds, in its *columns*, the unit vectors of the voxel index axes
(i, j, k) = (x, y, z) in that frame.

The voxel array is stored in **(z, y, x)** order, exactly as ``SimpleITK.GetArrayFromImage``
returns it: ``array[k, j, i]`` is the voxel at index (i, j, k). ``Geometry.shape`` is given in
ITK order (x, y, z), so ``array.shape == geometry.shape[::-1]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

Vector3 = tuple[float, float, float]
Matrix3 = tuple[Vector3, Vector3, Vector3]

#: DICOM tags a :class:`Volume` may carry in ``metadata``: keyword → (group|element) as ITK names it.
#: Only tags that cannot identify the patient; never names, ids, dates or UIDs.
ALLOWED_DICOM_TAGS: dict[str, str] = {
    "Modality": "0008|0060",
    "SeriesDescription": "0008|103e",
    "Manufacturer": "0008|0070",
}


def _vector3(values: Any, name: str) -> Vector3:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be 3 finite numbers, got {values!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in the patient (immutable, hashable).

    Attributes:
        spacing: voxel size along the index axes (x, y, z), mm, all > 0.
        origin: physical position of voxel (0, 0, 0)'s centre, mm, LPS.
        direction: 3×3 direction cosines, row-major; column c is index axis c in LPS.
            Accepts a (3, 3) array, nested sequences or ITK's flat 9-tuple; stored as a
            tuple of rows.
        shape: grid size in voxels, ITK order (x, y, z).
    """

    spacing: Vector3
    origin: Vector3
    direction: Matrix3
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        spacing = _vector3(self.spacing, "spacing")
        if min(spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {spacing}")
        origin = _vector3(self.origin, "origin")
        d = np.asarray(self.direction, dtype=float)
        if d.size != 9 or not np.all(np.isfinite(d)):
            raise ValueError(f"direction must be a 3x3 matrix, got {self.direction!r}")
        d = d.reshape(3, 3)
        if abs(np.linalg.det(d)) < 1e-6:
            raise ValueError(f"direction matrix is singular: {d.tolist()}")
        direction = tuple(tuple(float(v) for v in row) for row in d)
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be 3 positive voxel counts (x, y, z), got {self.shape!r}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "shape", shape)

    @property
    def direction_matrix(self) -> np.ndarray:
        """Direction cosines as a (3, 3) float array; column c is index axis c in LPS."""
        return np.array(self.direction, dtype=float)

    @property
    def affine_lps(self) -> np.ndarray:
        """(4, 4) matrix mapping homogeneous voxel index (i, j, k, 1) to LPS mm."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction_matrix * np.asarray(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    def index_to_physical(self, index: Any) -> np.ndarray:
        """Voxel index (i, j, k) (float allowed; (..., 3)) → LPS position in mm, same leading shape."""
        idx = np.asarray(index, dtype=float)
        return idx @ (self.direction_matrix * np.asarray(self.spacing)).T + np.asarray(self.origin)

    def physical_to_index(self, point: Any) -> np.ndarray:
        """LPS position in mm ((..., 3)) → continuous voxel index (i, j, k), same leading shape."""
        p = np.asarray(point, dtype=float) - np.asarray(self.origin)
        inv = np.linalg.inv(self.direction_matrix * np.asarray(self.spacing))
        return p @ inv.T

    def allclose(self, other: Geometry, atol: float = 1e-4) -> bool:
        """True when shapes are equal and spacing, origin and direction agree within ``atol``."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=0.0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0.0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0.0, atol=atol)
        )

    def to_sitk(self, image: sitk.Image) -> sitk.Image:
        """Stamp spacing, origin and direction onto a 3D ``image`` (in place) and return it.

        Raises ValueError when the image's size is not ``shape``.
        """
        if tuple(image.GetSize()) != self.shape:
            raise ValueError(f"image size {image.GetSize()} does not match geometry shape {self.shape}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(v for row in self.direction for v in row))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        """Geometry of a 2D or 3D SimpleITK image.

        A 2D image becomes a one-slice grid: z spacing 1 mm, z origin 0, its 2×2 direction
        embedded in the upper-left of an identity 3×3.
        """
        dim = image.GetDimension()
        if dim == 3:
            return cls(
                spacing=image.GetSpacing(),
                origin=image.GetOrigin(),
                direction=image.GetDirection(),
                shape=image.GetSize(),
            )
        if dim == 2:
            d2 = np.asarray(image.GetDirection(), dtype=float).reshape(2, 2)
            d3 = np.eye(3)
            d3[:2, :2] = d2
            sx, sy = image.GetSpacing()
            ox, oy = image.GetOrigin()
            nx, ny = image.GetSize()
            return cls(spacing=(sx, sy, 1.0), origin=(ox, oy, 0.0), direction=d3, shape=(nx, ny, 1))
        raise ValueError(f"only 2D and 3D images have a Geometry, got a {dim}D image")

    @classmethod
    def identity(cls, shape: tuple[int, int, int], spacing: Vector3 = (1.0, 1.0, 1.0)) -> Geometry:
        """Axis-aligned grid of ``shape`` (x, y, z) at the origin, identity direction."""
        return cls(spacing=spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3), shape=shape)


@dataclass
class Volume:
    """A voxel array with its geometry.

    Attributes:
        array: voxels in **(z, y, x)** order (``array[k, j, i]``), as ``sitk.GetArrayFromImage``
            gives; dtype as stored in the file (CT usually int16 HU). A 2D image (an X-ray, a
            photo, a single DICOM frame) is stored as one slice, shape (1, H, W).
        geometry: spacing / origin / direction / shape; ``geometry.shape == array.shape[::-1]``.
        modality: DICOM Modality value (e.g. "CT", "MR", "CR", "DX") when the file says so,
            else None.
        metadata: non-identifying DICOM tags only (keys of :data:`ALLOWED_DICOM_TAGS`).

    Volumes are not modified in place (the expert service's volume cache shares one object between
    requests; a changed file is read into a new Volume), which is what lets :meth:`derived`
    remember whole-volume statistics.
    """

    array: np.ndarray
    geometry: Geometry
    modality: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: name -> (the array it was computed from, value); see :meth:`derived`
    _derived: dict[str, tuple[np.ndarray, Any]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.array, np.ndarray) or self.array.ndim != 3:
            shape = getattr(self.array, "shape", None)
            raise ValueError(f"Volume.array must be a 3D (z, y, x) numpy array, got shape {shape}")
        if tuple(self.array.shape[::-1]) != self.geometry.shape:
            raise ValueError(
                f"array shape (z, y, x) {self.array.shape} does not match geometry shape (x, y, z) "
                f"{self.geometry.shape}"
            )
        unknown = set(self.metadata) - set(ALLOWED_DICOM_TAGS)
        if unknown:
            raise ValueError(f"metadata may only hold {sorted(ALLOWED_DICOM_TAGS)}, got {sorted(unknown)}")

    @property
    def is_2d(self) -> bool:
        """True for a single-slice image (z size 1), such as a chest X-ray."""
        return self.array.shape[0] == 1

    def derived(self, name: str, compute: Callable[[np.ndarray], Any]) -> Any:
        """``compute(array)``, remembered under ``name`` for this volume: a whole-volume statistic
        (the intensity range, the lowest value) is scanned once per volume, not on every chat turn.

        The value lives on this object, so it goes with it (one entry per name, nothing global to
        bound) and is never served for another volume; assigning a new ``array`` recomputes it.
        """
        array = self.array
        entry = self._derived.get(name)
        if entry is not None and entry[0] is array:
            return entry[1]
        value = compute(array)
        self._derived[name] = (array, value)
        return value

    def remembered(self, name: str) -> Any | None:
        """The value :meth:`derived` remembered under ``name`` for the current array, None if none."""
        entry = self._derived.get(name)
        return entry[1] if entry is not None and entry[0] is self.array else None

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with this array (copied) and geometry."""
        return self.geometry.to_sitk(sitk.GetImageFromArray(self.array))

    @classmethod
    def from_sitk(
        cls, image: sitk.Image, modality: str | None = None, metadata: dict[str, str] | None = None
    ) -> Volume:
        """Volume from a scalar 2D or 3D SimpleITK image (one copy of the pixel buffer)."""
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError("Volume.from_sitk needs a scalar image; convert multi-component pixels first")
        geometry = Geometry.from_sitk(image)
        array = sitk.GetArrayFromImage(image)
        if array.ndim == 2:
            array = array[np.newaxis]
        return cls(array=array, geometry=geometry, modality=modality, metadata=dict(metadata or {}))
