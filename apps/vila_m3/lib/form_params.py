"""The ``params`` form field of MONAI Label's routes: a JSON object in UTF-8, checked before anything is saved."""

from __future__ import annotations

import json
from typing import Any

import starlette.requests
from fastapi import HTTPException
from starlette.formparsers import MultiPartParser

BAD_INPUT = 422


def parse_params(text: str | None, owned: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The ``params`` form field as a dict; HTTP 422 naming the problem if it is not a UTF-8 JSON object or
    sets one of the ``owned`` keys."""
    if not text:
        return {}
    # Starlette decodes a url-encoded field that is not UTF-8 with U+FFFD; multipart fields that are not are
    # refused while the form is parsed (StrictMultiPartParser).
    if "\ufffd" in text:
        raise HTTPException(BAD_INPUT, "params is not UTF-8 text")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise HTTPException(BAD_INPUT, f"params is not JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise HTTPException(BAD_INPUT, "params is nested too deeply") from None
    if not isinstance(value, dict):
        raise HTTPException(BAD_INPUT, f"params must be a JSON object ({{...}}), not {_json_kind(value)}")
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPException(BAD_INPUT, "params holds text that is not valid UTF-8 (a lone surrogate)") from None
    taken = sorted(owned & value.keys())
    if taken:
        raise HTTPException(BAD_INPUT, f"params may not set {', '.join(taken)}: name the image with the image= "
                                       "(datastore id) or session_id= query parameter, or send it as 'file'")
    return value


class StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, except that a text field (not a file) that is not valid in the form's
    charset (UTF-8 unless the client names another) is a 422 naming the field. Starlette decodes such a field
    as Latin-1 instead, which turns the bytes into other, valid-looking text that no later check can tell apart
    from what a client meant to send (``é`` and an invalid byte ``\\xe9`` both arrive as text)."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset or "utf-8")
            except (UnicodeDecodeError, LookupError):
                charset = "UTF-8" if self._charset in ("", "utf-8") else self._charset
                raise HTTPException(BAD_INPUT, f"form field '{part.field_name}' is not {charset} text") from None
        super().on_part_end()


def install_strict_multipart() -> None:
    """Make every route of this process parse multipart forms with :class:`StrictMultiPartParser`.

    Starlette's ``Request.form()`` builds its parser from the name ``starlette.requests.MultiPartParser``; FastAPI
    parses a route's form before any of the route's own code or dependencies run, so the parser is the one place
    where a field's raw bytes are still seen. FastAPI passes an HTTPException raised while parsing on unchanged.
    """
    starlette.requests.MultiPartParser = StrictMultiPartParser


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)
