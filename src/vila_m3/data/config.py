"""The data engine's settings (``configs/datagen.yaml``), checked once and hashed for the manifest."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vila_m3.configs import load_config

DATAGEN_CONFIG = "datagen.yaml"
CATEGORIES = ("vista3d", "brats", "cxr", "general", "chat")
AXES = ("axial", "coronal", "sagittal")
_ANSWER_KEYS = ("yes", "no", "count_none", "count_one", "count_many", "visible", "visible_none", "findings",
                "findings_none")
VISTA3D_KINDS = ("presence", "visible", "count", "segment")
BRATS_KINDS = ("presence", "core", "enhancing", "edema", "visible", "segment")
CXR_KINDS = ("finding", "findings")
GENERAL_KINDS = ("modality", "plane")
MODALITIES = ("CT", "MRI", "CXR")
PHRASING_USES = ("all", "train", "heldout")
PRESENCE_STRUCTURES = ("owned", "all")
DEFAULT_HELDOUT_FRACTION = 0.25


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
        multipliers: ``{category: train repeat}`` for vista3d, brats, cxr, general, chat.
        card: ``product`` or ``all``.
        connectivity: 1, 2 or 3 (scipy.ndimage.generate_binary_structure rank-3 connectivity).
        templates, answers: texts (``str.format`` templates).
        vista3d, brats, cxr, chats: the per-source sections.
        id_length: hex characters of hashed ids and file names.
        general: the section of questions that need no expert (kinds, per_case, answers).
        heldout_fraction: share of each question kind's phrasings held out of training (``questions``).
        phrasings: which phrasings are drawn: ``all``, ``train`` or ``heldout`` (``questions.use``).
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
    general: Mapping[str, Any] = field(default_factory=dict)
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    phrasings: str = "all"

    def sha256(self) -> str:
        """sha256 of the settings (canonical JSON), as recorded in the manifest."""
        return canonical_sha256(self.raw)

    def kinds(self, category: str) -> tuple[str, ...]:
        """The conversation kinds enabled for ``vista3d``, ``brats``, ``cxr`` or ``general``."""
        return tuple(getattr(self, category).get("kinds", ()))

    def with_phrasings(self, use: str) -> DatagenConfig:
        """These settings with ``questions.use`` replaced (``all``, ``train`` or ``heldout``)."""
        if use not in PHRASING_USES:
            raise DatagenConfigError(f"questions.use must be one of {', '.join(PHRASING_USES)}, got {use!r}")
        raw = {**self.raw, "questions": {**(self.raw.get("questions") or {}), "use": use}}
        return replace(self, raw=raw, phrasings=use)


def canonical_sha256(value: Any) -> str:
    """sha256 hex of ``value`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_datagen_config(path: str | os.PathLike[str] | None = None) -> DatagenConfig:
    """Read and check ``datagen.yaml`` (default: the configs folder's).

    ``path`` is a file (absolute, or relative to the working directory) or a name in the configs folder.

    Raises:
        DatagenConfigError: a missing or invalid entry (the message names it).
        FileNotFoundError: no such file.
    """
    if path is not None and Path(path).is_file():
        path = Path(path).resolve()
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
    for name, valid in (("vista3d", VISTA3D_KINDS), ("brats", BRATS_KINDS), ("cxr", CXR_KINDS),
                        ("general", GENERAL_KINDS)):
        section = _mapping(raw, name)
        kinds = section.get("kinds", list(valid))
        strangers = [kind for kind in kinds if kind not in valid]
        if strangers:
            raise DatagenConfigError(f"{name}.kinds: unknown kinds {strangers}; valid: {', '.join(valid)}")
        sections[name] = section
    _check_vista3d(sections["vista3d"])
    _check_general(sections["general"])
    heldout_fraction, phrasings = _check_questions(_mapping(raw, "questions"))
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
        id_length=min(id_length, 64), general=sections["general"], heldout_fraction=heldout_fraction,
        phrasings=phrasings,
    )


def _check_vista3d(section: Mapping[str, Any]) -> None:
    """``subjects``, ``synonyms``, ``synonym_fraction`` and ``presence_structures`` of the vista3d section."""
    for key in ("subjects", "plurals", "targets", "focus"):
        entries = section.get(key) or {}
        if not isinstance(entries, Mapping) or any(not isinstance(v, str) or not v.strip() for v in entries.values()):
            raise DatagenConfigError(f"vista3d.{key} must map names to non-empty texts")
    if not isinstance(section.get("default_subject", "{group} structures"), str):
        raise DatagenConfigError("vista3d.default_subject must be a text")
    synonyms = section.get("synonyms") or {}
    if not isinstance(synonyms, Mapping):
        raise DatagenConfigError("vista3d.synonyms must map structure names to lists of other names")
    seen: dict[str, str] = {}
    for name, others in synonyms.items():
        if not isinstance(others, list) or any(not isinstance(o, str) or not o.strip() for o in others):
            raise DatagenConfigError(f"vista3d.synonyms.{name} must be a list of non-empty names")
        for other in others:
            if other == name or other in synonyms or seen.get(other, name) != name:
                raise DatagenConfigError(f"vista3d.synonyms: {other!r} names more than one structure")
            seen[other] = name
    _number(section.get("synonym_fraction", 0.0), "vista3d.synonym_fraction", 0.0, 1.0)
    presence = section.get("presence_structures", "owned")
    if presence not in PRESENCE_STRUCTURES:
        raise DatagenConfigError(f"vista3d.presence_structures must be one of {', '.join(PRESENCE_STRUCTURES)}, "
                                 f"got {presence!r}")


def _check_general(section: Mapping[str, Any]) -> None:
    """``per_case`` and the answer texts of the general section (questions that need no expert)."""
    _integer(section.get("per_case", 1), "general.per_case", minimum=0)
    answers = section.get("answers") or {}
    for key, needed in (("modality", MODALITIES), ("plane", AXES)):
        if key not in (section.get("kinds") or ()):
            continue
        texts = answers.get(key)
        if not isinstance(texts, Mapping) or any(not isinstance(texts.get(n), str) for n in needed):
            raise DatagenConfigError(f"general.answers.{key} needs a text for each of {', '.join(needed)}")


def _check_questions(section: Mapping[str, Any]) -> tuple[float, str]:
    """(heldout_fraction, use) of the questions section."""
    fraction = _number(section.get("heldout_fraction", DEFAULT_HELDOUT_FRACTION), "questions.heldout_fraction", 0.0, 1.0)
    if not 0.0 < fraction < 1.0:
        raise DatagenConfigError(f"questions.heldout_fraction must be above 0 and below 1, got {fraction}")
    use = section.get("use", "all")
    if use not in PHRASING_USES:
        raise DatagenConfigError(f"questions.use must be one of {', '.join(PHRASING_USES)}, got {use!r}")
    return fraction, use


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
