"""The chat service without a server: reading never opens a model, one lock per chat whatever the model
version, a chat's turns in arrival order, cancelling waiting turns, and queued events. Real store, imaging
and work queue; the VLM is the scripted double."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from chat_doubles import ScriptedVLM
from vlm_fixtures import chat_llama3, tiny_llama3  # noqa: F401 - fixtures

from vila_m3.chat.loop import TurnRequest
from vila_m3.chat.service import ChatService, ServedVLM, VlmProvider
from vila_m3.chat.store import ChatNotFound, ChatStore, ChatUser
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.service import ExpertService
from vila_m3.work_queue import WorkQueues


class Models:
    """Opens a new ScriptedVLM per version; ``hold`` makes every generation wait until it is set."""

    def __init__(self) -> None:
        self.version = "v1"
        self.opened: list[tuple[str, ScriptedVLM]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.generating: list[str] = []  # the question of each generation, in the order they started
        self._lock = threading.Lock()

    def open(self) -> ServedVLM:
        version = self.version
        vlm = ScriptedVLM([f"answer from {version}"], on_generate=lambda number: self._generating(vlm))
        self.opened.append((version, vlm))
        return ServedVLM(vlm, f"scripted {version}", {"version": version})

    def _generating(self, vlm: ScriptedVLM) -> None:
        with self._lock:
            self.generating.append(vlm.calls[-1][0][-1][1].rsplit("\n", 1)[-1])
        assert self.hold.wait(20), "a generation was held for too long"


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> ExpertService:
    service = ExpertService(tmp_path_factory.mktemp("no-models"), idle_release_s=0)
    yield service
    service.close()


@pytest.fixture(scope="module")
def registry() -> ExpertRegistry:
    return ExpertRegistry.from_config(available=lambda spec: None if spec.runner else "not run by this product")


def make_service(tmp_path: Path, experts: ExpertService, registry: ExpertRegistry,
                 queues: WorkQueues | None = None) -> tuple[ChatService, Models]:
    models = Models()
    provider = VlmProvider(models.open, version=lambda: models.version)
    return ChatService(ChatStore(tmp_path / "chats"), provider, experts, registry, queues=queues), models


def turn(sample_data: Path, question: str, chat_id: str = "chat-1", user: ChatUser | None = None) -> TurnRequest:
    return TurnRequest(chat_id, question, {"image": str(sample_data / "studies" / "ct_abdomen.nii.gz")}, user=user)


def in_thread(work, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = work(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def questions(service: ChatService, chat_id: str) -> list[str]:
    return [m.question for m in service.open(chat_id).messages if m.role == "user"]


def test_reading_a_chat_never_opens_a_model(tmp_path, sample_data, experts, registry):
    service, models = make_service(tmp_path, experts, registry)
    assert service.open("never-seen").messages == [] and service.labels_path("never-seen") is None
    assert service.cancel("never-seen") is False and service.limits() == {}
    assert models.opened == []
    service.run(turn(sample_data, "What is this?"))
    assert [version for version, _ in models.opened] == ["v1"]
    # a second service on the same folder (a restarted server) reads the stored chat without a model
    again, again_models = make_service(tmp_path, experts, registry)
    assert questions(again, "chat-1") == ["What is this?"]
    assert [m.text for m in again.open("chat-1").messages if m.role == "assistant"] == ["answer from v1"]
    assert again.labels_path("chat-1") is None and again_models.opened == []


def test_a_model_swap_changes_the_model_only_and_keeps_the_chats_lock(tmp_path, sample_data, experts, registry):
    service, models = make_service(tmp_path, experts, registry)
    models.hold.clear()
    first, first_out = in_thread(service.run, turn(sample_data, "old model"))
    wait_until(lambda: models.generating == ["old model"])
    models.version = "v2"  # a train task registered a new version while the first turn runs
    second, second_out = in_thread(service.run, turn(sample_data, "new model"))
    wait_until(lambda: len(models.opened) == 2 or second_out)  # the new model is opened for the new turn ...
    time.sleep(0.3)
    assert models.generating == ["old model"], "the new model's turn ran beside the old one's on the same chat"
    assert service.locks.waiting("chat-1") == 2  # ... and waits for the chat's lock, the same one
    models.hold.set()
    first.join(10)
    second.join(10)
    assert first_out["result"].answer == "answer from v1" and first_out["result"].vlm["version"] == "v1"
    assert second_out["result"].answer == "answer from v2" and second_out["result"].vlm["version"] == "v2"
    assert models.generating == ["old model", "new model"]
    assert questions(service, "chat-1") == ["old model", "new model"]
    assert service.store is service.loop().store and service.running("chat-1") == 0


def test_turns_on_one_chat_run_in_arrival_order(tmp_path, sample_data, experts, registry):
    service, models = make_service(tmp_path, experts, registry)
    models.hold.clear()
    threads = [in_thread(service.run, turn(sample_data, "question 0"))]
    wait_until(lambda: models.generating == ["question 0"])
    for number in range(1, 6):
        threads.append(in_thread(service.run, turn(sample_data, f"question {number}")))
        wait_until(lambda number=number: service.locks.waiting("chat-1") == number + 1)
    models.hold.set()
    for thread, out in threads:
        thread.join(20)
        assert "error" not in out, out
    expected = [f"question {number}" for number in range(6)]
    assert models.generating == expected and questions(service, "chat-1") == expected
    roles = [m.role for m in service.open("chat-1").messages]
    assert roles == ["user", "assistant"] * 6


def test_turns_on_different_chats_run_side_by_side(tmp_path, sample_data, experts, registry):
    service, models = make_service(tmp_path, experts, registry, WorkQueues({"cpu": 2}))
    models.hold.clear()
    threads = [in_thread(service.run, turn(sample_data, f"on {name}", chat_id=name)) for name in ("a", "b")]
    wait_until(lambda: sorted(models.generating) == ["on a", "on b"])  # both generate at once
    models.hold.set()
    for thread, out in threads:
        thread.join(10)
        assert out["result"].cancelled is False


def test_a_turn_waiting_in_the_queue_is_told_its_place_and_cancelled_at_once(tmp_path, sample_data, experts,
                                                                             registry):
    service, models = make_service(tmp_path, experts, registry, WorkQueues({"cpu": 1}))
    models.hold.clear()
    busy, busy_out = in_thread(service.run, turn(sample_data, "long answer", chat_id="busy"))
    wait_until(lambda: models.generating == ["long answer"])
    events: list[tuple[str, dict]] = []
    waiting, waiting_out = in_thread(service.run, turn(sample_data, "never answered", chat_id="waiting"),
                                     on_event=lambda name, data: events.append((name, data)))
    wait_until(lambda: ("queued", {"position": 1, "ahead": 1}) in events)
    began = time.monotonic()
    assert service.cancel("waiting") is True
    waiting.join(5)
    assert time.monotonic() - began < 1.0
    result = waiting_out["result"]
    assert result.cancelled is True and result.answer == ""
    assert models.generating == ["long answer"]  # the cancelled turn never reached the model
    assert not service.store.exists("waiting") and service.open("waiting").messages == []  # it left nothing
    models.hold.set()
    busy.join(10)
    assert busy_out["result"].answer == "answer from v1"
    assert [name for name, _ in events] == ["queued"]


def test_a_turn_waiting_for_its_chat_is_cancelled_at_once(tmp_path, sample_data, experts, registry):
    service, models = make_service(tmp_path, experts, registry)
    models.hold.clear()
    first, first_out = in_thread(service.run, turn(sample_data, "first"))
    wait_until(lambda: models.generating == ["first"])
    cancel = threading.Event()
    second, second_out = in_thread(service.run, turn(sample_data, "second"), cancel=cancel)
    wait_until(lambda: service.locks.waiting("chat-1") == 2)
    cancel.set()
    second.join(5)
    assert second_out["result"].cancelled is True and service.locks.waiting("chat-1") == 1
    models.hold.set()
    first.join(10)
    assert first_out["result"].cancelled is False
    assert models.generating == ["first"] and questions(service, "chat-1") == ["first"]


def test_only_the_starter_cancels_a_turn(tmp_path, sample_data, experts, registry):
    service, models = make_service(tmp_path, experts, registry)
    models.hold.clear()
    alice, bob = ChatUser("alice"), ChatUser("bob")
    thread, out = in_thread(service.run, turn(sample_data, "mine", user=alice))
    wait_until(lambda: models.generating == ["mine"])
    for other in (bob, ChatUser("carol", reads_all=True)):  # a reviewer may read the chat, not cancel its turn
        with pytest.raises(ChatNotFound):
            service.cancel("chat-1", other)
    assert service.cancel("chat-1", alice) is True
    models.hold.set()
    thread.join(10)
    assert out["result"].cancelled is True


def test_the_vlm_waits_in_the_queue_of_its_device(chat_llama3):  # noqa: F811
    from vila_m3.chat.service import vlm_device
    from vila_m3.vlm.remote import RemoteVLM

    device = chat_llama3.model.device
    assert vlm_device(chat_llama3) == ("cpu" if device.type == "cpu" else f"cuda:{device.index or 0}")
    remote = RemoteVLM.from_config({"base_url": "http://127.0.0.1:9/v1", "model": "served-elsewhere"})
    assert vlm_device(remote) == "remote"  # a serving engine schedules its own GPUs
