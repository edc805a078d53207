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

Held-out phrasings: every phrasing is ``train`` or ``heldout`` by its text alone (:func:`phrasing_side`:
the sha256 of the text as a number in [0, 1) below the held-out fraction), so adding phrasings never
moves the others. Within a kind of two or more phrasings at least one is on each side
(:func:`split_phrasings`); a kind's only phrasing is ``train``. ``QuestionPools.load().restricted("train",
fraction)`` draws from the train side only, ``restricted("heldout", fraction)`` from the held-out side
(e.g. for an evaluation set of unseen phrasings), and :meth:`QuestionPools.assignment` lists the sides.
"""

from __future__ import annotations

import hashlib
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from vila_m3.configs import config_path
from vila_m3.data.config import DEFAULT_HELDOUT_FRACTION, PHRASING_USES, canonical_sha256

QUESTIONS_DIR = "questions"
TRAIN, HELDOUT = "train", "heldout"


class QuestionPoolError(ValueError):
    """A question file is invalid, or a needed pool is missing; the message names the file or pool."""


@dataclass(frozen=True)
class QuestionPools:
    """``{task: {kind: phrasings}}`` and the sha256 of the whole set (for the manifest).

    Attributes:
        pools: the phrasings drawn from.
        sha256: sha256 of ``pools`` (canonical JSON).
        use: ``all``, or the side these pools were restricted to (``train`` / ``heldout``).
        heldout_fraction: the held-out fraction of the restriction (None for ``all``).
    """

    pools: Mapping[str, Mapping[str, tuple[str, ...]]]
    sha256: str
    use: str = "all"
    heldout_fraction: float | None = None

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
            side = "" if self.use == "all" else f" (restricted to the {self.use} phrasings)"
            raise QuestionPoolError(f"no questions for task '{task}', kind '{kind}' in the question pools{side}")
        return found

    def assignment(self, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> dict[str, dict[str, dict[str, str]]]:
        """``{task: {kind: {phrasing: "train" | "heldout"}}}`` for every phrasing (see :func:`split_phrasings`)."""
        return {task: {kind: split_phrasings(phrasings, heldout_fraction) for kind, phrasings in kinds.items()}
                for task, kinds in self.pools.items()}

    def restricted(self, use: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> QuestionPools:
        """These pools with only the ``train`` or only the ``heldout`` phrasings (``all``: unchanged).

        Kinds left without phrasings are dropped (drawing one raises QuestionPoolError). Synonyms of
        structure names are not split: they are filled in later, whatever the side.

        Raises:
            QuestionPoolError: ``use`` is not ``all``, ``train`` or ``heldout``, or the pools are already restricted.
        """
        if use not in PHRASING_USES:
            raise QuestionPoolError(f"phrasings must be one of {', '.join(PHRASING_USES)}, got {use!r}")
        if use == "all":
            return self
        if self.use != "all":
            raise QuestionPoolError(f"these question pools are already restricted to the {self.use} phrasings")
        sides = self.assignment(heldout_fraction)
        kept: dict[str, dict[str, tuple[str, ...]]] = {}
        for task, kinds in self.pools.items():
            for kind, phrasings in kinds.items():
                chosen = tuple(p for p in phrasings if sides[task][kind][p] == use)
                if chosen:
                    kept.setdefault(task, {})[kind] = chosen
        return QuestionPools(pools=kept, sha256=canonical_sha256(kept), use=use,
                             heldout_fraction=float(heldout_fraction))

    def draw(self, task: str, kind: str, rng: np.random.Generator, **fields: str) -> str:
        """One phrasing of ``task`` / ``kind`` chosen with ``rng``, its placeholders filled from ``fields``.

        Raises:
            QuestionPoolError: the phrasing names a field that was not given.
        """
        phrasings = self.phrasings(task, kind)
        return _fill(phrasings[int(rng.integers(len(phrasings)))], task, kind, fields)

    def draw_distinct(self, task: str, kind: str, rng: np.random.Generator, count: int, **fields: str) -> list[str]:
        """``count`` phrasings of ``task`` / ``kind`` drawn without repeats while the pool lasts, then with."""
        phrasings = self.phrasings(task, kind)
        order = [int(i) for i in rng.permutation(len(phrasings))]
        while len(order) < count:
            order += [int(i) for i in rng.permutation(len(phrasings))]
        return [_fill(phrasings[i], task, kind, fields) for i in order[:count]]


def phrasing_score(phrasing: str) -> float:
    """The sha256 of a phrasing's text (UTF-8) as a number in [0, 1)."""
    digest = hashlib.sha256(phrasing.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def phrasing_side(phrasing: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    """``heldout`` when the phrasing's score is below ``heldout_fraction``, else ``train`` (before the
    at-least-one-per-side rule of :func:`split_phrasings`)."""
    return HELDOUT if phrasing_score(phrasing) < heldout_fraction else TRAIN


def split_phrasings(phrasings: Sequence[str], heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> dict[str, str]:
    """``{phrasing: "train" | "heldout"}`` for the phrasings of one kind.

    Each phrasing's side is :func:`phrasing_side`; when two or more distinct phrasings all land on one
    side, the one of lowest score moves to ``heldout`` (or of highest score to ``train``). A single
    phrasing is ``train``.
    """
    unique = list(dict.fromkeys(phrasings))
    sides = {phrasing: phrasing_side(phrasing, heldout_fraction) for phrasing in unique}
    if len(unique) == 1:
        sides[unique[0]] = TRAIN
    elif len(unique) >= 2 and HELDOUT not in sides.values():
        sides[min(unique, key=phrasing_score)] = HELDOUT
    elif len(unique) >= 2 and TRAIN not in sides.values():
        sides[max(unique, key=phrasing_score)] = TRAIN
    return sides


def _fill(phrasing: str, task: str, kind: str, fields: Mapping[str, str]) -> str:
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
