"""Chat with a VLM served behind an OpenAI-compatible API (vLLM, NIM, TGI).

:class:`RemoteVLM` answers the same conversations as the local :class:`~vila_m3.vlm.VilaChat`
with the same ``generate`` signature and :class:`~vila_m3.vlm.GenerationResult`, but sends them to
``{base_url}/chat/completions``:

* each user turn becomes a list of ``text`` and ``image_url`` parts, split at the ``<image>``
  placeholders; images go in order across turns as PNG ``data:`` URLs; assistant turns are plain
  strings; an optional system prompt goes first;
* ``max_new_tokens``, ``temperature``, ``top_p`` and the constructor's ``stop`` strings map to
  ``max_tokens``, ``temperature``, ``top_p``, ``stop``; ``min_new_tokens > 0`` is sent as
  ``min_tokens``, an extension of vLLM (and of NIM, built on it) that other servers may reject or
  ignore: pass ``send_min_tokens=False`` for those;
* :meth:`RemoteVLM.generate_with_tools` sends OpenAI ``tools`` (``tool_choice: auto``) with a
  conversation that may hold the model's earlier tool calls and ``tool`` results
  (:func:`build_tool_messages`) and returns the text and the :class:`ToolCall` s of the answer
  (:class:`ToolGenerationResult`), assembled from streamed partial ``tool_calls`` deltas (index, id,
  name and arguments split over chunks) as vLLM and OpenAI send them;
* with a ``stream`` callback (or a ``cancel`` event) the answer comes as server-sent events and
  ``cancel`` is checked after every line the server sends (tokens and keep-alives); without either
  it comes as one JSON response. As with the local model, leading and trailing whitespace is
  dropped and the streamed pieces concatenate to exactly ``GenerationResult.text``.

Every failure raises :class:`RemoteVLMError` with one message naming the endpoint URL and the
problem. Connection errors (refused, DNS, connect timeout) and HTTP 429/502/503/504 are retried
with exponential backoff; nothing else is, and nothing is once the answer has started to stream.
The API key is sent as ``Authorization: Bearer`` and never appears in messages, logs or ``repr``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3.exceptions
from PIL import Image

from .errors import ImageCountError, VlmError
from .generation import DEFAULT_MIN_NEW_TOKENS, GenerationResult, StopReason
from .modeling import IMAGE_PLACEHOLDER, ImageInput, _to_pil
from .prompting import ConversationLike, as_turns

__all__ = [
    "API_KEY_ENV",
    "MODEL_ENV",
    "URL_ENV",
    "RemoteVLM",
    "RemoteVLMError",
    "ToolCall",
    "ToolGenerationResult",
    "build_messages",
    "build_tool_messages",
    "image_data_url",
]

logger = logging.getLogger(__name__)

API_KEY_ENV = "VILA_M3_REMOTE_API_KEY"
"""Environment variable holding the API key (never put the key in a config file)."""
URL_ENV = "VILA_M3_REMOTE_URL"
"""Environment variable with the server's API root, e.g. ``http://gpu-host:8000/v1``."""
MODEL_ENV = "VILA_M3_REMOTE_MODEL"
"""Environment variable with the model name the server serves."""

RETRY_STATUSES = frozenset({429, 502, 503, 504})
"""HTTP statuses worth another attempt: rate limit and gateway / overload errors."""
MAX_RETRY_AFTER_S = 60.0
"""Upper bound of a server's ``Retry-After`` that is honoured between attempts (seconds)."""
_BODY_EXCERPT = 300

_FINISH_REASONS: dict[str, StopReason] = {
    "stop": "stop_string",
    "length": "max_new_tokens",
    "eos": "eos",
    "eos_token": "eos",
}

_CONFIG_KEYS = frozenset(
    {
        "base_url",
        "model",
        "timeout_s",
        "connect_timeout_s",
        "retries",
        "backoff_s",
        "stop",
        "system_prompt",
        "extra_headers",
        "send_min_tokens",
        "api_key_env",
        "tool_calling",
        "tool_images",
    }
)


class RemoteVLMError(VlmError):
    """The remote model server could not be reached or gave no usable answer.

    Attributes:
        url: the endpoint that was called (credentials in the URL removed).
        status_code: the HTTP status when the server answered with an error, else ``None``.
        attempts: how many requests were made.
    """

    def __init__(self, message: str, url: str, status_code: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.url = url
        self.status_code = status_code
        self.attempts = attempts


@dataclass(frozen=True)
class ToolCall:
    """One function call of the model.

    Attributes:
        id: the call's id (the model's; ``call_<index>`` when the server sent none).
        name: the function name.
        arguments: the JSON arguments string as the model wrote it (may be malformed).
    """

    id: str
    name: str
    arguments: str

    def as_openai(self) -> dict[str, Any]:
        """The call as an assistant message's ``tool_calls`` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolGenerationResult(GenerationResult):
    """A :class:`GenerationResult` with the answer's tool calls, in the model's order."""

    tool_calls: tuple[ToolCall, ...] = ()


# ------------------------------------------------------------------------------------------------
# Conversation -> OpenAI messages
# ------------------------------------------------------------------------------------------------
def image_data_url(image: ImageInput) -> str:
    """A ``data:image/png;base64,...`` URL of one image.

    Args:
        image: a PIL image, a uint8 array ``(H, W)`` / ``(H, W, 1|3|4)``, or a path. Grayscale and
            RGB images keep their mode; any other mode is converted to RGB, as the local model does.
    """
    if type(image).__module__.split(".")[0] == "torch":
        raise TypeError(
            "A preprocessed tensor cannot be sent to a remote model; pass a PIL image, a uint8 array or a path."
        )
    if isinstance(image, Image.Image):
        reference, url = _DATA_URLS.get(id(image), (None, None))
        if reference is not None and reference() is image:
            return url
    pil = _to_pil(image)
    if pil.mode not in ("L", "RGB"):
        pil = pil.convert("RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=1)  # lossless either way; level 1 is ~3x faster
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    if isinstance(image, Image.Image):
        with _DATA_URLS_LOCK:
            for key in [key for key, (ref, _) in _DATA_URLS.items() if ref() is None]:
                del _DATA_URLS[key]
            _DATA_URLS[id(image)] = (weakref.ref(image), url)
    return url


# Data URLs of PIL images already encoded, by id(image) with a weak reference to check identity:
# a chat resends its earlier images every round.
_DATA_URLS: dict[int, tuple[weakref.ref, str]] = {}
_DATA_URLS_LOCK = threading.Lock()


def build_messages(
    conversation: ConversationLike,
    images: Sequence[ImageInput] = (),
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """OpenAI chat ``messages`` for a conversation with ``<image>`` placeholders.

    Args:
        conversation: ``[(role, text), ...]`` (or role/content dicts) starting and ending with a
            user turn and alternating; ``<image>`` in user text marks where each image goes.
        images: one image per placeholder, in order across the turns.
        system_prompt: text of a leading ``system`` message; none when ``None`` or empty.

    Returns:
        Messages: user turns as content lists of ``{"type": "text"}`` and ``{"type": "image_url"}``
        parts (empty text parts dropped), assistant turns as plain strings.

    Raises:
        ImageCountError: images and placeholders differ in number (checked before any encoding).
        ValueError: malformed conversation, or ``<image>`` in an assistant turn.
    """
    turns = as_turns(conversation)
    _check_turns(turns)
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns if role == "user")
    if n_placeholders != len(images):
        raise ImageCountError(n_placeholders, len(images))
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    pending = iter(images)
    for role, text in turns:
        if role == "assistant":
            messages.append({"role": "assistant", "content": text})
            continue
        messages.append({"role": "user", "content": _user_parts(text, pending)})
    return messages


def _user_parts(text: str, pending: Iterator[ImageInput]) -> list[dict[str, Any]]:
    """A user text as ``text`` and ``image_url`` parts, one image from ``pending`` per ``<image>``."""
    parts: list[dict[str, Any]] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            parts.append({"type": "image_url", "image_url": {"url": image_data_url(next(pending))}})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def build_tool_messages(
    messages: Sequence[Mapping[str, Any]],
    images: Sequence[ImageInput] = (),
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """OpenAI chat ``messages`` for a conversation with tool calls.

    Args:
        messages: dicts with ``role`` (``user``, ``assistant`` or ``tool``) and ``content`` (text);
            ``<image>`` in user text marks where each image goes; an assistant message may hold
            ``tool_calls`` (:class:`ToolCall` s), a tool message needs ``tool_call_id``.
        images: one image per placeholder, in order across the user messages.
        system_prompt: text of a leading ``system`` message; none when ``None`` or empty.

    Raises:
        ImageCountError: images and placeholders differ in number (checked before any encoding).
        ValueError: an unknown role, a tool message without ``tool_call_id``, ``<image>`` outside a
            user message, or a tool result whose call is not in the assistant message before it.
    """
    n_placeholders = sum(str(m.get("content") or "").count(IMAGE_PLACEHOLDER) for m in messages if m.get("role") == "user")
    if n_placeholders != len(images):
        raise ImageCountError(n_placeholders, len(images))
    out: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    pending = iter(images)
    open_calls: set[str] = set()
    for i, message in enumerate(messages):
        role, text = message.get("role"), str(message.get("content") or "")
        if role != "user" and IMAGE_PLACEHOLDER in text:
            raise ValueError(f"Message {i} ({role}) contains {IMAGE_PLACEHOLDER}; images can only be in user messages.")
        if role == "user":
            out.append({"role": "user", "content": _user_parts(text, pending)})
        elif role == "assistant":
            calls = [call.as_openai() for call in message.get("tool_calls") or ()]
            entry: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                entry["tool_calls"] = calls
            open_calls = {call["id"] for call in calls}
            out.append(entry)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not call_id or call_id not in open_calls:
                raise ValueError(f"Message {i} (tool) answers {call_id!r}, which is not a call of the assistant message before it.")
            out.append({"role": "tool", "tool_call_id": str(call_id), "content": text})
        else:
            raise ValueError(f"Message {i} has the role {role!r}; expected user, assistant or tool.")
    return out


def _check_turns(turns: Sequence[tuple[str, str]]) -> None:
    """User first, alternating, non-empty, ending with a user turn; no images in assistant turns."""
    if not turns or len(turns) % 2 == 0:
        raise ValueError("To generate an answer the conversation must start and end with a user turn.")
    for i, (role, text) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"Turn {i} is a {role} turn but a {expected} turn was expected: a conversation starts "
                "with the user and alternates user/assistant (put consecutive user messages in one turn)."
            )
        if not text:
            raise ValueError(f"Turn {i} ({role}) has no text.")
        if role == "assistant" and IMAGE_PLACEHOLDER in text:
            raise ValueError(f"Turn {i} (assistant) contains {IMAGE_PLACEHOLDER}; images can only be in user turns.")


# ------------------------------------------------------------------------------------------------
# Transport helpers
# ------------------------------------------------------------------------------------------------
def _normalize_base_url(base_url: str) -> str:
    """The API root without a trailing slash; ``/v1`` added to a bare ``http://host:port``."""
    url = str(base_url).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must be an http(s) URL such as http://gpu-host:8000/v1, got {url!r}.")
    path = parts.path.rstrip("/")
    if path.endswith("/chat/completions"):
        path = path[: -len("/chat/completions")]
    if not path:
        path = "/v1"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _redact(url: str) -> str:
    """``url`` without ``user:password@``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, parts.query, parts.fragment))


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps (causes, contexts, exception args, urllib3 ``reason``)."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        stack.extend(e for e in linked if isinstance(e, BaseException))


def _is_connect_timeout(cause: BaseException) -> bool:
    """A connect timeout (urllib3's ``NewConnectionError`` derives from its timeout class but is not one)."""
    if isinstance(cause, requests.ConnectTimeout):
        return True
    return isinstance(cause, urllib3.exceptions.ConnectTimeoutError) and not isinstance(
        cause, urllib3.exceptions.NewConnectionError
    )


def _is_read_timeout(exc: BaseException) -> bool:
    causes = list(_causes(exc))
    connect = any(_is_connect_timeout(c) for c in causes)
    read = any(isinstance(c, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)) for c in causes)
    return read and not connect


def _connection_problem(exc: BaseException, host: str, connect_timeout_s: float) -> str:
    """A short description of why a connection could not be made."""
    causes = list(_causes(exc))
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return f"connection refused (is the server running and listening on {host}?)"
    name_error = getattr(urllib3.exceptions, "NameResolutionError", ())
    if any(isinstance(c, socket.gaierror) or (name_error and isinstance(c, name_error)) for c in causes):
        return f"cannot resolve the host name of {host}"
    if any(_is_connect_timeout(c) for c in causes):
        return f"no connection within {connect_timeout_s:g} s (connect_timeout_s)"
    if any(isinstance(c, requests.exceptions.SSLError) for c in causes):
        return f"TLS/SSL error: {_short(exc)}"
    return f"connection failed: {_short(exc)}"


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= _BODY_EXCERPT else text[:_BODY_EXCERPT] + "..."


def _server_error_text(body: bytes) -> str:
    """The server's own error text: ``error.message`` (OpenAI, vLLM), ``error`` (TGI), ``message``,
    ``detail`` (FastAPI), else the start of the body."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str) and error:
            return error
        if isinstance(data.get("message"), str):
            return data["message"]
        if data.get("detail"):
            detail = data["detail"]
            return (detail if isinstance(detail, str) else json.dumps(detail))[:_BODY_EXCERPT]
    if not text:
        return "(empty body)"
    return text[:_BODY_EXCERPT] + ("..." if len(text) > _BODY_EXCERPT else "")


def _retry_after_s(response: requests.Response) -> float | None:
    """The ``Retry-After`` header in seconds when it is a number."""
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _wait(seconds: float, cancel: threading.Event | None) -> bool:
    """Sleep ``seconds``; True when ``cancel`` was set meanwhile."""
    if cancel is not None:
        return cancel.wait(seconds)
    time.sleep(seconds)
    return False


class _VisibleText:
    """Collects streamed text and passes on only what the stripped final answer will contain.

    Leading whitespace is dropped and trailing whitespace held back until more text follows, so the
    pieces handed to ``callback`` concatenate to exactly ``self.raw.strip()``.
    """

    def __init__(self, callback: Callable[[str], None] | None) -> None:
        self.callback = callback
        self.raw = ""
        self.sent = ""

    def add(self, piece: str) -> None:
        self.raw += piece
        visible = self.raw.strip()
        if self.callback is not None and len(visible) > len(self.sent):
            new, self.sent = visible[len(self.sent) :], visible
            self.callback(new)

    @property
    def text(self) -> str:
        return self.raw.strip()


# ------------------------------------------------------------------------------------------------
# The client
# ------------------------------------------------------------------------------------------------
class RemoteVLM:
    """A VLM served by an OpenAI-compatible server, with the chat interface of :class:`VilaChat`.

    Args:
        base_url: the API root, e.g. ``http://gpu-host:8000/v1`` (``/v1`` is added to a bare
            ``http://host:port``; a trailing ``/chat/completions`` is removed).
        model: the model name the server serves (``--served-model-name`` of vLLM).
        api_key: sent as ``Authorization: Bearer <key>``; no header when ``None``.
        timeout_s: longest wait for the server's response and, while streaming, for each next line
            (seconds); not a limit on the whole answer.
        connect_timeout_s: longest wait to open the connection (seconds).
        retries: further attempts after a connection error or HTTP 429/502/503/504 (0: no retry).
        backoff_s: wait before the first retry (seconds), doubled for each further one; a numeric
            ``Retry-After`` of the server is honoured up to :data:`MAX_RETRY_AFTER_S`.
        stop: stop strings sent with every request.
        extra_headers: further HTTP headers (e.g. a gateway's routing header).
        system_prompt: text of a leading system message; none when ``None``.
        send_min_tokens: send ``min_new_tokens`` as ``min_tokens`` (vLLM / NIM); switch off for
            servers that reject unknown fields.
        tool_calling: the chat drives this model with OpenAI tool calls instead of text triggers
            (:meth:`generate_with_tools`); for models served with tool calling on (vLLM
            ``--enable-auto-tool-choice``).
        tool_images: in tool-calling mode, send an expert's overlay image after its tool result (a
            user message with the image); switch off for models that take no images there.

    The client may be shared between threads; each ``generate`` call is an independent request.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 10.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        stop: Sequence[str] = (),
        extra_headers: Mapping[str, str] | None = None,
        system_prompt: str | None = None,
        send_min_tokens: bool = True,
        tool_calling: bool = False,
        tool_images: bool = True,
    ) -> None:
        if not model or not str(model).strip():
            raise ValueError("model must name the model the server serves (e.g. its --served-model-name).")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0 s, got timeout_s={timeout_s}, connect_timeout_s={connect_timeout_s}")
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries and backoff_s must be >= 0, got {retries} and {backoff_s}")
        if isinstance(stop, str):
            stop = (stop,)
        self.base_url = _normalize_base_url(base_url)
        self.model = str(model).strip()
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.stop = tuple(str(s) for s in stop)
        self.extra_headers = dict(extra_headers or {})
        self.system_prompt = system_prompt
        self.send_min_tokens = bool(send_min_tokens)
        self.tool_calling = bool(tool_calling)
        self.tool_images = bool(tool_images)
        self._api_key = api_key or None
        self._session = requests.Session()

    # ---- construction from settings --------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> RemoteVLM:
        """A client from a settings dict; the API key comes from the environment.

        Args:
            config: ``base_url`` and ``model`` (required); optional ``timeout_s``,
                ``connect_timeout_s``, ``retries``, ``backoff_s``, ``stop``, ``system_prompt``,
                ``extra_headers``, ``send_min_tokens``, ``tool_calling``, ``tool_images``, and ``api_key_env`` (the environment
                variable that holds the key, default :data:`API_KEY_ENV`).
            environ: the environment to read the key from (default ``os.environ``).

        Raises:
            ValueError: a required key is missing, a key is unknown, or the config holds a key.
        """
        environ = os.environ if environ is None else environ
        if "api_key" in config:
            raise ValueError(
                f"Do not put the API key in a config file; set the environment variable {API_KEY_ENV} "
                "(or the one named by api_key_env) instead."
            )
        unknown = sorted(set(config) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(f"Unknown remote VLM setting(s) {unknown}; known: {sorted(_CONFIG_KEYS)}.")
        missing = [key for key in ("base_url", "model") if not config.get(key)]
        if missing:
            raise ValueError(f"The remote VLM settings need {' and '.join(missing)}.")
        settings = dict(config)
        key_env = settings.pop("api_key_env", None) or API_KEY_ENV
        return cls(api_key=environ.get(key_env) or None, **settings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RemoteVLM | None:
        """A client from :data:`URL_ENV`, :data:`MODEL_ENV` and :data:`API_KEY_ENV`.

        Returns:
            ``None`` when :data:`URL_ENV` is unset or empty (no remote model configured).

        Raises:
            ValueError: the URL is set but the model name is not.
        """
        environ = os.environ if environ is None else environ
        url = (environ.get(URL_ENV) or "").strip()
        if not url:
            return None
        model = (environ.get(MODEL_ENV) or "").strip()
        if not model:
            raise ValueError(f"{URL_ENV} is set but {MODEL_ENV} is not; set it to the model name the server serves.")
        return cls(url, model, api_key=environ.get(API_KEY_ENV) or None)

    # ---- facts ------------------------------------------------------------------------------------
    @property
    def is_stand_in(self) -> bool:
        """Always False: a remote server serves a real model."""
        return False

    @property
    def chat_url(self) -> str:
        """The chat completions endpoint."""
        return self.base_url + "/chat/completions"

    def describe(self) -> str:
        """One line for logs and the UI, e.g. ``remote model 'vila-m3-8b' at http://gpu:8000/v1``."""
        mode = " (tool calls)" if self.tool_calling else ""
        return f"remote model {self.model!r} at {_redact(self.base_url)}{mode}"

    def __repr__(self) -> str:
        return f"RemoteVLM({self.describe()})"

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    def __enter__(self) -> RemoteVLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- requests ---------------------------------------------------------------------------------
    def _headers(self, streaming: bool) -> dict[str, str]:
        headers = {"Accept": "text/event-stream" if streaming else "application/json"}
        if streaming:
            headers["Accept-Encoding"] = "identity"  # compression would hold events back
        headers.update(self.extra_headers)
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _request(
        self,
        method: str,
        url: str,
        payload: Mapping[str, Any] | None,
        streaming: bool,
        cancel: threading.Event | None = None,
    ) -> requests.Response | None:
        """Send one request with retries; the open (``stream=True``) response of status < 400.

        Returns ``None`` when ``cancel`` was set while waiting between attempts.
        """
        shown = _redact(url)
        host = urlsplit(shown).netloc
        attempts = self.retries + 1
        problem = ""
        status: int | None = None
        for attempt in range(1, attempts + 1):
            retry_after: float | None = None
            try:
                response = self._session.request(
                    method,
                    url,
                    json=payload,
                    headers=self._headers(streaming),
                    timeout=(self.connect_timeout_s, self.timeout_s),
                    stream=True,
                )
            except requests.RequestException as err:
                if _is_read_timeout(err):
                    raise self._timeout_error(shown, waiting_for="the response") from err
                if not isinstance(err, requests.ConnectionError):
                    raise RemoteVLMError(
                        f"Remote VLM request to {shown} failed: {_short(err)}", shown, attempts=attempt
                    ) from err
                problem, status = _connection_problem(err, host, self.connect_timeout_s), None
            else:
                if response.status_code < 400:
                    return response
                status = response.status_code
                problem = self._http_problem(response, shown)
                retry_after = _retry_after_s(response)
                response.close()
                if status not in RETRY_STATUSES:
                    raise RemoteVLMError(f"Remote VLM at {shown} answered {problem}", shown, status, attempt)
            if attempt < attempts:
                delay = self.backoff_s * 2 ** (attempt - 1)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
                logger.warning(
                    "Remote VLM at %s: %s; retrying in %.2g s (attempt %d of %d).",
                    shown, problem, delay, attempt + 1, attempts,
                )
                if _wait(delay, cancel):
                    return None
        where = f"answered {problem}" if status is not None else f"could not be reached: {problem}"
        raise RemoteVLMError(
            f"Remote VLM at {shown} {where} (after {attempts} attempt{'s' if attempts > 1 else ''}).",
            shown,
            status,
            attempts,
        )

    def _http_problem(self, response: requests.Response, url: str) -> str:
        """``HTTP 400 (Bad Request): <server text>`` with a hint for the statuses that need one."""
        try:
            body = response.content
        except requests.RequestException:
            body = b""
        text = f"HTTP {response.status_code} ({response.reason or 'error'}): {_server_error_text(body)}"
        if response.status_code in (401, 403):
            text += f" (check the API key in {API_KEY_ENV})"
        elif response.status_code == 404:
            text += f" (check that base_url is the API root, e.g. .../v1, and that the server serves {self.model!r})"
        return text

    def _timeout_error(self, url: str, waiting_for: str) -> RemoteVLMError:
        return RemoteVLMError(
            f"Remote VLM at {url} timed out: no data for {self.timeout_s:g} s while waiting for {waiting_for} "
            "(timeout_s; raise it for long answers or a busy server).",
            url,
        )

    def _malformed(self, url: str, what: str) -> RemoteVLMError:
        return RemoteVLMError(f"Remote VLM at {url} sent a malformed response: {what}", url)

    def list_models(self) -> list[str]:
        """Names of the models the server serves (``GET {base_url}/models``); a cheap health check."""
        url = self.base_url + "/models"
        shown = _redact(url)
        response = self._request("GET", url, None, streaming=False)
        assert response is not None  # no cancel event: never None
        data = self._read_json(response, shown)
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise self._malformed(shown, "no 'data' list of models")
        return [str(entry["id"]) for entry in entries if isinstance(entry, dict) and "id" in entry]

    def _read_json(self, response: requests.Response, url: str) -> Any:
        """The whole body of ``response`` parsed as JSON (the response is closed)."""
        try:
            body = response.content
        except requests.RequestException as err:
            if _is_read_timeout(err):
                raise self._timeout_error(url, waiting_for="the rest of the response") from err
            raise RemoteVLMError(f"Remote VLM at {url}: the connection broke: {_short(err)}", url) from err
        finally:
            response.close()
        try:
            return json.loads(body.decode("utf-8"))
        except ValueError:
            kind = response.headers.get("Content-Type", "unknown type")
            excerpt = body[:_BODY_EXCERPT].decode("utf-8", errors="replace") or "(empty body)"
            raise self._malformed(url, f"not JSON ({kind}): {excerpt}") from None

    # ---- generation -------------------------------------------------------------------------------
    def generate(
        self,
        conversation: ConversationLike,
        images: Sequence[ImageInput] = (),
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float = 1.0,
        min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS,
        stream: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        logits_processor: Sequence[Any] | None = None,
    ) -> GenerationResult:
        """Answer the conversation on the server.

        Args:
            conversation: ``[(role, text), ...]`` starting and ending with a user turn; ``<image>`` in
                user text marks where each image goes, in order.
            images: one image per placeholder (PIL, uint8 array, or path).
            max_new_tokens: upper bound of answer tokens (``max_tokens``).
            temperature: 0 for greedy decoding, > 0 to sample.
            top_p: nucleus sampling mass.
            min_new_tokens: sent as ``min_tokens`` (vLLM extension) when > 0 and ``send_min_tokens``.
            stream: called with each new piece of answer text, from the calling thread; the pieces
                concatenate to exactly ``GenerationResult.text``. An exception it raises aborts.
            cancel: set it (from any thread) to stop; checked after each streamed line and between
                attempts; the text received so far is returned with ``stopped_by="cancelled"``.
            logits_processor: not supported remotely; must be empty.

        Returns:
            A :class:`GenerationResult`; ``n_tokens`` / ``prompt_tokens`` come from the server's
            ``usage`` (else the number of streamed text chunks / 0); ``seconds`` is the wall time of
            the whole call, retries included.

        Raises:
            ImageCountError: images and placeholders differ in number (before any request).
            RemoteVLMError: the server could not be reached or gave no usable answer.
        """
        self._check_settings(max_new_tokens, temperature)
        if logits_processor:
            raise RemoteVLMError(
                f"logits_processor runs in-process and cannot be used with the remote model at {self.chat_url}.",
                _redact(self.chat_url),
            )
        start = time.perf_counter()
        messages = build_messages(conversation, images, self.system_prompt)
        answer = self._complete(messages, len(images), None, start, max_new_tokens, temperature, top_p,
                                min_new_tokens, stream, cancel)
        return GenerationResult(answer.text, answer.n_tokens, answer.stopped_by, answer.prompt_tokens, answer.seconds)

    def generate_with_tools(
        self,
        messages: Sequence[Mapping[str, Any]],
        images: Sequence[ImageInput],
        tools: Sequence[Mapping[str, Any]],
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float = 1.0,
        min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS,
        stream: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> ToolGenerationResult:
        """Answer a conversation with tool calls, offering ``tools`` (``tool_choice: auto``).

        Args:
            messages: user, assistant (with ``tool_calls``) and tool messages; see :func:`build_tool_messages`.
            images: one image per ``<image>`` in the user messages, in order.
            tools: OpenAI function tools (:func:`vila_m3.experts.tools.expert_tools`); none sends none.
            max_new_tokens, temperature, top_p, min_new_tokens, stream, cancel: as for :meth:`generate`;
                ``stream`` gets the answer's text only, never the calls.

        Returns:
            The answer's text and its tool calls (streamed calls assembled from their deltas).

        Raises:
            ImageCountError, ValueError: see :func:`build_tool_messages` (before any request).
            RemoteVLMError: the server could not be reached or gave no usable answer.
        """
        self._check_settings(max_new_tokens, temperature)
        start = time.perf_counter()
        built = build_tool_messages(messages, images, self.system_prompt)
        extra = {"tools": [dict(tool) for tool in tools], "tool_choice": "auto"} if tools else None
        return self._complete(built, len(images), extra, start, max_new_tokens, temperature, top_p, min_new_tokens,
                              stream, cancel)

    def _check_settings(self, max_new_tokens: int, temperature: float) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    def _complete(
        self,
        messages: list[dict[str, Any]],
        n_images: int,
        extra: Mapping[str, Any] | None,
        start: float,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        min_new_tokens: int,
        stream: Callable[[str], None] | None,
        cancel: threading.Event | None,
    ) -> ToolGenerationResult:
        """Send built ``messages`` (plus ``extra`` payload fields) and read the answer."""
        if cancel is not None and cancel.is_set():
            return ToolGenerationResult("", 0, "cancelled", 0, 0.0)
        streaming = stream is not None or cancel is not None
        payload = self._payload(messages, int(max_new_tokens), temperature, top_p, int(min_new_tokens), streaming)
        payload.update(extra or {})
        logger.debug(
            "Remote VLM request to %s: %d message(s), %d image(s), %d tool(s), max_tokens=%d, stream=%s.",
            _redact(self.chat_url), len(messages), n_images, len(payload.get("tools", ())), payload["max_tokens"],
            streaming,
        )
        response = self._request("POST", self.chat_url, payload, streaming, cancel)
        if response is None:
            return ToolGenerationResult("", 0, "cancelled", 0, time.perf_counter() - start)
        content_type = response.headers.get("Content-Type", "")
        if streaming and "text/event-stream" in content_type:
            text, n_tokens, stopped_by, prompt_tokens, calls = self._read_stream(response, stream, cancel)
        else:
            text, n_tokens, stopped_by, prompt_tokens, calls = self._read_completion(response)
            if stream is not None and text:
                stream(text)
        return ToolGenerationResult(text, n_tokens, stopped_by, prompt_tokens, time.perf_counter() - start, calls)

    def _payload(
        self,
        messages: list[dict[str, Any]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        min_new_tokens: int,
        streaming: bool,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_new_tokens,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "stream": streaming,
        }
        if self.stop:
            payload["stop"] = list(self.stop)
        if self.send_min_tokens and min_new_tokens > 0:
            payload["min_tokens"] = min(min_new_tokens, max_new_tokens)
        if streaming:
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _read_completion(self, response: requests.Response) -> tuple[str, int, StopReason, int, tuple[ToolCall, ...]]:
        """Text, completion tokens, stop reason, prompt tokens and tool calls of a JSON chat completion."""
        url = _redact(self.chat_url)
        data = self._read_json(response, url)
        self._raise_for_error_object(data, url)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._malformed(url, "no choices[0] in the answer")
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise self._malformed(url, "no choices[0].message in the answer")
        content = message.get("content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise self._malformed(url, f"choices[0].message.content is a {type(content).__name__}, not text")
        raw_calls = message.get("tool_calls") or []
        if not isinstance(raw_calls, list) or not all(isinstance(call, dict) for call in raw_calls):
            raise self._malformed(url, "choices[0].message.tool_calls is not a list of objects")
        parts = _ToolCallParts()
        for position, call in enumerate(raw_calls):
            parts.add({**call, "index": call.get("index", position)})
        completion, prompt = _usage(data.get("usage"))
        return (content.strip(), completion or 0, _stop_reason(choices[0].get("finish_reason")), prompt or 0,
                parts.calls(url, self._malformed))

    def _read_stream(
        self,
        response: requests.Response,
        stream: Callable[[str], None] | None,
        cancel: threading.Event | None,
    ) -> tuple[str, int, StopReason, int, tuple[ToolCall, ...]]:
        """Text, completion tokens, stop reason, prompt tokens and tool calls of a server-sent event stream.

        Each ``data:`` line is one event; comment lines (``:``), other fields and blank lines are
        skipped; ``data: [DONE]`` ends the stream. Tool calls come as ``delta.tool_calls`` pieces
        keyed by ``index``: the id and name in the first piece, the arguments string split over the
        following ones (names split over pieces are joined too). The response is closed on return.
        """
        url = _redact(self.chat_url)
        visible = _VisibleText(stream)
        tool_parts = _ToolCallParts()
        n_chunks = 0
        finish: str | None = None
        usage: Any = None
        done = False
        try:
            lines = response.iter_lines()
            while True:
                if cancel is not None and cancel.is_set():
                    break
                try:
                    raw = next(lines)
                except StopIteration:
                    break
                except requests.RequestException as err:
                    if _is_read_timeout(err):
                        raise self._timeout_error(url, waiting_for="the next part of the answer") from err
                    raise RemoteVLMError(
                        f"Remote VLM at {url}: the connection broke while streaming the answer: {_short(err)}", url
                    ) from err
                line = raw.decode("utf-8", errors="replace")
                if not line or line.startswith(":"):
                    continue
                field, _, value = line.partition(":")
                if field.strip() != "data":
                    continue
                value = value.strip()
                if value == "[DONE]":
                    done = True
                    break
                try:
                    event = json.loads(value)
                except ValueError:
                    raise self._malformed(url, f"an event is not JSON: {value[:_BODY_EXCERPT]}") from None
                self._raise_for_error_object(event, url)
                if not isinstance(event, dict):
                    raise self._malformed(url, f"an event is not a JSON object: {value[:_BODY_EXCERPT]}")
                usage = event.get("usage") or usage
                choices = event.get("choices") or []
                if not isinstance(choices, list) or (choices and not isinstance(choices[0], dict)):
                    raise self._malformed(url, f"an event has malformed choices: {value[:_BODY_EXCERPT]}")
                if not choices:
                    continue  # the final usage-only event, or a keep-alive
                delta = choices[0].get("delta") or {}
                piece = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(piece, str) and piece:
                    n_chunks += 1
                    visible.add(piece)
                calls = delta.get("tool_calls") if isinstance(delta, dict) else None
                if calls:
                    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
                        raise self._malformed(url, f"an event has malformed tool_calls: {value[:_BODY_EXCERPT]}")
                    n_chunks += 1
                    for position, call in enumerate(calls):
                        tool_parts.add({**call, "index": call.get("index", position)})
                finish = choices[0].get("finish_reason") or finish
        finally:
            response.close()
        completion, prompt = _usage(usage)
        if cancel is not None and cancel.is_set() and not done and finish is None:
            return visible.text, n_chunks, "cancelled", prompt or 0, ()  # half a call is no call
        if not done and finish is None:
            raise RemoteVLMError(
                f"Remote VLM at {url}: the stream ended before the answer was complete "
                f"({n_chunks} text chunk(s) received, no finish_reason and no [DONE]).",
                url,
            )
        calls = tool_parts.calls(url, self._malformed)
        return visible.text, completion if completion is not None else n_chunks, _stop_reason(finish), prompt or 0, calls

    def _raise_for_error_object(self, data: Any, url: str) -> None:
        """Raise for an error object sent with status 200 (e.g. a failure in the middle of a stream)."""
        if not isinstance(data, dict):
            return
        if data.get("error") or data.get("object") == "error":
            text = _server_error_text(json.dumps(data).encode("utf-8"))
            raise RemoteVLMError(f"Remote VLM at {url} reported an error: {text}", url)


class _ToolCallParts:
    """Tool calls assembled from pieces keyed by ``index`` (a whole call is one piece)."""

    def __init__(self) -> None:
        self._parts: dict[int, dict[str, str]] = {}

    def add(self, piece: Mapping[str, Any]) -> None:
        """Add one ``tool_calls`` entry: ``index``, and any of ``id``, ``function.name``, ``function.arguments``."""
        try:
            index = int(piece.get("index"))
        except (TypeError, ValueError):
            index = len(self._parts)
        part = self._parts.setdefault(index, {"id": "", "name": "", "arguments": ""})
        if piece.get("id") and not part["id"]:
            part["id"] = str(piece["id"])
        function = piece.get("function") or {}
        if not isinstance(function, Mapping):
            function = {}
        if isinstance(function.get("name"), str):
            part["name"] += function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            part["arguments"] += arguments
        elif isinstance(arguments, Mapping):  # some servers send the object itself
            part["arguments"] += json.dumps(arguments)

    def calls(self, url: str, malformed: Callable[[str, str], RemoteVLMError]) -> tuple[ToolCall, ...]:
        """The calls in index order; a call without a name is a malformed answer."""
        calls = []
        for index in sorted(self._parts):
            part = self._parts[index]
            if not part["name"]:
                raise malformed(url, f"tool call {index} has no function name")
            calls.append(ToolCall(part["id"] or f"call_{index}", part["name"], part["arguments"]))
        return tuple(calls)


def _usage(usage: Any) -> tuple[int | None, int | None]:
    """``(completion_tokens, prompt_tokens)`` of a ``usage`` object; ``None`` where absent."""
    if not isinstance(usage, dict):
        return None, None

    def number(key: str) -> int | None:
        value = usage.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return number("completion_tokens"), number("prompt_tokens")


def _stop_reason(finish_reason: Any) -> StopReason:
    """Map an OpenAI ``finish_reason`` (``stop``, ``length``, ...) to a :data:`StopReason`."""
    return _FINISH_REASONS.get(str(finish_reason), "stop_string") if finish_reason else "stop_string"

