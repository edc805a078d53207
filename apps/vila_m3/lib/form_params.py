"""The ``params`` form field of MONAI Label's routes: a JSON object in UTF-8, checked before anything is saved."""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException

BAD_INPUT = 422


def parse_params(text: str | None, owned: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The ``params`` form field as a dict; HTTP 422 naming the problem if it is not a UTF-8 JSON object or
    sets one of the ``owned`` keys."""
    if not text:
        return {}
    # Starlette decodes a field that is not UTF-8 as Latin-1 (multipart) or with U+FFFD (url-encoded forms).
    if "\ufffd" in text or any("\x80" <= char <= "\x9f" for char in text):
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


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)
