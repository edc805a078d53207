"""``/session/`` in place of MONAI Label's: the same routes, form fields and answers, with bounds.

Differences from MONAI Label 0.8.5's ``monailabel/endpoints/session.py``, each deliberate:

- uploads are streamed into ``<app_dir>/tmp/uploads/`` under server-made names (a client's file name is kept
  only when it is a plain name such as ``ct.nii.gz``) with the upload size limit, and that folder is removed
  whatever the outcome (MONAI Label's temp folder stayed behind on every error);
- ``uncompress=true`` takes a ``.zip`` only, checked before extracting; anything else is a 422 (was a 500);
  the archive's unpacked size counts against the sessions' total;
- the sessions' total size is bounded (``--conf sessions_max_gb``): a new session that would pass it is
  refused with 507 after expired sessions are removed;
- a session id must look like the ids this route makes (a UUID): ``..`` or any other name never reaches a
  path (MONAI Label's ``DELETE /session/..`` removed the sessions folder's parent);
- a session past its expiry (``MONAI_LABEL_SESSION_EXPIRY`` caps the ``expiry`` a client asks for) is gone
  when next asked for, not only at the next 5-minute clean-up;
- the session JSON names the image relative to the session (``image``: its file name, ``path``: the session
  id), never a server path;
- with login on a session is its creator's (and the admins'): anyone else gets the 404 of an unknown session
  (lib/session_owner.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, File, HTTPException, UploadFile
from fastapi.responses import FileResponse
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import get_mime_type
from monailabel.utils.sessions import SessionInfo, Sessions
from starlette.concurrency import run_in_threadpool

from lib.session_owner import may_use, record_owner
from lib.uploads import copy_limited, remove, safe_name, too_large

logger = logging.getLogger(__name__)

SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DEFAULT_SESSIONS_MAX_GB = 20.0
STORAGE_FULL = 507
MAX_ARCHIVE_MEMBERS = 20000
MAX_SESSION_FILES = 20000  # files in one PUT /session/ (a DICOM series of thin slices)


def sessions_max_bytes(conf: Mapping[str, str]) -> int:
    """``--conf sessions_max_gb`` (default 20) in bytes; ValueError naming the key for a bad value."""
    raw = conf.get("sessions_max_gb")
    try:
        value = float(raw) if raw not in (None, "") else DEFAULT_SESSIONS_MAX_GB
    except ValueError:
        raise ValueError(f"--conf sessions_max_gb must be a positive number, got {raw!r}") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"--conf sessions_max_gb must be a positive number, got {raw!r}")
    return int(value * 2**30)


def find_session(sessions: Sessions, session_id: str, update_ts: bool = True) -> SessionInfo | None:
    """The live session ``session_id``, or None (a malformed id, an unknown one, or one past its expiry,
    which is removed now)."""
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        return None
    info = sessions.get_session(session_id, update_ts=False)
    if info is None:
        return None
    if info.expiry > 0 and info.last_access_ts + info.expiry < time.time():
        logger.info("session %s expired; removing it", session_id)
        sessions.remove_session(session_id)
        return None
    return sessions.get_session(session_id, update_ts=True) if update_ts else info


def public_json(info: SessionInfo) -> dict[str, Any]:
    """MONAI Label's session JSON without server paths: ``path`` is the session id, ``image`` the file name."""
    answer = info.to_json()
    answer["path"] = info.name
    answer["image"] = os.path.basename(info.image)
    return answer


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """The total size in bytes of the files under ``folder`` (0 if it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class SessionUploads:
    """Creates sessions from uploads, within the per-upload limit and the sessions' total size."""

    def __init__(self, upload_dir: Path, max_upload_bytes: int, max_total_bytes: int):
        self.upload_dir = upload_dir
        self.max_upload_bytes = max_upload_bytes
        self.max_total_bytes = max_total_bytes
        self._room_lock = threading.Lock()

    def create(self, sessions: Sessions, files: list[UploadFile], uncompress: bool, expiry: int,
               user: Any = None) -> dict[str, Any]:
        """Save ``files``, make them a session of ``user`` (its owner, with login on) and return MONAI Label's
        answer; the upload folder is removed."""
        if not files:
            raise HTTPException(422, "no files: send the image as one or more 'files' fields")
        if uncompress and len(files) != 1:
            raise HTTPException(422, "uncompress=true takes exactly one .zip file")
        received = self.upload_dir / uuid.uuid4().hex
        try:
            received.mkdir(parents=True)
            paths = self.receive(files, received)
            with self._room_lock:  # one check-and-add at a time, so two uploads cannot both take the last room
                if uncompress:
                    image = self.unzip(sessions, paths[0], received / "unzipped")
                else:
                    self.check_room(sessions, sum(path.stat().st_size for path in paths))
                    image = paths[0] if len(paths) == 1 else received
                session_id, info = sessions.add_session(str(image), expiry, False)
            record_owner(sessions, info, user)  # until it is saved, the session is the admins' only
        finally:
            remove(received)
        logger.info("session %s created: %d file(s), uncompress=%s, expiry %d s", session_id, len(files),
                    uncompress, info.expiry)
        return {"session_id": session_id, "session_info": public_json(info)}

    def receive(self, files: list[UploadFile], folder: Path) -> list[Path]:
        """Stream each upload into ``folder`` under a plain name; 413 once their total passes the limit."""
        paths: list[Path] = []
        left = self.max_upload_bytes
        for number, upload in enumerate(files):
            name = safe_name(upload.filename, f"file{number:05d}")
            target = folder / name
            if target.exists():
                target = folder / f"{number:05d}-{name}"
            left -= copy_limited(upload.file, target, left)
            paths.append(target)
        return paths

    def unzip(self, sessions: Sessions, archive: Path, folder: Path) -> Path:
        """Extract the ``.zip`` ``archive`` into ``folder`` after checking its members' total size."""
        if not zipfile.is_zipfile(archive):
            raise HTTPException(422, "uncompress=true needs a .zip archive; this file is not one")
        try:
            with zipfile.ZipFile(archive) as bundle:
                members = [info for info in bundle.infolist() if not info.is_dir()]
                if not members:
                    raise HTTPException(422, "the .zip archive holds no files")
                if len(members) > MAX_ARCHIVE_MEMBERS:
                    raise HTTPException(422, f"the .zip archive holds more than {MAX_ARCHIVE_MEMBERS} files")
                unpacked = sum(info.file_size for info in members)
                if unpacked > self.max_upload_bytes:
                    raise too_large(self.max_upload_bytes)
                self.check_room(sessions, unpacked)
                bundle.extractall(folder)  # zipfile drops absolute paths and '..' from member names
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as err:
            raise HTTPException(422, f"the .zip archive cannot be read: {err}") from None
        archive.unlink()
        return folder

    def check_room(self, sessions: Sessions, incoming: int) -> None:
        """507 if ``incoming`` more bytes would pass the sessions' total, after removing expired sessions."""
        used = folder_bytes(sessions.store_path)
        if used + incoming <= self.max_total_bytes:
            return
        sessions.remove_expired()
        used = folder_bytes(sessions.store_path)
        if used + incoming > self.max_total_bytes:
            raise HTTPException(STORAGE_FULL, "session storage is full: this upload would pass the sessions' "
                                              f"total of {self.max_total_bytes / 2**30:g} GB; try again later")


def _sessions() -> Sessions:
    sessions = app_instance().sessions()
    if sessions is None:
        raise HTTPException(status_code=406, detail="Session Feature is Not Enabled")
    return sessions


def session_router(uploads: SessionUploads) -> APIRouter:
    """``GET/PUT/DELETE /session/...`` with MONAI Label's paths, parameters, roles and answers."""
    # a DICOM series comes as one file per slice: more than Starlette's default of 1000 files per form
    router = APIRouter(prefix="/session", tags=["Session"], responses={404: {"description": "Not found"}},
                       form_limits={"max_files": MAX_SESSION_FILES})
    user_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)

    @router.get("/{session_id}", summary=f"{RBAC_USER}Get Session ID")
    async def api_get_session(session_id: str, update_ts: bool = False, image: bool = False,
                              user: User = Depends(user_role)):
        sessions = _sessions()
        info = find_session(sessions, session_id, update_ts=False)
        if info is None or not may_use(info, user):  # another user's session is as unknown as a missing one
            raise HTTPException(status_code=404, detail=f"Session ({session_id}) Not Found")
        if update_ts:  # only its owner or an admin keeps a session alive
            info = find_session(sessions, session_id, update_ts=True) or info
        if image:
            if not os.path.isfile(info.image):
                raise HTTPException(422, "this session holds a folder of files (a DICOM series); it has no "
                                         "single image file to download")
            return FileResponse(info.image, media_type=get_mime_type(info.image),
                                filename=os.path.basename(info.image))
        return public_json(info)

    @router.put("/", summary=f"{RBAC_USER}Create new session with Image")
    async def api_create_session(uncompress: bool = False, expiry: int = 0, files: list[UploadFile] = File(...),
                                 user: User = Depends(user_role)):
        return await run_in_threadpool(uploads.create, _sessions(), files, uncompress, expiry, user)

    @router.delete("/{session_id}", summary=f"{RBAC_USER}Delete Session")
    async def api_remove_session(session_id: str, user: User = Depends(user_role)):
        sessions = _sessions()
        info = find_session(sessions, session_id, update_ts=False)
        if info is None or not may_use(info, user):
            raise HTTPException(status_code=404, detail="Session Not Found")
        sessions.remove_session(session_id)
        return public_json(info)

    return router
