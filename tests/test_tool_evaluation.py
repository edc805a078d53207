"""Trigger evaluation of a tool-calling model: the same decisions, made as text triggers or as OpenAI
tool calls by a scripted remote model (the real RemoteVLM against the OpenAI-compatible double),
give the same table; ``vila-m3 evaluate --vlm-url ... --tools`` prints and stores it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer, Recorded, Reply, completion, tool_call_completion

from vila_m3.cli import main
from vila_m3.data.export import export_dataset
from vila_m3.experts.triggers import find_triggers
from vila_m3.samples.annotated import annotated_studies
from vila_m3.training.evaluation import evaluate_triggers, format_report, product_registry
from vila_m3.vlm.prompting import as_turns
from vila_m3.vlm.remote import RemoteVLM

TARGETS = {"trigger_accuracy": 0.95, "false_call_rate": 0.05}
Call = tuple[str, str | None]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data-engine export of the annotated sample studies (seed 0)."""
    root = tmp_path_factory.mktemp("tool-evaluation")
    studies = annotated_studies(root / "studies", seeds=(0,), scratch=root / "samples")
    export_dataset(studies, root / "export", progress=False)
    return root / "export"


class Decisions:
    """What the scripted model decides for each first question (keyed by the text after its last image):
    the right calls, a wrong argument, an argument no expert takes, a call where none is needed, or
    none; and its final answer. The same decisions answer in either form."""

    def __init__(self, export: Path):
        self.expected: dict[str, tuple[Call, ...]] = {}
        self.final: dict[str, str] = {}
        registry = product_registry()
        for split in ("train", "val"):
            for record in json.loads((export / f"{split}.json").read_text(encoding="utf-8")):
                turns = as_turns(record["conversations"])
                key = turns[0][1].split("<image>")[-1]
                calls = tuple(t.key for t in find_triggers(turns[1][1], registry).triggers)
                self.expected.setdefault(key, calls)
        needs = sorted(key for key, calls in self.expected.items() if calls)
        no_need = sorted(key for key, calls in self.expected.items() if not calls)
        assert len(needs) >= 4 and no_need
        self.decided: dict[str, tuple[Call, ...]] = dict(self.expected)
        for key in needs[:2]:
            self.decided[key] = (("VISTA3D", "organs" if self.expected[key] == (("VISTA3D", "lung tumor"),)
                                  else "lung tumor"),)
        self.decided[needs[2]] = (("VISTA3D", "kidney stones"),)  # cannot run: no call
        self.decided[no_need[0]] = (("CXR", None),)
        for position, key in enumerate(sorted(self.expected)):
            self.final[key] = "yes" if position % 3 else "no"

    def reply(self, request: Recorded) -> Reply:
        messages = request.messages
        first = [part["text"] for part in messages[0]["content"] if part["type"] == "text"][-1]
        if len(messages) > 1:
            return completion(self.final[first])
        calls = self.decided[first]
        if request.tools:
            return tool_call_completion([(name, json.dumps({"argument": arg}) if arg else "{}") for name, arg in calls])
        return completion("Let me trigger " + " ".join(f"<{name}({arg or ''})>" for name, arg in calls) + "."
                          if calls else "I can answer without an expert.")


@pytest.fixture
def scripted(export: Path) -> Iterator[FakeOpenAIServer]:
    decisions = Decisions(export)
    with FakeOpenAIServer(models=("tool-model",)) as server:
        server.respond(decisions.reply)
        yield server


def test_triggers_and_tool_calls_of_the_same_decisions_give_the_same_table(export, scripted):
    triggers = evaluate_triggers(RemoteVLM(scripted.url, "tool-model"), export, split="all")
    trigger_posts = len(scripted.posts)
    tools = evaluate_triggers(RemoteVLM(scripted.url, "tool-model", tool_calling=True), export, split="all",
                              tools=True)

    assert format_report(tools, TARGETS) == format_report(triggers, TARGETS)
    assert tools.as_dict() == triggers.as_dict()
    assert [(o.record_id, o.called, o.answer_right, o.answer_exact) for o in tools.outcomes] == \
        [(o.record_id, o.called, o.answer_right, o.answer_exact) for o in triggers.outcomes]
    assert 0 < tools.trigger_accuracy < 1 and tools.false_call_rate > 0
    assert any(o.answer_type for o in tools.outcomes)
    assert any("kidney stones" in o.first_answer and not o.called for o in tools.outcomes)

    asked_with_tools = scripted.posts[trigger_posts:]
    assert all(post.tools is None for post in scripted.posts[:trigger_posts])
    assert asked_with_tools and all(post.tools for post in asked_with_tools)
    card = product_registry().card.header
    assert all(card not in json.dumps(post.messages) for post in asked_with_tools)
    finals = [post.messages for post in asked_with_tools if len(post.messages) > 1]
    assert finals and all([m["role"] for m in messages[:3]] == ["user", "assistant", "tool"] for messages in finals)


def test_the_evaluate_command_scores_a_remote_tool_calling_model(export, scripted, tmp_path, capsys):
    out = tmp_path / "totals.json"
    assert main(["evaluate", "--vlm-url", scripted.url, "--vlm-model", "tool-model", "--tools", "--data", str(export),
                 "--split", "all", "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model: remote model 'tool-model'" in printed and "(tool calls)" in printed
    assert "right expert and argument" in printed
    expected = evaluate_triggers(RemoteVLM(scripted.url, "tool-model", tool_calling=True), export, split="all",
                                 tools=True)
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(expected.as_dict()))
    assert main(["evaluate", "--vlm-url", scripted.url, "--tools", "--data", str(export)]) == 2
    assert "--vlm-model" in capsys.readouterr().err
