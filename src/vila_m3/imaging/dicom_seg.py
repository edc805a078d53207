"""An expert's labelmap as a DICOM Segmentation (highdicom) on the slices of its source DICOM series.

The labelmap is the NIfTI (``[z, y, x]`` with its LPS geometry) that the expert returned for a series; each
source instance is placed on the labelmap slice its Image Position (Patient) falls on, so every SEG frame
references its source instance and sits at exactly that instance's position and orientation (an oblique
series stays oblique; a series stored in any instance order gets the right frames).

Each label value present in ``label_names`` becomes one segment, numbered 1.. in label-value order, with:
its label name; SNOMED CT category and type codes from the same table the Slicer panel uses
(``slicer_extension/VILAM3Chat/VILAM3ChatLib/terminology.json``) — a label the table does not list gets the
**fallback** category *Anatomical Structure* (SCT 123037004) and a type in the private coding scheme
``99VILAM3`` whose meaning is the label name; the algorithm (name, version, and ``stand-in`` in the version
and the series description when the weights are a stand-in); the colour as Recommended Display CIELab Value.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from vila_m3.configs import DEFAULT_CONFIG_DIR

TERMINOLOGY_FILE = DEFAULT_CONFIG_DIR.parent / "slicer_extension" / "VILAM3Chat" / "VILAM3ChatLib" / "terminology.json"
MANUFACTURER = "VILA-M3"
POSITION_TOLERANCE_MM = 0.01
"""How far (mm) an instance may lie from a labelmap slice and still be placed on it."""


class SegError(ValueError):
    """The labelmap cannot be written on this series (the message says why, without server paths)."""


@dataclass(frozen=True)
class SegCode:
    """A coded concept: scheme designator (``SCT``: SNOMED CT), value, meaning."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class SegAlgorithm:
    """The expert that produced the labelmap."""

    name: str
    version: str
    stand_in: bool = False

    @property
    def shown_version(self) -> str:
        return f"{self.version} (stand-in)" if self.stand_in else self.version


@lru_cache(maxsize=2)
def _table(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def segment_codes(name: str, path: Path = TERMINOLOGY_FILE) -> tuple[SegCode, SegCode, bool]:
    """(category, type, listed) for a label name: the SNOMED CT codes of the Slicer panel's table, or the
    fallback (*Anatomical Structure*, a ``99VILAM3`` type meaning the label name) with ``listed`` False."""
    table = _table(str(path))
    codes = {key: SegCode(*map(str, value)) for key, value in table["codes"].items()}
    entry = table["entries"].get(" ".join(name.lower().split()))
    if entry is not None:
        return codes[entry["category"]], codes[entry["type"]], True
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:16] or "label"
    return codes["anatomical structure"], SegCode(str(table["private_scheme"]), slug, name[:64]), False


def rgb_to_dicom_lab(rgb: Sequence[float]) -> list[int]:
    """Recommended Display CIELab Value of an sRGB colour (components 0-255): L*, a*, b* scaled to 0..65535."""
    from skimage.color import rgb2lab

    lab = rgb2lab(np.asarray(rgb, dtype=float).reshape(1, 1, 3) / 255.0)[0, 0]
    scaled = [lab[0] * 65535 / 100, (lab[1] + 128) * 65535 / 255, (lab[2] + 128) * 65535 / 255]
    return [int(round(min(max(v, 0), 65535))) for v in scaled]


def read_series(folder: Path) -> list[Dataset]:
    """The image instances of a DICOM series folder (files that are not DICOM images are ignored)."""
    datasets = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # not DICOM
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds:
            datasets.append(ds)
    if not datasets:
        raise SegError("the source series holds no DICOM image with a position")
    return datasets


def _slice_index(ds: Dataset, origin: np.ndarray, axes: np.ndarray, spacing: np.ndarray) -> int:
    """The labelmap slice an instance lies on; SegError if it lies on none or off the in-plane grid."""
    offset = np.asarray(ds.ImagePositionPatient, dtype=float) - origin
    index = offset @ axes[:, 2] / spacing[2]
    in_plane = np.array([offset @ axes[:, 0], offset @ axes[:, 1]])
    if abs(index - round(index)) * spacing[2] > POSITION_TOLERANCE_MM or np.abs(in_plane).max() > POSITION_TOLERANCE_MM:
        raise SegError("the labelmap's geometry does not match the source series")
    return int(round(index))


def labelmap_to_seg(labels: np.ndarray, geometry: tuple[Sequence[float], Sequence[float], Sequence[float]],
                    sources: Sequence[Dataset], label_names: Mapping[str, int],
                    label_colors: Mapping[str, Sequence[float]], algorithm: SegAlgorithm,
                    series_number: int = 900) -> Dataset:
    """A DICOM Segmentation of ``labels`` (``[z, y, x]`` integer label values) on ``sources``.

    ``geometry``: the labelmap's (spacing, origin, direction) in (x, y, z) order, LPS mm, row-major 3x3
    direction. ``label_colors``: name -> RGB 0-255 (a label without one gets grey). Raises SegError when the
    labelmap does not lie on the series' slices or holds nothing to write.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    spacing, origin, direction = (np.asarray(v, dtype=float) for v in geometry)
    axes = direction.reshape(3, 3)
    if labels.ndim != 3:
        raise SegError(f"expected a 3D labelmap, got {labels.ndim} dimensions")
    n_slices, n_rows, n_cols = labels.shape
    placed: dict[int, Dataset] = {}
    for ds in sources:
        if (int(ds.Rows), int(ds.Columns)) != (n_rows, n_cols):
            raise SegError("the labelmap's size does not match the source series")
        index = _slice_index(ds, origin, axes, spacing)
        if not 0 <= index < n_slices or index in placed:
            raise SegError("the source series' slices do not match the labelmap")
        placed[index] = ds
    if len(placed) != n_slices:
        raise SegError(f"the source series has {len(placed)} slices, the labelmap {n_slices}")
    ordered = [placed[k] for k in range(n_slices)]

    present = {int(v) for v in np.unique(labels)} - {0}
    by_value = sorted((value, name) for name, value in label_names.items() if int(value) in present)
    if not by_value:
        raise SegError("the labelmap holds no named label to write")
    numbered = np.zeros(labels.shape, dtype=np.uint8)
    descriptions = []
    family = codes.cid7162.ArtificialIntelligence
    identification = hd.AlgorithmIdentificationSequence(name=algorithm.name, family=family,
                                                        version=algorithm.shown_version)
    for number, (value, name) in enumerate(by_value, start=1):
        numbered[labels == value] = number
        category, kind, _ = segment_codes(name)
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=hd.sr.CodedConcept(category.value, category.scheme, category.meaning),
            segmented_property_type=hd.sr.CodedConcept(kind.value, kind.scheme, kind.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=identification,
            tracking_uid=hd.UID(), tracking_id=f"{algorithm.name} {name}"[:64],
        )
        description.RecommendedDisplayCIELabValue = rgb_to_dicom_lab(label_colors.get(name) or (128, 128, 128))
        descriptions.append(description)

    description_text = f"{algorithm.name}{' stand-in' if algorithm.stand_in else ''} segmentation"
    seg = hd.seg.Segmentation(
        source_images=ordered, pixel_array=numbered, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name[:64], software_versions=algorithm.shown_version[:64],
        device_serial_number="none", content_description=description_text[:64], content_label="SEGMENTATION",
        omit_empty_frames=False,
    )
    seg.SeriesDescription = description_text[:64]
    return seg


def expert_label_values() -> dict[str, int]:
    """Label name (lower case) -> label value of every segmentation expert's configured labels (VISTA3D's
    classes, BRATS's regions): how a segment's name is turned back into the value the experts use."""
    from vila_m3.experts.registry import ExpertRegistry

    values: dict[str, int] = {}
    for spec in ExpertRegistry.from_config().configured:
        for value, name in spec.labels.items():
            values.setdefault(" ".join(str(name).lower().split()), int(value))
    return values


def seg_to_labelmap(seg: Dataset, geometry: tuple[Sequence[float], Sequence[float], Sequence[float]],
                    shape: Sequence[int], sources: Sequence[Dataset],
                    values: Mapping[str, int] | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """The labelmap (``[z, y, x]``, ``shape``) of a DICOM Segmentation of ``sources`` on the image grid
    ``geometry`` (spacing, origin, direction as in :func:`labelmap_to_seg`), and its label names.

    A segment whose label is a known expert label (``values``, default :func:`expert_label_values`) gets that
    value; any other keeps its segment number (past the known values it would collide with, it is moved up).
    """
    import highdicom as hd

    spacing, origin, direction = (np.asarray(v, dtype=float) for v in geometry)
    axes = direction.reshape(3, 3)
    n_slices = int(shape[0])
    placed = {}
    for ds in sources:
        placed[_slice_index(ds, origin, axes, spacing)] = ds.SOPInstanceUID
    if sorted(placed) != list(range(n_slices)):
        raise SegError("the segmentation's source series does not match the image")
    reader = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg)
    values = expert_label_values() if values is None else values
    numbers = {int(d.SegmentNumber): str(d.SegmentLabel) for d in reader.SegmentSequence}
    mapping: dict[int, int] = {}
    used = set()
    for number, name in sorted(numbers.items()):
        value = values.get(" ".join(name.lower().split()))
        if value is None or value in used:
            value = number
            while value in used or value in values.values():
                value += 1
        mapping[number] = value
        used.add(value)
    pixels = reader.get_pixels_by_source_instance(
        source_sop_instance_uids=[placed[k] for k in range(n_slices)], combine_segments=True, relabel=False,
        skip_overlap_checks=True,
    )
    labels = np.zeros(tuple(int(n) for n in shape), dtype=np.uint16)
    for number, value in mapping.items():
        labels[pixels == number] = value
    return labels, {numbers[number]: value for number, value in mapping.items()}
