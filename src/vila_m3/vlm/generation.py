"""Chat with a local VILA checkpoint: prompt, generation with the KV cache, streaming, cancel.

:class:`VilaChat` (alias :data:`LocalVLM`) holds a loaded model and its tokenizer. ``generate``
reproduces the released demo: greedy decoding when ``temperature == 0``, stop
on the template's stop string (``<|eot_id|>`` / ``</s>``) and on every eos id of the LLM, decode with
special tokens skipped, strip whitespace and the (trailing) stop string. One difference: the release
suppresses the stop for the first 2 tokens, which forces a second token after a one-token answer
(``yes``, ``no``, the answers of EXPERT_PROTOCOL.md §8) and lets the model run on past its answer;
here ``min_new_tokens`` is 1 (:data:`DEFAULT_MIN_NEW_TOKENS`): never an empty answer, and a one-token
answer ends where the model ends it.

Streaming: ``stream`` is called from the generating thread with each new piece of text as soon as
it is final (text that could still turn out to be the stop string or trailing whitespace is held
back); the pieces concatenate to exactly ``GenerationResult.text``. An exception raised by
``stream`` aborts the generation. ``cancel`` (a ``threading.Event``) stops it after the current token.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from .errors import CheckpointError, PromptTooLongError
from .modeling import ImageInput, VilaForConditionalGeneration, inspect_checkpoint
from .prompting import ConversationLike, PromptInputs, build_prompt
from .templates import ConversationTemplate, detect_template, get_template

__all__ = ["DEFAULT_MIN_NEW_TOKENS", "GenerationResult", "LocalVLM", "StopReason", "VilaChat", "default_device_and_dtype"]

logger = logging.getLogger(__name__)

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

StopReason = Literal["stop_string", "eos", "max_new_tokens", "cancelled"]

#: Tokens before the stop may come: 1 = no empty answer, and a one-token answer (``yes``) can end.
DEFAULT_MIN_NEW_TOKENS = 1


@dataclass(frozen=True)
class GenerationResult:
    """The answer of one generation.

    Attributes:
        text: decoded answer (special tokens skipped, whitespace and a trailing stop string stripped).
        n_tokens: tokens generated (a final stop/eos token included).
        stopped_by: ``stop_string`` (template stop text or token), ``eos`` (another eos id of the LLM),
            ``max_new_tokens`` or ``cancelled``.
        prompt_tokens: length of the prompt the LLM saw (text + image tokens).
        seconds: wall time of the generation, prompt processing included.
    """

    text: str
    n_tokens: int
    stopped_by: StopReason
    prompt_tokens: int = 0
    seconds: float = 0.0


def default_device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """``cuda`` with bfloat16 (float16 on GPUs without bf16) when a GPU is present, else CPU float32."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


class _StopOnText(StoppingCriteria):
    """Stops when the stop string shows up in the text of the last tokens (special tokens kept)."""

    def __init__(self, tokenizer: Any, stop_str: str, min_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.stop_str = stop_str
        self.min_new_tokens = min_new_tokens
        self.triggered = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] < max(1, self.min_new_tokens):
            return done
        for row in range(input_ids.shape[0]):
            tail = self.tokenizer.decode(input_ids[row, -8:].tolist(), skip_special_tokens=False)
            if self.stop_str in tail:
                done[row] = True
                self.triggered = True
        return done


class _StopOnEvent(StoppingCriteria):
    """Stops every row once ``event`` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.triggered = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs: Any) -> torch.BoolTensor:
        stop = self.event.is_set()
        self.triggered = self.triggered or stop
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _DeltaStreamer(BaseStreamer):
    """Turns generated token ids into text pieces for a callback.

    Decodes incrementally with one token of left context (so a sentencepiece word boundary or a
    multi-byte character split over tokens decodes as in the full text), and emits only text that
    the final answer will contain: leading whitespace is dropped, trailing whitespace and any tail
    that could be (the start of) the stop string are held back.
    """

    def __init__(self, tokenizer: Any, stop_str: str, callback: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.stop_str = stop_str
        self.callback = callback
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = ""
        self._prompt_seen = False
        self._byte_cache: dict[int, bool] = {}

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt ids
            self._prompt_seen = True
            return
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        if self._is_byte_token(self.ids[-1]):
            return  # a run of byte-fallback tokens decodes as a whole: wait for its end
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._flush(self._safe_prefix(self.text.lstrip()))

    def _is_byte_token(self, token_id: int) -> bool:
        """A sentencepiece byte-fallback token (``<0xE2>``)."""
        if token_id not in self._byte_cache:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            self._byte_cache[token_id] = isinstance(piece, str) and _BYTE_TOKEN.fullmatch(piece) is not None
        return self._byte_cache[token_id]

    def end(self) -> None:
        """Nothing: the final piece is sent by :meth:`finish` with the finished answer."""

    def finish(self, final_text: str) -> None:
        """Send whatever of ``final_text`` has not been sent yet."""
        self._flush(final_text)

    def _flush(self, visible: str) -> None:
        if not visible.startswith(self.sent):
            logger.warning("Streamed text diverged from the decoded answer; the final text is authoritative.")
            return
        if len(visible) > len(self.sent):
            piece = visible[len(self.sent) :]
            self.sent = visible
            self.callback(piece)

    def _safe_prefix(self, text: str) -> str:
        """``text`` up to the stop string, without trailing whitespace or a tail that may start the stop string."""
        stop = self.stop_str
        if stop and stop in text:
            return text[: text.index(stop)].rstrip()
        text = text.rstrip()
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return text[:-k].rstrip()
        return text


class VilaChat:
    """A local VILA-M3 checkpoint ready to answer conversations.

    Args:
        model: the loaded model.
        tokenizer: its tokenizer (``llm/`` of the checkpoint).
        template: conversation template name or object; detected from the tokenizer when omitted.
    """

    def __init__(
        self,
        model: VilaForConditionalGeneration,
        tokenizer: Any,
        template: str | ConversationTemplate | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = get_template(template) if template is not None else detect_template(tokenizer)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        template: str | ConversationTemplate | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: str | dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> VilaChat:
        """Load a checkpoint folder (released layout) and its tokenizer.

        Args:
            folder: the checkpoint folder.
            template: ``llama_3`` / ``vicuna_v1`` / ``hermes-2``; detected from the tokenizer when omitted.
            device: where to run when ``device_map`` is not given (default: ``cuda`` if present, else CPU).
            dtype: parameter dtype (default: bfloat16 on GPUs that support it, float16 on older GPUs,
                float32 on CPU).
            device_map: passed to :meth:`VilaForConditionalGeneration.from_pretrained` (e.g. ``"auto"``).
            **model_kwargs: further arguments of :meth:`VilaForConditionalGeneration.from_pretrained`.

        Raises:
            CheckpointError: the folder is not a loadable checkpoint (message names the file).
        """
        folder = Path(folder).expanduser()
        inspect_checkpoint(folder, require_tokenizer=True)
        default_device, default_dtype = default_device_and_dtype()
        if device is not None and torch.device(device).type == "cpu" and dtype is None:
            default_dtype = torch.float32
        try:  # before the (large) weights, so that a broken tokenizer fails fast
            tokenizer = AutoTokenizer.from_pretrained(str(folder / "llm"), local_files_only=True)
        except Exception as err:
            raise CheckpointError(
                f"Cannot load the VILA checkpoint at {folder}: llm/: cannot load the tokenizer "
                f"({type(err).__name__}: {err})"
            ) from err
        model = VilaForConditionalGeneration.from_pretrained(
            folder,
            dtype=dtype if dtype is not None else default_dtype,
            device_map=device_map if device_map is not None else str(device or default_device),
            **model_kwargs,
        )
        rows = model.get_input_embeddings().weight.shape[0]
        if not rows // 2 <= len(tokenizer) <= rows:
            raise CheckpointError(
                f"Cannot load the VILA checkpoint at {folder}: llm/: the tokenizer has {len(tokenizer)} tokens but "
                f"the LLM embeds {rows}; the tokenizer files do not belong to this model"
            )
        return cls(model, tokenizer, template)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model and tokenizer in the released layout."""
        self.model.save_pretrained(folder, tokenizer=self.tokenizer)

    # ---- facts ----------------------------------------------------------------------------------
    @property
    def is_stand_in(self) -> bool:
        """True for tiny random test checkpoints: answers are meaningless and the UI must say so."""
        return self.model.is_stand_in

    @property
    def stand_in_note(self) -> str | None:
        """What this stand-in is, for the UI (e.g. "tiny random weights for tests; not a medical model")."""
        return self.model.stand_in_note

    @property
    def tokens_per_image(self) -> int:
        return self.model.tokens_per_image

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end an answer: the LLM's eos ids, the tokenizer's eos, the template's stop token."""
        ids: list[int] = []
        configured = self.model.generation_config.eos_token_id
        configured = configured if isinstance(configured, (list, tuple)) else [configured]
        ids.extend(int(i) for i in configured if i is not None)
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        stop_id = self._single_token_id(self.template.stop_str)
        if stop_id is not None:
            ids.append(stop_id)
        return sorted(set(ids))

    def _single_token_id(self, text: str) -> int | None:
        token_id = self.tokenizer.convert_tokens_to_ids(text)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            return None
        return int(token_id)

    # ---- prompt ---------------------------------------------------------------------------------
    def prepare(self, conversation: ConversationLike, n_images: int | None = None, n_reserved: int = 0) -> PromptInputs:
        """Render and tokenize a conversation for this checkpoint (checks images and length)."""
        return build_prompt(
            conversation,
            self.tokenizer,
            self.template,
            tokens_per_image=self.tokens_per_image,
            max_length=self.context_length,
            n_images=n_images,
            n_reserved=n_reserved,
        )

    def embed(self, prompt: PromptInputs, images: Sequence[ImageInput]) -> torch.Tensor:
        """The prompt as LLM input embeddings ``(1, L, H)`` (L = ``prompt.n_tokens``)."""
        model = self.model
        pixel_values = model.image_processor(images)
        if len(images):
            features = model.get_image_features(pixel_values)
        else:
            embed = model.get_input_embeddings().weight
            features = embed.new_zeros(0, model.tokens_per_image, embed.shape[1])
        inputs_embeds, _, _ = model.embed_multimodal(prompt.as_tensor(), features)
        return inputs_embeds

    # ---- generation -----------------------------------------------------------------------------
    def generate(
        self,
        conversation: ConversationLike,
        images: Sequence[ImageInput] = (),
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float = 1.0,
        min_new_tokens: int = DEFAULT_MIN_NEW_TOKENS,
        stream: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        logits_processor: Sequence[LogitsProcessor] | None = None,
    ) -> GenerationResult:
        """Answer the conversation.

        Args:
            conversation: ``[(role, text), ...]`` starting and ending with a user turn; ``<image>`` in
                user text marks where each image goes, in order.
            images: one image per placeholder (PIL, uint8 array, path, or preprocessed tensor).
            max_new_tokens: upper bound of answer tokens (also capped by the context limit).
            temperature: 0 for greedy decoding (as the release), > 0 to sample.
            top_p: nucleus sampling mass (sampling only).
            min_new_tokens: eos / stop tokens are suppressed before this many tokens.
            stream: called with each new piece of answer text, from the generating thread.
            cancel: set it (from any thread) to stop after the current token.
            logits_processor: extra logits processors (advanced: constraints, tests).

        Returns:
            A :class:`GenerationResult`.

        Raises:
            ImageCountError: images and placeholders differ in number.
            PromptTooLongError: the prompt leaves no room for ``min_new_tokens`` in the context.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        min_new_tokens = max(0, int(min_new_tokens))
        prompt = self.prepare(conversation, n_images=len(images), n_reserved=1)
        room = self.context_length - prompt.n_tokens
        max_new = min(int(max_new_tokens), room)
        if max_new < 1:
            raise PromptTooLongError(prompt.n_text_tokens, prompt.n_images, prompt.tokens_per_image, self.context_length, 1)
        start = time.perf_counter()
        if cancel is not None and cancel.is_set():
            return GenerationResult("", 0, "cancelled", prompt.n_tokens, 0.0)

        with self._lock, torch.inference_mode():
            inputs_embeds = self.embed(prompt, images)
            config = self._generation_config(
                prompt.n_tokens, max_new, min(min_new_tokens, max_new), temperature, top_p
            )
            stop_text = _StopOnText(self.tokenizer, self.template.stop_str, min_new_tokens)
            criteria: list[StoppingCriteria] = [stop_text]
            on_cancel = _StopOnEvent(cancel) if cancel is not None else None
            if on_cancel is not None:
                criteria.append(on_cancel)
            streamer = _DeltaStreamer(self.tokenizer, self.template.stop_str, stream) if stream else None
            output = self.model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList(criteria),
                logits_processor=LogitsProcessorList(logits_processor or []),
                streamer=streamer,
            )
        new_ids = output[0].tolist()
        text = self.decode(new_ids)
        if streamer is not None:
            streamer.finish(text)
        return GenerationResult(
            text=text,
            n_tokens=len(new_ids),
            stopped_by=self._stop_reason(new_ids, max_new, stop_text, on_cancel),
            prompt_tokens=prompt.n_tokens,
            seconds=time.perf_counter() - start,
        )

    def decode(self, token_ids: Sequence[int]) -> str:
        """Answer text of generated ids: special tokens skipped, cut at the stop string, stripped."""
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()
        stop = self.template.stop_str
        if stop and stop in text:  # generation stops right after it: in practice a trailing stop string
            text = text[: text.index(stop)].strip()
        return text

    def _generation_config(
        self, prompt_tokens: int, max_new: int, min_new: int, temperature: float, top_p: float
    ) -> GenerationConfig:
        """Every generation setting explicit, so the checkpoint's sampling defaults never leak in.

        The length is given as ``max_length`` (prompt embeddings + new tokens), transformers' own
        measure when the prompt goes in as ``inputs_embeds``; it overrides the checkpoint's
        ``max_length`` without a conflict with ``max_new_tokens``.
        """
        sampling = temperature > 0
        return GenerationConfig(
            max_length=prompt_tokens + max_new,
            min_new_tokens=min_new if min_new > 0 else None,
            do_sample=sampling,
            temperature=float(temperature) if sampling else 1.0,
            top_p=float(top_p) if sampling else 1.0,
            num_beams=1,
            use_cache=True,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self._pad_token_id(),
            bos_token_id=self.tokenizer.bos_token_id,
        )

    def _pad_token_id(self) -> int | None:
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def _stop_reason(
        self, new_ids: list[int], max_new: int, stop_text: _StopOnText, on_cancel: _StopOnEvent | None
    ) -> StopReason:
        last = new_ids[-1] if new_ids else None
        if last is not None and last == self._single_token_id(self.template.stop_str):
            return "stop_string"
        if stop_text.triggered:
            return "stop_string"
        if last is not None and last in self.eos_token_ids:
            return "eos"
        if on_cancel is not None and on_cancel.triggered:
            return "cancelled"
        return "max_new_tokens" if len(new_ids) >= max_new else "cancelled"


LocalVLM = VilaChat
"""Alias: the local (in-process) VLM backend."""
