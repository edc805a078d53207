"""What our logs may say about free text (prompts, questions, answers): its length and a short hash.

Prompt text can name a patient, so it never goes to a log; :func:`fingerprint` gives what an
operator needs to tell turns apart or match a log line to a stored chat (whose text is hashed the
same way) without the words.
"""

from __future__ import annotations

import hashlib

HASH_CHARS = 12


def text_sha256(text: str, length: int = HASH_CHARS) -> str:
    """The first ``length`` hex characters of the sha256 of ``text`` (UTF-8; lone surrogates kept)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def fingerprint(text: str | None) -> str:
    """``"<n> chars, sha256 <12 hex>"`` for a log line; ``"none"`` for None."""
    if text is None:
        return "none"
    return f"{len(text)} chars, sha256 {text_sha256(text)}"
