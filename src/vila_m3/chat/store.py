"""Chats on disk: one folder per chat with ``chat.json`` (the transcript and what it is about) and
the PNG images the model saw. A chat survives a server restart; writes are atomic, so a request
that fails halfway never loses what was there before.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vila_m3.chat.transcript import Message

IMAGE_CACHE_ENTRIES = 64
#: a chat id: 1-128 letters, digits, "_", "-" or ".", starting with a letter or digit; anchored with \A and \Z
#: (``$`` would also match before a trailing newline, which is not safe in a folder name)
CHAT_ID_PATTERN = r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z"
_CHAT_ID = re.compile(CHAT_ID_PATTERN)


class ChatIdError(ValueError):
    """A chat id that is not safe as a folder name."""


class ChatNotFound(LookupError):
    """A chat that does not exist, or that belongs to someone else (told apart by no one)."""

    def __init__(self, chat_id: str):
        super().__init__(f"no chat '{chat_id}'")
        self.chat_id = chat_id


@dataclass(frozen=True)
class ChatUser:
    """Who opens a chat when login is on.

    Attributes:
        name: the signed-in user; the chats they start are theirs.
        reads_all: reviewers and admins may read every chat (but continue or cancel only their own).
    """

    name: str
    reads_all: bool = False


@dataclass
class Chat:
    """A conversation about one study.

    Attributes:
        chat_id: the client's id (letters, digits, ``_``, ``-``, ``.``; at most 128).
        study: what the chat is about, e.g. ``{"image": "ct_abdomen"}`` or the four sequences.
        modality: ``CT``, ``MRI`` or ``CXR`` as decided on the first turn.
        messages: the transcript.
        labels: the last labelmap the experts produced, as a file name in the chat folder, if any.
        owner: the user who started the chat; None when login was off (chat.json files without it too).
    """

    chat_id: str
    study: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None
    messages: list[Message] = field(default_factory=list)
    labels: str | None = None
    owner: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "chat_id": self.chat_id,
            "owner": self.owner,
            "study": self.study,
            "modality": self.modality,
            "labels": self.labels,
            "messages": [message.as_dict() for message in self.messages],
        }


def may_open(chat: Chat, user: ChatUser | None, write: bool = False) -> bool:
    """Whether ``user`` may read ``chat`` (``write=False``) or continue or cancel it (``write=True``).

    Login off (``user`` None): yes. A chat without messages: yes (it becomes theirs). Its owner: yes.
    Reviewers and admins (``reads_all``): read only. Anyone else, including everyone for a chat
    started while login was off (no owner): no.
    """
    if user is None or not chat.messages or (chat.owner is not None and chat.owner == user.name):
        return True
    return user.reads_all and not write


class ChatStore:
    """All chats under one folder; one lock per chat so a chat's turns run one at a time."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._images: OrderedDict[tuple[str, str], Image.Image] = OrderedDict()  # recently used pictures

    @staticmethod
    def check_id(chat_id: str) -> str:
        if not isinstance(chat_id, str) or not _CHAT_ID.fullmatch(chat_id):
            raise ChatIdError(
                f"chat_id {chat_id!r} is not valid: use 1-128 letters, digits, '_', '-' or '.', starting with a "
                f"letter or digit"
            )
        return chat_id

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def folder(self, chat_id: str) -> Path:
        return self.root / self.check_id(chat_id)

    def lock(self, chat_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(self.check_id(chat_id), threading.Lock())

    def load(self, chat_id: str, user: ChatUser | None = None, write: bool = False) -> Chat:
        """The stored chat, or a new empty one (owned by ``user``).

        ``user`` None means login is off: every chat is everyone's. Otherwise a chat ``user`` may not
        open (see :func:`may_open`; ``write`` for a turn or a cancel) is :class:`ChatNotFound`.
        """
        path = self.folder(chat_id) / "chat.json"
        if not path.is_file():
            return Chat(chat_id, owner=user.name if user is not None else None)
        data = json.loads(path.read_text(encoding="utf-8"))
        chat = Chat(
            chat_id=data["chat_id"],
            study=data.get("study", {}),
            modality=data.get("modality"),
            labels=data.get("labels"),
            messages=[Message.from_dict(item) for item in data.get("messages", [])],
            owner=data.get("owner"),
        )
        if not may_open(chat, user, write):
            raise ChatNotFound(chat_id)
        if not chat.messages and user is not None:
            chat.owner = user.name  # an empty chat is whoever's starts it
        return chat

    def save(self, chat: Chat) -> None:
        """Write ``chat.json`` atomically (a temporary file renamed over the old one)."""
        folder = self.folder(chat.chat_id)
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".chat-", suffix=".json")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(chat.as_dict(), out, indent=1)
        os.replace(temporary, folder / "chat.json")

    def restore(self, chat: Chat, existed: bool, new_images: set[str]) -> None:
        """Put a chat back as it was before a turn that failed: its ``chat.json`` as ``chat`` (or none
        when the chat did not exist), without the pictures the turn wrote; an emptied folder goes too."""
        folder = self.folder(chat.chat_id)
        if existed:
            self.save(chat)
        else:
            (folder / "chat.json").unlink(missing_ok=True)
        for name in new_images:
            (folder / Path(name).name).unlink(missing_ok=True)
            with self._guard:
                self._images.pop((chat.chat_id, name), None)
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    def exists(self, chat_id: str) -> bool:
        """True when the chat has been stored."""
        return (self.folder(chat_id) / "chat.json").is_file()

    def save_image(self, chat_id: str, name: str, image: Image.Image) -> str:
        """Store a PNG the model sees in the chat's folder; returns its name.

        Lossless either way: a grey RGB picture (R = G = B, such as a rendered slice) is written as an
        8-bit grey PNG, a third of the pixels to encode; :meth:`image` reads every picture back as RGB.
        """
        folder = self.folder(chat_id)
        folder.mkdir(parents=True, exist_ok=True)
        stored = image
        if image.mode == "RGB":
            red, green, blue = image.split()
            if red.tobytes() == green.tobytes() == blue.tobytes():
                stored = red
        stored.save(folder / name, format="PNG", compress_level=1)  # lossless; level 1 is ~3x faster
        self._remember((chat_id, name), image)
        return name

    def image(self, chat_id: str, name: str) -> Image.Image:
        """A stored picture (RGB); the same object while it stays among the recently used."""
        with self._guard:
            cached = self._images.get((chat_id, name))
            if cached is not None:
                self._images.move_to_end((chat_id, name))
                return cached
        with Image.open(self.folder(chat_id) / name) as picture:
            image = picture.convert("RGB")
        self._remember((chat_id, name), image)
        return image

    def _remember(self, key: tuple[str, str], image: Image.Image) -> None:
        with self._guard:
            self._images[key] = image
            while len(self._images) > IMAGE_CACHE_ENTRIES:
                self._images.popitem(last=False)

    def chat_ids(self) -> list[str]:
        return sorted(path.parent.name for path in self.root.glob("*/chat.json"))
