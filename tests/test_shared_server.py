"""One server shared by many annotators, through a real MONAI Label server: concurrent chats keep their own
messages in order, a waiting turn's stream says where it waits, a full work queue answers 503 with
``Retry-After``, and a cancelled waiting turn never runs.

The server runs one model job at a time (``queue_concurrency 1``) with at most 4 waiting (``queue_max 4``).
The VLM is the real remote backend talking to a scripted OpenAI-compatible server on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fake_openai_server import FakeOpenAIServer, Reply, sse, stream_events
from server_harness import RunningServer, start_monailabel

pytestmark = pytest.mark.server

QUEUE_MAX = 4
CLIENTS, TURNS = 8, 3



@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
                  fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("shared-server")
    studies = root / "studies"
    shutil.copytree(sample_data / "studies", studies)
    conf = {"models": "vila_m3", "vlm_url": fake_vlm.url, "vlm_model": "fake-vila-m3",
            "chats_dir": str(root / "chats"), "models_dir": str(root / "models"),
            "queue_concurrency": "1", "queue_max": str(QUEUE_MAX)}
    server = start_monailabel(root / "run", studies, conf=conf)
    try:
        yield server
    finally:
        server.stop()


def ask(server: RunningServer, chat_id: str, question: str) -> requests.Response:
    return requests.post(f"{server.url}/infer/vila_m3", params={"image": "ct_abdomen", "output": "json"},
                         data={"params": json.dumps({"prompt": question, "chat_id": chat_id})}, timeout=300)


def stream(server: RunningServer, chat_id: str, question: str) -> requests.Response:
    return requests.post(f"{server.url}/vila_m3/chat/stream", params={"image": "ct_abdomen"},
                         data={"params": json.dumps({"prompt": question, "chat_id": chat_id})}, stream=True,
                         timeout=300)


def read_events(response: requests.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a server-sent event stream, as they arrive."""
    for block in response.iter_lines(decode_unicode=True, delimiter="\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "event" in lines:
            yield lines["event"], json.loads(lines["data"])


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def stored(server: RunningServer, chat_id: str) -> dict:
    response = server.get(f"/vila_m3/chat/{chat_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_concurrent_clients_keep_their_own_messages_in_order(shared_server, fake_vlm):
    """8 clients x 3 turns on their own chats and 2 clients x 3 turns on one chat, all at once. A client
    told 503 (the queue holds 4 waiting jobs at most) waits ``Retry-After`` and asks again, as clients should."""
    total = CLIENTS * TURNS + 2 * TURNS
    answers = [f"answer-{number:02d} ok" for number in range(total)]
    fake_vlm.script(*(sse([text[:7], text[7:]], event_delay_s=0.02) for text in answers))
    posts_before = len(fake_vlm.posts)
    statuses: list[int] = []
    retry_afters: list[str | None] = []
    guard = threading.Lock()

    def client(chat_id: str, name: str) -> None:
        for number in range(TURNS):
            while True:
                response = ask(shared_server, chat_id, f"{name} question {number}")
                with guard:
                    statuses.append(response.status_code)
                if response.status_code != 503:
                    break
                with guard:
                    retry_afters.append(response.headers.get("Retry-After"))
                time.sleep(min(float(response.headers.get("Retry-After", "1")), 1.0))

    workers = [threading.Thread(target=client, args=(f"own-{n}", f"client{n}")) for n in range(CLIENTS)]
    workers += [threading.Thread(target=client, args=("together", f"pair{n}")) for n in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(600)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) == total
    assert all(value is not None and int(value) >= 1 for value in retry_afters)
    assert len(fake_vlm.posts) - posts_before == total  # a refused request never reached the model

    used: list[str] = []
    for n in range(CLIENTS):
        chat = stored(shared_server, f"own-{n}")
        assert [m["role"] for m in chat["messages"]] == ["user", "assistant"] * TURNS
        assert [m["question"] for m in chat["messages"][::2]] == [f"client{n} question {k}" for k in range(TURNS)]
        used += [m["text"] for m in chat["messages"][1::2]]
    together = stored(shared_server, "together")
    assert [m["role"] for m in together["messages"]] == ["user", "assistant"] * 2 * TURNS
    asked = [m["question"] for m in together["messages"][::2]]
    for name in ("pair0", "pair1"):  # each client's turns in its own order, the two interleaved
        assert [q for q in asked if q.startswith(name)] == [f"{name} question {k}" for k in range(TURNS)]
    used += [m["text"] for m in together["messages"][1::2]]
    assert sorted(used) == answers  # every answer stored once, in the chat that asked for it


def test_a_waiting_stream_is_told_its_place_and_a_cancel_takes_it_out_before_it_runs(shared_server, fake_vlm):
    fake_vlm.script(Reply(events=stream_events(["Slow ", "answer."]), delay_s=4.0))
    posts_before = len(fake_vlm.posts)
    holder: dict = {}
    thread = threading.Thread(target=lambda: holder.update(response=ask(shared_server, "holder", "Take long")))
    thread.start()
    wait_until(lambda: len(fake_vlm.posts) == posts_before + 1)  # the holder's answer is being generated

    response = stream(shared_server, "waiting", "Never answered")
    assert response.status_code == 200
    events = read_events(response)
    name, data = next(events)
    assert (name, data) == ("queued", {"position": 1, "ahead": 1})
    began = time.monotonic()
    cancelled = requests.post(f"{shared_server.url}/vila_m3/chat/waiting/cancel", timeout=10)
    assert cancelled.json() == {"chat_id": "waiting", "cancelled": True}
    rest = list(events)
    assert time.monotonic() - began < 2.0, "the cancelled turn waited for the running one"
    assert [name for name, _ in rest] == ["final"] and rest[0][1]["cancelled"] is True
    assert rest[0][1]["answer"] == "" and rest[0][1]["turn"] == []

    thread.join(60)
    assert holder["response"].status_code == 200 and holder["response"].json()["answer"] == "Slow answer."
    time.sleep(0.5)
    assert len(fake_vlm.posts) == posts_before + 1  # the cancelled turn never reached the model
    assert shared_server.get("/vila_m3/chat/waiting").status_code == 404  # and left nothing behind


def test_a_full_queue_answers_503_with_retry_after_and_closed_streams_leave_it(shared_server, fake_vlm):
    fake_vlm.script(Reply(events=stream_events(["Very ", "slow."]), delay_s=8.0))
    posts_before = len(fake_vlm.posts)
    holder: dict = {}
    thread = threading.Thread(target=lambda: holder.update(response=ask(shared_server, "holder-2", "Take long")))
    thread.start()
    wait_until(lambda: len(fake_vlm.posts) == posts_before + 1)

    waiting = []
    for number in range(QUEUE_MAX):
        response = stream(shared_server, f"fill-{number}", "Wait")
        assert response.status_code == 200
        events = read_events(response)
        assert next(events) == ("queued", {"position": number + 1, "ahead": number + 1})
        waiting.append((response, events))  # both kept open: a stream read no more is still a waiting client

    refused_stream = stream(shared_server, "one-too-many", "Wait")
    refused_infer = ask(shared_server, "one-too-many", "Wait")
    for refused in (refused_stream, refused_infer):
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert "busy" in refused.json()["detail"]
    assert shared_server.get("/vila_m3/chat/one-too-many").status_code == 404  # nothing stored
    assert shared_server.get("/info/", timeout=5).status_code == 200  # the server still answers

    for response, events in waiting:  # the annotators give up: closing a stream takes its turn out of the queue
        events.close()
        response.close()
    wait_until(lambda: all(shared_server.get(f"/vila_m3/chat/fill-{n}").status_code == 404
                           for n in range(QUEUE_MAX)), timeout=6.0)
    fake_vlm.script(sse(["Room again."]))
    assert ask(shared_server, "after", "Now?").status_code == 200  # waits for the holder only
    thread.join(60)
    assert holder["response"].status_code == 200
    assert len(fake_vlm.posts) == posts_before + 2  # the holder and the last turn; no closed stream ran
