"""The data engine on chats made with a tool-calling model: calls that map onto a trigger become the trigger
record the trigger path would have made; a chat with a call that has none (VISTA3D classes) is left out with a
counted reason. The chats are made by the real chat loop in tool-calling mode (the scripted OpenAI double, a
VISTA3D probe bundle), as in test_tool_chat_loop."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from bundle_fixtures import make_probe_bundle
from fake_openai_server import FakeOpenAIServer, sse, tool_call_completion
from test_datagen import images_of, make_datastore, unique_records

from vila_m3.chat.loop import ChatLoop, TurnRequest
from vila_m3.chat.store import ChatStore
from vila_m3.chat.transcript import vlm_conversation
from vila_m3.data.config import load_datagen_config
from vila_m3.data.export import export_dataset
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.service import ExpertService
from vila_m3.vlm.remote import RemoteVLM


def product_card() -> str:
    return ExpertRegistry.from_config(available=lambda spec: None if spec.runner else "not run").model_card()


@pytest.fixture(scope="module")
def tool_chats(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Iterator[tuple[Path, Path]]:
    """Four tool-mode chats about the CT: a group call with no words, words and a call without arguments,
    a call with classes, and a call the model named wrongly; and a CXR-only datastore (the CT is not in it)."""
    root = tmp_path_factory.mktemp("tool-chats")
    make_probe_bundle(root / "models" / "bundles" / "vista3d", threshold_hu=300.0)
    registry = ExpertRegistry.from_config(available=lambda spec: None if spec.name == "VISTA3D" else "not staged")
    service = ExpertService(root / "models", registry=registry, idle_release_s=0)
    ct = str(sample_data / "studies" / "ct_abdomen.nii.gz")
    scripts = {
        "group": [tool_call_completion([("VISTA3D", '{"argument": "hepatoma"}')]), sse(["Yes, a tumour."])],
        "words": [tool_call_completion([("VISTA3D", "{}")], text="Let me look."), sse(["The organs are marked."])],
        "classes": [tool_call_completion([("VISTA3D", '{"classes": ["spleen"]}')]), sse(["The spleen is marked."])],
        "misnamed": [tool_call_completion([("TOTALSEG", "{}")]), sse(["Sorry."])],
    }
    try:
        with FakeOpenAIServer() as server:
            vlm = RemoteVLM(server.url, "tool-model", backoff_s=0.01, timeout_s=30.0, tool_calling=True)
            loop = ChatLoop(vlm, service, registry, ChatStore(root / "chats"))
            for chat_id, replies in scripts.items():
                server.script(*replies)
                loop.run_turn(TurnRequest(chat_id, "Is there a liver tumor?", {"image": ct}, slice_index=44,
                                          study={"image": "ct_abdomen"}))
    finally:
        service.close()
    yield root / "chats", make_datastore(root, sample_data, ct=False, brats=False)


def test_calls_that_map_onto_triggers_become_the_trigger_records(tool_chats, tmp_path):
    chats, studies = tool_chats
    result = export_dataset(studies, tmp_path / "out", chats_dir=chats, seed=0, progress=False)
    by_group = {"VISTA3D(hepatic tumor)": "group", "VISTA3D(everything)": "words"}
    records = {by_group[meta["group"]]: (record, meta) for record, meta in unique_records(result.out_dir)
               if meta["category"] == "chat"}
    assert set(records) == {"group", "words"} and result.manifest["counts"]["records"] >= 2
    store = ChatStore(chats)
    card = product_card()
    template = load_datagen_config().templates["trigger"]["VISTA3D"]
    for chat_id, trigger_text in [("group", template.format(group="hepatic tumor").strip()),
                                  ("words", "Let me look. <VISTA3D(everything)>")]:
        record, meta = records[chat_id]
        chat = store.load(chat_id)
        turns, names = vlm_conversation(chat.messages)
        texts = [turn["value"] for turn in record["conversations"]]
        assert [turn["from"] for turn in record["conversations"]] == ["human", "gpt", "human", "gpt"]
        assert texts[0] == card + turns[0][1]  # the card the trigger path shows, which tool mode leaves out
        assert texts[0].startswith("Here is a list of available expert models:\n<BRATS(args)>")
        assert texts[1] == trigger_text  # the call, written as the trigger it stands for
        assert texts[2] == turns[2][1] and texts[2].startswith("The results are <image>.")  # the expert's result
        assert texts[3] == turns[3][1]
        assert len(images_of(record)) == len(names) == 2

    notes = result.summary["notes"]
    assert notes["chat_tool_calls_as_triggers"] == 2 and notes["chats_skipped_for_tool_calls"] == 2
    reasons = sorted(skip.reason for skip in result.skips if skip.kind == "chat")
    assert reasons == ["a VISTA3D tool call with classes has no trigger (triggers take groups only)",
                       "a tool call that did not run has no trigger record"]
    assert sorted(skip["reason"] for skip in result.summary["skipped"] if skip["kind"] == "chat") == reasons
    written = (result.out_dir / "summary.txt").read_text(encoding="utf-8")
    assert all(reason in written for reason in reasons) and "chats skipped for tool calls: 2" in written


def test_a_failed_call_is_left_out_even_where_failed_experts_are_kept(tool_chats, tmp_path):
    chats, studies = tool_chats
    config = load_datagen_config()
    config = replace(config, chats={**config.chats, "skip_expert_errors": False})
    result = export_dataset(studies, tmp_path / "out", chats_dir=chats, seed=0, progress=False, config=config)
    assert result.summary["notes"]["chats_skipped_for_tool_calls"] == 2
    assert sorted(meta["group"] for _, meta in unique_records(result.out_dir) if meta["category"] == "chat") == [
        "VISTA3D(everything)", "VISTA3D(hepatic tumor)"]
