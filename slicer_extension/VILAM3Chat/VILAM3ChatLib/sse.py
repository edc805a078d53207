"""An incremental parser of ``text/event-stream`` (server-sent events).

Follows the WHATWG event-stream rules that matter for a client: lines end with CRLF, LF or CR;
a blank line dispatches the event; lines starting with ``:`` are comments (keep-alives); a field
line is ``name: value`` (one space after the colon is dropped); several ``data`` lines are joined
with newlines; an event without data is not dispatched. Input may arrive in any pieces: a line,
a CRLF pair or a UTF-8 character split between two network reads is put back together.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["ServerSentEvent", "SSEParser"]

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class ServerSentEvent:
    """One dispatched event: its type (``message`` when the stream names none), data and id."""

    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        """The data parsed as JSON (raises ``ValueError`` when it is not JSON)."""
        return json.loads(self.data)


class SSEParser:
    """Feed it bytes (or text) as they arrive; it returns the events completed so far.

    Attributes:
        comments: number of comment lines seen (the server's ``: keep-alive`` lines).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._started = False
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._last_id: str | None = None
        self.comments = 0

    def feed(self, chunk: bytes | str) -> list[ServerSentEvent]:
        """Parse one piece of the stream; returns the events it completed, in order."""
        text = self._decoder.decode(chunk) if isinstance(chunk, (bytes, bytearray)) else chunk
        if not self._started and text:
            text = text.removeprefix("\ufeff")
            self._started = True
        self._buffer += text
        return self._drain(final=False)

    def close(self) -> list[ServerSentEvent]:
        """End of stream: complete a last line without its line end. An event that was never
        terminated by a blank line is dropped, as the event-stream rules say."""
        self._buffer += self._decoder.decode(b"", final=True)
        events = self._drain(final=True)
        self._reset_event()
        return events

    def _drain(self, final: bool) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        while True:
            cut = _line_end(self._buffer, final)
            if cut is None:
                break
            line, self._buffer = self._buffer[: cut[0]], self._buffer[cut[1]:]
            event = self._line(line)
            if event is not None:
                events.append(event)
        if final and self._buffer:
            line, self._buffer = self._buffer, ""
            self._line(line)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None  # "retry" and unknown fields are ignored

    def _dispatch(self) -> ServerSentEvent | None:
        if self._id is not None:
            self._last_id = self._id
        if not self._data:
            self._reset_event()
            return None
        event = ServerSentEvent(self._event or "message", "\n".join(self._data), self._last_id)
        self._reset_event()
        return event

    def _reset_event(self) -> None:
        self._event = ""
        self._data = []
        self._id = None


def _line_end(buffer: str, final: bool) -> tuple[int, int] | None:
    """(end of the first line, start of the next) in ``buffer``, or None while the line is incomplete.

    A CR at the very end of the buffer may be the first half of a CRLF pair: wait for more input
    unless the stream has ended.
    """
    match = _LINE_END.search(buffer)
    if match is None:
        return None
    if match.group() == "\r" and match.end() == len(buffer) and not final:
        return None
    return match.start(), match.end()
