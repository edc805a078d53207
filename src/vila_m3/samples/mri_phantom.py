"""A synthetic four-sequence brain MRI (T1c, T1, T2, FLAIR) with a BRATS labelmap.

The head is drawn in millimetres about the centre of the volume: ``x`` towards the patient's left,
``y`` towards the posterior, ``z`` towards the head (LPS, identity direction). The tumour sits in the
right hemisphere: a necrotic core (label 1), an enhancing rim (label 4, bright on T1c only) and
surrounding oedema (label 2, bright on T2 and FLAIR).

Arrays are indexed ``[z, y, x]``; sizes, spacings and origins are given in ``(x, y, z)`` order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SEQUENCES: tuple[str, ...] = ("t1c", "t1", "t2", "flair")
"""Sequence names, in the BRATS bundle's channel order."""
SIZE: tuple[int, int, int] = (128, 128, 96)
"""Voxels along (x, y, z)."""
SPACING: tuple[float, float, float] = (1.5, 1.5, 1.5)
"""Voxel size along (x, y, z), in mm."""
ORIGIN: tuple[float, float, float] = (-95.25, -80.25, -61.25)
"""World position (LPS, mm) of the first voxel's centre."""
DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
NOISE_STD = 12.0
"""Standard deviation of the noise inside the head, in signal units."""
BACKGROUND_NOISE_STD = 5.0
"""Scale of the (rectified) noise in the air around the head, in signal units."""

# BRATS label ids.
TUMOR_CORE = 1
EDEMA = 2
ENHANCING = 4
LABEL_NAMES: dict[int, str] = {TUMOR_CORE: "tumor core", EDEMA: "edema", ENHANCING: "enhancing tumor"}

# Signal of each tissue per sequence (T1c, T1, T2, FLAIR), in arbitrary units.
_TISSUES: dict[str, tuple[float, float, float, float]] = {
    "air": (0.0, 0.0, 0.0, 0.0),
    "scalp": (820.0, 800.0, 560.0, 520.0),
    "skull": (70.0, 70.0, 60.0, 60.0),
    "csf": (200.0, 200.0, 1000.0, 90.0),
    "grey": (560.0, 550.0, 520.0, 620.0),
    "white": (720.0, 700.0, 360.0, 460.0),
    "edema": (460.0, 450.0, 860.0, 940.0),
    "enhancing": (1050.0, 470.0, 620.0, 720.0),
    "necrosis": (260.0, 250.0, 950.0, 420.0),
}


@dataclass(frozen=True)
class MRIPhantom:
    """Four co-registered MRI sequences and their labelmap.

    ``sequences``: name -> int16 ``[z, y, x]`` signal. ``labels``: uint8 ``[z, y, x]`` with BRATS ids.
    ``spacing`` (mm), ``origin`` (LPS mm) in (x, y, z) order; ``direction``: row-major 3x3.
    """

    sequences: dict[str, np.ndarray]
    labels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]


class _Head:
    """Millimetre coordinates of every voxel centre about the volume centre, broadcastable ``[z, y, x]``."""

    def __init__(self) -> None:
        nx, ny, nz = SIZE
        sx, sy, sz = SPACING
        self.shape = (nz, ny, nx)
        self.x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx)[None, None, :]
        self.y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy)[None, :, None]
        self.z = ((np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * sz)[:, None, None]

    def ellipsoid(
        self, centre: tuple[float, float, float], semi_axes: tuple[float, float, float]
    ) -> np.ndarray:
        """Boolean ``[z, y, x]`` mask of an axis-aligned ellipsoid (mm)."""
        (cx, cy, cz), (a, b, c) = centre, semi_axes
        return ((self.x - cx) / a) ** 2 + ((self.y - cy) / b) ** 2 + ((self.z - cz) / c) ** 2 <= 1.0


def make_mri_phantom(rng: np.random.Generator) -> MRIPhantom:
    """Draw the brain MRI phantom; ``rng`` only drives the noise, the anatomy is fixed."""
    head = _Head()
    centre = (0.0, 0.0, -12.0)
    outer = (70.0, 88.0, 78.0)

    def shell(inset: float) -> np.ndarray:
        return head.ellipsoid(centre, (outer[0] - inset, outer[1] - inset, outer[2] - inset))

    tissue = np.zeros(head.shape, dtype=np.uint8)
    names = list(_TISSUES)

    def paint(mask: np.ndarray, name: str) -> None:
        tissue[mask] = names.index(name)

    paint(shell(0.0), "scalp")
    paint(shell(5.0), "skull")
    paint(shell(11.0), "csf")
    brain = shell(13.0)
    paint(brain, "grey")

    # Folded cortex: the grey-white boundary and the sulci follow a smooth angular pattern.
    semi = (outer[0] - 13.0, outer[1] - 13.0, outer[2] - 13.0)
    dx, dy, dz = head.x - centre[0], head.y - centre[1], head.z - centre[2]
    radius = np.sqrt((dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2)
    folds = np.cos(11.0 * np.arctan2(dy, dx)) * np.cos(9.0 * np.arctan2(dz, np.hypot(dx, dy)))
    paint(radius < 0.84 + 0.06 * folds, "white")
    paint(brain & (radius > 0.9) & (folds < -0.6), "csf")
    fissure = (np.abs(head.x) < 1.6) & (head.z > -5.0) & brain
    paint(fissure, "csf")
    for sign in (-1.0, 1.0):
        paint(head.ellipsoid((12.0 * sign, 6.0, -4.0), (8.0, 11.0, 8.0)), "grey")
    ventricles = head.ellipsoid((-9.0, -6.0, 6.0), (6.5, 28.0, 11.0))
    ventricles |= head.ellipsoid((9.0, -6.0, 6.0), (6.5, 28.0, 11.0))
    ventricles |= head.ellipsoid((0.0, 4.0, -6.0), (2.0, 12.0, 7.0))
    paint(ventricles, "csf")

    tumour_centre = (-36.0, -18.0, 18.0)
    edema = head.ellipsoid(tumour_centre, (25.0, 30.0, 23.0)) & brain & ~ventricles & ~fissure
    enhancing = head.ellipsoid(tumour_centre, (15.0, 17.0, 14.0)) & brain
    core = head.ellipsoid(tumour_centre, (10.0, 11.0, 9.0)) & brain
    paint(edema, "edema")
    paint(enhancing, "enhancing")
    paint(core, "necrosis")

    labels = np.zeros(head.shape, dtype=np.uint8)
    labels[edema] = EDEMA
    labels[enhancing] = ENHANCING
    labels[core] = TUMOR_CORE

    in_head = shell(0.0)
    sequences: dict[str, np.ndarray] = {}
    for channel, name in enumerate(SEQUENCES):
        lookup = np.array([values[channel] for values in _TISSUES.values()], dtype=np.float32)
        signal = ndimage.gaussian_filter(lookup[tissue], sigma=0.6)
        noise = rng.standard_normal(head.shape, dtype=np.float32)
        signal = np.where(in_head, signal + NOISE_STD * noise, np.abs(BACKGROUND_NOISE_STD * noise))
        sequences[name] = np.clip(np.rint(signal), 0, 4095).astype(np.int16)

    return MRIPhantom(sequences=sequences, labels=labels, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
