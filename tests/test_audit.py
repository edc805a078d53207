"""The audit log: one JSON line per event with the documented fields, ids hashed, rotation by size."""

from __future__ import annotations

import json

import pytest

from vila_m3.audit import FIELDS, AuditLog, hashed


def test_a_line_has_every_field_and_hashes_ids(tmp_path):
    log = AuditLog(tmp_path / "logs" / "audit.jsonl")
    log.record(user="alice", route="/infer/vila_m3", outcome="ok", status=200, chat_id="chat-1",
               study_id="ct_abdomen", model="vila_m3_8b", model_version="local checkpoint", stand_in=True,
               experts=[{"name": "VISTA3D", "argument": "hepatic tumor", "seconds": 3.2}],
               queue_wait_s=0.01234567, duration_s=1.5)
    log.close()
    lines = (tmp_path / "logs" / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert tuple(line) == FIELDS
    assert line["chat"] == hashed("chat-1") != "chat-1"
    assert line["study"] == hashed("ct_abdomen")
    assert "ct_abdomen" not in lines[0] and "chat-1" not in lines[0]
    assert line["experts"] == [{"name": "VISTA3D", "argument": "hepatic tumor"}]
    assert line["queue_wait_s"] == 0.0123 and line["status"] == 200 and line["user"] == "alice"


def test_anonymous_user_and_bad_outcome(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.record(user=None, route="/infer/cxr", outcome="failed", status=422)["user"] == "anonymous"
    with pytest.raises(ValueError, match="outcome"):
        log.record(user=None, route="/infer/cxr", outcome="done", status=200)
    log.close()


def test_each_line_is_on_disk_when_record_returns_and_the_file_rotates(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2000, backups=2)
    for number in range(40):
        log.record(user="u", route="/infer/vista3d", outcome="ok", status=200, study_id=f"s{number}")
        # flushed per line: another reader sees it at once
        assert path.read_text().splitlines()[-1].startswith("{")
    log.close()
    assert (tmp_path / "audit.jsonl.1").is_file() and (tmp_path / "audit.jsonl.2").is_file()
    assert not (tmp_path / "audit.jsonl.3").exists()
    for file in tmp_path.glob("audit.jsonl*"):
        assert all(json.loads(text)["route"] == "/infer/vista3d" for text in file.read_text().splitlines())
