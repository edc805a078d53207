"""The Slicer panel's client library against a real VILA-M3 MONAI Label server on 127.0.0.1.

The VLM is the server's real remote backend talking to a scripted OpenAI-compatible double (random
weights never write triggers); VISTA3D runs stand-in weights through the real runner. Covered: a
whole turn with an expert through ``ask`` and through ``stream``, a session upload of the NRRD
sample, saving a final label, cancelling, server errors, and a server that dies mid-stream. The
panel's Widget and Logic run on a real MRML scene (slicer-core, ``tests/slicer_core_fixture.py``):
a whole turn from the Widget and from the Logic, segmentations checked voxel by voxel, a chat
restored after a restart, BRATS sequences sent as sessions.

Login: MONAI Label checks tokens against a Keycloak realm (it fetches the realm's public key and
token endpoint), and the installed MONAI Label (0.8.5) decodes tokens with PyJWT without naming
the algorithms, which PyJWT 2 refuses, so a real server with auth on rejects every token. The
client's token handling is therefore tested against a small local HTTP server that answers
``/auth/``, ``/auth/token`` and ``/info/`` the way MONAI Label does and demands the Bearer header.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer, sse
from server_harness import RunningServer, stand_in_site, start_monailabel
from slicer_core_fixture import slicer_core  # noqa: F401

from vila_m3.imaging import read_labelmap, read_volume, write_labelmap
from vila_m3.imaging.slices import slice_index_at

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "slicer_extension" / "VILAM3Chat"))

from VILAM3ChatLib.chat_state import ChatState  # noqa: E402
from VILAM3ChatLib.client import (  # noqa: E402
    AuthError,
    ChatTaskUnavailable,
    RequestRejected,
    ServerError,
    StudyRef,
    VilaM3Client,
    turn_params,
)
from VILAM3ChatLib.segments import segment_specs  # noqa: E402

pytestmark = pytest.mark.server

CT = StudyRef.image("ct_abdomen")


class LazyServer:
    """The module's one server, started on first use and again if a test stopped it."""

    def __init__(self, root: Path, studies: Path, conf: dict[str, str]):
        self.root, self.studies, self.conf = root, studies, conf
        self.server: RunningServer | None = None
        self.starts = 0

    def get(self) -> RunningServer:
        if self.server is None or self.server.process.poll() is not None:
            self.starts += 1
            self.server = start_monailabel(self.root / f"run{self.starts}", self.studies, conf=self.conf)
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()



@pytest.fixture(scope="module")
def lazy_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
                fake_vlm: FakeOpenAIServer) -> Iterator[LazyServer]:
    root = tmp_path_factory.mktemp("slicer-client")
    holder = LazyServer(root, *stand_in_site(root, sample_data, fake_vlm.url))
    try:
        yield holder
    finally:
        holder.stop()


@pytest.fixture
def server(lazy_server: LazyServer) -> RunningServer:
    return lazy_server.get()


@pytest.fixture
def client(server: RunningServer, tmp_path: Path) -> VilaM3Client:
    return VilaM3Client(server.url, timeout_s=60, turn_timeout_s=300, stream_idle_timeout_s=60,
                        download_dir=str(tmp_path))


def trigger_then_answer(fake_vlm: FakeOpenAIServer, answer: str = "Yes, the liver shows a lesion.") -> None:
    fake_vlm.script(sse(["This looks like a CT image. ", "Let me trigger <VISTA3D(hepatic tumor)>."]),
                    sse([answer[:4], answer[4:]]))


def test_ask_runs_a_turn_with_an_expert_and_returns_transcript_labelmap_and_segments(client, fake_vlm, sample_data,
                                                                                    tmp_path):
    trigger_then_answer(fake_vlm)
    answer = client.ask(CT, turn_params("Is there a liver tumor?", "ask-1", "axial", 30))

    assert answer.answer == "Yes, the liver shows a lesion." and answer.chat_id == "ask-1"
    assert [m["role"] for m in answer.transcript] == ["user", "assistant", "expert", "assistant"]
    assert answer.turn[0]["question"] == "Is there a liver tumor?"
    assert answer.slice == {"axis": "axial", "index": 30} and answer.modality == "CT"
    assert answer.labelmap_expert == "VISTA3D" and answer.stand_in is False
    assert answer.label_names == {"liver": 1, "hepatic tumor": 26}

    assert answer.labelmap_path and Path(answer.labelmap_path).parent == tmp_path
    labels = read_labelmap(answer.labelmap_path)
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert labels.geometry.allclose(ct.geometry, atol=1e-4)
    assert set(np.unique(labels.array)) <= {0, 1, 26}

    specs = segment_specs(answer.label_names, answer.label_colors)
    assert [(s.name, s.label_value) for s in specs] == [("liver", 1), ("hepatic tumor", 26)]
    assert all(s.terminology.standard for s in specs)
    assert specs[1].color == tuple(v / 255 for v in answer.label_colors["hepatic tumor"])


def test_stream_delivers_tokens_expert_events_and_the_labelmap(client, fake_vlm, sample_data):
    fake_vlm.script(sse(["Let me ", "trigger ", "<VISTA3D(hepatic tumor)>."]), sse(["Two ", "lesions."]))
    events: list[tuple[str, dict]] = []
    state = ChatState()
    state.start_turn("Segment the tumours", chat_id="stream-1")

    def on_event(name: str, data: dict) -> None:
        events.append((name, data))
        state.on_event(name, data)

    answer = client.stream(CT, turn_params("Segment the tumours", "stream-1", "axial", 20), on_event=on_event)

    names = [name for name, _ in events]
    assert names.index("token") < names.index("expert_started") < names.index("expert_finished")
    assert names[-2:] == ["labelmap", "final"]
    first_round = "".join(data["text"] for name, data in events if name == "token" and data["round"] == 0)
    assert first_round == "Let me trigger <VISTA3D(hepatic tumor)>."
    finished = dict(events)["expert_finished"]
    assert finished["expert"] == "VISTA3D" and finished["label_names"] == {"liver": 1, "hepatic tumor": 26}

    assert answer.answer == "Two lesions." and answer.label_names == {"liver": 1, "hepatic tumor": 26}
    assert read_labelmap(answer.labelmap_path).geometry.allclose(
        read_volume(sample_data / "studies" / "ct_abdomen.nii.gz").geometry, atol=1e-4)
    # the expert ran on the server's stand-in VISTA3D: the panel says so, in the bundle's words
    assert [m.role for m in state.messages] == ["user", "assistant", "expert", "assistant", "notice"]
    assert state.messages[-1].text.startswith("VISTA3D ran on stand-in weights (tiny random weights")
    assert state.messages[2].title == "VISTA3D(hepatic tumor)" and not state.busy

    stored = client.get_chat("stream-1")
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "expert", "assistant"]
    again = read_labelmap(client.get_labels("stream-1"))
    assert np.array_equal(again.array, read_labelmap(answer.labelmap_path).array)


def test_a_volume_the_server_does_not_have_goes_up_as_a_session(client, fake_vlm, sample_data):
    nrrd = sample_data / "nrrd" / "ct_abdomen.nrrd"
    session_id = client.create_session([str(nrrd)])
    assert client.session_info(session_id)["image"].endswith(".nrrd")

    trigger_then_answer(fake_vlm, "The session volume has a lesion.")
    answer = client.stream(StudyRef.session(session_id), turn_params("Any lesion?", "session-1", "coronal", 100))

    assert answer.answer == "The session volume has a lesion." and answer.slice == {"axis": "coronal", "index": 100}
    labels = read_labelmap(answer.labelmap_path)
    assert labels.geometry.allclose(read_volume(nrrd).geometry, atol=1e-4)
    assert (labels.array == 26).any()


def test_a_corrected_label_is_saved_as_final_and_linked_to_its_chat(client, sample_data, tmp_path):
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    corrected = np.zeros(ct.array.shape, dtype=np.uint8)
    corrected[30:34, 100:140, 90:130] = 26
    path = tmp_path / "correction.nii.gz"
    write_labelmap(corrected, ct.geometry, path)
    assert "ct_abdomen" in client.datastore_images()

    saved = client.save_final_label("ct_abdomen", str(path), chat_id="ask-1")

    assert saved["image"] == "ct_abdomen"
    final = client.datastore_labels("ct_abdomen")["final"]
    assert final["info"]["chat_id"] == "ask-1" and final["info"]["source"] == "VILA-M3 Chat (3D Slicer)"
    with pytest.raises(RequestRejected, match="not in the server's datastore"):
        client.datastore_labels("no_such_image")


def test_stop_cancels_the_running_turn_and_keeps_what_was_said(client, fake_vlm):
    fake_vlm.script(sse([f"word{i} " for i in range(40)], event_delay_s=0.2))
    three_tokens = threading.Event()
    tokens: list[str] = []
    result: dict = {}

    def on_event(name: str, data: dict) -> None:
        if name == "token":
            tokens.append(data["text"])
            if len(tokens) == 3:
                three_tokens.set()

    def work() -> None:
        result["answer"] = client.stream(CT, turn_params("Describe", "to-stop"), on_event=on_event)

    worker = threading.Thread(target=work)
    worker.start()
    assert three_tokens.wait(60)
    assert client.cancel("to-stop") is True  # from another thread, as the panel's Stop button does
    worker.join(60)
    answer = result["answer"]
    assert answer.cancelled and 3 <= len(answer.answer.split()) < 40
    assert client.cancel("to-stop") is False


def test_server_refusals_are_one_line_with_the_servers_reason(client, fake_vlm):
    before = len(fake_vlm.posts)
    for call in (client.ask, client.stream):
        with pytest.raises(RequestRejected) as caught:
            call(CT, turn_params("q", "bad-slice", "axial", 500))
        assert caught.value.status == 422 and "0 to 63" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(RequestRejected, match="not in the datastore"):
        client.stream(StudyRef.image("no_such_image"), turn_params("q", "bad-image"))
    assert len(fake_vlm.posts) == before


# --- the panel's flow, with Slicer's modules stood in ----------------------------------------------------


def test_the_panel_sends_an_unknown_volume_after_consent_and_shows_the_answer(client, fake_vlm, sample_data,
                                                                             slicer_core, tmp_path):  # noqa: F811
    """The widget's own code (Send → consent → upload → stream → answer → segmentation) on a real scene,
    with only Qt and the application stood in (tests/slicer_core_fixture.py)."""
    nrrd = sample_data / "nrrd" / "ct_abdomen.nrrd"
    volume = slicer_core.load_volume(nrrd, "ct_abdomen")
    ct = read_volume(nrrd)
    marker = (128, 128, 37)  # the Red view is centred on this voxel, axial
    view = np.diag([-1.0, 1.0, 1.0, 1.0])
    view[:3, 3] = ct.geometry.index_to_physical(marker) * np.array([-1.0, -1.0, 1.0])
    slicer_core.set_view("Red", view, volume)
    module = slicer_core.module

    widget = module.VILAM3ChatWidget()
    questions: list[str] = []
    widget.confirm = lambda text: questions.append(text) or "does not have" in text  # "is it that image?" → no
    widget.setup()
    widget.ui.serverUrlLineEdit.text = client.server_url
    assert widget.ui.volumeSelector.currentNode() is volume  # the Red view's background volume
    widget.ui.questionLineEdit.text = "Is there a lesion?"
    trigger_then_answer(fake_vlm, "A lesion in the liver.")

    widget.onSend()
    deadline = time.monotonic() + 120
    while widget.turnRunning() and time.monotonic() < deadline:
        widget.jobs.poll()
        time.sleep(0.02)
    widget.jobs.poll()

    assert not widget.turnRunning(), widget.ui.statusLabel.text
    assert len(questions) == 2 and "datastore has an image named 'ct_abdomen'" in questions[0]
    answer = widget.lastAnswer
    assert answer is not None and answer.answer == "A lesion in the liver.", widget.ui.statusLabel.text
    assert answer.slice == {"axis": "axial", "index": slice_index_at(ct, "axial", tuple(ct.geometry.index_to_physical(marker)))}
    assert widget.ui.statusLabel.text.startswith("Answered. Segmentation 'VILA-M3 ")
    assert widget.ui.statusLabel.style == ""
    segmentation = widget.ui.segmentationSelector.currentNode()
    assert segmentation is not None and segmentation.GetName() == f"VILA-M3 {answer.chat_id} VISTA3D"
    assert widget.ui.statusLabel.text.startswith(f"Answered. Segmentation '{segmentation.GetName()}' added (")
    assert module.VILAM3ChatLogic.referenceVolume(segmentation) is volume
    assert set(module.VILAM3ChatLogic.segmentNames(segmentation)) <= set(answer.label_names)
    assert slicer_core.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert not Path(answer.labelmap_path).exists(), "the downloaded labelmap is deleted once loaded"
    assert widget.logic.sessions[volume.GetID()][0] == client.server_url
    assert "A lesion in the liver." in widget.ui.transcriptBrowser.html and "VISTA3D(hepatic tumor)" in widget.ui.transcriptBrowser.html
    assert list((tmp_path / "VILAM3Chat").glob("upload-*")) == [], "the exported volume is deleted once sent"

    widget.onServerUrlEdited()  # the address is a setting: the restarted panel starts with it
    widget.ui.transcriptBrowser.html = ""
    restarted = module.VILAM3ChatWidget()  # Slicer restarted, the scene saved with the volume reopened
    restarted.setup()  # picks the Red view's volume and asks the server for its stored chat
    while restarted.jobs.running("restore") and time.monotonic() < deadline:
        restarted.jobs.poll()
        time.sleep(0.02)
    restarted.jobs.poll()
    assert restarted.ui.statusLabel.text.startswith(f"Chat {answer.chat_id} restored from the server. Its last "
                                                    "segmentation is 'VILA-M3 "), restarted.ui.statusLabel.text
    assert "A lesion in the liver." in restarted.ui.transcriptBrowser.html
    assert slicer_core.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    assert restarted.logic.knownStudy(volume, client.server_url) is None, "a session is not a datastore image"
    widget.ui.serverUrlLineEdit.text = client.server_url

    widget.ui.questionLineEdit.text = "Again?"
    fake_vlm.script(sse(["Still there."]))
    widget.onSend()  # the volume is now known (session): no more questions
    while widget.turnRunning() and time.monotonic() < deadline:
        widget.jobs.poll()
        time.sleep(0.02)
    widget.jobs.poll()
    assert len(questions) == 2 and widget.lastAnswer.answer == "Still there." and widget.ui.statusLabel.text == "Answered."

    fake_vlm.script(sse([f"slow{i} " for i in range(40)], event_delay_s=0.2))
    widget.ui.questionLineEdit.text = "Describe it slowly"
    widget.onSend()
    while "slow1" not in widget.ui.transcriptBrowser.html and time.monotonic() < deadline:
        widget.jobs.poll()
        time.sleep(0.02)
    widget.onStop()  # Stop asks the server to cancel the turn
    while widget.turnRunning() and time.monotonic() < deadline:
        widget.jobs.poll()
        time.sleep(0.02)
    widget.jobs.poll()
    assert widget.lastAnswer.cancelled and widget.ui.statusLabel.text == "Stopped."
    assert "What was said so far is kept" in widget.ui.transcriptBrowser.html
    assert 2 <= len(widget.lastAnswer.answer.split()) < 40

    widget.ui.serverUrlLineEdit.text = "http://127.0.0.1:1"
    widget.ui.questionLineEdit.text = "Anyone there?"
    widget.onSend()
    while widget.busy() and time.monotonic() < deadline:
        widget.jobs.poll()
        time.sleep(0.02)
    widget.jobs.poll()
    assert "cannot reach the server at http://127.0.0.1:1" in widget.ui.statusLabel.text
    assert widget.ui.statusLabel.style and widget.ui.sendButton.enabled


def assert_segments_match(core, node, volume, labels, label_names: dict) -> None:
    """Every label value of the server's labelmap is the segment of its name, voxel for voxel."""
    segmentation = node.GetSegmentation()
    assert np.linalg.det(np.array(labels.geometry.direction)) > 0  # Slicer keeps a right-handed grid as is
    for name, value in label_names.items():
        expected = labels.array == value
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        if not expected.any():
            assert not segment_id, f"'{name}' is not in the labelmap"
            continue
        mask = core.slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume)
        assert np.array_equal(mask.astype(bool), expected), name


def test_a_turn_from_the_logic_on_a_real_scene_gives_the_servers_labelmap_voxel_for_voxel(
        client, fake_vlm, sample_data, slicer_core, tmp_path):  # noqa: F811
    """The Logic on a real MRML scene (slicer-core): the volume under a 90° parent transform, the Red
    view on one of its axial slices → the server's slice → a turn with VISTA3D → the labelmap as a new
    segmentation under the same transform, voxel for voxel; then, as after a restart with the saved
    scene, a new Logic restores the chat's transcript and last segmentation from the server."""
    ct_path = sample_data / "studies" / "ct_abdomen.nii.gz"
    ct = read_volume(ct_path)
    volume = slicer_core.load_volume(ct_path, "ct_abdomen")
    logic = slicer_core.logic
    assert "ct_abdomen" in logic.serverImages(client)
    study = logic.rememberImage(volume, client.server_url, "ct_abdomen")
    to_parent = np.eye(4)
    to_parent[:3, :3] = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]  # 90° about R: the image's S axis points posterior
    volume.SetAndObserveTransformNodeID(slicer_core.add_transform(to_parent).GetID())
    marker = (120, 130, 37)
    local = np.diag([-1.0, -1.0, 1.0]) @ ct.geometry.index_to_physical(marker)
    view = np.eye(4)
    view[:3, 0], view[:3, 1], view[:3, 2] = (-1, 0, 0), (0, 0, 1), (0, 1, 0)  # a coronal view in the world
    view[:3, 3] = to_parent[:3, :3] @ local
    slicer_core.set_view("Red", view, volume)

    position = logic.slicePosition(volume, "Red")
    assert (position.axis, position.index) == ("axial", slice_index_at(ct, "axial", tuple(ct.geometry.index_to_physical(marker))))
    assert not position.oblique
    chat_id = logic.chatId(volume)
    trigger_then_answer(fake_vlm)
    events: list[str] = []
    module = slicer_core.module
    answer = logic.runTurn(module.Job(module.BackgroundJobs(), "turn"), client, {"image": study}, {},
                           turn_params("Is there a liver tumor?", chat_id, position.axis, position.index),
                           onEvent=lambda name, data: events.append(name), onSession=lambda *args: None,
                           onSessionsExpired=lambda: None)
    assert answer.slice == {"axis": "axial", "index": position.index} and "expert_started" in events
    labels = read_labelmap(answer.labelmap_path)
    assert labels.geometry.allclose(ct.geometry, atol=1e-4) and set(np.unique(labels.array)) > {0}
    before = slicer_core.node_ids()
    node = logic.loadLabelmap(answer, volume, chat_id)
    assert len(set(slicer_core.node_ids()) - set(before)) == 2, "the segmentation and its display node only"
    assert node.GetParentTransformNode() is volume.GetParentTransformNode()
    assert_segments_match(slicer_core, node, volume, labels, answer.label_names)

    restarted = module.VILAM3ChatLogic(slicer_core.scene, tempDir=str(tmp_path / "after-restart"))
    volume.RemoveAttribute("VILAM3Chat.ImageId")
    assert restarted.storedChatId(volume) == chat_id
    chat, labels_path, images = restarted.fetchChat(client, chat_id)
    state, restored = restarted.restoreChat(chat, labels_path, volume, client.server_url, images)
    html = state.to_html()
    assert "Is there a liver tumor?" in html and "Yes, the liver shows a lesion." in html
    assert restarted.knownStudy(volume, client.server_url).image_id == "ct_abdomen"
    assert restored is not None and restored.GetID() != node.GetID() and not os.path.exists(labels_path)
    assert_segments_match(slicer_core, restored, volume, labels, answer.label_names)


def test_brats_sequences_the_server_does_not_have_go_up_as_sessions_and_are_sent_as_session_ids(
        client, fake_vlm, sample_data, slicer_core, tmp_path):  # noqa: F811
    """The Logic's turn with four local MRI sequences: each goes up as a session, the turn names them by
    session id only (the server refuses paths), and the chat is stored on the four sequences."""
    logic, module = slicer_core.logic, slicer_core.module
    uploads = {}
    for key in ("t1c", "t1", "t2", "flair"):
        shutil.copyfile(sample_data / "studies" / f"brain_mri_{key}.nii.gz", tmp_path / f"{key}.nii.gz")
        uploads[key] = str(tmp_path / f"{key}.nii.gz")
    sessions: dict[str, str] = {}
    fake_vlm.script(sse(["An MRI of the brain."]))
    answer = logic.runTurn(module.Job(module.BackgroundJobs(), "turn"), client, {}, uploads,
                           turn_params("What is this?", "brats-sessions", "axial", 40),
                           onEvent=lambda name, data: None, onSession=sessions.__setitem__,
                           onSessionsExpired=lambda: None)
    assert answer.answer == "An MRI of the brain." and answer.modality == "MRI"
    assert sorted(sessions) == ["flair", "t1", "t1c", "t2"] and len(set(sessions.values())) == 4
    assert not any(Path(path).exists() for path in uploads.values()), "the exported files are deleted once sent"
    study = client.get_chat("brats-sessions")["study"]
    assert study["image"] == sessions["t1c"], study  # the chat is on the T1c session
    assert study["images"] == {key: f"{key}.nii.gz" for key in ("t1c", "t1", "t2", "flair")}, "file names, no paths"


def test_a_server_that_dies_mid_stream_gives_a_server_error_not_a_hang(client, server, fake_vlm):
    """Last in this module: it kills the server (a later test would start a new one)."""
    fake_vlm.script(sse([f"slow{i} " for i in range(100)], event_delay_s=0.3))
    first_token = threading.Event()
    outcome: dict = {}

    def work() -> None:
        try:
            client.stream(CT, turn_params("Describe slowly", "dies"), on_event=lambda name, data: first_token.set())
        except Exception as err:  # what the panel would show
            outcome["error"] = err

    worker = threading.Thread(target=work)
    worker.start()
    assert first_token.wait(60)
    killed_at = time.monotonic()
    os.killpg(server.process.pid, signal.SIGKILL)
    worker.join(30)
    assert not worker.is_alive(), "the client still waits on a dead server"
    assert time.monotonic() - killed_at < 15
    error = outcome.get("error")
    assert isinstance(error, ServerError), repr(error)
    assert "in the middle of the turn" in str(error) or "closed the stream" in str(error)
    assert "\n" not in str(error) and "Traceback" not in str(error)


# --- login (MONAI Label's /auth routes, emulated; see the module docstring) ------------------------------


class AuthServer:
    """``/auth/``, ``/auth/token`` and ``/info/`` as MONAI Label answers them with auth enabled."""

    def __init__(self, models: tuple[str, ...] = ("vila_m3", "vista3d")):
        self.models = models
        self.valid_token = "token-1"
        self.token_requests: list[dict] = []
        self.info_headers: list[str | None] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, body: dict, headers: dict | None = None) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if self.path == "/auth/":
                    self.reply(200, {"enabled": True, "client_id": "monailabel-app", "realm": "http://realm"})
                elif self.path == "/info/":
                    header = self.headers.get("Authorization")
                    owner.info_headers.append(header)
                    if header != f"Bearer {owner.valid_token}":
                        self.reply(401, {"detail": "Could not validate credentials"}, {"WWW-Authenticate": "Bearer"})
                    else:
                        self.reply(200, {"name": "VILA-M3", "models": {name: {} for name in owner.models}})
                else:
                    self.reply(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if self.path != "/auth/token":
                    self.reply(404, {"detail": "Not Found"})
                    return
                owner.token_requests.append(form)
                if form.get("username") == "annotator" and form.get("password") == "s3cret":
                    self.reply(200, {"access_token": owner.valid_token, "token_type": "bearer"})
                else:  # MONAI Label passes Keycloak's refusal on as a server error
                    self.send_response(500)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", "21")
                    self.end_headers()
                    self.wfile.write(b"Internal Server Error")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> AuthServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_login_token_is_fetched_once_sent_as_bearer_and_renewed_after_a_401():
    with AuthServer() as auth:
        client = VilaM3Client(auth.url, username="annotator", password="s3cret", timeout_s=10)
        assert client.auth_enabled() is True
        client.info()
        client.info(refresh=True)
        assert auth.info_headers == ["Bearer token-1", "Bearer token-1"]
        assert auth.token_requests == [{"username": "annotator", "password": "s3cret"}]

        auth.valid_token = "token-2"  # the first token expired
        assert client.info(refresh=True)["name"] == "VILA-M3"
        assert auth.info_headers[-2:] == ["Bearer token-1", "Bearer token-2"]
        assert len(auth.token_requests) == 2


def test_login_problems_are_auth_errors_that_say_what_to_do():
    with AuthServer() as auth:
        with pytest.raises(AuthError, match="requires a login: set the user name and password"):
            VilaM3Client(auth.url, timeout_s=10).info()
        with pytest.raises(AuthError, match="logging in as 'annotator' failed; check the user name and password"):
            VilaM3Client(auth.url, username="annotator", password="wrong", timeout_s=10).info()
        assert auth.info_headers == []  # nothing was asked without a token


def test_a_server_without_the_chat_task_is_named_as_such():
    with AuthServer(models=("vista3d", "cxr")) as auth:
        client = VilaM3Client(auth.url, username="annotator", password="s3cret", timeout_s=10)
        with pytest.raises(ChatTaskUnavailable) as caught:
            client.ask(CT, turn_params("q", "c"))
        message = str(caught.value)
        assert "does not offer the VILA-M3 chat" in message and "it offers cxr, vista3d" in message
