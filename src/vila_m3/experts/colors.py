"""Colours of expert results: the slice overlay the model sees, and display colours for 3D Slicer.

Two different colourings exist, and they must not be mixed up:

* **Overlay colours** (what the VLM sees and reads). The segmentation overlay sent back to the model
  is ``skimage.color.label2rgb(label_slice, image=grey_slice, colors=overlay_colors_float(),
  bg_label=0, bg_color=None)`` (``bg_color=None`` leaves the background as the grey slice; the
  default paints it black at ``alpha``). ``label2rgb`` ranks the labels *present on that slice* in ascending order, leaves
  label 0 unpainted, and gives the k-th present label (k = 1, 2, ...) the colour
  ``OVERLAY_COLOR_NAMES[(k - 1) % 16]``. ``slice_label_colors`` computes exactly that mapping, and the
  feedback text (``feedback.segmentation_feedback``) names the colours from it, so "red: liver" in the
  text is the red region of the overlay. The same label can therefore have another colour on another
  slice. The renderer must pass the very same 2D label array to ``label2rgb`` and to
  ``present_labels`` (flips and rotations do not change which labels are present).
* **Display colours** (what the annotator sees in Slicer): one fixed RGB per label, from
  ``configs/experts.yaml`` (``display_colors``) or ``derived_color`` for labels not listed there.

Colour values are 8-bit RGB tuples (0..255), the named colours of matplotlib / CSS4, written out here
so that nothing imports matplotlib.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Mapping

import numpy as np

RGB = tuple[int, int, int]
"""An 8-bit colour: (red, green, blue), each 0..255."""

NAMED_COLORS_RGB: dict[str, RGB] = {
    "red": (255, 0, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "green": (0, 128, 0),
    "indigo": (75, 0, 130),
    "darkorange": (255, 140, 0),
    "cyan": (0, 255, 255),
    "pink": (255, 192, 203),
    "brown": (165, 42, 42),
    "orange": (255, 165, 0),
    "lime": (0, 255, 0),
    "gold": (255, 215, 0),
    "yellowgreen": (154, 205, 50),
    "darkgreen": (0, 100, 0),
}
"""matplotlib (CSS4) values of the colour names used in the overlay cycle."""

OVERLAY_COLOR_NAMES: tuple[str, ...] = (
    "red",
    "blue",
    "yellow",
    "magenta",
    "green",
    "indigo",
    "darkorange",
    "cyan",
    "pink",
    "brown",
    "orange",
    "lime",
    "orange",
    "gold",
    "yellowgreen",
    "darkgreen",
)
"""The 16-entry overlay cycle the model was trained with (``orange`` appears twice, on purpose)."""

OVERLAY_COLORS_RGB: tuple[RGB, ...] = tuple(NAMED_COLORS_RGB[name] for name in OVERLAY_COLOR_NAMES)
"""``OVERLAY_COLOR_NAMES`` as 8-bit RGB, same order."""


def overlay_colors_float() -> list[tuple[float, float, float]]:
    """The overlay cycle as RGB floats in [0, 1], the form ``skimage.color.label2rgb(colors=...)`` takes."""
    return [(r / 255.0, g / 255.0, b / 255.0) for r, g, b in OVERLAY_COLORS_RGB]


def present_labels(label_slice: np.ndarray, background: int = 0) -> list[int]:
    """Label ids present in a labelmap (any shape, usually one 2D slice (H, W)), ascending, background left out."""
    values = np.unique(np.asarray(label_slice))
    return [int(v) for v in values if int(v) != background]


def slice_label_colors(label_ids: Iterable[int], background: int = 0) -> dict[int, str]:
    """Overlay colour name of each label present on a slice, as ``label2rgb`` paints them.

    Args:
        label_ids: the label ids present on the slice (any order, duplicates allowed; the background
            id is ignored).
        background: the background label id (not painted, not named).

    Returns:
        ``{label id: colour name}`` in ascending label id; the k-th id gets ``OVERLAY_COLOR_NAMES[(k - 1) % 16]``.
    """
    ids = sorted({int(i) for i in label_ids} - {background})
    return {
        label_id: OVERLAY_COLOR_NAMES[rank % len(OVERLAY_COLOR_NAMES)] for rank, label_id in enumerate(ids)
    }


def derived_color(label_id: int) -> RGB:
    """A deterministic, fairly distinct display colour for a label without a configured one.

    Hues follow the golden-ratio sequence over the label id, so neighbouring ids differ clearly;
    saturation and value are moderate so that derived colours do not shout like tumour colours.
    """
    hue = (int(label_id) * 0.618033988749895) % 1.0
    saturation = 0.45 + 0.2 * ((int(label_id) * 7) % 3) / 2.0
    value = 0.75 + 0.15 * ((int(label_id) * 5) % 2)
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(r * 255), round(g * 255), round(b * 255))


def slice_legend(
    label_ids: Iterable[int], names: Mapping[int, str], background: int = 0
) -> list[tuple[int, str, str, RGB]]:
    """The overlay legend of one slice: ``(label id, label name, colour name, RGB)`` in ascending label id.

    The same pairs the feedback text names; a client can show them next to the overlay. Labels
    without a name are called ``label <id>``.
    """
    return [
        (label_id, names.get(label_id, f"label {label_id}"), color, NAMED_COLORS_RGB[color])
        for label_id, color in slice_label_colors(label_ids, background).items()
    ]
