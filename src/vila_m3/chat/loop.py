"""One chat turn: render the slice, prompt the model, run the experts it asks for on the whole
volume, feed their results back, and let it answer again (EXPERT_PROTOCOL.md §1-§3).

Only text the model generated is scanned for triggers; the user's words never are. Every answer,
including those after feedback, is scanned; expert rounds are bounded; an expert failure becomes an
expert message to the model and a visible error, never an exception out of the turn.

A VLM with ``tool_calling`` (a remote model in tool-calling mode, ``--conf vlm_tools on``) is offered
the experts as OpenAI tools instead of the model card, and its tool calls run the experts under the
same rules (only its calls, bounded rounds, validated arguments, failures and invalid calls fed back
as the call's result); its text is not scanned for triggers (:mod:`vila_m3.chat.tool_conversation`).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vila_m3.chat.locks import ChatLocks, TurnCancelledWaiting
from vila_m3.chat.params import DEFAULT_CONTEXT_TOKENS, GenerationParams, parse_turn_params
from vila_m3.chat.store import Chat, ChatStore, ChatUser
from vila_m3.chat.study import Study, open_study
from vila_m3.chat.tool_conversation import tool_conversation
from vila_m3.chat.transcript import Message, vlm_conversation
from vila_m3.experts.colors import overlay_colors_float
from vila_m3.experts.feedback import error_feedback
from vila_m3.experts.registry import ExpertRegistry, ExpertSpec
from vila_m3.experts.result import SegmentationResult
from vila_m3.experts.service import ExpertService
from vila_m3.experts.tools import ToolCallError, expert_tools, resolve_tool_call
from vila_m3.experts.triggers import Trigger, find_triggers
from vila_m3.imaging import Volume, save_labelmap
from vila_m3.imaging.overlay import render_overlay
from vila_m3.logtext import fingerprint
from vila_m3.security.paths import scrub_paths
from vila_m3.vlm.errors import PromptTooLongError
from vila_m3.vlm.generation import DEFAULT_MIN_NEW_TOKENS
from vila_m3.vlm.prompting import special_token_texts
from vila_m3.work_queue import JobCancelled, JobControl, WorkQueues

logger = logging.getLogger(__name__)

DEFAULT_MAX_ROUNDS = 3
EventSink = Callable[[str, dict[str, Any]], None]


class ChatVLM(Protocol):
    """What the loop needs of a VLM: the local checkpoint (VilaChat) and RemoteVLM both fit."""

    is_stand_in: bool

    def generate(self, conversation, images=(), max_new_tokens: int = 1024, temperature: float = 0.0,
                 top_p: float = 1.0, min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS, stream=None, cancel=None, **kwargs) -> Any: ...


@dataclass
class TurnRequest:
    """One question of the annotator.

    Attributes:
        chat_id: the chat this turn belongs to (created on first use).
        question: the annotator's words.
        images: ``{"image": path}`` or the four MRI sequences ``{"t1c": path, "t1": ..., "t2": ..., "flair": ...}``.
        axis, slice_index: the slice on screen (index along the RAS-oriented axis; None = middle).
        modality: the client's override (``CT``, ``MRI``, ``CXR``), else detected from the data.
        study: what to remember about the study (e.g. datastore image ids), stored with the chat.
        user: who asks when login is on (a new chat becomes theirs; another's is ChatNotFound); None: login off.
    """

    chat_id: str
    question: str
    images: Mapping[str, str | Path]
    axis: str = "axial"
    slice_index: int | None = None
    modality: str | None = None
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    study: dict[str, Any] = field(default_factory=dict)
    user: ChatUser | None = None


@dataclass
class ExpertCall:
    """One expert run within a turn."""

    expert: str
    argument: str | None
    seconds: float
    cached: bool = False
    error: str | None = None
    label_names: dict[str, int] = field(default_factory=dict)
    stand_in: str | None = None  # what the expert's stand-in weights are, None for real weights

    @property
    def notice(self) -> str | None:
        """What the user must be told about this result's weights."""
        if not self.stand_in:
            return None
        return f"{self.expert} ran on stand-in weights ({self.stand_in}): its result is not a medical model's"

    def as_dict(self) -> dict[str, Any]:
        data = {"expert": self.expert, "argument": self.argument, "seconds": round(self.seconds, 4),
                "cached": self.cached, "label_names": self.label_names, "stand_in": bool(self.stand_in)}
        if self.stand_in:
            data["notice"] = self.notice
        if self.error:
            data["error"] = self.error
        return data


@dataclass
class TurnResult:
    """Everything a client gets back from a turn (``as_dict`` is the JSON of the infer task)."""

    chat: Chat
    answer: str
    first_message: int
    experts: list[ExpertCall]
    labels: Volume | None
    label_names: dict[str, int]
    label_colors: dict[str, list[int]]
    timings: list[dict[str, Any]]
    vlm: dict[str, Any]
    axis: str
    slice_index: int
    cancelled: bool = False

    def as_dict(self) -> dict[str, Any]:
        messages = [message.as_dict() for message in self.chat.messages]
        return {
            "chat_id": self.chat.chat_id,
            "answer": self.answer,
            "transcript": messages,
            "turn": messages[self.first_message:],
            "experts": [call.as_dict() for call in self.experts],
            "label_names": self.label_names,
            "label_colors": self.label_colors,
            "timings": self.timings,
            "vlm": self.vlm,
            "modality": self.chat.modality,
            "slice": {"axis": self.axis, "index": self.slice_index},
            "cancelled": self.cancelled,
            "notices": self.notices,
        }

    @property
    def notices(self) -> list[str]:
        """Every stand-in this turn's answer came from (the VLM, each expert), in words for the user."""
        found = [self.vlm["notice"]] if self.vlm.get("notice") else []
        return found + list(dict.fromkeys(call.notice for call in self.experts if call.notice))


class ChatLoop:
    """Runs chat turns against one VLM and the experts of one server.

    Args:
        vlm: the model (``VilaChat``, ``RemoteVLM`` or a test double).
        experts: the shared expert runners and caches.
        registry: the experts the model is told about (only available ones are in the card).
        store: where chats live.
        max_rounds: expert rounds per turn (feedback → answer); further triggers are reported, not run.
        max_triggers: distinct triggers run from one answer.
        locks: the per-chat locks (a chat's turns run one at a time, in arrival order); shared by every loop
            of a server (the chat service's), else the loop's own.
        queues, vlm_device: the server's work queues and the queue the VLM's generations wait in
            (``cuda:0``, ``cpu``, ``remote``); without queues a generation runs at once.
    """

    def __init__(self, vlm: ChatVLM, experts: ExpertService, registry: ExpertRegistry, store: ChatStore,
                 max_rounds: int = DEFAULT_MAX_ROUNDS, max_triggers: int = 8, vlm_name: str | None = None,
                 locks: ChatLocks | None = None, queues: WorkQueues | None = None, vlm_device: str = "cpu"):
        self.vlm = vlm
        self.locks = locks or ChatLocks()
        self.queues = queues
        self.vlm_device = vlm_device
        self.experts = experts
        self.registry = registry
        self.store = store
        self.max_rounds = max_rounds
        self.max_triggers = max_triggers
        self.tool_calling = bool(getattr(vlm, "tool_calling", False))
        self.tools = expert_tools(registry) if self.tool_calling else []
        describe = getattr(vlm, "describe", None)
        self.vlm_info = {
            "name": vlm_name or (describe() if callable(describe) else type(vlm).__name__),
            "stand_in": bool(getattr(vlm, "is_stand_in", False)),
        }
        if self.vlm_info["stand_in"]:
            note = getattr(vlm, "stand_in_note", None) or "tiny random weights for tests; not a medical model"
            self.vlm_info["notice"] = f"stand-in VLM ({note}): the answers are not a medical model's"

    # --- the turn ------------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        """The VLM's context in tokens (its own where it says, else the releases' 4096): ``max_new_tokens``' bound."""
        return int(getattr(self.vlm, "context_length", None) or DEFAULT_CONTEXT_TOKENS)

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The served tokenizer's special-token strings (none for a remote VLM), refused in questions."""
        tokenizer = getattr(self.vlm, "tokenizer", None)
        return () if tokenizer is None else tuple(sorted(special_token_texts(tokenizer)))

    def check_request(self, request: TurnRequest) -> None:
        """Refuse a turn whose chat id, question or generation settings are not valid, before anything is
        read or written (ChatIdError, TurnParamsError); the study and slice are checked when loaded."""
        self.store.check_id(request.chat_id)
        parse_turn_params({"prompt": request.question, "max_new_tokens": request.max_new_tokens,
                           "temperature": request.temperature, "top_p": request.top_p},
                          context_length=self.context_length, special_tokens=self.special_tokens,
                          model=GenerationParams)

    def open_study(self, request: TurnRequest) -> tuple[Study, str, int]:
        """The turn's study and the (axis, index) to render; StudyError / VolumeReadError name the problem."""
        study = open_study(request.images, self.experts.load_volume, request.modality)
        axis, index = study.check_slice(request.axis, request.slice_index)
        return study, axis, index

    def run_turn(self, request: TurnRequest, on_event: EventSink | None = None,
                 cancel: threading.Event | None = None, control: JobControl | None = None) -> TurnResult:
        """Run one turn. The request is checked in full before anything is stored; during the turn the
        chat is saved after every message, and if a step fails (the VLM is down, an error of ours) the
        stored chat goes back to what it was before the turn, so its next turn starts clean.

        The turn waits for the chat's earlier turns (arrival order), and its model work waits in the work
        queue: ``queued`` events (``position``, ``ahead``) say so. Cancelled before its first answer
        started (waiting for the chat or the queue), a turn leaves the chat as it was and answers
        ``cancelled``; ``control.waited_s`` sums its time in the queue (s)."""
        emit = on_event or (lambda name, data: None)
        self.check_request(request)
        cancel = cancel or (control.cancel if control is not None else None) or threading.Event()
        control = control or JobControl()
        control.cancel = cancel
        if control.on_queued is None:
            control.on_queued = lambda position, ahead: emit("queued", {"position": position, "ahead": ahead})
        try:
            with self.locks.hold(request.chat_id, cancel):
                return self._run_locked(request, emit, cancel, control)
        except TurnCancelledWaiting:
            return self._not_started(request, request.axis, request.slice_index)

    def _not_started(self, request: TurnRequest, axis: str, index: int | None) -> TurnResult:
        """The answer of a turn cancelled before the model saw it: the chat as it is, nothing added."""
        chat = self.store.load(request.chat_id, request.user, write=True)
        return TurnResult(chat, "", len(chat.messages), [], None, {}, {}, [], dict(self.vlm_info), axis,
                          -1 if index is None else index, cancelled=True)

    def _job(self, device: str, work: Callable[[], Any], control: JobControl) -> Any:
        """``work()`` as a job of ``device``'s work queue (at once without queues)."""
        if self.queues is None:
            return work()
        return self.queues.run(device, work, control)

    def _run_locked(self, request: TurnRequest, emit: EventSink, cancel: threading.Event,
                    control: JobControl) -> TurnResult:
        timings: list[dict[str, Any]] = []
        clock = time.perf_counter()

        def step(name: str, began: float) -> None:
            timings.append({"step": name, "seconds": round(time.perf_counter() - began, 4)})

        chat = self.store.load(request.chat_id, request.user, write=True)
        study, axis, index = self.open_study(request)
        step("load", clock)
        before, existed = copy.deepcopy(chat), self.store.exists(request.chat_id)
        self.store.begin_turn(chat)  # recorded as running until its last save: a crash marks it interrupted
        try:
            return self._turn(chat, study, axis, index, request, emit, control, timings, step, clock)
        except JobCancelled:  # still waiting for its first answer: the turn leaves nothing
            self.store.restore(before, existed, {name for message in chat.messages for name in message.images}
                               - {name for message in before.messages for name in message.images})
            return self._not_started(request, axis, index)
        except BaseException:
            seen = {name for message in before.messages for name in message.images}
            written = {name for message in chat.messages for name in message.images} - seen
            try:
                self.store.restore(before, existed, written)
                logger.warning("a chat turn failed; the chat is kept as it was before the turn")
            except OSError:
                logger.exception("a chat turn failed and the chat could not be put back as it was")
            raise

    def _turn(self, chat: Chat, study: Study, axis: str, index: int, request: TurnRequest, emit: EventSink,
              control: JobControl, timings: list[dict[str, Any]], step: Callable[[str, float], None],
              clock: float) -> TurnResult:
        """The turn's steps after loading: the user message, answers, expert rounds, the labelmap."""
        began = time.perf_counter()
        first_message = len(chat.messages)
        # file names only: a chat (and GET of it) never holds server paths
        file_names = {name: Path(path).name for name, path in study.paths.items()}
        chat.study = {**chat.study, **request.study, "images": file_names}
        chat.modality = study.modality
        user = self._user_message(chat, study, request.question, axis, index)
        logger.debug("chat turn: question %s", fingerprint(request.question))  # never the words (privacy)
        chat.messages.append(user)
        number = str(sum(message.role == "user" for message in chat.messages))  # the turn's labelmap number
        chat.models[number] = {key: self.vlm_info.get(key) for key in ("name", "version", "stand_in")}
        self.store.save(chat)
        step("render", began)

        calls: list[ExpertCall] = []
        segmentation: SegmentationResult | None = None  # the last segmentation of the turn
        answer, cancelled = "", False
        for round_number in range(self.max_rounds + 1):
            began = time.perf_counter()
            try:
                answer, cancelled, tool_calls = self._generate(chat, request, emit, control, round_number)
            except JobCancelled:
                if round_number == 0:
                    raise
                answer, cancelled = "", True  # cancelled while its next answer waited: the turn ends here
                break
            step(f"generate {round_number + 1}", began)
            logger.debug("chat turn: answer %d %s%s", round_number + 1, fingerprint(answer),
                         " (cancelled)" if cancelled else "")
            chat.messages.append(Message("assistant", answer))
            self.store.save(chat)
            if cancelled:
                break
            if self.tool_calling:
                if not tool_calls:
                    break
                if round_number == self.max_rounds:
                    names = ", ".join(f"{call.name}({call.arguments})" for call in tool_calls)
                    chat.messages.append(Message("expert", "", to_model=False, error=(
                        f"expert round limit ({self.max_rounds}) reached; not run: {names}")))
                    break
                produced, cancelled = self._run_tool_calls(chat, study, tool_calls, axis, index, request.question,
                                                           emit, control, calls, step)
                segmentation = produced or segmentation
                if cancelled:
                    break
                continue
            scan = find_triggers(answer, self.registry, max_triggers=self.max_triggers)
            for problem in scan.problems:
                chat.messages.append(Message("expert", "", error=problem, to_model=False))
            if not scan.triggers:
                break
            if round_number == self.max_rounds:
                names = ", ".join(trigger.raw for trigger in scan.triggers)
                chat.messages.append(Message("expert", "", to_model=False, error=(
                    f"expert round limit ({self.max_rounds}) reached; not run: {names}")))
                break
            question = None if scan.segmented_only else request.question
            for trigger in scan.triggers:
                began = time.perf_counter()
                try:
                    message, call, produced = self._run_expert(chat, study, trigger, axis, index, question, emit,
                                                               control)
                except JobCancelled:
                    cancelled = True
                    chat.messages.append(Message("expert", "", expert=trigger.name, argument=trigger.argument,
                                                 error="cancelled before it ran", to_model=False))
                    self.store.save(chat)
                    break
                step(f"expert {trigger.name}", began)
                chat.messages.append(message)
                calls.append(call)
                segmentation = produced or segmentation
                self.store.save(chat)
            if scan.segmented_only or cancelled:
                break

        label_names, label_colors = {}, {}
        if segmentation is not None:
            label_names = segmentation.ids_by_name
            chat.labels = self._store_labels(chat, segmentation.labels)
            label_colors = self._display_colors(calls, segmentation.label_names)
        self.store.finish_turn(chat)  # the whole turn, and no longer running, in one save
        timings.append({"step": "queue wait", "seconds": round(control.waited_s, 4)})
        timings.append({"step": "total", "seconds": round(time.perf_counter() - clock, 4)})
        labels = segmentation.labels if segmentation is not None else None
        return TurnResult(chat, answer, first_message, calls, labels, label_names, label_colors, timings,
                          dict(self.vlm_info), axis, index, cancelled)

    # --- steps ---------------------------------------------------------------------------------

    def _user_message(self, chat: Chat, study: Study, question: str, axis: str, index: int) -> Message:
        """The annotator's turn as the model sees it: card (first turn), slice(s), modality line, question."""
        number = sum(1 for message in chat.messages if message.role == "user") + 1
        names = []
        for position, picture in enumerate(study.render(axis, index)):
            names.append(self.store.save_image(chat.chat_id, f"turn{number:03d}_slice{position}.png", picture))
        if study.is_brats:
            preamble = ("T1(contrast enhanced): <image>, T1: <image>, T2: <image>, FLAIR: <image> "
                        "These are different MRI modalities.\n")
        else:
            preamble = f"<image>This is a {study.modality} image.\n"
        card = self.registry.model_card() if not self.tool_calling and not any(
            m.role == "user" and not m.interrupted for m in chat.messages) else ""
        return Message("user", card + preamble + question, images=names, question=question)

    def _generate(self, chat: Chat, request: TurnRequest, emit: EventSink, control: JobControl,
                  round_number: int) -> tuple[str, bool, tuple[Any, ...]]:
        """The model's answer to the chat so far, whether it was cancelled, and its tool calls (tool-calling
        mode; else none); drops the oldest exchanges if the context is full.
        Each try is one job of the VLM's work queue (JobCancelled when cancelled while it waits)."""
        messages = [message for message in chat.messages if not message.interrupted]  # the model never sees those
        settings = {"max_new_tokens": request.max_new_tokens, "temperature": request.temperature,
                    "top_p": request.top_p, "cancel": control.cancel,
                    "stream": lambda piece: emit("token", {"text": piece, "round": round_number})}
        while True:
            if self.tool_calling:
                turns, image_names = tool_conversation(messages, bool(getattr(self.vlm, "tool_images", True)))
            else:
                turns, image_names = vlm_conversation(messages)
            images = [self.store.image(chat.chat_id, name) for name in image_names]
            try:
                if self.tool_calling:
                    result = self._job(self.vlm_device, lambda turns=turns, images=images: self.vlm.generate_with_tools(
                        turns, images, self.tools, **settings), control)
                else:
                    result = self._job(self.vlm_device, lambda turns=turns, images=images: self.vlm.generate(
                        turns, images, **settings), control)
            except PromptTooLongError:
                shorter = self._drop_oldest_exchange(messages)
                if shorter is None:
                    raise
                messages = shorter
                continue
            return result.text, result.stopped_by == "cancelled", tuple(getattr(result, "tool_calls", ()))

    def _drop_oldest_exchange(self, messages: list[Message]) -> list[Message] | None:
        """``messages`` without the first question and its answers (the card moves to the next question)."""
        questions = [i for i, message in enumerate(messages) if message.role == "user" and message.question]
        if len(questions) < 2:
            return None
        kept = messages[questions[1]:]
        first = kept[0]
        card = "" if self.tool_calling else self.registry.model_card()
        kept[0] = Message("user", card + first.text, list(first.images), first.question)
        return kept

    def _run_tool_calls(self, chat: Chat, study: Study, tool_calls: tuple[Any, ...], axis: str, index: int,
                        question: str, emit: EventSink, control: JobControl, calls: list[ExpertCall],
                        step: Callable[[str, float], None]) -> tuple[SegmentationResult | None, bool]:
        """Run one answer's tool calls in order; each gets an expert message that answers it (the result,
        the expert's failure, or why the call could not run). Returns the last segmentation and whether
        the turn was cancelled while an expert waited (later calls are not answered then)."""
        segmentation = None
        for position, tool_call in enumerate(tool_calls):
            record = {"id": tool_call.id, "name": tool_call.name, "arguments": tool_call.arguments}
            try:
                if position >= self.max_triggers:
                    raise ToolCallError(f"not run: at most {self.max_triggers} expert calls per answer")
                trigger = resolve_tool_call(tool_call.name, tool_call.arguments, self.registry)
            except ToolCallError as err:
                problem = scrub_paths(str(err))
                chat.messages.append(Message("expert", error_feedback(problem), error=problem, tool_call=record))
                self.store.save(chat)
                continue
            began = time.perf_counter()
            try:
                message, call, produced = self._run_expert(chat, study, trigger, axis, index, question, emit, control)
            except JobCancelled:
                chat.messages.append(Message("expert", "", expert=trigger.name, argument=trigger.argument,
                                             error="cancelled before it ran", to_model=False))
                self.store.save(chat)
                return segmentation, True
            step(f"expert {trigger.name}", began)
            message.tool_call = record
            chat.messages.append(message)
            calls.append(call)
            segmentation = produced or segmentation
            self.store.save(chat)
        return segmentation, False

    def _run_expert(self, chat: Chat, study: Study, trigger: Trigger, axis: str, index: int,
                    question: str | None, emit: EventSink,
                    control: JobControl | None = None) -> tuple[Message, ExpertCall, SegmentationResult | None]:
        """Run one trigger on the whole study; failures become an expert message, never an exception
        (but JobCancelled: the turn was cancelled while the expert waited in the work queue)."""
        emit("expert_started", {"expert": trigger.name, "argument": trigger.argument})
        began = time.perf_counter()
        spec = self.registry.get(trigger.name)
        try:
            message, call, produced = self._expert_result(chat, study, spec, trigger, axis, index, question, control)
        except JobCancelled:
            raise
        except Exception as err:  # an expert failing must not end the turn; the model and user are told
            logger.warning("expert %s(%s) failed: %s", trigger.name, trigger.argument, err, exc_info=True)
            reason = scrub_paths(str(err))  # the chat and the client see file names, never server paths
            text = error_feedback(reason)
            message = Message("expert", text, expert=trigger.name, argument=trigger.argument, error=reason)
            call, produced = ExpertCall(trigger.name, trigger.argument, 0.0, error=reason), None
        call.seconds = time.perf_counter() - began
        emit("expert_finished", call.as_dict())
        return message, call, produced

    def _expert_result(self, chat: Chat, study: Study, spec: ExpertSpec, trigger: Trigger, axis: str,
                       index: int, question: str | None,
                       control: JobControl | None = None) -> tuple[Message, ExpertCall, SegmentationResult | None]:
        number = sum(1 for message in chat.messages if message.role == "expert") + 1
        # the expert's runner checks the study, runs, and writes its text for the model
        run = self.experts.run_expert(spec.name, study, trigger.resolved, control=control)  # a group or classes
        result = run.result
        if not isinstance(result, SegmentationResult):  # a classifier: text only
            text = self.experts.feedback(spec.name, result, question)
            message = Message("expert", text, expert=spec.name, argument=trigger.argument)
            call = ExpertCall(spec.name, trigger.argument, 0.0, run.cached, stand_in=_stand_in_note(result))
            return message, call, None
        overlay, drawn = render_overlay(study.primary, result.labels, axis, index, overlay_colors_float(),
                                        modality=study.modality)
        present = [label_id for label_id, _ in drawn]
        image = self.store.save_image(chat.chat_id, f"expert{number:03d}_{spec.name.lower()}.png", overlay)
        text = self.experts.feedback(spec.name, result, question, present)
        message = Message("expert", text, images=[image], expert=spec.name, argument=trigger.argument)
        call = ExpertCall(spec.name, trigger.argument, 0.0, run.cached, label_names=result.ids_by_name,
                          stand_in=_stand_in_note(result))
        return message, call, result

    def _store_labels(self, chat: Chat, labels: Volume) -> str:
        """Keep the turn's labelmap in the chat folder (the data engine and corrections use it).

        The labelmap is encoded once per expert result (:func:`~vila_m3.imaging.save_labelmap` keeps the
        NIfTI bytes on it): a cached result shown again, or the file MONAI Label sends, reuses them.
        """
        number = sum(1 for message in chat.messages if message.role == "user")
        target = self.store.folder(chat.chat_id) / f"turn{number:03d}_labels.nii.gz"
        save_labelmap(labels, target)
        return target.name

    def _display_colors(self, calls: list[ExpertCall], names: Mapping[int, str]) -> dict[str, list[int]]:
        """Slicer display colours (RGB 0-255) of the returned labels, from the expert's config."""
        expert = next((call.expert for call in reversed(calls) if call.label_names), None)
        if expert is None:
            return {}
        spec = self.registry.get(expert)
        return {name: list(spec.label_color(int(label_id))) for label_id, name in sorted(names.items())}


def _stand_in_note(result: Any) -> str | None:
    """The stand-in note of an expert result (its bundle's words), None for real weights."""
    if not getattr(result, "stand_in", False):
        return None
    return getattr(result, "stand_in_note", None) or "random weights; not a medical model"
