"""Request body size limits per route prefix, enforced while the body streams in (HTTP 413).

A pure ASGI middleware: a request whose ``Content-Length`` is over its route's limit is answered 413 before
any of its body is read; one without (chunked) is counted as its chunks arrive and answered 413 as soon as
the count passes the limit, so the rest of it is never read, parsed or spooled to disk.

Limits come from the app's ``--conf`` (see ``limits_from_conf``): uploads (``/infer``, ``/session``,
``/datastore``, ``/model``, the DICOMweb ``/proxy``) get ``max_upload_mb``, every other route (the chat
routes, ``/train``, ...) ``max_request_kb``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from monailabel.config import settings
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOO_LARGE = 413
DEFAULT_MAX_UPLOAD_MB = 1024.0  # a CT series of a few thousand slices, or a zipped DICOM study
DEFAULT_MAX_REQUEST_KB = 1024.0  # JSON and form fields only
UPLOAD_PREFIXES = ("/infer", "/session", "/datastore", "/model", "/proxy")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes its limit (FastAPI re-raises HTTP exceptions met while
    reading a body, so it reaches the middleware however the body was being read)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=TOO_LARGE, detail=detail)


def describe(limit_bytes: int) -> str:
    """``limit_bytes`` in words, e.g. ``1 MB`` or ``512 KB``."""
    if limit_bytes >= 2**20:
        return f"{limit_bytes / 2**20:g} MB"
    return f"{limit_bytes / 2**10:g} KB"


def limits_from_conf(conf: Mapping[str, str]) -> tuple[dict[str, int], int]:
    """(limit in bytes per route prefix, limit in bytes for other routes) from ``max_upload_mb`` and
    ``max_request_kb``; raises ValueError naming the key for a value that is not a positive number."""
    def positive(key: str, default: float) -> float:
        raw = conf.get(key)
        try:
            value = float(raw) if raw not in (None, "") else default
        except ValueError:
            raise ValueError(f"--conf {key} must be a positive number, got {raw!r}") from None
        if not value > 0 or value == float("inf"):
            raise ValueError(f"--conf {key} must be a positive number, got {raw!r}")
        return value

    upload = int(positive("max_upload_mb", DEFAULT_MAX_UPLOAD_MB) * 2**20)
    other = int(positive("max_request_kb", DEFAULT_MAX_REQUEST_KB) * 2**10)
    api = settings.MONAI_LABEL_API_STR.rstrip("/")
    return {f"{api}{prefix}": upload for prefix in UPLOAD_PREFIXES}, other


class BodyLimitMiddleware:
    """Answer 413 (JSON ``detail``) to a request whose body is over its route's limit.

    Args:
        limits: bytes allowed per path prefix (``/infer`` covers ``/infer`` and ``/infer/...``).
        default_bytes: bytes allowed on every other path.
    """

    def __init__(self, app: ASGIApp, limits: Mapping[str, int], default_bytes: int) -> None:
        self.app = app
        self.limits = sorted(limits.items(), key=lambda item: len(item[0]), reverse=True)
        self.default_bytes = default_bytes

    def limit_for(self, path: str) -> int:
        """The limit in bytes of a request to ``path``."""
        for prefix, limit in self.limits:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return limit
        return self.default_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        detail = f"request body too large: the limit of this route is {describe(limit)}"
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await _answer(send, detail)  # before reading any of the body
            return

        received = 0
        exceeded = False
        app_started = False

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge(detail)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge(detail)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal app_started
            if exceeded and not app_started:
                return  # whatever the app makes of the cut-off body, the answer is ours
            if message["type"] == "http.response.start":
                app_started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not exceeded or app_started:
                raise
        if exceeded and not app_started:
            await _answer(send, detail)


async def _answer(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": TOO_LARGE,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})
