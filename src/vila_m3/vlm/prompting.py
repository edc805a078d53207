"""From a conversation to the token ids the model was trained on.

The rendered prompt (see :mod:`~vila_m3.vlm.templates`) is split on the literal ``<image>``; each
chunk is tokenized on its own, exactly as the VILA 1.5 code base does: the first chunk keeps the BOS
its tokenizer adds, every later chunk drops its leading BOS, and ``IMAGE_TOKEN_INDEX`` (-200) goes
between chunks. The model later replaces each -200 by the image's projected tokens (196 for the
releases), which is what the context limit counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ImageCountError, PromptTooLongError
from .modeling import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from .templates import ConversationTemplate, Turn, normalize_role

__all__ = [
    "PromptInputs",
    "as_turns",
    "build_prompt",
    "count_placeholders",
    "special_token_texts",
    "tokenize_with_images",
]

ConversationLike = Sequence[Turn | Sequence[str] | Mapping[str, Any]]
"""``[(role, text), ...]``, or dicts ``{"role", "content"}`` / ``{"from", "value"}`` (VILA/LLaVA JSON)."""


@dataclass(frozen=True)
class PromptInputs:
    """A tokenized prompt.

    Attributes:
        text: the rendered prompt, ``<image>`` placeholders included.
        input_ids: token ids with ``IMAGE_TOKEN_INDEX`` at each image.
        n_images: number of images (placeholders).
        tokens_per_image: tokens each image occupies in the model (196 for the releases).
    """

    text: str
    input_ids: tuple[int, ...]
    n_images: int
    tokens_per_image: int

    @property
    def n_text_tokens(self) -> int:
        """Text tokens, placeholders excluded."""
        return len(self.input_ids) - self.n_images

    @property
    def n_tokens(self) -> int:
        """Length of the sequence the LLM sees: text tokens + images x tokens per image."""
        return self.n_text_tokens + self.n_images * self.tokens_per_image

    def as_tensor(self) -> torch.LongTensor:
        """``(1, T)`` ids with placeholders."""
        return torch.tensor([self.input_ids], dtype=torch.long)


def as_turns(conversation: ConversationLike) -> list[Turn]:
    """Normalise a conversation to ``[(role, text), ...]`` with roles ``user`` / ``assistant``."""
    turns: list[Turn] = []
    for i, turn in enumerate(conversation):
        if isinstance(turn, Mapping):
            role = turn.get("role", turn.get("from"))
            text = turn.get("content", turn.get("value"))
        elif isinstance(turn, Sequence) and not isinstance(turn, str) and len(turn) == 2:
            role, text = turn
        else:
            raise ValueError(f"Turn {i} must be a (role, text) pair or a dict with role/content, got {turn!r}.")
        if not isinstance(text, str):
            raise ValueError(f"Turn {i} text must be a string, got {type(text).__name__}.")
        turns.append((normalize_role(str(role)), text))
    return turns


def count_placeholders(text: str) -> int:
    """Number of ``<image>`` placeholders in ``text``."""
    return text.count(IMAGE_PLACEHOLDER)


def tokenize_with_images(text: str, tokenizer: Any) -> list[int]:
    """Tokenize a prompt chunk-wise around ``<image>`` (VILA 1.5 ``tokenizer_image_token``).

    Args:
        text: the rendered prompt.
        tokenizer: the checkpoint's tokenizer (adds BOS to each encoded chunk).

    Returns:
        Ids with ``IMAGE_TOKEN_INDEX`` between chunks; only the first chunk keeps its leading BOS.
    """
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        chunk_ids = list(tokenizer(chunk).input_ids)
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            if chunk_ids and bos is not None and chunk_ids[0] == bos:
                chunk_ids = chunk_ids[1:]
        ids.extend(chunk_ids)
    return ids


def special_token_texts(tokenizer: Any) -> set[str]:
    """The strings a tokenizer turns into special tokens (its named ones and every added special token)."""
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", None) or []}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials |= {str(tok.content) for tok in added.values() if getattr(tok, "special", False)}
    specials.discard("")
    return specials


def _check_no_special_tokens(turns: Sequence[Turn], tokenizer: Any) -> None:
    """Refuse turn text that holds special-token strings (they would forge turn boundaries)."""
    specials = special_token_texts(tokenizer)
    for i, (role, text) in enumerate(turns):
        found = sorted(s for s in specials if s in text)
        if found:
            raise ValueError(f"Turn {i} ({role}) contains the special token text {found[0]!r}; remove it.")


def build_prompt(
    conversation: ConversationLike,
    tokenizer: Any,
    template: ConversationTemplate,
    tokens_per_image: int,
    max_length: int,
    n_images: int | None = None,
    n_reserved: int = 0,
    add_generation_prompt: bool = True,
) -> PromptInputs:
    """Render, check and tokenize a conversation.

    Args:
        conversation: the turns (see :data:`ConversationLike`); images are ``<image>`` in user text.
        tokenizer: the checkpoint's tokenizer.
        template: the conversation template.
        tokens_per_image: tokens per image after the projector (196 for the releases).
        max_length: the context limit (``tokenizer_model_max_length``, 4096).
        n_images: number of images that come with the prompt; checked against the placeholders.
        n_reserved: tokens that must stay free for the answer.
        add_generation_prompt: end with the empty assistant slot.

    Raises:
        ImageCountError: ``n_images`` differs from the number of ``<image>`` placeholders.
        PromptTooLongError: text tokens + images x ``tokens_per_image`` + ``n_reserved`` > ``max_length``.
        ValueError: malformed conversation, or special-token text inside a turn.
    """
    turns = as_turns(conversation)
    _check_no_special_tokens(turns, tokenizer)
    text = template.render(turns, add_generation_prompt=add_generation_prompt)
    n_placeholders = count_placeholders(text)
    if n_images is not None and n_images != n_placeholders:
        raise ImageCountError(n_placeholders, n_images)
    ids = tokenize_with_images(text, tokenizer)
    prompt = PromptInputs(text=text, input_ids=tuple(ids), n_images=n_placeholders, tokens_per_image=tokens_per_image)
    if prompt.n_tokens + n_reserved > max_length:
        raise PromptTooLongError(prompt.n_text_tokens, n_placeholders, tokens_per_image, max_length, n_reserved)
    return prompt
