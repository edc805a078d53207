"""Parse a ``multipart/form-data`` HTTP body (MONAI Label's infer answer) with the standard library.

MONAI Label answers an infer request that produced a labelmap with two parts: ``params`` (the JSON
answer) and ``image`` (the labelmap file). The body is handed to :mod:`email`, which knows the MIME
rules (boundaries, part headers, the CRLF that belongs to the boundary); part contents come back as
the exact bytes that were sent.
"""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import dataclass

__all__ = ["MultipartError", "Part", "parse_multipart"]


class MultipartError(ValueError):
    """The body is not a multipart message that can be read."""


@dataclass(frozen=True)
class Part:
    """One part: its form field name, file name (None for plain fields), content type and bytes."""

    name: str | None
    filename: str | None
    content_type: str
    content: bytes

    def text(self, encoding: str = "utf-8") -> str:
        return self.content.decode(encoding)


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """The parts of a multipart body, in order.

    Args:
        body: the HTTP body as received.
        content_type: the response's ``Content-Type`` header, which carries the boundary.

    Raises:
        MultipartError: the content type is not multipart, has no boundary, or the body has no parts.
    """
    if not content_type.lower().startswith("multipart/"):
        raise MultipartError(f"not a multipart answer (Content-Type: {content_type})")
    if "boundary=" not in content_type.lower():
        raise MultipartError("the multipart answer names no boundary")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise MultipartError("the multipart answer could not be split into parts")
    parts = []
    for sub in message.iter_parts():
        payload = sub.get_payload(decode=True)
        parts.append(Part(
            name=sub.get_param("name", header="content-disposition"),
            filename=sub.get_filename(),
            content_type=sub.get_content_type(),
            content=payload if isinstance(payload, bytes) else b"",
        ))
    if not parts:
        raise MultipartError("the multipart answer has no parts")
    return parts
