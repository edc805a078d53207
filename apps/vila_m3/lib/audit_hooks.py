"""The audit trail (:mod:`vila_m3.audit`) wired into the routes that run models.

``POST /infer/{model}`` (every model: the chat and the experts) and ``POST /vila_m3/chat/stream`` each open
one :class:`AuditEvent` per request with :meth:`AuditTrail.event`; the route hands it the answer JSON when
there is one (:meth:`AuditEvent.note_answer`) and the event writes exactly one line when the request ends,
whatever the outcome (:meth:`AuditEvent.finish`, or :func:`audited` around a route's body, which records a
4xx/5xx or a dropped connection too).

What a line holds (fields of :data:`vila_m3.audit.FIELDS`): the user (``anonymous`` with login off, where
MONAI Label's default user would say ``admin``), the route template with the model (``/infer/vista3d``,
``/vila_m3/chat/stream``), the chat and study ids hashed, the model that answered (the chat: the VLM's name
from the turn's ``vlm`` and its version, stand-in or not; an expert: the expert, stand-in or not), the
experts run with their arguments, the time the turn waited for the work queue, the duration in seconds,
the outcome (``ok``, ``cancelled``, ``failed``) and the HTTP status the client got (for a stream, the
status of its ``error`` event, else 200) and the method. Requests refused before a route ran (login, roles,
body limits) get their line from lib/audit_refusals.py. Never prompt text, file names or anything from the image's
headers: the study is the client's id, hashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings

from lib.audit_refusals import note_audited
from vila_m3.audit import DEFAULT_MAX_BYTES, AuditLog

logger = logging.getLogger(__name__)

#: Status recorded when the client closed the connection before an answer was sent (nginx's convention).
CLIENT_CLOSED = 499
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

_LOGS: dict[str, AuditLog] = {}  # one writer per file in this process (POST /reload builds a new app instance)
_LOGS_LOCK = threading.Lock()


def audit_settings(app_dir: str | Path, conf: Mapping[str, str]) -> tuple[Path, int]:
    """(file, rotation size in bytes) from ``--conf audit_log`` (default ``<app_dir>/logs/audit.jsonl``) and
    ``--conf audit_log_max_mb`` (default 10; 0 never rotates); ValueError names a bad size."""
    path = Path(conf.get("audit_log") or Path(app_dir) / "logs" / "audit.jsonl")
    text = conf.get("audit_log_max_mb")
    if text is None or text == "":
        return path, DEFAULT_MAX_BYTES
    try:
        megabytes = float(text)
    except ValueError:
        raise ValueError(f"--conf audit_log_max_mb must be a number of MB (0 = never rotate), got {text!r}") from None
    if not 0 <= megabytes <= 1024 * 1024:
        raise ValueError(f"--conf audit_log_max_mb must be 0 (never rotate) to 1048576 MB, got {text!r}")
    return path, int(megabytes * 1024 * 1024)


def open_audit_log(app_dir: str | Path, conf: Mapping[str, str]) -> AuditLog:
    """The process's writer of the configured audit file (created with its folder on first use)."""
    path, max_bytes = audit_settings(app_dir, conf)
    key = str(path.resolve())
    with _LOGS_LOCK:
        log = _LOGS.get(key)
        if log is None:
            log = _LOGS[key] = AuditLog(path, max_bytes=max_bytes)
            logger.info("audit log: %s (rotates at %s)", path.name,
                        f"{max_bytes / 1024 / 1024:g} MB" if max_bytes else "never")
        return log


def audit_user(user: Any) -> str:
    """Who the line is about: the signed-in user's name (the token's subject), ``anonymous`` with login off."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return "anonymous"
    name = getattr(user, "username", None)
    return name if isinstance(name, str) and name else "anonymous"


def infer_route_name(model: str) -> str:
    """``/infer/<model>`` for a model name of letters, digits, ``_``, ``-`` and ``.`` (at most 64), else the
    template ``/infer/{model}`` (a client's odd text never reaches the line)."""
    return f"/infer/{model}" if _MODEL_NAME.fullmatch(model or "") else "/infer/{model}"


def chat_id_of(params: str | None) -> str | None:
    """The ``chat_id`` of a request's form ``params`` (JSON text) if it names one; None otherwise."""
    try:
        given = json.loads(params) if params else None
    except (ValueError, TypeError):
        return None
    value = given.get("chat_id") if isinstance(given, dict) else None
    return value if isinstance(value, str) and value else None


def _queue_wait(answer: Mapping[str, Any]) -> float | None:
    """Seconds the work waited for the model queue, as the answer reports it (a turn's ``queue wait`` step, an
    expert's ``latencies.queue``); None where it does not (a cached expert result never queues)."""
    latencies = answer.get("latencies")
    value = answer.get("queue_wait_s", latencies.get("queue") if isinstance(latencies, dict) else None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    waits = [step.get("seconds") for step in answer.get("timings") or () if isinstance(step, dict)
             and step.get("step") in ("queue", "queued", "queue wait")]
    waits = [float(seconds) for seconds in waits if isinstance(seconds, (int, float))]
    return sum(waits) if waits else None


@dataclass
class AuditEvent:
    """One request that runs a model; writes its line once, at :meth:`finish`."""

    log: AuditLog
    route: str
    user: str
    model: str | None = None
    chat_id: str | None = None
    study_id: str | None = None
    started: float = field(default_factory=time.perf_counter)
    answer: dict[str, Any] | None = None
    line: dict[str, Any] | None = None  # as written, once finished
    method: str = "POST"  # every audited route is a POST

    def note_answer(self, answer: Any) -> None:
        """The answer JSON the client gets (the turn's or the expert's); its model and experts go in the line."""
        if isinstance(answer, dict):
            self.answer = answer

    def finish(self, status: int, outcome: str | None = None) -> None:
        """Write the line (only the first call writes). ``outcome`` defaults to ``failed`` for a 4xx/5xx, else
        ``cancelled`` when the answer says so, else ``ok``. A line that cannot be written is logged, and the
        request's own answer stands."""
        if self.line is not None:
            return
        note_audited()  # this request has its line: lib/audit_refusals.py writes no second one
        answer = self.answer or {}
        if outcome is None:
            outcome = "failed" if status >= 400 else "cancelled" if answer.get("cancelled") else "ok"
        model, version, stand_in, experts = self._models(answer)
        chat_id = answer.get("chat_id") if isinstance(answer.get("chat_id"), str) else self.chat_id
        try:
            self.line = self.log.record(
                user=self.user, route=self.route, outcome=outcome, status=status, chat_id=chat_id,
                study_id=self.study_id, model=model, model_version=version, stand_in=stand_in, experts=experts,
                queue_wait_s=_queue_wait(answer), duration_s=time.perf_counter() - self.started,
                method=self.method)
        except Exception:
            self.line = {}
            logger.exception("the audit line of %s could not be written", self.route)

    def _models(self, answer: Mapping[str, Any]) -> tuple[str | None, str | None, bool | None, list[dict[str, Any]]]:
        """(model, version, stand-in, experts run) of an answer; the route's model alone when there is none."""
        vlm = answer.get("vlm")
        if isinstance(vlm, dict):  # a chat turn
            experts = [{"name": call.get("expert"), "argument": call.get("argument")}
                       for call in answer.get("experts") or () if isinstance(call, dict)]
            version = vlm.get("version")
            return (str(vlm.get("name") or self.model), None if version is None else str(version),
                    bool(vlm.get("stand_in")), experts)
        if isinstance(answer.get("expert"), str):  # an expert's infer
            argument = answer.get("argument")
            if argument is None and answer.get("label_names"):
                argument = ",".join(str(label) for label in sorted(answer["label_names"].values()))
            return (answer["expert"], None, bool(answer.get("stand_in")),
                    [{"name": answer["expert"], "argument": argument}])
        return self.model, None, None, []


class AuditTrail:
    """Opens the audit events of one server (:meth:`event`)."""

    def __init__(self, log: AuditLog):
        self.log = log

    def event(self, route: str, user: Any, *, model: str | None = None, chat_id: str | None = None,
              study_id: str | None = None) -> AuditEvent:
        return AuditEvent(self.log, route, audit_user(user), model=model, chat_id=chat_id, study_id=study_id or None)


@contextlib.contextmanager
def audited(event: AuditEvent, status: int | None = 200) -> Iterator[AuditEvent]:
    """Finish ``event`` when the block ends: ``status`` if it returns (None: the caller finishes it later, e.g.
    when a stream ends), the HTTPException's status if it raises one, 499 cancelled if the client went away,
    else 500."""
    try:
        yield event
    except HTTPException as err:
        event.finish(err.status_code)
        raise
    except asyncio.CancelledError:
        event.finish(CLIENT_CLOSED, "cancelled")
        raise
    except BaseException:
        event.finish(500)
        raise
    else:
        if status is not None:
            event.finish(status)
