"""The audit wiring of the routes without a server: settings, one line per event whatever the ending, the
model and experts taken from a chat turn's or an expert's answer, and no client text in the route."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from fastapi import HTTPException
from monailabel.config import settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "vila_m3"))

from lib.audit_hooks import (  # noqa: E402
    CLIENT_CLOSED,
    AuditTrail,
    audit_settings,
    audit_user,
    audited,
    chat_id_of,
    infer_route_name,
    open_audit_log,
)

from vila_m3.audit import DEFAULT_MAX_BYTES, FIELDS, hashed  # noqa: E402

TURN = {"chat_id": "c-1", "cancelled": False, "vlm": {"name": "vila_m3_8b (fine-tuned v2)", "stand_in": False,
                                                      "version": "v2"},
        "experts": [{"expert": "VISTA3D", "argument": "hepatic tumor", "seconds": 1.2, "cached": False}],
        "timings": [{"step": "queue wait", "seconds": 0.25}, {"step": "total", "seconds": 3.0}]}


def written(tmp_path: Path) -> list[dict]:
    return [json.loads(text) for text in (tmp_path / "logs" / "audit.jsonl").read_text().splitlines()]


@pytest.fixture
def trail(tmp_path: Path) -> AuditTrail:
    return AuditTrail(open_audit_log(tmp_path, {}))


def test_settings_default_under_the_app_and_a_bad_size_is_named(tmp_path):
    assert audit_settings(tmp_path, {}) == (tmp_path / "logs" / "audit.jsonl", DEFAULT_MAX_BYTES)
    assert audit_settings(tmp_path, {"audit_log": str(tmp_path / "a.jsonl"), "audit_log_max_mb": "0.5"}) == \
        (tmp_path / "a.jsonl", 512 * 1024)
    for bad in ("ten", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match="audit_log_max_mb"):
            audit_settings(tmp_path, {"audit_log_max_mb": bad})
    assert open_audit_log(tmp_path, {}) is open_audit_log(tmp_path, {})  # one writer per file (POST /reload)


def test_a_chat_turn_line(trail, tmp_path):
    event = trail.event("/infer/vila_m3", None, model="vila_m3", chat_id="from-params", study_id="ct_abdomen")
    with audited(event):
        event.note_answer(TURN)
    (line,) = written(tmp_path)
    assert tuple(line) == FIELDS
    assert line["user"] == "anonymous" and line["chat"] == hashed("c-1") and line["study"] == hashed("ct_abdomen")
    assert (line["model"], line["model_version"], line["stand_in"]) == ("vila_m3_8b (fine-tuned v2)", "v2", False)
    assert line["experts"] == [{"name": "VISTA3D", "argument": "hepatic tumor"}]
    assert (line["queue_wait_s"], line["outcome"], line["status"]) == (0.25, "ok", 200)


def test_an_expert_line_and_a_cancelled_turn(trail, tmp_path):
    expert = trail.event("/infer/vista3d", None, model="vista3d", study_id="ct_abdomen")
    expert.note_answer({"expert": "VISTA3D", "argument": None, "label_names": {"liver": 1, "spleen": 3},
                        "stand_in": True, "cached": False, "latencies": {"queue": 1.5, "run": 2.0}})
    expert.finish(200)
    cancelled = trail.event("/vila_m3/chat/stream", None, model="vila_m3")
    cancelled.note_answer({**TURN, "cancelled": True, "experts": []})
    cancelled.finish(200)
    cancelled.finish(500)  # only the first finish writes
    first, second = written(tmp_path)
    assert (first["model"], first["stand_in"], first["queue_wait_s"]) == ("VISTA3D", True, 1.5)
    assert first["experts"] == [{"name": "VISTA3D", "argument": "1,3"}] and first["chat"] is None
    assert (second["outcome"], second["status"], second["experts"]) == ("cancelled", 200, [])


@pytest.mark.parametrize(
    ("raised", "outcome", "status"),
    [(HTTPException(422, "bad"), "failed", 422), (HTTPException(503, "busy"), "failed", 503),
     (RuntimeError("fault"), "failed", 500), (asyncio.CancelledError(), "cancelled", CLIENT_CLOSED)],
    ids=["422", "503", "fault", "client-gone"],
)
def test_a_request_that_raises_is_one_line_with_its_status(trail, tmp_path, raised, outcome, status):
    event = trail.event("/infer/vila_m3", None, model="vila_m3", chat_id=chat_id_of('{"chat_id": "c-9"}'))
    with pytest.raises(type(raised)), audited(event):
        raise raised
    (line,) = written(tmp_path)
    assert (line["outcome"], line["status"], line["model"], line["chat"]) == (outcome, status, "vila_m3", hashed("c-9"))
    assert line["stand_in"] is None and line["experts"] == [] and line["queue_wait_s"] is None


def test_a_stream_is_left_open_until_its_turn_ends(trail, tmp_path):
    event = trail.event("/vila_m3/chat/stream", None)
    with audited(event, status=None):
        pass
    assert not (tmp_path / "logs" / "audit.jsonl").read_text()
    event.finish(200)
    assert len(written(tmp_path)) == 1


def test_client_text_stays_out_of_the_route_and_users(monkeypatch):
    assert infer_route_name("vista3d") == "/infer/vista3d"
    assert infer_route_name("../../etc/passwd") == infer_route_name("a b") == infer_route_name("x" * 65) == \
        "/infer/{model}"
    assert chat_id_of("not json") is None and chat_id_of('["c"]') is None and chat_id_of('{"chat_id": 3}') is None

    class User:
        username = "admin"

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", False)
    assert audit_user(User()) == "anonymous"  # MONAI Label's default user with login off
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    assert audit_user(User()) == "admin"
