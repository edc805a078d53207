"""Privacy of an export: hashed names, identifiers from DICOM headers, and the scan ``datagen-check`` runs.

Nothing that names a patient may reach the export: record ids and image file names are hashes
(:func:`hashed_id`, :func:`content_name`), and before anything is written every record is searched for
the identifiers read from the source DICOM headers (:func:`dicom_identifiers`). :func:`scan_export`
searches a finished export - JSON keys and values, text files, file names and PNG text chunks - for
those identifiers and for generic patterns (DICOM dates ``YYYYMMDD``, person names ``Family^Given``,
DICOM keywords such as ``PatientName``, DICOM UIDs) and for what people type into a chat: record
numbers (``MRN 12345678``, ``patient id: 4711-0815``, ``DOB 01/02/1960``, a standalone run of six or
more digits near such words) and titled names (``Mr. Smith``, ``Dr Jones``, ``Patient John Q Smith``,
``named Smith``). Each finding has a :attr:`Finding.kind`; :data:`SKIP_REASONS` words the reason a
record is left out for, without quoting what was found (the reason is written to ``summary.txt``,
which the same scan checks).
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
#: Words after or near which a number identifies a patient (record numbers, ids, birth dates).
_RECORD_WORD = re.compile(
    r"(?<![A-Za-z])(?:MRN|M\.R\.N|medical\s+record|(?:record|chart|case|hospital|accession|insurance|NHS|health\s+card)"
    r"\s+(?:number|no|num|#|id)|patient(?:'s)?\s+(?:id|identifier|number|no|num|#)|NHS|SSN|social\s+security"
    r"|accession|DOB|D\.O\.B|date\s+of\s+birth|birth\s*date|born|(?-i:ID))(?![A-Za-z])",
    re.IGNORECASE,
)
#: A number right after a record word: four or more digits (separators allowed) or a d/m/y date.
_NUMBER_AFTER = re.compile(r"[^A-Za-z0-9]{0,6}(?:(?:is|was|of|on|number|no|num)\b[^A-Za-z0-9]{0,4}){0,2}"
                           r"(?:\d[\d /.-]{2,}\d|\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4})", re.IGNORECASE)
#: A standalone run of six or more digits (spaces or hyphens between them allowed).
_LONG_NUMBER = re.compile(r"(?<![\w.])\d(?:[ -]?\d){5,}(?![\w.])")
_NEAR = 40
_CAPITALISED = r"[A-Z][a-z][A-Za-z'\u2019-]*"
#: A courtesy or professional title before a capitalised name.
_TITLED_NAME = re.compile(rf"(?<![A-Za-z])(?:Mr|Mrs|Ms|Mx|Miss|Dr|Prof)\.?\s+{_CAPITALISED}")
#: "Patient John Smith", "patient: John Q. Smith", "the patient's name is John Smith".
_PATIENT_NAME = re.compile(
    rf"(?<![A-Za-z])[Pp]atient(?:'s)?(?:\s+name)?(?:\s*[:,]|\s+(?:is|was|named|called))?\s+{_CAPITALISED}"
    rf"(?:\s+[A-Z]\.?)?\s+{_CAPITALISED}"
)
#: "named Smith", "called John", "name is Smith", "name: Smith".
_NAMED = re.compile(rf"(?<![A-Za-z])(?:named|called|[Nn]ame\s+is|[Nn]ame\s*:)\s+{_CAPITALISED}")

#: Finding kinds and the reason a record holding one is left out for. None of these reasons is itself
#: flagged by :func:`scan_text`, and none quotes the text found.
SKIP_REASONS = {
    "identifier": "left out: free text held a value from the study's DICOM headers",
    "record_number": "left out: free text held an identifying number",
    "name": "left out: free text held a person's name",
    "date": "left out: free text held a date",
    "dicom": "left out: free text named a DICOM patient attribute",
    "uid": "left out: free text held a DICOM UID",
}


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
    kind: str = "identifier"

    @property
    def skip_reason(self) -> str:
        """Why a record holding this is left out, worded without the text found."""
        return SKIP_REASONS.get(self.kind, SKIP_REASONS["identifier"])

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
        (_PERSON_NAME, "looks like a DICOM person name (Family^Given)", "name"),
        (_KEYWORD, "names a DICOM patient attribute", "dicom"),
        (_DATE_TOKEN, "looks like a DICOM date (YYYYMMDD)", "date"),
        (_ISO_DATE, "looks like a date (YYYY-MM-DD)", "date"),
        (_UID, "looks like a DICOM UID", "uid"),
        (_TITLED_NAME, "looks like a titled person name (Mr., Dr. ...)", "name"),
        (_PATIENT_NAME, "looks like a patient's name", "name"),
        (_NAMED, "looks like a person named in free text", "name"),
    )
    for pattern, reason, kind in checks:
        match = pattern.search(text)
        if match:
            findings.append(Finding(where, _around(text, match.start()), reason, kind))
    position = record_number_position(text)
    if position is not None:
        findings.append(Finding(where, _around(text, position), "looks like a record number or birth date",
                                "record_number"))
    if whole_value and _EIGHT_DIGITS.match(text.strip()) and not any("YYYYMMDD" in f.reason for f in findings):
        findings.append(Finding(where, text, "eight digits: looks like a DICOM date (YYYYMMDD)", "date"))
    return findings


def record_number_position(text: str) -> int | None:
    """Where ``text`` gives what looks like a record number or birth date, or None.

    A record word (MRN, medical record, patient id, DOB, date of birth, NHS, SSN, accession, ``ID``,
    ...) followed by a number of four or more digits or a d/m/y date, or a standalone run of six or
    more digits within 40 characters of a record word.
    """
    words = list(_RECORD_WORD.finditer(text))
    if not words:
        return None
    for word in words:
        if _NUMBER_AFTER.match(text, word.end()) is not None:
            return word.start()
    for number in _LONG_NUMBER.finditer(text):
        if any(word.start() - _NEAR <= number.start() and number.end() <= word.end() + _NEAR for word in words):
            return number.start()
    return None


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


# ------------------------------------------------------------------------------ the export's result


PRIVACY_CHECK = "the data engine's privacy check (vila-m3 datagen-check)"


def export_privacy_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why the export ``folder`` must not be trained on, or None when its privacy check passed.

    Reads the result the export recorded (``manifest.json`` ``privacy.passed``) and scans the texts
    training reads (``train.json``, ``val.json``) again for the generic patterns, so that an export
    edited after it was checked is refused too. The message names the export by its folder name only.
    """
    folder = Path(folder)
    name = folder.name or str(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        return (f"export {name!r} has no readable manifest.json, so {PRIVACY_CHECK} cannot be confirmed; "
                "train only on exports made by vila-m3 datagen")
    privacy = manifest.get("privacy")
    if not isinstance(privacy, dict) or "passed" not in privacy:
        return (f"export {name!r} records no result of {PRIVACY_CHECK} (made by an older version?); "
                "export it again with vila-m3 datagen")
    if privacy.get("passed") is not True:
        count = privacy.get("findings")
        found = f" ({count} finding(s))" if isinstance(count, int) else ""
        return (f"export {name!r} failed {PRIVACY_CHECK}{found}: it may identify patients and is not trained on; "
                f"run `vila-m3 datagen-check {name}` to see the findings, remove them at the source, and export again")
    findings: list[Finding] = []
    clean: set[str] = set()
    for split in ("train.json", "val.json"):
        try:
            document = json.loads((folder / split).read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return f"export {name!r}: {split} is not valid JSON, so {PRIVACY_CHECK} cannot be confirmed"
        findings += scan_json(document, split, clean=clean)
    if findings:
        return (f"export {name!r} passed {PRIVACY_CHECK} when it was made, but its {findings[0].where.split()[0]} "
                f"now holds {len(findings)} finding(s) (edited since?): it is not trained on; run "
                f"`vila-m3 datagen-check {name}` and export again")
    return None
