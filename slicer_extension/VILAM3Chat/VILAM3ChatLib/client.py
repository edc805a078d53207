"""HTTP client of the VILA-M3 MONAI Label server.

Covers what the Slicer panel needs: the server's tasks (``GET /info/``), MONAI Label's login
(``/auth/``, ``/auth/token``, then ``Authorization: Bearer``), session uploads (``PUT /session/``),
a chat turn as one answer (``POST /infer/vila_m3``) or as server-sent events
(``POST /vila_m3/chat/stream``), cancelling a turn, listing and reading stored chats, and saving a
corrected labelmap as the image's final label (``PUT /datastore/label``).

Every failure is a :class:`VilaM3Error` whose message is one readable line (server down, the
server's own 4xx message, a timeout, a task the server does not offer, a stream cut off).
Only the standard library and ``requests`` are used; both ship with 3D Slicer.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from .multipart import MultipartError, parse_multipart
from .sse import SSEParser

__all__ = [
    "AuthError",
    "ChatTaskUnavailable",
    "RequestRejected",
    "RequestTimeout",
    "ServerError",
    "ServerUnavailable",
    "StreamAborted",
    "StudyRef",
    "TurnAnswer",
    "VilaM3Client",
    "VilaM3Error",
    "modality_param",
    "new_chat_id",
    "normalize_server_url",
    "turn_params",
    "unique_image_id",
]

CHAT_TASK = "vila_m3"
STREAM_ROUTE = "/vila_m3/chat/stream"
CHAT_ROUTE = "/vila_m3/chat"
_MAX_MESSAGE = 300
_KNOWN_MODALITIES = {"CT": "CT", "MR": "MRI", "MRI": "MRI", "CR": "CXR", "DX": "CXR", "CXR": "CXR"}


# --- errors -----------------------------------------------------------------------------------------


class VilaM3Error(Exception):
    """A problem talking to the server; ``str(error)`` is one line for the status bar.

    Attributes:
        status: the HTTP status when the server answered, else None.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(_one_line(message))
        self.status = status


class ServerUnavailable(VilaM3Error):
    """Nothing answers at the server address (down, wrong address, network)."""


class RequestTimeout(VilaM3Error):
    """The server did not answer in time."""


class RequestRejected(VilaM3Error):
    """The server refused the request (HTTP 4xx); the message is the server's own reason."""


class AuthError(RequestRejected):
    """Login needed, refused, or not allowed (HTTP 401 / 403)."""


class ChatTaskUnavailable(VilaM3Error):
    """The server runs, but does not offer the VILA-M3 chat (task missing from ``/info/``)."""


class ServerError(VilaM3Error):
    """The server failed (HTTP 5xx), sent something unreadable, or stopped in the middle of a turn."""


class StreamAborted(VilaM3Error):
    """The client stopped reading a stream (the panel was closed)."""


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 1] + "…"


def _short_reason(err: BaseException) -> str:
    """The useful end of a requests/urllib3 error, e.g. ``Connection refused``."""
    text = str(err)
    found = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found[-1].strip()
    for marker in ("Connection refused", "Name or service not known", "Read timed out", "Connection reset",
                   "Connection aborted", "Response ended prematurely", "IncompleteRead", "InvalidChunkLength"):
        if marker.lower() in text.lower():
            return marker
    return type(err).__name__


def _detail(response: requests.Response) -> str:
    """The server's reason for an error answer: FastAPI's ``detail``, else the body's first line."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip().splitlines()
        return text[0] if text else (response.reason or f"HTTP {response.status_code}")
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # request validation errors: [{"loc": [...], "msg": ...}]
        items = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(part) for part in item.get("loc", []) if part != "body")
                items.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg", "")))
            else:
                items.append(str(item))
        return "; ".join(items)
    if isinstance(detail, dict):
        return str(detail.get("message") or detail.get("error") or json.dumps(detail))
    return str(detail)


def _error_for(status: int, detail: str, what: str) -> VilaM3Error:
    if status == 401:
        return AuthError(f"{what}: the server did not accept the login ({detail})", status)
    if status == 403:
        return AuthError(f"{what}: not allowed for this user ({detail})", status)
    if 400 <= status < 500:
        return RequestRejected(f"{what}: {detail}", status)
    if status == 503:
        return ServerError(f"{what}: the server cannot answer now ({detail})", status)
    return ServerError(f"{what}: the server failed (HTTP {status}: {detail})", status)


# --- requests and answers ---------------------------------------------------------------------------


def normalize_server_url(url: str) -> str:
    """``127.0.0.1:8000/`` → ``http://127.0.0.1:8000``; raises ValueError when it is not an address."""
    text = (url or "").strip()
    if not text:
        raise ValueError("no server address: set it to the MONAI Label server, e.g. http://127.0.0.1:8000")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{url}' is not a server address like http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 - raises for a bad port
    except ValueError:
        raise ValueError(f"'{url}' has an invalid port") from None
    return text.rstrip("/")


@dataclass(frozen=True)
class StudyRef:
    """Which image a turn is about: a datastore image id, or a session (an uploaded volume)."""

    image_id: str | None = None
    session_id: str | None = None

    def __post_init__(self) -> None:
        if bool(self.image_id) == bool(self.session_id):
            raise ValueError("a study is either a datastore image id or a session id")

    @classmethod
    def image(cls, image_id: str) -> StudyRef:
        return cls(image_id=image_id)

    @classmethod
    def session(cls, session_id: str) -> StudyRef:
        return cls(session_id=session_id)

    def query(self) -> dict[str, str]:
        return {"image": self.image_id} if self.image_id else {"session_id": self.session_id or ""}

    def __str__(self) -> str:
        return f"image {self.image_id}" if self.image_id else f"session {self.session_id}"


def new_chat_id(prefix: str = "slicer") -> str:
    """A fresh chat id the server accepts (letters, digits, ``_.-``), e.g. ``slicer-20250101-093000-3fa2``."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def modality_param(dicom_modality: str | None) -> str | None:
    """The ``modality`` to send for a DICOM Modality value (CT, MR, CR, DX), or None to let the server decide."""
    if not dicom_modality:
        return None
    return _KNOWN_MODALITIES.get(dicom_modality.strip().upper())


def unique_image_id(name: str, existing: Sequence[str]) -> str:
    """A datastore image id made from a volume's name that no existing image has (an upload never
    replaces another image)."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", name or "").strip("_") or "volume"
    candidate = base
    taken = set(existing)
    while candidate in taken:
        candidate = f"{base}-slicer-{secrets.token_hex(2)}"
    return candidate


def turn_params(prompt: str, chat_id: str, axis: str | None = None, slice_index: int | None = None,
                modality: str | None = None, sequences: Mapping[str, str] | None = None,
                **generation: Any) -> dict[str, Any]:
    """The ``params`` of a chat turn; ``generation`` may hold max_new_tokens, temperature, top_p.

    ``sequences`` maps t1c, t1, t2, flair to datastore image ids (or the server paths of sessions)
    for a BRATS study.
    """
    if not prompt or not prompt.strip():
        raise ValueError("type a question first")
    params: dict[str, Any] = {"prompt": prompt.strip(), "chat_id": chat_id}
    if axis is not None:
        params["axis"] = axis
    if slice_index is not None:
        params["slice_index"] = int(slice_index)
    if modality:
        params["modality"] = modality
    if sequences:
        params["sequences"] = dict(sequences)
    params.update({key: value for key, value in generation.items() if value is not None})
    return params


@dataclass
class TurnAnswer:
    """The server's answer to one chat turn (the infer task's JSON), plus the labelmap file if any.

    Attributes:
        labelmap_path: a local temporary file with the turn's labelmap (NIfTI, the volume's
            geometry), or None; the caller deletes it when done.
    """

    chat_id: str
    answer: str
    transcript: list[dict[str, Any]] = field(default_factory=list)
    turn: list[dict[str, Any]] = field(default_factory=list)
    experts: list[dict[str, Any]] = field(default_factory=list)
    label_names: dict[str, int] = field(default_factory=dict)
    label_colors: dict[str, list[int]] = field(default_factory=dict)
    timings: list[dict[str, Any]] = field(default_factory=list)
    vlm: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None
    slice: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False
    labelmap_path: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], labelmap_path: str | None = None) -> TurnAnswer:
        if not isinstance(data, Mapping) or "answer" not in data:
            raise ServerError("the server's answer to the chat turn has no 'answer'")
        return cls(
            chat_id=str(data.get("chat_id") or ""), answer=str(data.get("answer") or ""),
            transcript=list(data.get("transcript") or []), turn=list(data.get("turn") or []),
            experts=list(data.get("experts") or []), label_names=dict(data.get("label_names") or {}),
            label_colors=dict(data.get("label_colors") or {}), timings=list(data.get("timings") or []),
            vlm=dict(data.get("vlm") or {}), modality=data.get("modality"), slice=dict(data.get("slice") or {}),
            cancelled=bool(data.get("cancelled")), labelmap_path=labelmap_path, raw=dict(data),
        )

    @property
    def stand_in(self) -> bool:
        """True when the server's VLM runs random stand-in weights (the answer means nothing)."""
        return bool(self.vlm.get("stand_in"))

    @property
    def labelmap_expert(self) -> str | None:
        """The expert whose labelmap came back (the last one that produced labels)."""
        for call in reversed(self.experts):
            if call.get("label_names") and not call.get("error"):
                return str(call.get("expert"))
        return None


# --- the client -------------------------------------------------------------------------------------


class VilaM3Client:
    """Talks to one VILA-M3 MONAI Label server.

    Args:
        server_url: e.g. ``http://127.0.0.1:8000``.
        username, password: MONAI Label login (``POST /auth/token``), used only when the server says auth
            is enabled; the token it gives is renewed the same way when the server answers 401.
        token: a bearer token got elsewhere (e.g. from the hospital's single sign-on), sent as it is when
            auth is enabled; when the server refuses it, the user name and password are used if set.
        timeout_s: limit for quick requests (info, cancel, chat, saving labels).
        turn_timeout_s: limit for a whole turn answered at once (``ask``); experts may take minutes.
        stream_idle_timeout_s: a stream that sends nothing (not even its keep-alive each second) for
            this long is considered dead.
        connect_timeout_s: limit for opening a connection.
        download_dir: where labelmap files are written (default: the system's temporary folder).

    The client may be used from a worker thread while another thread calls :meth:`cancel`.
    """

    def __init__(self, server_url: str, username: str | None = None, password: str | None = None,
                 timeout_s: float = 30.0, turn_timeout_s: float = 900.0, stream_idle_timeout_s: float = 90.0,
                 connect_timeout_s: float = 5.0, download_dir: str | None = None, token: str | None = None):
        self.server_url = normalize_server_url(server_url)
        self.username = username or None
        self.password = password or ""
        self.timeout_s = timeout_s
        self.turn_timeout_s = turn_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.download_dir = download_dir
        self._http = requests.Session()
        self._lock = threading.Lock()
        self._auth_enabled: bool | None = None
        self._token: str | None = token or None
        self._given_token = bool(token)
        self._info: dict[str, Any] | None = None

    # --- plumbing ---------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self.server_url + (path if path.startswith("/") else "/" + path)

    def _send(self, method: str, path: str, what: str, *, params: Mapping[str, Any] | None = None,
              data: Mapping[str, Any] | None = None, files: Sequence[tuple[str, str]] = (),
              read_timeout_s: float | None = None, stream: bool = False, auth: bool = True,
              headers: Mapping[str, str] | None = None) -> requests.Response:
        """One request, with the login header when needed; a 401 fetches a new token and retries once.

        ``files`` are (form field, local path) pairs, opened for each attempt.
        """
        timeout = (self.connect_timeout_s, read_timeout_s or self.timeout_s)
        for attempt in (1, 2):
            request_headers = dict(headers or {})
            if auth:
                request_headers.update(self._auth_headers())
            handles = [(name, open(path_, "rb")) for name, path_ in files]  # noqa: SIM115 - closed below
            try:
                response = self._http.request(
                    method, self._url(path), params=params, data=data,
                    files=[(name, (_upload_name(handle.name), handle, "application/octet-stream"))
                           for name, handle in handles] or None,
                    timeout=timeout, stream=stream, headers=request_headers,
                )
            except requests.exceptions.ConnectTimeout:
                raise ServerUnavailable(f"cannot reach the server at {self.server_url} (no answer within "
                                        f"{self.connect_timeout_s:g} s)") from None
            except requests.exceptions.Timeout:
                raise RequestTimeout(f"{what}: the server at {self.server_url} did not answer within "
                                     f"{timeout[1]:g} s") from None
            except requests.exceptions.ConnectionError as err:
                raise ServerUnavailable(f"cannot reach the server at {self.server_url} ({_short_reason(err)}); "
                                        "is it running, and is the address right?") from None
            except requests.exceptions.RequestException as err:
                raise ServerError(f"{what}: {_short_reason(err)}") from None
            finally:
                for _, handle in handles:
                    handle.close()
            if response.status_code == 401 and auth and attempt == 1 and self._auth_enabled:
                response.close()
                with self._lock:
                    self._token = None  # expired or revoked: log in again
                continue
            if response.status_code >= 400:
                detail = _detail(response)
                response.close()
                raise _error_for(response.status_code, detail, what)
            return response
        raise AssertionError("unreachable")

    def _json(self, response: requests.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"{what}: the server's answer is not JSON") from None

    # --- login ------------------------------------------------------------------------------------

    def auth_enabled(self) -> bool:
        """Whether the server asks for a login (``GET /auth/``); asked once per client."""
        if self._auth_enabled is None:
            try:
                response = self._send("GET", "/auth/", "checking the login", auth=False)
                enabled = bool(self._json(response, "checking the login").get("enabled"))
            except RequestRejected as err:
                if err.status != 404:
                    raise
                enabled = False  # a server without MONAI Label's auth routes
            self._auth_enabled = enabled
        return self._auth_enabled

    def _auth_headers(self) -> dict[str, str]:
        if not self.auth_enabled():
            return {}
        with self._lock:
            if self._token is None:
                self._token = self._fetch_token()
            return {"Authorization": f"Bearer {self._token}"}

    def _fetch_token(self) -> str:
        if not self.username and self._given_token:
            raise AuthError(f"the server at {self.server_url} refused the access token (expired or not for this "
                            "server): get a new one, or set the user name and password", 401)
        if not self.username:
            raise AuthError(f"the server at {self.server_url} requires a login: set the user name and password", 401)
        what = f"logging in as '{self.username}'"
        try:
            response = self._send("POST", "/auth/token", what, auth=False,
                                  data={"username": self.username, "password": self.password})
        except VilaM3Error as err:
            if isinstance(err, (ServerUnavailable, RequestTimeout)):
                raise
            raise AuthError(f"{what} failed; check the user name and password ({err})", err.status) from None
        token = self._json(response, what).get("access_token")
        if not token:
            raise AuthError(f"{what}: the server gave no access token", response.status_code)
        return str(token)

    def log_in(self, username: str, password: str) -> None:
        """Log in now as ``username`` (``POST /auth/token``) and keep only the token: the password is not
        kept, so when the server refuses the token later (expired), requests raise :class:`AuthError`
        (401) and the caller asks for a new login."""
        with self._lock:
            self.username, self.password = username, password
            try:
                token = self._fetch_token()
            finally:
                self.username, self.password = None, ""
            self._token, self._given_token = token, True

    def log_out(self) -> None:
        """Forget the login (token, user name, password)."""
        with self._lock:
            self._token, self._given_token, self.username, self.password = None, False, None, ""

    def who_am_i(self) -> dict[str, Any]:
        """The logged-in user as the server sees the token (``GET /auth/token/valid``): ``username``,
        ``roles``, ``email``, ``name``."""
        response = self._send("GET", "/auth/token/valid", "asking the server who is logged in")
        return self._json(response, "asking the server who is logged in")

    # --- server -----------------------------------------------------------------------------------

    def info(self, refresh: bool = False) -> dict[str, Any]:
        """The app's info (``GET /info/``): name, version, ``models`` (the infer tasks) ..."""
        if self._info is None or refresh:
            response = self._send("GET", "/info/", "asking the server what it offers")
            self._info = self._json(response, "asking the server what it offers")
        return self._info

    def require_chat_task(self) -> None:
        """Raise :class:`ChatTaskUnavailable` unless the server offers the VILA-M3 chat."""
        models = self.info().get("models") or {}
        if CHAT_TASK not in models:
            offered = ", ".join(sorted(models)) or "no infer tasks"
            raise ChatTaskUnavailable(
                f"the server at {self.server_url} does not offer the VILA-M3 chat (task '{CHAT_TASK}'); "
                f"it offers {offered}. Its VLM weights are missing or it was started without it "
                "(see the server's log)")

    def datastore_images(self) -> list[str]:
        """The image ids of the server's datastore."""
        response = self._send("GET", "/datastore/", "listing the server's images", params={"output": "all"})
        objects = self._json(response, "listing the server's images").get("objects") or {}
        return sorted(objects)

    def datastore_labels(self, image_id: str) -> dict[str, dict[str, Any]]:
        """The labels the datastore keeps for an image: ``{tag: {"ext", "info"}}``."""
        response = self._send("GET", "/datastore/", "listing the server's labels", params={"output": "all"})
        objects = self._json(response, "listing the server's labels").get("objects") or {}
        if image_id not in objects:
            raise RequestRejected(f"image '{image_id}' is not in the server's datastore", 404)
        return dict(objects[image_id].get("labels") or {})

    def download_image(self, image_id: str) -> str:
        """The datastore image ``image_id`` as a temporary file (``GET /datastore/image``), named with the
        file type the datastore lists for it; the caller deletes it. A DICOM series the server keeps as
        a folder cannot be downloaded this way (the server answers 404)."""
        what = f"downloading image '{image_id}'"
        response = self._send("GET", "/datastore/", what, params={"output": "all"})
        entry = (self._json(response, what).get("objects") or {}).get(image_id)
        if entry is None:
            raise RequestRejected(f"image '{image_id}' is not in the server's datastore", 404)
        suffix = _known_suffix(str((entry.get("image") or {}).get("ext") or "")) or ".nii.gz"
        response = self._send("GET", "/datastore/image", what, params={"image": image_id},
                              read_timeout_s=self.turn_timeout_s)
        return self._write_temp(response.content, suffix, prefix="vila_m3-image-")

    # --- volumes ----------------------------------------------------------------------------------

    def create_session(self, file_paths: Sequence[str], expiry_s: int = 0, uncompress: bool = False) -> str:
        """Upload a volume (one file, or the files of a DICOM series) as a session; returns its id.

        The server keeps a session for a while (MONAI Label's session expiry, an hour by default);
        it is not added to the datastore. ``uncompress``: the one file is a ``.zip`` of a DICOM series,
        unpacked by the server.
        """
        paths = [str(path) for path in file_paths]
        if not paths:
            raise ValueError("no files to upload")
        for path in paths:
            if not os.path.isfile(path):
                raise ValueError(f"cannot upload '{path}': no such file")
        what = "sending the volume to the server"
        query = {"expiry": int(expiry_s), **({"uncompress": "true"} if uncompress else {})}
        response = self._send("PUT", "/session/", what, params=query,
                              files=[("files", path) for path in paths], read_timeout_s=self.turn_timeout_s)
        session_id = self._json(response, what).get("session_id")
        if not session_id:
            raise ServerError(f"{what}: the server gave no session id")
        return str(session_id)

    def session_info(self, session_id: str) -> dict[str, Any]:
        """A session's record (``GET /session/{id}``); its ``image`` is the file name (never a server path)."""
        what = f"reading session {session_id}"
        return self._json(self._send("GET", f"/session/{quote(session_id, safe='')}", what), what)

    def download_session_image(self, session_id: str) -> str:
        """A session's image as a temporary file (``GET /session/{id}?image=true``), named with its file
        type; the caller deletes it. A session of a DICOM series (a folder) is refused by the server (422)."""
        what = f"downloading session {session_id}"
        response = self._send("GET", f"/session/{quote(session_id, safe='')}", what, params={"image": "true"},
                              read_timeout_s=self.turn_timeout_s)
        match = re.search(r'filename="?([^";]+)"?', response.headers.get("content-disposition", ""))
        return self._write_temp(response.content, _suffix(match.group(1) if match else None),
                                prefix="vila_m3-image-")

    def upload_image(self, file_path: str, image_id: str) -> str:
        """Add a volume to the datastore as ``image_id`` (``PUT /datastore/image``); returns the id."""
        what = f"adding image '{image_id}' to the server's datastore"
        response = self._send("PUT", "/datastore/image", what, params={"image": image_id},
                              data={"params": "{}"}, files=[("file", file_path)], read_timeout_s=self.turn_timeout_s)
        return str(self._json(response, what).get("image") or image_id)

    def save_final_label(self, image_id: str, label_path: str, chat_id: str | None,
                         extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Save a corrected labelmap as the image's ``final`` label, linked to the chat it came from."""
        if not os.path.isfile(label_path):
            raise ValueError(f"no labelmap file at '{label_path}'")
        info = {"chat_id": chat_id, "source": "VILA-M3 Chat (3D Slicer)", **(extra or {})}
        what = f"saving the label of image '{image_id}'"
        response = self._send("PUT", "/datastore/label", what, params={"image": image_id, "tag": "final"},
                              data={"params": json.dumps(info)}, files=[("label", label_path)])
        return self._json(response, what)

    # --- chat ---------------------------------------------------------------------------------------

    def ask(self, study: StudyRef, params: Mapping[str, Any]) -> TurnAnswer:
        """Run one chat turn and wait for the whole answer (``POST /infer/vila_m3``)."""
        self.require_chat_task()
        what = "asking VILA-M3"
        response = self._send("POST", f"/infer/{CHAT_TASK}", what, params={**study.query(), "output": "all"},
                              data={"params": json.dumps(dict(params))}, read_timeout_s=self.turn_timeout_s)
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("multipart/"):
            try:
                parts = {part.name: part for part in parse_multipart(response.content, content_type)}
            except MultipartError as err:
                raise ServerError(f"{what}: {err}") from None
            if "params" not in parts:
                raise ServerError(f"{what}: the answer has no 'params' part")
            try:
                data = json.loads(parts["params"].text())
            except ValueError:
                raise ServerError(f"{what}: the answer's 'params' part is not JSON") from None
            label = parts.get("image")
            path = self._write_temp(label.content, _suffix(label.filename)) if label is not None else None
            return TurnAnswer.from_json(data, path)
        if content_type.startswith("application/json"):
            return TurnAnswer.from_json(self._json(response, what))
        raise ServerError(f"{what}: unexpected answer type '{content_type}'")

    def stream(self, study: StudyRef, params: Mapping[str, Any],
               on_event: Callable[[str, dict[str, Any]], None] | None = None,
               abort: threading.Event | None = None) -> TurnAnswer:
        """Run one chat turn as server-sent events (``POST /vila_m3/chat/stream``).

        ``on_event(name, data)`` is called for each event as it arrives (``queued`` with ``position``
        and ``ahead`` while the turn waits for the server's work queue, ``token``, ``expert_started``,
        ``expert_finished``, ``labelmap``, ``final``; any other event name too), on this thread. The
        labelmap, if any, is downloaded after the ``final`` event. Setting ``abort`` stops reading
        (within about a second, the server's keep-alive period); the server then cancels the turn.

        Raises:
            ServerError: the stream broke, ended without a final answer, or the server reported a failure.
            RequestRejected: the server refused the request (bad slice, unknown image ...).
        """
        self.require_chat_task()
        what = "asking VILA-M3"
        response = self._send("POST", STREAM_ROUTE, what, params=study.query(),
                              data={"params": json.dumps(dict(params))}, stream=True,
                              read_timeout_s=self.stream_idle_timeout_s, headers={"Accept": "text/event-stream"})
        parser = SSEParser()
        final: dict[str, Any] | None = None
        labels_url: str | None = None
        try:
            for chunk in response.iter_content(chunk_size=None):
                if abort is not None and abort.is_set():
                    raise StreamAborted("stopped waiting for the answer")
                for event in parser.feed(chunk):
                    try:
                        data = event.json()
                    except ValueError:
                        raise ServerError(f"{what}: the server sent an unreadable '{event.event}' event") from None
                    if event.event == "error":
                        status = int(data.get("status") or 500) if isinstance(data, dict) else 500
                        detail = str(data.get("detail") if isinstance(data, dict) else data)
                        raise _error_for(status, detail, what)
                    if on_event is not None:
                        on_event(event.event, data)
                    if event.event == "labelmap":
                        labels_url = str(data.get("url") or "") or None
                    elif event.event == "final":
                        final = data
            parser.close()
        except requests.exceptions.RequestException as err:
            raise ServerError(f"{what}: the server stopped answering in the middle of the turn "
                              f"({_short_reason(err)}); it may have stopped or restarted") from None
        finally:
            response.close()
        if final is None:
            raise ServerError(f"{what}: the server closed the stream before the turn finished "
                              "(was it stopped or restarted?)")
        path = self._download(labels_url, "downloading the labelmap") if labels_url else None
        return TurnAnswer.from_json(final, path)

    def cancel(self, chat_id: str) -> bool:
        """Stop the chat's running turn (``POST /vila_m3/chat/{id}/cancel``); False when none was running."""
        what = "stopping the turn"
        response = self._send("POST", f"{CHAT_ROUTE}/{quote(chat_id, safe='')}/cancel", what)
        return bool(self._json(response, what).get("cancelled"))

    def list_chats(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """The chats this user may reopen, newest first (``GET /vila_m3/chat/``): each ``chat_id``, ``title``
        (the first question), ``study`` (datastore image id or session id), ``session`` (True for an
        uploaded session), ``modality``, ``turns``, ``created``, ``updated`` (ISO 8601 UTC), ``owner``,
        ``has_labels``. At most ``limit`` (1 to 500), skipping the first ``offset``."""
        what = "listing the chats"
        response = self._send("GET", f"{CHAT_ROUTE}/", what, params={"limit": int(limit), "offset": int(offset)})
        chats = self._json(response, what).get("chats")
        if not isinstance(chats, list):
            raise ServerError(f"{what}: the server's answer has no list of chats")
        return [chat for chat in chats if isinstance(chat, dict) and chat.get("chat_id")]

    def get_chat(self, chat_id: str) -> dict[str, Any]:
        """A stored chat: ``messages`` (the transcript), ``study``, ``modality`` ..."""
        what = f"reading chat '{chat_id}'"
        return self._json(self._send("GET", f"{CHAT_ROUTE}/{quote(chat_id, safe='')}", what), what)

    def get_labels(self, chat_id: str) -> str:
        """The chat's last labelmap, downloaded to a temporary file; returns its path."""
        return self._download(f"{CHAT_ROUTE}/{quote(chat_id, safe='')}/labels", f"downloading the labelmap of '{chat_id}'")

    def write_report(self, chat_id: str) -> dict[str, Any]:
        """Write the chat's findings as a DICOM Structured Report (only on this explicit call).

        On a PACS the server stores the SR (and each turn's SEG) there and this returns their UIDs:
        ``StudyInstanceUID``, ``SeriesInstanceUID``, ``SOPInstanceUID``, ``segs``. For a DICOM study the
        server does not store, the SR is downloaded to a temporary ``.dcm`` file: ``{"path": ...}``.
        A NIfTI study is a RequestRejected ("a structured report needs a DICOM study").
        """
        what = f"writing the report of chat '{chat_id}'"
        response = self._send("POST", f"{CHAT_ROUTE}/{quote(chat_id, safe='')}/report", what,
                              read_timeout_s=self.turn_timeout_s)
        if response.headers.get("content-type", "").startswith("application/dicom"):
            return {"path": self._write_temp(response.content, ".dcm")}
        return self._json(response, what)

    # --- files --------------------------------------------------------------------------------------

    def _download(self, path: str, what: str) -> str:
        response = self._send("GET", path, what, read_timeout_s=self.turn_timeout_s)
        suffix = ".nii.gz"
        disposition = response.headers.get("content-disposition", "")
        match = re.search(r'filename="?([^";]+)"?', disposition)
        if match:
            suffix = _suffix(match.group(1))
        return self._write_temp(response.content, suffix)

    def _write_temp(self, content: bytes, suffix: str, prefix: str = "vila_m3-labels-") -> str:
        handle, path = tempfile.mkstemp(suffix=suffix, prefix=prefix, dir=self.download_dir)
        with os.fdopen(handle, "wb") as out:
            out.write(content)
        return path


_FILE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg")


def _known_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((suffix for suffix in _FILE_SUFFIXES if lower.endswith(suffix)), None)


def _suffix(filename: str | None) -> str:
    """The file type suffix of a name (``.nii.gz``, ``.nrrd`` ...); ``.nii.gz`` when it has none."""
    return _known_suffix(os.path.basename(filename or "")) or ".nii.gz"


def _upload_name(path: str) -> str:
    """A file name for an upload that keeps the type suffix and has no other dots (MONAI Label takes
    everything after the first dot as the extension)."""
    base = os.path.basename(path)
    suffix = _known_suffix(base) or os.path.splitext(base)[1]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", base[: len(base) - len(suffix)]).strip("_") or "volume"
    return stem + suffix.lower()
