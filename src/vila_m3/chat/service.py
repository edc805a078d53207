"""The chat service: the one owner of a server's chat state.

It owns, for the server's whole life:

- the chat store (one :class:`ChatStore`; reading a chat goes to it and never loads a model);
- the per-chat locks (:class:`ChatLocks`: a chat's turns run one at a time, in arrival order, whichever
  model version each of them uses);
- the running turns and their cancel events (a cancel reaches the turn whether it runs, waits for its chat
  or waits in the work queue);
- the VLM provider (:class:`VlmProvider`), which opens the served VLM on the first turn and swaps it when the
  served version changes (a train task registered a new version); the turn's :class:`ChatLoop` is built
  around it and the service's store, locks and queues, so a swap changes the model and nothing else.

Turns on different chats run in parallel, as far as the work queue lets their model work run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vila_m3.chat.listing import DEFAULT_LIMIT, ChatSummary, list_chats
from vila_m3.chat.locks import ChatLocks
from vila_m3.chat.loop import DEFAULT_MAX_ROUNDS, ChatLoop, ChatVLM, EventSink, TurnRequest, TurnResult
from vila_m3.chat.store import Chat, ChatStore, ChatUser
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.service import ExpertService
from vila_m3.work_queue import REMOTE, JobControl, WorkQueues, normalize_device


@dataclass
class ServedVLM:
    """A VLM as the provider opened it.

    Attributes:
        vlm: the model (``VilaChat``, ``RemoteVLM``, a scripted double in tests).
        name: how answers name it (None: its own ``describe()``).
        info: further fields of every answer's ``vlm`` entry (e.g. ``{"version": "v2"}``).
    """

    vlm: ChatVLM
    name: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


class VlmProvider:
    """Opens the served VLM on demand and swaps it when ``version()`` changes.

    Args:
        open_vlm: opens the VLM of the version being served (loading a checkpoint takes a while).
        version: which version should be served now (None: always the same).
    """

    def __init__(self, open_vlm: Callable[[], ServedVLM], version: Callable[[], object] | None = None):
        self._open = open_vlm
        self._version = version or (lambda: None)
        self._served: ServedVLM | None = None
        self._served_version: object = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> ServedVLM | None:
        """The VLM open now, without opening one (None before the first turn)."""
        return self._served

    def current(self) -> tuple[ServedVLM, bool]:
        """The VLM of the version to serve, opened if needed; and whether it was opened by this call."""
        with self._lock:
            wanted = self._version()
            if self._served is not None and wanted == self._served_version:
                return self._served, False
            self._served = None  # the old model goes once no running turn holds it (not before its turns end)
            self._served = self._open()
            self._served_version = wanted
            return self._served, True


def vlm_device(vlm: Any) -> str:
    """The work queue a VLM's generations wait in: ``remote`` for a served engine, else its model's device."""
    named = getattr(vlm, "queue_device", None)
    if named:
        return normalize_device(named)
    from vila_m3.vlm.remote import RemoteVLM

    if isinstance(vlm, RemoteVLM):
        return REMOTE
    return normalize_device(getattr(getattr(vlm, "model", None), "device", None) or "cpu")


@dataclass(eq=False)
class _Running:
    user: ChatUser | None
    cancel: threading.Event


class ChatService:
    """One server's chats: store, per-chat locks, running turns and the VLM provider (see the module docstring).

    Args:
        store: where chats live.
        provider: the served VLM.
        experts, registry: the server's experts.
        queues: the server's work queues (None: model work runs at once).
        max_rounds: expert rounds per turn.
    """

    def __init__(self, store: ChatStore, provider: VlmProvider, experts: ExpertService, registry: ExpertRegistry,
                 queues: WorkQueues | None = None, max_rounds: int = DEFAULT_MAX_ROUNDS):
        self.store = store
        self.provider = provider
        self.experts = experts
        self.registry = registry
        self.queues = queues
        self.max_rounds = max_rounds
        self.locks = ChatLocks()
        self._loop: ChatLoop | None = None
        self._loop_for: ServedVLM | None = None
        self._running: dict[str, list[_Running]] = {}
        self._guard = threading.Lock()

    # --- reading: never a model ---------------------------------------------------------------------

    def open(self, chat_id: str, user: ChatUser | None = None, write: bool = False) -> Chat:
        """The stored chat (a new one is empty); ChatNotFound for another user's, ChatIdError for a bad id."""
        return self.store.load(chat_id, user, write)

    def chats(self, user: ChatUser | None = None, limit: int = DEFAULT_LIMIT,
              offset: int = 0) -> tuple[list[ChatSummary], bool]:
        """The chats ``user`` may read, newest first, and whether more follow (vila_m3.chat.listing)."""
        return list_chats(self.store, user, limit, offset)

    def labels_path(self, chat_id: str, user: ChatUser | None = None) -> Path | None:
        """The chat's last labelmap file, None when it has none."""
        chat = self.open(chat_id, user)
        return self.store.folder(chat_id) / chat.labels if chat.labels else None

    def limits(self) -> dict[str, Any]:
        """The loaded VLM's bounds for turn params (context length, special tokens); {} before one is loaded."""
        loop = self._loop
        if loop is None:
            return {}
        return {"context_length": loop.context_length, "special_tokens": loop.special_tokens}

    # --- turns ---------------------------------------------------------------------------------

    def loop(self) -> ChatLoop:
        """The chat loop around the VLM to serve now (opening or swapping it); the store, locks and queues
        are the service's whatever the model."""
        served, _ = self.provider.current()
        with self._guard:
            if self._loop is None or self._loop_for is not served:
                loop = ChatLoop(served.vlm, self.experts, self.registry, self.store, max_rounds=self.max_rounds,
                                vlm_name=served.name, locks=self.locks, queues=self.queues,
                                vlm_device=vlm_device(served.vlm))
                loop.vlm_info.update(served.info)
                self._loop, self._loop_for = loop, served
            return self._loop

    def check(self, turn: TurnRequest) -> None:
        """Everything a turn checks before its first word (ChatNotFound, ChatIdError, TurnParamsError,
        StudyError, VolumeReadError): the chat may be continued by its user, params against the served VLM,
        the study and the slice."""
        self.open(turn.chat_id, turn.user, write=True)
        loop = self.loop()
        loop.check_request(turn)
        loop.open_study(turn)

    def admit(self) -> None:
        """QueueFull when the VLM's work queue takes no more waiting jobs (before a stream starts)."""
        if self.queues is not None:
            self.queues.queue(self.loop().vlm_device).admit()

    def run(self, turn: TurnRequest, on_event: EventSink | None = None, cancel: threading.Event | None = None,
            control: JobControl | None = None) -> TurnResult:
        """Run ``turn`` after the chat's earlier turns; :meth:`cancel` (or ``cancel`` set) stops it, at once
        while it waits. ``control.waited_s`` gives its time in the work queue (s)."""
        running = _Running(turn.user, cancel or threading.Event())
        with self._guard:
            self._running.setdefault(turn.chat_id, []).append(running)
        try:
            return self.loop().run_turn(turn, on_event=on_event, cancel=running.cancel, control=control)
        finally:
            with self._guard:
                entries = self._running.get(turn.chat_id, [])
                if running in entries:
                    entries.remove(running)
                if not entries:
                    self._running.pop(turn.chat_id, None)

    def cancel(self, chat_id: str, user: ChatUser | None = None) -> bool:
        """Stop the chat's turns that ``user`` started (all with login off): the running one and those
        waiting. False when there is none (ChatNotFound for a chat ``user`` may not continue)."""
        self.open(chat_id, user, write=True)
        with self._guard:
            mine = [entry for entry in self._running.get(chat_id, [])
                    if user is None or (entry.user is not None and entry.user.name == user.name)]
        for entry in mine:
            entry.cancel.set()
        return bool(mine)

    def running(self, chat_id: str) -> int:
        """How many turns of ``chat_id`` run or wait now."""
        with self._guard:
            return len(self._running.get(chat_id, []))
