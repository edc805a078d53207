"""Path rules for names a client sends: ids, tags and upload file names, and containment in a folder.

A client names things by id (a datastore image id, a label tag, a session id); the server builds the
file path. Two rules keep every such path inside the folder it belongs to:

- ``check_id``: an id is a short plain name: letters, digits, ``_``, ``-``, ``.``, ``+`` and inner
  spaces; it starts with a letter, digit or ``_`` (so never ``.`` or ``..``), holds no ``..``, no path
  separator and no control character, and is at most ``MAX_ID_LENGTH`` characters. The pattern is
  anchored with ``\\Z`` (``$`` would let a trailing newline through).
- ``contained(base, *parts)``: the path ``base/parts...`` with symbolic links resolved must lie inside
  ``base`` (itself resolved), else ``OutsideRootError``.

Nothing here touches a server or a framework; the app turns these errors into HTTP 4xx answers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

MAX_ID_LENGTH = 128
_ID = re.compile(rf"[A-Za-z0-9_](?:[A-Za-z0-9_.+ -]{{0,{MAX_ID_LENGTH - 2}}}[A-Za-z0-9_+-])?\Z")


class UnsafeNameError(ValueError):
    """A client's id, tag or file name is not a plain name; the message names what is wrong, not a path."""


class OutsideRootError(ValueError):
    """A path resolves outside the folder it must stay in; the message holds no path."""


def is_valid_id(value: object) -> bool:
    """Whether ``value`` is a string that ``check_id`` accepts."""
    return isinstance(value, str) and _ID.match(value) is not None and ".." not in value


def check_id(value: object, what: str = "id") -> str:
    """``value`` if it is a plain id (see the module docstring), else ``UnsafeNameError`` naming ``what``."""
    if is_valid_id(value):
        return str(value)
    shown = repr(value)[:80] if isinstance(value, str) else type(value).__name__
    raise UnsafeNameError(
        f"{what} {shown} is not a valid id: use 1-{MAX_ID_LENGTH} letters, digits, '_', '-', '.', '+' or inner "
        "spaces, starting with a letter, digit or '_', without '..' or path separators"
    )


def upload_suffix(filename: str | None, allowed: Iterable[str]) -> str:
    """The suffix of a client's upload file name among ``allowed`` (e.g. ``.nii.gz``, longest match first).

    Only the suffix is ever used of a client's file name; ``UnsafeNameError`` if none is allowed.
    """
    name = os.path.basename((filename or "").replace("\\", "/")).lower()
    for suffix in sorted({s.lower() for s in allowed}, key=len, reverse=True):
        if suffix and name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    kinds = ", ".join(sorted({s for s in allowed if s}))
    raise UnsafeNameError(f"the file name must end in one of {kinds}")


def upload_stem(filename: str | None, suffix: str) -> str:
    """The id a client's upload file name gives (its base name without ``suffix``), checked by ``check_id``."""
    name = os.path.basename((filename or "").replace("\\", "/"))
    stem = name[: len(name) - len(suffix)] if name.lower().endswith(suffix.lower()) else name
    return check_id(stem, "the file name")


def contained(base: str | os.PathLike[str], *parts: str | os.PathLike[str]) -> Path:
    """``base/parts...`` resolved (symbolic links followed); ``OutsideRootError`` unless it lies inside ``base``.

    The result may be ``base`` itself only when no parts are given.
    """
    root = Path(os.path.realpath(base))
    target = Path(os.path.realpath(root.joinpath(*[os.fspath(part) for part in parts])))
    if target == root and parts:
        raise OutsideRootError("the path resolves to the folder itself")
    if not target.is_relative_to(root):
        raise OutsideRootError("the path resolves outside its folder")
    return target


def is_within(path: str | os.PathLike[str], roots: Iterable[str | os.PathLike[str]]) -> bool:
    """Whether ``path`` (symbolic links resolved) lies strictly inside one of ``roots``."""
    if not path:
        return False
    target = Path(os.path.realpath(path))
    for root in roots:
        resolved = Path(os.path.realpath(root))
        if target != resolved and target.is_relative_to(resolved):
            return True
    return False


_ABSOLUTE = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:\\|/)(?:[^\s'\"/\\:,;()<>\[\]{}]+[/\\])*[^\s'\"/\\:,;()<>\[\]{}]*")


def scrub_paths(text: str, known: dict[str, str] | None = None) -> str:
    """``text`` without server paths, for a client: each ``known`` path (and anything below it) becomes its
    label (e.g. a datastore id), longest first; any other absolute path becomes its last part (a file name).
    """
    for path, label in sorted((known or {}).items(), key=lambda item: len(item[0]), reverse=True):
        if not path:
            continue
        for form in {path, os.path.realpath(path)}:
            text = text.replace(form, label)
    return _ABSOLUTE.sub(lambda match: os.path.basename(match.group(0).rstrip("/\\").replace("\\", "/")), text)
