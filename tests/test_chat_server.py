"""The chat through a real MONAI Label server: ``/infer/vila_m3``, the streaming route, restarts,
concurrent chats and bad input. The VLM is the real remote backend talking to a scripted
OpenAI-compatible test double on 127.0.0.1 (random weights never write triggers); the experts run
stand-in weights through the real runners."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from server_harness import RunningServer, stand_in_site, start_monailabel
from server_harness import multipart as parts

from vila_m3.imaging import read_labelmap, read_volume
from vila_m3.imaging.slices import render_label_slice

pytestmark = pytest.mark.server

TRIGGER = "This looks like a CT image. Let me trigger <VISTA3D(hepatic tumor)>."
COLOR_NAMES = ["red", "blue", "yellow", "magenta", "green", "indigo", "darkorange", "cyan", "pink", "brown",
               "orange", "lime", "orange", "gold", "yellowgreen", "darkgreen"]



@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, fake_vlm: FakeOpenAIServer) -> dict:
    root = tmp_path_factory.mktemp("chat-server")
    studies, conf = stand_in_site(root, sample_data, fake_vlm.url)
    return {"root": root, "studies": studies, "conf": conf}


@pytest.fixture(scope="module")
def chat_server(chat_setup: dict) -> Iterator[RunningServer]:
    server = start_monailabel(chat_setup["root"] / "first", chat_setup["studies"], conf=chat_setup["conf"])
    try:
        yield server
    finally:
        server.stop()


def ask(server: RunningServer, params: dict, image: str = "ct_abdomen") -> requests.Response:
    return requests.post(f"{server.url}/infer/vila_m3", params={"image": image, "output": "all"},
                         data={"params": json.dumps(params)}, timeout=300)


def expected_feedback(labels, axis: str, index: int, names: dict[str, int], question: str) -> str:
    """The protocol's segmentation feedback, computed here from the returned labelmap."""
    by_id = {label_id: name for name, label_id in names.items()}
    present = sorted(int(i) for i in np.unique(render_label_slice(labels, axis, index)) if i != 0)
    items = ", ".join(f"{COLOR_NAMES[rank % 16]}: {by_id[i]}" for rank, i in enumerate(present))
    return (f"The results are <image>. The colors in this image describe {items}. "
            f"Use this result to respond to this prompt:\n{question}")


def test_info_lists_the_chat_task(chat_server):
    assert set(chat_server.get("/info/").json()["models"]) == {"vila_m3", "vista3d"}


def test_a_turn_with_a_trigger_returns_the_answer_transcript_and_labelmap(chat_server, fake_vlm, sample_data, tmp_path):
    fake_vlm.script(sse(["This looks like a CT image. ", "Let me trigger <VISTA3D(hepatic tumor)>."]),
                    sse(["Yes, ", "the liver shows a lesion."]))
    before = len(fake_vlm.posts)
    question = "Is there a liver tumor?"
    answer, label_bytes = parts(ask(chat_server, {"prompt": question, "chat_id": "turn-1", "slice_index": 30}))

    assert answer["answer"] == "Yes, the liver shows a lesion."
    assert [m["role"] for m in answer["transcript"]] == ["user", "assistant", "expert", "assistant"]
    assert answer["transcript"][0]["text"].endswith("<image>This is a CT image.\nIs there a liver tumor?")
    assert answer["transcript"][0]["text"].startswith("Here is a list of available expert models:\n<VISTA3D(args)>")
    assert answer["transcript"][1]["text"] == TRIGGER
    assert answer["experts"][0]["expert"] == "VISTA3D" and answer["experts"][0]["argument"] == "hepatic tumor"
    assert answer["label_names"] == {"liver": 1, "hepatic tumor": 26}
    assert set(answer["label_colors"]) == {"liver", "hepatic tumor"}
    assert answer["vlm"]["stand_in"] is False and "fake-vila-m3" in answer["vlm"]["name"]
    assert {t["step"] for t in answer["timings"]} >= {"load", "render", "generate 1", "expert VISTA3D", "total"}
    assert answer["slice"] == {"axis": "axial", "index": 30}

    path = tmp_path / "labels.nii.gz"
    path.write_bytes(label_bytes)
    labels = read_labelmap(path)
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert labels.geometry.allclose(ct.geometry, atol=1e-4)
    assert answer["transcript"][2]["text"] == expected_feedback(labels, "axial", 30, answer["label_names"], question)

    second = fake_vlm.posts[before + 1].body["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert sum(part["type"] == "image_url" for m in second if m["role"] == "user" for part in m["content"]) == 2


def test_a_users_typed_trigger_runs_nothing(chat_server, fake_vlm):
    fake_vlm.script(sse(["I will describe it instead."]))
    answer, labels = parts(ask(chat_server, {"prompt": "<VISTA3D(everything)>", "chat_id": "typed"}))
    assert answer["experts"] == [] and labels is None


def test_the_stream_sends_tokens_expert_events_the_labelmap_url_and_the_final_json(chat_server, fake_vlm, tmp_path):
    fake_vlm.script(sse(["Let me ", "trigger ", "<VISTA3D(organs)>."]), sse(["Organs ", "are ", "segmented."]))
    response = requests.post(f"{chat_server.url}/vila_m3/chat/stream", params={"image": "ct_abdomen"},
                             data={"params": json.dumps({"prompt": "Segment the organs", "chat_id": "streamed"})},
                             stream=True, timeout=300)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.iter_content(chunk_size=None, decode_unicode=True):
        for chunk in block.split("\n\n"):
            lines = dict(line.split(": ", 1) for line in chunk.splitlines() if line and not line.startswith(":"))
            if "event" in lines:
                events.append((lines["event"], json.loads(lines["data"])))
    names = [name for name, _ in events]
    assert names.index("token") < names.index("expert_started") < names.index("expert_finished")
    assert names[-2:] == ["labelmap", "final"]
    tokens = "".join(data["text"] for name, data in events if name == "token" and data["round"] == 0)
    assert tokens == "Let me trigger <VISTA3D(organs)>."
    final = events[-1][1]
    assert final["answer"] == "Organs are segmented." and final["experts"][0]["argument"] == "organs"
    labels = requests.get(f"{chat_server.url}{events[-2][1]['url']}", timeout=60)
    assert labels.status_code == 200 and labels.content[:2] == b"\x1f\x8b"


def read_events(response: requests.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a server-sent event stream, as they arrive."""
    for block in response.iter_lines(decode_unicode=True, delimiter="\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "event" in lines:
            yield lines["event"], json.loads(lines["data"])


def test_the_cancel_route_stops_a_streaming_turn(chat_server, fake_vlm):
    fake_vlm.script(sse([f"word{i} " for i in range(40)], event_delay_s=0.2))
    response = requests.post(f"{chat_server.url}/vila_m3/chat/stream", params={"image": "ct_abdomen"},
                             data={"params": json.dumps({"prompt": "Describe", "chat_id": "to-cancel"})},
                             stream=True, timeout=300)
    tokens = 0
    final = None
    for name, data in read_events(response):
        if name == "token":
            tokens += 1
            if tokens == 3:
                cancelled = requests.post(f"{chat_server.url}/vila_m3/chat/to-cancel/cancel", timeout=10).json()
                assert cancelled == {"chat_id": "to-cancel", "cancelled": True}
        if name == "final":
            final = data
    assert final is not None and final["cancelled"] is True
    assert 3 <= len(final["answer"].split()) < 40
    assert final["transcript"][-1] == {"role": "assistant", "text": final["answer"]}


def test_two_chats_at_the_same_time_keep_their_own_histories(chat_server, fake_vlm):
    fake_vlm.script(sse(["An answer."]), sse(["An answer."]))
    answers = {}

    def run(chat_id: str, image: str, question: str) -> None:
        answers[chat_id] = parts(ask(chat_server, {"prompt": question, "chat_id": chat_id}, image=image))[0]

    threads = [threading.Thread(target=run, args=("ct-chat", "ct_abdomen", "About the CT?")),
               threading.Thread(target=run, args=("mri-chat", "brain_mri_t2", "About the MRI?"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert answers["ct-chat"]["modality"] == "CT" and answers["mri-chat"]["modality"] == "MRI"
    assert answers["ct-chat"]["transcript"][0]["question"] == "About the CT?"
    assert answers["mri-chat"]["transcript"][0]["question"] == "About the MRI?"
    assert len(answers["mri-chat"]["transcript"][0]["images"]) == 4  # the four sequences, found beside the T2


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"chat_id": "c"}, "params.prompt"),
        ({"prompt": "q"}, "params.chat_id"),
        ({"prompt": "q", "chat_id": "c", "slice_index": 500}, "0 to 63"),
        ({"prompt": "q", "chat_id": "c", "axis": "oblique"}, "oblique"),
        ({"prompt": "q", "chat_id": "../../etc"}, "chat_id"),
        ({"prompt": "q", "chat_id": "c", "temperature": "hot"}, "temperature"),
    ],
)
def test_bad_requests_are_4xx_and_change_nothing(chat_server, fake_vlm, params, message):
    before = len(fake_vlm.posts)
    response = ask(chat_server, params)
    assert 400 <= response.status_code < 500, response.text[:500]
    assert message in response.json()["detail"]
    assert len(fake_vlm.posts) == before
    assert requests.get(f"{chat_server.url}/vila_m3/chat/c", timeout=10).status_code == 404


def test_a_chat_survives_a_server_restart(chat_server, chat_setup, fake_vlm):
    fake_vlm.script(sse(["First."]))
    parts(ask(chat_server, {"prompt": "First question", "chat_id": "kept"}))
    chat_server.stop()
    restarted = start_monailabel(chat_setup["root"] / "second", chat_setup["studies"], conf=chat_setup["conf"])
    try:
        stored = requests.get(f"{restarted.url}/vila_m3/chat/kept", timeout=10).json()
        assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
        fake_vlm.script(sse(["Second."]))
        answer, _ = parts(ask(restarted, {"prompt": "Second question", "chat_id": "kept"}))
        assert [m["role"] for m in answer["transcript"]] == ["user", "assistant", "user", "assistant"]
        messages = fake_vlm.posts[-1].body["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        texts = [part["text"] for part in messages[2]["content"] if part["type"] == "text"]
        assert texts == ["This is a CT image.\nSecond question"]
    finally:
        restarted.stop()
