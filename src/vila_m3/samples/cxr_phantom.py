"""A synthetic posteroanterior chest X-ray with an enlarged heart.

The image is 512 x 512 8-bit grey, displayed the usual way: the patient's right on the image left,
the head at the top; dense structures bright (MONOCHROME2). Lungs are dark, the mediastinum, heart,
spine, ribs, clavicles and the abdomen below the diaphragm bright. The heart is wider than half of the
thorax (cardiothoracic ratio above 0.5), so the phantom shows cardiomegaly; the costophrenic angles
are sharp and the lung markings reach the chest wall (no effusion, no pneumothorax).

Arrays are indexed ``[row, column]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SIZE: tuple[int, int] = (512, 512)
"""Pixels along (columns, rows)."""
PIXEL_SPACING_MM = 0.7
"""Pixel size, in mm, along rows and columns."""
NOISE_STD = 0.008
"""Standard deviation of the quantum noise, as a fraction of full scale."""

FINDINGS: dict[str, bool] = {
    "Cardiomegaly": True,
    "Enlarged Cardiomediastinum": True,
    "Effusion": False,
    "Pneumothorax": False,
}
"""What the phantom shows, with TorchXRayVision pathology names."""


@dataclass(frozen=True)
class CXRPhantom:
    """The radiograph and the masks used to draw it.

    ``pixels``: uint8 ``[row, column]``. ``lungs`` and ``heart``: boolean ``[row, column]``.
    ``pixel_spacing``: (row, column) spacing in mm. ``findings``: TorchXRayVision name -> present.
    """

    pixels: np.ndarray
    lungs: np.ndarray
    heart: np.ndarray
    pixel_spacing: tuple[float, float]
    findings: dict[str, bool]

    @property
    def cardiothoracic_ratio(self) -> float:
        """Widest extent of the heart over the widest extent of the lungs (inner thorax), unitless."""
        return _width(self.heart) / _width(self.lungs)


def _width(mask: np.ndarray) -> int:
    """Number of columns between the leftmost and rightmost pixel of ``mask``, inclusive."""
    columns = np.flatnonzero(mask.any(axis=0))
    return int(columns[-1] - columns[0] + 1)


def _ellipse(
    rows: np.ndarray, cols: np.ndarray, centre: tuple[float, float], axes: tuple[float, float]
) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipse; ``centre`` and ``axes`` are (row, column) in pixels."""
    return ((rows - centre[0]) / axes[0]) ** 2 + ((cols - centre[1]) / axes[1]) ** 2 <= 1.0


def _band(distance: np.ndarray, half_width: float) -> np.ndarray:
    """Smooth profile (1 at the centre line, 0 beyond ``half_width``) of a bone seen edge on."""
    return np.sqrt(np.clip(1.0 - (distance / half_width) ** 2, 0.0, 1.0))


def _vessels(rows: np.ndarray, cols: np.ndarray, mid: float, rng: np.random.Generator) -> np.ndarray:
    """Lung markings: tapering vessels fanning out upwards, sideways and downwards from each hilum,
    as added density ``[row, column]``."""
    markings = np.zeros((rows.shape[0], cols.shape[1]), dtype=np.float32)
    for sign in (-1.0, 1.0):
        hilum_row, hilum_col = 255.0, mid + sign * 60.0
        for angle in np.linspace(10.0, 165.0, 9) + rng.uniform(-6.0, 6.0, 9):
            theta = np.radians(angle)
            d_row, d_col = -np.cos(theta), sign * np.sin(theta)
            length = rng.uniform(120.0, 180.0)
            along = (rows - hilum_row) * d_row + (cols - hilum_col) * d_col
            across = np.abs((cols - hilum_col) * d_row - (rows - hilum_row) * d_col)
            t = np.clip(along / length, 0.0, 1.0)
            profile = 0.07 * (1.0 - t) * _band(across, 3.5 * (1.0 - 0.7 * t))
            markings = np.maximum(markings, np.where((along > 0.0) & (along < length), profile, 0.0))
    return markings


def make_cxr_phantom(rng: np.random.Generator) -> CXRPhantom:
    """Draw the chest X-ray phantom; ``rng`` drives the lung texture and the noise."""
    n_cols, n_rows = SIZE
    rows = np.arange(n_rows, dtype=np.float32)[:, None]
    cols = np.arange(n_cols, dtype=np.float32)[None, :]
    mid = (n_cols - 1) / 2.0
    lateral = np.abs(cols - mid)

    # Body outline: neck, shoulders, then the trunk.
    shoulder = np.clip((rows - 30.0) / 80.0, 0.0, 1.0)
    half_width = 55.0 + (238.0 - 55.0) * np.sqrt(shoulder)
    body = (lateral <= half_width) & (rows >= 0.0)
    density = np.where(body, 0.55, 0.03).astype(np.float32)

    # Diaphragm domes (the right one higher), with the abdomen below them.
    diaphragm = np.minimum(
        378.0 + 0.0042 * (cols - mid + 105.0) ** 2, 394.0 + 0.0042 * (cols - mid - 105.0) ** 2
    )
    abdomen = body & (rows > diaphragm)
    density[abdomen] = 0.72

    # Lungs: two tall ellipses above the diaphragm, lateral to the mediastinum.
    lungs = np.zeros((n_rows, n_cols), dtype=bool)
    for sign in (-1.0, 1.0):
        lungs |= _ellipse(rows, cols, (265.0, mid + sign * 102.0), (185.0, 88.0))
    lungs &= rows < diaphragm
    lungs &= lateral >= 30.0

    # Heart: wide, shifted towards the patient's left, sitting on the diaphragm.
    heart = _ellipse(rows, cols, (352.0, mid + 24.0), (78.0, 112.0)) & (rows < diaphragm + 4.0)
    mediastinum = (lateral < 34.0) & (rows > 40.0) & (rows < 330.0)
    aortic_knob = _ellipse(rows, cols, (178.0, mid + 34.0), (24.0, 22.0))

    texture = ndimage.gaussian_filter(rng.standard_normal((n_rows, n_cols)).astype(np.float32), sigma=3.0)
    texture /= float(texture.std()) + 1e-6
    hila = np.zeros((n_rows, n_cols), dtype=np.float32)
    for sign in (-1.0, 1.0):
        hila += np.exp(-((rows - 255.0) ** 2 + (cols - mid - sign * 62.0) ** 2) / (2.0 * 38.0**2))
    lung_density = 0.15 + 0.14 * hila + 0.012 * texture + _vessels(rows, cols, mid, rng)
    density = np.where(lungs, lung_density, density)
    density[mediastinum | aortic_knob] = 0.74
    density[heart] = 0.76
    lungs &= ~(heart | mediastinum | aortic_knob)
    trachea = (lateral < 9.0) & (rows > 30.0) & (rows < 205.0)
    density[trachea] -= 0.22

    # Spine through the mediastinum, with faint disc spaces.
    spine = body & (lateral < 22.0)
    discs = (np.mod(rows, 27.0) < 3.0) & spine
    density += np.where(spine, 0.06, 0.0).astype(np.float32)
    density -= np.where(discs, 0.04, 0.0).astype(np.float32)

    # Ribs: posterior ribs arch up from the spine and slope down laterally; anterior ribs are fainter.
    bone = np.zeros((n_rows, n_cols), dtype=np.float32)
    posterior_span = (lateral > 24.0) & (lateral < 215.0)
    for index in range(10):
        centre_line = 96.0 + 29.0 * index + 0.0032 * (lateral - 70.0) ** 2
        bone = np.maximum(bone, 0.15 * _band(rows - centre_line, 6.5) * posterior_span)
    anterior_span = (lateral > 40.0) & (lateral < 205.0)
    for index in range(6):
        centre_line = 170.0 + 34.0 * index - 0.45 * (205.0 - lateral)
        bone = np.maximum(bone, 0.06 * _band(rows - centre_line, 8.0) * anterior_span)
    clavicle_line = 100.0 - 0.16 * (lateral - 30.0) + 0.0009 * (lateral - 90.0) ** 2
    clavicles = (lateral > 28.0) & (lateral < 175.0)
    bone = np.maximum(bone, 0.18 * _band(rows - clavicle_line, 8.0) * clavicles)
    density += bone * body

    # Gastric air bubble under the left hemidiaphragm.
    bubble = _ellipse(rows, cols, (418.0, mid + 95.0), (14.0, 30.0)) & abdomen
    density[bubble] -= 0.28

    density = ndimage.gaussian_filter(density, sigma=1.2)
    density += NOISE_STD * rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    pixels = np.clip(np.rint(255.0 * np.clip(density, 0.0, 1.0) ** 0.9), 0, 255).astype(np.uint8)
    return CXRPhantom(
        pixels=pixels,
        lungs=lungs,
        heart=heart,
        pixel_spacing=(PIXEL_SPACING_MM, PIXEL_SPACING_MM),
        findings=dict(FINDINGS),
    )
