"""Deduplication, the train / val split by patient or volume, record ids, and category repeats.

- Duplicates: records with the same texts and the same image bytes (``Record.content_key``) are
  kept once (the first, in source order).
- Split: every record of one split unit (a patient, else a volume or MRI study, see
  :mod:`vila_m3.data.cases`) goes to the same split. Units are ordered by a seeded hash and the first
  ``round(n * val_fraction)`` (at least one when there are two or more units) go to val.
- Ids: sha256 of the seed, the source and the content (truncated), so they reveal nothing.
- Repeats: the paper's "dataset x repeat": each train record of category ``c`` is listed
  ``multipliers[c]`` times (copies get ``<id>.2``, ``<id>.3``, ...); val lists each record once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vila_m3.data.privacy import hashed_id
from vila_m3.data.records import Record

TRAIN, VAL = "train", "val"


@dataclass(frozen=True)
class Placed:
    """A record with its id, split and how often it is listed."""

    record_id: str
    split: str
    repeats: int
    record: Record


def deduplicate(records: Iterable[Record]) -> tuple[list[Record], int]:
    """(records without repeats of the same content, how many were dropped)."""
    records = list(records)
    seen: set[str] = set()
    kept: list[Record] = []
    for record in records:
        key = record.content_key()
        if key not in seen:
            seen.add(key)
            kept.append(record)
    return kept, len(records) - len(kept)


def split_units(keys: Iterable[str], val_fraction: float, seed: int) -> dict[str, str]:
    """``{unit: "train" | "val"}`` for every distinct unit key."""
    units = sorted(set(keys))
    order = sorted(units, key=lambda key: hashed_id(seed, "split", key, length=64))
    n_val = int(round(len(units) * val_fraction))
    if val_fraction > 0 and len(units) >= 2:
        n_val = min(max(n_val, 1), len(units) - 1)
    val = set(order[:n_val])
    return {unit: VAL if unit in val else TRAIN for unit in units}


def place(records: list[Record], val_fraction: float, seed: int, multipliers: Mapping[str, int],
          id_length: int = 16) -> tuple[list[Placed], dict[str, str]]:
    """Ids, splits and repeats of deduplicated records; also returns the unit → split map."""
    splits = split_units((record.split_key for record in records), val_fraction, seed)
    placed = []
    for record in records:
        split = splits[record.split_key]
        repeats = int(multipliers.get(record.category, 1)) if split == TRAIN else 1
        record_id = hashed_id(seed, "record", record.source, record.content_key(), length=id_length)
        placed.append(Placed(record_id, split, repeats, record))
    return placed, splits


def listed(placed: Iterable[Placed], split: str) -> list[dict]:
    """The JSON records of one split, each as often as its repeats say, in a stable order."""
    rows = []
    for item in placed:
        if item.split != split:
            continue
        for copy in range(item.repeats):
            rows.append(item.record.as_json(item.record_id if copy == 0 else f"{item.record_id}.{copy + 1}"))
    return rows
