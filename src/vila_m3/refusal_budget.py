"""A bound on the audit lines of refused requests: at most ``per_minute`` lines per client and reason in each
minute, then one line saying how many were left out (:class:`RefusalBudget`).

A flood of requests without a valid token would otherwise write one audit line each and fill the audit log.
Minutes are the clock's whole minutes (``floor(time / 60)``); the count of a minute's suppressed lines is handed
back when that client's next refusal for the same reason arrives in a later minute, when the client is evicted
(at most ``max_clients`` pairs are tracked, the least recently refused goes first), or by :meth:`flush` (on
shutdown). Thread-safe; memory is bounded by ``max_clients``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PER_MINUTE = 60
DEFAULT_MAX_CLIENTS = 10_000


@dataclass(frozen=True)
class Suppressed:
    """``count`` refusal lines of one client and reason left out in the minute starting at ``minute_start``
    (seconds since the epoch); ``last`` is what the caller passed with the last one left out (route, status...)."""

    reason: str
    count: int
    minute_start: float
    last: Any = None


@dataclass
class _Window:
    minute: int
    written: int = 0
    suppressed: int = 0
    last: Any = field(default=None)


class RefusalBudget:
    """How many refusal lines each (client, reason) may still write this minute.

    Args:
        per_minute: lines written per client and reason in one minute (>= 1).
        max_clients: (client, reason) pairs tracked at most; the least recently refused is evicted first.
        clock: seconds since the epoch (``time.time``; a test passes its own).
    """

    def __init__(self, per_minute: int = DEFAULT_PER_MINUTE, max_clients: int = DEFAULT_MAX_CLIENTS,
                 clock: Callable[[], float] = time.time):
        if per_minute < 1 or max_clients < 1:
            raise ValueError("per_minute and max_clients must be >= 1")
        self.per_minute = per_minute
        self.max_clients = max_clients
        self.clock = clock
        self._windows: OrderedDict[tuple[str, str], _Window] = OrderedDict()
        self._lock = threading.Lock()

    def admit(self, client: str, reason: str, last: Any = None) -> tuple[bool, list[Suppressed]]:
        """Whether this refusal's line is written, and the counts of earlier minutes to write first (in order).

        Args:
            client: the client's address.
            reason: the refusal's reason (a short fixed text).
            last: kept with a suppressed line and handed back in its :class:`Suppressed` (e.g. route and status).
        """
        minute = int(self.clock() // 60)
        due: list[Suppressed] = []
        key = (client, reason)
        with self._lock:
            window = self._windows.get(key)
            if window is not None and window.minute != minute:
                due.extend(self._take(key[1], window))
                window = None
            if window is None:
                window = self._windows[key] = _Window(minute)
                while len(self._windows) > self.max_clients:
                    old_key, old = self._windows.popitem(last=False)
                    due.extend(self._take(old_key[1], old))
            self._windows.move_to_end(key)
            if window.written < self.per_minute:
                window.written += 1
                return True, due
            window.suppressed += 1
            window.last = last
            return False, due

    def flush(self) -> list[Suppressed]:
        """The counts not yet handed back (all minutes, all clients), which are then cleared (on shutdown)."""
        with self._lock:
            due = [item for (_, reason), window in self._windows.items() for item in self._take(reason, window)]
            self._windows.clear()
        return due

    def tracked(self) -> int:
        """The number of (client, reason) pairs held now."""
        with self._lock:
            return len(self._windows)

    @staticmethod
    def _take(reason: str, window: _Window) -> list[Suppressed]:
        if not window.suppressed:
            return []
        item = Suppressed(reason, window.suppressed, window.minute * 60.0, window.last)
        window.suppressed = 0
        return [item]
