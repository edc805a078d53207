"""The web viewer's own study upload and its reopen list from the server, in a real headless Chromium
against a real VILA-M3 MONAI Label server (the chat's VLM is the scripted OpenAI-compatible server,
VISTA3D runs on stand-in weights).

A NIfTI from the test's folder goes through the page's file input to the server as a session; the page
shows it and chats about it (an expert's segments included); a file that is no image is refused in
words and changes nothing; after a reload of the page the chat is in the list the server gives and
reopens with its study, transcript and segments.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from server_harness import RunningServer
from web_harness import (
    browser_test_marks,
    chat_server_with_stand_ins,
    chromium_browser,
    running_viewer,
)

from vila_m3.samples import ct_tumour_slice

pytestmark = browser_test_marks()

QUESTION = "Is there a liver tumour in my upload?"
VIEWPORT = {"width": 2200, "height": 1100}


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
                fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    with chat_server_with_stand_ins(tmp_path_factory.mktemp("web-chats-server"), sample_data, fake_vlm.url) as server:
        yield server


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory, chat_server: RunningServer) -> Iterator[RunningServer]:
    with running_viewer(tmp_path_factory.mktemp("web-chats-viewer"), chat_server.url) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium_browser() as chromium:
        yield chromium


def segment_names(page) -> list[str]:
    return sorted(page.locator("#segments .segment").evaluate_all("rows => rows.map(r => r.dataset.segment)"))


def status_includes(page, text: str, timeout_ms: int = 120_000) -> None:
    page.wait_for_function("text => document.querySelector('#status').innerText.includes(text)", arg=text,
                           timeout=timeout_ms)


def test_upload_a_nifti_chat_about_it_reload_and_reopen_the_chat_from_the_servers_list(
        viewer, chat_server, browser, fake_vlm, sample_data, tmp_path):
    upload = tmp_path / "my_ct.nii.gz"
    shutil.copyfile(sample_data / "studies" / "ct_abdomen.nii.gz", upload)
    not_an_image = tmp_path / "notes.nii.gz"
    not_an_image.write_text("these are notes, not an image")
    k = ct_tumour_slice(sample_data)

    page = browser.new_page(viewport=VIEWPORT)
    page.goto(viewer.url + "/")
    page.wait_for_selector("#study-select option[value=ct_abdomen]", state="attached", timeout=60_000)
    assert "expires" in page.inner_text("#upload-note")  # the page says an upload is a session that expires

    page.set_input_files("#upload-file", str(upload))
    status_includes(page, "my_ct.nii.gz (uploaded)")
    status = page.inner_text("#status")
    assert "The server keeps this upload as a session: it expires after 60 minutes unused." in status, status
    study = page.input_value("#study-select")
    session_id = study.removeprefix("session:")
    assert study.startswith("session:") and requests.get(f"{chat_server.url}/session/{session_id}",
                                                         timeout=30).status_code == 200
    assert page.locator("#study-select option:checked").inner_text() == "my_ct.nii.gz (upload)"

    page.fill("#slice-index", str(k))
    page.press("#slice-index", "Tab")
    page.wait_for_function(f"document.querySelector('#slice-index').value == '{k}'", timeout=30_000)
    fake_vlm.script(sse(["This looks like a CT image. ", "Let me trigger <VISTA3D(hepatic tumor)>."]),
                    sse(["Yes, ", "the liver shows a lesion."]))
    page.fill("#question", QUESTION)
    page.click("#send")
    page.wait_for_selector("#segments .segment", timeout=300_000)
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Answered')", timeout=60_000)
    assert f"about axial slice {k}." in page.inner_text("#status")
    assert segment_names(page) == ["hepatic tumor", "liver"]
    chat_id = page.inner_text("#chat-id").removeprefix("chat ").strip()
    listed = requests.get(f"{chat_server.url}/vila_m3/chat/", timeout=30).json()["chats"]
    mine = next(chat for chat in listed if chat["chat_id"] == chat_id)
    assert (mine["study"], mine["session"], mine["title"], mine["has_labels"]) == (session_id, True, QUESTION, True)

    # a file that is no image: refused in words, the study and the chat stay
    page.set_input_files("#upload-file", str(not_an_image))
    status_includes(page, "'notes.nii.gz' is not a NIfTI image the viewer can read", 60_000)
    assert page.input_value("#study-select") == study
    assert chat_id in page.inner_text("#chat-id") and segment_names(page) == ["hepatic tumor", "liver"]
    assert len(requests.get(f"{chat_server.url}/vila_m3/chat/", timeout=30).json()["chats"]) == len(listed)

    # after a reload, the chat is in the list the server gives, and reopens with its study
    page.reload()
    option = f"#old-chat option[value='{chat_id}']"
    page.wait_for_selector(option, state="attached", timeout=60_000)
    text = page.locator(option).inner_text()
    assert QUESTION in text and f"upload {session_id[:8]}" in text and "UTC" in text, text
    page.select_option("#old-chat", chat_id)
    page.click("#reopen")
    status_includes(page, f"Chat {chat_id} reopened.", 180_000)
    assert page.input_value("#study-select") == study
    assert chat_id in page.inner_text("#chat-id")
    transcript = page.inner_text("#transcript")
    assert QUESTION in transcript and "Yes, the liver shows a lesion." in transcript
    page.wait_for_function("document.querySelectorAll('#segments .segment').length == 2", timeout=60_000)
    assert segment_names(page) == ["hepatic tumor", "liver"]
    page.close()
