"""Find the four MRI sequences of a study from one of them, by file name.

A study's sequences sit side by side as ``<study>_<sequence><ext>``, e.g. ``brain_mri_t1c.nii.gz``,
``brain_mri_t1.nii.gz``, ``brain_mri_t2.nii.gz``, ``brain_mri_flair.nii.gz``. Sequence names are
matched case-insensitively with common aliases (t1ce, t1gd → t1c; t1w → t1; t2w → t2).
"""

from __future__ import annotations

import re
from pathlib import Path

SEQUENCE_ALIASES: dict[str, str] = {
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1post": "t1c",
    "t1": "t1", "t1w": "t1", "t2": "t2", "t2w": "t2", "flair": "flair", "t2flair": "flair",
}
SEQUENCE_ORDER = ("t1c", "t1", "t2", "flair")
_SUFFIX = re.compile(r"^(?P<study>.+)[_-](?P<sequence>[A-Za-z0-9]+)$")
_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def split_name(path: str | Path) -> tuple[str, str]:
    """``brain_mri_t1c.nii.gz`` → (``brain_mri_t1c``, ``.nii.gz``)."""
    name = Path(path).name
    for extension in _EXTENSIONS:
        if name.lower().endswith(extension):
            return name[: -len(extension)], name[-len(extension):]
    return Path(name).stem, Path(name).suffix


def sequence_of(path: str | Path) -> tuple[str, str] | None:
    """(study, canonical sequence) when the file name ends in a sequence name, else None."""
    stem, _ = split_name(path)
    match = _SUFFIX.match(stem)
    if not match:
        return None
    sequence = SEQUENCE_ALIASES.get(match["sequence"].lower())
    return (match["study"], sequence) if sequence else None


def sibling_sequences(path: str | Path) -> dict[str, Path]:
    """Every sequence of the same study in the same folder as ``path``, keyed by canonical name.

    Returns only what exists; the caller decides whether four are there.
    """
    path = Path(path)
    found = sequence_of(path)
    if found is None:
        return {}
    study, _ = found
    siblings: dict[str, Path] = {}
    for candidate in sorted(path.parent.iterdir()):
        match = sequence_of(candidate) if candidate.is_file() else None
        if match and match[0] == study:
            siblings.setdefault(match[1], candidate)
    return siblings
