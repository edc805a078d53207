"""The web viewer's login, in a real headless Chromium, against a real VILA-M3 server with auth on.

The server checks tokens of a Keycloak-like realm on 127.0.0.1 (tests/keycloak_realm.py), its chat runs
on the scripted OpenAI-compatible VLM (tests/fake_openai_server.py) and VISTA3D on stand-in weights.
One viewer process serves every tab; each browser context is one person: their own login, study,
chat and segments. Skipped, with a line naming what is missing, without Chromium, Playwright or
trame-slicer.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer, sse
from keycloak_realm import ROLES, KeycloakRealm
from server_harness import RunningServer
from web_harness import (
    browser_test_marks,
    chat_server_with_stand_ins,
    chromium_browser,
    pick_ct,
    running_viewer,
    start_viewer,
)

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "slicer_extension" / "VILAM3Chat"),
                str(Path(__file__).resolve().parents[1] / "web")]
from VILAM3ChatLib.client import AuthError, VilaM3Client  # noqa: E402

pytestmark = browser_test_marks(pytest.mark.security)

USER, ANNOTATOR = ROLES["user"], ROLES["annotator"]
PASSWORDS = {"alice": "alice-password", "uma": "uma-password", "eve": "eve-password"}
VIEWPORT = {"width": 1600, "height": 900}


@pytest.fixture(scope="module")
def realm() -> Iterator[KeycloakRealm]:
    with KeycloakRealm() as served:
        served.add_user("alice", PASSWORDS["alice"], [USER, ANNOTATOR])  # may chat and save labels
        served.add_user("uma", PASSWORDS["uma"], [USER])  # may chat, not write to the datastore
        served.add_user("eve", PASSWORDS["eve"], [USER])
        yield served


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, realm: KeycloakRealm,
           fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("web-login-server")
    env = realm.server_env()
    with chat_server_with_stand_ins(root, sample_data, fake_vlm.url, env=env,
                                    conf={"audit_log": str(root / "audit" / "audit.jsonl")}) as running:
        yield running


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory, server: RunningServer) -> Iterator[RunningServer]:
    with running_viewer(tmp_path_factory.mktemp("web-login-viewer"), server.url) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium_browser() as chromium:
        yield chromium


def open_tab(browser, viewer: RunningServer):
    """A new browser context (its own cookies and storage: another person) showing the page's login form."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.goto(viewer.url + "/")
    page.wait_for_selector("#login-form", timeout=90_000)
    return context, page


def log_in(page, username: str, password: str) -> None:
    page.fill("#login-user", username)
    page.fill("#login-password", password)
    page.click("#login-submit")


def logged_in_with_study(page, username: str) -> None:
    """Wait for the user's line and the server's studies, then pick the sample CT."""
    page.wait_for_selector("#logged-in-user", timeout=60_000)
    assert page.inner_text("#logged-in-user") == username
    pick_ct(page)


def ask(page, question: str) -> str:
    """Ask ``question``; wait for the answer and its segments; returns the chat id the page shows."""
    page.fill("#question", question)
    page.click("#send")
    page.wait_for_selector("#segments .segment", timeout=300_000)
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Answered')", timeout=60_000)
    return page.inner_text("#chat-id").removeprefix("chat ").strip()


def test_two_people_log_in_in_two_tabs_each_sees_only_their_own_chat_and_the_server_decides_who_saves(
        viewer, server, browser, fake_vlm):
    questions = {"alice": "Is there a liver tumour?", "uma": "Where is the lesion in the liver?"}
    tabs = {name: open_tab(browser, viewer) for name in questions}
    for name, (_, page) in tabs.items():
        assert page.locator("#chat-controls").count() == 0, "no chat panel before the login"
        assert page.locator("#transcript").count() == 0
        log_in(page, name, PASSWORDS[name])
    chats = {}
    for name, (_, page) in tabs.items():
        logged_in_with_study(page, name)
        roles = page.inner_text("#login-user-line")  # the roles the server sees in the token
        assert ("annotator" in roles) == (name == "alice") and "user" in roles, roles
        fake_vlm.script(sse(["Let me look: ", "<VISTA3D(hepatic tumor)>."]), sse([f"Answer for {name}."]))
        chats[name] = ask(page, questions[name])
    assert chats["alice"] != chats["uma"]

    for name, (_, page) in tabs.items():  # each page shows its own chat only
        transcript = page.inner_text("#transcript")
        other = "uma" if name == "alice" else "alice"
        assert questions[name] in transcript and f"Answer for {name}." in transcript, transcript
        assert questions[other] not in transcript and f"Answer for {other}." not in transcript, transcript
        assert page.inner_text("#logged-in-user") == name

    # the server knows who asked: each chat's owner and the audit log's users
    for name, chat_id in chats.items():
        stored = json.loads((server.root / "chats" / chat_id / "chat.json").read_text())
        assert stored["owner"] == name
    audit = [json.loads(line) for line in (server.root / "audit" / "audit.jsonl").read_text().splitlines()]
    assert {line["user"] for line in audit if line["route"] != "/infer/vista3d"} >= {"alice", "uma"}

    # the roles are the server's: the annotator saves, the plain user gets its 403 in words
    alice, uma = tabs["alice"][1], tabs["uma"][1]
    alice.click("#save-correction")
    alice.wait_for_function("document.querySelector('#status').innerText.startsWith('Saved')", timeout=120_000)
    uma.click("#save-correction")
    uma.wait_for_function("document.querySelector('#status').innerText.includes('not allowed')", timeout=120_000)
    status = uma.inner_text("#status")
    assert ANNOTATOR in status and "is required" in status, status
    assert uma.locator("#login-form").count() == 0, "a 403 is no reason to log out"

    # log out: the form again, the chat gone from the page
    alice.click("#log-out")
    alice.wait_for_selector("#login-form", timeout=30_000)
    assert alice.locator("#chat-controls").count() == 0 and alice.locator("#logged-in-user").count() == 0
    assert "logged out" in alice.inner_text("#login-error")
    for context, _ in tabs.values():
        context.close()
    # the closed tabs' viewers are released: their scenes are freed (the viewer's log counts those alive)
    closed: list[str] = []
    for _ in range(60):
        closed = [line for line in viewer.log_path.read_text(errors="replace").splitlines() if " closed (" in line]
        if len(closed) >= 2 and closed[-1].endswith("0 scenes in memory)"):
            break
        time.sleep(0.5)
    assert len(closed) >= 2 and closed[-1].endswith("0 scenes in memory)"), closed


def test_a_wrong_password_says_so_and_shows_no_chat_panel(viewer, browser):
    context, page = open_tab(browser, viewer)
    log_in(page, "eve", "not-her-password")
    page.wait_for_selector("#login-error", timeout=60_000)
    assert "Wrong user name or password" in page.inner_text("#login-error")
    assert page.locator("#chat-controls").count() == 0 and page.locator("#transcript").count() == 0
    assert page.locator("#logged-in-user").count() == 0
    assert page.input_value("#login-password") == "", "the password field is emptied"
    context.close()


def test_an_expired_login_brings_back_the_form_saying_why(viewer, browser, realm):
    realm.token_lifetime_s = 1  # the server allows 10 s of clock skew: the token is refused after ~11 s
    try:
        context, page = open_tab(browser, viewer)
        log_in(page, "eve", PASSWORDS["eve"])
        page.wait_for_selector("#study-select option[value=ct_abdomen]", state="attached", timeout=60_000)
    finally:
        realm.token_lifetime_s = 300
    time.sleep(12.0)
    page.select_option("#study-select", "ct_abdomen")
    page.wait_for_selector("#login-form", timeout=60_000)
    assert "Your login has ended" in page.inner_text("#login-error")
    assert page.locator("#chat-controls").count() == 0
    log_in(page, "eve", PASSWORDS["eve"])  # and logging in again works
    page.wait_for_selector("#study-select option[value=ct_abdomen]", state="attached", timeout=60_000)
    context.close()


def test_kiosk_mode_logs_every_tab_in_as_the_viewers_user_without_a_form(tmp_path, server, browser):
    kiosk = start_viewer(tmp_path / "kiosk", server.url,
                         env={"VILA_M3_USERNAME": "eve", "VILA_M3_PASSWORD": PASSWORDS["eve"]})
    try:
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        page.goto(kiosk.url + "/")
        page.wait_for_selector("#study-select option[value=ct_abdomen]", state="attached", timeout=90_000)
        assert page.locator("#login-form").count() == 0 and page.locator("#log-out").count() == 0
        context.close()
    finally:
        kiosk.stop()


def test_the_client_keeps_only_the_token_and_a_refused_one_asks_for_a_new_login(server, realm):
    client = VilaM3Client(server.url)
    with pytest.raises(AuthError) as refused:
        client.log_in("eve", "not-her-password")
    assert refused.value.status == 401
    with pytest.raises(AuthError, match="requires a login"):
        client.info()
    client.log_in("eve", PASSWORDS["eve"])
    assert client.password == "" and client.username is None, "the password is not kept"
    assert client.who_am_i()["username"] == "eve"
    assert "ct_abdomen" in client.datastore_images()
    client._token = realm.sign(realm.claims("eve", [USER], exp=int(time.time()) - 60))  # as if it expired
    with pytest.raises(AuthError, match="refused the access token") as expired:
        client.datastore_images()
    assert expired.value.status == 401
    client.log_out()
    with pytest.raises(AuthError, match="requires a login"):
        client.info()
