"""The web viewer in a real headless Chromium, against a real VILA-M3 MONAI Label server.

The server runs the chat with its remote VLM pointed at the scripted OpenAI-compatible server
(tests/fake_openai_server.py: it writes ``<VISTA3D(hepatic tumor)>``, then "Yes, …") and VISTA3D on
stand-in weights; the viewer (``web/viewer.py``) is its own process and talks to the server over
HTTP only. Playwright drives Debian's ``/usr/bin/chromium`` (no browser download); without it, or
without Playwright or trame-slicer, the tests are skipped with a line naming what is missing.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from PIL import Image
from server_harness import RunningServer, free_port
from web_harness import (
    browser_test_marks,
    chat_server_with_stand_ins,
    chromium_browser,
    pick_ct,
    running_viewer,
    start_viewer,
)

from vila_m3.imaging import read_labelmap
from vila_m3.imaging.slices import extract_slice
from vila_m3.samples import ct_tumour_slice

pytestmark = browser_test_marks()

QUESTION = "Is there a liver tumour?"
HEPATIC_TUMOR = 26
VIEWPORT = {"width": 2200, "height": 1100}


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
                fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    with chat_server_with_stand_ins(tmp_path_factory.mktemp("web-chat-server"), sample_data, fake_vlm.url) as server:
        yield server


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory, chat_server: RunningServer) -> Iterator[RunningServer]:
    with running_viewer(tmp_path_factory.mktemp("web-viewer"), chat_server.url) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium_browser() as chromium:
        yield chromium


def red_view(page) -> np.ndarray:
    """The Red (axial) view's image as the browser shows it (the bitmap the viewer sent, without the
    page's controls drawn over it), RGB (rows, columns, 3)."""
    url = page.locator("#views img.image-display-area").first.evaluate(
        """img => { const c = document.createElement('canvas'); c.width = img.naturalWidth;
                    c.height = img.naturalHeight; c.getContext('2d').drawImage(img, 0, 0);
                    return c.toDataURL('image/png'); }""")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def settled_view(page, differs_from: np.ndarray | None = None, timeout_s: float = 60.0) -> np.ndarray:
    """The Red view once it shows the volume (not all black), differs from ``differs_from`` when
    given, and has settled (two equal images half a second apart)."""
    last = None
    for _ in range(int(timeout_s / 0.5)):
        page.wait_for_timeout(500)
        now = red_view(page)
        ready = now.max() > 40 and (differs_from is None or now.shape != differs_from.shape
                                    or np.abs(now - differs_from).sum() > 0)
        if ready and last is not None and now.shape == last.shape and np.array_equal(now, last):
            return now
        last = now
    raise AssertionError("the Red view did not show the expected image")


def footprint_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the volume on screen: with the lung preset even air is grey,
    outside the volume is black."""
    rows, columns = np.nonzero(image.sum(axis=2) > 45)
    return int(rows.min()), int(columns.min()), int(rows.max()) + 1, int(columns.max()) + 1


def test_ask_about_the_tumour_slice_see_the_segments_and_save_a_correction(viewer, chat_server, browser,
                                                                           fake_vlm, sample_data, tmp_path):
    fake_vlm.script(sse(["This looks like a CT image. ", "Let me trigger <VISTA3D(hepatic tumor)>."]),
                    sse(["Yes, ", "the liver shows a lesion."]))
    k = ct_tumour_slice(sample_data)
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(viewer.url + "/")
    pick_ct(page)
    middle = int(page.input_value("#slice-index"))
    assert middle != k, "the test needs the tumour slice to differ from the first one shown"
    auto = settled_view(page)
    page.get_by_role("button", name="lung").click()
    lung = settled_view(page, differs_from=auto)  # air is grey: the volume's extent shows on screen
    page.fill("#slice-index", str(k))
    page.press("#slice-index", "Tab")
    page.wait_for_function(f"document.querySelector('#slice-index').value == '{k}'", timeout=30_000)
    plain = settled_view(page, differs_from=lung)

    page.fill("#question", QUESTION)
    page.click("#send")
    page.wait_for_selector("#segments .segment", timeout=300_000)
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Answered')", timeout=60_000)
    status = page.inner_text("#status")
    assert f"about axial slice {k}." in status, status  # the server rendered the slice on screen
    transcript = page.inner_text("#transcript")
    assert QUESTION in transcript and "Yes, the liver shows a lesion." in transcript
    assert "VISTA3D(hepatic tumor)" in transcript
    assert "Stand-in weights" in page.inner_text("#stand-in-notice")  # VISTA3D runs on stand-in weights

    chat_id = page.inner_text("#chat-id").removeprefix("chat ").strip()
    response = requests.get(f"{chat_server.url}/vila_m3/chat/{chat_id}/labels", timeout=60)
    assert response.status_code == 200, response.text[:300]
    (tmp_path / "labels.nii.gz").write_bytes(response.content)
    labels = read_labelmap(tmp_path / "labels.nii.gz")
    names = sorted(page.locator("#segments .segment").evaluate_all("rows => rows.map(r => r.dataset.segment)"))
    assert names == ["hepatic tumor", "liver"]

    # overlay pixels: where the labelmap's slice k is, and not where it is empty
    shown = settled_view(page, differs_from=plain)
    top, left, bottom, right = footprint_box(plain)
    overlay = np.abs(shown - plain).sum(axis=2) > 40
    expected = extract_slice(labels, "axial", k) != 0  # rows anterior→posterior, columns right→left, as on screen
    rows, columns = expected.shape
    assert abs((bottom - top) / (right - left) - rows / columns) < 0.05, "the view shows the whole slice"
    centre_r = (top + (np.arange(rows) + 0.5) * (bottom - top) / rows).astype(int)
    centre_c = (left + (np.arange(columns) + 0.5) * (right - left) / columns).astype(int)
    at_centres = overlay[np.ix_(centre_r, centre_c)]
    padded = np.pad(expected, 1)
    neighbours = sum(padded[1 + dr:1 + dr + rows, 1 + dc:1 + dc + columns] for dr in (-1, 0, 1) for dc in (-1, 0, 1))
    empty = neighbours == 0
    assert expected.sum() > 100 and empty.sum() > 100
    assert at_centres[expected].mean() > 0.9, "labelled voxels are coloured on screen"
    assert at_centres[empty].mean() < 0.05, "voxels far from any label are not"
    if os.environ.get("WEB_SCREENSHOT"):  # the README's picture: WEB_SCREENSHOT=docs/web_viewer.png
        page.screenshot(path=os.environ["WEB_SCREENSHOT"])

    # toggling a segment hides it; opacity 0 hides the fill
    page.get_by_label("show liver").click()
    page.wait_for_function("!document.querySelector('[data-segment=\"liver\"] input').checked", timeout=30_000)
    page.get_by_label("show liver").click()

    # keep the tumour, remove the liver, save as final label
    page.get_by_label("remove liver").click()
    page.wait_for_function("document.querySelectorAll('#segments .segment').length == 1", timeout=30_000)
    page.click("#save-correction")
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Saved')", timeout=120_000)
    assert "hepatic tumor" in page.inner_text("#status")
    listing = requests.get(f"{chat_server.url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert "final" in listing["objects"]["ct_abdomen"]["labels"]
    final = requests.get(f"{chat_server.url}/datastore/label", params={"label": "ct_abdomen", "tag": "final"},
                         timeout=60)
    (tmp_path / "final.nii.gz").write_bytes(final.content)
    saved = read_labelmap(tmp_path / "final.nii.gz")
    assert saved.geometry.allclose(labels.geometry)
    assert np.array_equal(saved.array, np.where(labels.array == HEPATIC_TUMOR, HEPATIC_TUMOR, 0))

    # a new chat starts empty; the old one reopens with its transcript and segmentation
    page.click("#new-chat")
    page.wait_for_function(f"!document.querySelector('#chat-id').innerText.includes('{chat_id}')", timeout=30_000)
    page.wait_for_function(f"!document.querySelector('#transcript').innerText.includes('{QUESTION}')",
                           timeout=30_000)
    page.select_option("#old-chat", chat_id)
    page.click("#reopen")
    page.wait_for_function(f"document.querySelector('#chat-id').innerText.includes('{chat_id}')", timeout=60_000)
    # the chat's last labelmap comes back from the server as a new segmentation: both segments again
    page.wait_for_function("document.querySelectorAll('#segments .segment').length == 2", timeout=60_000)
    page.wait_for_function(f"document.querySelector('#transcript').innerText.includes('{QUESTION}')",
                           timeout=30_000)
    assert sorted(page.locator("#segments .segment").evaluate_all("rows => rows.map(r => r.dataset.segment)")) \
        == ["hepatic tumor", "liver"]
    page.close()


def test_the_page_says_in_words_when_the_server_is_down(tmp_path, browser):
    down = f"http://127.0.0.1:{free_port()}"
    running = start_viewer(tmp_path / "viewer", down)
    try:
        page = browser.new_page()
        page.goto(running.url + "/")
        page.wait_for_selector("#server-error", timeout=60_000)
        text = page.inner_text("#server-error")
        assert f"The VILA-M3 server at {down} cannot be reached" in text and "Connection refused" in text
        assert page.get_by_role("button", name="Retry").is_visible()
        page.close()
    finally:
        running.stop()
