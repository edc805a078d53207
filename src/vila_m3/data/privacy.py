"""Privacy of an export: hashed names, identifiers from DICOM headers, and the scan ``datagen-check`` runs.

Nothing that names a patient may reach the export: record ids and image file names are hashes
(:func:`hashed_id`, :func:`content_name`), and before anything is written every record is searched for
the identifiers read from the source DICOM headers (:func:`dicom_identifiers`). :func:`scan_export`
searches a finished export - JSON keys and values, text files, file names and PNG text chunks - for
those identifiers and for generic patterns (DICOM dates ``YYYYMMDD``, person names ``Family^Given``,
DICOM keywords such as ``PatientName``, DICOM UIDs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from PIL import Image

from vila_m3.imaging.io import has_dicom_preamble

ID_SALT = "vila-m3-datagen"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_NOT_DICOM = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".json", ".yaml", ".yml", ".txt",
              ".py", ".mha", ".mhd", ".raw", ".gz", ".zip", ".lock", ".log", ".md")
#: DICOM attributes whose values identify a patient or a visit (person names, ids, dates, UIDs, places).
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientAddress",
    "PatientTelephoneNumbers", "IssuerOfPatientID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "InstanceCreationDate", "AccessionNumber", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "StationName", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "FrameOfReferenceUID",
)
MIN_IDENTIFIER_LENGTH = 4

_PERSON_NAME = re.compile(r"[A-Za-z][A-Za-z'\-]*\^[A-Za-z]")
_KEYWORD = re.compile(
    r"Patient(?:Name|ID|BirthDate|Address|Sex|Age)|OtherPatientIDs|AccessionNumber|ReferringPhysicianName"
    r"|\(0010,00[0-3]0\)|0010\|00[0-3]0"
)
_EIGHT_DIGITS = re.compile(r"^\d{8}$")
_DATE_TOKEN = re.compile(r"(?<![\w.])(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?![\w.])")
_ISO_DATE = re.compile(r"(?<![\w.])(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])(?![\w.])")
_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){5,}(?![\w.])")


def hashed_id(seed: int, *parts: str, length: int = 16) -> str:
    """A name that does not reveal its source: sha256 of the seed and ``parts``, ``length`` hex characters."""
    text = "\x1f".join([ID_SALT, str(seed), *parts])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def content_name(data: bytes, length: int = 16, suffix: str = ".png") -> str:
    """File name from the content's sha256 (identical images share one file)."""
    return hashlib.sha256(data).hexdigest()[:length] + suffix


# ------------------------------------------------------------------------------ identifiers from DICOM


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` / ``.dicom`` / ``.ima`` file, or any file (not a known other format) with the ``DICM`` preamble."""
    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    if name.endswith(_NOT_DICOM) or name.startswith("."):
        return False
    return has_dicom_preamble(path)


def find_dicom_files(location: str | os.PathLike[str]) -> list[Path]:
    """DICOM files at ``location`` (a file, or a folder searched recursively), sorted."""
    location = Path(location)
    if location.is_file():
        return [location] if is_dicom_file(location) else []
    found = []
    for root, folders, files in os.walk(location):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if is_dicom_file(Path(root) / name))
    return found


def dicom_identifiers(files: Iterable[str | os.PathLike[str]]) -> set[str]:
    """Identifying values of the DICOM headers of ``files`` (see :data:`IDENTIFYING_KEYWORDS`).

    Person names also give their "Given Family", "Family Given" and "Family, Given" forms; dates
    (``YYYYMMDD``) also give ``YYYY-MM-DD``, ``DD.MM.YYYY``, ``MM/DD/YYYY`` and ``YYYY/MM/DD``. Values
    shorter than 4 characters are left out (they would match everywhere). Unreadable files are skipped.
    """
    found: set[str] = set()
    for path in files:
        try:
            dataset = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        except Exception:  # a broken file has no identifiers we could read
            continue
        for keyword in IDENTIFYING_KEYWORDS:
            element = dataset.get(keyword)
            if element is None or element == "":
                continue
            values = list(element) if isinstance(element, pydicom.multival.MultiValue) else [element]
            for value in values:
                found.update(_forms(keyword, str(value).strip()))
    return {value for value in found if len(value) >= MIN_IDENTIFIER_LENGTH}


def _forms(keyword: str, value: str) -> set[str]:
    if not value:
        return set()
    forms = {value}
    if keyword.endswith("Name") and "^" in value:
        parts = [part.strip() for part in value.split("^") if part.strip()]
        if len(parts) >= 2:
            family, given = parts[0], parts[1]
            forms |= {f"{given} {family}", f"{family} {given}", f"{family}, {given}"}
    if keyword.endswith("Date") and _EIGHT_DIGITS.match(value):
        y, m, d = value[:4], value[4:6], value[6:]
        forms |= {f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{m}/{d}/{y}", f"{y}/{m}/{d}"}
    return forms


# ----------------------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class Finding:
    """Something in an export that may identify a patient.

    Attributes:
        where: the file (relative to the export), with the JSON path or PNG chunk when inside one.
        text: the offending text (at most 120 characters around the match).
        reason: what it looks like.
    """

    where: str
    text: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}: {self.text!r}"


def scan_text(text: str, where: str, identifiers: Iterable[str] = (), whole_value: bool = False) -> list[Finding]:
    """Findings in one text.

    Args:
        text: a JSON key or value, a file name, a line of a text file, a PNG text chunk.
        where: where the text is, for the report.
        identifiers: known identifying values (case-insensitive substring match).
        whole_value: ``text`` is one value (a JSON string or a file name stem): also flag it when it is
            exactly eight digits (a DICOM date).
    """
    findings = []
    folded = text.casefold()
    for identifier in sorted(set(identifiers)):
        position = folded.find(identifier.casefold())
        if position >= 0:
            findings.append(Finding(where, _around(text, position), "identifier from the source DICOM headers"))
    checks = (
        (_PERSON_NAME, "looks like a DICOM person name (Family^Given)"),
        (_KEYWORD, "names a DICOM patient attribute"),
        (_DATE_TOKEN, "looks like a DICOM date (YYYYMMDD)"),
        (_ISO_DATE, "looks like a date (YYYY-MM-DD)"),
        (_UID, "looks like a DICOM UID"),
    )
    for pattern, reason in checks:
        match = pattern.search(text)
        if match:
            findings.append(Finding(where, _around(text, match.start()), reason))
    if whole_value and _EIGHT_DIGITS.match(text.strip()) and not any("YYYYMMDD" in f.reason for f in findings):
        findings.append(Finding(where, text, "eight digits: looks like a DICOM date (YYYYMMDD)"))
    return findings


def _around(text: str, position: int, width: int = 120) -> str:
    start = max(0, position - width // 3)
    return text[start:start + width]


def scan_json(value: object, where: str, identifiers: Iterable[str] = (), path: str = "$",
              clean: set[str] | None = None) -> list[Finding]:
    """Findings in every key and string value of a parsed JSON document.

    ``clean``: texts already found clean (repeated texts, such as the model card, are scanned once).
    """
    clean = set() if clean is None else clean
    findings: list[Finding] = []
    if isinstance(value, dict):
        for key, item in value.items():
            findings += _scan_value(str(key), f"{where} {path} (key)", identifiers, clean)
            findings += scan_json(item, where, identifiers, f"{path}.{key}", clean)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            findings += scan_json(item, where, identifiers, f"{path}[{index}]", clean)
    elif isinstance(value, str):
        findings += _scan_value(value, f"{where} {path}", identifiers, clean)
    return findings


def _scan_value(text: str, where: str, identifiers: Iterable[str], clean: set[str]) -> list[Finding]:
    if text in clean:
        return []
    findings = scan_text(text, where, identifiers, whole_value=True)
    if not findings:
        clean.add(text)
    return findings


def png_text_chunks(path: Path) -> Iterator[tuple[str, str]]:
    """(key, text) of the PNG's text chunks (tEXt, zTXt, iTXt) and other textual metadata."""
    with Image.open(path) as image:
        image.load()
        for key, value in getattr(image, "text", {}).items():
            yield str(key), str(value)
        for key, value in image.info.items():
            if isinstance(value, str | bytes) and key not in getattr(image, "text", {}):
                yield str(key), value.decode("latin-1") if isinstance(value, bytes) else value


def scan_export(folder: str | os.PathLike[str], identifiers: Iterable[str] = ()) -> list[Finding]:
    """Every finding in an export folder: file names, JSON files, text files and PNG text chunks.

    Args:
        folder: the export (``train.json``, ``val.json``, ``images/``, ...).
        identifiers: values known to identify patients (e.g. :func:`dicom_identifiers` of the sources).
    """
    folder = Path(folder)
    identifiers = {value for value in identifiers if len(value) >= MIN_IDENTIFIER_LENGTH}
    findings: list[Finding] = []
    clean: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        for part in relative.split("/"):
            stem = part.split(".", 1)[0]
            findings += scan_text(part, f"{relative} (file name)", identifiers)
            if _EIGHT_DIGITS.match(stem):
                findings.append(Finding(f"{relative} (file name)", part, "eight digits: looks like a DICOM date"))
        suffix = path.suffix.lower()
        if suffix == ".json":
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                findings.append(Finding(relative, "", "not valid JSON: cannot be checked"))
                continue
            findings += scan_json(document, relative, identifiers, clean=clean)
        elif suffix == ".png":
            try:
                for key, text in png_text_chunks(path):
                    findings += scan_text(f"{key}: {text}", f"{relative} (PNG text chunk {key})", identifiers)
            except OSError:
                findings.append(Finding(relative, "", "not a readable PNG: cannot be checked"))
        elif suffix in (".txt", ".md", ".csv", ".jsonl", ".yaml", ".yml"):
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                findings += scan_text(line, f"{relative}:{number}", identifiers)
    return findings
