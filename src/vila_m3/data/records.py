"""One training conversation (VILA / LLaVA JSON record) and the PNG files it refers to.

A written record is ``{"id", "image": path}`` (one image) or ``{"id", "images": [paths]}``, and
``"conversations": [{"from": "human" | "gpt", "value": text}, ...]`` with one ``<image>`` per image,
in order (EXPERT_PROTOCOL.md §8). Paths are relative to the export folder (``images/<sha256>.png``).
What the record is about (category, group, kind, slice) stays beside it for the manifest and summary.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vila_m3.data.privacy import content_name
from vila_m3.experts.feedback import IMAGE_TOKEN

IMAGES_DIR = "images"


@dataclass
class Record:
    """A conversation before it is written.

    Attributes:
        turns: ``(speaker, text)`` with speaker ``human`` or ``gpt``, alternating, starting with ``human``.
        images: export-relative PNG paths, one per ``<image>`` in the turns, in order.
        category: ``vista3d``, ``brats``, ``cxr`` or ``chat``.
        group: VISTA3D argument, ``BRATS``, ``CXR``, or the experts a chat called.
        kind: the question kind (``presence``, ``count``, ...; ``chat`` for transcripts).
        answer: the answer's class for the summary (``yes``, ``no``, ``count=2``, ``visible``, ...).
        source: the raw source id (image id, study, chat id) - never written.
        split_key: the raw split unit - hashed before it is written.
        axis, index: the slice shown (None for chest X-rays and chats).
    """

    turns: list[tuple[str, str]]
    images: list[str]
    category: str
    group: str
    kind: str
    answer: str
    source: str
    split_key: str
    axis: str | None = None
    index: int | None = None

    def content_key(self) -> str:
        """sha256 of what the model is trained on (texts and image files): equal keys are duplicates."""
        text = json.dumps([self.turns, self.images], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def placeholder_count(self) -> int:
        return sum(text.count(IMAGE_TOKEN) for _, text in self.turns)

    def as_json(self, record_id: str) -> dict[str, Any]:
        """The VILA / LLaVA record."""
        record: dict[str, Any] = {"id": record_id}
        if len(self.images) == 1:
            record["image"] = self.images[0]
        elif self.images:
            record["images"] = list(self.images)
        record["conversations"] = [{"from": speaker, "value": text} for speaker, text in self.turns]
        return record


class ImageWriter:
    """Writes PNGs under ``<export>/images/`` named by their content's sha256 (written once each)."""

    def __init__(self, export_dir: Path, name_length: int = 16):
        self.folder = Path(export_dir) / IMAGES_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name_length = name_length
        self.written: set[str] = set()

    def add(self, picture: Image.Image) -> str:
        """Store a picture as PNG (no text chunks); returns its export-relative path."""
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return self.add_png(buffer.getvalue())

    def add_png(self, data: bytes) -> str:
        """Store PNG bytes as they are; returns the export-relative path."""
        name = content_name(data, self.name_length)
        if name not in self.written:
            (self.folder / name).write_bytes(data)
            self.written.add(name)
        return f"{IMAGES_DIR}/{name}"

    def remove_unused(self, used: set[str]) -> int:
        """Delete written files no kept record refers to; returns how many."""
        removed = 0
        for name in sorted(self.written):
            if f"{IMAGES_DIR}/{name}" not in used:
                (self.folder / name).unlink(missing_ok=True)
                removed += 1
        self.written &= {path.rsplit("/", 1)[-1] for path in used}
        return removed
