"""An asynchronous client of a running VILA-M3 (MONAI Label) server, for programs that drive it from outside.

It speaks only the server's public REST API: ``GET /info/``, ``GET /datastore/?output=all``,
``GET /datastore/image?image=ID`` and ``POST /infer/{model}?image=ID&output=all`` (MONAI Label's multipart
answer: ``params`` JSON plus the result file). Every refusal becomes a :class:`ServerRefused` whose text
says what happened in words (login needed, role missing, unknown study, server busy) and never a server path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import httpx
from requests_toolbelt.multipart.decoder import MultipartDecoder

DEFAULT_TIMEOUT_S = 900.0  # a first VISTA3D run on a CPU loads the model and may take minutes
_FILENAME = re.compile(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)"?', re.IGNORECASE)


class ServerRefused(RuntimeError):
    """The server did not do what was asked; the message says why, in words.

    Attributes:
        status: the HTTP status (0 when the server could not be reached).
    """

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InferAnswer:
    """One ``/infer`` answer: the task's JSON and the result file's bytes (None for a JSON-only answer)."""

    params: dict[str, Any]
    file: bytes | None
    file_name: str | None


@dataclass(frozen=True)
class DownloadedImage:
    """A datastore image's bytes and the file name the server sent (its suffix tells the format)."""

    data: bytes
    file_name: str


def _detail(response: httpx.Response) -> str:
    """The server's ``detail`` text of an error answer (FastAPI's JSON), else the first 300 characters."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):  # FastAPI validation errors
        return "; ".join(str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail)
    return str(detail) if detail is not None else json.dumps(body)[:300]


def _file_name(response: httpx.Response, default: str) -> str:
    match = _FILENAME.search(response.headers.get("content-disposition", ""))
    return match.group(1).strip() if match else default


class LabelServerClient:
    """The REST calls of one running server, authenticated with a bearer token when one is given.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        timeout_s: per request (an infer may load a model first).
    """

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, token: str | None, what: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = await self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TimeoutException:
            raise ServerRefused(f"{what}: the VILA-M3 server at {self.url} did not answer in time") from None
        except httpx.HTTPError as err:
            raise ServerRefused(f"{what}: the VILA-M3 server at {self.url} cannot be reached "
                                f"({type(err).__name__}); is it running?") from None
        if response.status_code >= 400:
            raise ServerRefused(self._refusal(response, token, what), response.status_code)
        return response

    def _refusal(self, response: httpx.Response, token: str | None, what: str) -> str:
        detail = _detail(response)
        status = response.status_code
        if status == 401 and not token:
            return (f"{what}: the VILA-M3 server at {self.url} requires login and no token was given "
                    f"({detail}); pass a bearer token (see `vila-m3 mcp --help`)")
        if status == 401:
            return f"{what}: the server refused the token ({detail})"
        if status == 403:
            return f"{what}: the token lacks a role this needs ({detail})"
        if status == 503 and response.headers.get("retry-after"):
            return f"{what}: {detail}"
        if status >= 500:
            return f"{what}: the server failed (HTTP {status}): {detail}"
        return f"{what}: {detail}"

    async def info(self, token: str | None) -> dict[str, Any]:
        """``GET /info/``: the app's name, version and models (infer tasks)."""
        return (await self._request("GET", "/info/", token, "server info")).json()

    async def studies(self, token: str | None) -> dict[str, Any]:
        """``GET /datastore/?output=all``: ``{image id: {"image": {...}, "labels": {...}}}``."""
        listing = (await self._request("GET", "/datastore/", token, "datastore", params={"output": "all"})).json()
        return dict(listing.get("objects", {}))

    async def image(self, study: str, token: str | None) -> DownloadedImage:
        """``GET /datastore/image?image=ID``: the study's file."""
        response = await self._request("GET", "/datastore/image", token, f"study '{study}'", params={"image": study})
        return DownloadedImage(response.content, _file_name(response, f"{study}.nii.gz"))

    async def infer(self, model: str, study: str, params: dict[str, Any], token: str | None) -> InferAnswer:
        """``POST /infer/{model}?image=ID&output=all`` with ``params``: the JSON and the labelmap, if any."""
        response = await self._request(
            "POST", f"/infer/{model}", token, f"study '{study}'", params={"image": study, "output": "all"},
            data={"params": json.dumps(params)})
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            return InferAnswer(response.json(), None, None)
        parts: dict[str, Any] = {}
        for part in MultipartDecoder(response.content, content_type).parts:
            disposition = part.headers.get(b"Content-Disposition", b"").decode("utf-8", "replace")
            name = re.search(r'name="([^"]+)"', disposition)
            file_name = re.search(r'filename="([^"]+)"', disposition)
            if name:
                parts[name.group(1)] = (part.content, file_name.group(1) if file_name else None)
        if "params" not in parts:
            raise ServerRefused(f"study '{study}': the server's answer has no params part")
        answer = json.loads(parts["params"][0])
        data, file_name = parts.get("image", (None, None))
        return InferAnswer(answer if isinstance(answer, dict) else {}, data, file_name)
