"""Faults against a real MONAI Label server: ``kill -9`` of its process group mid-turn (during generation
and during an expert) and a restart on the same folders; a read-only and a full chats folder.

The VLM is the real remote backend talking to a scripted OpenAI-compatible test double on 127.0.0.1;
VISTA3D runs its stand-in weights. Tests may run as root, which ignores file permissions, so the
read-only and the full folder are real mounts in a private user and mount namespace of the server
(``unshare``: a read-only bind mount, a full tmpfs); where that is not allowed those tests are skipped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from server_harness import (
    RunningServer,
    copy_app,
    free_port,
    isolated_env,
    monailabel_command,
    stand_in_site,
    start_process,
)
from test_chat_server import read_events

from vila_m3.chat.store import TURN_MARKER, Chat, ChatStore
from vila_m3.chat.transcript import Message

pytestmark = pytest.mark.server

FIRST_QUESTION = "Is the liver of normal size today?"
LOST_GENERATION = "Describe the left kidney in detail please"
LOST_EXPERT = "Is there a hepatic tumor in segment seven?"
TRIGGER = "Checking with <VISTA3D(hepatic tumor)> now."
NEXT_QUESTION = "And how does the spleen look?"



@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, fake_vlm: FakeOpenAIServer) -> dict:
    root = tmp_path_factory.mktemp("crash-server")
    studies, conf = stand_in_site(root, sample_data, fake_vlm.url)
    return {"root": root, "studies": studies, "conf": conf, "chats": root / "chats"}


def start(site: dict, name: str, conf: dict[str, str] | None = None, mounts: str = "") -> RunningServer:
    """A server on the site's studies, models and chats (``conf`` overrides); ``mounts``: shell commands run
    first in a private user and mount namespace (the server then runs in it)."""
    workdir = site["root"] / name
    workdir.mkdir()
    app_dir = copy_app(workdir / "app")
    port = free_port()
    command = monailabel_command(app_dir, site["studies"], {**site["conf"], **(conf or {})}, port)
    if mounts:
        command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f'{mounts} && exec "$@"', "sh",
                   *command]
    return start_process(command, workdir, isolated_env(workdir), f"http://127.0.0.1:{port}")


def kill_9(server: RunningServer) -> None:
    """SIGKILL to the server's whole process group, as a crash or the OOM killer would."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)


def ask(server: RunningServer, chat_id: str, question: str) -> requests.Response:
    return requests.post(f"{server.url}/infer/vila_m3", params={"image": "ct_abdomen", "output": "json"},
                         data={"params": json.dumps({"prompt": question, "chat_id": chat_id})}, timeout=300)


def stream(server: RunningServer, chat_id: str, question: str) -> requests.Response:
    response = requests.post(f"{server.url}/vila_m3/chat/stream", params={"image": "ct_abdomen"},
                             data={"params": json.dumps({"prompt": question, "chat_id": chat_id})},
                             stream=True, timeout=300)
    assert response.status_code == 200, response.text[:500]
    return response


def wait_for(response: requests.Response, event: str) -> None:
    for name, data in read_events(response):
        assert name not in ("error", "final"), (name, data)
        if name == event:
            return
    raise AssertionError(f"the stream ended before {event}")


def texts(data: dict) -> list[str]:
    return [message.get("question") or message["text"] for message in data["messages"]]


def test_kill_9_during_generation_and_during_an_expert_then_restart(site, fake_vlm):
    chats = site["chats"]
    server = start(site, "first")
    try:
        fake_vlm.script(sse(["The liver ", "is of ", "normal size."]))
        assert ask(server, "gen", FIRST_QUESTION).status_code == 200
        # chat "gen": killed while the VLM streams its answer; chat "exp": killed while VISTA3D runs
        fake_vlm.script(sse([f"word{i} " for i in range(200)], event_delay_s=0.5))
        generating = stream(server, "gen", LOST_GENERATION)
        wait_for(generating, "token")
        fake_vlm.script(sse(["Checking with ", "<VISTA3D(hepatic tumor)> ", "now."]))
        expert = stream(server, "exp", LOST_EXPERT)
        wait_for(expert, "expert_started")
    finally:
        kill_9(server)
    for response in (generating, expert):
        response.close()

    on_disk = {chat_id: json.loads((chats / chat_id / "chat.json").read_text(encoding="utf-8"))
               for chat_id in ("gen", "exp")}
    assert on_disk["gen"]["turn"]["state"] == on_disk["exp"]["turn"]["state"] == "running"
    assert texts(on_disk["exp"])[-2:] == [LOST_EXPERT, TRIGGER]  # the trigger without its result
    # what a kill during a save or a labelmap write leaves, and a first turn killed before its first save
    leftovers = [chats / "gen" / ".chat-x1y2z3.json", chats / "exp" / "expert001_vista3d.png",
                 chats / "exp" / ".turn001_labels.nii.gz.77.tmp.nii.gz"]
    for path in leftovers:
        path.write_bytes(b"partial")
    (chats / "never-saved").mkdir()
    (chats / "never-saved" / "turn001_slice0.png").write_bytes(b"partial")
    (chats / "never-saved" / TURN_MARKER).write_text("a dead process", encoding="utf-8")

    server = start(site, "second")
    try:
        for chat_id in ("gen", "exp"):
            folder = chats / chat_id
            data = json.loads((folder / "chat.json").read_text(encoding="utf-8"))  # valid JSON
            assert data["turn"]["state"] == "interrupted"
            lost = [message for message in data["messages"] if message.get("interrupted")]
            assert lost and lost[-1]["error"].startswith("this turn was interrupted")
            assert not any(message["role"] == "expert" and not message.get("interrupted")
                           for message in data["messages"])
            referenced = {name for message in data["messages"] for name in message.get("images", [])}
            assert {path.name for path in folder.glob("*.png")} == referenced
            assert not [name for name in os.listdir(folder) if name.startswith(".")]
            shown = requests.get(f"{server.url}/vila_m3/chat/{chat_id}", timeout=30)
            assert shown.status_code == 200 and shown.json()["turn"]["state"] == "interrupted"
        gen = json.loads((chats / "gen" / "chat.json").read_text(encoding="utf-8"))
        assert [m.get("interrupted", False) for m in gen["messages"]] == [False, False, True, True]
        assert texts(gen)[:3] == [FIRST_QUESTION, "The liver is of normal size.", LOST_GENERATION]
        assert not (chats / "never-saved").exists()
        assert "2 turn(s) left by a crash marked interrupted, 4 leftover file(s) removed" in server.log_tail(400)

        fake_vlm.script(sse(["The spleen ", "looks normal."]))
        answer = ask(server, "exp", NEXT_QUESTION)
        assert answer.status_code == 200, answer.text[:500]
        assert answer.json()["answer"] == "The spleen looks normal."
        sent = json.dumps(fake_vlm.posts[-1].body)
        assert NEXT_QUESTION in sent and LOST_EXPERT not in sent and "VISTA3D(hepatic tumor)> now" not in sent

        exported = requests.post(f"{server.url}/vila_m3/datagen/", params={"name": "after-crash", "seed": 0},
                                 timeout=300)
        assert exported.status_code == 200, exported.text[:500]
        out = site["root"] / "second" / "app" / "datagen" / "after-crash"
        values = [turn["value"] for split in ("train.json", "val.json")
                  for record in json.loads((out / split).read_text(encoding="utf-8"))
                  for turn in record["conversations"]]
        assert any(FIRST_QUESTION in value for value in values) and any(NEXT_QUESTION in value for value in values)
        assert not any(lost in value for value in values for lost in (LOST_GENERATION, LOST_EXPERT, TRIGGER))
    finally:
        server.stop()


def namespaces_work() -> bool:
    """Whether this machine lets a process make a private user and mount namespace and mount in it."""
    probe = "mkdir -p /tmp/.ns-probe && mount -t tmpfs -o size=16k tmpfs /tmp/.ns-probe"
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.parametrize(("kind", "status", "words"), [("read_only", 503, "read-only"), ("full", 507, "full")])
def test_a_read_only_or_full_chats_folder_refuses_turns_and_keeps_serving_reads(site, fake_vlm, kind, status,
                                                                                  words):
    if not namespaces_work():
        pytest.skip("this machine allows no private mount namespace (unshare): no read-only or full folder as root")
    chats = site["root"] / f"chats-{kind}"
    ChatStore(chats).save(Chat("stored", study={"image": "ct_abdomen"}, modality="CT",
                               messages=[Message("user", "<image>Is it a CT?", question="Is it a CT?"),
                                         Message("assistant", "Yes, a CT.")]))
    if kind == "read_only":
        mounts = f"mount --bind {chats} {chats} && mount -o remount,ro,bind {chats} {chats}"
    else:  # a small tmpfs holding the chats, then filled up
        mounts = (f"cp -a {chats} {chats}.copy && mount -t tmpfs -o size=256k tmpfs {chats} && "
                  f"cp -a {chats}.copy/. {chats}/ && (cat /dev/zero > {chats}/.filler 2>/dev/null; true)")
    before = (chats / "stored" / "chat.json").read_bytes()
    server = start(site, f"server-{kind}", {"chats_dir": str(chats)}, mounts)
    try:
        startup = [line for line in server.log_tail(400).splitlines() if "chats folder" in line and words in line]
        assert len(startup) == 1, server.log_tail(60)

        refused = ask(server, "stored", "And the liver?")
        assert refused.status_code == status, refused.text[:500]
        detail = refused.json()["detail"]
        assert words in detail and "chats folder" in detail and str(site["root"]) not in detail
        streamed = stream(server, "new-chat", "And the liver?")
        errors = [data for name, data in read_events(streamed) if name == "error"]
        assert errors and errors[0]["status"] == status and words in errors[0]["detail"]

        assert server.get("/info/").status_code == 200
        assert server.get("/datastore/", params={"output": "all"}).status_code == 200
        shown = server.get("/vila_m3/chat/stored")
        assert shown.status_code == 200 and texts(shown.json()) == ["Is it a CT?", "Yes, a CT."]
    finally:
        server.stop()
    assert (chats / "stored" / "chat.json").read_bytes() == before  # outside the namespace: untouched
    assert sorted(os.listdir(chats)) == ["stored"] and sorted(os.listdir(chats / "stored")) == ["chat.json"]
