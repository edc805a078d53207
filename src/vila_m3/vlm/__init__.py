"""The VLM room: released VILA-M3 checkpoints on today's transformers.

* :class:`VilaForConditionalGeneration` loads (and saves) the released folder layout
  (``config.json``, ``llm/``, ``vision_tower/``, ``mm_projector/``);
* :mod:`~vila_m3.vlm.templates` and :mod:`~vila_m3.vlm.prompting` build the exact prompts the
  checkpoints were trained on (``llama_3``, ``vicuna_v1``), with images spliced at ``<image>``;
* :class:`VilaChat` (alias :data:`LocalVLM`) answers conversations: greedy or sampled, streamed,
  cancellable.
"""

from .configuration import VilaConfig
from .errors import CheckpointError, ImageCountError, PromptTooLongError, VlmError
from .generation import GenerationResult, LocalVLM, StopReason, VilaChat, default_device_and_dtype
from .modeling import (
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    CheckpointInfo,
    VilaForConditionalGeneration,
    VilaImageProcessor,
    inspect_checkpoint,
)
from .projector import VilaProjector, downsample_2x2
from .prompting import PromptInputs, build_prompt, tokenize_with_images
from .templates import LLAMA_3, VICUNA_V1, ConversationTemplate, detect_template, get_template

__all__ = [
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_INDEX",
    "LLAMA_3",
    "VICUNA_V1",
    "CheckpointError",
    "CheckpointInfo",
    "ConversationTemplate",
    "GenerationResult",
    "ImageCountError",
    "LocalVLM",
    "PromptInputs",
    "PromptTooLongError",
    "StopReason",
    "VilaChat",
    "VilaConfig",
    "VilaForConditionalGeneration",
    "VilaImageProcessor",
    "VilaProjector",
    "VlmError",
    "build_prompt",
    "default_device_and_dtype",
    "detect_template",
    "downsample_2x2",
    "get_template",
    "inspect_checkpoint",
    "tokenize_with_images",
]
