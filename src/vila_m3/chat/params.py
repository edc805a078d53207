"""The parameters of one chat turn as a client sends them, checked in full before anything is stored.

:class:`TurnParams` is the one model of a turn's ``params`` (``POST /infer/vila_m3``, the stream
route): the question, the chat id, the slice on screen, the modality override, the MRI sequences and
the generation settings, with their types and ranges. :class:`GenerationParams` is the part the chat
loop checks again itself (the question and the generation settings, against its own VLM's context and
tokenizer), so a caller of the core that skips the app gets the same refusals.

Control text in the question is refused, not escaped: ``<image>`` marks where a picture goes and the
special tokens of the model's template (``<|eot_id|>``, ``</s>``, ...) end or open turns, so a
question holding one would forge the conversation (or, for ``<image>``, misalign the pictures). No
annotator needs to type them, and a refusal that names the token tells the user exactly what to
change, where escaping would silently send the model something else than what the user sees stored.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vila_m3.chat.store import ChatStore
from vila_m3.imaging.sequences import SEQUENCE_ALIASES, SEQUENCE_ORDER

__all__ = [
    "AXES",
    "CONTROL_TEXTS",
    "DEFAULT_CONTEXT_TOKENS",
    "MAX_PROMPT_CHARS",
    "GenerationParams",
    "TurnParams",
    "TurnParamsError",
    "control_text_in",
    "describe_validation_error",
    "parse_turn_params",
]

#: longest question in characters (a question, not a report: ~ 1000 tokens of the 4096 the model sees)
MAX_PROMPT_CHARS = 4000
#: context of the released VILA-M3 checkpoints in tokens (``tokenizer_model_max_length``); the cap of
#: ``max_new_tokens`` where the VLM does not say its own (a remote server)
DEFAULT_CONTEXT_TOKENS = 4096
#: control strings of the supported templates (llama_3, vicuna_v1, hermes-2) and the image placeholder,
#: refused in user text whatever the served tokenizer says
CONTROL_TEXTS = ("<image>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                 "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
#: any ``<|name|>`` token (llama 3's reserved tokens, ChatML): no tokenizer list needed to refuse them
_PIPE_TOKEN = re.compile(r"<\|[A-Za-z0-9_.-]{1,64}\|>")
AXES = ("axial", "coronal", "sagittal")
_MODALITIES = {"CT": "CT", "MR": "MRI", "MRI": "MRI", "CR": "CXR", "DX": "CXR", "CXR": "CXR"}
_ALLOWED_CONTROLS = {"\n", "\t", "\r"}


class TurnParamsError(ValueError):
    """A turn's parameters are not valid; the message names each problem (never the prompt's text)."""


def _number(value: Any) -> Any:
    """Numbers must come as JSON numbers: ``true`` or ``"5"`` is a client mistake, not a 1 or a 5."""
    if isinstance(value, bool | str | bytes):
        raise ValueError(f"must be a number, got {'a boolean' if isinstance(value, bool) else 'text'}")
    return value


def _unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored and tokenized as it is, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"holds a lone surrogate (U+{ord(text[err.start]):04X}); send valid Unicode text"
    for char in text:
        if char not in _ALLOWED_CONTROLS and unicodedata.category(char) == "Cc":
            return f"holds the control character U+{ord(char):04X}"
    return None


def control_text_in(text: str, special_tokens: Iterable[str] = ()) -> str | None:
    """The first control string found in ``text`` (the template's, ``<|...|>`` tokens, ``special_tokens``), or None."""
    found = [token for token in (*CONTROL_TEXTS, *special_tokens) if token and token in text]
    match = _PIPE_TOKEN.search(text)
    if match:
        found.append(match.group(0))
    return min(found, key=text.index) if found else None


class GenerationParams(BaseModel):
    """The question and the generation settings of a turn (what the chat loop checks itself).

    Validation context (optional): ``context_length`` (the VLM's context in tokens, the upper bound
    of ``max_new_tokens``; :data:`DEFAULT_CONTEXT_TOKENS` when absent) and ``special_tokens`` (the
    served tokenizer's special-token strings, refused in the prompt besides :data:`CONTROL_TEXTS`).
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True)

    prompt: str = Field(description="the annotator's question")
    max_new_tokens: int = Field(1024, ge=1, description="most answer tokens")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")

    @field_validator("max_new_tokens", "temperature", "top_p", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        return _number(value)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_is_text(cls, prompt: Any) -> Any:
        if prompt is None or prompt == "":
            raise ValueError("is required (the question)")
        if not isinstance(prompt, str):
            raise ValueError("must be text")
        return prompt

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str, info: ValidationInfo) -> str:
        if not prompt.strip():
            raise ValueError("the question is empty")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"the question is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are accepted")
        problem = _unicode_problem(prompt)
        if problem:
            raise ValueError(f"the question {problem}")
        specials = (info.context or {}).get("special_tokens", ())
        token = control_text_in(prompt, specials)
        if token:
            raise ValueError(f"the question contains {token!r}, which is control text of the model's prompt "
                             "format; remove it")
        return prompt

    @field_validator("max_new_tokens")
    @classmethod
    def _within_context(cls, value: int, info: ValidationInfo) -> int:
        limit = int((info.context or {}).get("context_length") or DEFAULT_CONTEXT_TOKENS)
        if value > limit:
            raise ValueError(f"must be at most {limit} (the model's context in tokens), got {value}")
        return value

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):  # allow_inf_nan covers floats; this covers huge ints made floats
            raise ValueError("must be a finite number")
        return value


class TurnParams(GenerationParams):
    """Everything a client sends as a chat turn's ``params`` (keys the turn does not use are ignored).

    ``modality`` is returned canonical (``CT``, ``MRI``, ``CXR``; DICOM's ``MR``, ``CR``, ``DX`` and any
    case accepted); ``sequences`` canonical too (``t1c``, ``t1``, ``t2``, ``flair``; aliases such as
    ``t1ce`` accepted), all four required when given.
    """

    chat_id: str = Field(description="the client's id of the chat (see ChatStore.check_id)")
    slice_index: int | None = Field(None, ge=0, description="slice on screen; None = middle")
    axis: Literal["axial", "coronal", "sagittal"] = "axial"
    modality: str | None = Field(None, description="the client's override of the detected modality")
    sequences: dict[str, str] | None = Field(None, description="the four MRI sequences' image ids")

    @field_validator("slice_index", mode="before")
    @classmethod
    def _slice_number(cls, value: Any) -> Any:
        return value if value is None else _number(value)

    @field_validator("chat_id", mode="before")
    @classmethod
    def _check_chat_id(cls, chat_id: Any) -> str:
        if chat_id is None or chat_id == "":
            raise ValueError("is required: any id the client keeps for this chat")
        if not isinstance(chat_id, str):
            raise ValueError("must be text: 1-128 letters, digits, '_', '-' or '.'")
        return ChatStore.check_id(chat_id)

    @field_validator("axis", mode="before")
    @classmethod
    def _default_axis(cls, axis: Any) -> Any:
        if axis is None or axis == "":
            return "axial"
        if not isinstance(axis, str) or axis not in AXES:
            shown = repr(axis) if isinstance(axis, str) and len(axis) <= 40 else "that value"
            raise ValueError(f"must be one of {', '.join(AXES)}; {shown} is not")
        return axis

    @field_validator("modality", mode="before")
    @classmethod
    def _canonical_modality(cls, modality: Any) -> str | None:
        if modality is None or modality == "":
            return None
        known = _MODALITIES.get(modality.strip().upper()) if isinstance(modality, str) else None
        if known is None:
            shown = repr(modality) if isinstance(modality, str) and len(modality) <= 40 else "that value"
            raise ValueError(f"must be one of CT, MRI, CXR (as text); {shown} is not")
        return known

    @field_validator("sequences", mode="before")
    @classmethod
    def _canonical_sequences(cls, sequences: Any) -> dict[str, str] | None:
        if sequences is None or sequences == {}:
            return None
        if not isinstance(sequences, Mapping):
            raise ValueError("must map t1c, t1, t2, flair to image ids")
        named: dict[str, str] = {}
        for name, image in sequences.items():
            canonical = SEQUENCE_ALIASES.get(str(name).lower())
            if canonical is None:
                shown = repr(name) if len(str(name)) <= 40 else "a key"
                raise ValueError(f"{shown} is not an MRI sequence name; use t1c, t1, t2 and flair")
            if not isinstance(image, str) or not image.strip() or _unicode_problem(image):
                raise ValueError(f"{canonical} must be an image id (a non-empty string)")
            named[canonical] = image
        missing = [name for name in SEQUENCE_ORDER if name not in named]
        if missing:
            raise ValueError(f"the four MRI sequences are needed; missing: {', '.join(missing)}")
        return named

    @model_validator(mode="after")
    def _sequences_are_mri(self) -> TurnParams:
        if self.sequences and self.modality not in (None, "MRI"):
            raise ValueError(f"four MRI sequences cannot be modality '{self.modality}'")
        return self


def describe_validation_error(err: ValidationError, prefix: str = "params") -> str:
    """One line naming each problem, e.g. ``params.temperature: must be at most 2``; never echoes the prompt."""
    problems = []
    for item in err.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        message = str(item["msg"]).removeprefix("Value error, ")
        message = message.replace("Input should be", "must be").replace("Field required", "is required")
        message = message.replace("Extra inputs are not permitted", "is not a known field")
        problems.append(f"{where}: {message}" if item["loc"] else f"{prefix}: {message}")
    return "; ".join(problems)


def parse_turn_params(data: Mapping[str, Any], context_length: int | None = None,
                      special_tokens: Iterable[str] = (), model: type[GenerationParams] = TurnParams) -> Any:
    """``data`` checked as ``model`` (:class:`TurnParams` by default).

    Args:
        data: the request's params (other keys are ignored).
        context_length: the VLM's context in tokens (``max_new_tokens`` bound); default 4096.
        special_tokens: the served tokenizer's special-token strings.

    Raises:
        TurnParamsError: every problem in one readable message.
    """
    if not isinstance(data, Mapping):
        raise TurnParamsError(f"params must be a JSON object, got {type(data).__name__}")
    context = {"context_length": context_length, "special_tokens": tuple(special_tokens)}
    try:
        return model.model_validate(dict(data), context=context)
    except ValidationError as err:
        raise TurnParamsError(describe_validation_error(err)) from None
