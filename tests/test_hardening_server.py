"""Hardening of a real MONAI Label server with login on (a Keycloak-like realm on 127.0.0.1, real RS256 tokens):
sessions belong to the user who made them, every refused request is on the audit log, and MONAI Label's batch
infer, which logs its whole request, is refused."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from keycloak_realm import ROLES
from login_site import audit_lines, call, login_site
from monailabel.utils.sessions import Sessions

from vila_m3.audit import FIELDS

pytestmark = [pytest.mark.server, pytest.mark.security]

ADMIN, USER = ROLES["admin"], ROLES["user"]
SECRET_QUERY = "patient-okapi-4471"  # a query value that must never reach the audit log
SESSION = "5e3d2c1b-0a9f-4e8d-b7c6-a5f4e3d2c1b0"  # an id in a path: the line names the route's template


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
         fake_vlm: FakeOpenAIServer) -> Iterator[dict]:
    with login_site(tmp_path_factory.mktemp("hardening-server"), sample_data, fake_vlm.url) as running:
        yield running


def new_session(site: dict, token: str) -> str:
    image = site["image"]
    created = call(site, "PUT", "/session/", token, files=[("files", (image.name, image.read_bytes()))])
    assert created.status_code == 200, created.text
    return created.json()["session_id"]


def infer_on(site: dict, token: str, session_id: str, prompt: str = "What is this?") -> requests.Response:
    return call(site, "POST", "/infer/vila_m3", token, params={"session_id": session_id, "output": "json"},
                data={"params": json.dumps({"prompt": prompt, "chat_id": f"c-{uuid.uuid4().hex[:8]}"})}, timeout=300)


def stream_on(site: dict, token: str, session_id: str, prompt: str = "What is this?") -> requests.Response:
    return call(site, "POST", "/vila_m3/chat/stream", token, params={"session_id": session_id},
                data={"params": json.dumps({"prompt": prompt, "chat_id": f"s-{uuid.uuid4().hex[:8]}"})}, timeout=300)


# --- sessions belong to their users ---------------------------------------------------------------------


def test_a_session_is_invisible_to_other_users_and_usable_by_its_owner_and_admins(site, fake_vlm):
    realm = site["realm"]
    alice, bob = realm.token("alice", [USER]), realm.token("bob", [USER, ROLES["annotator"], ROLES["reviewer"]])
    admin = realm.token("ada", [USER, ADMIN])
    session = new_session(site, alice)
    unknown = str(uuid.uuid4())  # what a session nobody made looks like, to compare the answers with

    def same_as_unknown(response: requests.Response, reference: requests.Response) -> None:
        assert response.status_code == reference.status_code, response.text
        assert response.json()["detail"] == reference.json()["detail"].replace(unknown, session)

    posts = len(fake_vlm.posts)
    for method in ("GET", "DELETE"):
        same_as_unknown(call(site, method, f"/session/{session}", bob), call(site, method, f"/session/{unknown}", bob))
    same_as_unknown(call(site, "GET", f"/session/{session}", bob, params={"image": "true"}),
                    call(site, "GET", f"/session/{unknown}", bob, params={"image": "true"}))
    refused_infer = infer_on(site, bob, session)
    assert refused_infer.status_code == 422
    same_as_unknown(refused_infer, infer_on(site, bob, unknown))
    refused_stream = stream_on(site, bob, session)
    assert refused_stream.status_code == 422
    same_as_unknown(refused_stream, stream_on(site, bob, unknown))
    assert len(fake_vlm.posts) == posts  # the model was never asked about alice's study

    mine = call(site, "GET", f"/session/{session}", alice)
    assert mine.status_code == 200 and mine.json()["meta"]["owner"] == "alice"
    assert call(site, "GET", f"/session/{session}", alice, params={"image": "true"}).content == \
        site["image"].read_bytes()
    assert call(site, "GET", f"/session/{session}", admin).status_code == 200
    fake_vlm.script(sse(["A CT of the abdomen."]))
    used = infer_on(site, alice, session)
    assert used.status_code == 200 and "A CT of the abdomen." in json.dumps(used.json()), used.text[:500]
    fake_vlm.script(sse(["Still a CT."]))
    streamed = stream_on(site, alice, session)
    assert streamed.status_code == 200 and "event: final" in streamed.text and "Still a CT." in streamed.text

    # the owner is in the session's meta.info, so it holds after a restart (a fresh reader of the folder)
    assert Sessions(str(site["sessions"])).get_session(session, update_ts=False).meta["owner"] == "alice"
    assert call(site, "DELETE", f"/session/{session}", bob).status_code == 404  # still alice's
    assert call(site, "DELETE", f"/session/{session}", alice).status_code == 200
    assert call(site, "GET", f"/session/{session}", alice).status_code == 404


def test_an_admin_may_delete_anyones_session_and_a_session_without_owner_is_the_admins_only(site):
    realm = site["realm"]
    alice, admin = realm.token("alice", [USER]), realm.token("ada", [USER, ADMIN])
    session = new_session(site, alice)
    assert call(site, "DELETE", f"/session/{session}", admin).status_code == 200
    assert call(site, "GET", f"/session/{session}", alice).status_code == 404

    # a session made before owners were recorded (MONAI Label's own writer: no owner in its meta)
    staged = site["sessions"].parent / "staged.nii.gz"
    shutil.copyfile(site["image"], staged)
    old, _ = Sessions(str(site["sessions"])).add_session(str(staged), expiry=3600)
    assert call(site, "GET", f"/session/{old}", alice).status_code == 404
    assert infer_on(site, alice, old).status_code == 422
    assert call(site, "GET", f"/session/{old}", admin).status_code == 200


# --- refused requests are on the audit log -----------------------------------------------------------------


def test_each_refused_request_writes_exactly_one_audit_line_without_token_or_query(site):
    realm = site["realm"]
    bad_token = realm.sign({**realm.claims("mallory", [USER]), "exp": 1})  # expired long ago
    user_only = realm.token("uma", [USER])
    cases = [  # (method, path, token, other arguments, status, user, reason)
        ("GET", "/datastore/image", None, {"params": {"image": SECRET_QUERY}}, 401, "anonymous", "no token"),
        ("GET", "/info/", bad_token, {}, 401, "anonymous", "token not valid"),
        ("GET", f"/session/{SESSION}", None, {}, 401, "anonymous", "no token"),
        ("GET", "/logs/", user_only, {"params": {"lines": "10", "note": SECRET_QUERY}}, 403, "uma", "missing role"),
        ("POST", "/vila_m3/chat/stream", user_only, {"data": {"params": "x" * (2 * 2**20)}}, 413, "anonymous",
         "body too large"),
        ("PUT", "/session/", user_only, {"data": b"--b\r\nnot a part", "headers": {
            "Content-Type": "multipart/form-data; boundary=b"}}, 400, "anonymous", "malformed request"),
    ]
    for method, path, token, kwargs, status, user, reason in cases:
        before = len(audit_lines(site))
        response = call(site, method, path, token, **kwargs)
        assert response.status_code == status, (path, response.text[:300])
        written = audit_lines(site)[before:]
        assert len(written) == 1, (path, written)
        line = written[0]
        assert tuple(line) == FIELDS
        route = "/session/{session_id}" if SESSION in path else path  # the template: no ids
        assert (line["user"], line["method"], line["route"], line["status"], line["outcome"], line["reason"]) == \
            (user, method, route, status, "refused", reason)
    text = site["audit"].read_text(encoding="utf-8")
    assert bad_token not in text and user_only not in text and SECRET_QUERY not in text and SESSION not in text
    assert "x" * 100 not in text


def test_a_request_refused_by_its_route_keeps_its_one_line(site):
    """A route that writes its own line (a 422 of /infer) gets no second one from the refusal audit."""
    before = len(audit_lines(site))
    response = infer_on(site, site["realm"].token("uma", [USER]), str(uuid.uuid4()))
    assert response.status_code == 422
    written = audit_lines(site)[before:]
    assert len(written) == 1 and written[0]["route"] == "/infer/vila_m3", written
    assert (written[0]["outcome"], written[0]["status"], written[0]["method"], written[0]["user"]) == \
        ("failed", 422, "POST", "uma")


# --- batch infer is refused ----------------------------------------------------------------------------


def test_batch_infer_is_refused_with_a_message_and_never_run(site):
    realm = site["realm"]
    params = {"prompt": f"Describe {SECRET_QUERY}"}
    before = len(audit_lines(site))
    answer = call(site, "POST", "/batch/infer/vila_m3", realm.token("ada", [ADMIN]), json=params)
    assert answer.status_code == 501, answer.text
    assert "batch inference is not offered" in answer.json()["detail"]
    assert "/infer/{model}" in answer.json()["detail"]
    assert [(line["user"], line["route"], line["status"], line["outcome"], line["reason"])
            for line in audit_lines(site)[before:]] == [("ada", "/batch/infer/{model}", 501, "refused", "not offered")]
    assert call(site, "POST", "/batch/infer/vila_m3", realm.token("uma", [USER]), json=params).status_code == 403
    assert call(site, "POST", "/batch/infer/vila_m3", json=params).status_code == 401
    assert SECRET_QUERY not in site["server"].log_path.read_text(encoding="utf-8", errors="replace")
