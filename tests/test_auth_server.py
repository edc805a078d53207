"""Login on a real MONAI Label server (``MONAI_LABEL_AUTH_ENABLE=true``) against a Keycloak-like realm on
127.0.0.1: real RS256 tokens, every route gated by a role, and chats that belong to their users."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from keycloak_realm import ROLES, KeycloakRealm, forge_hs256, new_rsa_key, public_pem, unsigned
from server_harness import RunningServer, start_monailabel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slicer_extension" / "VILAM3Chat"))
from VILAM3ChatLib import client as vclient  # noqa: E402  (the Slicer panel's library)

pytestmark = [pytest.mark.server, pytest.mark.security]

#: What may be called without a token: the login and the API pages. Kept here, not read from the server,
#: so that a route the server lists as public by mistake fails this test.
EXPECTED_PUBLIC = {("GET", "/auth/"), ("POST", "/auth/token"), ("GET", "/"), ("GET", "/docs"),
                   ("GET", "/openapi.json"), ("GET", "/favicon.ico"), ("GET", "/static")}
ADMIN, REVIEWER, ANNOTATOR, USER = ROLES["admin"], ROLES["reviewer"], ROLES["annotator"], ROLES["user"]
EVERYONE = [ADMIN, REVIEWER, ANNOTATOR, USER]


@pytest.fixture(scope="module")
def realm() -> Iterator[KeycloakRealm]:
    with KeycloakRealm() as served:
        served.add_user("alice", "alice-password", [USER, ANNOTATOR])
        yield served



@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, realm: KeycloakRealm,
           fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("auth-server")
    studies = root / "studies"
    shutil.copytree(sample_data / "studies", studies)
    conf = {"models": "vila_m3", "vlm_url": fake_vlm.url, "vlm_model": "fake-vila-m3", "chats_dir": str(root / "chats")}
    env = realm.server_env()
    running = start_monailabel(root / "run", studies, conf=conf, env=env)
    running.chats_dir = root / "chats"  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        running.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(server: RunningServer, method: str, path: str, token: str | None = None, **kwargs) -> requests.Response:
    headers = bearer(token) if token else {}
    return requests.request(method, f"{server.url}{path}", headers=headers, timeout=kwargs.pop("timeout", 60),
                            **kwargs)


# --- tokens --------------------------------------------------------------------------------------------


def test_a_valid_token_with_the_role_is_served(server, realm):
    response = call(server, "GET", "/info/", realm.token("alice", [USER]))
    assert response.status_code == 200, response.text
    assert "vila_m3" in response.json()["models"]


def test_no_token_is_401_asking_for_a_bearer_token(server):
    response = call(server, "GET", "/info/")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "login required" in response.json()["detail"]


@pytest.mark.parametrize("case", ["expired", "wrong signature", "alg none", "hs256 with the public key",
                                  "hs256 with the public key, no kid", "wrong issuer", "wrong audience",
                                  "unknown kid", "not a token", "id token"])
def test_bad_tokens_are_401(server, realm, case):
    claims = realm.claims("mallory", EVERYONE)
    pem = public_pem(realm.keys[realm.active])
    token = {
        "expired": lambda: realm.sign({**claims, "exp": int(time.time()) - 120}),
        "wrong signature": lambda: realm.sign(claims, key=new_rsa_key()),
        "alg none": lambda: unsigned(claims, kid=realm.active),
        "hs256 with the public key": lambda: forge_hs256(claims, pem, kid=realm.active),
        "hs256 with the public key, no kid": lambda: forge_hs256(claims, pem),
        "wrong issuer": lambda: realm.sign({**claims, "iss": "http://127.0.0.1:1/realms/monailabel"}),
        "wrong audience": lambda: realm.sign({**claims, "azp": "another-app", "aud": "account"}),
        "unknown kid": lambda: realm.sign(claims, kid="not-a-realm-key", key=new_rsa_key()),
        "not a token": lambda: "abc.def.ghi",
        "id token": lambda: realm.sign({**claims, "typ": "ID", "aud": realm.client_id}),
    }[case]()
    for method, path in (("GET", "/info/"), ("GET", "/logs/"), ("GET", "/datastore/")):
        response = call(server, method, path, token)
        assert response.status_code == 401, (case, path, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "not valid" in response.json()["detail"]


def test_a_valid_token_lacking_the_role_is_403(server, realm):
    user_only = realm.token("uma", [USER])
    response = call(server, "GET", "/datastore/dataset", user_only)  # annotators only
    assert response.status_code == 403, response.text
    assert ANNOTATOR in response.json()["detail"]
    assert call(server, "GET", "/logs/", user_only).status_code == 403  # admins only
    assert call(server, "GET", "/logs/", realm.token("ada", [ADMIN])).status_code == 200
    assert call(server, "GET", "/info/", realm.token("nobody", [])).status_code == 403


def test_a_rotated_realm_key_is_picked_up_by_kid(server, realm):
    old = realm.active
    assert call(server, "GET", "/info/", realm.token("alice")).status_code == 200
    time.sleep(10.5)  # the server refetches the realm's keys for an unknown kid at most every 10 s
    new = realm.rotate()
    assert call(server, "GET", "/info/", realm.sign(realm.claims("alice"), kid=new)).status_code == 200
    assert call(server, "GET", "/info/", realm.sign(realm.claims("alice"), kid=old)).status_code == 200


def test_login_with_password_gives_a_working_token_and_a_wrong_password_is_401(server, realm):
    response = call(server, "POST", "/auth/token", data={"username": "alice", "password": "alice-password"})
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    me = call(server, "GET", "/auth/token/valid", token)
    assert me.status_code == 200 and me.json()["username"] == "alice"
    assert set(me.json()["roles"]) == {USER, ANNOTATOR}

    wrong = call(server, "POST", "/auth/token", data={"username": "alice", "password": "guess"})
    assert wrong.status_code == 401, server.log_tail(60)
    assert "wrong user name or password" in wrong.json()["detail"]
    info = call(server, "GET", "/auth/")
    assert info.status_code == 200 and info.json()["enabled"] is True


def test_the_slicer_panels_client_logs_in_with_a_password_or_a_given_token(server, realm, fake_vlm):
    client = vclient.VilaM3Client(server.url, username="alice", password="alice-password", timeout_s=30)
    assert client.auth_enabled() is True
    assert "vila_m3" in client.info()["models"]
    with pytest.raises(vclient.AuthError, match="check the user name and password"):
        vclient.VilaM3Client(server.url, username="alice", password="nope", timeout_s=30).info()

    sso = vclient.VilaM3Client(server.url, token=realm.token("alice", [USER]), timeout_s=30)
    assert "vila_m3" in sso.info()["models"]
    fake_vlm.script(sse(["A CT of the abdomen."]))
    answer = sso.ask(vclient.StudyRef.image("ct_abdomen"), vclient.turn_params("What is this?", "sso-chat"))
    assert answer.answer == "A CT of the abdomen."
    assert sso.get_chat("sso-chat")["owner"] == "alice"
    expired = realm.token("alice", [USER], exp=int(time.time()) - 60)
    with pytest.raises(vclient.AuthError, match="refused the access token"):
        vclient.VilaM3Client(server.url, token=expired, timeout_s=30).info()


# --- every route has a role ---------------------------------------------------------------------------


def route_listing(server: RunningServer, realm: KeycloakRealm) -> list[dict]:
    response = call(server, "GET", "/vila_m3/auth/routes", realm.token("ada", [ADMIN]))
    assert response.status_code == 200, response.text
    return response.json()


def concrete(path: str) -> str:
    """A path template with each ``{param}`` filled in."""
    return re.sub(r"\{[^}]+\}", "probe", path)


def test_every_route_needs_a_role_unless_it_is_on_the_public_list(server, realm):
    routes = route_listing(server, realm)
    listed = {(route["method"], route["path"]) for route in routes}
    assert {("POST", "/infer/{model}"), ("POST", "/vila_m3/chat/stream"), ("GET", "/vila_m3/chat/{chat_id}"),
            ("POST", "/reload"), ("GET", "/logs/"), ("PUT", "/datastore/label")} <= listed
    unguarded = [(route["method"], route["path"]) for route in routes
                 if not route["roles"] and (route["method"], route["path"]) not in EXPECTED_PUBLIC]
    assert unguarded == []
    reload = next(route for route in routes if route["path"] == "/reload")
    assert reload["roles"] == [ADMIN]


def test_every_guarded_route_answers_401_without_a_token_and_admin_routes_403_to_users(server, realm):
    routes = route_listing(server, realm)
    user_token = realm.token("uma", EVERYONE[1:])  # every role but admin
    checked_admin = 0
    for route in routes:
        if not route["roles"]:
            continue
        path = concrete(route["path"])
        response = call(server, route["method"], path)
        assert response.status_code == 401, (route, response.status_code, response.text[:200])
        if route["roles"] == [ADMIN]:
            response = call(server, route["method"], path, user_token)
            assert response.status_code == 403, (route, response.status_code, response.text[:200])
            checked_admin += 1
    assert checked_admin >= 4  # /reload, /logs/, /logs/gpu, the route listing at least


def test_public_routes_answer_without_a_token(server):
    for path in ("/auth/", "/openapi.json", "/docs", "/", "/favicon.ico"):
        assert call(server, "GET", path).status_code == 200, path


# --- chats belong to their users ----------------------------------------------------------------------


def stream_turn(server: RunningServer, token: str, chat_id: str, prompt: str = "What is in this image?",
                image: str = "ct_abdomen") -> requests.Response:
    return call(server, "POST", "/vila_m3/chat/stream", token, params={"image": image},
                data={"params": json.dumps({"prompt": prompt, "chat_id": chat_id})}, timeout=300)


def test_a_chat_is_its_starters_and_readable_by_reviewers_and_admins_only(server, realm, fake_vlm):
    alice, bob = realm.token("alice", [USER]), realm.token("bob", [USER, ANNOTATOR])
    reviewer, admin = realm.token("rita", [USER, REVIEWER]), realm.token("ada", [USER, ADMIN])
    fake_vlm.script(sse(["It is ", "a CT of the abdomen."]))
    first = stream_turn(server, alice, "alice-chat")
    assert first.status_code == 200 and "event: final" in first.text, first.text[-500:]
    stored = json.loads((server.chats_dir / "alice-chat" / "chat.json").read_text())
    assert stored["owner"] == "alice"

    mine = call(server, "GET", "/vila_m3/chat/alice-chat", alice)
    assert mine.status_code == 200 and mine.json()["owner"] == "alice"
    assert len(mine.json()["messages"]) == 2

    posts = len(fake_vlm.posts)
    for method, path in (("GET", "/vila_m3/chat/alice-chat"), ("GET", "/vila_m3/chat/alice-chat/labels"),
                         ("POST", "/vila_m3/chat/alice-chat/cancel"), ("POST", "/vila_m3/chat/alice-chat/report")):
        response = call(server, method, path, bob)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["detail"] == "no chat 'alice-chat'"
    other = stream_turn(server, bob, "alice-chat", "Tell me what alice asked")
    assert other.status_code == 404 and other.json()["detail"] == "no chat 'alice-chat'"
    spoofed = call(server, "POST", "/infer/vila_m3", bob, params={"image": "ct_abdomen", "output": "json"},
                   data={"params": json.dumps({"prompt": "Continue", "chat_id": "alice-chat",
                                               "user": {"username": "alice", "roles": [ADMIN]}})})
    assert spoofed.status_code in (404, 422), spoofed.text  # refused: a client's own "user" is never believed
    assert len(fake_vlm.posts) == posts  # the model was never asked

    for token in (alice, reviewer, admin):  # past the owner rule, the report of a NIfTI study is refused as such
        report = call(server, "POST", "/vila_m3/chat/alice-chat/report", token)
        assert report.status_code == 422 and report.json()["detail"] == "a structured report needs a DICOM study"
    for token in (reviewer, admin):  # may read, not continue
        assert call(server, "GET", "/vila_m3/chat/alice-chat", token).status_code == 200
        assert stream_turn(server, token, "alice-chat").status_code == 404
    after = json.loads((server.chats_dir / "alice-chat" / "chat.json").read_text())
    assert after["messages"] == stored["messages"] and after["owner"] == "alice"

    fake_vlm.script(sse(["Bob's own answer."]))
    own = stream_turn(server, bob, "bob-chat")
    assert own.status_code == 200 and "Bob's own answer." in own.text
    assert call(server, "GET", "/vila_m3/chat/bob-chat", alice).status_code == 404
    assert call(server, "GET", "/vila_m3/chat/bob-chat", bob).json()["owner"] == "bob"
