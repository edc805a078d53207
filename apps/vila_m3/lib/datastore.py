"""A local datastore and sessions that keep every client-named file inside their folders.

MONAI Label 0.8.5's ``LocalDatastore`` joins the ids, tags and upload suffixes a client sends into
paths without checking where they lead (``PUT /datastore/image?image=../../x/`` wrote outside the
studies folder, ``DELETE /datastore/image`` deleted there). ``ContainedDatastore`` checks each of them
(``vila_m3.security.paths``: plain ids and tags, an allowed suffix) and that every path it writes,
deletes or hands out resolves inside the studies folder (symbolic links followed: link the whole
studies folder, not single files out of it). MONAI Label's datastore routes call these methods
directly, so an ``HTTPException`` raised here is the route's answer: 422 for a bad name, 404 for an
unknown image or label. Image info handed to clients names the file, never its server path.

``ContainedSessions`` does the same for session ids (``GET``/``DELETE /session/{id}``, ``session_id=``)
and gives clients the session's file name only.

``datastore_router`` answers ``GET /datastore/`` in place of MONAI Label's, its training list relative to
the studies folder.

``StudyFiles`` resolves what clients name (datastore ids, session ids) to files, and says which server
paths a task may trust: only those inside the datastore, the sessions folder or the app's upload folders.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from monailabel.config import RBAC_USER, settings
from monailabel.datastore.local import LocalDatastore
from monailabel.endpoints.datastore import ResultType
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.sessions import SessionInfo, Sessions

from lib.session_owner import may_use
from vila_m3.data.privacy import is_dicom_file
from vila_m3.security.paths import (
    OutsideRootError,
    UnsafeNameError,
    check_id,
    contained,
    is_valid_id,
    is_within,
)

logger = logging.getLogger(__name__)
BAD_NAME = 422
NOT_FOUND = 404
LABEL_SUFFIXES = (".json",)  # besides the image suffixes: a classification's findings (the CXR task's labels)


def _holds_dicom(folder: Path) -> bool:
    """Whether ``folder`` holds DICOM files (the first 50 entries are looked at)."""
    try:
        return any(is_dicom_file(path) for path in sorted(folder.iterdir())[:50] if path.is_file())
    except OSError:
        return False


def _refuse(err: Exception, status: int = BAD_NAME) -> HTTPException:
    return HTTPException(status, str(err))


def _drop_upload(filename: str) -> None:
    """Remove a refused upload's temporary file (MONAI Label's routes remove it only after a success)."""
    with contextlib.suppress(OSError):
        if filename and is_within(filename, [tempfile.gettempdir()]) and os.path.isfile(filename):
            os.unlink(filename)


class ContainedDatastore(LocalDatastore):
    """``LocalDatastore`` that refuses ids, tags and suffixes which would leave the studies folder."""

    def __init__(self, datastore_path: str, **kwargs: Any):
        self._root = Path(os.path.realpath(datastore_path))
        super().__init__(datastore_path, **kwargs)

    @property
    def root(self) -> Path:
        """The studies folder, symbolic links resolved."""
        return self._root

    # --- the rules ------------------------------------------------------------------------------

    def suffixes(self) -> list[str]:
        """The file suffixes this datastore holds (``.nii.gz``, ``.nii``, ...), from its extension patterns."""
        return [pattern.replace("*", "") for pattern in self._extensions if pattern.replace("*", "")]

    def _suffix(self, filename: str, extra: tuple[str, ...] = ()) -> str:
        allowed = [*self.suffixes(), *extra]
        name = os.path.basename(filename).lower()
        for suffix in sorted(allowed, key=len, reverse=True):
            if name.endswith(suffix.lower()) and len(name) > len(suffix):
                return suffix
        raise UnsafeNameError(f"the file name must end in one of {', '.join(sorted(set(allowed)))}")

    def _inside(self, base: str, *parts: str) -> Path:
        """``base/parts`` inside ``base`` and inside the studies folder, else ``OutsideRootError``."""
        path = contained(base, *parts)
        if not path.is_relative_to(self._root) or path == self._root:
            raise OutsideRootError("the path resolves outside the datastore")
        return path

    def _image_file(self, image_id: str, ext: str) -> Path:
        return self._inside(self._datastore.image_path(), self._filename(image_id, ext))

    def _label_file(self, image_id: str, tag: str, ext: str) -> Path:
        return self._inside(self._datastore.label_path(None), tag, self._filename(image_id, ext))

    def _known_image(self, image_id: str) -> Any:
        obj = self._datastore.objects.get(check_id(image_id, "image"))
        if obj is None:
            raise HTTPException(NOT_FOUND, f"image '{image_id}' is not in the datastore")
        return obj

    # --- what MONAI Label's scan misses: DICOM series folders, findings labels, orphan labels ---------

    def _list_files(self, path: str, patterns: list[str]) -> dict[str, str]:
        """MONAI Label's scan of ``path`` for ``patterns``, plus: in the images folder, sub-folders holding a
        DICOM series (an image whose id is the folder name; not the labels folder, hidden ones, or a link out of
        the studies folder); in a label folder, findings labels (``*.json``)."""
        files = super()._list_files(path, patterns)
        real = os.path.realpath(path)
        if real == os.path.realpath(self._datastore.image_path()):
            labels = os.path.realpath(self._datastore.label_path(None))
            for entry in sorted(os.scandir(real), key=lambda item: item.name):
                inside = Path(os.path.realpath(entry.path))
                if (entry.is_dir() and not entry.name.startswith(".") and is_valid_id(entry.name)
                        and inside.is_relative_to(self._root) and str(inside) != labels
                        and _holds_dicom(Path(entry.path))):
                    files.setdefault(entry.name, entry.name)
        elif Path(real).is_relative_to(os.path.realpath(self._datastore.label_path(None))):
            for name in sorted(os.listdir(real)):
                if name.lower().endswith(LABEL_SUFFIXES) and not name.startswith("."):
                    files.setdefault(name, name)
        return files

    def _to_id(self, file: str) -> tuple[str, str]:
        """A DICOM series folder's id is its whole name (MONAI Label would cut a dotted name at the dot)."""
        if os.path.isdir(os.path.join(self._datastore.image_path(), file)):
            return file, ""
        return super()._to_id(file)

    def orphan_labels(self, tag: str = "final") -> list[str]:
        """File names of ``tag`` labels whose image is not in the datastore (MONAI Label ignores them)."""
        if not is_valid_id(tag):
            return []
        folder = os.path.join(self._datastore.label_path(None), tag)
        if not os.path.isdir(folder):
            return []
        names = self._list_files(folder, self._extensions)
        return sorted(name for name in names
                      if self._to_id(name)[0] not in self._datastore.objects and not name.startswith("."))

    @property
    def location(self) -> str:
        """Where the studies are (the studies folder), as an export's manifest names its source."""
        return str(self._root)

    # --- writes and deletes ------------------------------------------------------------------------

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        try:
            suffix = self._suffix(image_filename)
            if not image_id:
                image_id = os.path.basename(image_filename)[: -len(suffix)]
            check_id(image_id, "image")
            self._image_file(image_id, suffix)
        except (UnsafeNameError, OutsideRootError) as err:
            _drop_upload(image_filename)
            raise _refuse(err) from None
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        try:
            check_id(label_tag, "tag")
            self._known_image(image_id)
            suffix = self._suffix(label_filename, LABEL_SUFFIXES)
            self._label_file(image_id, label_tag, suffix)
        except (UnsafeNameError, OutsideRootError) as err:
            _drop_upload(label_filename)
            raise _refuse(err) from None
        except HTTPException:
            _drop_upload(label_filename)
            raise
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_image(self, image_id: str) -> None:
        try:
            obj = self._known_image(image_id)
            self._image_file(image_id, obj.image.ext)
            for tag, label in obj.labels.items():
                check_id(tag, "tag")
                self._label_file(image_id, tag, label.ext)
        except (UnsafeNameError, OutsideRootError) as err:
            raise _refuse(err) from None
        super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        try:
            check_id(label_tag, "tag")
            self._known_image(label_id)
            label = self._datastore.label(label_id, label_tag)
            if label is None:
                raise HTTPException(NOT_FOUND, f"image '{label_id}' has no label '{label_tag}'")
            self._label_file(label_id, label_tag, label.ext)
        except (UnsafeNameError, OutsideRootError) as err:
            raise _refuse(err) from None
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        try:
            self._known_image(image_id)
        except UnsafeNameError as err:
            raise _refuse(err) from None
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        try:
            check_id(label_tag, "tag")
            self._known_image(label_id)
        except UnsafeNameError as err:
            raise _refuse(err) from None
        if self._datastore.label(label_id, label_tag) is None:
            raise HTTPException(NOT_FOUND, f"image '{label_id}' has no label '{label_tag}'")
        super().update_label_info(label_id, label_tag, info)

    # --- reads ------------------------------------------------------------------------------------

    def get_image_uri(self, image_id: str) -> str:
        """The image's file, or "" when the id is not a plain id, unknown, or its file lies outside."""
        if not is_valid_id(image_id):
            return ""
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            return ""
        try:
            return str(self._image_file(image_id, obj.image.ext))
        except OutsideRootError:
            logger.warning("datastore image %r resolves outside the studies folder; not served", image_id)
            return ""

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        """The label's file, or "" when the id or tag is not plain, unknown, or its file lies outside."""
        if not (is_valid_id(label_id) and is_valid_id(label_tag)):
            return ""
        label = self._datastore.label(label_id, label_tag)
        if label is None:
            return ""
        try:
            return str(self._label_file(label_id, label_tag, label.ext))
        except OutsideRootError:
            logger.warning("datastore label %r (%r) resolves outside the studies folder; not served",
                           label_id, label_tag)
            return ""

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """MONAI Label's image info without the server path (``name`` names the file)."""
        info = super().get_image_info(image_id) if is_valid_id(image_id) else {}
        info.pop("path", None)
        return info

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        return super().get_label_info(label_id, label_tag) if is_valid_id(label_id) and is_valid_id(label_tag) else {}


class ClientSessionInfo(SessionInfo):
    """A session record whose JSON for clients names the session's file, not its server path."""

    def to_json(self, indent: int | None = None) -> dict[str, Any]:
        record = super().to_json(indent)
        record["path"] = self.name  # the session id, as lib/session_route.py answers
        record["image"] = os.path.basename(str(record.get("image") or "").rstrip("/"))
        return record


def _for_clients(info: SessionInfo | None) -> ClientSessionInfo | None:
    if info is None or isinstance(info, ClientSessionInfo):
        return info
    client = ClientSessionInfo()
    client.__dict__.update(info.__dict__)
    return client


class ContainedSessions(Sessions):
    """MONAI Label's sessions with checked ids: an id that is not plain, or whose folder or file lies
    outside the sessions folder, is no session (``None``; the routes answer 404)."""

    @property
    def root(self) -> Path:
        return Path(os.path.realpath(self.store_path))

    def _contained(self, session_id: str) -> bool:
        if not is_valid_id(session_id):
            return False
        try:
            contained(self.store_path, session_id)
        except OutsideRootError:
            return False
        return True

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        if not self._contained(session_id):
            return None
        info = super().get_session(session_id, update_ts=update_ts, fetch_cache=fetch_cache)
        if info is not None and not is_within(info.image, [self.store_path]):
            logger.warning("session %r names a file outside the sessions folder; ignored", session_id)
            return None
        info = _for_clients(info)
        if info is not None:
            self[session_id] = info
        return info

    def remove_session(self, session_id: str) -> None:
        if self._contained(session_id):
            super().remove_session(session_id)

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        if session_id is not None:
            check_id(session_id, "session")
        session_id, info = super().add_session(data_file, expiry, uncompress, session_id)
        info = _for_clients(info)
        self[session_id] = info
        return session_id, info


class StudyFiles:
    """The files of what clients name, and the server paths a task may trust.

    Clients name a study by datastore image id or session id only. A path in a request is trusted
    only if it resolves inside the datastore folder (a local datastore), the sessions folder, or one
    of ``upload_roots`` (where the app's own routes put uploads); anything else is refused with 422,
    with the same message whether or not such a file exists.
    """

    def __init__(self, datastore: Any, sessions: Callable[[], Sessions | None] = lambda: None,
                 upload_roots: Iterable[str | os.PathLike[str]] = ()):
        self.datastore = datastore
        self._sessions = sessions  # a callable: MONAI Label makes the sessions after the infer tasks
        self.upload_roots = [Path(root) for root in upload_roots]

    @property
    def sessions(self) -> Sessions | None:
        return self._sessions()

    def roots(self) -> list[Path]:
        """The folders whose files a request may name by path (the server put them there)."""
        roots = list(self.upload_roots)
        if isinstance(self.datastore, LocalDatastore):  # the studies folder, or a DICOMweb datastore's cache
            roots.append(Path(os.path.realpath(self.datastore._datastore_path)))
        sessions = self.sessions
        if sessions is not None:
            roots.append(Path(sessions.store_path))
        return roots

    def id_of(self, path: str) -> str:
        """What a trusted ``path`` is to a client: its session id, its datastore id, or ``upload``."""
        target = Path(os.path.realpath(path))
        sessions = self.sessions
        if sessions is not None and target.is_relative_to(os.path.realpath(sessions.store_path)):
            return target.relative_to(os.path.realpath(sessions.store_path)).parts[0]
        if isinstance(self.datastore, LocalDatastore):
            root = os.path.realpath(self.datastore._datastore_path)
            if target.is_relative_to(root):
                return self.datastore._to_id(target.name)[0]
        return "upload"

    def image(self, image_id: str, what: str = "image") -> str:
        """The file of datastore image ``image_id``; 422 unless it is a plain id in the datastore."""
        if not isinstance(image_id, str) or not image_id:
            raise HTTPException(BAD_NAME, f"{what}: a datastore image id or a session is required")
        if not is_valid_id(image_id):
            raise HTTPException(BAD_NAME, not_in_datastore(image_id, what))
        try:
            uri = self.datastore.get_image_uri(image_id)
        except Exception:  # a remote datastore's lookup error is the same "not there" for the client
            logger.warning("datastore lookup of %r failed", image_id, exc_info=True)
            uri = ""
        if not uri or not os.path.exists(uri):
            problem = getattr(self.datastore, "image_problem", lambda _: None)(image_id)  # a PACS says why
            raise HTTPException(BAD_NAME, f"{what}: {problem}" if problem else not_in_datastore(image_id, what))
        return uri

    def is_image_of(self, path: str, image_id: Any) -> bool:
        """Whether ``path`` is the datastore's file of ``image_id`` (symbolic links resolved)."""
        if not is_valid_id(image_id) or not isinstance(path, str):
            return False
        try:
            return os.path.realpath(self.image(image_id)) == os.path.realpath(path)
        except HTTPException:
            return False

    def session(self, session_id: str, user: Any = None) -> str:
        """The file (or DICOM folder) of session ``session_id``; 422 if there is no such session, or if ``user``
        (a ``User`` or a request's ``{"username", "roles"}``; None: the caller checked) may not use it."""
        sessions = self.sessions
        info = sessions.get_session(session_id, update_ts=False) if sessions is not None and is_valid_id(session_id) \
            else None
        if info is not None and user is not None and not may_use(info, user):
            info = None  # another user's session is as unknown as a missing one (lib/session_owner.py)
        if info is not None:
            info = sessions.get_session(session_id) or info  # in use: its expiry starts again
        if info is None:
            shown = repr(session_id)[:80] if is_valid_id(session_id) else "given"
            raise HTTPException(BAD_NAME, f"session {shown} not found (expired?)")
        return info.image

    def named(self, name: str, what: str = "image", user: Any = None) -> str:
        """A datastore image id or, failing that, a session id that ``user`` may use (e.g. one of the BRATS
        sequences; ``user`` as for :meth:`session`)."""
        sessions = self.sessions
        if isinstance(name, str) and is_valid_id(name) and sessions is not None:
            with contextlib.suppress(HTTPException):
                return self.image(name, what)
            info = sessions.get_session(name, update_ts=False)
            if info is not None and (user is None or may_use(info, user)):
                return self.session(name)
            raise HTTPException(BAD_NAME, f"{what} '{name}' not found: neither a datastore image nor a session "
                                          "(expired?)")
        return self.image(name, what)

    def request_roots(self) -> list[Path]:
        """The folders whose files may arrive as a path in a request: a session's file (MONAI Label's routes put
        it there) or an upload; a datastore image always comes as its id."""
        sessions = self.sessions
        return [*self.upload_roots, *([Path(sessions.store_path)] if sessions is not None else [])]

    def trusted(self, path: Any, what: str = "image", in_request: bool = False) -> str:
        """``path`` if the server put it there (inside ``roots()``, or ``request_roots()`` for a path that came
        in the request itself), else 422 without revealing whether such a file exists."""
        roots = self.request_roots() if in_request else self.roots()
        if isinstance(path, str) and path and is_within(path, roots):
            return path
        raise HTTPException(BAD_NAME, not_in_datastore(path, what))


def not_in_datastore(value: Any, what: str = "image") -> str:
    """The 422 message for a client's image that is not a datastore id: it names a plain id, never a path."""
    if isinstance(value, str) and is_valid_id(value):
        return f"{what} '{value}' is not in the datastore"
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return f"{what}: server paths are not accepted; name a datastore image id or a session"
    if not isinstance(value, str):
        return f"{what} must be a datastore image id, not {type(value).__name__}"
    return f"{what} is not a datastore image id"


def relative_datalist(datastore: Any) -> list[dict[str, str]]:
    """MONAI Label's training list (``image``/``label`` pairs of final labels) with paths relative to the
    studies folder (MONAI Label's own ``full_path=False`` strips nothing: it looks for ``os.pathsep``)."""
    root = os.path.realpath(datastore._datastore_path) if isinstance(datastore, LocalDatastore) else ""
    listing = []
    for item in datastore.datalist():
        listing.append({key: os.path.relpath(value, root) if root and is_within(value, [root]) else
                        os.path.basename(str(value)) for key, value in item.items()})
    return listing


def datastore_router() -> APIRouter:
    """``GET /datastore/`` as MONAI Label answers it, but ``output=train`` lists paths relative to the studies
    folder (MONAI Label's lists the server's absolute paths)."""
    router = APIRouter(prefix="/datastore", tags=["Datastore"])
    user_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)

    @router.get("/", summary=f"{RBAC_USER}Get All Images/Labels from datastore")
    async def api_datastore(output: ResultType | None = None, user: User = Depends(user_role)) -> Any:
        store = app_instance().datastore()
        if output == ResultType.all:
            return store.json()
        if output == ResultType.train:
            return relative_datalist(store)
        return store.status()

    return router
