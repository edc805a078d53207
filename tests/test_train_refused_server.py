"""A real server with login on and a remote chat VLM (so no train task): MONAI Label's ``POST /train/`` and
``POST /train/{model}`` are the app's, refused with their roles kept and nothing of the request logged; and the
refusal audit lines are bounded (``--conf audit_refusals_per_minute``: 3 here)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer
from keycloak_realm import ROLES
from login_site import audit_lines, call, login_site

pytestmark = [pytest.mark.server, pytest.mark.security]

SECRET = "patient-wombat-4471"  # a value in the request that must reach neither the server log nor the audit log
PER_MINUTE = 3


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
         fake_vlm: FakeOpenAIServer) -> Iterator[dict]:
    with login_site(tmp_path_factory.mktemp("train-refused-server"), sample_data, fake_vlm.url, conf={"audit_refusals_per_minute": str(PER_MINUTE)}) as running:
        yield running


def test_running_every_trainer_is_refused_with_a_message_and_one_audit_line(site):
    realm = site["realm"]
    params = {"vila_m3": {"name": SECRET}, "note": f"train on {SECRET}"}
    before = len(audit_lines(site))
    answer = call(site, "POST", "/train/", realm.token("ada", [ROLES["admin"]]), json=params)
    assert answer.status_code == 501, answer.text
    assert "POST /train/{model}" in answer.json()["detail"]
    written = audit_lines(site)[before:]
    assert [(line["user"], line["method"], line["route"], line["status"], line["outcome"], line["reason"])
            for line in written] == [("ada", "POST", "/train/", 501, "refused", "not offered")]
    # roles kept: a plain user is refused before the route, and so is a request without a token
    assert call(site, "POST", "/train/", realm.token("uma", [ROLES["user"]]), json=params).status_code == 403
    assert call(site, "POST", "/train/", json=params).status_code == 401
    assert SECRET not in site["server"].log_path.read_text(encoding="utf-8", errors="replace")
    assert SECRET not in site["audit"].read_text(encoding="utf-8")


def test_without_a_local_chat_vlm_training_one_model_is_refused_too(site):
    """MONAI Label's own route would start a background run with the whole request on its command line."""
    realm = site["realm"]
    admin = realm.token("ada", [ROLES["admin"]])
    assert not call(site, "GET", "/info/", admin).json().get("trainers")  # no train task on this server
    for model in ("vila_m3", "segmentation"):
        answer = call(site, "POST", f"/train/{model}", admin, json={"name": SECRET, "max_steps": 1})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"].startswith("model: this server has no train task")
    assert call(site, "POST", "/train/vila_m3", realm.token("uma", [ROLES["user"]]), json={}).status_code == 403
    status = call(site, "GET", "/train/", realm.token("uma", [ROLES["user"]]))
    assert status.status_code == 404, status.text  # no run was ever started
    assert SECRET not in site["server"].log_path.read_text(encoding="utf-8", errors="replace")


def test_the_route_listing_shows_the_trainer_routes_guarded_by_the_admin_role(site):
    listing = call(site, "GET", "/vila_m3/auth/routes", site["realm"].token("ada", [ROLES["admin"]]))
    assert listing.status_code == 200, listing.text
    for path in ("/train/", "/train/{model}"):
        routes = [route for route in listing.json() if route["method"] == "POST" and route["path"] == path]
        assert len(routes) == 1 and routes[0]["roles"] == [ROLES["admin"]], routes


def test_a_flood_of_bad_tokens_writes_three_lines_then_one_suppressed_line_on_shutdown(site):
    realm = site["realm"]
    bad_token = realm.sign({**realm.claims("mallory", [ROLES["user"]]), "exp": 1})  # expired long ago
    if time.time() % 60 > 45:  # the ten requests stay in one minute
        time.sleep(61 - time.time() % 60)
    before = len(audit_lines(site))
    for _ in range(10):
        assert call(site, "GET", "/info/", bad_token).status_code == 401
    written = [line for line in audit_lines(site)[before:] if line["reason"].startswith("token not valid")]
    assert [(line["route"], line["status"], line["reason"]) for line in written] == \
        [("/info/", 401, "token not valid")] * PER_MINUTE
    site["server"].stop()  # the minute's count is written on shutdown
    last = audit_lines(site)[-1]
    assert last["reason"].startswith("token not valid: 7 more refusal line(s) from this client suppressed"), last
    assert (last["route"], last["status"], last["outcome"]) == ("/info/", 401, "refused")
    assert bad_token not in site["audit"].read_text(encoding="utf-8")
