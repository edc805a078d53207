"""``GET /vila_m3/chat/`` on a real MONAI Label server: the chats newest first, a chat about an uploaded
session marked as such, pages and their bounds, and (login on) each user's own chats, every chat for
reviewers and admins. The Slicer panel's client (``VilaM3Client.list_chats``) reads it."""

from __future__ import annotations

import io
import json
import shutil
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from keycloak_realm import ROLES, KeycloakRealm
from server_harness import RunningServer, start_monailabel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slicer_extension" / "VILAM3Chat"))
from VILAM3ChatLib.client import RequestRejected, StudyRef, VilaM3Client, turn_params  # noqa: E402

pytestmark = pytest.mark.server
ADMIN, REVIEWER, USER = ROLES["admin"], ROLES["reviewer"], ROLES["user"]


def server_conf(root: Path, fake_vlm: FakeOpenAIServer) -> dict[str, str]:
    return {"models": "vila_m3", "vlm_url": fake_vlm.url, "vlm_model": "fake-vila-m3", "chats_dir": str(root / "chats")}


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
                fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("chat-list-server")
    studies = root / "studies"
    shutil.copytree(sample_data / "studies", studies)
    server = start_monailabel(root / "run", studies, conf=server_conf(root, fake_vlm))
    try:
        yield server
    finally:
        server.stop()


def test_the_listing_holds_each_chat_newest_first_with_its_study_and_pages(open_server, sample_data, fake_vlm):
    client = VilaM3Client(open_server.url)
    fake_vlm.script(sse(["A CT of the abdomen."]), sse(["Still a CT."]), sse(["An uploaded CT."]))
    client.stream(StudyRef.image("ct_abdomen"), turn_params("What is this?", "listed-datastore"))
    client.stream(StudyRef.image("ct_abdomen"), turn_params("And now?", "listed-datastore"))
    session_id = client.create_session([str(sample_data / "studies" / "ct_abdomen.nii.gz")])
    client.stream(StudyRef.session(session_id), turn_params("Is there a liver tumour " + "?" * 100, "listed-session"))

    chats = client.list_chats()
    assert [chat["chat_id"] for chat in chats] == ["listed-session", "listed-datastore"]
    session, datastore = chats
    assert (session["study"], session["session"], session["turns"], session["modality"]) == (session_id, True, 1, "CT")
    assert session["title"].startswith("Is there a liver tumour ?") and len(session["title"]) == 80
    assert (datastore["study"], datastore["session"], datastore["turns"], datastore["title"]) == (
        "ct_abdomen", False, 2, "What is this?")
    assert datastore["created"] <= datastore["updated"] <= session["updated"]
    assert all(chat["updated"].endswith("Z") and chat["owner"] is None for chat in chats)  # login off
    stored = client.get_chat("listed-session")
    assert stored["study"]["source"] == "session" and stored["created"] == session["created"]

    page = requests.get(f"{open_server.url}/vila_m3/chat/", params={"limit": 1, "offset": 1}, timeout=30).json()
    assert [chat["chat_id"] for chat in page["chats"]] == ["listed-datastore"] and page["more"] is False
    assert requests.get(f"{open_server.url}/vila_m3/chat/", params={"limit": 1}, timeout=30).json()["more"] is True
    for query, problem in (({"limit": 0}, "limit must be a whole number from 1 to 500, got 0"),
                           ({"limit": 501}, "limit must be a whole number from 1 to 500, got 501"),
                           ({"offset": -1}, "offset must be a whole number from 0, got -1")):
        response = requests.get(f"{open_server.url}/vila_m3/chat/", params=query, timeout=30)
        assert response.status_code == 422 and response.json()["detail"] == problem
    with pytest.raises(RequestRejected, match="listing the chats: limit must be"):
        client.list_chats(limit=1000)


def test_a_dicom_series_zipped_as_the_web_viewer_sends_it_is_a_session_the_chat_reads(open_server, sample_data,
                                                                                    fake_vlm, tmp_path):
    pytest.importorskip("trame", reason="the web extra is missing (pip install -e '.[web]')")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "web"))
    from pacs_harness import sample_series
    from vila_m3_viewer.study_upload import prepare_upload

    from vila_m3.imaging import read_volume

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        for path in sample_series(sample_data)["ct_abdomen"]:
            out.write(path, arcname=f"export/series 1/{path.name}")
    prepared = prepare_upload("ct.zip", archive.getvalue(), tmp_path / "up", 256 * 2**20)
    client = VilaM3Client(open_server.url)
    session_id = client.create_session([str(prepared.upload)], uncompress=prepared.uncompress)
    fake_vlm.script(sse(["A CT from DICOM."]))
    middle = read_volume(prepared.display).geometry.shape[2] // 2
    answer = client.stream(StudyRef.session(session_id), turn_params("What is this?", "dicom-upload", "axial", middle))
    assert answer.answer == "A CT from DICOM." and answer.modality == "CT"
    assert (answer.slice.get("axis"), answer.slice.get("index")) == ("axial", middle)  # the series' own slices
    listed = next(chat for chat in client.list_chats() if chat["chat_id"] == "dicom-upload")
    assert (listed["study"], listed["session"]) == (session_id, True)


# --- login on -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def realm() -> Iterator[KeycloakRealm]:
    with KeycloakRealm() as served:
        served.add_user("alice", "alice-password", [USER])
        yield served


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, realm: KeycloakRealm,
                fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("chat-list-auth")
    studies = root / "studies"
    shutil.copytree(sample_data / "studies", studies)
    env = realm.server_env()
    server = start_monailabel(root / "run", studies, conf=server_conf(root, fake_vlm), env=env)
    server.chats_dir = root / "chats"  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


def listed(server: RunningServer, token: str) -> list[tuple[str, str | None]]:
    response = requests.get(f"{server.url}/vila_m3/chat/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    return [(chat["chat_id"], chat["owner"]) for chat in response.json()["chats"]]


def test_with_login_each_user_lists_their_own_chats_and_reviewers_and_admins_every_chat(auth_server, realm,
                                                                                       fake_vlm):
    alice = VilaM3Client(auth_server.url, username="alice", password="alice-password")
    bob_token = realm.token("bob", [USER])
    bob = VilaM3Client(auth_server.url, token=bob_token)
    fake_vlm.script(sse(["Alice's answer."]), sse(["Bob's answer."]))
    alice.stream(StudyRef.image("ct_abdomen"), turn_params("Alice asks", "alice-chat"))
    bob.stream(StudyRef.image("ct_abdomen"), turn_params("Bob asks", "bob-chat"))
    legacy = auth_server.chats_dir / "legacy-chat"  # stored before chats had owners
    legacy.mkdir()
    (legacy / "chat.json").write_text(json.dumps({"chat_id": "legacy-chat", "study": {"image": "ct_abdomen"},
                                                  "messages": [{"role": "user", "text": "Old?", "question": "Old?"}]}))

    assert [chat["chat_id"] for chat in alice.list_chats()] == ["alice-chat"]
    assert listed(auth_server, bob_token) == [("bob-chat", "bob")]
    everything = {("legacy-chat", None), ("bob-chat", "bob"), ("alice-chat", "alice")}
    for roles in ([USER, ADMIN], [USER, REVIEWER]):
        assert set(listed(auth_server, realm.token("staff", roles))) == everything
    assert requests.get(f"{auth_server.url}/vila_m3/chat/", timeout=30).status_code == 401
    assert requests.get(f"{auth_server.url}/vila_m3/chat/", timeout=30,
                        headers={"Authorization": f"Bearer {realm.token('nobody', [])}"}).status_code == 403

    routes = requests.get(f"{auth_server.url}/vila_m3/auth/routes", timeout=30,
                          headers={"Authorization": f"Bearer {realm.token('ada', [ADMIN])}"}).json()
    listing = next(route for route in routes if (route["method"], route["path"]) == ("GET", "/vila_m3/chat/"))
    assert listing["roles"] == [USER]
