"""Labelmap overlays on a grey slice (expert protocol §3).

The overlay is ``skimage.color.label2rgb(kind="overlay")`` over the grey slice with label2rgb's
defaults (alpha 0.3, black background colour), scaled to 0..255 and truncated to uint8 — the
overlays VILA-M3 was trained on were made that way. Colours are
assigned to the labels **present on the slice**, in ascending label id, cycling through
``colors``: the smallest present id gets ``colors[0]``, the next ``colors[1]``, and so on. The
text sent with the overlay must name colours in that same order; :func:`assign_colors` gives it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from skimage.color import label2rgb

from vila_m3.imaging.slices import extract_slice, render_slice_gray
from vila_m3.imaging.volume import Volume

__all__ = ["Color", "present_labels", "assign_colors", "overlay_labels", "render_overlay"]

#: an RGB triple with components in [0, 1], or a colour name skimage knows (e.g. "red")
Color = tuple[float, float, float] | str

#: label2rgb's default opacity of the label colours over the image
DEFAULT_ALPHA = 0.3


def present_labels(label_slice: np.ndarray) -> list[int]:
    """Label ids present in ``label_slice`` (any shape), ascending, background 0 excluded."""
    ids = _ids(np.asarray(label_slice))
    return [int(v) for v in ids if v != 0]


def _ids(labels: np.ndarray) -> np.ndarray:
    """The distinct values of ``labels``, ascending (``np.unique``; counted directly for 8/16-bit ids)."""
    if labels.dtype in (np.uint8, np.uint16) and labels.size:
        return np.flatnonzero(np.bincount(labels.reshape(-1))).astype(labels.dtype)
    return np.unique(labels)


def _ranks(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """For each pixel, the position of its label in ``ids`` (the distinct labels, ascending)."""
    if labels.dtype in (np.uint8, np.uint16):
        position = np.zeros(int(ids[-1]) + 1, dtype=np.intp)
        position[ids] = np.arange(len(ids))
        return position.take(labels)
    return np.searchsorted(ids, labels)


def assign_colors(label_slice: np.ndarray, colors: Sequence[Color]) -> list[tuple[int, Color]]:
    """(label id, colour) for each present label, ascending id, colours cycled as the overlay draws them."""
    if not colors:
        raise ValueError("colors must not be empty")
    return [(label, colors[i % len(colors)]) for i, label in enumerate(present_labels(label_slice))]


def overlay_labels(
    gray: np.ndarray,
    label_slice: np.ndarray,
    colors: Sequence[Color],
    alpha: float = DEFAULT_ALPHA,
) -> np.ndarray:
    """Colour ``label_slice`` over a grey slice.

    Args:
        gray: (H, W) uint8 grey slice, or (H, W, 3) uint8 (its luminance is used).
        label_slice: (H, W) integer ids, 0 = background (the grey image, blended with black
            at ``alpha`` like every label2rgb overlay with its default ``bg_color``).
        colors: colour cycle; the i-th present label (ascending id) gets ``colors[i % len]``.
        alpha: opacity of the label colours.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    gray = np.asarray(gray)
    labels = np.asarray(label_slice)
    if gray.dtype != np.uint8 or not (gray.ndim == 2 or (gray.ndim == 3 and gray.shape[2] == 3)):
        raise ValueError(f"gray must be (H, W) or (H, W, 3) uint8, got shape {gray.shape} dtype {gray.dtype}")
    if labels.ndim != 2 or labels.shape != gray.shape[:2]:
        raise ValueError(f"label_slice shape {labels.shape} does not match the image's {gray.shape[:2]}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"label_slice must hold integer ids, got dtype {labels.dtype}")
    if not colors:
        raise ValueError("colors must not be empty")
    if gray.ndim == 3 or not labels.size:
        return _blend(gray, labels, colors, alpha)
    # label2rgb works pixel by pixel, given which labels are present (they pick the colours): blend
    # every (present label, grey level) pair once, in a table, and look each pixel up in it.
    ids = _ids(labels)
    table = _blend(np.tile(np.arange(256, dtype=np.uint8), (len(ids), 1)),
                   np.repeat(ids[:, np.newaxis], 256, axis=1), colors, alpha)
    return table.reshape(-1, 3).take(_ranks(labels, ids) * 256 + gray, axis=0)


def _blend(gray: np.ndarray, labels: np.ndarray, colors: Sequence[Color], alpha: float) -> np.ndarray:
    # label2rgb's defaults otherwise (bg_color black, image_alpha 1): the background is the slice
    # darkened by ``alpha``, as in the overlays VILA-M3 was trained on.
    rgb = label2rgb(labels, image=gray, colors=list(colors), alpha=alpha, bg_label=0, kind="overlay")
    return (np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)  # truncated, as the reference does


def render_overlay(
    volume: Volume,
    labels: Volume,
    axis: str,
    index: int,
    colors: Sequence[Color],
    modality: str | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> tuple[Image.Image, list[tuple[int, Color]]]:
    """Overlay of a labelmap on the rendered slice of its volume.

    Args:
        volume: the image; labels: its labelmap on the same grid (geometry checked to 1e-4 mm).
        axis, index, modality: as :func:`vila_m3.imaging.slices.render_slice`.
        colors, alpha: as :func:`overlay_labels`.

    Returns:
        (RGB image, [(label id, colour), ...] for the labels drawn, ascending id).
    """
    if not labels.geometry.allclose(volume.geometry):
        raise ValueError("labels and volume have different geometry; resample the labels onto the volume first")
    gray = render_slice_gray(volume, axis, index, modality)
    label_slice = extract_slice(labels, axis, index)
    picture = overlay_labels(gray, label_slice, colors, alpha=alpha)
    return Image.fromarray(picture, mode="RGB"), assign_colors(label_slice, colors)
