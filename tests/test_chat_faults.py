"""Faults lose nothing, without a server: the real chat loop, store, experts (stand-in weights) and data
engine with a scripted VLM.

A crash is what a killed process leaves on disk: the chat folder copied while a turn is stopped in the
middle (during generation, during an expert), then opened by a "new process" (a new boot id, as after a
restart). Storage faults (a full disk, a read-only folder) are OSErrors with the kernel's errno, raised
where the store writes (root ignores permissions, so a real read-only folder needs a mount: see
test_crash_server.py).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from chat_doubles import ScriptedVLM
from test_datagen import make_datastore, product_registry, unique_records

from vila_m3.chat import store as store_module
from vila_m3.chat.loop import ChatLoop, TurnRequest
from vila_m3.chat.store import (
    INTERRUPTED_NOTE,
    TURN_MARKER,
    Chat,
    ChatsFull,
    ChatsReadOnly,
    ChatStore,
)
from vila_m3.chat.transcript import Message, vlm_conversation
from vila_m3.data import export_dataset
from vila_m3.experts.service import ExpertService
from vila_m3.standins.stand_ins import stage_stand_ins

TRIGGER = "This looks like a CT image. Let me trigger <VISTA3D(hepatic tumor)>."
FIRST_QUESTION = "Is the liver enlarged?"
LOST_QUESTION = "Is there a tumor in segment seven?"
NEXT_QUESTION = "What about the spleen?"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, sample_data: Path):
    """A datastore with the CT (no final label: chats are exported as recorded) and stand-in VISTA3D."""
    root = tmp_path_factory.mktemp("faults")
    studies = make_datastore(root, sample_data, cxr=False, brats=False)
    (studies / "labels" / "final" / "ct_abdomen.nii.gz").unlink()
    stage_stand_ins(root / "models", ("vista3d",))
    registry = product_registry()
    service = ExpertService(root / "models", registry=registry, idle_release_s=0)
    yield {"root": root, "studies": studies, "registry": registry, "experts": service,
           "ct": str(studies / "ct_abdomen.nii.gz")}
    service.close()


def ct_turn(site: dict, chat_id: str, question: str) -> TurnRequest:
    return TurnRequest(chat_id, question, {"image": site["ct"]}, slice_index=40, study={"image": "ct_abdomen"})


def loop_on(site: dict, chats: Path, answers: list[str]) -> tuple[ChatLoop, ScriptedVLM]:
    vlm = ScriptedVLM(answers)
    return ChatLoop(vlm, site["experts"], site["registry"], ChatStore(chats)), vlm


def crash_during(site: dict, chats: Path, chat_id: str, answers: list[str], stop_at: str,
                 snapshot: Path) -> None:
    """Run a turn of ``chat_id`` and copy its folder to ``snapshot`` while the turn is stopped at ``stop_at``
    (``generate``: inside the VLM's first answer; ``expert``: as the expert starts): what a kill -9 leaves."""
    stopped, resume = threading.Event(), threading.Event()

    def hold(*_) -> None:
        stopped.set()
        assert resume.wait(60)

    vlm = ScriptedVLM(answers, on_generate=(lambda n: hold() if n == len(answers) - 1 else None)
                      if stop_at == "generate" else None)
    loop = ChatLoop(vlm, site["experts"], site["registry"], ChatStore(chats))
    on_event = (lambda name, data: hold() if name == "expert_started" else None) if stop_at == "expert" else None
    worker = threading.Thread(target=loop.run_turn, args=(ct_turn(site, chat_id, LOST_QUESTION), on_event))
    worker.start()
    try:
        assert stopped.wait(120), "the turn never reached the point of the crash"
        shutil.copytree(chats / chat_id, snapshot / chat_id)
        # the same process sees its own turn as running, never interrupted (reads and a second app instance)
        live = ChatStore(chats)
        assert live.load(chat_id).turn["state"] == "running"
        report = live.recover()
        assert report.interrupted == [] and (chats / chat_id / TURN_MARKER).is_file()
    finally:
        resume.set()
        worker.join(120)
    assert not (chats / chat_id / TURN_MARKER).exists()
    assert "turn" not in json.loads((chats / chat_id / "chat.json").read_text(encoding="utf-8"))


@pytest.fixture
def new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted server: a process with another boot id than the one that recorded the running turn."""
    monkeypatch.setattr(store_module, "BOOT_ID", uuid.uuid4().hex)


def stored(folder: Path) -> dict:
    return json.loads((folder / "chat.json").read_text(encoding="utf-8"))


def test_a_turn_killed_during_generation_is_marked_interrupted_and_the_chat_goes_on(site, tmp_path):
    chats, crashed = tmp_path / "chats", tmp_path / "crashed"
    first, _ = loop_on(site, chats, ["The liver is of normal size."])
    first.run_turn(ct_turn(site, "gen", FIRST_QUESTION))
    crash_during(site, chats, "gen", ["never finished"], "generate", crashed)

    on_disk = stored(crashed / "gen")  # what the kill left: the question, the turn recorded as running
    assert on_disk["turn"]["state"] == "running" and on_disk["messages"][-1]["question"] == LOST_QUESTION
    assert (crashed / "gen" / TURN_MARKER).is_file()


def test_recovery_marks_a_dead_processs_turn_and_the_next_turn_and_export_leave_it_out(site, tmp_path,
                                                                                      new_process):
    chats = tmp_path / "chats"
    first, _ = loop_on(site, tmp_path / "live", ["The liver is of normal size."])
    first.run_turn(ct_turn(site, "gen", FIRST_QUESTION))
    crash_during(site, tmp_path / "live", "gen", ["never finished"], "generate", chats)
    crash_during(site, tmp_path / "live", "exp", [TRIGGER, "never reached"], "expert", chats)
    assert stored(chats / "exp")["messages"][-1] == {"role": "assistant", "text": TRIGGER}  # a trigger, no result

    store_module.BOOT_ID = uuid.uuid4().hex  # the restarted server
    report = ChatStore(chats).recover()
    assert sorted(report.interrupted) == ["exp", "gen"] and report.problems == []
    for chat_id, lost in (("gen", [LOST_QUESTION]), ("exp", [LOST_QUESTION, TRIGGER])):
        data = stored(chats / chat_id)
        assert data["turn"]["state"] == "interrupted" and not (chats / chat_id / TURN_MARKER).exists()
        marked = [message for message in data["messages"] if message.get("interrupted")]
        texts = [message.get("question") or message["text"] for message in marked[:-1]]
        assert texts == lost and marked[-1]["error"] == INTERRUPTED_NOTE
        assert not any(message["role"] == "expert" and not message.get("interrupted")
                       for message in data["messages"])
    assert ChatStore(chats).recover().interrupted == []  # done once

    # the next turn works; the model sees neither the lost question nor the trigger without its result
    loop, vlm = loop_on(site, chats, ["The spleen looks normal."])
    result = loop.run_turn(ct_turn(site, "exp", NEXT_QUESTION))
    assert result.answer == "The spleen looks normal."
    sent = " ".join(text for role, text in vlm.calls[0][0])
    assert LOST_QUESTION not in sent and TRIGGER not in sent and NEXT_QUESTION in sent
    assert sent.startswith("Here is a list of available expert models")  # the card moves to the first kept turn
    assert vlm.calls[0][1] == 1  # only the new slice
    assert "turn" not in stored(chats / "exp")

    export = export_dataset(site["studies"], tmp_path / "out", chats_dir=chats, seed=0, progress=False)
    records = [record for record, meta in unique_records(export.out_dir) if meta["category"] == "chat"]
    texts = [turn["value"] for record in records for turn in record["conversations"]]
    assert any(FIRST_QUESTION in text for text in texts) and any(NEXT_QUESTION in text for text in texts)
    assert not any(LOST_QUESTION in text or TRIGGER in text or "never" in text for text in texts)


def test_the_export_leaves_out_a_turn_still_running(site, tmp_path):
    chats = tmp_path / "chats"
    first, _ = loop_on(site, tmp_path / "live", ["The liver is of normal size."])
    first.run_turn(ct_turn(site, "gen", FIRST_QUESTION))
    crash_during(site, tmp_path / "live", "exp", [TRIGGER, "never reached"], "expert", chats)
    shutil.copytree(tmp_path / "live" / "gen", chats / "gen")
    chat = ChatStore(chats).load("exp")  # this process's boot id: still running, not interrupted
    assert chat.turn["state"] == "running" and chat.finished_messages() == []
    export = export_dataset(site["studies"], tmp_path / "out", chats_dir=chats, seed=0, progress=False)
    records = [record for record, meta in unique_records(export.out_dir) if meta["category"] == "chat"]
    assert len(records) == 1 and FIRST_QUESTION in records[0]["conversations"][0]["value"]
    assert not any(TRIGGER in turn["value"] for turn in records[0]["conversations"])


def test_the_sweep_removes_temporaries_and_unreferenced_pictures_and_keeps_the_rest(site, tmp_path, new_process):
    chats = tmp_path / "chats"
    loop, _ = loop_on(site, chats, [TRIGGER, "One lesion is visible."])
    loop.run_turn(ct_turn(site, "kept", FIRST_QUESTION))
    folder = chats / "kept"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert {"turn001_slice0.png", "expert001_vista3d.png", "turn001_labels.nii.gz"} <= set(before)
    leftovers = [".chat-k2j3h4.json", "turn002_slice0.png", ".turn002_labels.nii.gz.4242.tmp.nii.gz"]
    for name in leftovers:
        (folder / name).write_bytes(b"left by a crash")
    (chats / "first-turn-killed").mkdir()  # killed before its first save: a picture and a marker only
    (chats / "first-turn-killed" / "turn001_slice0.png").write_bytes(b"png")
    (chats / "first-turn-killed" / TURN_MARKER).write_text("an old boot", encoding="utf-8")
    (chats / "notes.txt").write_text("not a chat", encoding="utf-8")

    report = ChatStore(chats).recover()
    assert report.removed == 4 and report.interrupted == [] and report.problems == []
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert not (chats / "first-turn-killed").exists() and (chats / "notes.txt").is_file()


def test_the_sweep_reads_only_folders_a_crash_touched(tmp_path, new_process):
    """Many chats: the sweep lists each folder and reads only the one with a marker."""
    store = ChatStore(tmp_path / "chats")
    for number in range(2000):
        chat = Chat(f"chat-{number:04d}", messages=[Message("user", "<image>q", images=["turn001_slice0.png"]),
                                                    Message("assistant", "a")])
        folder = store.folder(chat.chat_id)
        folder.mkdir()
        (folder / "chat.json").write_text(json.dumps(chat.as_dict()), encoding="utf-8")
        (folder / "turn001_slice0.png").write_bytes(b"png")
    crashed = store.load("chat-0007")
    store.begin_turn(crashed)
    crashed.messages.append(Message("user", "<image>lost", images=["turn002_slice0.png"]))
    store.save(crashed)
    store_module.BOOT_ID = uuid.uuid4().hex  # the restarted server

    began = time.perf_counter()
    report = store.recover()
    seconds = time.perf_counter() - began
    assert report.folders == 2000 and report.opened == 1 and report.interrupted == ["chat-0007"]
    assert seconds < 2.0, f"the sweep of 2000 chats took {seconds:.2f} s"


def test_a_chat_json_of_before_turn_records_loads_as_finished(tmp_path):
    folder = tmp_path / "chats" / "old"
    folder.mkdir(parents=True)
    old = {"chat_id": "old", "study": {"image": "ct_abdomen"}, "modality": "CT", "labels": None,
           "messages": [{"role": "user", "text": "<image>q", "images": ["turn001_slice0.png"], "question": "q"},
                        {"role": "assistant", "text": "a"}]}
    (folder / "chat.json").write_text(json.dumps(old), encoding="utf-8")
    chat = ChatStore(tmp_path / "chats").load("old")
    assert chat.turn is None and chat.finished_messages() == chat.messages and len(chat.messages) == 2
    assert chat.as_dict() == {**old, "owner": None}  # saved back unchanged (no turn key, no flags)
    assert vlm_conversation(chat.messages)[0] == [("user", "<image>q"), ("assistant", "a")]


def failing(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize(("code", "error", "words"), [(errno.ENOSPC, ChatsFull, "full"),
                                                        (errno.EDQUOT, ChatsFull, "full"),
                                                        (errno.EROFS, ChatsReadOnly, "read-only"),
                                                        (errno.EACCES, ChatsReadOnly, "read-only")])
def test_a_failed_save_keeps_the_old_chat_json_and_names_the_problem(tmp_path, monkeypatch, code, error, words):
    store = ChatStore(tmp_path / "chats")
    chat = Chat("c1", messages=[Message("assistant", "kept")])
    store.save(chat)
    folder = store.folder("c1")
    old = (folder / "chat.json").read_bytes()
    chat.messages.append(Message("assistant", "lost"))
    monkeypatch.setattr(os, "fsync", failing(code))  # the data could not reach the disk
    with pytest.raises(error, match=words) as raised:
        store.save(chat)
    assert str(tmp_path) not in str(raised.value)
    monkeypatch.undo()
    assert (folder / "chat.json").read_bytes() == old
    assert sorted(path.name for path in folder.iterdir()) == ["chat.json"]  # no temporary left


def test_a_picture_that_cannot_be_written_leaves_no_partial_file(tmp_path, monkeypatch):
    from PIL import Image

    store = ChatStore(tmp_path / "chats")
    real_open = open

    def full_after_header(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith(".png"):
            handle.write(b"\x89PNG")
            handle.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return handle

    monkeypatch.setattr("builtins.open", full_after_header)
    with pytest.raises(ChatsFull):
        store.save_image("c1", "turn001_slice0.png", Image.new("RGB", (8, 8)))
    monkeypatch.undo()
    assert not (store.folder("c1") / "turn001_slice0.png").exists()


def test_a_turn_on_a_full_disk_is_chats_full_and_the_chat_stays_as_it_was(site, tmp_path, monkeypatch):
    chats = tmp_path / "chats"
    loop, _ = loop_on(site, chats, ["The liver is of normal size."])
    loop.run_turn(ct_turn(site, "c1", FIRST_QUESTION))
    before = {path.name: path.read_bytes() for path in (chats / "c1").iterdir()}
    loop2, vlm = loop_on(site, chats, ["never saved"])
    monkeypatch.setattr(os, "fsync", failing(errno.ENOSPC))
    with pytest.raises(ChatsFull):
        loop2.run_turn(ct_turn(site, "c1", LOST_QUESTION))
    monkeypatch.undo()
    assert vlm.calls == []  # refused at the turn's first save, before the model was asked
    assert {path.name: path.read_bytes() for path in (chats / "c1").iterdir()} == before


def test_a_read_only_folder_refuses_the_turn_before_anything_is_written(site, tmp_path, monkeypatch):
    chats = tmp_path / "chats"
    loop, _ = loop_on(site, chats, ["The liver is of normal size."])
    loop.run_turn(ct_turn(site, "c1", FIRST_QUESTION))
    before = {path.name: path.read_bytes() for path in (chats / "c1").iterdir()}
    store = ChatStore(chats)
    assert store.writable() is None
    monkeypatch.setattr(tempfile, "mkstemp", failing(errno.EROFS))
    monkeypatch.setattr(Path, "write_text", failing(errno.EROFS))
    assert isinstance(store.writable(), ChatsReadOnly)
    loop2, vlm = loop_on(site, chats, ["never saved"])
    with pytest.raises(ChatsReadOnly, match="read-only"):
        loop2.run_turn(ct_turn(site, "c1", LOST_QUESTION))
    assert vlm.calls == []
    assert ChatStore(chats).load("c1").messages[-1].text == "The liver is of normal size."  # reads still work
    monkeypatch.undo()
    assert {path.name: path.read_bytes() for path in (chats / "c1").iterdir()} == before
