"""Is a folder of DICOM instances one readable image series? The check made before a PACS series is converted.

A series is refused (with one sentence for the client, naming no file or folder) when it holds no DICOM image,
an instance that is not readable DICOM, pixel data of the wrong length (uncompressed transfer syntaxes) or none,
instances of different sizes or orientations, two instances at one position, or missing slices: a gap between
neighbouring positions larger than 1.5 times the series' usual spacing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

GAP_FACTOR = 1.5
"""A step between neighbouring slices this many times the median step (or more) is a missing slice."""
POSITION_TOLERANCE_MM = 0.01


def _expected_bytes(ds: pydicom.Dataset) -> int | None:
    """Bytes of uncompressed pixel data the header announces, or None for a compressed transfer syntax."""
    syntax = UID(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    if syntax.is_compressed:
        return None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    count = int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1) or 1) * frames
    return (count * bits + 7) // 8


def series_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why the instances in ``folder`` are not one usable image series, or None when they are."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    if not paths:
        return "the series holds no instance"
    datasets = []
    for number, path in enumerate(paths, start=1):
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError, ValueError, EOFError):
            return f"instance {number} of {len(paths)} is not readable DICOM"
    images = [ds for ds in datasets if "PixelData" in ds or "Rows" in ds]
    if not images:
        return "the series holds no image (no pixel data)"
    corrupt = 0
    for ds in images:
        try:
            expected = _expected_bytes(ds)
            data = ds.get("PixelData")
            if data is None or (expected is not None and len(data) < expected):
                corrupt += 1
        except (AttributeError, TypeError, ValueError):
            corrupt += 1
    if corrupt:
        return f"{corrupt} of {len(images)} instances have missing or truncated pixel data"
    if len({(int(ds.Rows), int(ds.Columns)) for ds in images}) > 1:
        return "the instances have different sizes"
    if len(images) == 1:
        return None
    try:
        orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in images])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in images])
    except (AttributeError, TypeError, ValueError):
        return "the instances lack positions or orientations, so they cannot be stacked into a volume"
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        return "the instances have different orientations"
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    along = np.sort(positions @ normal)
    steps = np.diff(along)
    if (steps < POSITION_TOLERANCE_MM).any():
        return "two or more instances lie at the same position"
    usual = float(np.median(steps))
    gaps = int((steps > GAP_FACTOR * usual).sum())
    if gaps:
        return f"the series has missing slices ({gaps} gap{'s' if gaps > 1 else ''} among {len(images)} slices)"
    return None
