"""Who may use a session (apps/vila_m3/lib/session_owner.py) and how study resolution applies it
(lib/datastore.py ``StudyFiles``), without a server: login on and off, owners kept in ``meta.info``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi import HTTPException
from monailabel.config import settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "vila_m3"))

from lib.datastore import ContainedSessions, StudyFiles  # noqa: E402
from lib.session_owner import may_use, owner_of, record_owner  # noqa: E402

ADMIN, USER = settings.MONAI_LABEL_AUTH_ROLE_ADMIN, settings.MONAI_LABEL_AUTH_ROLE_USER
ALICE = {"username": "alice", "roles": [USER]}
BOB = {"username": "bob", "roles": [USER, settings.MONAI_LABEL_AUTH_ROLE_REVIEWER]}
ADA = {"username": "ada", "roles": [USER, ADMIN]}


@pytest.fixture()
def login_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)


def new_session(tmp_path: Path, sessions: ContainedSessions, name: str = "ct.nii.gz") -> str:
    image = tmp_path / name
    image.write_bytes(b"not read here")
    session_id, _ = sessions.add_session(str(image), expiry=3600)
    return session_id


def test_the_owner_is_saved_in_meta_info_and_read_back_by_a_new_reader(tmp_path, login_on):
    sessions = ContainedSessions(str(tmp_path / "sessions"))
    session_id = new_session(tmp_path, sessions)
    record_owner(sessions, sessions.get_session(session_id), ALICE)
    again = ContainedSessions(str(tmp_path / "sessions")).get_session(session_id, update_ts=False)
    assert owner_of(again) == "alice"
    assert may_use(again, ALICE) and may_use(again, ADA)
    assert not may_use(again, BOB)  # a reviewer is not an admin
    assert not may_use(again, {"username": "alice2", "roles": [USER]})


def test_without_an_owner_only_admins_and_with_login_off_everyone(tmp_path, monkeypatch):
    sessions = ContainedSessions(str(tmp_path / "sessions"))
    info = sessions.get_session(new_session(tmp_path, sessions))
    record_owner(sessions, info, ALICE)  # login off: no owner is recorded
    assert owner_of(info) is None
    assert may_use(info, BOB) and may_use(info, {})
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    assert may_use(info, ADA)
    assert not may_use(info, ALICE) and not may_use(info, {})


def test_study_files_treat_another_users_session_as_unknown(tmp_path, login_on):
    sessions = ContainedSessions(str(tmp_path / "sessions"))
    session_id = new_session(tmp_path, sessions)
    record_owner(sessions, sessions.get_session(session_id), ALICE)
    files = StudyFiles(None, lambda: sessions)
    assert files.session(session_id, ALICE).endswith("ct.nii.gz")
    assert files.named(session_id, "sequences.t1c", ADA).endswith("ct.nii.gz")
    unknown = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    for call in (lambda name: files.session(name, BOB), lambda name: files.named(name, "sequences.t1c", BOB)):
        with pytest.raises(HTTPException) as refused:
            call(session_id)
        with pytest.raises(HTTPException) as missing:
            call(unknown)
        assert refused.value.status_code == missing.value.status_code == 422
        assert refused.value.detail == missing.value.detail.replace(unknown, session_id)
