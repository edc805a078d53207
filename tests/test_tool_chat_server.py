"""A chat with a tool-calling model through a real MONAI Label server (``--conf vlm_tools on``): the
remote VLM is a scripted OpenAI-compatible double that answers with tool calls as vLLM does; VISTA3D
runs its stand-in weights through the real runner on the sample CT, for a group or a list of its classes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer, sse, tool_call_completion, tool_call_sse
from server_harness import RunningServer, chat_server_with_stand_ins
from test_chat_server import ask, expected_feedback, parts

from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.tools import expert_tools
from vila_m3.imaging import read_labelmap, read_volume

pytestmark = pytest.mark.server

QUESTION = "Is there a liver tumor?"


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
                fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    with chat_server_with_stand_ins(tmp_path_factory.mktemp("tool-chat-server"), sample_data, fake_vlm.url,
                                    conf={"vlm_model": "fake-tool-model", "vlm_tools": "on"}) as server:
        yield server


def test_the_models_tool_call_runs_vista3d_and_its_result_returns_as_a_tool_message(tool_server, fake_vlm,
                                                                                   sample_data, tmp_path):
    fake_vlm.script(tool_call_sse([("VISTA3D", '{"argument": "hepatic tumor"}')], pieces=["Let me check. "],
                                  arguments_chunk=4),
                    sse(["Yes, ", "the liver shows a lesion."]))
    before = len(fake_vlm.posts)
    answer, label_bytes = parts(ask(tool_server, {"prompt": QUESTION, "chat_id": "tools-1", "slice_index": 30}))

    first, second = fake_vlm.posts[before:before + 2]
    offered = ExpertRegistry.from_config(available=lambda spec: None if spec.name == "VISTA3D" else "not staged")
    assert first.tools == second.tools == expert_tools(offered)
    assert first.body["tool_choice"] == "auto"
    assert [part["text"] for part in first.messages[0]["content"] if part["type"] == "text"] == \
        ["This is a CT image.\n" + QUESTION]  # the tools replace the model card
    assert [m["role"] for m in second.messages] == ["user", "assistant", "tool", "user"]
    assert second.messages[1]["tool_calls"] == [{"id": "call_0", "type": "function", "function": {
        "name": "VISTA3D", "arguments": '{"argument": "hepatic tumor"}'}}]
    tool = second.messages[2]
    assert tool["tool_call_id"] == "call_0"
    overlay = second.messages[3]["content"]
    assert [part["type"] for part in overlay] == ["text", "image_url", "text"]
    assert overlay[0]["text"] == "The overlay of the VISTA3D result (call_0):\n"

    assert answer["answer"] == "Yes, the liver shows a lesion."
    assert [m["role"] for m in answer["transcript"]] == ["user", "assistant", "expert", "assistant"]
    assert answer["transcript"][1]["text"] == "Let me check."
    assert [(e["expert"], e["argument"]) for e in answer["experts"]] == [("VISTA3D", "hepatic tumor")]
    assert answer["label_names"] == {"liver": 1, "hepatic tumor": 26}
    assert set(answer["label_colors"]) == {"liver", "hepatic tumor"}
    assert "tool calls" in answer["vlm"]["name"]

    path = tmp_path / "labels.nii.gz"
    path.write_bytes(label_bytes)
    labels = read_labelmap(path)
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert labels.geometry.allclose(ct.geometry, atol=1e-4)
    # the expert message is the one the trigger path stores; the tool message carries its text
    expert = answer["transcript"][2]
    feedback = expected_feedback(labels, "axial", 30, answer["label_names"], QUESTION)
    assert expert["text"] == feedback and expert["expert"] == "VISTA3D" and expert["argument"] == "hepatic tumor"
    assert expert["tool_call"] == {"id": "call_0", "name": "VISTA3D", "arguments": '{"argument": "hepatic tumor"}'}
    assert tool["content"] == feedback.replace("<image>", "the overlay image that follows")


def test_a_bad_tool_call_is_fed_back_and_the_turn_still_ends(tool_server, fake_vlm):
    fake_vlm.script(tool_call_completion([("VISTA3D", '{"argument": "kidney stones"}'), ("BRATS", "{}")]),
                    sse(["I cannot segment that; ", "no expert result is available."]))
    before = len(fake_vlm.posts)
    answer, labels = parts(ask(tool_server, {"prompt": "Segment the kidney stones", "chat_id": "tools-bad"}))

    assert answer["answer"] == "I cannot segment that; no expert result is available."
    assert answer["experts"] == [] and labels is None
    assert [m["role"] for m in answer["transcript"]] == ["user", "assistant", "expert", "expert", "assistant"]
    bad_argument, unavailable = answer["transcript"][2:4]
    assert bad_argument["error"].startswith("VISTA3D does not accept the argument 'kidney stones'")
    assert unavailable["error"].startswith("the tool BRATS is not available")
    second = fake_vlm.posts[before + 1].messages
    assert [m["role"] for m in second] == ["user", "assistant", "tool", "tool"]
    assert [m["tool_call_id"] for m in second[2:]] == ["call_0", "call_1"]
    assert second[2]["content"] == "Sorry I met an error: " + bad_argument["error"]
    assert len(fake_vlm.posts) == before + 2

    stored = tool_server.get("/vila_m3/chat/tools-bad").json()
    assert json.dumps(stored["messages"]) == json.dumps(answer["transcript"])


def test_a_call_with_classes_segments_and_returns_only_those_classes(tool_server, fake_vlm):
    fake_vlm.script(tool_call_completion([("VISTA3D", '{"classes": ["Spleen", "liver"]}')]),
                    sse(["The liver and spleen are marked."]))
    answer, label_bytes = parts(ask(tool_server, {"prompt": "Where are the liver and spleen?",
                                                  "chat_id": "tools-classes", "slice_index": 30}))
    assert [(e["expert"], e["argument"]) for e in answer["experts"]] == [("VISTA3D", "classes: liver, spleen")]
    assert answer["label_names"] == {"liver": 1, "spleen": 3} and set(answer["label_colors"]) <= {"liver", "spleen"}
    assert label_bytes is not None
    expert = answer["transcript"][2]
    assert expert["argument"] == "classes: liver, spleen" and not expert.get("error")
    assert expert["tool_call"]["arguments"] == '{"classes": ["Spleen", "liver"]}'
