"""One lock per chat that lets its turns in strictly in arrival order (``threading.Lock`` is not fair: a
turn that arrives later may get it first), and lets a turn that waits be cancelled."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

_POLL_S = 0.05  # how often a waiting turn looks at its cancel event (seconds)


class TurnCancelledWaiting(Exception):
    """A turn was cancelled while it waited for an earlier turn of its chat; it never started."""


class ChatLocks:
    """First come, first served locks by chat id; a chat's entry is dropped when no turn holds or wants it."""

    def __init__(self) -> None:
        self._lines: dict[str, deque[threading.Event]] = {}
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, chat_id: str, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold ``chat_id``'s lock for the block, after every turn that asked before; raises
        :class:`TurnCancelledWaiting` if ``cancel`` is set while waiting."""
        mine = threading.Event()
        with self._guard:
            line = self._lines.setdefault(chat_id, deque())
            line.append(mine)
            if line[0] is mine:
                mine.set()
        while not mine.wait(_POLL_S):
            if cancel is not None and cancel.is_set():
                with self._guard:
                    if not mine.is_set():  # still waiting: leave the line
                        line.remove(mine)
                        raise TurnCancelledWaiting(f"chat '{chat_id}': cancelled while an earlier turn ran")
                break  # it became ours meanwhile: hold it as usual, the turn sees the cancel itself
        try:
            yield
        finally:
            with self._guard:
                line.popleft()
                if line:
                    line[0].set()
                elif self._lines.get(chat_id) is line:
                    del self._lines[chat_id]

    def waiting(self, chat_id: str) -> int:
        """Turns of ``chat_id`` holding or waiting for its lock."""
        with self._guard:
            return len(self._lines.get(chat_id, ()))
