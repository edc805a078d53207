"""A question on an uploaded study whose session expired, in a real headless Chromium against a real VILA-M3
MONAI Label server (the chat's VLM is the scripted OpenAI-compatible server).

The page uploads a NIfTI; the session is deleted on the server (``DELETE /session/{id}``, as its expiry
does); pressing Send once gets the answer: the page sends the file again as a new session, its study picker
names the new session, the transcript holds the question once, and the status line says the upload was
sent again.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from server_harness import RunningServer
from web_harness import browser_test_marks, chat_server_with_stand_ins, chromium_browser, running_viewer

pytestmark = browser_test_marks()

QUESTION = "What does my upload show?"


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
                fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("web-expired-server")
    with chat_server_with_stand_ins(root, sample_data, fake_vlm.url, experts=()) as server:
        yield server


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory, chat_server: RunningServer) -> Iterator[RunningServer]:
    with running_viewer(tmp_path_factory.mktemp("web-expired-viewer"), chat_server.url) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium_browser() as chromium:
        yield chromium


def status_includes(page, text: str, timeout_ms: int = 120_000) -> None:
    page.wait_for_function("text => document.querySelector('#status').innerText.includes(text)", arg=text,
                           timeout=timeout_ms)


def test_send_on_an_expired_upload_sends_the_file_again_and_answers(viewer, chat_server, browser, fake_vlm,
                                                                    sample_data, tmp_path):
    upload = tmp_path / "my_ct.nii.gz"
    shutil.copyfile(sample_data / "studies" / "ct_abdomen.nii.gz", upload)
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(viewer.url + "/")
    page.wait_for_selector("#study-select option[value=ct_abdomen]", state="attached", timeout=60_000)
    page.set_input_files("#upload-file", str(upload))
    status_includes(page, "my_ct.nii.gz (uploaded)")
    old_study = page.input_value("#study-select")
    old_id = old_study.removeprefix("session:")
    assert requests.delete(f"{chat_server.url}/session/{old_id}", timeout=30).status_code == 200

    fake_vlm.script(sse(["An abdominal CT, ", "nothing else to say."]))
    page.fill("#question", QUESTION)
    page.click("#send")
    status_includes(page, "The upload had expired on the server; sent it again.", 180_000)
    status = page.inner_text("#status")
    assert status.startswith("Answered"), status
    new_study = page.input_value("#study-select")
    new_id = new_study.removeprefix("session:")
    assert new_study.startswith("session:") and new_id != old_id
    assert requests.get(f"{chat_server.url}/session/{new_id}", timeout=30).status_code == 200
    assert page.locator("#study-select option:checked").inner_text() == "my_ct.nii.gz (upload)"
    assert page.locator(f"#study-select option[value='{old_study}']").count() == 0
    transcript = page.inner_text("#transcript")
    assert transcript.count(QUESTION) == 1 and "An abdominal CT, nothing else to say." in transcript
    page.close()
