"""The chat loop in tool-calling mode with the real remote client (against the scripted OpenAI double),
the real VISTA3D runner (a probe bundle: every voxel above 300 HU gets the first prompted id) and the
real store: round limit, triggers in text, overlays off, the next turn's conversation, and calls with VISTA3D
classes instead of a group."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from bundle_fixtures import make_probe_bundle
from fake_openai_server import FakeOpenAIServer, sse, tool_call_completion, tool_call_sse

from vila_m3.chat.loop import ChatLoop, TurnRequest
from vila_m3.chat.store import ChatStore
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.service import ExpertService
from vila_m3.vlm.remote import RemoteVLM

ORGANS = '{"argument": "organs"}'


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExpertService]:
    root = tmp_path_factory.mktemp("tool-loop-models")
    make_probe_bundle(root / "bundles" / "vista3d", threshold_hu=300.0)
    registry = ExpertRegistry.from_config(available=lambda spec: None if spec.name == "VISTA3D" else "not staged")
    service = ExpertService(root, registry=registry, idle_release_s=0)
    yield service
    service.close()


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as running:
        yield running


def make_loop(tmp_path: Path, service: ExpertService, server: FakeOpenAIServer, **kwargs) -> ChatLoop:
    vlm = RemoteVLM(server.url, "tool-model", backoff_s=0.01, timeout_s=30.0, tool_calling=True,
                    tool_images=kwargs.pop("tool_images", True))
    return ChatLoop(vlm, service, service.registry, ChatStore(tmp_path / "chats"), **kwargs)


def ct_turn(sample_data: Path, question: str = "Segment the organs", chat_id: str = "chat-1") -> TurnRequest:
    return TurnRequest(chat_id, question, {"image": str(sample_data / "studies" / "ct_abdomen.nii.gz")})


def test_calls_past_the_round_limit_are_not_run_and_the_next_turn_is_still_a_valid_conversation(
        tmp_path, sample_data, service, server):
    loop = make_loop(tmp_path, service, server, max_rounds=1)
    server.script(tool_call_sse([("VISTA3D", ORGANS)]), tool_call_completion([("VISTA3D", '{"argument": "skeleton"}')],
                                                                             text="Once more."))
    result = loop.run_turn(ct_turn(sample_data))
    assert [(call.expert, call.argument) for call in result.experts] == [("VISTA3D", "organs")]
    roles = [(m.role, m.to_model) for m in result.chat.messages]
    assert roles == [("user", True), ("assistant", True), ("expert", True), ("assistant", True), ("expert", False)]
    assert result.chat.messages[-1].error == ('expert round limit (1) reached; not run: VISTA3D({"argument": "skeleton"})')
    assert result.answer == "Once more." and result.labels is not None
    assert len(server.posts) == 2

    server.script(sse(["Done."]))
    loop.run_turn(ct_turn(sample_data, "And now?"))
    messages = server.posts[-1].messages
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "user", "assistant", "user"]
    assert messages[4] == {"role": "assistant", "content": "Once more."}  # its calls never ran: none sent back
    assert [p["text"] for p in messages[5]["content"] if p["type"] == "text"] == ["This is a CT image.\nAnd now?"]


def test_triggers_written_as_text_run_nothing_in_tool_mode(tmp_path, sample_data, service, server):
    server.script(sse(["Let me trigger <VISTA3D(organs)>."]))
    result = make_loop(tmp_path, service, server).run_turn(ct_turn(sample_data))
    assert result.experts == [] and result.labels is None
    assert [m.role for m in result.chat.messages] == ["user", "assistant"]
    assert len(server.posts) == 1 and server.posts[0].tools


def test_without_overlay_images_the_results_go_as_text_only(tmp_path, sample_data, service, server):
    server.script(tool_call_completion([("VISTA3D", ORGANS), ("VISTA3D", "{}")]), sse(["Segmented."]))
    result = make_loop(tmp_path, service, server, tool_images=False).run_turn(ct_turn(sample_data))
    assert [(call.expert, call.argument) for call in result.experts] == [("VISTA3D", "organs"), ("VISTA3D", "everything")]
    messages = server.posts[1].messages
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    images = [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url"]
    assert len(images) == 1  # the slice the question was asked on
    assert all("<image>" not in m["content"] for m in messages[2:])
    assert result.answer == "Segmented."


def test_a_call_with_classes_runs_vista3d_on_those_classes_and_reports_only_them(tmp_path, sample_data, service, server):
    server.script(tool_call_completion([("VISTA3D", '{"classes": ["Spleen"]}')]), sse(["The spleen is marked."]))
    result = make_loop(tmp_path, service, server).run_turn(ct_turn(sample_data, "Where is the spleen?"))
    assert [(call.expert, call.argument) for call in result.experts] == [("VISTA3D", "classes: spleen")]
    assert result.experts[0].error is None and result.label_names == {"spleen": 3}
    assert set(np.unique(result.labels.array)) == {0, 3}  # the probe labels bone-bright voxels with the prompt's id
    expert = result.chat.messages[2]
    assert expert.tool_call["arguments"] == '{"classes": ["Spleen"]}' and expert.argument == "classes: spleen"
    tool_message = server.posts[1].messages[2]
    assert tool_message["role"] == "tool" and "spleen" in tool_message["content"]
    others = set(service.registry.get("VISTA3D").labels.values()) - {"spleen"}
    assert not [name for name in others if f": {name}" in tool_message["content"]]  # only the asked class is named


def test_a_call_with_an_unknown_class_is_answered_with_the_nearest_names_and_runs_nothing(
        tmp_path, sample_data, service, server):
    server.script(tool_call_completion([("VISTA3D", '{"classes": ["splen"]}')]), sse(["Sorry."]))
    result = make_loop(tmp_path, service, server).run_turn(ct_turn(sample_data))
    assert result.experts == [] and result.labels is None
    assert "'splen' (did you mean 'spleen'" in server.posts[1].messages[2]["content"]
