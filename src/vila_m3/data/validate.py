"""Checks of an export's structure: the JSON schema, ``<image>`` counts, turn order, files and checksums.

:func:`schema_errors` is a small JSON-schema (draft-07) validator covering what
``configs/datagen_schema.json`` uses (type, enum, const, pattern, minLength, required, properties,
additionalProperties, items, minItems, maxItems, not, allOf, anyOf, oneOf, local ``$ref``), so the
check needs no extra package.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from vila_m3.configs import load_config
from vila_m3.experts.feedback import IMAGE_TOKEN

SCHEMA_FILE = "datagen_schema.json"
SPLIT_FILES = ("train.json", "val.json")
_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def load_schema() -> dict[str, Any]:
    """``configs/datagen_schema.json``."""
    return load_config(SCHEMA_FILE)


def schema_errors(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None,
                  path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (empty when it is valid)."""
    root = root if root is not None else schema
    if "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $ref are supported, got {ref}")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        return schema_errors(value, target, root, path)
    errors: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        expected = _TYPES[kind]
        wrong = not isinstance(value, expected) or (kind in ("integer", "number") and isinstance(value, bool))
        if wrong:
            return [f"{path}: expected {kind}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {value!r} is not {schema['const']!r}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing '{key}'")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], root, f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected '{key}'")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for index, item in enumerate(value):
                errors += schema_errors(item, schema["items"], root, f"{path}[{index}]")
    if "not" in schema and not schema_errors(value, schema["not"], root, path):
        errors.append(f"{path}: matches a form it must not have ({json.dumps(schema['not'])})")
    for sub in schema.get("allOf", []):
        errors += schema_errors(value, sub, root, path)
    if "anyOf" in schema and all(schema_errors(value, sub, root, path) for sub in schema["anyOf"]):
        errors.append(f"{path}: matches none of anyOf")
    if "oneOf" in schema and sum(not schema_errors(value, sub, root, path) for sub in schema["oneOf"]) != 1:
        errors.append(f"{path}: does not match exactly one of oneOf")
    return errors


def record_problems(record: dict[str, Any], folder: Path, where: str) -> list[str]:
    """Beyond the schema: one ``<image>`` per image, turns alternating human / gpt, image files present."""
    problems = []
    images = [record["image"]] if "image" in record else list(record.get("images", []))
    turns = record.get("conversations", [])
    placeholders = sum(str(turn.get("value", "")).count(IMAGE_TOKEN) for turn in turns)
    if placeholders != len(images):
        problems.append(f"{where}: {placeholders} <image> placeholders for {len(images)} images")
    speakers = [turn.get("from") for turn in turns]
    expected = ["human" if i % 2 == 0 else "gpt" for i in range(len(speakers))]
    if speakers != expected or (speakers and speakers[-1] != "gpt"):
        problems.append(f"{where}: turns must alternate human, gpt, ... and end with gpt; got {speakers}")
    for image in images:
        if not (folder / image).is_file():
            problems.append(f"{where}: image {image} is missing")
    return problems


def check_structure(folder: str | Path) -> list[str]:
    """Every structural problem of an export: schema, records, manifest checksums, unlisted files."""
    folder = Path(folder)
    schema = load_schema()
    problems: list[str] = []
    for name in SPLIT_FILES:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"{name}: not valid JSON ({err})")
            continue
        problems += [f"{name} {error}" for error in schema_errors(records, schema)[:50]]
        if isinstance(records, list):
            for index, record in enumerate(records):
                if isinstance(record, dict):
                    problems += record_problems(record, folder, f"{name}[{index}]")
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return [*problems, "manifest.json is missing"]
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    listed = {entry["path"]: entry["sha256"] for entry in manifest.get("files", [])}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    for relative in sorted(present - set(listed)):
        problems.append(f"{relative}: not listed in manifest.json")
    for relative, digest in sorted(listed.items()):
        path = folder / relative
        if not path.is_file():
            problems.append(f"{relative}: listed in manifest.json but missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{relative}: sha256 differs from manifest.json")
    return problems
