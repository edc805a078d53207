"""``output=dicom_seg``: an expert's labelmap as a DICOM Segmentation of the request's DICOM study.

The study is a PACS series (``image=<SeriesInstanceUID>`` on a DICOMweb datastore: its downloaded instances in
the datastore's cache) or a DICOM series uploaded as a session. The SEG (``vila_m3.imaging.dicom_seg``) references
that series and its frame of reference, sits on its slices, and names and codes each segment; it is written to
``folder`` and its path returned. Anything else is a 422 that names the problem.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import HTTPException

import vila_m3
from lib.pacs_datastore import PacsDatastore
from vila_m3.imaging import read_labelmap
from vila_m3.imaging.dicom_seg import SegAlgorithm, SegError, labelmap_to_seg, read_series

BAD_INPUT = 422


def source_series(datastore: Any, image_id: str, image: str) -> Path:
    """The folder of DICOM instances behind the request's image; 422 if it is not a DICOM study."""
    if isinstance(datastore, PacsDatastore) and image_id in datastore.list_images():
        folder = datastore.series_folder(image_id)
        if folder is not None:
            return folder
    if image and os.path.isdir(image):  # a DICOM series uploaded as a session
        return Path(image)
    raise HTTPException(BAD_INPUT, "output=dicom_seg needs a DICOM study: a series of the PACS (image=<series "
                                   "UID> on a DICOMweb datastore) or a DICOM series uploaded as a session")


def write_seg(folder: Path, task: Any, answer: dict[str, Any] | None, result_file: Path | None,
              series: Path) -> Path:
    """The SEG of ``result_file`` (the expert's NIfTI labelmap) on ``series``, written in ``folder``."""
    answer = answer or {}
    names = answer.get("label_names")
    if result_file is None or not isinstance(names, dict) or not names:
        raise HTTPException(BAD_INPUT, "output=dicom_seg needs a segmentation: this result has no labelmap")
    spec = getattr(task, "spec", None)
    expert = str(answer.get("expert") or getattr(spec, "name", "") or "expert")
    colors = {}
    if spec is not None:
        colors = {name: tuple(spec.label_color(int(value))) for name, value in names.items()}
    weights = ",".join(getattr(spec, "weights", ()) or ())
    version = f"vila-m3 {vila_m3.__version__}" + (f", weights {weights}" if weights else "")
    algorithm = SegAlgorithm(expert, version, stand_in=bool(answer.get("stand_in")))
    labels = read_labelmap(result_file)
    geometry = labels.geometry
    try:
        seg = labelmap_to_seg(labels.array, (geometry.spacing, geometry.origin, geometry.direction),
                              read_series(series), {str(k): int(v) for k, v in names.items()}, colors, algorithm)
    except SegError as err:
        raise HTTPException(BAD_INPUT, f"output=dicom_seg: {err}") from None
    handle, path = tempfile.mkstemp(suffix=".dcm", prefix="seg-", dir=folder)
    os.close(handle)
    seg.save_as(path)
    return Path(path)
