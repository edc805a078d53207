"""A synthetic abdominal CT in Hounsfield units with a VISTA3D labelmap.

The phantom is drawn in its own frame, in millimetres: ``u`` along the image columns (towards the
patient's left), ``v`` along the image rows (towards the posterior) and ``w`` along the slices
(towards the head). The image axes are then placed in the world (DICOM LPS) with a 10 degree rotation
about the patient's z axis, so the volume has a non-identity direction.

Arrays are indexed ``[z, y, x]`` (slice, row, column), as ``SimpleITK.GetArrayFromImage`` returns them;
sizes, spacings and origins are given in ``(x, y, z)`` order, as SimpleITK reports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SIZE: tuple[int, int, int] = (256, 256, 64)
"""Voxels along (x, y, z)."""
SPACING: tuple[float, float, float] = (0.8, 0.8, 2.5)
"""Voxel size along (x, y, z), in mm."""
ROTATION_DEG = 10.0
"""Rotation of the image axes about the patient's z axis, in degrees."""
CENTRE_LPS: tuple[float, float, float] = (0.0, 0.0, -120.0)
"""World position (LPS, mm) of the centre of the volume."""
NOISE_HU = 8.0
"""Standard deviation of the noise inside the body, in HU."""

# VISTA3D class ids (MONAI model-zoo bundle ``vista3d``).
LIVER = 1
SPLEEN = 3
RIGHT_KIDNEY = 5
LEFT_KIDNEY = 14
BONE = 21
HEPATIC_TUMOR = 26
LABEL_NAMES: dict[int, str] = {
    LIVER: "liver",
    SPLEEN: "spleen",
    RIGHT_KIDNEY: "right kidney",
    LEFT_KIDNEY: "left kidney",
    BONE: "bone",
    HEPATIC_TUMOR: "hepatic tumor",
}

# Mean attenuation of each tissue, in HU.
AIR_HU = -1000.0
GAS_HU = -950.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
MUSCLE_HU = 52.0
LIVER_HU = 60.0
TUMOR_HU = 20.0
SPLEEN_HU = 50.0
KIDNEY_HU = 150.0
BONE_HU = 700.0
DISC_HU = 90.0
CSF_HU = 10.0


@dataclass(frozen=True)
class CTPhantom:
    """A CT volume and its labelmap on one geometry.

    ``hu``: int16 ``[z, y, x]`` in HU. ``labels``: uint8 ``[z, y, x]`` with VISTA3D ids (0 = none).
    ``spacing`` (mm), ``origin`` (LPS mm) in (x, y, z) order; ``direction``: row-major 3x3 whose columns
    are the world directions of the x, y and z image axes.
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]


def direction_matrix(rotation_deg: float = ROTATION_DEG) -> np.ndarray:
    """3x3 direction: the image x and y axes rotated by ``rotation_deg`` about the LPS z axis."""
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def geometry() -> tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, ...]]:
    """``(spacing, origin, direction)`` of the phantom; the origin is rounded to 0.001 mm."""
    direction = direction_matrix()
    half_extent = (np.array(SIZE, dtype=float) - 1.0) / 2.0 * np.array(SPACING)
    origin = np.array(CENTRE_LPS) - direction @ half_extent
    origin_t = tuple(round(float(x), 3) for x in origin)
    return SPACING, origin_t, tuple(float(x) for x in direction.ravel())


class _Frame:
    """Phantom coordinates (mm) of every voxel centre, as broadcastable ``[z, y, x]`` arrays."""

    def __init__(self) -> None:
        nx, ny, nz = SIZE
        sx, sy, sz = SPACING
        self.shape = (nz, ny, nx)
        self.u = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx)[None, None, :]
        self.v = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy)[None, :, None]
        self.w = (np.arange(nz, dtype=np.float32) * sz)[:, None, None]

    def ellipsoid(
        self,
        centre: tuple[float, float, float],
        semi_axes: tuple[float, float, float],
        angle_deg: float = 0.0,
    ) -> np.ndarray:
        """Boolean ``[z, y, x]`` mask of an ellipsoid (mm), turned by ``angle_deg`` in the u-v plane."""
        cu, cv, cw = centre
        a, b, c = semi_axes
        theta = math.radians(angle_deg)
        du, dv, dw = self.u - cu, self.v - cv, self.w - cw
        pu = du * math.cos(theta) + dv * math.sin(theta)
        pv = -du * math.sin(theta) + dv * math.cos(theta)
        return (pu / a) ** 2 + (pv / b) ** 2 + (dw / c) ** 2 <= 1.0

    def cylinder(self, centre_uv: tuple[float, float], semi_axes_uv: tuple[float, float]) -> np.ndarray:
        """Boolean ``[z, y, x]`` mask of an elliptic cylinder (mm) running through every slice."""
        disc = ((self.u - centre_uv[0]) / semi_axes_uv[0]) ** 2 + (
            (self.v - centre_uv[1]) / semi_axes_uv[1]
        ) ** 2
        return np.broadcast_to(disc <= 1.0, self.shape)


def _body_masks(frame: _Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body outline, inside of the fat layer and abdominal cavity; the body widens towards the head."""
    t = frame.w / (SIZE[2] * SPACING[2])
    a = 88.0 + 8.0 * t
    b = 72.0 - 3.0 * t
    cv = 3.0

    def inside(inset: float) -> np.ndarray:
        return (frame.u / (a - inset)) ** 2 + ((frame.v - cv) / (b - inset)) ** 2 <= 1.0

    return inside(0.0), inside(12.0), inside(20.0)


def make_ct_phantom(rng: np.random.Generator) -> CTPhantom:
    """Draw the abdominal CT phantom; ``rng`` only drives the noise, the anatomy is fixed."""
    frame = _Frame()
    shape = frame.shape
    hu = np.full(shape, AIR_HU, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    body, under_fat, cavity = _body_masks(frame)
    hu[body] = FAT_HU
    hu[under_fat] = MUSCLE_HU
    hu[cavity] = SOFT_TISSUE_HU

    # Bowel gas, anterior.
    for centre, axes in (
        ((22.0, -45.0, 55.0), (9.0, 8.0, 8.0)),
        ((40.0, -32.0, 35.0), (12.0, 7.0, 9.0)),
        ((-12.0, -50.0, 25.0), (7.0, 6.0, 6.0)),
    ):
        hu[frame.ellipsoid(centre, axes) & cavity] = GAS_HU

    # Paraspinal muscles.
    for side in (-1.0, 1.0):
        hu[frame.cylinder((22.0 * side, 58.0), (15.0, 12.0))] = MUSCLE_HU

    # Liver: right lobe and a left lobe reaching across the midline, kept inside the cavity.
    liver = frame.ellipsoid((-45.0, -5.0, 118.0), (42.0, 48.0, 52.0))
    liver |= frame.ellipsoid((-5.0, -28.0, 132.0), (36.0, 22.0, 26.0))
    liver &= cavity
    hu[liver] = LIVER_HU
    labels[liver] = LIVER

    spleen_centre, spleen_angle = (58.0, 26.0, 116.0), 35.0
    hu[frame.ellipsoid(spleen_centre, (20.0, 36.0, 32.0), angle_deg=spleen_angle) & cavity & ~liver] = FAT_HU
    spleen = frame.ellipsoid(spleen_centre, (16.0, 32.0, 28.0), angle_deg=spleen_angle) & cavity & ~liver
    hu[spleen] = SPLEEN_HU
    labels[spleen] = SPLEEN

    # Enhancing kidneys in perirenal fat; the right one sits lower, as it usually does.
    for side, label, cw in ((-1.0, RIGHT_KIDNEY, 62.0), (1.0, LEFT_KIDNEY, 74.0)):
        centre = (44.0 * side, 28.0, cw)
        angle = -25.0 * side
        fat = frame.ellipsoid(centre, (25.0, 21.0, 44.0), angle_deg=angle) & cavity & ~liver & ~spleen
        hu[fat] = FAT_HU
        kidney = frame.ellipsoid(centre, (18.0, 14.0, 36.0), angle_deg=angle) & cavity & ~liver & ~spleen
        hu[kidney] = KIDNEY_HU
        labels[kidney] = label

    # Spine: vertebral bodies with discs between them, neural arch and spinous process.
    vertebral_body = frame.cylinder((0.0, 34.0), (16.0, 15.0))
    disc = np.broadcast_to(((frame.w + 6.0) % 32.0) < 6.0, shape) & vertebral_body
    canal = frame.cylinder((0.0, 58.0), (7.0, 7.0))
    arch = frame.cylinder((0.0, 58.0), (11.5, 11.5)) & ~canal
    spinous = np.broadcast_to((np.abs(frame.u) <= 3.5) & (frame.v >= 58.0) & (frame.v <= 70.0), shape)
    bone = (vertebral_body & ~disc) | arch | (spinous & ~canal)
    hu[bone] = BONE_HU
    labels[bone] = BONE
    hu[disc] = DISC_HU
    labels[disc] = 0
    hu[canal] = CSF_HU

    # Hypodense hepatic tumours of different sizes, all within the liver.
    for centre, radius in (
        ((-52.0, -8.0, 124.0), 13.0),
        ((-35.0, 10.0, 108.0), 7.0),
        ((-10.0, -30.0, 136.0), 5.0),
    ):
        tumour = frame.ellipsoid(centre, (radius, radius, radius)) & liver
        hu[tumour] = TUMOR_HU
        labels[tumour] = HEPATIC_TUMOR

    noise = rng.standard_normal(shape, dtype=np.float32) * NOISE_HU
    hu = np.where(body, hu + noise, hu)
    hu_int = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    spacing, origin, direction = geometry()
    return CTPhantom(hu=hu_int, labels=labels, spacing=spacing, origin=origin, direction=direction)
