"""Errors raised by the VLM room.

All of them derive from ``ValueError`` so that callers that only know "bad input" can still catch
them, and each message names what was wrong and where (file, counts) so it can be shown to a user
or an admin as is.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ImageCountError", "PromptTooLongError", "VlmError"]


class VlmError(ValueError):
    """Base class of the VLM room's errors."""


class CheckpointError(VlmError):
    """A VILA checkpoint folder is missing a part or has a part that does not fit the others.

    The message names the file (relative to the checkpoint folder when possible) and the problem;
    when several problems are found they are all listed in the one message.
    """


class PromptTooLongError(VlmError):
    """The prompt (text tokens plus image tokens) does not fit the model's context.

    Attributes:
        n_text_tokens: number of text tokens in the prompt (without image placeholders).
        n_images: number of images in the prompt.
        tokens_per_image: tokens that each image occupies after the projector.
        limit: the context limit (``tokenizer_model_max_length`` of the checkpoint).
    """

    def __init__(
        self, n_text_tokens: int, n_images: int, tokens_per_image: int, limit: int, n_reserved: int = 0
    ) -> None:
        self.n_text_tokens = n_text_tokens
        self.n_images = n_images
        self.tokens_per_image = tokens_per_image
        self.limit = limit
        self.n_reserved = n_reserved
        total = n_text_tokens + n_images * tokens_per_image
        self.n_tokens = total
        room = f" and {n_reserved} token(s) for the answer" if n_reserved else ""
        super().__init__(
            f"The prompt is {total} tokens ({n_text_tokens} text tokens + {n_images} image(s) x "
            f"{tokens_per_image} tokens){room}, but the model accepts at most {limit} tokens "
            "(tokenizer_model_max_length); shorten the conversation or send fewer images."
        )


class ImageCountError(VlmError):
    """The number of images differs from the number of ``<image>`` placeholders in the prompt."""

    def __init__(self, n_placeholders: int, n_images: int) -> None:
        self.n_placeholders = n_placeholders
        self.n_images = n_images
        super().__init__(
            f"The conversation has {n_placeholders} <image> placeholder(s) but {n_images} image(s) were "
            "given; each image needs exactly one <image> placeholder, in order."
        )
