"""The segments of a returned labelmap: names, label values, colours and Slicer terminology.

The server answers with ``label_names`` ``{name: label value}`` and ``label_colors``
``{name: [r, g, b]}`` (0-255). Each label becomes a :class:`SegmentSpec` with its colour as 0-1
floats and a 3D Slicer terminology entry: SNOMED CT codes from ``terminology.json`` for the labels
listed there, else the generic category "Anatomical Structure" with a type in this product's
private coding scheme that carries the label's name.

A terminology entry is serialized the way Slicer stores it in a segment's tag
(``vtkSegment.GetTerminologyEntryTagName()``)::

    context~category~type~type modifier~anatomic context~region~region modifier

with each code written ``scheme^value^meaning`` (``^^`` when absent).
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = [
    "Code",
    "SegmentSpec",
    "Terminology",
    "TerminologyTable",
    "assign_label_values",
    "decode_label_values",
    "encode_label_values",
    "fallback_color",
    "load_terminology",
    "segment_specs",
    "unnamed_segment_spec",
]

TERMINOLOGY_FILE = Path(__file__).with_name("terminology.json")
_SEPARATORS = re.compile(r"[~^|]")


@dataclass(frozen=True)
class Code:
    """A coded concept: coding scheme designator (``SCT`` = SNOMED CT), code value, code meaning."""

    scheme: str
    value: str
    meaning: str

    def serialize(self) -> str:
        return "^".join(_SEPARATORS.sub("-", part) for part in (self.scheme, self.value, self.meaning))


def _serialize(code: Code | None) -> str:
    return code.serialize() if code is not None else "^^"


@dataclass(frozen=True)
class Terminology:
    """What a segment is, in codes (DICOM SEG's segmented property category / type / region).

    Attributes:
        standard: True when the codes come from the curated table (SNOMED CT); False for the
            generic entry of a label the table does not list.
    """

    category: Code
    type: Code
    type_modifier: Code | None = None
    region: Code | None = None
    region_modifier: Code | None = None
    category_context: str = ""
    anatomic_context: str = ""
    standard: bool = True

    def serialize(self) -> str:
        """The string Slicer keeps in a segment's terminology tag."""
        return "~".join([
            self.category_context, _serialize(self.category), _serialize(self.type),
            _serialize(self.type_modifier), self.anatomic_context, _serialize(self.region),
            _serialize(self.region_modifier),
        ])


class TerminologyTable:
    """The curated label → terminology table (``terminology.json``)."""

    def __init__(self, table: Mapping):
        self.category_context = str(table["category_context"])
        self.anatomic_context = str(table["anatomic_context"])
        self.private_scheme = str(table["private_scheme"])
        self.codes = {key: Code(*map(str, value)) for key, value in table["codes"].items()}
        self.entries: dict[str, Terminology] = {}
        for name, entry in table["entries"].items():
            unknown = {value for key, value in entry.items() if value not in self.codes}
            if unknown:
                raise ValueError(f"terminology entry '{name}' names unknown codes: {sorted(unknown)}")
            self.entries[_key(name)] = Terminology(
                category=self.codes[entry["category"]], type=self.codes[entry["type"]],
                type_modifier=self._code(entry.get("modifier")), region=self._code(entry.get("region")),
                region_modifier=self._code(entry.get("region_modifier")),
                category_context=self.category_context, anatomic_context=self.anatomic_context,
            )
        self.generic_category = self.codes["anatomical structure"]

    def _code(self, key: str | None) -> Code | None:
        return self.codes[key] if key else None

    def lookup(self, name: str) -> Terminology:
        """The entry for a label name (case and spacing ignored), or the generic one."""
        found = self.entries.get(_key(name))
        if found is not None:
            return found
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:16] or "label"
        return Terminology(
            category=self.generic_category, type=Code(self.private_scheme, slug, name),
            category_context=self.category_context, anatomic_context=self.anatomic_context, standard=False,
        )


def _key(name: str) -> str:
    return " ".join(name.lower().split())


@lru_cache(maxsize=4)
def load_terminology(path: str | None = None) -> TerminologyTable:
    """The table in ``path`` (default: ``terminology.json`` beside this module), read once."""
    with open(path or TERMINOLOGY_FILE, encoding="utf-8") as handle:
        return TerminologyTable(json.load(handle))


@dataclass(frozen=True)
class SegmentSpec:
    """One segment to create: name, label value in the labelmap, colour (RGB 0-1), terminology."""

    name: str
    label_value: int
    color: tuple[float, float, float]
    terminology: Terminology

    @property
    def terminology_entry(self) -> str:
        return self.terminology.serialize()


def fallback_color(name: str) -> tuple[float, float, float]:
    """A stable, fairly saturated colour for a label the server sent no colour for."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    hue = digest[0] / 255.0
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.65, 0.9)
    return (round(red, 4), round(green, 4), round(blue, 4))


def _color(values: Sequence[float] | None, name: str) -> tuple[float, float, float]:
    if values is None or len(values) != 3:
        return fallback_color(name)
    try:
        rgb = [min(max(float(v), 0.0), 255.0) / 255.0 for v in values]
    except (TypeError, ValueError):
        return fallback_color(name)
    return (rgb[0], rgb[1], rgb[2])


def segment_specs(label_names: Mapping[str, int], label_colors: Mapping[str, Sequence[float]] | None = None,
                  table: TerminologyTable | None = None) -> list[SegmentSpec]:
    """Segment specs for a returned labelmap, ordered by label value; label value 0 (background) is skipped.

    Raises:
        ValueError: a label value that is not a positive integer, or two names with one value.
    """
    table = table or load_terminology()
    colors = label_colors or {}
    specs: list[SegmentSpec] = []
    seen: dict[int, str] = {}
    for name, value in label_names.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"label '{name}' has value {value!r}; label values are non-negative integers")
        if value == 0:
            continue
        if value in seen:
            raise ValueError(f"labels '{seen[value]}' and '{name}' share the value {value}")
        seen[value] = name
        specs.append(SegmentSpec(name, value, _color(colors.get(name), name), table.lookup(name)))
    return sorted(specs, key=lambda spec: spec.label_value)


def unnamed_segment_spec(label_value: int, taken: Iterable[str], table: TerminologyTable | None = None) -> SegmentSpec:
    """A segment for a label value the server sent no name for: ``label <value>`` (made unique among
    ``taken``), a stable colour and the generic terminology, so it can be told apart and saved."""
    taken = set(taken)
    name, suffix = f"label {label_value}", 2
    while name in taken:
        name, suffix = f"label {label_value} ({suffix})", suffix + 1
    return SegmentSpec(name, int(label_value), fallback_color(name), (table or load_terminology()).lookup(name))


def encode_label_values(specs: Iterable[SegmentSpec]) -> str:
    """``{name: label value}`` as text, to keep on a segmentation node (an attribute is a string)."""
    return json.dumps({spec.name: spec.label_value for spec in specs}, sort_keys=True)


def decode_label_values(text: str | None) -> dict[str, int]:
    """The inverse of :func:`encode_label_values`; empty for missing or unreadable text."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(name): value for name, value in data.items() if isinstance(value, int) and not isinstance(value, bool)}


def assign_label_values(segment_names: Sequence[str], known: Mapping[str, int]) -> dict[str, int]:
    """Label values for exporting a (corrected) segmentation: segments keep the value the server
    gave their name; segments the annotator added get the next free values above all known ones.

    Raises:
        ValueError: two segments with the same name (their voxels could not be told apart).
    """
    duplicates = sorted({name for name in segment_names if list(segment_names).count(name) > 1})
    if duplicates:
        raise ValueError(f"rename the segments that share a name before saving: {', '.join(duplicates)}")
    values: dict[str, int] = {}
    used = {value for value in known.values() if value > 0}
    next_free = max(used, default=0) + 1
    for name in segment_names:
        if known.get(name, 0) > 0:
            values[name] = known[name]
        else:
            values[name] = next_free
            next_free += 1
    return values
