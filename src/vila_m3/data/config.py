"""The data engine's settings (``configs/datagen.yaml``), checked once and hashed for the manifest."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vila_m3.configs import load_config

DATAGEN_CONFIG = "datagen.yaml"
CATEGORIES = ("vista3d", "brats", "cxr", "chat")
AXES = ("axial", "coronal", "sagittal")
_ANSWER_KEYS = ("yes", "no", "count_none", "count_one", "count_many", "visible", "visible_none", "findings",
                "findings_none")
VISTA3D_KINDS = ("presence", "visible", "count", "segment")
BRATS_KINDS = ("presence", "core", "enhancing", "edema", "visible", "segment")
CXR_KINDS = ("finding", "findings")


class DatagenConfigError(ValueError):
    """``datagen.yaml`` is invalid; the message names the entry."""


@dataclass(frozen=True)
class DatagenConfig:
    """The parsed ``datagen.yaml`` (see the comments there for what each entry means).

    Attributes:
        raw: the parsed file, as read (hashed into the manifest).
        seed: default seed.
        label_tag: the datastore tag of final labels.
        val_fraction: fraction of split units in val, in [0, 1).
        axes, slices_per_volume, positive_fraction: slice choice of 3D volumes.
        multipliers: ``{category: train repeat}`` for vista3d, brats, cxr, chat.
        card: ``product`` or ``all``.
        connectivity: 1, 2 or 3 (scipy.ndimage.generate_binary_structure rank-3 connectivity).
        templates, answers: texts (``str.format`` templates).
        vista3d, brats, cxr, chats: the per-source sections.
        id_length: hex characters of hashed ids and file names.
    """

    raw: Mapping[str, Any]
    seed: int
    label_tag: str
    val_fraction: float
    axes: tuple[str, ...]
    slices_per_volume: int
    positive_fraction: float
    multipliers: Mapping[str, int]
    card: str
    connectivity: int
    templates: Mapping[str, Any]
    answers: Mapping[str, str]
    vista3d: Mapping[str, Any]
    brats: Mapping[str, Any]
    cxr: Mapping[str, Any]
    chats: Mapping[str, Any]
    id_length: int

    def sha256(self) -> str:
        """sha256 of the settings (canonical JSON), as recorded in the manifest."""
        return canonical_sha256(self.raw)

    def kinds(self, category: str) -> tuple[str, ...]:
        """The conversation kinds enabled for ``vista3d``, ``brats`` or ``cxr``."""
        return tuple(getattr(self, category).get("kinds", ()))


def canonical_sha256(value: Any) -> str:
    """sha256 hex of ``value`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_datagen_config(path: str | os.PathLike[str] | None = None) -> DatagenConfig:
    """Read and check ``datagen.yaml`` (default: the configs folder's).

    Raises:
        DatagenConfigError: a missing or invalid entry (the message names it).
    """
    return parse_datagen_config(load_config(path or DATAGEN_CONFIG))


def parse_datagen_config(raw: Mapping[str, Any]) -> DatagenConfig:
    """Check a parsed ``datagen.yaml``; see :func:`load_datagen_config`."""
    slices = _mapping(raw, "slices")
    axes = tuple(slices.get("axes") or ("axial",))
    if not axes or any(axis not in AXES for axis in axes):
        raise DatagenConfigError(f"slices.axes must be a non-empty list of {', '.join(AXES)}; got {list(axes)}")
    per_volume = _integer(slices.get("per_volume", 4), "slices.per_volume", minimum=1)
    positive = _number(slices.get("positive_fraction", 0.5), "slices.positive_fraction", 0.0, 1.0)
    val_fraction = _number(raw.get("val_fraction", 0.2), "val_fraction", 0.0, 0.99)
    multipliers_raw = _mapping(raw, "multipliers")
    multipliers = {}
    for category in CATEGORIES:
        multipliers[category] = _integer(multipliers_raw.get(category, 1), f"multipliers.{category}", minimum=0)
    unknown = sorted(set(multipliers_raw) - set(CATEGORIES))
    if unknown:
        raise DatagenConfigError(f"multipliers: unknown categories {unknown}; valid: {', '.join(CATEGORIES)}")
    card = raw.get("card", "product")
    if card not in ("product", "all"):
        raise DatagenConfigError(f"card must be 'product' or 'all', got {card!r}")
    connectivity = _integer(raw.get("connectivity", 1), "connectivity", minimum=1)
    if connectivity > 3:
        raise DatagenConfigError(f"connectivity must be 1, 2 or 3, got {connectivity}")
    templates = _mapping(raw, "templates")
    for key in ("image_prefix", "brats_prefix"):
        if not isinstance(templates.get(key), str):
            raise DatagenConfigError(f"templates.{key} must be a string")
    for key, experts in (("trigger", ("VISTA3D", "BRATS", "CXR")), ("segmented", ("VISTA3D", "BRATS"))):
        section = templates.get(key)
        if not isinstance(section, Mapping) or any(not isinstance(section.get(e), str) for e in experts):
            raise DatagenConfigError(f"templates.{key} needs a text for each of {', '.join(experts)}")
    answers = _mapping(raw, "answers")
    missing = [key for key in _ANSWER_KEYS if not isinstance(answers.get(key), str)]
    if missing:
        raise DatagenConfigError(f"answers: missing texts for {', '.join(missing)} (quote the keys 'yes' and 'no')")
    sections = {}
    for name, valid in (("vista3d", VISTA3D_KINDS), ("brats", BRATS_KINDS), ("cxr", CXR_KINDS)):
        section = _mapping(raw, name)
        kinds = section.get("kinds", list(valid))
        strangers = [kind for kind in kinds if kind not in valid]
        if strangers:
            raise DatagenConfigError(f"{name}.kinds: unknown kinds {strangers}; valid: {', '.join(valid)}")
        sections[name] = section
    regions = sections["brats"].get("regions", {})
    for kind in ("presence", "core", "enhancing", "edema"):
        ids = regions.get(kind)
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            raise DatagenConfigError(f"brats.regions.{kind} must be a non-empty list of label ids")
    chats = raw.get("chats") or {}
    if chats.get("changed_feedback", "keep") not in ("keep", "skip"):
        raise DatagenConfigError("chats.changed_feedback must be 'keep' or 'skip'")
    privacy = raw.get("privacy") or {}
    id_length = _integer(privacy.get("id_length", 16), "privacy.id_length", minimum=8)
    return DatagenConfig(
        raw=raw, seed=_integer(raw.get("seed", 0), "seed", minimum=0), label_tag=str(raw.get("label_tag", "final")),
        val_fraction=val_fraction, axes=axes, slices_per_volume=per_volume, positive_fraction=positive,
        multipliers=multipliers, card=card, connectivity=connectivity, templates=templates, answers=answers,
        vista3d=sections["vista3d"], brats=sections["brats"], cxr=sections["cxr"], chats=chats,
        id_length=min(id_length, 64),
    )


def _mapping(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise DatagenConfigError(f"{key} must be a mapping")
    return value


def _integer(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DatagenConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise DatagenConfigError(f"{where} must be a number in [{low}, {high}], got {value!r}")
    return float(value)
