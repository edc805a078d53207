"""One audit line for each request refused before a route ran (:class:`RefusalAuditMiddleware`).

The login (401 without a token or with a bad one), the roles (403), the body limits (413) and the form parser
(400, 415) answer before a route's own code runs, so no route writes an audit line for them. This pure ASGI
middleware sits outside all of those and writes one line, in the same file and format as the routes' lines
(:mod:`vila_m3.audit`), for a request answered with one of :data:`REFUSED` when no route wrote one:

``{"user": <the token's user if it was verified, else anonymous>, "route": <the route's template, else the path;
no query>,
"outcome": "refused", "status": 403, "method": "GET", "reason": "missing role", ...}``

Never the body, the query string (its values may name studies or patients) or the token. What the request
learnt on the way (the verified user, why the token was refused, that a route wrote its own line) reaches the
middleware through :func:`note_user`, :func:`note_refusal` and :func:`note_audited`, which write into a
per-request record held in a context variable (a dependency run in the thread pool gets a copy of the context,
which still points at the same record).

Lines are bounded (:class:`vila_m3.refusal_budget.RefusalBudget`): at most ``--conf audit_refusals_per_minute``
(default 60) per client address and reason in a minute, then one line saying how many were left out (written
at that client's next refusal for the reason in a later minute, or on shutdown), so a flood of requests without
a valid token cannot fill the audit log.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import signal
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from monailabel.config import settings
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vila_m3.audit import AuditLog
from vila_m3.refusal_budget import DEFAULT_PER_MINUTE, RefusalBudget, Suppressed

logger = logging.getLogger(__name__)

#: Statuses that mean "refused before the route": the reason written when nothing more precise was noted.
REFUSED: dict[int, str] = {
    400: "malformed request",
    401: "login required",
    403: "missing role",
    413: "body too large",
    415: "unsupported media type",
    501: "not offered",  # MONAI Label routes this server refuses (batch infer, scoring, train all)
}
MAX_PATH_CHARS = 200
MAX_PER_MINUTE = 1_000_000


def refusals_per_minute(conf: Mapping[str, str]) -> int:
    """``--conf audit_refusals_per_minute``: refusal lines per client and reason in a minute (default 60);
    ValueError names a bad value."""
    text = conf.get("audit_refusals_per_minute")
    if text is None or str(text).strip() == "":
        return DEFAULT_PER_MINUTE
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"--conf audit_refusals_per_minute must be a whole number, got {text!r}") from None
    if not 1 <= value <= MAX_PER_MINUTE:
        raise ValueError(f"--conf audit_refusals_per_minute must be 1 to {MAX_PER_MINUTE}, got {text!r}")
    return value


@dataclass
class RequestNote:
    """What one request's handling noted for its refusal line."""

    user: str | None = None
    reason: str | None = None
    audited: bool = False


_NOTE: contextvars.ContextVar[RequestNote | None] = contextvars.ContextVar("vila_m3_request_note", default=None)


def note_user(username: str | None) -> None:
    """The user whose token was verified for this request (named in a refusal line, e.g. a 403)."""
    note = _NOTE.get()
    if note is not None and username:
        note.user = username


def note_refusal(reason: str) -> None:
    """Why this request is being refused (a short fixed text, e.g. ``token not valid``; never client input)."""
    note = _NOTE.get()
    if note is not None:
        note.reason = reason


def note_audited() -> None:
    """A route wrote this request's audit line: the middleware writes none."""
    note = _NOTE.get()
    if note is not None:
        note.audited = True


def loggable_path(scope: Scope) -> str:
    """The matched route's template (``/session/{session_id}``: no chat or session ids in the line) where the
    request got as far as routing, else its path; printable ASCII, at most :data:`MAX_PATH_CHARS` characters."""
    template = getattr(scope.get("route"), "path", None)
    path = template if isinstance(template, str) and template else str(scope.get("path", ""))
    return ascii(path[:MAX_PATH_CHARS])[1:-1] or "/"


class RefusalAuditMiddleware:
    """Write one audit line for a request answered 400/401/403/413/415 without a route's own line.

    Args:
        log: the server's audit log (lib/audit_hooks.py ``open_audit_log``).
        per_minute: lines per client address and reason in a minute (:func:`refusals_per_minute`).
        budget: the bound itself (tests pass one with their own clock); made from ``per_minute`` when None.
    """

    def __init__(self, app: ASGIApp, log: AuditLog, per_minute: int = DEFAULT_PER_MINUTE,
                 budget: RefusalBudget | None = None) -> None:
        self.app = app
        self.log = log
        self.budget = budget or RefusalBudget(per_minute)
        _LIVE.add(self)  # its suppressed counts are written on shutdown (:func:`_flush_all`)
        _flush_on_stop_signals()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note = RequestNote()
        token = _NOTE.set(note)
        started = time.perf_counter()

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":  # the line is on file before the client has the answer
                status = int(message["status"])
                if status in REFUSED and not note.audited:
                    self.write(scope, status, note, time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            _NOTE.reset(token)

    def write(self, scope: Scope, status: int, note: RequestNote, duration_s: float) -> None:
        """The refusal's line, unless this client's budget for the reason is spent this minute (then counted);
        a line that cannot be written is logged and the answer stands."""
        user = note.user if settings.MONAI_LABEL_AUTH_ENABLE and note.user else "anonymous"
        reason = note.reason or REFUSED[status]
        route, method = loggable_path(scope), str(scope.get("method", "?"))[:16]
        client = scope.get("client")
        address = str(client[0]) if client else "?"
        try:
            admitted, due = self.budget.admit(address, reason, last=(user, route, status, method))
            self.write_suppressed(due)
            if admitted:
                self.log.record(user=user, route=route, outcome="refused", status=status, method=method,
                                reason=reason, duration_s=duration_s)
        except Exception:
            logger.exception("the audit line of a refused request could not be written")

    def write_suppressed(self, due: list[Suppressed]) -> None:
        """One line per client, reason and minute whose lines were left out: how many, and from when."""
        for item in due:
            user, route, status, method = item.last
            minute = datetime.fromtimestamp(item.minute_start, UTC).strftime("%Y-%m-%d %H:%M")
            self.log.record(user=user, route=route, outcome="refused", status=status, method=method,
                            reason=f"{item.reason}: {item.count} more refusal line(s) from this client suppressed "
                                   f"in the minute from {minute} UTC (at most {self.budget.per_minute} a minute)")

    def flush(self) -> None:
        """Write the counts still held (on shutdown)."""
        try:
            self.write_suppressed(self.budget.flush())
        except Exception:
            logger.exception("the suppressed refusal counts could not be written")


_LIVE: weakref.WeakSet[RefusalAuditMiddleware] = weakref.WeakSet()


_STOP_HOOKED = False


@atexit.register
def _flush_all() -> None:
    """At the process's end: the suppressed counts of every middleware still alive."""
    for middleware in list(_LIVE):
        middleware.flush()


def _flush_on_stop_signals() -> None:
    """Write the counts when the server is told to stop (SIGTERM, SIGINT), once per process.

    Uvicorn stops on these signals and then raises them again with their default action, which ends the
    process without running :mod:`atexit` handlers; so its handlers are wrapped: ours asks the event loop to
    write the counts (never from inside the signal handler, which may have interrupted a write) and hands the
    signal on. Only from the main thread with a running loop (MONAI Label's lifespan start), and only where a
    handler is already installed (else nothing is changed)."""
    global _STOP_HOOKED
    if _STOP_HOOKED or threading.current_thread() is not threading.main_thread():
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    _STOP_HOOKED = True
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue

        def on_stop(number: int, frame: object, previous: Callable[[int, object], object] = previous) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_flush_all)
            previous(number, frame)

        signal.signal(signum, on_stop)
