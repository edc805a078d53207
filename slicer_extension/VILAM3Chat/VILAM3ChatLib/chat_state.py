"""What the chat panel shows: the transcript, the answer as it streams, expert status lines.

The state follows the server's events during a turn (``queued`` while it waits for the server's
work queue, ``token``, ``expert_started``, ``expert_finished``, ``final``; others are ignored) and, when
the turn ends, replaces what it showed live with the
server's own record of the turn. :meth:`ChatState.to_html` renders it for a Qt text browser; every
text is escaped, and each role has its own style.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ROLE_STYLES", "ChatState", "DisplayMessage", "expert_title", "waiting_text"]

#: inline CSS per role (Qt rich text understands these properties)
ROLE_STYLES: dict[str, str] = {
    "user": "background-color:#e3eefb; color:#0b2a4a;",
    "assistant": "background-color:#f4f4f4; color:#111111;",
    "expert": "background-color:#fdf6e3; color:#5b4a1a; font-size:small;",
    "notice": "color:#6b6b6b; font-style:italic;",
    "error": "background-color:#fdecea; color:#a4000f;",
}
ROLE_TITLES = {"user": "You", "assistant": "VILA-M3", "expert": "Expert", "notice": "", "error": "Problem"}
STAND_IN_NOTICE = "The server runs tiny random stand-in weights: these answers are not a medical model's."


@dataclass
class DisplayMessage:
    """One block of the transcript as shown.

    Attributes:
        role: ``user``, ``assistant``, ``expert``, ``notice`` or ``error``.
        text: plain text (escaped when rendered).
        title: the heading (e.g. ``VISTA3D(hepatic tumor)``); the role's title when empty.
        live: shown while the turn runs, replaced by the server's record when it ends.
    """

    role: str
    text: str
    title: str = ""
    live: bool = False


def expert_title(expert: str | None, argument: str | None) -> str:
    """``VISTA3D(hepatic tumor)``, ``BRATS()``."""
    return f"{expert or 'expert'}({argument or ''})"


def waiting_text(data: Mapping[str, Any]) -> str:
    """The status line of a ``queued`` event: ``waiting for the server: 2 ahead``."""
    try:
        ahead = int(data.get("ahead", data.get("position", 1)))
    except (TypeError, ValueError):
        return "waiting for the server…"
    if ahead <= 0:
        return "waiting for the server: next"
    return f"waiting for the server: {ahead} ahead"


def _seconds(value: Any) -> str:
    try:
        return f"{float(value):.1f} s"
    except (TypeError, ValueError):
        return ""


def expert_summary(data: Mapping[str, Any]) -> str:
    """One line about a finished expert run (``expert_finished`` data or an ``experts`` entry)."""
    if data.get("error"):
        return f"failed: {data['error']}"
    names = list((data.get("label_names") or {}).keys())
    found = f"labels: {', '.join(names)}" if names else "done"
    extras = [text for text in (_seconds(data.get("seconds")), "cached" if data.get("cached") else "") if text]
    return f"{found} ({', '.join(extras)})" if extras else found


class ChatState:
    """The panel's chat: messages shown, the answer being streamed, whether a turn runs."""

    def __init__(self) -> None:
        self.messages: list[DisplayMessage] = []
        self.streaming = ""
        self.round: int | None = None
        self.busy = False
        self.waiting = ""  # the turn waits in the server's work queue: its status line, else ""
        self.chat_id: str | None = None
        self._turn_start = 0
        self._turn_finished = False
        self._stand_in_shown = False

    # --- a turn -----------------------------------------------------------------------------------

    def start_turn(self, question: str, chat_id: str | None = None) -> None:
        """The annotator asked ``question``: show it and wait for the answer."""
        self.chat_id = chat_id or self.chat_id
        self._turn_start = len(self.messages)
        self.messages.append(DisplayMessage("user", question, live=True))
        self.streaming, self.round, self.busy, self.waiting = "", None, True, ""
        self._turn_finished = False

    def on_event(self, name: str, data: Mapping[str, Any]) -> None:
        """Follow one server event of the running turn."""
        if name == "queued":
            self.waiting = waiting_text(data)
            return
        self.waiting = ""
        if name == "token":
            piece_round = data.get("round", 0)
            if self.round is not None and piece_round != self.round:
                self._flush_streaming()
            self.round = piece_round
            self.streaming += str(data.get("text", ""))
        elif name == "expert_started":
            self._flush_streaming()
            title = expert_title(data.get("expert"), data.get("argument"))
            self.messages.append(DisplayMessage("expert", "running on the whole volume…", title, live=True))
        elif name == "expert_finished":
            title = expert_title(data.get("expert"), data.get("argument"))
            line = self._live_expert(title)
            text = expert_summary(data)
            if line is None:
                self.messages.append(DisplayMessage("expert", text, title, live=True))
            else:
                line.text = text
        elif name == "final":
            self.finish_turn(data)

    def finish_turn(self, answer: Mapping[str, Any]) -> None:
        """The turn ended: show the server's record of it (the final event or the infer answer).

        A second call for the same turn (the final event, then the returned answer) changes nothing.
        """
        if self._turn_finished:
            return
        self._turn_finished = True
        asked = [shown for shown in self.messages[self._turn_start:] if shown.role == "user"]
        self.messages = self.messages[: self._turn_start]
        self.streaming, self.round, self.busy, self.waiting = "", None, False, ""
        self.chat_id = answer.get("chat_id") or self.chat_id
        turn = answer.get("turn") or []
        if turn:
            self.messages.extend(self.transcript_messages(turn))
        else:  # an answer without the turn's record: keep the question, show the answer
            self.messages.extend(DisplayMessage("user", shown.text) for shown in asked)
            self.messages.append(DisplayMessage("assistant", str(answer.get("answer") or "")))
        vlm = answer.get("vlm") or {}
        if vlm.get("stand_in") and not self._stand_in_shown:
            self.messages.append(DisplayMessage("notice", str(vlm.get("notice") or STAND_IN_NOTICE)))
            self._stand_in_shown = True
        for notice in answer.get("notices") or []:  # experts on stand-in weights, each time one takes part
            if notice != vlm.get("notice"):
                self.messages.append(DisplayMessage("notice", str(notice)))
        if answer.get("cancelled"):
            self.messages.append(DisplayMessage("notice", "Stopped. What was said so far is kept in the chat."))

    def fail(self, message: str) -> None:
        """The turn failed: keep what streamed (marked incomplete) and show the problem."""
        if self.streaming:
            self.messages.append(DisplayMessage("assistant", self.streaming + " …(incomplete)", live=False))
        for shown in self.messages:
            shown.live = False
        self.streaming, self.round, self.busy, self.waiting = "", None, False, ""
        self._turn_finished = True
        self.messages.append(DisplayMessage("error", message))

    def notice(self, text: str) -> None:
        self.messages.append(DisplayMessage("notice", text))

    def clear(self) -> None:
        """A new chat: forget everything shown."""
        self.__init__()

    def load_transcript(self, transcript: Iterable[Mapping[str, Any]], chat_id: str | None = None) -> None:
        """Show a stored chat (``GET /vila_m3/chat/{id}``'s ``messages``)."""
        self.clear()
        self.chat_id = chat_id
        self.messages = self.transcript_messages(transcript)

    # --- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def transcript_messages(transcript: Iterable[Mapping[str, Any]]) -> list[DisplayMessage]:
        """Server transcript messages as shown: the annotator's own words (not the model card and
        slice preamble the model saw), answers, expert results and notes."""
        shown = []
        for message in transcript:
            role = message.get("role")
            text = str(message.get("text") or "")
            if role == "user":
                shown.append(DisplayMessage("user", str(message.get("question") or text)))
            elif role == "assistant":
                shown.append(DisplayMessage("assistant", text))
            elif role == "expert" and message.get("expert"):
                title = expert_title(message.get("expert"), message.get("argument"))
                if message.get("error"):
                    shown.append(DisplayMessage("error", f"failed: {message['error']}", title))
                else:
                    shown.append(DisplayMessage("expert", text.replace("<image>", "[overlay]"), title))
            elif role == "expert":
                shown.append(DisplayMessage("notice", str(message.get("error") or text)))
        return shown

    def _flush_streaming(self) -> None:
        if self.streaming:
            self.messages.append(DisplayMessage("assistant", self.streaming, live=True))
        self.streaming = ""

    def _live_expert(self, title: str) -> DisplayMessage | None:
        for shown in reversed(self.messages):
            if shown.live and shown.role == "expert" and shown.title == title:
                return shown
        return None

    # --- rendering --------------------------------------------------------------------------------

    def to_html(self) -> str:
        """The transcript as simple HTML: one block per message, text escaped, newlines kept."""
        blocks = [_block(message.role, message.title, message.text) for message in self.messages]
        if self.busy:
            shown = self.streaming + " ▍" if self.streaming else (f"… ({self.waiting})" if self.waiting else "…")
            blocks.append(_block("assistant", "", shown))
        return "<html><body>" + "".join(blocks) + "</body></html>"


def _block(role: str, title: str, text: str) -> str:
    style = ROLE_STYLES.get(role, ROLE_STYLES["notice"])
    heading = title or ROLE_TITLES.get(role, "")
    body = html.escape(text).replace("\n", "<br>")
    head = f"<b>{html.escape(heading)}</b><br>" if heading else ""
    return (f'<table width="100%" cellpadding="5" style="margin-bottom:4px;"><tr>'
            f'<td class="{role}" style="{style}">{head}{body}</td></tr></table>')
