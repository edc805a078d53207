"""Question pools: many phrasings per task and kind, drawn reproducibly with the export's seed.

Pools are YAML files in ``configs/questions/`` (one or more per task)::

    task: vista3d
    kinds:
      presence:
        - "Is there a {structure} in this image?"
        - ...

Files are read in name order and phrasings of the same task and kind are concatenated, so a site
adds its own phrasings by dropping in another file. Placeholders are ``str.format`` fields; a
phrasing may use any subset of the fields a kind offers (see each file's header).
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from vila_m3.configs import config_path
from vila_m3.data.config import canonical_sha256

QUESTIONS_DIR = "questions"


class QuestionPoolError(ValueError):
    """A question file is invalid, or a needed pool is missing; the message names the file or pool."""


@dataclass(frozen=True)
class QuestionPools:
    """``{task: {kind: phrasings}}`` and the sha256 of the whole set (for the manifest)."""

    pools: Mapping[str, Mapping[str, tuple[str, ...]]]
    sha256: str

    @classmethod
    def load(cls, folder: str | os.PathLike[str] | None = None) -> QuestionPools:
        """Read every ``*.yaml`` / ``*.yml`` in ``folder`` (default: ``configs/questions``).

        Raises:
            QuestionPoolError: no files, a file without ``task`` / ``kinds``, an empty or non-text
                phrasing, or an unknown placeholder syntax.
        """
        folder = Path(folder) if folder else config_path(QUESTIONS_DIR)
        files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []
        if not files:
            raise QuestionPoolError(f"no question files (*.yaml) in {folder}")
        pools: dict[str, dict[str, list[str]]] = {}
        for path in files:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            task, kinds = data.get("task"), data.get("kinds")
            if not isinstance(task, str) or not isinstance(kinds, Mapping):
                raise QuestionPoolError(f"{path.name}: needs 'task' (a name) and 'kinds' (kind: list of questions)")
            for kind, phrasings in kinds.items():
                if not isinstance(phrasings, list) or not phrasings:
                    raise QuestionPoolError(f"{path.name}: kinds.{kind} must be a non-empty list of questions")
                for phrasing in phrasings:
                    _check_phrasing(phrasing, f"{path.name}: kinds.{kind}")
                pools.setdefault(task, {}).setdefault(str(kind), []).extend(phrasings)
        frozen = {task: {kind: tuple(p) for kind, p in kinds.items()} for task, kinds in pools.items()}
        return cls(pools=frozen, sha256=canonical_sha256(frozen))

    def phrasings(self, task: str, kind: str) -> tuple[str, ...]:
        """All phrasings of ``task`` / ``kind``; QuestionPoolError if there are none."""
        found = self.pools.get(task, {}).get(kind)
        if not found:
            raise QuestionPoolError(f"no questions for task '{task}', kind '{kind}' in the question pools")
        return found

    def draw(self, task: str, kind: str, rng: np.random.Generator, **fields: str) -> str:
        """One phrasing of ``task`` / ``kind`` chosen with ``rng``, its placeholders filled from ``fields``.

        Raises:
            QuestionPoolError: the phrasing names a field that was not given.
        """
        phrasings = self.phrasings(task, kind)
        phrasing = phrasings[int(rng.integers(len(phrasings)))]
        try:
            return phrasing.format(**fields)
        except (KeyError, IndexError) as err:
            raise QuestionPoolError(
                f"question {phrasing!r} ({task}/{kind}) uses a placeholder that this kind does not offer: {err}; "
                f"offered: {', '.join(sorted(fields)) or 'none'}"
            ) from None


def _check_phrasing(phrasing: object, where: str) -> None:
    if not isinstance(phrasing, str) or not phrasing.strip():
        raise QuestionPoolError(f"{where}: every question must be non-empty text, got {phrasing!r}")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(phrasing) if name is not None]
    except ValueError as err:
        raise QuestionPoolError(f"{where}: {phrasing!r} is not a valid template ({err})") from None
    if any(not name.isidentifier() for name in names):
        raise QuestionPoolError(f"{where}: {phrasing!r}: placeholders are {{name}} fields only")
