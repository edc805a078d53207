"""Imaging: volumes with their geometry, the slices the model sees, overlays, labelmap files.

- :mod:`.volume` — :class:`Geometry` (spacing / origin / direction, LPS mm) and :class:`Volume`
  (array in (z, y, x) order).
- :mod:`.io` — :func:`read_volume` (NIfTI, NRRD, DICOM series or file, PNG / JPEG) and labelmap
  reading / writing with the exact input geometry.
- :mod:`.slices` — RAS-oriented slices in radiological display, CT windows, RGB rendering.
- :mod:`.overlay` — label colours over a grey slice.
"""

from vila_m3.imaging.io import (
    VolumeReadError,
    labelmap_dtype,
    labelmap_like,
    list_dicom_series,
    read_labelmap,
    read_volume,
    save_labelmap,
    write_labelmap,
)
from vila_m3.imaging.overlay import assign_colors, overlay_labels, present_labels, render_overlay
from vila_m3.imaging.slices import (
    AXES,
    extract_slice,
    minmax_uint8,
    normalize_modality,
    ras_view,
    render_gray,
    render_label_slice,
    render_slice,
    slice_index_at,
    slice_index_count,
    to_rgb,
    window_ct,
)
from vila_m3.imaging.volume import ALLOWED_DICOM_TAGS, Geometry, Volume

__all__ = [
    "ALLOWED_DICOM_TAGS",
    "AXES",
    "Geometry",
    "Volume",
    "VolumeReadError",
    "assign_colors",
    "extract_slice",
    "labelmap_dtype",
    "labelmap_like",
    "list_dicom_series",
    "minmax_uint8",
    "normalize_modality",
    "overlay_labels",
    "present_labels",
    "ras_view",
    "read_labelmap",
    "read_volume",
    "render_gray",
    "render_label_slice",
    "render_overlay",
    "render_slice",
    "save_labelmap",
    "slice_index_at",
    "slice_index_count",
    "to_rgb",
    "window_ct",
    "write_labelmap",
]
