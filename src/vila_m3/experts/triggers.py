"""The trigger grammar: finding ``<NAME(args)>`` expert requests in an answer of the model.

Grammar (EXPERT_PROTOCOL.md §2)::

    trigger  := "<" NAME ">" | "<" NAME "(" ARGUMENT? ")" ">"
    NAME     := an ASCII letter, then letters, digits or "_"  (case-sensitive: VISTA3D, BRATS, CXR, VISTA2D)
    ARGUMENT := any text without "(", ")", "<", ">" or a newline

``<VISTA3D>`` and ``<VISTA3D()>`` mean ``everything``; BRATS and CXR take no argument. Argument
matching is lenient about case, surrounding whitespace and quotes (``ExpertSpec.resolve_argument``);
expert names are not.

What is reported rather than ignored: ``<NAME(...)>`` where NAME is a configured expert in any case,
or looks like one (capitals, digits, ``_``: ``<NAME(args)>``, ``<TOTALSEG(liver)>``); ``<NAME>``
only when NAME is a configured expert in any case. So ``<image>``, ``<EOS>``, ``<b>`` or ``a < b``
are plain text.

**Only text the model generated may be scanned.** A trigger the user typed must never run an expert;
keeping user text away from ``find_triggers`` is the caller's job (the chat loop scans the
assistant's answer only).

The scanner is a single left-to-right pass over the text using only simple, non-backtracking regular
expressions (a character class or a plain identifier), so its time is linear in the text length
whatever the text holds.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass, field

from vila_m3.experts.registry import ExpertRegistry, ResolvedArgument, UnknownArgument

DEFAULT_MAX_TRIGGERS = 8
_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_EXPERT_LIKE = re.compile(r"[A-Z][A-Z0-9_]+\Z")
_ARG_END = re.compile(r"[()<>\n]")
_TAG_END = re.compile(r"[<>\n]")
_SENTENCE_END = re.compile(r"[.!?\n]")
_SEGMENTED = re.compile(r"\bsegmented\b", re.IGNORECASE)
_SNIPPET = 80


@dataclass(frozen=True)
class Trigger:
    """One expert request found in the model's answer.

    Attributes:
        name: expert name, as configured (case-sensitive).
        argument: the canonical argument (``"hepatic tumor"`` for ``hepatoma``, ``"everything"`` for
            ``<VISTA3D>``), or None for an expert without arguments. Use ``(name, argument)`` as a cache key.
        span: ``(start, end)`` character offsets of the first occurrence in the scanned text, end exclusive.
        raw: the text of that occurrence, e.g. ``"<VISTA3D(hepatoma)>"``.
        segmented_only: the sentence around the trigger says the work is done ("I segmented ... using
            <VISTA3D(everything)>."): run the expert and return its result, but do not ask the model
            again. If the same request occurs several times, it is True only if every occurrence is.
        resolved: what the argument means (label ids to prompt with, label names).
    """

    name: str
    argument: str | None
    span: tuple[int, int]
    raw: str
    segmented_only: bool
    resolved: ResolvedArgument = field(compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str | None]:
        """``(name, argument)``: equal keys are the same request."""
        return (self.name, self.argument)


@dataclass(frozen=True)
class TriggerScan:
    """The result of scanning one answer.

    Attributes:
        triggers: distinct requests to run, in order of first appearance, at most ``max_triggers``.
        problems: human-readable reasons why other trigger-like text was not run (unknown or
            unavailable expert, invalid argument, malformed brackets, over the limit), in text order.
        segmented_only: True when there is at least one trigger and every trigger is segmented-only,
            i.e. the results are returned but no follow-up question goes back to the model.
    """

    triggers: list[Trigger]
    problems: list[str]
    segmented_only: bool


def find_triggers(
    text: str, registry: ExpertRegistry, max_triggers: int = DEFAULT_MAX_TRIGGERS
) -> TriggerScan:
    """Find the expert requests in an answer the model generated (never in user text).

    Args:
        text: the model's answer.
        registry: the experts; only usable experts with a runner produce triggers.
        max_triggers: how many distinct requests may run from one answer; later ones become problems.

    Returns:
        The distinct triggers, the problems, and whether the answer is segmentation-only.
    """
    if max_triggers < 0:
        raise ValueError(f"max_triggers must be >= 0, got {max_triggers}")
    scanner = _Scanner(text, registry)
    scanner.scan()

    triggers = list(scanner.triggers.values())
    problems = list(scanner.problems)
    if len(triggers) > max_triggers:
        skipped = triggers[max_triggers:]
        triggers = triggers[:max_triggers]
        problems.append(
            f"{len(skipped)} more expert request(s) not run (at most {max_triggers} per answer): "
            + ", ".join(t.raw for t in skipped)
        )
    segmented_only = bool(triggers) and all(t.segmented_only for t in triggers)
    return TriggerScan(triggers=triggers, problems=problems, segmented_only=segmented_only)


class _Scanner:
    """One left-to-right pass; keeps distinct triggers and distinct problems, both in text order.

    Memory grows with the number of *distinct* requests and problems, not with the text's repeats.
    """

    def __init__(self, text: str, registry: ExpertRegistry):
        self.text = text
        self.registry = registry
        self.configured = {spec.name: spec for spec in registry.configured}
        self.folded = {name.casefold(): name for name in self.configured}
        self.sentences = _SentenceIndex(text)
        self.triggers: dict[tuple[str, str | None], Trigger] = {}
        self.problems: dict[str, None] = {}
        self._resolved: dict[tuple[str, str | None], ResolvedArgument | str] = {}

    def scan(self) -> None:
        text, n, i = self.text, len(self.text), 0
        while True:
            lt = text.find("<", i)
            if lt < 0:
                return
            ident = _IDENT.match(text, lt + 1)
            if ident is None:
                i = lt + 1
                continue
            name, k = ident.group(), ident.end()
            nxt = text[k] if k < n else ""
            if nxt == ">":
                if name in self.configured or name.casefold() in self.folded:
                    self._request(name, None, lt, k + 1)
                i = k + 1
            elif nxt == "(":
                i = self._with_parentheses(name, lt, k)
            else:
                if name in self.configured and nxt != "":
                    self._problem(
                        f"malformed trigger {self._snippet(lt, k + 1)!r}: expected '(' or '>' after {name}"
                    )
                elif name in self.configured:
                    self._problem(f"unfinished trigger {self._snippet(lt, n)!r}: the answer ends before '>'")
                i = k

    def _with_parentheses(self, name: str, lt: int, paren: int) -> int:
        """Handle ``<NAME(`` at ``lt``; ``paren`` is the index of "(". Returns where scanning continues."""
        text, n = self.text, len(self.text)
        relevant = self._looks_like_expert(name)
        stop = _ARG_END.search(text, paren + 1)
        if stop is None:
            if relevant:
                self._problem(f"unbalanced brackets in {self._snippet(lt, n)!r}: '(' is never closed")
            return n
        m, delimiter = stop.start(), stop.group()
        if delimiter == ")":
            if m + 1 < n and text[m + 1] == ">":
                if relevant:
                    self._request(name, text[paren + 1 : m], lt, m + 2)
                return m + 2
            if relevant:
                self._problem(f"malformed trigger {self._snippet(lt, m + 2)!r}: expected '>' after ')'")
            return m + 1
        if delimiter == ">":
            if relevant:
                self._problem(
                    f"unbalanced brackets in {self._snippet(lt, m + 1)!r}: '(' is not closed before '>'"
                )
            return m + 1
        if delimiter == "(":
            close = _TAG_END.search(text, m + 1)
            end = n if close is None else close.start() + (1 if close.group() == ">" else 0)
            if relevant:
                self._problem(
                    f"nested brackets in {self._snippet(lt, end)!r}: an argument cannot contain '('"
                )
            return end
        # "<" or a newline inside the argument
        if relevant:
            what = "a line break" if delimiter == "\n" else "'<'"
            self._problem(f"unbalanced brackets in {self._snippet(lt, m)!r}: {what} before ')'")
        return m

    def _looks_like_expert(self, name: str) -> bool:
        return name in self.configured or name.casefold() in self.folded or bool(_EXPERT_LIKE.match(name))

    def _request(self, name: str, argument: str | None, start: int, end: int) -> None:
        raw = self._snippet(start, end)
        spec = self.configured.get(name)
        if spec is None:
            known = ", ".join(self.registry.names) or "none"
            hint = ""
            if name.casefold() in self.folded:
                hint = f"; names are case-sensitive, did you mean {self.folded[name.casefold()]}?"
            self._problem(f"unknown expert {name!r} in {raw!r} (usable experts: {known}){hint}")
            return
        if name in self.registry.unavailable:
            self._problem(f"expert {name} in {raw!r} is not available: {self.registry.unavailable[name]}")
            return
        if spec.runner is None:
            self._problem(f"expert {name} in {raw!r} is not run by this product")
            return
        resolved = self._resolve(name, argument)
        if isinstance(resolved, str):
            self._problem(f"{resolved} (in {raw!r})")
            return
        key = (name, resolved.group)
        segmented = self.sentences.says_segmented(start, end)
        first = self.triggers.get(key)
        if first is None:
            self.triggers[key] = Trigger(
                name, resolved.group, (start, end), self.text[start:end], segmented, resolved
            )
        elif first.segmented_only and not segmented:
            self.triggers[key] = dataclasses.replace(first, segmented_only=False)

    def _resolve(self, name: str, argument: str | None) -> ResolvedArgument | str:
        """The resolved argument, or the error message; cached per (expert, argument as written)."""
        cache_key = (name, argument)
        if cache_key not in self._resolved:
            try:
                self._resolved[cache_key] = self.configured[name].resolve_argument(argument)
            except UnknownArgument as err:
                self._resolved[cache_key] = str(err)
        return self._resolved[cache_key]

    def _problem(self, message: str) -> None:
        """Record a problem once; problems arrive in text order since the scan runs left to right."""
        self.problems.setdefault(message)

    def _snippet(self, start: int, end: int) -> str:
        end = min(end, len(self.text))
        if end - start <= _SNIPPET:
            return self.text[start:end]
        return self.text[start : start + _SNIPPET - 3] + "..."


class _SentenceIndex:
    """Which sentences say "segmented"; sentences end at '.', '!', '?' or a line break."""

    def __init__(self, text: str):
        self.ends = [m.start() for m in _SENTENCE_END.finditer(text)]
        self.segmented = [m.start() for m in _SEGMENTED.finditer(text)]

    def says_segmented(self, start: int, end: int) -> bool:
        """Whether the sentence holding ``text[start:end]`` contains the word "segmented" (any case)."""
        before = bisect.bisect_left(self.ends, start)
        sentence_start = self.ends[before - 1] + 1 if before else 0
        after = bisect.bisect_left(self.ends, end)
        sentence_end = self.ends[after] if after < len(self.ends) else float("inf")
        first = bisect.bisect_left(self.segmented, sentence_start)
        return first < len(self.segmented) and self.segmented[first] < sentence_end
