"""What a chat turn looks at: one volume (CT, MRI, X-ray) or the four MRI sequences BRATS needs,
its modality, and the slice the model sees.

The modality comes from the data unless the client says otherwise: four sequences → MRI; a 2D image
→ CXR; DICOM Modality CT / MR / CR, DX → CT / MRI / CXR; otherwise (NIfTI, NRRD) a volume whose
lowest values reach air in Hounsfield units (below −500) is a CT, anything else an MRI.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vila_m3.imaging import Volume
from vila_m3.imaging.sequences import SEQUENCE_ALIASES, SEQUENCE_ORDER
from vila_m3.imaging.slices import render_slice, slice_index_count

MODALITIES = ("CT", "MRI", "CXR")
AXES = ("axial", "coronal", "sagittal")
CT_AIR_HU = -500.0
_DICOM_MODALITY = {"CT": "CT", "MR": "MRI", "MRI": "MRI", "CR": "CXR", "DX": "CXR", "CXR": "CXR"}


class StudyError(ValueError):
    """The request's study, modality or slice is not usable; the message names the problem."""


@dataclass
class Study:
    """The images of one chat turn.

    Attributes:
        paths: {name: file or DICOM folder}; ``image`` for one volume, ``t1c``/``t1``/``t2``/``flair`` for BRATS.
        volumes: the loaded volumes, same keys.
        keys: cache keys of the volumes (file path, size, mtime), same keys.
        modality: ``CT``, ``MRI`` or ``CXR``.
    """

    paths: dict[str, str]
    volumes: dict[str, Volume]
    keys: dict[str, str]
    modality: str

    @property
    def is_brats(self) -> bool:
        return set(self.volumes) == set(SEQUENCE_ORDER)

    @property
    def primary(self) -> Volume:
        """The volume the slice is taken from and overlays drawn on (T1c for the four sequences)."""
        return self.volumes["t1c"] if self.is_brats else self.volumes["image"]

    @property
    def primary_path(self) -> str:
        return self.paths["t1c"] if self.is_brats else self.paths["image"]

    def slice_count(self, axis: str) -> int:
        return slice_index_count(self.primary, axis)

    def check_slice(self, axis: str, index: int | None) -> tuple[str, int]:
        """The (axis, index) to render: the middle slice when ``index`` is None; errors name the valid range."""
        if axis not in AXES:
            raise StudyError(f"axis '{axis}' is not one of {', '.join(AXES)}")
        count = self.slice_count(axis)
        if index is None:
            return axis, count // 2
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise StudyError(f"slice_index {index!r} is out of range for the {axis} axis: 0 to {count - 1}")
        return axis, index

    def render(self, axis: str, index: int) -> list[Image.Image]:
        """The slice(s) the model sees: one picture, or T1c, T1, T2, FLAIR for BRATS."""
        if self.is_brats:
            return [render_slice(self.volumes[name], axis, index, "MRI") for name in SEQUENCE_ORDER]
        return [render_slice(self.primary, axis, index, self.modality)]


def detect_modality(volume: Volume) -> str:
    """``CT``, ``MRI`` or ``CXR`` from the data itself (see the module docstring)."""
    if volume.is_2d:
        return "CXR"
    if volume.modality:
        known = _DICOM_MODALITY.get(volume.modality.upper())
        if known:
            return known
    lowest = volume.derived("nanmin", _lowest)  # scanned once per volume, not every turn
    return "CT" if lowest < CT_AIR_HU else "MRI"


def _lowest(array: np.ndarray) -> float:
    return float(np.nanmin(array)) if array.size else 0.0


def canonical_modality(modality: str) -> str:
    known = _DICOM_MODALITY.get(modality.strip().upper())
    if known is None:
        raise StudyError(f"modality '{modality}' is not one of {', '.join(MODALITIES)}")
    return known


def open_study(
    paths: Mapping[str, str | Path],
    load: Callable[[str | Path], tuple[str, Volume]],
    modality: str | None = None,
) -> Study:
    """Load the study's volumes with ``load`` (a cached reader returning (key, volume)).

    Args:
        paths: ``{"image": path}`` or four sequences keyed by name (aliases such as t1ce accepted).
        modality: the client's override, or None to detect it.
    """
    if set(paths) != {"image"}:
        named: dict[str, str] = {}
        for name, path in paths.items():
            canonical = SEQUENCE_ALIASES.get(name.lower())
            if canonical is None:
                raise StudyError(f"'{name}' is not an MRI sequence name; use t1c, t1, t2 and flair")
            named[canonical] = str(path)
        missing = [name for name in SEQUENCE_ORDER if name not in named]
        if missing:
            raise StudyError(f"the four MRI sequences are needed; missing: {', '.join(missing)}")
        paths = named
    loaded = {name: load(path) for name, path in paths.items()}
    volumes = {name: volume for name, (_, volume) in loaded.items()}
    keys = {name: key for name, (key, _) in loaded.items()}
    study = Study({k: str(v) for k, v in paths.items()}, volumes, keys, "MRI")
    if not study.is_brats:
        study.modality = canonical_modality(modality) if modality else detect_modality(study.primary)
    elif modality and canonical_modality(modality) != "MRI":
        raise StudyError(f"four MRI sequences cannot be modality '{modality}'")
    return study
