"""Experts as OpenAI tools: the schema from the registry, tool calls mapped to the trigger parser's
requests, the remote client's tool requests and streamed tool-call deltas, and the tool conversation
built from a transcript."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
from expert_plugin import TOY_NAME, write_toy_expert
from fake_openai_server import (
    FakeOpenAIServer,
    Reply,
    sse,
    tool_call_completion,
    tool_call_events,
    tool_call_sse,
)

from vila_m3.chat.tool_conversation import tool_conversation
from vila_m3.chat.transcript import Message
from vila_m3.chat.vlm_backend import remote_settings
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.tools import ToolCallError, expert_tools, resolve_tool_call
from vila_m3.experts.triggers import find_triggers
from vila_m3.vlm import ImageCountError
from vila_m3.vlm.remote import RemoteVLM, RemoteVLMError, ToolCall, build_tool_messages


@pytest.fixture(scope="module")
def registry() -> ExpertRegistry:
    return ExpertRegistry.from_config(available=lambda spec: None if spec.runner else "not run by this product")


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as running:
        yield running


def client(server: FakeOpenAIServer) -> RemoteVLM:
    return RemoteVLM(server.url, "tool-model", backoff_s=0.01, timeout_s=5.0, tool_calling=True)


# ---- the schema --------------------------------------------------------------------------------------
def test_one_function_per_runnable_expert_with_its_arguments_as_an_enum(registry):
    tools = {tool["function"]["name"]: tool for tool in expert_tools(registry)}
    assert list(tools) == [spec.name for spec in registry.experts if spec.runner]
    assert set(tools) == {"BRATS", "VISTA3D", "CXR"}
    assert all(tool["type"] == "function" for tool in tools.values())
    vista = tools["VISTA3D"]["function"]
    assert vista["parameters"]["properties"]["argument"]["enum"] == list(registry.get("VISTA3D").args)
    assert vista["parameters"]["properties"]["argument"]["type"] == "string"
    assert "required" not in vista["parameters"]  # everything is its default
    assert vista["parameters"]["additionalProperties"] is False
    for name in ("BRATS", "CXR"):
        assert tools[name]["function"]["parameters"] == {"type": "object", "properties": {}, "additionalProperties": False}
    for name, tool in tools.items():
        spec = registry.get(name)
        assert spec.accuracy in tool["function"]["description"]
        assert spec.overview.rstrip(".") in tool["function"]["description"]
    json.dumps(expert_tools(registry))  # sendable as it is


def test_vista3d_also_takes_a_list_of_its_classes_instead_of_a_group(registry):
    spec = registry.get("VISTA3D")
    vista = {tool["function"]["name"]: tool for tool in expert_tools(registry)}["VISTA3D"]["function"]["parameters"]
    classes = vista["properties"]["classes"]
    assert classes["type"] == "array" and classes["minItems"] == 1 and classes["uniqueItems"] is True
    assert classes["items"]["enum"] == list(spec.labels.values()) and len(classes["items"]["enum"]) == 132
    assert set(vista["properties"]) == {"argument", "classes"} and "not both" in vista["properties"]["argument"]["description"]

    called = resolve_tool_call("VISTA3D", json.dumps({"classes": ["Spleen", " 'left kidney' ", "spleen"]}), registry)
    assert called.argument == "classes: spleen, left kidney"  # table spelling, id order, once each
    assert called.resolved.group is None and called.resolved.label_ids == (3, 14)
    assert dict(called.resolved.labels) == {"spleen": 3, "left kidney": 14}
    assert called.argument not in spec.args  # never taken for a group
    # a class that is also a group's name is the class alone, not the group
    tumour = resolve_tool_call("VISTA3D", '{"classes": ["hepatic tumor"]}', registry)
    assert tumour.resolved.label_ids == (26,) and tumour.key != ("VISTA3D", "hepatic tumor")
    assert registry.get("VISTA3D").resolve_argument("hepatic tumor").label_ids != (26,)


@pytest.mark.parametrize(("arguments", "message"), [
    ('{"classes": ["livr", "spleen"]}', r"VISTA3D has no class 'livr' \(did you mean 'liver'\?\)"),
    ('{"classes": ["pancreas tumour"]}', r"'pancreas tumour' \(did you mean 'pancreatic tumor'"),
    ('{"classes": ["xyzzy"]}', r"VISTA3D has no class 'xyzzy'; the valid names are the tool's list of classes"),
    ('{"classes": []}', r"'classes' must be a non-empty list of class names"),
    ('{"classes": "liver"}', r"'classes' must be a non-empty list of class names"),
    ('{"classes": ["liver"], "argument": "organs"}', r"give either 'argument' or 'classes', not both"),
])
def test_a_classes_call_that_cannot_run_names_the_problem_and_the_nearest_classes(registry, arguments, message):
    with pytest.raises(ToolCallError, match=message):
        resolve_tool_call("VISTA3D", arguments, registry)


def test_experts_without_label_ids_take_no_classes(registry):
    assert registry.get("BRATS").class_names == () and registry.get("CXR").class_names == ()
    with pytest.raises(ToolCallError, match=r"BRATS does not take the argument\(s\) 'classes'; it takes no arguments"):
        resolve_tool_call("BRATS", '{"classes": ["edema"]}', registry)


def test_an_unavailable_expert_is_not_offered(registry):
    partial = ExpertRegistry.from_config(available=lambda spec: None if spec.name == "VISTA3D" else "weights not staged")
    assert [tool["function"]["name"] for tool in expert_tools(partial)] == ["VISTA3D"]
    with pytest.raises(ToolCallError, match=r"the tool BRATS is not available \(weights not staged\); tools: VISTA3D"):
        resolve_tool_call("BRATS", "{}", partial)


def test_an_expert_added_from_its_own_experts_file_is_a_tool(tmp_path):
    registry = ExpertRegistry.from_config(experts_files=[write_toy_expert(tmp_path / "site")])
    toy = {tool["function"]["name"]: tool["function"] for tool in expert_tools(registry)}[TOY_NAME]
    spec = registry.get(TOY_NAME)
    assert toy["parameters"]["properties"]["argument"]["enum"] == list(spec.args)
    assert spec.overview in toy["description"]
    trigger = find_triggers(f"<{TOY_NAME}({spec.args[-1]})>", registry).triggers[0]
    assert resolve_tool_call(TOY_NAME, json.dumps({"argument": spec.args[-1]}), registry).key == trigger.key


# ---- tool calls -> expert requests ------------------------------------------------------------------
def _spellings(registry: ExpertRegistry) -> list[str | None]:
    spec = registry.get("VISTA3D")
    return [None, "", *spec.args, *spec.aliases, "  'Hepatic  Tumor' ", "ORGANS", "None"]


def test_a_tool_call_is_the_request_the_same_trigger_makes(registry):
    for argument in _spellings(registry):
        written = "" if argument is None else argument
        trigger = find_triggers(f"Let me trigger <VISTA3D({written})>.", registry).triggers[0]
        arguments = "{}" if argument is None else json.dumps({"argument": argument})
        called = resolve_tool_call("VISTA3D", arguments, registry)
        assert called.key == trigger.key, argument
        assert called.resolved == trigger.resolved
    for name in ("BRATS", "CXR"):
        trigger = find_triggers(f"<{name}()>", registry).triggers[0]
        for arguments in ("{}", "", "null", '{"argument": null}', '{"argument": ""}'):
            assert resolve_tool_call(name, arguments, registry).key == trigger.key == (name, None)


@pytest.mark.parametrize(("name", "arguments", "message"), [
    ("TOTALSEG", "{}", r"unknown tool 'TOTALSEG'; the tools are: BRATS, VISTA3D, CXR"),
    ("vista3d", "{}", r"unknown tool 'vista3d'"),
    ("VISTA3D", '{"argument": "hepatic tumor"', r"the arguments of the VISTA3D call are not valid JSON"),
    ("VISTA3D", '["organs"]', r"must be a JSON object, got list"),
    ("VISTA3D", '{"argument": "kidney stones"}', r"VISTA3D does not accept the argument 'kidney stones'; valid arguments are: 'everything'"),
    ("VISTA3D", '{"argument": 3}', r"the 'argument' of VISTA3D must be a string, got int"),
    ("VISTA3D", '{"organ": "liver"}', r"VISTA3D does not take the argument\(s\) 'organ'; it takes only 'argument'"),
    ("BRATS", '{"argument": "tumor"}', r"BRATS takes no argument, but got 'tumor'; call it with \{\}"),
    ("CXR", '{"view": "PA"}', r"CXR does not take the argument\(s\) 'view'; it takes no arguments"),
])
def test_a_call_that_cannot_run_names_the_problem(registry, name, arguments, message):
    with pytest.raises(ToolCallError, match=message):
        resolve_tool_call(name, arguments, registry)


# ---- the remote client -------------------------------------------------------------------------------
def test_a_tool_request_offers_the_tools_and_reads_whole_tool_calls(server, registry):
    server.script(tool_call_completion([("VISTA3D", '{"argument": "hepatic tumor"}'), ("CXR", "{}")], text="Let me look."))
    tools = expert_tools(registry)
    result = client(server).generate_with_tools([{"role": "user", "content": "<image>Is there a tumour?"}],
                                                [np.zeros((4, 4), np.uint8)], tools, max_new_tokens=32)
    assert result.text == "Let me look."
    assert result.tool_calls == (ToolCall("call_0", "VISTA3D", '{"argument": "hepatic tumor"}'),
                                 ToolCall("call_1", "CXR", "{}"))
    body = server.posts[0].body
    assert server.posts[0].tools == tools and body["tool_choice"] == "auto"
    assert [part["type"] for part in body["messages"][0]["content"]] == ["image_url", "text"]


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_streamed_tool_call_deltas_are_assembled_by_index(server, registry, chunk):
    calls = [("VISTA3D", '{"argument": "organs"}'), ("BRATS", "{}")]
    server.script(tool_call_sse(calls, pieces=["I will ", "segment."], arguments_chunk=chunk))
    pieces: list[str] = []
    result = client(server).generate_with_tools([{"role": "user", "content": "Segment"}], [], expert_tools(registry),
                                                stream=pieces.append)
    assert result.tool_calls == (ToolCall("call_0", *calls[0]), ToolCall("call_1", *calls[1]))
    assert result.text == "".join(pieces) == "I will segment."
    # the server thread counts an event after writing it: the client may have read the last one first
    expected = len(tool_call_events(calls, ["I will ", "segment."], chunk))
    deadline = time.monotonic() + 5
    while server.events_sent < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.events_sent == expected


def test_interleaved_deltas_and_names_split_over_chunks_are_joined(server):
    def chunk(delta):
        return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    events = [
        chunk({"tool_calls": [{"index": 0, "id": "a1", "type": "function", "function": {"name": "VIS"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "b2", "type": "function", "function": {"name": "CXR", "arguments": "{"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "TA3D", "arguments": '{"argu'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "}"}}, {"index": 0, "function": {"arguments": 'ment": "lung tumor"}'}}]}),
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        "data: [DONE]",
    ]
    server.script(Reply(events=events))
    result = client(server).generate_with_tools([{"role": "user", "content": "q"}], [], [], cancel=None,
                                                stream=lambda piece: None)
    assert result.tool_calls == (ToolCall("a1", "VISTA3D", '{"argument": "lung tumor"}'), ToolCall("b2", "CXR", "{}"))
    assert "tools" not in server.posts[0].body  # none offered, none sent


def test_a_call_without_a_name_is_a_malformed_answer(server):
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None,
                                                  "tool_calls": [{"id": "x", "function": {"arguments": "{}"}}]}}]}
    server.script(Reply(json_body=body))
    with pytest.raises(RemoteVLMError, match="tool call 0 has no function name"):
        client(server).generate_with_tools([{"role": "user", "content": "q"}], [], [])


def test_plain_answers_still_work_in_tool_mode(server, registry):
    server.script(sse(["No expert ", "is needed."]))
    result = client(server).generate_with_tools([{"role": "user", "content": "Hello"}], [], expert_tools(registry),
                                                stream=lambda piece: None)
    assert result.text == "No expert is needed." and result.tool_calls == ()


def test_tool_messages_are_checked_before_anything_is_sent():
    call = ToolCall("c1", "VISTA3D", "{}")
    with pytest.raises(ValueError, match="answers 'c9', which is not a call of the assistant message before it"):
        build_tool_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "c9", "content": "r"}])
    with pytest.raises(ValueError, match="images can only be in user messages"):
        build_tool_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                             {"role": "tool", "tool_call_id": "c1", "content": "<image>"}])
    with pytest.raises(ImageCountError):
        build_tool_messages([{"role": "user", "content": "<image><image>q"}], [np.zeros((2, 2), np.uint8)])
    built = build_tool_messages([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                                 {"role": "tool", "tool_call_id": "c1", "content": "done"}])
    assert built[1] == {"role": "assistant", "content": None, "tool_calls": [call.as_openai()]}
    assert built[2] == {"role": "tool", "tool_call_id": "c1", "content": "done"}


# ---- transcript -> tool conversation -----------------------------------------------------------------
def test_a_transcript_becomes_tool_messages_with_the_overlays_after_them():
    feedback = "The results are <image>. The colors in this image describe red: liver. Use this result to respond to this prompt:\nq"
    call = {"id": "call_0", "name": "VISTA3D", "arguments": '{"argument": "organs"}'}
    bad = {"id": "call_1", "name": "TOTALSEG", "arguments": "{}"}
    messages = [
        Message("user", "<image>This is a CT image.\nq", images=["turn001_slice0.png"], question="q"),
        Message("assistant", ""),
        Message("expert", feedback, images=["expert001_vista3d.png"], expert="VISTA3D", argument="organs", tool_call=call),
        Message("expert", "Sorry I met an error: unknown tool", error="unknown tool", tool_call=bad),
        Message("expert", "", error="a note for the user", to_model=False),
        Message("assistant", "The liver is segmented."),
    ]
    conversation, images = tool_conversation(messages)
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "tool", "user", "assistant"]
    assert conversation[1]["tool_calls"] == [ToolCall(**call), ToolCall(**bad)]
    assert conversation[2] == {"role": "tool", "tool_call_id": "call_0",
                               "content": feedback.replace("<image>", "the overlay image that follows")}
    assert conversation[3]["content"] == "Sorry I met an error: unknown tool"
    assert conversation[4]["content"] == "The overlay of the VISTA3D result (call_0):\n<image>\n"
    assert images == ["turn001_slice0.png", "expert001_vista3d.png"]
    assert conversation[5] == {"role": "assistant", "content": "The liver is segmented.", "tool_calls": []}
    text_only, names = tool_conversation(messages, overlay_images=False)
    assert [m["role"] for m in text_only] == ["user", "assistant", "tool", "tool", "assistant"]
    assert names == ["turn001_slice0.png"]
    build_tool_messages(conversation, [np.zeros((2, 2), np.uint8)] * len(images))  # a valid request


def test_vlm_tools_is_a_conf_switch_of_the_remote_backend():
    conf = {"vlm_url": "http://gpu:8000/v1", "vlm_model": "m"}
    assert "tool_calling" not in remote_settings(conf)
    assert remote_settings({**conf, "vlm_tools": "on"})["tool_calling"] is True
    assert remote_settings({**conf, "vlm_tools": "on", "vlm_tool_images": "off"})["tool_images"] is False
    assert RemoteVLM.from_config(remote_settings({**conf, "vlm_tools": "true"})).tool_calling
    with pytest.raises(ValueError, match="vlm_tools must be on or off, got 'maybe'"):
        remote_settings({**conf, "vlm_tools": "maybe"})
    with pytest.raises(ValueError, match="vlm_tools on needs --conf vlm_url"):
        remote_settings({"vlm_tools": "on"})
