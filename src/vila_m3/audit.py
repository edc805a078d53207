"""The audit trail: one JSON line per chat turn, per expert infer and per refused request, for the people who
run the server.

A line says who did what, when, with which model, and how it ended; it never holds prompt text
(the chat store has that), patient names, or the ids clients use for chats and studies: those are
hashed (:func:`hashed`), so lines of one chat or one study can be grouped without naming them.
Lines are written through :class:`logging.handlers.RotatingFileHandler`, which flushes each line
as it is written (a crash loses at most the line being written) and rotates the file by size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
#: The fields every line carries, in this order (``None`` where a field does not apply).
FIELDS = ("time", "user", "route", "chat", "study", "model", "model_version", "stand_in", "experts",
          "queue_wait_s", "duration_s", "outcome", "status", "method", "reason")
#: ``refused``: a request answered before any route ran (login, role, body limits); ``reason`` says why.
OUTCOMES = ("ok", "cancelled", "failed", "refused")


def hashed(value: str | None) -> str | None:
    """A short stable stand-in for an id (sha256, 16 hex characters); ``None`` stays ``None``."""
    if value is None or value == "":
        return None
    return hashlib.sha256(str(value).encode("utf-8", "surrogatepass")).hexdigest()[:16]


class AuditLog:
    """Appends audit lines to ``path`` (created with its folder), rotating at ``max_bytes``.

    Args:
        path: the log file, e.g. ``<app>/logs/audit.jsonl``.
        max_bytes: size at which the file is rotated (``audit.jsonl.1`` ...); 0 never rotates.
        backups: rotated files kept.
    """

    def __init__(self, path: Path | str, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def record(self, *, user: str | None, route: str, outcome: str, status: int, chat_id: str | None = None,
               study_id: str | None = None, model: str | None = None, model_version: str | None = None,
               stand_in: bool | None = None, experts: list[dict[str, Any]] | None = None,
               queue_wait_s: float | None = None, duration_s: float | None = None, method: str | None = None,
               reason: str | None = None) -> dict[str, Any]:
        """Append one line and return it as written. ``outcome`` is one of :data:`OUTCOMES`; ``status`` is the
        HTTP status the client got; ``chat_id`` and ``study_id`` are hashed here; times are in seconds;
        ``method`` is the HTTP method, ``reason`` a short fixed text for a refusal (never client input)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {OUTCOMES}, got {outcome!r}")
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "user": user or "anonymous",
            "route": route,
            "chat": hashed(chat_id),
            "study": hashed(study_id),
            "model": model,
            "model_version": model_version,
            "stand_in": stand_in,
            "experts": [{"name": e.get("name"), "argument": e.get("argument")} for e in experts or []],
            "queue_wait_s": None if queue_wait_s is None else round(queue_wait_s, 4),
            "duration_s": None if duration_s is None else round(duration_s, 4),
            "outcome": outcome,
            "status": int(status),
            "method": method,
            "reason": reason,
        }
        text = json.dumps(line, ensure_ascii=True)
        self._handler.handle(logging.makeLogRecord({"msg": text, "levelno": logging.INFO, "levelname": "INFO"}))
        return line

    def close(self) -> None:
        self._handler.close()
