"""MONAI Label's scoring routes on a real server with login on: the app has no scoring methods, and MONAI
Label's ``POST /scoring/{method}`` logs its whole request, so the route answers 501 with a message, keeps its
roles and writes one audit line without the request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer
from keycloak_realm import ROLES
from login_site import audit_lines, call, login_site

pytestmark = [pytest.mark.server, pytest.mark.security]

SECRET = "patient-quokka-8812"  # a value in the request that must reach neither the server log nor the audit log


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
         fake_vlm: FakeOpenAIServer) -> Iterator[dict]:
    with login_site(tmp_path_factory.mktemp("scoring-server"), sample_data, fake_vlm.url) as running:
        yield running


def test_the_app_has_no_scoring_methods(site):
    info = call(site, "GET", "/info/", site["realm"].token("ann", [ROLES["annotator"], ROLES["user"]]))
    assert info.status_code == 200, info.text
    assert info.json()["scoring"] == {}


@pytest.mark.parametrize("path, route", [("/scoring/dice", "/scoring/{method}"), ("/scoring/", "/scoring/")])
def test_scoring_is_refused_with_a_message_an_audit_line_and_never_logged(site, path, route):
    realm = site["realm"]
    params = {"dice": {"note": SECRET}, "prompt": f"Describe {SECRET}"}
    before = len(audit_lines(site))
    answer = call(site, "POST", path, realm.token("ann", [ROLES["annotator"]]), json=params)
    assert answer.status_code == 501, answer.text
    assert "scoring is not offered" in answer.json()["detail"]
    written = audit_lines(site)[before:]
    assert len(written) == 1, written
    line = written[0]
    assert (line["user"], line["method"], line["route"], line["status"], line["outcome"], line["reason"]) == \
        ("ann", "POST", route, 501, "refused", "not offered")
    # roles kept: a plain user is refused before the route, and so is a request without a token
    assert call(site, "POST", path, realm.token("uma", [ROLES["user"]]), json=params).status_code == 403
    assert call(site, "POST", path, json=params).status_code == 401
    assert SECRET not in site["server"].log_path.read_text(encoding="utf-8", errors="replace")
    assert SECRET not in site["audit"].read_text(encoding="utf-8")


def test_the_route_listing_shows_one_guarded_scoring_route(site):
    """The app's route replaces MONAI Label's (one entry) and needs the annotator role, as MONAI Label's did."""
    listing = call(site, "GET", "/vila_m3/auth/routes", site["realm"].token("ada", [ROLES["admin"]]))
    assert listing.status_code == 200, listing.text
    scoring = [route for route in listing.json() if route["method"] == "POST" and route["path"] == "/scoring/{method}"]
    assert len(scoring) == 1 and scoring[0]["roles"] == [ROLES["annotator"]], scoring


def test_the_status_of_scoring_runs_is_still_monai_labels(site):
    """``GET /scoring/`` stays MONAI Label's: there has been no run, so it says none was found (404)."""
    answer = call(site, "GET", "/scoring/", site["realm"].token("uma", [ROLES["user"]]))
    assert answer.status_code == 404
    assert "No Scoring Tasks Found" in answer.json()["detail"]
