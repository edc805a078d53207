"""A chat's transcript: user, assistant and expert messages, and how it becomes the VLM's conversation.

The VLM only knows two roles: an expert's message reaches it as a user turn, and consecutive user
turns (several experts after one answer) are squashed into one, texts joined in order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Role = Literal["user", "assistant", "expert"]


@dataclass
class Message:
    """One message of the transcript.

    Attributes:
        role: ``user`` (the annotator's question with the model card and slice), ``assistant`` (the
            model), or ``expert`` (an expert's result or failure, as fed back to the model).
        text: exactly the text the model saw or wrote (``<image>`` placeholders included).
        images: names of the chat's image files, one per ``<image>`` in ``text``, in order.
        question: for user messages, the annotator's own words (without card and preamble).
        expert, argument: for expert messages, which expert ran and with what argument.
        error: a problem to show the user (expert failure, unknown or malformed trigger).
        to_model: False for notes that are shown to the user but never sent to the model.
        interrupted: True for the messages of a turn the server stopped in the middle of (a crash, a
            kill): kept for reading, never sent to the model nor exported as training data.
        tool_call: for expert messages answering a model's tool call (tool-calling mode), the call as
            the model made it: ``{"id", "name", "arguments"}``; None for triggers.
    """

    role: Role
    text: str
    images: list[str] = field(default_factory=list)
    question: str | None = None
    expert: str | None = None
    argument: str | None = None
    error: str | None = None
    to_model: bool = True
    interrupted: bool = False
    tool_call: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        defaults = {"question": None, "expert": None, "argument": None, "error": None, "to_model": True,
                    "interrupted": False, "tool_call": None}
        return {key: value for key, value in asdict(self).items()
                if not (key in defaults and value is defaults[key]) and value != []}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        return cls(**data)


def vlm_conversation(messages: list[Message]) -> tuple[list[tuple[str, str]], list[str]]:
    """The (role, text) turns and the image names (in placeholder order) the VLM gets for ``messages``."""
    turns: list[tuple[str, str]] = []
    images: list[str] = []
    for message in messages:
        if not message.to_model or message.interrupted:
            continue
        role = "assistant" if message.role == "assistant" else "user"
        if turns and turns[-1][0] == role == "user":
            turns[-1] = (role, turns[-1][1] + message.text)
        else:
            turns.append((role, message.text))
        images.extend(message.images)
    return turns, images
