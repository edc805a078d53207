"""Training conversations from the server's chats, with the annotator's corrections applied.

A chat (``<chats>/<chat id>/chat.json`` and its PNGs, see :mod:`vila_m3.chat.store`) becomes one
multi-turn record: user → ``human``, assistant → ``gpt``, expert → ``human``, consecutive human turns
joined as the chat loop sends them to the model (:func:`vila_m3.chat.transcript.vlm_conversation`);
notes never sent to the model are left out, and trailing human turns (a turn without an answer) are
dropped. Turns that did not finish (marked ``interrupted`` after a crash, or still running) are left out
whole (:meth:`vila_m3.chat.store.Chat.finished_messages`).

Correction: when the chat's image has a final label in the datastore saved after the chat's last
expert result (its labelmap file, else ``chat.json``), each expert result is rebuilt from the final
label: the overlay is re-rendered on the slice the chat showed (found by comparing the chat's slice
picture with the volume's slices) from the final label restricted to the expert's labels, and the
feedback text is rebuilt by the expert feedback functions.

Tool-calling chats (a remote model with ``vlm_tools on``) store the model's calls, not triggers: an expert
message answers a call (``Message.tool_call``) and the assistant message before it may be empty. VILA-M3 learns
triggers, so such a chat becomes the record its trigger twin would be: each call that maps onto a trigger (an
expert with a card argument or none: ``{"argument": "hepatoma"}`` is ``<VISTA3D(hepatic tumor)>``, ``{}`` is
``<VISTA3D(everything)>`` / ``<CXR()>``) is written into the assistant's text (after its words; with none, the
data engine's trigger sentence of ``configs/datagen.yaml``), and the first question gets the model card the
trigger path shows. A chat with a call that has no trigger (VISTA3D ``classes``: triggers take groups only) or
that could not run is left out, with its reason in the export summary and a count in its notes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vila_m3.chat.store import Chat, ChatStore
from vila_m3.chat.transcript import Message, vlm_conversation
from vila_m3.data.cases import LoadedCase
from vila_m3.data.config import AXES, DatagenConfig
from vila_m3.data.records import ImageWriter, Record
from vila_m3.data.sources import Skip, split_name
from vila_m3.experts.colors import overlay_colors_float
from vila_m3.experts.feedback import (
    CLASSIFICATION_INSTRUCTION,
    SEGMENTATION_INSTRUCTION,
    brats_feedback,
    classification_feedback,
    segmentation_feedback,
)
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.tools import ToolCallError, resolve_tool_call
from vila_m3.imaging import Volume, labelmap_like
from vila_m3.imaging.overlay import render_overlay
from vila_m3.imaging.slices import extract_slice, render_slice, slice_index_count

_SPEAKER = {"user": "human", "assistant": "gpt"}


class ChatSkipped(ValueError):
    """A chat cannot be used; the message is the reason."""


class ToolCallSkipped(ChatSkipped):
    """A tool-calling chat with a call that maps onto no trigger; the message is the reason."""


@dataclass
class ChatStudy:
    """What the export knows about a chat's study.

    Attributes:
        split_key: the split unit (the same as the datastore case's, so a chat and the labels of one
            volume land in the same split).
        case: the case with the final label, when there is one and it is the chat's study; loaded
            on demand by ``load``.
    """

    split_key: str
    load: Callable[[], LoadedCase] | None = None
    label_time: float | None = None


@dataclass
class ChatOutcome:
    """Records and skips of all chats, and how many expert turns corrections changed."""

    records: list[Record] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    corrected_turns: int = 0
    changed_turns: int = 0
    tool_calls_as_triggers: int = 0
    tool_call_chats_skipped: int = 0


def locate_slice(volume: Volume, picture: np.ndarray, modality: str) -> tuple[str, int] | None:
    """The (axis, index) whose rendering is exactly ``picture`` ((H, W, 3) uint8), or None."""
    for axis in AXES:
        count = slice_index_count(volume, axis)
        if count == 0 or extract_slice(volume, axis, 0).shape != picture.shape[:2]:
            continue
        for index in range(count):
            if np.array_equal(np.asarray(render_slice(volume, axis, index, modality)), picture):
                return axis, index
    return None


class ChatConverter:
    """Turns stored chats into records.

    Args:
        config: the datagen settings (``chats`` section).
        registry: the experts (their label groups).
        images: where PNGs are written.
        study_of: the :class:`ChatStudy` of a chat (split unit, final label).
    """

    def __init__(self, config: DatagenConfig, registry: ExpertRegistry, images: ImageWriter,
                 study_of: Callable[[Chat], ChatStudy]):
        self.config = config
        self.registry = registry
        self.images = images
        self.study_of = study_of
        self.colors = overlay_colors_float()

    def convert(self, chats_dir: Path, progress: Callable[[], None] | None = None) -> ChatOutcome:
        """Every chat under ``chats_dir`` (sorted by id)."""
        outcome = ChatOutcome()
        store = ChatStore(chats_dir) if Path(chats_dir).is_dir() else None
        for chat_id in store.chat_ids() if store else []:
            try:
                record, corrected, changed, converted = self._convert_one(store, chat_id)
            except ChatSkipped as err:
                outcome.skips.append(Skip(chat_id, "chat", str(err)))
                outcome.tool_call_chats_skipped += isinstance(err, ToolCallSkipped)
            except (OSError, ValueError, KeyError, TypeError) as err:
                outcome.skips.append(Skip(chat_id, "chat", f"unreadable chat ({type(err).__name__})"))
            else:
                outcome.records.append(record)
                outcome.corrected_turns += corrected
                outcome.changed_turns += changed
                outcome.tool_calls_as_triggers += converted
            if progress:
                progress()
        return outcome

    def _convert_one(self, store: ChatStore, chat_id: str) -> tuple[Record, int, int, int]:
        """The chat's record, its corrected and changed expert turns, and its tool calls written as triggers."""
        chat = store.load(chat_id)
        # finished turns only: a turn marked interrupted (a crash) or still running is never training data
        messages = [message for message in chat.finished_messages() if message.to_model]
        messages, converted = self._tool_calls_as_triggers(messages)
        if self.config.chats.get("skip_expert_errors", True) and any(
                message.role == "expert" and message.error for message in messages):
            raise ChatSkipped("an expert failed in this chat")
        study = self.study_of(chat)
        corrected = changed = 0
        fresh: dict[str, str] = {}
        if study.load is not None and self._corrected_after(store, chat, study):
            messages, corrected, changed, fresh = self._apply_correction(store, chat, messages, study.load())
            if changed and self.config.chats.get("changed_feedback", "keep") == "skip":
                raise ChatSkipped("the final label changes an expert result the model answered")
        turns, names = vlm_conversation(messages)
        placeholders = sum(text.count("<image>") for _, text in turns)
        if placeholders != len(names):
            raise ChatSkipped(f"the chat's <image> placeholders ({placeholders}) do not match its images ({len(names)})")
        while turns and turns[-1][0] != "assistant":
            turns.pop()
        if not turns or turns[0][0] != "user":
            raise ChatSkipped("no answer of the model in this chat")
        kept = sum(text.count("<image>") for _, text in turns)
        paths = [fresh[name] if name in fresh else self.images.add(store.image(chat_id, name)) for name in names[:kept]]
        experts = sorted({f"{m.expert}({m.argument})" if m.argument else f"{m.expert}()"
                          for m in messages if m.role == "expert" and m.expert})
        record = Record([(_SPEAKER[role], text) for role, text in turns], paths, "chat",
                        "+".join(experts) or "no expert", "chat", "corrected" if corrected else "as recorded",
                        chat_id, study.split_key)
        return record, corrected, changed, converted

    def _tool_calls_as_triggers(self, messages: list[Message]) -> tuple[list[Message], int]:
        """``messages`` as the trigger path would have stored them (see the module doc), and how many calls
        became triggers; unchanged without tool calls.

        Raises:
            ToolCallSkipped: a call did not run, cannot run here, or has no trigger (VISTA3D classes).
        """
        if not any(message.tool_call for message in messages):
            return messages, 0
        result: list[Message] = []
        converted = 0
        for position, message in enumerate(messages):
            if message.role == "expert" and message.tool_call:
                result.append(replace(message, tool_call=None))
                continue
            if message.role == "assistant":
                answered = []
                for later in messages[position + 1:]:
                    if later.role != "expert" or not later.tool_call:
                        break
                    answered.append(later)
                if answered:
                    message = replace(message, text=self._with_triggers(message.text, answered))
                    converted += len(answered)
            result.append(message)
        first = next((i for i, message in enumerate(result) if message.role == "user"), None)
        card = self.registry.model_card()
        if first is not None and card and not result[first].text.startswith(self.registry.card.header):
            result[first] = replace(result[first], text=card + result[first].text)
        return result, converted

    def _with_triggers(self, text: str, answered: list[Message]) -> str:
        """The assistant's ``text`` with the triggers of the calls its expert messages answered."""
        triggers = []
        for message in answered:
            call = message.tool_call or {}
            if message.error:
                raise ToolCallSkipped("a tool call that did not run has no trigger record")
            try:
                trigger = resolve_tool_call(str(call.get("name")), call.get("arguments"), self.registry)
            except ToolCallError:
                raise ToolCallSkipped("a tool call that cannot run here has no trigger record") from None
            if trigger.resolved.group is None and self.registry.configured_spec(trigger.name).takes_argument:
                raise ToolCallSkipped(f"a {trigger.name} tool call with classes has no trigger (triggers take "
                                      "groups only)")
            triggers.append(trigger)
        words = text.strip()
        sentence = self.config.templates["trigger"].get(triggers[0].name) if len(triggers) == 1 else None
        if not words and sentence:
            return sentence.format(group=triggers[0].argument).strip()
        tags = " ".join(f"<{trigger.name}({trigger.argument or ''})>" for trigger in triggers)
        return f"{words} {tags}" if words else tags

    def _corrected_after(self, store: ChatStore, chat: Chat, study: ChatStudy) -> bool:
        folder = store.folder(chat.chat_id)
        reference = folder / chat.labels if chat.labels and (folder / chat.labels).is_file() else folder / "chat.json"
        return study.label_time is None or study.label_time >= reference.stat().st_mtime

    def _apply_correction(self, store: ChatStore, chat: Chat, messages: list[Message],
                          case: LoadedCase) -> tuple[list[Message], int, int, dict[str, str]]:
        """``messages`` with each expert result rebuilt from the final label."""
        fresh: dict[str, str] = {}
        located: dict[str, tuple[str, int]] = {}
        result: list[Message] = []
        corrected = changed = 0
        last_user: Message | None = None
        for message in messages:
            if message.role == "user":
                last_user = message
            if message.role != "expert" or message.expert not in ("VISTA3D", "BRATS", "CXR") or last_user is None:
                result.append(message)
                continue
            question = last_user.question
            if message.expert == "CXR":
                if case.category != "cxr":
                    result.append(message)
                    continue
                ask = question if CLASSIFICATION_INSTRUCTION in message.text else None
                text = classification_feedback(case.findings or {}, ask)
                result.append(replace(message, text=text, images=[]))
            else:
                expected = "vista3d" if message.expert == "VISTA3D" else "brats"
                if case.category != expected or not last_user.images:
                    result.append(message)
                    continue
                shown = last_user.images[0]
                if shown not in located:
                    picture = np.asarray(store.image(chat.chat_id, shown))
                    where = locate_slice(case.primary, picture, case.modality)
                    if where is None:
                        raise ChatSkipped("the slice the chat showed was not found in the volume (changed image?)")
                    located[shown] = where
                axis, index = located[shown]
                ask = question if SEGMENTATION_INSTRUCTION in message.text else None
                text, overlay = self._segmentation_result(case, message, axis, index, ask)
                key = f"\x00corrected-{len(fresh)}"
                fresh[key] = self.images.add(overlay)
                result.append(replace(message, text=text, images=[key]))
            corrected += 1
            changed += result[-1].text != message.text
        return result, corrected, changed, fresh

    def _segmentation_result(self, case: LoadedCase, message: Message, axis: str, index: int,
                             question: str | None):
        labels = case.labels
        if message.expert == "BRATS":
            overlay, drawn = render_overlay(case.primary, labels, axis, index, self.colors, modality="MRI")
            return brats_feedback([i for i, _ in drawn], question), overlay
        spec = self.registry.configured_spec("VISTA3D")
        resolved = spec.resolve_argument(message.argument)
        names = {label_id: name for name, label_id in resolved.labels.items()}
        restricted = labelmap_like(case.primary, np.where(np.isin(labels.array, list(names)), labels.array, 0))
        overlay, drawn = render_overlay(case.primary, restricted, axis, index, self.colors, modality=case.modality)
        return segmentation_feedback([i for i, _ in drawn], names, question), overlay


def chat_study_ids(chat: Chat) -> list[str]:
    """Candidate datastore ids of a chat's study: ``study.image`` and the file names of ``study.images``."""
    ids: list[str] = []
    study = chat.study or {}
    image = study.get("image")
    if isinstance(image, str) and image:
        ids.append(image)
        ids.append(split_name(Path(image).name)[0])
    for path in (study.get("images") or {}).values():
        if isinstance(path, str) and path:
            ids.append(split_name(Path(path).name)[0])
    return list(dict.fromkeys(ids))
