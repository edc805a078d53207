"""Chats on disk: one folder per chat with ``chat.json`` (the transcript and what it is about) and
the PNG images the model saw. A chat survives a server restart; writes are atomic, so a request
that fails halfway never loses what was there before.

Crashes: ``chat.json`` is written to a temporary file, flushed to the disk and renamed over the old
one (the folder is flushed too), so a kill or a power cut leaves either version, never a mix. A turn
records itself as running (``"turn": {"state": "running", ...}`` in ``chat.json`` and a
``.turn-running`` marker file) until its last save; a turn whose process is gone (a crash, ``kill -9``)
is marked ``interrupted``: its messages are kept for reading but never sent to the model nor
exported. :meth:`ChatStore.recover` does that at start-up, with the temporaries and unreferenced
pictures a crash leaves; it opens only the folders with a marker or a leftover, so it stays fast for
many chats. A folder that cannot be written raises :class:`ChatsReadOnly` or :class:`ChatsFull`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vila_m3.chat.transcript import Message

logger = logging.getLogger(__name__)

IMAGE_CACHE_ENTRIES = 64
#: this process: a turn recorded as running by another process (one that crashed) is interrupted
BOOT_ID = uuid.uuid4().hex
#: in a chat folder while one of its turns runs (holds the BOOT_ID of the process running it)
TURN_MARKER = ".turn-running"
INTERRUPTED_NOTE = ("this turn was interrupted (the server stopped before it finished); it is kept for reading "
                    "but not sent to the model or used as training data")
_READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: a chat id: 1-128 letters, digits, "_", "-" or ".", starting with a letter or digit; anchored with \A and \Z
#: (``$`` would also match before a trailing newline, which is not safe in a folder name)
CHAT_ID_PATTERN = r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z"
_CHAT_ID = re.compile(CHAT_ID_PATTERN)


class ChatIdError(ValueError):
    """A chat id that is not safe as a folder name."""


class ChatStorageError(OSError):
    """The chats folder cannot take a write; ``problem`` says why (``read_only``, ``full``). The message
    names the problem for a client, without server paths."""

    problem = "storage"

    def __init__(self, message: str, errno_code: int | None = None):
        super().__init__(message)
        self.errno = errno_code


class ChatsReadOnly(ChatStorageError):
    """The chats folder is read-only (or not writable by the server): chats can be read, not saved."""

    problem = "read_only"


class ChatsFull(ChatStorageError):
    """The disk (or quota) of the chats folder is full: the turn could not be saved."""

    problem = "full"


def storage_error(err: OSError) -> ChatStorageError | None:
    """The storage problem an OSError of a chat write is (read-only, full), or None for any other."""
    if isinstance(err, ChatStorageError):
        return err
    if err.errno in _READ_ONLY:
        return ChatsReadOnly("the chats folder is read-only: chats can be read but no turn can be saved; "
                             "ask the administrator to make it writable", err.errno)
    if err.errno in _FULL:
        return ChatsFull("the chats folder's disk is full (no space left): this turn could not be saved; "
                         "ask the administrator to free space", err.errno)
    return None


@contextlib.contextmanager
def storage_errors() -> Iterator[None]:
    """Raise an OSError of a full or read-only chats folder as :class:`ChatsFull` / :class:`ChatsReadOnly`."""
    try:
        yield
    except ChatStorageError:
        raise
    except OSError as err:
        problem = storage_error(err)
        if problem is None:
            raise
        raise problem from err


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to the disk; nothing where folders cannot be opened."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def utc_now() -> str:
    """The time now in ISO 8601, UTC, to the second (``2026-01-31T09:30:00Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _is_leftover(name: str) -> bool:
    """A temporary a crash may leave in a chat folder: ``.chat-*.json`` or a partial ``.*.tmp*`` labelmap."""
    return name.startswith(".chat-") or (name.startswith(".") and ".tmp" in name)


@dataclass
class Recovery:
    """What :meth:`ChatStore.recover` did.

    Attributes:
        folders: chat folders seen; opened: those read in full (a marker or leftovers in them).
        interrupted: ids of chats whose turn was marked interrupted.
        removed: temporaries and unreferenced pictures removed.
        seconds: how long the sweep took (s).
        problems: chats the sweep could not handle (id and error type).
    """

    folders: int = 0
    opened: int = 0
    interrupted: list[str] = field(default_factory=list)
    removed: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


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
        turn: the last turn while it is not done: ``{"state": "running", "first_message": n, "boot": ...,
            "started": ...}`` during a turn, ``{"state": "interrupted", ...}`` once the process that ran
            it is gone; None (and not stored: older chat.json files have none) when it finished.
        models: the chat model that answered each turn, by turn number (1-based, as a string; every user
            message counts): ``{"name", "version", "stand_in"}``; not stored while empty (older chats).
        created: when the chat was started, ISO 8601 UTC (``2026-01-31T09:30:00Z``); None for chats
            stored before it was recorded.
    """

    chat_id: str
    study: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None
    messages: list[Message] = field(default_factory=list)
    labels: str | None = None
    owner: str | None = None
    turn: dict[str, Any] | None = None
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = {
            "chat_id": self.chat_id,
            "owner": self.owner,
            "study": self.study,
            "modality": self.modality,
            "labels": self.labels,
            "messages": [message.as_dict() for message in self.messages],
        }
        if self.turn is not None:
            data["turn"] = dict(self.turn)
        if self.models:
            data["models"] = {key: dict(value) for key, value in self.models.items()}
        if self.created is not None:
            data["created"] = self.created
        return data

    @property
    def running_since(self) -> int | None:
        """The first message of a turn recorded as running (here or by a process now gone), else None."""
        if self.turn is None or self.turn.get("state") != "running":
            return None
        first = self.turn.get("first_message")
        return first if isinstance(first, int) and 0 <= first <= len(self.messages) else len(self.messages)

    def finished_messages(self) -> list[Message]:
        """The messages of finished turns: neither interrupted ones nor those of a turn still running."""
        end = self.running_since
        kept = self.messages if end is None else self.messages[:end]
        return [message for message in kept if not message.interrupted]

    def mark_interrupted(self) -> bool:
        """Mark a turn left running by a process that is gone (not this one) as interrupted: its messages
        and a note saying so; True if there was one."""
        first = self.running_since
        if first is None or self.turn.get("boot") == BOOT_ID:
            return False
        for message in self.messages[first:]:
            message.interrupted = True
        self.messages.append(Message("expert", "", error=INTERRUPTED_NOTE, to_model=False, interrupted=True))
        self.turn = {"state": "interrupted", "first_message": first, "started": self.turn.get("started")}
        return True


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
    """All chats under one folder. A chat's turns are kept one at a time by the chat service's per-chat
    locks (vila_m3.chat.locks), not here: a store may be read while a turn runs."""

    def __init__(self, root: Path):
        self.root = Path(root)
        with contextlib.suppress(OSError):  # a read-only place: reads still work, writes say why (writable())
            self.root.mkdir(parents=True, exist_ok=True)
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

    def load(self, chat_id: str, user: ChatUser | None = None, write: bool = False) -> Chat:
        """The stored chat, or a new empty one (owned by ``user``).

        ``user`` None means login is off: every chat is everyone's. Otherwise a chat ``user`` may not
        open (see :func:`may_open`; ``write`` for a turn or a cancel) is :class:`ChatNotFound`.
        """
        path = self.folder(chat_id) / "chat.json"
        if not path.is_file():
            return Chat(chat_id, owner=user.name if user is not None else None, created=utc_now())
        data = json.loads(path.read_text(encoding="utf-8"))
        chat = Chat(
            chat_id=data["chat_id"],
            study=data.get("study", {}),
            modality=data.get("modality"),
            labels=data.get("labels"),
            messages=[Message.from_dict(item) for item in data.get("messages", [])],
            owner=data.get("owner"),
            turn=data.get("turn") if isinstance(data.get("turn"), dict) else None,
            models=data.get("models") if isinstance(data.get("models"), dict) else {},
            created=data.get("created") if isinstance(data.get("created"), str) else None,
        )
        chat.mark_interrupted()  # a turn left running by a process that is gone (stored by the next save)
        if not may_open(chat, user, write):
            raise ChatNotFound(chat_id)
        if not chat.messages and user is not None:
            chat.owner = user.name  # an empty chat is whoever's starts it
        return chat

    def save(self, chat: Chat) -> None:
        """Write ``chat.json`` atomically: a temporary file, flushed to the disk, renamed over the old one,
        then the folder flushed, so a crash or a power cut keeps the old or the new version whole. A full
        or read-only folder is :class:`ChatsFull` / :class:`ChatsReadOnly`, the old version untouched."""
        folder = self.folder(chat.chat_id)
        text = json.dumps(chat.as_dict(), indent=1)
        with storage_errors():
            folder.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=".chat-", suffix=".json")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    out.write(text)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, folder / "chat.json")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        _fsync_folder(folder)

    # --- turns and crashes -----------------------------------------------------------------------

    def begin_turn(self, chat: Chat) -> None:
        """Record that a turn of ``chat`` starts: the running record goes into the chat's next save, and
        the marker file is written now, before the turn writes anything else. ChatsReadOnly / ChatsFull
        when the folder cannot take it (nothing of the turn is written then)."""
        chat.turn = {"state": "running", "first_message": len(chat.messages), "boot": BOOT_ID,
                     "started": utc_now()}
        folder = self.folder(chat.chat_id)
        with storage_errors():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / TURN_MARKER).write_text(BOOT_ID, encoding="utf-8")

    def finish_turn(self, chat: Chat) -> None:
        """The turn is done: save ``chat`` without its running record, then drop the marker."""
        chat.turn = None
        self.save(chat)
        self._drop_marker(chat.chat_id)

    def _drop_marker(self, chat_id: str) -> None:
        with contextlib.suppress(OSError):
            (self.folder(chat_id) / TURN_MARKER).unlink(missing_ok=True)

    def writable(self) -> ChatStorageError | None:
        """None when chats can be written here, else the problem (read-only, full); leaves nothing behind."""
        try:
            with storage_errors():
                self.root.mkdir(parents=True, exist_ok=True)
                handle, probe = tempfile.mkstemp(dir=self.root, prefix=".chat-probe-", suffix=".json")
                try:
                    os.write(handle, b"{}")
                    os.fsync(handle)
                finally:
                    os.close(handle)
                    os.unlink(probe)
        except ChatStorageError as err:
            return err
        return None

    def recover(self) -> Recovery:
        """The start-up sweep: a turn left running by a process that is gone is marked interrupted (and
        stored); ``.chat-*.json`` temporaries, partial labelmaps and pictures no message refers to are
        removed; a folder left empty goes. Only folders with a turn marker, a leftover or no chat.json
        are read (listing a folder is cheap, so most chats are skipped unread); a turn of this process
        (a second app instance after ``POST /reload``) is left alone."""
        began = time.perf_counter()
        report = Recovery()
        try:
            entries = list(os.scandir(self.root))
        except OSError as err:
            report.problems.append(f"chats folder not readable ({type(err).__name__})")
            return report
        for entry in entries:
            if not _CHAT_ID.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            report.folders += 1
            try:
                names = os.listdir(entry.path)
                if TURN_MARKER in names or "chat.json" not in names or any(_is_leftover(n) for n in names):
                    self._recover_folder(Path(entry.path), names, report)
            except (OSError, ValueError, KeyError, TypeError) as err:
                report.problems.append(f"chat {entry.name}: {type(err).__name__}")
        report.seconds = time.perf_counter() - began
        return report

    def _recover_folder(self, folder: Path, names: list[str], report: Recovery) -> None:
        """One chat folder of :meth:`recover`."""
        marker = folder / TURN_MARKER
        if TURN_MARKER in names:
            with contextlib.suppress(OSError):
                if marker.read_text(encoding="utf-8").strip() == BOOT_ID:
                    return  # a turn of this process is running
        report.opened += 1
        referenced: set[str] = set()
        if "chat.json" in names:
            stored = json.loads((folder / "chat.json").read_text(encoding="utf-8")).get("turn")
            chat = self.load(folder.name)  # marks a turn of a process that is gone as interrupted
            if chat.running_since is not None:
                return  # running in this process (its record came after the listing)
            if stored != chat.turn:
                self.save(chat)
                report.interrupted.append(chat.chat_id)
            referenced = {name for message in chat.messages for name in message.images}
        for name in names:
            if _is_leftover(name) or (name.endswith(".png") and name not in referenced):
                (folder / name).unlink(missing_ok=True)
                report.removed += 1
        if TURN_MARKER in names:
            marker.unlink(missing_ok=True)
        if "chat.json" not in names and not any(folder.iterdir()):
            folder.rmdir()

    def restore(self, chat: Chat, existed: bool, new_images: set[str]) -> None:
        """Put a chat back as it was before a turn that failed: its ``chat.json`` as ``chat`` (or none
        when the chat did not exist), without the pictures the turn wrote; an emptied folder goes too.

        When ``chat.json`` cannot be written back (a full or read-only disk) but still is the old version
        (the turn failed at its first save), the rest is cleaned up all the same; when it holds part of the
        turn, that part, its pictures and the marker stay for the start-up sweep, and the error is raised."""
        folder = self.folder(chat.chat_id)
        try:
            if existed:
                self.save(chat)
            else:
                (folder / "chat.json").unlink(missing_ok=True)
        except OSError:
            if not self._stored_as(chat):
                raise
        for name in new_images:
            (folder / Path(name).name).unlink(missing_ok=True)
            with self._guard:
                self._images.pop((chat.chat_id, name), None)
        self._drop_marker(chat.chat_id)
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    def _stored_as(self, chat: Chat) -> bool:
        """Whether ``chat.json`` on disk is ``chat`` (False when it cannot be read)."""
        try:
            return json.loads((self.folder(chat.chat_id) / "chat.json").read_text(encoding="utf-8")) == chat.as_dict()
        except (OSError, ValueError):
            return False

    def exists(self, chat_id: str) -> bool:
        """True when the chat has been stored."""
        return (self.folder(chat_id) / "chat.json").is_file()

    def save_image(self, chat_id: str, name: str, image: Image.Image) -> str:
        """Store a PNG the model sees in the chat's folder; returns its name.

        Lossless either way: a grey RGB picture (R = G = B, such as a rendered slice) is written as an
        8-bit grey PNG, a third of the pixels to encode; :meth:`image` reads every picture back as RGB.
        """
        folder = self.folder(chat_id)
        with storage_errors():
            folder.mkdir(parents=True, exist_ok=True)
        stored = image
        if image.mode == "RGB":
            red, green, blue = image.split()
            if red.tobytes() == green.tobytes() == blue.tobytes():
                stored = red
        try:
            with storage_errors():
                stored.save(folder / name, format="PNG", compress_level=1)  # lossless; level 1 is ~3x faster
        except BaseException:
            with contextlib.suppress(OSError):
                (folder / name).unlink(missing_ok=True)  # never a partial picture
            raise
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
