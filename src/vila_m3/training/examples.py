"""Training examples from a data-engine export: token ids, loss labels on assistant turns, images.

A record of ``train.json`` / ``val.json`` (VILA / LLaVA JSON, EXPERT_PROTOCOL.md §8) is rendered with
the checkpoint's conversation template, without a generation prompt, and tokenized exactly as a
prompt is at inference (:func:`vila_m3.vlm.prompting.tokenize_with_images`: chunk-wise around
``<image>``, one BOS). Labels are the ids themselves on the assistant answers and the separator that
ends each of them (``</s>``, ``<|eot_id|>``, or ``<|end_of_text|>`` after the last answer), and
``IGNORE_INDEX`` everywhere else: system text, user turns, role headers, image placeholders.

Images are read from the export folder and go through the model's own image processor, the same
preprocessing as at inference.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vila_m3.vlm.modeling import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, VilaImageProcessor
from vila_m3.vlm.prompting import as_turns, tokenize_with_images
from vila_m3.vlm.templates import ConversationTemplate, Turn, normalize_role

__all__ = ["ConversationDataset", "DataError", "EncodedConversation", "collate", "encode_conversation", "read_records"]


class DataError(ValueError):
    """A training export or one of its records cannot be used; the message names the file and record."""


@dataclass(frozen=True)
class EncodedConversation:
    """One conversation as the model trains on it.

    Attributes:
        input_ids: ``(T,)`` ids with ``IMAGE_TOKEN_INDEX`` at each image.
        labels: ``(T,)`` the ids on assistant answers, ``IGNORE_INDEX`` elsewhere.
        n_images: number of image placeholders.
    """

    input_ids: list[int]
    labels: list[int]
    n_images: int

    def n_tokens(self, tokens_per_image: int) -> int:
        """Length inside the model: text tokens plus ``tokens_per_image`` per image."""
        return len(self.input_ids) - self.n_images + self.n_images * tokens_per_image


def _answer_spans(turns: Sequence[Turn], template: ConversationTemplate) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` of each assistant answer.

    A span runs from the end of the assistant's role header to the end of the separator after the
    answer: the model learns to write the answer and to stop.
    """
    text = template.render(turns, add_generation_prompt=False)
    spans = []
    for i, (role, answer) in enumerate(turns):
        if role != "assistant":
            continue
        start = len(template.render(turns[:i], add_generation_prompt=True))
        try:
            after = text.index(answer, start) + len(answer)
        except ValueError:
            raise DataError(f"template {template.name} does not render answer {i} where expected") from None
        endings = sorted((sep for sep in (template.sep, template.sep2) if sep and text.startswith(sep, after)), key=len)
        spans.append((start, after + (len(endings[-1]) if endings else 0)))
    return text, spans


def encode_conversation(conversation: Any, tokenizer: Any, template: ConversationTemplate) -> EncodedConversation:
    """Tokenize a whole conversation for training.

    Args:
        conversation: ``[(role, text), ...]`` or VILA/LLaVA turns ``{"from", "value"}``; starts with a
            user turn, alternates, ends with an assistant turn.
        tokenizer: the checkpoint's fast tokenizer (offsets are used to place the labels).
        template: the checkpoint's conversation template.

    Raises:
        DataError: the conversation does not end with an answer.
    """
    turns = [(normalize_role(role), text) for role, text in as_turns(conversation)]
    if not turns or turns[-1][0] != "assistant":
        raise DataError("a training conversation must end with an assistant turn")
    text, spans = _answer_spans(turns, template)
    ids = tokenize_with_images(text, tokenizer)

    labels: list[int] = []
    bos = tokenizer.bos_token_id
    base = 0
    for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            labels.append(IGNORE_INDEX)
            base += len(IMAGE_PLACEHOLDER)
        encoded = tokenizer(chunk, return_offsets_mapping=True)
        chunk_ids, offsets = list(encoded.input_ids), list(encoded.offset_mapping)
        if i > 0 and chunk_ids and bos is not None and chunk_ids[0] == bos:
            chunk_ids, offsets = chunk_ids[1:], offsets[1:]
        for token_id, (start, end) in zip(chunk_ids, offsets, strict=True):
            position = base + start
            trained = end > start and any(lo <= position < hi for lo, hi in spans)
            labels.append(int(token_id) if trained else IGNORE_INDEX)
        base += len(chunk)
    if len(labels) != len(ids):  # the two tokenizations are the same calls; this guards the bookkeeping
        raise DataError(f"internal: {len(labels)} labels for {len(ids)} ids")
    return EncodedConversation(input_ids=ids, labels=labels, n_images=ids.count(IMAGE_TOKEN_INDEX))


def read_records(export_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The records of ``<export_dir>/<split>.json``.

    Raises:
        DataError: the file is missing or is not a JSON list of records with ``conversations``.
    """
    path = Path(export_dir) / f"{split}.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist: is {export_dir} a data-engine export (vila-m3 datagen)?")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(records, list) or not all(isinstance(r, Mapping) and "conversations" in r for r in records):
        raise DataError(f"{path} must be a JSON list of records with 'conversations'")
    return records


def record_images(record: Mapping[str, Any]) -> list[str]:
    """The image paths of a record (``image`` or ``images``), export-relative."""
    if "images" in record:
        return list(record["images"])
    return [record["image"]] if record.get("image") else []


class ConversationDataset(torch.utils.data.Dataset):
    """The records of one split of an export, encoded for training.

    Records whose length in the model (text + images) exceeds ``max_length`` are left out and
    counted in ``skipped`` (their ids in ``skipped_ids``), never truncated: a cut answer would teach
    the model to stop mid-sentence.

    Args:
        export_dir: the export folder (``train.json``, ``val.json``, ``images/``).
        split: ``train`` or ``val``.
        tokenizer: the checkpoint's tokenizer.
        template: the checkpoint's conversation template.
        image_processor: the model's image processor.
        tokens_per_image: tokens per image inside the model.
        max_length: the context limit in tokens.
    """

    def __init__(self, export_dir: str | Path, split: str, tokenizer: Any, template: ConversationTemplate,
                 image_processor: VilaImageProcessor, tokens_per_image: int, max_length: int) -> None:
        self.export_dir = Path(export_dir)
        self.split = split
        self.image_processor = image_processor
        self.items: list[tuple[EncodedConversation, list[str]]] = []
        self.skipped_ids: list[str] = []
        for n, record in enumerate(read_records(export_dir, split)):
            record_id = str(record.get("id", n))
            try:
                encoded = encode_conversation(record["conversations"], tokenizer, template)
            except ValueError as err:
                raise DataError(f"{split}.json record {record_id}: {err}") from None
            images = record_images(record)
            if len(images) != encoded.n_images:
                raise DataError(f"{split}.json record {record_id}: {encoded.n_images} <image> placeholders "
                                f"but {len(images)} images")
            if encoded.n_tokens(tokens_per_image) > max_length:
                self.skipped_ids.append(record_id)
                continue
            self.items.append((encoded, images))

    @property
    def skipped(self) -> int:
        return len(self.skipped_ids)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        encoded, images = self.items[index]
        pixels = [self._image(path) for path in images]
        return {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "pixel_values": self.image_processor(pixels) if pixels else torch.zeros(0),
        }

    def _image(self, relative: str) -> Image.Image:
        path = self.export_dir / relative
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read image {path}: {err}") from None


def collate(batch: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` / ``labels`` / ``attention_mask`` ``(B, T_max)``, images concatenated.

    The model drops the padding before splicing the images in (``attention_mask``), so the padding
    side does not matter for the loss.
    """
    length = max(item["input_ids"].shape[0] for item in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        n = item["input_ids"].shape[0]
        input_ids[row, :n], labels[row, :n], mask[row, :n] = item["input_ids"], item["labels"], 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    pixels = [item["pixel_values"] for item in batch if item["pixel_values"].numel()]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    return out
