"""The page's list of chats to reopen, filled from the server (``GET /vila_m3/chat/``: the user's chats,
newest first), refreshed when the page connects and after each turn.

Each entry reads ``title · study · time``. Reopening a chat about another study than the one on the
page loads that study first (a datastore image, or an uploaded session while the server still has it),
then its transcript and its last labelmap, as :meth:`ChatViewer.reopen_chat` does for the study shown.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .study_upload import UploadError, session_key

if TYPE_CHECKING:
    from .app import ChatViewer

logger = logging.getLogger(__name__)

LIST_LIMIT = 100


def entry_text(chat: dict[str, Any]) -> str:
    """``title · study · 2026-01-31 09:30 UTC`` for a listed chat."""
    title = str(chat.get("title") or "(no question)")
    study = str(chat.get("study") or "?")
    if chat.get("session"):
        study = f"upload {study[:8]}"
    when = str(chat.get("updated") or "").replace("T", " ")
    when = f"{when[:16]} UTC" if when.endswith("Z") and len(when) >= 16 else when
    owner = f" · {chat['owner']}" if chat.get("owner") else ""
    return f"{title} · {study} · {when}{owner}"


def study_key(chat: dict[str, Any]) -> str:
    """The page's study key of a listed chat's study ("" when it names none)."""
    study = str(chat.get("study") or "")
    return session_key(study) if study and chat.get("session") else study


class ServerChats:
    """The reopen list (state ``old_chats``: ``[{"value": chat id, "text": ...}]``) and reopening across studies.

    Args:
        viewer: the page (its state, client, jobs, study loading and ``reopen_chat``).
    """

    def __init__(self, viewer: ChatViewer):
        self.viewer = viewer
        self.listed: dict[str, dict[str, Any]] = {}  # chat id -> the server's summary
        self.pending: tuple[str, str] | None = None  # (chat id, study key) to reopen once that study is shown
        viewer.state.old_chats = []

    def refresh(self) -> None:
        """Ask the server for the user's chats (in a worker); the list changes when it answers. A failure
        leaves the list as it was (the page's status says what the server said)."""
        if self.viewer.jobs.running("chat-list"):
            return

        def failed(err: BaseException) -> None:
            logger.info("listing the chats failed: %s", err)

        self.viewer.jobs.start("chat-list", lambda job: self.viewer.client.list_chats(LIST_LIMIT), self._listed,
                               failed)

    def _listed(self, chats: list[dict[str, Any]]) -> None:
        self.listed = {str(chat["chat_id"]): chat for chat in chats}
        entries = [{"value": chat_id, "text": entry_text(chat)} for chat_id, chat in self.listed.items()]
        asking = (self.viewer.turn or {}).get("chat_id")
        if asking and asking not in self.listed:  # its first turn is still running: not stored yet
            entries += [entry for entry in self.viewer.state.old_chats or [] if entry["value"] == asking]
        with self.viewer.state:
            self.viewer.state.old_chats = entries

    def note_asked(self, chat_id: str, question: str) -> None:
        """A turn of ``chat_id`` starts on this page: list it now, the server's entry replaces it later."""
        if any(entry["value"] == chat_id for entry in self.viewer.state.old_chats or []):
            return
        text = f"{question[:60]} · {self.viewer.state.study} · now"
        self.viewer.state.old_chats = [{"value": chat_id, "text": text}, *(self.viewer.state.old_chats or [])]

    def open_study_first(self, chat_id: str) -> bool:
        """When the listed chat ``chat_id`` is about another study than the page shows, load that study and
        reopen the chat once it is shown (True); False when the page's own reopening can go ahead."""
        chat = self.listed.get(chat_id)
        key = study_key(chat) if chat is not None else ""
        viewer = self.viewer
        if not key or (viewer.volume is not None and viewer.state.study == key):
            return False
        if viewer.turn is not None:
            viewer._show_error(ValueError("A question is being answered; wait for it or press Stop."))
            return True
        if chat.get("session"):
            viewer.uploads.remember(str(chat["study"]), f"session {str(chat['study'])[:8]}")
        elif key not in (viewer.state.studies or []):
            viewer._show_error(UploadError(f"The chat's study '{key}' is no longer in the server's datastore."))
            return True
        self.pending = (chat_id, key)
        viewer._set_status(f"Loading the study of chat {chat_id}…")
        with viewer.state:
            viewer.state.study = key  # the page loads it; study_shown then reopens the chat
        return True

    def study_shown(self, study: str) -> None:
        """The page shows ``study``: reopen the chat waiting for it, if any."""
        if self.pending is None or self.pending[1] != study:
            return
        chat_id, _ = self.pending
        self.pending = None
        with self.viewer.state:
            self.viewer.state.old_chat = chat_id
        self.viewer.reopen_chat()

