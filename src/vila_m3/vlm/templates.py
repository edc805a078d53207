"""Conversation templates of the released VILA-M3 checkpoints, byte for byte.

A conversation is a sequence of ``(role, text)`` turns with role ``"user"`` or ``"assistant"``
(``"human"`` / ``"gpt"`` of the VILA/LLaVA training JSON are accepted too), starting with a user
turn and alternating. Images appear in user text as the literal placeholder ``<image>``.

Rendering follows the VILA 1.5 code base the checkpoints were trained with:

* ``vicuna_v1`` (3B, 13B): ``{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT:``
* ``llama_3`` (8B): ``{system}<|eot_id|>`` then ``<|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>``
  per turn, ending with ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``. The system string
  itself starts with ``<|begin_of_text|>`` and the tokenizer adds its own BOS too, so the model sees
  two BOS tokens, as it did in training.
* ``hermes-2`` (VILA 1.5 40B, no M3 release): ChatML-like, stop ``<|im_end|>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "HERMES_2",
    "LLAMA_3",
    "TEMPLATES",
    "VICUNA_V1",
    "ConversationTemplate",
    "Turn",
    "detect_template",
    "get_template",
    "normalize_role",
]

Turn = tuple[str, str]
"""One conversation turn: ``(role, text)``; role is ``"user"`` or ``"assistant"``."""

_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


def normalize_role(role: str) -> Literal["user", "assistant"]:
    """Map ``user``/``human`` to ``"user"`` and ``assistant``/``gpt`` to ``"assistant"``."""
    key = str(role).strip().lower()
    if key not in _ROLE_ALIASES:
        raise ValueError(f"Unknown conversation role {role!r}; use 'user' or 'assistant'.")
    return _ROLE_ALIASES[key]  # type: ignore[return-value]


@dataclass(frozen=True)
class ConversationTemplate:
    """A conversation format: how turns become the prompt string.

    Attributes:
        name: template name (``llama_3``, ``vicuna_v1``, ``hermes-2``).
        system: the system text, emitted first.
        user_role: prefix of a user turn as it appears in the prompt.
        assistant_role: prefix of an assistant turn as it appears in the prompt.
        style: ``"two"`` (``role: text`` with alternating separators) or ``"headers"``
            (``role`` already holds its header; every turn ends with ``sep``).
        sep: separator after the system text and after turns (``two``: after user turns).
        sep2: ``two``: separator after assistant turns; ``headers``: after a completed last turn.
        stop_str: text that ends an answer (checked on the generated text).
    """

    name: str
    system: str
    user_role: str
    assistant_role: str
    style: Literal["two", "headers"]
    sep: str
    sep2: str
    stop_str: str

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = True) -> str:
        """Render ``turns`` to the prompt string.

        Args:
            turns: ``(role, text)`` pairs, first a user turn, alternating roles.
            add_generation_prompt: append the empty assistant slot the model completes; the last
                turn must then be a user turn.

        Returns:
            The prompt text, with ``<image>`` placeholders left in place.
        """
        messages = self._messages(turns, add_generation_prompt)
        if self.style == "two":
            seps = (self.sep, self.sep2)
            out = self.system + seps[0]
            for i, (role, text) in enumerate(messages):
                out += role + ":" if text is None else role + ": " + text + seps[i % 2]
            return out
        out = self.system + self.sep
        for i, (role, text) in enumerate(messages):
            if text is None:
                out += role
            else:
                out += role + text + (self.sep if i < len(messages) - 1 else self.sep2)
        return out

    def _messages(self, turns: Sequence[Turn], add_generation_prompt: bool) -> list[tuple[str, str | None]]:
        """Check the turns and map roles to their prompt prefixes; ``None`` marks the answer slot."""
        prefixes = {"user": self.user_role, "assistant": self.assistant_role}
        messages: list[tuple[str, str | None]] = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, Sequence) or isinstance(turn, str) or len(turn) != 2:
                raise ValueError(f"Turn {i} must be a (role, text) pair, got {turn!r}.")
            role, text = normalize_role(turn[0]), turn[1]
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(
                    f"Turn {i} is a {role} turn but a {expected} turn was expected: a conversation starts "
                    "with the user and alternates user/assistant (put consecutive user messages in one turn)."
                )
            if not isinstance(text, str) or not text:
                raise ValueError(f"Turn {i} ({role}) has no text.")
            messages.append((prefixes[role], text))
        if add_generation_prompt:
            if not messages or len(messages) % 2 == 0:
                raise ValueError("To generate an answer the conversation must end with a user turn.")
            messages.append((self.assistant_role, None))
        return messages


VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    user_role="USER",
    assistant_role="ASSISTANT",
    style="two",
    sep=" ",
    sep2="</s>",
    stop_str="</s>",
)

LLAMA_3 = ConversationTemplate(
    name="llama_3",
    system=(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language."
    ),
    user_role="<|start_header_id|>user<|end_header_id|>\n\n",
    assistant_role="<|start_header_id|>assistant<|end_header_id|>\n\n",
    style="headers",
    sep="<|eot_id|>",
    sep2="<|end_of_text|>",
    stop_str="<|eot_id|>",
)

HERMES_2 = ConversationTemplate(
    name="hermes-2",
    system="<|im_start|>system\nAnswer the questions.",
    user_role="<|im_start|>user\n",
    assistant_role="<|im_start|>assistant\n",
    style="headers",
    sep="<|im_end|>",
    sep2="<|im_end|>",
    stop_str="<|im_end|>",
)

TEMPLATES: dict[str, ConversationTemplate] = {
    "llama_3": LLAMA_3,
    "vicuna_v1": VICUNA_V1,
    "v1": VICUNA_V1,
    "hermes-2": HERMES_2,
    "hermes_2": HERMES_2,
}


def get_template(name: str | ConversationTemplate) -> ConversationTemplate:
    """Return the template called ``name`` (``llama_3``, ``vicuna_v1``, ``hermes-2``) or ``name`` itself."""
    if isinstance(name, ConversationTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"Unknown conversation template {name!r}; known: {sorted(set(TEMPLATES))}.") from None


def detect_template(source: str | Path | object) -> ConversationTemplate:
    """Choose the template of a checkpoint from its tokenizer.

    Args:
        source: a checkpoint folder (its ``llm/`` tokenizer files are read), an ``llm/`` folder, or a
            loaded tokenizer.

    Returns:
        ``llama_3`` for a Llama-3 tokenizer (``<|eot_id|>`` in the vocabulary), ``hermes-2`` for a
        ChatML one (``<|im_end|>``), ``vicuna_v1`` for a sentencepiece Llama tokenizer (eos ``</s>``).

    Raises:
        ValueError: the tokenizer matches none of them; pass the template explicitly.
    """
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if (folder / "llm").is_dir():
            folder = folder / "llm"
        vocab = _vocab_from_files(folder)
        eos = _eos_from_files(folder)
        where = str(folder)
    else:
        get_vocab = getattr(source, "get_vocab", None)
        vocab = set(get_vocab()) if callable(get_vocab) else set()
        eos = getattr(source, "eos_token", None)
        where = type(source).__name__
    if "<|eot_id|>" in vocab:
        return LLAMA_3
    if "<|im_end|>" in vocab:
        return HERMES_2
    if eos == "</s>" or "</s>" in vocab:
        return VICUNA_V1
    raise ValueError(
        f"Cannot tell the conversation template from the tokenizer in {where}; "
        f"pass one of {sorted(set(TEMPLATES))} explicitly."
    )


def _vocab_from_files(folder: Path) -> set[str]:
    """Token strings that identify a template, read from ``tokenizer.json`` / ``tokenizer.model``."""
    tokens: set[str] = set()
    tok_json = folder / "tokenizer.json"
    if tok_json.is_file():
        data = json.loads(tok_json.read_text(encoding="utf-8"))
        tokens.update(t.get("content", "") for t in data.get("added_tokens", []))
        vocab = (data.get("model") or {}).get("vocab") or {}
        if isinstance(vocab, dict):
            tokens.update(vocab)
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
            tokens.update(str(v[0]) for v in vocab if v)
    sp_model = folder / "tokenizer.model"
    if sp_model.is_file() and not tokens:
        import sentencepiece as spm

        proc = spm.SentencePieceProcessor(model_file=str(sp_model))
        tokens.update(proc.id_to_piece(i) for i in range(proc.get_piece_size()))
    return tokens


def _eos_from_files(folder: Path) -> str | None:
    """The eos token string of ``tokenizer_config.json`` / ``special_tokens_map.json``, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                return eos
    return None
