"""A scripted stand-in for an OpenAI-compatible server (``/v1/chat/completions``, ``/v1/models``).

Runs ``http.server.ThreadingHTTPServer`` on 127.0.0.1 (port 0) in a thread. Each POST is recorded
(path, headers, parsed JSON body) and answered with the next scripted :class:`Reply`: a JSON body,
a server-sent event stream (HTTP/1.1 chunked, one chunk per event, optional pauses), or an error
``{"error": {"message": ...}}``; an optional delay comes before the status line.

A scripted answer may be a tool call: :func:`tool_call_completion` puts ``message.tool_calls`` in a
JSON answer, :func:`tool_call_sse` streams them as vLLM and OpenAI do (the id, type and name in the
first delta of each call, the arguments string split over several later deltas, then
``finish_reason: tool_calls``). :attr:`Recorded.tools` is the ``tools`` list a request offered.
:meth:`FakeOpenAIServer.respond` answers from the request itself once the scripted replies run out.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeOpenAIServer", "Recorded", "Reply", "completion", "error", "sse", "stream_events",
           "tool_call_completion", "tool_call_events", "tool_call_sse"]


@dataclass
class Reply:
    """One scripted answer.

    Attributes:
        status: HTTP status.
        json_body: a JSON answer (``Content-Type: application/json``).
        events: an SSE answer: dicts are sent as ``data: <json>``, strings as they are (``": ping"``,
            ``"data: [DONE]"``); each event is followed by a blank line.
        raw_body: a raw answer (bytes or text) with ``content_type``.
        content_type: Content-Type of ``raw_body``.
        delay_s: pause before the status line (seconds).
        event_delay_s: pause after each event (seconds).
        headers: further response headers.
    """

    status: int = 200
    json_body: Any = None
    events: list[dict[str, Any] | str] | None = None
    raw_body: bytes | str | None = None
    content_type: str = "text/plain"
    delay_s: float = 0.0
    event_delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    """A request as the server saw it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        """The ``tools`` the request offered the model (None: none)."""
        return self.body.get("tools") if isinstance(self.body, dict) else None

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The request's chat ``messages``."""
        return list(self.body.get("messages") or []) if isinstance(self.body, dict) else []


def completion(text: str, finish_reason: str = "stop", usage: dict[str, int] | None = None) -> Reply:
    """A non-streamed chat completion."""
    body: dict[str, Any] = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return Reply(json_body=body)


def stream_events(
    pieces: list[str], finish_reason: str | None = "stop", usage: dict[str, int] | None = None, done: bool = True
) -> list[dict[str, Any] | str]:
    """SSE events as vLLM sends them: a role-only delta, one delta per piece, the finish, usage, ``[DONE]``."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    events: list[dict[str, Any] | str] = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in pieces]
    if finish_reason is not None:
        events.append(chunk({}, finish_reason))
    if usage is not None:
        events.append({"id": "chatcmpl-test", "object": "chat.completion.chunk", "choices": [], "usage": usage})
    if done:
        events.append("data: [DONE]")
    return events


ToolCallSpec = tuple[str, str]
"""A scripted call: (function name, JSON arguments string as the model writes it)."""


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "fake",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def tool_call_completion(calls: list[ToolCallSpec], text: str | None = None) -> Reply:
    """A non-streamed answer with ``message.tool_calls`` (ids ``call_0``, ``call_1``...), content ``text``."""
    tool_calls = [{"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
                  for i, (name, arguments) in enumerate(calls)]
    body = {"id": "chatcmpl-test", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": tool_calls},
                         "finish_reason": "tool_calls"}]}
    return Reply(json_body=body)


def tool_call_events(calls: list[ToolCallSpec], pieces: list[str] = (), arguments_chunk: int = 5,
                     done: bool = True) -> list[dict[str, Any] | str]:
    """SSE events of an answer with tool calls: text ``pieces`` first, then per call a delta with
    ``index``, ``id``, ``type`` and ``function.name`` (arguments ``""``), then the arguments string in
    pieces of ``arguments_chunk`` characters (deltas with ``index`` and ``function.arguments`` only),
    then ``finish_reason: tool_calls`` and ``[DONE]``."""
    events: list[dict[str, Any] | str] = [_chunk({"role": "assistant", "content": ""})]
    events += [_chunk({"content": piece}) for piece in pieces]
    for index, (name, arguments) in enumerate(calls):
        events.append(_chunk({"tool_calls": [{"index": index, "id": f"call_{index}", "type": "function",
                                              "function": {"name": name, "arguments": ""}}]}))
        for start in range(0, len(arguments), arguments_chunk):
            piece = arguments[start:start + arguments_chunk]
            events.append(_chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    events.append(_chunk({}, "tool_calls"))
    if done:
        events.append("data: [DONE]")
    return events


def tool_call_sse(calls: list[ToolCallSpec], pieces: list[str] = (), arguments_chunk: int = 5, **kwargs: Any) -> Reply:
    """A streamed answer with tool calls (see :func:`tool_call_events`)."""
    return Reply(events=tool_call_events(calls, list(pieces), arguments_chunk), **kwargs)


def sse(pieces: list[str], event_delay_s: float = 0.0, **kwargs: Any) -> Reply:
    """A streamed chat completion (see :func:`stream_events` for ``kwargs``)."""
    return Reply(events=stream_events(pieces, **kwargs), event_delay_s=event_delay_s)


def error(status: int, message: str, **kwargs: Any) -> Reply:
    """An OpenAI-style error answer ``{"error": {"message": ...}}``."""
    return Reply(status=status, json_body={"error": {"message": message, "type": "BadRequestError", "code": status}}, **kwargs)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: FakeOpenAIServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (cancel, timeouts) are expected here: stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """No request log on stderr."""

    def do_GET(self) -> None:
        owner = self.server.owner
        owner._record(Recorded("GET", self.path, {k.lower(): v for k, v in self.headers.items()}, None))
        if self.path.rstrip("/").endswith("/models"):
            self._send(Reply(json_body={"object": "list", "data": [{"id": name, "object": "model"} for name in owner.models]}))
        else:
            self._send(error(404, f"no route {self.path}"))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw.decode("utf-8"))
        except ValueError:
            body = raw
        owner = self.server.owner
        recorded = Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        owner._record(recorded)
        self._send(owner._next_reply(recorded))

    def _send(self, reply: Reply) -> None:
        if reply.delay_s:
            time.sleep(reply.delay_s)
        try:
            if reply.events is not None:
                self._send_events(reply)
                return
            if reply.json_body is not None:
                payload, content_type = json.dumps(reply.json_body).encode("utf-8"), "application/json"
            else:
                raw = reply.raw_body or b""
                payload = raw.encode("utf-8") if isinstance(raw, str) else raw
                content_type = reply.content_type
            self.send_response(reply.status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            self.server.owner.disconnected.set()
            self.close_connection = True

    def _send_events(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        owner = self.server.owner
        for event in reply.events or []:
            text = event if isinstance(event, str) else "data: " + json.dumps(event)
            self._write_chunk((text + "\n\n").encode("utf-8"))
            owner.events_sent += 1
            if reply.event_delay_s:
                time.sleep(reply.event_delay_s)
        self._write_chunk(b"")
        owner.streams_completed += 1

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode("ascii") + data + b"\r\n")
        self.wfile.flush()


class FakeOpenAIServer:
    """The fake server; use as a context manager.

    Attributes:
        url: the API root to give a client, ``http://127.0.0.1:<port>/v1``.
        requests: every request received, in order.
        models: names listed by ``GET /v1/models``.
        disconnected: set when writing to a client failed (it hung up).
        events_sent / streams_completed: SSE events written / streams written to the end.
    """

    def __init__(self, models: tuple[str, ...] = ("fake-vila-m3",)) -> None:
        self.models = list(models)
        self.requests: list[Recorded] = []
        self.disconnected = threading.Event()
        self.events_sent = 0
        self.streams_completed = 0
        self._replies: deque[Reply] = deque()
        self._responder: Callable[[Recorded], Reply] | None = None
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> FakeOpenAIServer:
        """Queue replies, used one per POST in order; with none left the server answers 500."""
        with self._lock:
            self._replies.extend(replies)
        return self

    def respond(self, responder: Callable[[Recorded], Reply] | None) -> FakeOpenAIServer:
        """Answer each POST that finds no scripted reply with ``responder(request)`` (None: stop)."""
        with self._lock:
            self._responder = responder
        return self

    @property
    def posts(self) -> list[Recorded]:
        """The POST requests received."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST"]

    def _record(self, recorded: Recorded) -> None:
        with self._lock:
            self.requests.append(recorded)

    def _next_reply(self, recorded: Recorded) -> Reply:
        with self._lock:
            if self._replies:
                return self._replies.popleft()
            responder = self._responder
        if responder is not None:
            return responder(recorded)
        return error(500, "the fake server has no scripted reply left")

    def start(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
