"""Cases: an image (or the four MRI sequences of a study) with the annotator's final label, checked.

A case is what conversations are made from. :func:`collect_cases` pairs the datastore's images with
their final labels (four sequences ``<study>_{t1c,t1,t2,flair}`` form one BRATS case); :func:`load_case`
reads and checks one case and decides what it is: a CT with a VISTA3D labelmap, a four-sequence MRI
with a BRATS labelmap (1, 2, 4), or a chest X-ray with confirmed findings (JSON). Whatever cannot be
used raises :class:`CaseError` with a reason that names no file (the export lists it).

The split unit of a case (:attr:`LoadedCase.split_key`) is the patient when the image is DICOM
(PatientID), else the image id (the study name for BRATS).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from vila_m3.chat.study import detect_modality
from vila_m3.data.privacy import dicom_identifiers, find_dicom_files
from vila_m3.data.sources import DatastoreImage, DatastoreSource, Skip
from vila_m3.imaging import Volume, VolumeReadError, read_labelmap, read_volume
from vila_m3.imaging.sequences import SEQUENCE_ORDER, sequence_of

BRATS_LABEL_IDS = (1, 2, 4)


class CaseError(ValueError):
    """A case cannot be used; the message is the reason shown in the summary (no file paths)."""


@dataclass(frozen=True)
class Case:
    """An image (or MRI study) with a final label, before reading.

    Attributes:
        source_id: the image id, or the study name of four MRI sequences (raw: never written).
        images: ``{"image": image}`` or ``{"t1c": ..., "t1": ..., "t2": ..., "flair": ...}``.
        labelled: the image whose final label is used.
    """

    source_id: str
    images: dict[str, DatastoreImage]
    labelled: DatastoreImage

    @property
    def is_brats(self) -> bool:
        return set(self.images) == set(SEQUENCE_ORDER)

    @property
    def image_ids(self) -> tuple[str, ...]:
        return tuple(image.image_id for image in self.images.values())


@dataclass
class LoadedCase:
    """A read and checked case.

    Attributes:
        category: ``vista3d``, ``brats`` or ``cxr``.
        modality: ``CT``, ``MRI`` or ``CXR``.
        volumes: ``{"image": volume}`` or the four sequences (arrays (z, y, x)).
        labels: the final labelmap on the image's grid (None for a chest X-ray).
        findings: ``{pathology: present}`` of a chest X-ray (None otherwise).
        split_key: the split unit (raw; hashed before anything is written).
        identifiers: identifying values of the image's DICOM headers (empty for other formats).
    """

    case: Case
    category: str
    modality: str
    volumes: dict[str, Volume]
    labels: Volume | None
    findings: dict[str, bool] | None
    split_key: str
    identifiers: set[str] = field(default_factory=set)

    def content_digest(self) -> str:
        """sha256 of the voxels, geometry and label (or findings): equal for copies of one study under other ids."""
        digest = hashlib.sha256()
        for name in sorted(self.volumes):
            volume = self.volumes[name]
            digest.update(f"{name}|{volume.array.dtype}|{volume.geometry}".encode())
            digest.update(np.ascontiguousarray(volume.array).data)
        if self.labels is not None:
            digest.update(f"labels|{self.labels.array.dtype}".encode())
            digest.update(np.ascontiguousarray(self.labels.array).data)
        if self.findings is not None:
            digest.update(json.dumps(self.findings, sort_keys=True).encode())
        return digest.hexdigest()

    @property
    def primary(self) -> Volume:
        """The volume slices are taken from and overlays drawn on (T1c for BRATS)."""
        return self.volumes["t1c"] if "t1c" in self.volumes else self.volumes["image"]


def collect_cases(source: DatastoreSource) -> tuple[list[Case], list[Skip]]:
    """The datastore's cases (sorted by source id) and the labels that cannot form one.

    Four images ``<study>_t1c/_t1/_t2/_flair`` form one BRATS case when any of them has a final label
    (the first in T1c, T1, T2, FLAIR order is used; further ones are listed as skipped).
    """
    images = source.images()
    skips = [Skip(name, "label", "label without its image") for name in source.orphan_labels()]
    studies: dict[str, dict[str, DatastoreImage]] = {}
    for image in images:
        found = sequence_of(image.file_name)
        if found:
            studies.setdefault(found[0], {}).setdefault(found[1], image)
    cases: list[Case] = []
    in_studies: set[str] = set()
    for study, sequences in sorted(studies.items()):
        if set(sequences) != set(SEQUENCE_ORDER):
            continue
        ordered = {name: sequences[name] for name in SEQUENCE_ORDER}
        in_studies.update(image.image_id for image in ordered.values())
        labelled = [image for image in ordered.values() if image.label_name]
        if not labelled:
            continue
        cases.append(Case(study, ordered, labelled[0]))
        skips += [Skip(image.label_name or image.image_id, "label",
                       "another final label of the same MRI study is used") for image in labelled[1:]]
    for image in images:
        if image.label_name and image.image_id not in in_studies:
            cases.append(Case(image.image_id, {"image": image}, image))
    cases.sort(key=lambda case: case.source_id)
    return cases, skips


def load_case(case: Case, source: DatastoreSource) -> LoadedCase:
    """Read a case's image(s) and final label, check them and decide the category.

    Raises:
        CaseError: unreadable image or label, geometry mismatch, empty label, a label of the wrong
            kind for the image (the message is the reason).
    """
    paths = {name: _fetch(source.image_path, image, "image") for name, image in case.images.items()}
    volumes = {name: _read(read_volume, path, "image") for name, path in paths.items()}
    label_path = _fetch(source.label_path, case.labelled, "label")
    identifiers: set[str] = set()
    split_key = f"study:{case.source_id}" if case.is_brats else f"image:{case.source_id}"
    dicom_files = [file for path in paths.values() for file in find_dicom_files(path)]
    if dicom_files:
        identifiers = dicom_identifiers(dicom_files)
        patient = _patient_id(dicom_files[0])
        if patient:
            split_key = f"patient:{patient}"
    if case.is_brats:
        return _brats_case(case, volumes, label_path, split_key, identifiers)
    volume = volumes["image"]
    modality = detect_modality(volume)
    if label_path.name.lower().endswith(".json"):
        if modality != "CXR":
            raise CaseError(f"a findings label (JSON) belongs to a chest X-ray; this image is {modality}")
        findings = read_findings(label_path)
        return LoadedCase(case, "cxr", "CXR", volumes, None, findings, split_key, identifiers)
    if modality == "CXR":
        raise CaseError("a chest X-ray's final label is its confirmed findings (JSON), not a labelmap")
    if modality == "MRI":
        raise CaseError("an MRI label needs the four sequences (t1c, t1, t2, flair) side by side as "
                        "<study>_<sequence> images; this image has none")
    labels = _read(read_labelmap, label_path, "label")
    _check_geometry(labels, volume)
    if not labels.array.any():
        raise CaseError("the final label is empty")
    return LoadedCase(case, "vista3d", "CT", volumes, labels, None, split_key, identifiers)


def read_findings(path: Path) -> dict[str, bool]:
    """``{"findings": {name: true | false}}`` → ``{name: bool}`` (numbers count as ``>= 0.5``).

    Raises:
        CaseError: not JSON, or not that shape.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise CaseError("unreadable label: the findings file is not JSON") from None
    findings = data.get("findings") if isinstance(data, dict) else None
    if not isinstance(findings, dict) or not findings:
        raise CaseError('the findings label must be {"findings": {"<pathology>": true | false, ...}}')
    result = {}
    for name, value in findings.items():
        if isinstance(value, bool):
            result[str(name)] = value
        elif isinstance(value, int | float) and 0.0 <= float(value) <= 1.0:
            result[str(name)] = float(value) >= 0.5
        else:
            raise CaseError(f"finding {name!r} must be true or false, got {value!r}")
    return result


def _brats_case(case: Case, volumes: dict[str, Volume], label_path: Path, split_key: str,
                identifiers: set[str]) -> LoadedCase:
    reference = volumes["t1c"]
    if any(not volume.geometry.allclose(reference.geometry) for volume in volumes.values()):
        raise CaseError("the four MRI sequences do not share one geometry")
    labels = _read(read_labelmap, label_path, "label")
    _check_geometry(labels, reference)
    ids = {int(v) for v in np.unique(labels.array)} - {0}
    if not ids:
        raise CaseError("the final label is empty")
    strangers = sorted(ids - set(BRATS_LABEL_IDS))
    if strangers:
        raise CaseError(f"a BRATS label holds 1 (tumor core), 2 (edema) and 4 (enhancing tumor); this one also {strangers}")
    return LoadedCase(case, "brats", "MRI", volumes, labels, None, split_key, identifiers)


def _fetch(getter, image: DatastoreImage, what: str) -> Path:
    try:
        return getter(image)
    except (FileNotFoundError, OSError) as err:
        raise CaseError(f"{what} not available: {err}") from None


def _read(reader, path: Path, what: str) -> Volume:
    try:
        return reader(path)
    except VolumeReadError as err:
        reason = str(err).replace(str(path), "").lstrip(": ").strip() or "unreadable"
        raise CaseError(f"unreadable {what}: {reason}") from None


def _check_geometry(labels: Volume, image: Volume) -> None:
    if labels.geometry.allclose(image.geometry):
        return

    def describe(geometry) -> str:
        size = "x".join(str(n) for n in geometry.shape)
        spacing = "x".join(f"{s:g}" for s in geometry.spacing)
        origin = ", ".join(f"{o:.1f}" for o in geometry.origin)
        return f"size {size}, spacing {spacing} mm, origin ({origin}) mm"

    raise CaseError(f"label geometry does not match its image (label: {describe(labels.geometry)}; "
                    f"image: {describe(image.geometry)})")


def _patient_id(path: Path) -> str | None:
    try:
        dataset = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception:  # no header, no patient
        return None
    value = str(dataset.get("PatientID", "") or "").strip()
    return value or None
