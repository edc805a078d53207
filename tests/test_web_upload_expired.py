"""A turn on an uploaded study whose session expired, in the web viewer's own objects without a browser
(web/vila_m3_viewer/study_upload.py), against a real VILA-M3 MONAI Label server (the chat's VLM is the
scripted OpenAI-compatible server).

The page uploads a NIfTI as a session; the session is deleted on the server (``DELETE /session/{id}``, as
its expiry does); the next question sends the file the tab still holds again as a new session, the page's
study names the new session, the question is answered once and the status line says the upload was sent
again. When the tab no longer holds the file, the page says in words to upload it again.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from server_harness import RunningServer, start_monailabel

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "slicer_extension" / "VILAM3Chat"), str(REPO / "web")]
pytest.importorskip("trame", reason="the web extra is missing (pip install -e '.[web]')")
pytest.importorskip("trame_slicer", reason="the web extra is missing (pip install -e '.[web]')")

from trame.app import get_server  # noqa: E402
from vila_m3_viewer.app import ChatViewer  # noqa: E402
from vila_m3_viewer.study_upload import GONE, SENT_AGAIN, session_of  # noqa: E402

pytestmark = [pytest.mark.server]


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
                fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("upload-expired-server")
    studies = root / "studies"
    shutil.copytree(sample_data / "studies", studies)
    conf = {"models": "vila_m3", "vlm_url": fake_vlm.url, "vlm_model": "fake-vila-m3", "chats_dir": str(root / "chats")}
    server = start_monailabel(root / "run", studies, conf=conf)
    try:
        yield server
    finally:
        server.stop()


def settle(viewer: ChatViewer, done: Callable[[], bool], timeout_s: float = 180.0) -> None:
    """Deliver the viewer's job results (as its page loop does) until ``done()``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if viewer.jobs.poll():
            viewer.state.flush()
        if done():
            return
        time.sleep(0.05)
    raise AssertionError(f"the viewer did not settle; its status: {viewer.state.status!r}")


def session_exists(server: RunningServer, session_id: str) -> bool:
    return requests.get(f"{server.url}/session/{session_id}", timeout=30).status_code == 200


def test_a_turn_on_an_expired_upload_sends_the_file_again_and_answers_once(chat_server, fake_vlm, sample_data):
    viewer = ChatViewer(chat_server.url, server=get_server(f"expired-{uuid.uuid4().hex[:8]}", client_type="vue3"))
    viewer.state.ready()  # as when a page connects: a change of the state runs its listeners (the page's study)
    content = (sample_data / "studies" / "ct_abdomen.nii.gz").read_bytes()
    viewer.uploads._on_file({"name": "my_ct.nii.gz", "size": len(content), "content": content})
    settle(viewer, lambda: str(viewer.state.study).startswith("session:") and not viewer.jobs.running("upload"))
    settle(viewer, lambda: viewer.volume is not None and "(uploaded)" in viewer.state.status)
    old_id = session_of(viewer.state.study)
    volume = viewer.volume
    assert session_exists(chat_server, old_id)

    # the server forgets the session, as its expiry does
    assert requests.delete(f"{chat_server.url}/session/{old_id}", timeout=30).status_code == 200
    assert not session_exists(chat_server, old_id)
    fake_vlm.script(sse(["An abdominal CT."]))
    viewer.send("What is this?")
    settle(viewer, lambda: viewer.turn is None)
    status = viewer.state.status
    assert not viewer.state.status_error, status
    assert status.startswith("Answered") and status.endswith(SENT_AGAIN), status
    new_id = session_of(viewer.state.study)
    assert new_id and new_id != old_id and session_exists(chat_server, new_id)
    # the page's study and list name the new session; the study shown stays (not loaded again)
    assert [item["value"] for item in viewer.state.uploaded_studies] == [f"session:{new_id}"]
    assert viewer.state.uploaded_studies[0]["text"] == "my_ct.nii.gz (upload)"
    settle(viewer, lambda: not viewer.jobs.running(f"load-session:{new_id}"), 30)
    assert viewer.volume is volume
    assert viewer.logic.knownStudy(volume, viewer.client.server_url).session_id == new_id
    # the question was asked once, on the new session
    chat_id = viewer.state.chat_id
    transcript = viewer._chat_state(chat_id).to_html()
    assert transcript.count("What is this?") == 1 and "An abdominal CT." in transcript
    chats = requests.get(f"{chat_server.url}/vila_m3/chat/", timeout=30).json()["chats"]
    assert next(chat for chat in chats if chat["chat_id"] == chat_id)["study"] == new_id

    # the session expires again, and the tab no longer holds the file: the page says to upload it again
    assert requests.delete(f"{chat_server.url}/session/{new_id}", timeout=30).status_code == 200
    for folder in Path(viewer.temp_dir).glob("upload-*"):
        shutil.rmtree(folder)
    viewer.send("And now?")
    settle(viewer, lambda: viewer.turn is None)
    assert viewer.state.status_error and viewer.state.status == GONE
    assert "upload the file again" in GONE and viewer.temp_dir not in viewer.state.status
    assert session_of(viewer.state.study) == new_id
