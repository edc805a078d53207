"""The chats a user may reopen, newest first: what ``GET /vila_m3/chat/`` lists.

A listing reads each chat folder's ``chat.json`` modification time (one ``stat``), orders the chats by
it, and opens only as many ``chat.json`` files as it needs to fill the page (those the user may not read
are skipped), so it stays quick with many chats. Who sees what is :func:`vila_m3.chat.store.may_open`'s
reading rule: with login off (``user`` None) every chat; with login on a user's own chats, and every
chat for reviewers and admins (chats stored before chats had owners included).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

from vila_m3.chat.store import CHAT_ID_PATTERN, Chat, ChatStore, ChatUser, may_open
from vila_m3.chat.transcript import Message

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
TITLE_CHARS = 80
#: a session id as ``PUT /session/`` makes them (a UUID): how chats stored before the study's source was
#: recorded tell a session from a datastore image
_SESSION_ID = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_CHAT_ID = re.compile(CHAT_ID_PATTERN)


class ListingError(ValueError):
    """A listing parameter out of range; the message names it and its bounds."""


@dataclass(frozen=True)
class ChatSummary:
    """One chat of a listing.

    Attributes:
        chat_id: the chat's id.
        title: the first question, cut to :data:`TITLE_CHARS` characters ("" before any).
        study: the datastore image id or session id the chat is about ("" for the four BRATS sequences
            given one by one).
        session: True when ``study`` is an uploaded session (gone once it expires), False for a datastore image.
        modality: ``CT``, ``MRI``, ``CXR`` or None.
        turns: questions asked (user messages).
        created, updated: ISO 8601 UTC times of the chat's start and its last stored change.
        owner: who started it (None: login was off, or stored before chats had owners).
        has_labels: whether the chat has a labelmap to show.
    """

    chat_id: str
    title: str
    study: str
    session: bool
    modality: str | None
    turns: int
    created: str
    updated: str
    owner: str | None
    has_labels: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_page(limit: int, offset: int) -> None:
    """ListingError unless 1 <= ``limit`` <= :data:`MAX_LIMIT` and ``offset`` >= 0."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ListingError(f"limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ListingError(f"offset must be a whole number from 0, got {offset!r}")


def iso_utc(seconds: float) -> str:
    """A POSIX time (s) as ISO 8601 UTC to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def short_title(question: str, limit: int = TITLE_CHARS) -> str:
    """``question`` on one line, cut to ``limit`` characters with an ellipsis when longer."""
    line = " ".join(question.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def summarize(chat: Chat, updated_s: float, created_s: float) -> ChatSummary:
    """The summary of a stored chat; ``updated_s``/``created_s`` (POSIX s) stand in for times it does not keep."""
    users = [message for message in chat.messages if message.role == "user"]
    first = next((message for message in users if (message.question or message.text).strip()), None)
    study = chat.study or {}
    study_id = str(study.get("image") or "")
    source = study.get("source")
    session = source == "session" if source in ("session", "datastore") else bool(_SESSION_ID.match(study_id))
    return ChatSummary(
        chat_id=chat.chat_id, title=short_title(_question(first)) if first is not None else "", study=study_id,
        session=session, modality=chat.modality, turns=len(users),
        created=chat.created or iso_utc(created_s), updated=iso_utc(updated_s), owner=chat.owner,
        has_labels=bool(chat.labels),
    )


def _question(message: Message) -> str:
    """The annotator's own words (older user messages only have the text the model saw)."""
    if message.question:
        return message.question
    return message.text.replace("<image>", " ")


def list_chats(store: ChatStore, user: ChatUser | None, limit: int = DEFAULT_LIMIT,
               offset: int = 0) -> tuple[list[ChatSummary], bool]:
    """The chats ``user`` may read, newest change first, ``offset`` of them skipped, at most ``limit``;
    and whether more follow. Chats without messages are not listed (they are nobody's yet).
    ListingError for a bad ``limit``/``offset``."""
    check_page(limit, offset)
    stamped: list[tuple[float, str]] = []
    try:
        entries = list(os.scandir(store.root))
    except OSError:
        return [], False
    for entry in entries:
        if not _CHAT_ID.fullmatch(entry.name):
            continue
        try:
            stamped.append((os.stat(os.path.join(entry.path, "chat.json")).st_mtime, entry.name))
        except OSError:
            continue  # a folder without a stored chat (a turn that failed before its first save)
    stamped.sort(reverse=True)
    page: list[ChatSummary] = []
    visible = 0
    for updated_s, chat_id in stamped:
        chat = _read(store, chat_id)
        if chat is None or not chat.messages or not may_open(chat, user):
            continue
        visible += 1
        if visible <= offset:
            continue
        if len(page) == limit:
            return page, True
        created_s = updated_s if chat.created else _first_file_time(store, chat_id, updated_s)
        page.append(summarize(chat, updated_s, created_s))
    return page, False


def _read(store: ChatStore, chat_id: str) -> Chat | None:
    """The stored chat as it is on disk (a turn running now included), or None when it cannot be read."""
    try:
        data = json.loads((store.folder(chat_id) / "chat.json").read_text(encoding="utf-8"))
        return Chat(chat_id=chat_id, study=data.get("study") or {}, modality=data.get("modality"),
                    labels=data.get("labels"), owner=data.get("owner"),
                    messages=[Message.from_dict(item) for item in data.get("messages", [])],
                    created=data.get("created") if isinstance(data.get("created"), str) else None)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _first_file_time(store: ChatStore, chat_id: str, default: float) -> float:
    """The oldest modification time (s) of a chat folder's files: when a chat stored before its start
    time was recorded began, near enough (its first turn's picture)."""
    try:
        with os.scandir(store.folder(chat_id)) as files:
            return min([default, *(entry.stat().st_mtime for entry in files if entry.is_file())])
    except OSError:
        return default
