"""Trigger accuracy: does the model call the right expert with the right argument, and only when needed?

For every record of an export split (each record once), the model answers the record's first user
turn (card, image(s), question). The expected call is what the record's first answer says: the
triggers in it, or none. A record expecting a call counts as **right** when the model requests
exactly those (expert, argument) pairs; one expecting none counts a **false call** when the model
requests any. Then, for yes/no and count questions, the model gets the record's own expert feedback
(the ground-truth result, so that the answer is judged alone) and its final answer is compared with
the record's: the first yes/no word, or the first number (``no`` words count as 0). The whole answer
is compared too (case, spacing and a final full stop aside): ``no`` is right and exact, ``no first
trigger <CXR(...`` is right but not exact, a model that runs on past its answer shows here.

Held-out phrasings (``vila-m3 datagen --phrasings heldout``) measure generalisation to questions the
model never saw in training.

A model that speaks OpenAI tool calls (``tools=True``, a :class:`~vila_m3.vlm.remote.RemoteVLM`) is
scored the same way: its first answer is asked with the experts as tools and without the model card,
and its tool calls count as its triggers would (each call resolved as the trigger of the same expert
and argument; a call that cannot run is no call, as a malformed trigger is). For the answer check it
gets the record's expected calls as its own, the record's feedback as their tool result and the
overlays after it, as in a tool-calling chat. The same decisions give the same table either way.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.tools import (
    ToolCallError,
    expert_tools,
    overlay_message_text,
    resolve_tool_call,
    tool_argument_name,
    tool_result_text,
)
from vila_m3.experts.triggers import find_triggers
from vila_m3.progress import progress as show_progress
from vila_m3.training.examples import read_records, record_images
from vila_m3.vlm.prompting import as_turns, count_placeholders

__all__ = ["EvaluationReport", "RecordOutcome", "answer_lines", "evaluate_triggers", "format_report", "percent_text",
           "product_registry"]

_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_NUMBER = re.compile(r"\b(\d+|no)\b", re.IGNORECASE)
ANSWER_KINDS = {"presence": "yes/no", "finding": "yes/no", "core": "yes/no", "enhancing": "yes/no",
                "edema": "yes/no", "count": "count"}


class Answerer(Protocol):
    """What the evaluation needs of a VLM: ``generate(conversation, images, max_new_tokens) -> .text``."""

    def generate(self, conversation: Any, images: Sequence[Any] = (), max_new_tokens: int = 1024,
                 **kwargs: Any) -> Any:
        """An object with the answer in ``.text``."""


@dataclass
class RecordOutcome:
    """One record's result.

    Attributes:
        record_id, category, kind: from the record and the export's manifest.
        expected, called: the (expert, argument) pairs expected and requested.
        first_answer: what the model wrote.
        answer_type: ``yes/no``, ``count`` or None (no answer check for this kind).
        answer_right: whether the final answer's yes/no word or number matched (None when not checked).
        answer_exact: whether the whole final answer matched (None when not checked).
    """

    record_id: str
    category: str
    kind: str
    expected: tuple[tuple[str, str | None], ...]
    called: tuple[tuple[str, str | None], ...]
    first_answer: str
    answer_type: str | None = None
    answer_right: bool | None = None
    answer_exact: bool | None = None
    final_answer: str = ""

    @property
    def needs_call(self) -> bool:
        return bool(self.expected)

    @property
    def right_call(self) -> bool:
        return bool(self.expected) and set(self.called) == set(self.expected)

    @property
    def false_call(self) -> bool:
        return not self.expected and bool(self.called)


@dataclass
class EvaluationReport:
    """All outcomes and the headline rates (fractions in [0, 1]; None when nothing was measured)."""

    outcomes: list[RecordOutcome] = field(default_factory=list)

    def _rate(self, items: Iterable[bool]) -> float | None:
        values = list(items)
        return sum(values) / len(values) if values else None

    @property
    def trigger_accuracy(self) -> float | None:
        """Right expert and argument, over records that need a call."""
        return self._rate(o.right_call for o in self.outcomes if o.needs_call)

    @property
    def false_call_rate(self) -> float | None:
        """Any call, over records that need none."""
        return self._rate(o.false_call for o in self.outcomes if not o.needs_call)

    def answer_accuracy(self, answer_type: str) -> float | None:
        return self._rate(bool(o.answer_right) for o in self.outcomes if o.answer_type == answer_type)

    @property
    def exact_answer_rate(self) -> float | None:
        """Whole final answers equal to the expected ones, over the checked yes/no and count answers."""
        return self._rate(bool(o.answer_exact) for o in self.outcomes if o.answer_type)

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": len(self.outcomes),
            "trigger_accuracy": self.trigger_accuracy,
            "false_call_rate": self.false_call_rate,
            "yes_no_accuracy": self.answer_accuracy("yes/no"),
            "count_accuracy": self.answer_accuracy("count"),
            "exact_answer_rate": self.exact_answer_rate,
            "needs_call": sum(o.needs_call for o in self.outcomes),
            "needs_no_call": sum(not o.needs_call for o in self.outcomes),
        }


def product_registry() -> ExpertRegistry:
    """Every expert the product runs, whether or not its weights are staged here (only names are checked)."""
    return ExpertRegistry.from_config(available=lambda spec: None if spec.runner else "not run by this product")


def _calls(text: str, registry: ExpertRegistry) -> tuple[tuple[str, str | None], ...]:
    return tuple(trigger.key for trigger in find_triggers(text, registry).triggers)


def _tool_calls(calls: Sequence[Any], registry: ExpertRegistry) -> tuple[tuple[str, str | None], ...]:
    """The distinct (expert, argument) requests of tool calls, in order; calls that cannot run are left out."""
    keys: dict[tuple[str, str | None], None] = {}
    for call in calls:
        try:
            keys.setdefault(resolve_tool_call(call.name, call.arguments, registry).key)
        except ToolCallError:
            continue
    return tuple(keys)


def _without_card(text: str, registry: ExpertRegistry) -> str:
    """A first user turn without its model card (header to footer), as a tool-calling model gets it."""
    header, footer = registry.card.header, registry.card.footer
    end = text.find(footer) if text.startswith(header) else -1
    return text[end + len(footer):] if end >= 0 else text


class _ToolAsker:
    """The tool-calling form of the two questions asked per record."""

    def __init__(self, model: Any, registry: ExpertRegistry, max_new_tokens: int):
        self.model, self.registry, self.max_new_tokens = model, registry, max_new_tokens
        self.tools = expert_tools(registry)

    def first(self, user: str, images: Sequence[Any]) -> tuple[str, tuple[tuple[str, str | None], ...]]:
        """The first answer (text, then its calls written out) and its expert requests."""
        result = self.model.generate_with_tools([{"role": "user", "content": _without_card(user, self.registry)}],
                                                images, self.tools, max_new_tokens=self.max_new_tokens)
        written = " ".join([result.text, *(f"{call.name}({call.arguments})" for call in result.tool_calls)])
        return written.strip(), _tool_calls(result.tool_calls, self.registry)

    def final(self, user: str, expected: Sequence[tuple[str, str | None]], feedback: str,
              images: Sequence[Any]) -> str:
        """The answer after the record's expected calls were made by the model and answered with ``feedback``."""
        from vila_m3.vlm.remote import ToolCall

        key = tool_argument_name()
        calls = [ToolCall(f"call_{i}", name, json.dumps({key: argument} if argument is not None else {}))
                 for i, (name, argument) in enumerate(expected)]
        messages: list[dict[str, Any]] = [{"role": "user", "content": _without_card(user, self.registry)},
                                          {"role": "assistant", "content": "", "tool_calls": calls}]
        for position, call in enumerate(calls):  # the record's feedback holds every result: it answers the first
            text = tool_result_text(feedback) if position == 0 else f"The result is given with {calls[0].id}."
            messages.append({"role": "tool", "tool_call_id": call.id, "content": text})
        overlays = count_placeholders(feedback)
        if overlays:
            messages.append({"role": "user", "content": overlay_message_text(calls[0].name, calls[0].id) + "\n"
                             + "<image>" * overlays + "\n"})
        return self.model.generate_with_tools(messages, images, self.tools, max_new_tokens=self.max_new_tokens).text


def _answer_matches(answer_type: str, produced: str, expected: str) -> bool:
    pattern = _YES_NO if answer_type == "yes/no" else _NUMBER
    want, got = pattern.search(expected), pattern.search(produced)
    if want is None or got is None:
        return False
    norm = (lambda s: s.lower()) if answer_type == "yes/no" else (lambda s: "0" if s.lower() == "no" else s)
    return norm(want.group(1)) == norm(got.group(1))


def _same_answer(produced: str, expected: str) -> bool:
    """The whole answers are equal, case, runs of whitespace and a final full stop aside."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split()).rstrip(".").rstrip()

    return norm(produced) == norm(expected)


def _manifest(export_dir: Path) -> Mapping[str, Any]:
    """The export's ``manifest.json`` ({} without one)."""
    path = export_dir / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _provenance(manifest: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    return {entry["id"]: entry for entry in manifest.get("records", [])}


def _description(manifest: Mapping[str, Any]) -> str:
    """What the evaluation is, in words, for its progress (held-out phrasings named as such)."""
    held_out = (manifest.get("phrasings") or {}).get("use") == "heldout"
    return "Evaluating the model on held-out phrasings" if held_out else "Evaluating the model's expert calls"


def evaluate_triggers(
    model: Answerer,
    export_dir: str | Path,
    split: str = "val",
    registry: ExpertRegistry | None = None,
    limit: int | None = None,
    check_answers: bool = True,
    max_new_tokens: int = 64,
    progress: bool | Callable[[Iterable[Any]], Iterable[Any]] | None = True,
    tools: bool = False,
    log: Callable[[str], None] | None = None,
) -> EvaluationReport:
    """Run the model on each record of ``<export_dir>/<split>.json`` once and score its expert calls.

    Args:
        model: the VLM (``VilaChat``, ``RemoteVLM``, or anything with the same ``generate``).
        export_dir: a data-engine export.
        split: ``val`` (default), ``train``, or ``all`` (both).
        registry: the experts triggers are checked against (default: :func:`product_registry`).
        limit: evaluate at most this many records.
        check_answers: also score the final answers of yes/no and count questions.
        max_new_tokens: answer length limit per generation.
        progress: True (default): the progress with the time left (stderr: a bar on a terminal, else plain
            lines, :func:`vila_m3.progress.progress`); False or None: none; or a wrapper of the record
            iterator (e.g. ``tqdm``).
        tools: ask in tool-calling mode and score the model's tool calls (the model needs
            ``generate_with_tools``, e.g. ``RemoteVLM``); False scores the triggers in its text.
        log: where the plain progress lines go (default: stderr).
    """
    export = Path(export_dir)
    registry = registry or product_registry()
    manifest = _manifest(export)
    provenance = _provenance(manifest)
    seen: set[str] = set()
    records = []
    splits = ("train", "val") if split == "all" else (split,)
    for record in [r for name in splits for r in read_records(export, name)]:
        base_id = str(record.get("id", "")).split(".")[0]
        if base_id in seen:  # train.json repeats records as <id>.2, <id>.3 ...
            continue
        seen.add(base_id)
        records.append(record)
    if limit is not None:
        records = records[:limit]

    report = EvaluationReport()
    if tools and not callable(getattr(model, "generate_with_tools", None)):
        raise TypeError(f"{type(model).__name__} cannot answer with tool calls; use a remote model (RemoteVLM)")
    asker = _ToolAsker(model, registry, max_new_tokens) if tools else None
    shown: Iterable[dict[str, Any]] = records
    if callable(progress):
        shown = progress(records)
    elif progress:
        shown = show_progress(records, _description(manifest), "records", log=log)
    for record in shown:
        turns = as_turns(record["conversations"])
        images = [_open(export / path) for path in record_images(record)]
        first_images = count_placeholders(turns[0][1])
        expected = _calls(turns[1][1], registry)
        if asker is not None:
            answer, called = asker.first(turns[0][1], images[:first_images])
        else:
            answer = model.generate([turns[0]], images[:first_images], max_new_tokens=max_new_tokens).text
            called = _calls(answer, registry)
        meta = provenance.get(str(record.get("id")), {})
        kind = str(meta.get("kind", "?"))
        outcome = RecordOutcome(str(record.get("id")), str(meta.get("category", "?")), kind, expected, called, answer)
        answer_type = ANSWER_KINDS.get(kind)
        if check_answers and answer_type and len(turns) >= 4:
            used = first_images + count_placeholders(turns[2][1])
            if asker is not None and expected:
                final = asker.final(turns[0][1], expected, turns[2][1], images[:used])
            else:
                final = model.generate(turns[:3], images[:used], max_new_tokens=max_new_tokens).text
            outcome.answer_type = answer_type
            outcome.final_answer = final
            outcome.answer_right = _answer_matches(answer_type, final, turns[3][1])
            outcome.answer_exact = _same_answer(final, turns[3][1])
        report.outcomes.append(outcome)
    return report


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def percent_text(value: float | None) -> str:
    """A fraction as ``97.0 %``; ``-`` when there is none."""
    return "-" if value is None else f"{100 * value:.1f} %"


def answer_lines(summary: Mapping[str, Any]) -> list[str]:
    """The answer rates of a report's :meth:`~EvaluationReport.as_dict` (or a stored copy of it), one a line."""
    return [
        f"yes/no answers right:      {percent_text(summary.get('yes_no_accuracy'))}",
        f"count answers right:       {percent_text(summary.get('count_accuracy'))}",
        f"whole answers exact:       {percent_text(summary.get('exact_answer_rate'))} (yes/no and count answers equal to "
        "the expected text)",
    ]


def format_report(report: EvaluationReport, targets: Mapping[str, float] | None = None) -> str:
    """A table by category / kind, then the totals (against ``targets`` when given)."""
    groups: dict[str, list[RecordOutcome]] = defaultdict(list)
    for outcome in report.outcomes:
        groups[f"{outcome.category} / {outcome.kind}"].append(outcome)
    header = (f"{'category / kind':<28}{'n':>5}{'right call':>12}{'false call':>12}{'answer right':>14}"
              f"{'exact':>9}")
    lines = [header, "-" * len(header)]
    for name in sorted(groups):
        items = groups[name]
        needs = [o.right_call for o in items if o.needs_call]
        no_needs = [o.false_call for o in items if not o.needs_call]
        answers = [bool(o.answer_right) for o in items if o.answer_type]
        exact = [bool(o.answer_exact) for o in items if o.answer_type]
        lines.append(f"{name:<28}{len(items):>5}{percent_text(report._rate(needs)):>12}{percent_text(report._rate(no_needs)):>12}"
                     f"{percent_text(report._rate(answers)):>14}{percent_text(report._rate(exact)):>9}")
    summary = report.as_dict()
    lines.append("-" * len(header))
    lines.append(f"right expert and argument: {percent_text(summary['trigger_accuracy'])} of {summary['needs_call']} "
                 f"questions that need an expert")
    lines.append(f"false calls:               {percent_text(summary['false_call_rate'])} of {summary['needs_no_call']} "
                 f"questions that need none")
    lines.extend(answer_lines(summary))
    if targets:
        accuracy, false_calls = summary["trigger_accuracy"], summary["false_call_rate"]
        if "trigger_accuracy" in targets and accuracy is not None:
            met = accuracy >= targets["trigger_accuracy"]
            lines.append(f"target right calls >= {percent_text(targets['trigger_accuracy'])}: {'met' if met else 'NOT met'}")
        if "false_call_rate" in targets and false_calls is not None:
            met = false_calls <= targets["false_call_rate"]
            lines.append(f"target false calls <= {percent_text(targets['false_call_rate'])}: {'met' if met else 'NOT met'}")
    return "\n".join(lines)
