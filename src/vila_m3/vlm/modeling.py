"""VILA-M3 (VILA 1.5 architecture) on today's transformers.

A released checkpoint folder holds three parts, each a standard piece of transformers or a small
module of ours, plus a top-level ``config.json`` (:class:`~vila_m3.vlm.configuration.VilaConfig`)::

    config.json     llm_cfg, vision_tower_cfg, mm_projector_cfg, hidden_size, mm_hidden_size, ...
    llm/            LlamaForCausalLM (sharded safetensors + index, generation_config.json, tokenizer)
    vision_tower/   SiglipVisionModel (model.safetensors with ``vision_model.*`` keys, preprocessor_config.json)
    mm_projector/   VilaProjector (config.json with mm_projector_type, model.safetensors with ``layers.*``)

Forward pass for a prompt with images (shapes for the released 8B: C = 1152, H = 4096)::

    pixel_values (N, 3, 384, 384)
      -> SigLIP, hidden_states[mm_vision_select_layer = -2]  (N, 729, C)   all tokens (cls_patch)
      -> projector (mlp_downsample)                           (N, 196, H)
    input_ids (1, T) with IMAGE_TOKEN_INDEX (-200) at each <image>
      -> text embeddings with each placeholder replaced by its image's 196 embeddings  (1, T - N + 196 N, H)
      -> LlamaForCausalLM(inputs_embeds=...)                  logits (1, L, vocab)

Generation embeds the prompt once and then decodes token ids with the LLM's KV cache
(``GenerationMixin`` with ``inputs_embeds``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    GenerationConfig,
    GenerationMixin,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration import VilaConfig, dtype_from_string, legacy_config_dict
from .errors import CheckpointError, ImageCountError
from .projector import PROJECTOR_TYPES, VilaProjector

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_INDEX",
    "CheckpointInfo",
    "ImageInput",
    "VilaForConditionalGeneration",
    "VilaImageProcessor",
    "VilaPreTrainedModel",
    "inspect_checkpoint",
]

IMAGE_TOKEN_INDEX = -200
"""Placeholder id of an image in ``input_ids`` (replaced by the image's projected tokens)."""
IMAGE_PLACEHOLDER = "<image>"
"""Literal text of an image placeholder in prompts (not a vocabulary token)."""
IGNORE_INDEX = -100
"""Label of positions that do not count in the loss (image tokens, padding)."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)

ImageInput = Image.Image | np.ndarray | torch.Tensor | str | Path
"""An image: PIL image, uint8 array (H, W) / (H, W, 3|4), a path, or an already preprocessed (3, S, S) tensor."""


# ------------------------------------------------------------------------------------------------
# Image preprocessing
# ------------------------------------------------------------------------------------------------
@dataclass
class VilaImageProcessor:
    """Image preprocessing of the VILA 1.5 ``resize`` mode for a SigLIP tower.

    RGB -> PIL resize to ``size`` (bicubic) -> x * rescale_factor (1/255) -> (x - mean) / std.

    Attributes:
        size: ``(height, width)`` in pixels (384 x 384 for SigLIP so400m).
        image_mean, image_std: per-channel normalisation (0.5 for SigLIP).
        rescale_factor: multiplier from 0..255 to 0..1.
        resample: PIL resampling filter (3 = bicubic).
    """

    size: tuple[int, int] = (384, 384)
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    @classmethod
    def from_configs(cls, vision_config: SiglipVisionConfig, preprocessor: dict | None = None) -> VilaImageProcessor:
        """Build from ``vision_tower/preprocessor_config.json`` (when given) and the vision config's image size."""
        preprocessor = preprocessor or {}
        side = int(vision_config.image_size)
        size = preprocessor.get("size") or {}
        if isinstance(size, dict) and "height" in size and "width" in size:
            hw = (int(size["height"]), int(size["width"]))
        elif isinstance(size, dict) and "shortest_edge" in size:
            hw = (int(size["shortest_edge"]),) * 2
        else:
            hw = (side, side)
        return cls(
            size=hw,
            image_mean=tuple(float(v) for v in preprocessor.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(float(v) for v in preprocessor.get("image_std", (0.5, 0.5, 0.5))),
            rescale_factor=float(preprocessor.get("rescale_factor", 1 / 255)),
            resample=int(preprocessor.get("resample", int(Image.Resampling.BICUBIC))),
        )

    def to_dict(self) -> dict[str, Any]:
        """``preprocessor_config.json`` content (SigLIP image processor format)."""
        return {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.image_mean),
            "image_processor_type": "SiglipImageProcessor",
            "image_std": list(self.image_std),
            "processor_class": "SiglipProcessor",
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"height": self.size[0], "width": self.size[1]},
        }

    def __call__(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Preprocess images to ``(N, 3, height, width)`` float32 pixel values."""
        if not images:
            return torch.empty(0, 3, *self.size)
        return torch.stack([self.preprocess(image) for image in images])

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image to a ``(3, height, width)`` float32 tensor."""
        if isinstance(image, torch.Tensor):
            if tuple(image.shape) != (3, *self.size) or not image.is_floating_point():
                raise ValueError(
                    f"A tensor image must be already preprocessed: float (3, {self.size[0]}, {self.size[1]}), "
                    f"got {image.dtype} {tuple(image.shape)}; pass a PIL image or a uint8 array instead."
                )
            return image.float()
        pil = _to_pil(image).convert("RGB")
        height, width = self.size
        if pil.size != (width, height):
            pil = pil.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(pil, dtype=np.float32) * np.float32(self.rescale_factor)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _to_pil(image: ImageInput) -> Image.Image:
    """PIL image from a PIL image, a path, or a uint8 array ``(H, W)`` / ``(H, W, 1|3|4)``."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"Image arrays must be uint8 (0..255), got {image.dtype}; window/scale the slice first.")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
            return Image.fromarray(image)
        raise ValueError(f"Image arrays must be (H, W) or (H, W, 3|4), got shape {image.shape}.")
    raise TypeError(f"Unsupported image type {type(image).__name__}; use a PIL image, a uint8 array or a path.")


# ------------------------------------------------------------------------------------------------
# Checkpoint inspection (no weights are read, only JSON files and safetensors headers)
# ------------------------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found in a checkpoint folder.

    Attributes:
        folder: the checkpoint folder.
        config: top-level ``config.json`` content.
        llm_config, vision_config, projector_config: the parts' ``config.json`` contents.
        preprocessor_config: ``vision_tower/preprocessor_config.json`` content, if present.
        llm_weight_files, vision_weight_files, projector_weight_files: safetensors files of each part.
        projector_shapes: tensor name -> shape in the projector weights.
        has_tokenizer: ``llm/`` holds tokenizer files.
    """

    folder: Path
    config: dict[str, Any]
    llm_config: dict[str, Any]
    vision_config: dict[str, Any]
    projector_config: dict[str, Any]
    preprocessor_config: dict[str, Any] | None
    llm_weight_files: list[Path] = field(default_factory=list)
    vision_weight_files: list[Path] = field(default_factory=list)
    projector_weight_files: list[Path] = field(default_factory=list)
    projector_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    has_tokenizer: bool = False

    @property
    def projector_type(self) -> str:
        return str(self.projector_config.get("mm_projector_type"))

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (``llm/config.json``, else the top-level ``model_dtype``)."""
        for value in (
            self.llm_config.get("dtype"),
            self.llm_config.get("torch_dtype"),
            self.config.get("model_dtype"),
        ):
            try:
                dtype = dtype_from_string(value)
            except ValueError:
                dtype = None
            if dtype is not None:
                return dtype
        return torch.float32


class _Problems:
    """Collects the problems of a checkpoint folder to raise them as one :class:`CheckpointError`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.items: list[str] = []

    def add(self, path: Path | str, problem: str, is_folder: bool = False) -> None:
        """Record ``problem`` for ``path`` (named relative to the checkpoint folder; folders end in /)."""
        path = Path(path)
        try:
            name = path.relative_to(self.folder).as_posix()
        except ValueError:
            name = str(path)
        if name in (".", ""):
            name = str(self.folder)
        if is_folder or path.is_dir():
            name += "/"
        self.items.append(f"{name}: {problem}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise CheckpointError(f"Cannot load the VILA checkpoint at {self.folder}: {self.items[0]}")
        listed = "\n".join(f"  - {item}" for item in self.items)
        raise CheckpointError(f"Cannot load the VILA checkpoint at {self.folder}:\n{listed}")


def _read_json(path: Path, problems: _Problems, what: str) -> dict[str, Any] | None:
    if not path.is_file():
        problems.add(path, f"missing ({what})")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        problems.add(path, f"not valid JSON ({err})")
        return None
    if not isinstance(data, dict):
        problems.add(path, f"expected a JSON object, found {type(data).__name__}")
        return None
    return data


def _read_safetensors_shapes(path: Path, problems: _Problems) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from a safetensors header; records a problem if the file is unreadable."""
    if not path.is_file():
        problems.add(path, "missing weight file")
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error type for corrupt files
        problems.add(path, f"corrupt or truncated safetensors file ({err})")
        return None


def _weight_files(part: Path, problems: _Problems) -> list[Path]:
    """Safetensors files of a part: from ``model.safetensors.index.json`` when present."""
    index = part / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index, problems, "shard index")
        if data is None:
            return []
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            problems.add(index, "has no weight_map")
            return []
        return [part / name for name in sorted(set(weight_map.values()))]
    single = part / "model.safetensors"
    if single.is_file():
        return [single]
    if any(part.glob("*.bin")) or any(part.glob("*.pt")):
        problems.add(part, "weights are not in safetensors format (only .bin/.pt found); convert them first")
    else:
        problems.add(part, "no model.safetensors or model.safetensors.index.json")
    return []


def _expect(problems: _Problems, path: Path, what: str, found: Any, expected: Any, hint: str = "") -> None:
    if found != expected:
        problems.add(path, f"{what} is {found}, expected {expected}{hint}")


def inspect_checkpoint(folder: str | Path, require_tokenizer: bool = False) -> CheckpointInfo:
    """Check a VILA checkpoint folder without loading weights (configs and safetensors headers only).

    Checks that every part is there, that the JSON files parse, that the hidden sizes agree across
    configs (top-level ``hidden_size`` = LLM width, ``mm_hidden_size`` = vision width), that the
    projector type is known and its weights have the shapes the configs imply, and that every
    safetensors file is readable.

    Args:
        folder: the checkpoint folder.
        require_tokenizer: also require tokenizer files in ``llm/``.

    Returns:
        A :class:`CheckpointInfo`.

    Raises:
        CheckpointError: one error listing every problem found, each with the file it concerns.
    """
    folder = Path(folder).expanduser()
    problems = _Problems(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"Cannot load the VILA checkpoint at {folder}: not a folder (a VILA checkpoint is a folder with "
            "config.json, llm/, vision_tower/ and mm_projector/)"
        )

    config = _read_json(folder / "config.json", problems, "top-level config of a VILA checkpoint") or {}
    if config and config.get("model_type") not in (VilaConfig.model_type, None):
        problems.add(folder / "config.json", f"model_type is {config.get('model_type')!r}, expected 'llava_llama'")

    parts: dict[str, dict[str, Any]] = {}
    for name, what in (("llm", "language model"), ("vision_tower", "vision tower"), ("mm_projector", "projector")):
        part = folder / name
        if not part.is_dir():
            problems.add(folder / name, f"folder missing (holds the {what})", is_folder=True)
            parts[name] = {}
            continue
        parts[name] = _read_json(part / "config.json", problems, f"{what} config") or {}

    llm_cfg, vision_cfg, projector_cfg = parts["llm"], parts["vision_tower"], parts["mm_projector"]
    info = CheckpointInfo(
        folder=folder,
        config=config,
        llm_config=llm_cfg,
        vision_config=vision_cfg,
        projector_config=projector_cfg,
        preprocessor_config=None,
    )

    # -- the parts' types and cross-checked sizes
    if llm_cfg and llm_cfg.get("model_type", "llama") != "llama":
        problems.add(folder / "llm/config.json", f"model_type {llm_cfg.get('model_type')!r} is not supported (only llama)")
    if vision_cfg and vision_cfg.get("model_type", "siglip_vision_model") not in ("siglip_vision_model", "siglip"):
        problems.add(
            folder / "vision_tower/config.json",
            f"model_type {vision_cfg.get('model_type')!r} is not supported (only SigLIP vision towers)",
        )
    llm_width = llm_cfg.get("hidden_size")
    vision_width = vision_cfg.get("hidden_size")
    if config and llm_width is not None and config.get("hidden_size") is not None:
        _expect(problems, folder / "config.json", "hidden_size", config.get("hidden_size"), llm_width,
                " (the width in llm/config.json)")
    if config and vision_width is not None and config.get("mm_hidden_size") is not None:
        _expect(problems, folder / "config.json", "mm_hidden_size", config.get("mm_hidden_size"), vision_width,
                " (the width in vision_tower/config.json)")
    if config:
        feature = config.get("mm_vision_select_feature", "cls_patch")
        if feature not in ("cls_patch", "patch"):
            problems.add(folder / "config.json", f"mm_vision_select_feature {feature!r} is not supported (cls_patch, patch)")
        layer = config.get("mm_vision_select_layer", -2)
        n_layers = vision_cfg.get("num_hidden_layers")
        if not isinstance(layer, int) or (isinstance(n_layers, int) and not -n_layers - 1 <= layer <= n_layers):
            problems.add(folder / "config.json", f"mm_vision_select_layer {layer!r} is out of range for {n_layers} layers")
    projector_type = projector_cfg.get("mm_projector_type") if projector_cfg else None
    if projector_cfg and projector_type not in PROJECTOR_TYPES:
        problems.add(
            folder / "mm_projector/config.json",
            f"unknown mm_projector_type {projector_type!r} (supported: {', '.join(PROJECTOR_TYPES)})",
        )

    # -- weights: headers readable, key shapes consistent with the configs
    if (folder / "llm").is_dir():
        info.llm_weight_files = _weight_files(folder / "llm", problems)
        for path in info.llm_weight_files:
            shapes = _read_safetensors_shapes(path, problems)
            for key in ("model.embed_tokens.weight", "lm_head.weight"):
                if shapes and key in shapes and llm_cfg.get("vocab_size") and llm_width:
                    _expect(problems, path, f"{key} shape", shapes[key], (llm_cfg["vocab_size"], llm_width),
                            " (vocab_size, hidden_size of llm/config.json)")
        info.has_tokenizer = any((folder / "llm" / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
        if require_tokenizer and not info.has_tokenizer:
            problems.add(folder / "llm", "no tokenizer (tokenizer.json or tokenizer.model)")
    if (folder / "vision_tower").is_dir():
        info.vision_weight_files = _weight_files(folder / "vision_tower", problems)
        for path in info.vision_weight_files:
            shapes = _read_safetensors_shapes(path, problems) or {}
            patch = next((s for k, s in shapes.items() if k.endswith("embeddings.patch_embedding.weight")), None)
            if patch is not None and vision_width and vision_cfg.get("patch_size"):
                p = vision_cfg["patch_size"]
                _expect(problems, path, "patch_embedding.weight shape", patch, (vision_width, 3, p, p),
                        " (hidden_size, 3, patch_size, patch_size of vision_tower/config.json)")
        preprocessor = folder / "vision_tower" / "preprocessor_config.json"
        if preprocessor.is_file():
            info.preprocessor_config = _read_json(preprocessor, problems, "image preprocessing")
    if (folder / "mm_projector").is_dir():
        info.projector_weight_files = _weight_files(folder / "mm_projector", problems)
        for path in info.projector_weight_files:
            info.projector_shapes.update(_read_safetensors_shapes(path, problems) or {})
        if projector_type in PROJECTOR_TYPES and llm_width and vision_width and info.projector_shapes:
            with torch.device("meta"):
                expected = VilaProjector(projector_type, vision_width, llm_width).expected_shapes()
            where = info.projector_weight_files[0]
            missing = sorted(set(expected) - set(info.projector_shapes))
            unexpected = sorted(set(info.projector_shapes) - set(expected))
            if missing or unexpected:
                problems.add(
                    where,
                    f"keys do not match a {projector_type} projector (missing: {missing or 'none'}, "
                    f"unexpected: {unexpected or 'none'})",
                )
            for key in sorted(set(expected) & set(info.projector_shapes)):
                _expect(problems, where, f"{key} shape", info.projector_shapes[key], expected[key],
                        f" (C={vision_width} from vision_tower/config.json, H={llm_width} from llm/config.json)")
    problems.raise_if_any()
    return info


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
class VilaPreTrainedModel(PreTrainedModel):
    """Base class: the config class and what ``device_map`` must not split."""

    config: VilaConfig
    config_class = VilaConfig
    base_model_prefix = "llm"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "LlamaDecoderLayer",
        "SiglipEncoderLayer",
        "SiglipVisionEmbeddings",
        "SiglipMultiheadAttentionPoolingHead",
        "VilaProjector",
    ]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


_PASSED_TO_PARTS = ("attn_implementation", "max_memory", "offload_folder", "offload_buffers")
_IGNORED_KWARGS = ("local_files_only", "low_cpu_mem_usage", "trust_remote_code", "use_safetensors", "revision")
_AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class VilaForConditionalGeneration(VilaPreTrainedModel, GenerationMixin):
    """VILA 1.5 / VILA-M3: SigLIP vision tower + projector + Llama LLM.

    Load a released checkpoint with :meth:`from_pretrained` (the folder layout of the release) and
    write one with :meth:`save_pretrained`. Built directly from a config, the parts get random
    weights.

    Args:
        config: the top-level config.
        llm, vision_tower, mm_projector: already loaded parts (used by :meth:`from_pretrained`).
    """

    def __init__(
        self,
        config: VilaConfig,
        llm: LlamaForCausalLM | None = None,
        vision_tower: SiglipVisionModel | None = None,
        mm_projector: VilaProjector | None = None,
    ) -> None:
        super().__init__(config)
        loaded = llm is not None
        # the LLM is registered first: ``self.device`` (where generation puts its inputs) is its device
        self.llm = llm if llm is not None else LlamaForCausalLM(config.text_config)
        self.vision_tower = vision_tower if vision_tower is not None else SiglipVisionModel(config.vision_config)
        self.mm_projector = (
            mm_projector
            if mm_projector is not None
            else VilaProjector(config.projector_type, config.vision_config.hidden_size, config.text_config.hidden_size)
        )
        config.set_part_configs(self.llm.config, self.vision_tower.config)
        self.image_processor = VilaImageProcessor.from_configs(self.vision_tower.config)
        if loaded:
            # weights come from the checkpoint: keep post_init from re-initialising anything
            for module in self.modules():
                module._is_hf_initialized = True
        self.post_init()
        if self.can_generate() and getattr(self.llm, "generation_config", None) is not None:
            self.generation_config = GenerationConfig.from_dict(self.llm.generation_config.to_dict())

    # ---- properties -----------------------------------------------------------------------------
    @property
    def is_stand_in(self) -> bool:
        """True for tiny random test checkpoints; a UI must then say the answers are meaningless."""
        return self.config.is_stand_in

    @property
    def stand_in_note(self) -> str | None:
        """What this stand-in is (shown with its answers); None for real weights."""
        return self.config.stand_in_note

    @property
    def num_vision_tokens(self) -> int:
        """Vision tokens per image before the projector ((384 / 14)^2 = 729 for SigLIP so400m)."""
        vision = self.vision_tower.config
        n = (vision.image_size // vision.patch_size) ** 2
        return n - 1 if self.config.mm_vision_select_feature == "patch" else n

    @property
    def tokens_per_image(self) -> int:
        """LLM tokens per image after the projector (196 for the released checkpoints)."""
        return self.mm_projector.num_output_tokens(self.num_vision_tokens)

    @property
    def context_length(self) -> int:
        """The context limit in tokens (``tokenizer_model_max_length``)."""
        return self.config.tokenizer_model_max_length

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    # ---- images -> embeddings -----------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Project images to LLM embeddings.

        Args:
            pixel_values: ``(N, 3, S, S)`` preprocessed images.

        Returns:
            ``(N, tokens_per_image, H)`` embeddings, in the projector's dtype and device.
        """
        tower = self.vision_tower
        first = next(tower.parameters())
        outputs = tower(pixel_values.to(first.device, first.dtype), output_hidden_states=True)
        features = outputs.hidden_states[self.config.mm_vision_select_layer]  # (N, 729, C)
        if self.config.mm_vision_select_feature == "patch":
            features = features[:, 1:]
        proj = next(self.mm_projector.parameters())
        return self.mm_projector(features.to(proj.device, proj.dtype))

    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        image_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.LongTensor | None]:
        """Splice image embeddings into the text embeddings at the ``IMAGE_TOKEN_INDEX`` placeholders.

        Args:
            input_ids: ``(B, T)`` token ids with ``IMAGE_TOKEN_INDEX`` where each image goes.
            image_features: ``(N, K, H)`` projected images, in placeholder order over the batch.
            attention_mask: ``(B, T)``, 0 at padding (dropped before splicing).
            labels: ``(B, T)`` training labels; image positions get ``IGNORE_INDEX``.

        Returns:
            ``inputs_embeds`` ``(B, L, H)``, ``attention_mask`` ``(B, L)`` and ``labels`` ``(B, L)`` (or None),
            where each row holds T_b - N_b + N_b K positions, left-padded to the longest row.
        """
        embed = self.get_input_embeddings()
        device = embed.weight.device
        input_ids = input_ids.to(device)
        image_mask = input_ids == IMAGE_TOKEN_INDEX
        n_placeholders = int(image_mask.sum())
        if n_placeholders != image_features.shape[0]:
            raise ImageCountError(n_placeholders, int(image_features.shape[0]))
        text_embeds = embed(input_ids.masked_fill(image_mask, 0))  # (B, T, H)
        image_features = image_features.to(device, text_embeds.dtype)
        keep = attention_mask.to(device).bool() if attention_mask is not None else torch.ones_like(image_mask)
        if labels is not None:
            labels = labels.to(device)

        rows: list[torch.Tensor] = []
        row_labels: list[torch.Tensor] = []
        next_image = 0
        for b in range(input_ids.shape[0]):
            positions = image_mask[b].nonzero().flatten().tolist()
            pieces, label_pieces, start = [], [], 0
            for pos in [*positions, input_ids.shape[1]]:
                segment = keep[b, start:pos]
                pieces.append(text_embeds[b, start:pos][segment])
                if labels is not None:
                    label_pieces.append(labels[b, start:pos][segment])
                if pos < input_ids.shape[1]:
                    image = image_features[next_image]
                    next_image += 1
                    pieces.append(image)
                    if labels is not None:
                        label_pieces.append(torch.full((image.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=device))
                start = pos + 1
            rows.append(torch.cat(pieces))
            if labels is not None:
                row_labels.append(torch.cat(label_pieces))

        length = max(row.shape[0] for row in rows)
        hidden = text_embeds.shape[-1]
        inputs_embeds = text_embeds.new_zeros(len(rows), length, hidden)
        new_mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        new_labels = None if labels is None else torch.full((len(rows), length), IGNORE_INDEX, dtype=labels.dtype, device=device)
        for b, row in enumerate(rows):  # left padding, as generation expects
            inputs_embeds[b, length - row.shape[0] :] = row
            new_mask[b, length - row.shape[0] :] = 1
            if new_labels is not None:
                new_labels[b, length - row.shape[0] :] = row_labels[b]
        return inputs_embeds, new_mask, new_labels

    # ---- forward / generate -------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward.

        With ``pixel_values`` (or ``image_features``), ``input_ids`` must hold one ``IMAGE_TOKEN_INDEX``
        per image and the images are spliced in first (the sequence grows by K - 1 per image);
        otherwise the call goes to the LLM as is (``input_ids`` or ``inputs_embeds``, KV cache).

        Returns:
            The LLM's ``CausalLMOutputWithPast``: ``logits`` ``(B, L, vocab)``, ``past_key_values``, ``loss``.
        """
        if pixel_values is not None or image_features is not None:
            if inputs_embeds is not None or input_ids is None:
                raise ValueError("Pass input_ids with image placeholders together with pixel_values, not inputs_embeds.")
            if image_features is None:
                image_features = self.get_image_features(pixel_values)
            inputs_embeds, attention_mask, labels = self.embed_multimodal(input_ids, image_features, attention_mask, labels)
            input_ids = None
            if position_ids is None and past_key_values is None and not bool(attention_mask.all()):
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            if bool(attention_mask.all()):
                attention_mask = None
        return self.llm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate with transformers' ``GenerationMixin``; images are embedded once, before decoding.

        Args:
            input_ids: ``(B, T)`` prompt ids, with ``IMAGE_TOKEN_INDEX`` placeholders when images are given.
            pixel_values: ``(N, 3, S, S)`` images, one per placeholder, in order.
            attention_mask: ``(B, T)`` mask of ``input_ids``.
            inputs_embeds: an already embedded prompt ``(B, L, H)`` instead of ids.
            image_features: already projected images ``(N, K, H)`` instead of ``pixel_values``.
            **kwargs: generation arguments (``max_new_tokens``, ``do_sample``, ``streamer``, ...).

        Returns:
            What ``GenerationMixin.generate`` returns; when the prompt went in as embeddings (always with
            images) the sequences hold the new tokens only.
        """
        if pixel_values is not None or image_features is not None:
            if inputs_embeds is not None or input_ids is None:
                raise ValueError("Pass input_ids with image placeholders together with pixel_values, not inputs_embeds.")
            if image_features is None:
                image_features = self.get_image_features(pixel_values)
            inputs_embeds, attention_mask, _ = self.embed_multimodal(input_ids, image_features, attention_mask)
            input_ids = None
        elif input_ids is not None and bool((input_ids == IMAGE_TOKEN_INDEX).any()):
            raise ImageCountError(int((input_ids == IMAGE_TOKEN_INDEX).sum()), 0)
        if inputs_embeds is not None:
            if attention_mask is None:
                attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
            return super().generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args: Any,
        dtype: str | torch.dtype | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device_map: str | int | torch.device | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> VilaForConditionalGeneration:
        """Load a checkpoint folder in the released VILA layout.

        Args:
            pretrained_model_name_or_path: a local checkpoint folder (nothing is downloaded).
            dtype: parameter dtype for all parts; ``None`` / ``"auto"`` keeps the stored dtype
                (bfloat16 for the releases). ``torch_dtype`` is the older name of the same argument.
            device_map: ``None`` (CPU), a device (``"cuda:0"``, ``0``, ``torch.device``), one of ``"auto"``,
                ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` (planned over the whole model with
                accelerate; the vision tower and projector stay whole), or a dict from module names
                (``"llm.model.layers.3"``, ``"vision_tower"``, ``"mm_projector"``, ``""``) to devices.
            **kwargs: ``attn_implementation``, ``max_memory``, ``offload_folder``, ``offload_buffers``
                (passed to both transformers parts), ``quantization_config`` (LLM only).

        Raises:
            CheckpointError: a part is missing, unreadable, or does not fit the others; the message
                names the file(s).
        """
        if model_args:
            raise TypeError("VilaForConditionalGeneration.from_pretrained takes the folder as its only positional argument.")
        part_kwargs = {k: kwargs.pop(k) for k in _PASSED_TO_PARTS if k in kwargs}
        quantization_config = kwargs.pop("quantization_config", None)
        for key in _IGNORED_KWARGS:
            kwargs.pop(key, None)
        if kwargs:
            raise TypeError(f"Unexpected arguments for VilaForConditionalGeneration.from_pretrained: {sorted(kwargs)}")

        folder = Path(pretrained_model_name_or_path).expanduser()
        info = inspect_checkpoint(folder)
        dtype = _resolve_dtype(dtype, torch_dtype, info)

        config = VilaConfig.from_dict(dict(info.config))
        config.name_or_path = str(folder)
        config.set_part_configs(projector_cfg=info.projector_config)
        part_maps = _split_device_map(
            device_map, config, info, dtype, part_kwargs.get("max_memory"), part_kwargs.get("attn_implementation")
        )

        llm_kwargs = dict(part_kwargs)
        if quantization_config is not None:
            llm_kwargs["quantization_config"] = quantization_config
        llm = _load_part(LlamaForCausalLM, folder / "llm", dtype, part_maps["llm"], llm_kwargs, folder)
        vision_tower = _load_part(
            SiglipVisionModel, folder / "vision_tower", dtype, part_maps["vision_tower"], part_kwargs, folder
        )
        projector = _load_projector(info, dtype, part_maps["mm_projector"])

        model = cls(config, llm=llm, vision_tower=vision_tower, mm_projector=projector)
        model.image_processor = VilaImageProcessor.from_configs(vision_tower.config, info.preprocessor_config)
        model.name_or_path = str(folder)
        if device_map is not None:
            model.hf_device_map = _merged_device_map(llm, vision_tower, projector)
        model.eval()
        return model

    # ---- saving -------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        tokenizer: Any | None = None,
        max_shard_size: int | str = "5GB",
        state_dict: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the model in the released VILA layout (``config.json``, ``llm/``, ``vision_tower/``, ``mm_projector/``).

        Args:
            save_directory: target folder (created).
            tokenizer: saved into ``llm/``; when omitted, the tokenizer files of the folder the model was
                loaded from are copied, if any.
            max_shard_size: shard size of the LLM weights.
            state_dict: the whole model's weights (``llm.*``, ``vision_tower.*``, ``mm_projector.*``) to
                write instead of the modules' own, e.g. gathered from sharded training (ZeRO-3, FSDP).
            **kwargs: passed to the LLM's ``save_pretrained`` (``safe_serialization`` is always on).
        """
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        dtype = self.llm.dtype
        kwargs.pop("safe_serialization", None)
        parts = _split_state_dict(state_dict) if state_dict is not None else {
            "llm": None,
            "vision_tower": self.vision_tower.state_dict(),
            "mm_projector": self.mm_projector.state_dict(),
        }

        # llm/: transformers' own sharded writer, then a config both old and new transformers read
        self.llm.save_pretrained(out / "llm", max_shard_size=max_shard_size, state_dict=parts["llm"], **kwargs)
        llm_config = legacy_config_dict(self.llm.config)
        for key in ("tokenizer_model_max_length", "tokenizer_padding_side", "model_max_length"):
            if key in (self.config.llm_cfg or {}):
                llm_config.setdefault(key, self.config.llm_cfg[key])
        _write_json(out / "llm" / "config.json", llm_config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out / "llm"))
        else:
            source = Path(self.name_or_path or "") / "llm"
            if source.is_dir() and source.resolve() != (out / "llm").resolve():
                for name in TOKENIZER_FILES:
                    if (source / name).is_file():
                        shutil.copy2(source / name, out / "llm" / name)

        # vision_tower/: SiglipVisionModel weights under the released ``vision_model.*`` keys
        vision_dir = out / "vision_tower"
        vision_dir.mkdir(exist_ok=True)
        vision_state = {
            f"vision_model.{key}": tensor.detach().to("cpu").contiguous()
            for key, tensor in parts["vision_tower"].items()
        }
        save_file(vision_state, str(vision_dir / "model.safetensors"), metadata={"format": "pt"})
        vision_config = legacy_config_dict(self.vision_tower.config)
        vision_config["architectures"] = ["SiglipVisionModel"]
        _write_json(vision_dir / "config.json", vision_config)
        _write_json(vision_dir / "preprocessor_config.json", self.image_processor.to_dict())

        # mm_projector/
        projector_dir = out / "mm_projector"
        projector_dir.mkdir(exist_ok=True)
        projector_state = {k: v.detach().to("cpu").contiguous() for k, v in parts["mm_projector"].items()}
        save_file(projector_state, str(projector_dir / "model.safetensors"), metadata={"format": "pt"})
        projector_config = {**(self.config.mm_projector_cfg or {}), **self.mm_projector.projector_config()}
        projector_config["torch_dtype"] = str(next(self.mm_projector.parameters()).dtype).removeprefix("torch.")
        _write_json(projector_dir / "config.json", projector_config)

        # config.json: the release's fields, the parts' configs mirrored in
        self.config.set_part_configs(self.llm.config, self.vision_tower.config, projector_config)
        top = self.config.to_dict()
        top["model_dtype"] = str(dtype)
        top["architectures"] = ["LlavaLlamaModel"]
        top["llm_cfg"]["_name_or_path"] = "./llm"
        top["vision_tower_cfg"]["_name_or_path"] = "./vision_tower"
        top["mm_projector_cfg"]["_name_or_path"] = "./mm_projector"
        top["_name_or_path"] = "./vlm"
        for key, default in _BASE_CONFIG_NOISE.items():
            if top.get(key, default) == default:
                top.pop(key, None)
        top.pop("dtype", None)
        _write_json(out / "config.json", top)


# Fields every transformers config carries; dropped from the top-level config.json when at their defaults
_BASE_CONFIG_NOISE: dict[str, Any] = {
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "problem_type": None,
    "id2label": {0: "LABEL_0", 1: "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
}


def _split_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"llm": ..., "vision_tower": ..., "mm_projector": ...}`` from a whole model's state dict."""
    parts: dict[str, dict[str, torch.Tensor]] = {"llm": {}, "vision_tower": {}, "mm_projector": {}}
    for key, tensor in state_dict.items():
        part, _, rest = key.partition(".")
        if part not in parts:
            raise ValueError(f"state_dict key {key!r} belongs to no part of the model (llm, vision_tower, mm_projector)")
        parts[part][rest] = tensor
    return parts


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _resolve_dtype(dtype: Any, torch_dtype: Any, info: CheckpointInfo) -> torch.dtype:
    """The dtype to load all parts in: explicit, else the stored one (``"auto"``/``None``)."""
    if dtype is not None and torch_dtype is not None and dtype_from_string(dtype) != dtype_from_string(torch_dtype):
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass only dtype.")
    chosen = dtype if dtype is not None else torch_dtype
    if chosen is None or chosen == "auto":
        return info.stored_dtype
    return dtype_from_string(chosen)


def _load_part(
    model_class: type[PreTrainedModel],
    part: Path,
    dtype: torch.dtype,
    device_map: Any,
    kwargs: dict[str, Any],
    folder: Path,
) -> PreTrainedModel:
    """Load one transformers part from its folder; any failure becomes a CheckpointError naming it."""
    problems = _Problems(folder)
    try:
        model, loading_info = model_class.from_pretrained(
            str(part),
            dtype=dtype,
            device_map=device_map,
            local_files_only=True,
            output_loading_info=True,
            **kwargs,
        )
    except Exception as err:
        problems.add(part, f"cannot load {model_class.__name__} ({type(err).__name__}: {err})")
        problems.raise_if_any()
        raise  # unreachable, for type checkers
    missing = sorted(loading_info.get("missing_keys") or [])
    mismatched = loading_info.get("mismatched_keys") or []
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
        problems.add(part, f"weights missing from the safetensors files: {shown}")
    if mismatched:
        problems.add(part, f"weights with the wrong shape: {mismatched[:5]}")
    problems.raise_if_any()
    model.eval()
    return model


def _load_projector(info: CheckpointInfo, dtype: torch.dtype, device: Any) -> VilaProjector:
    """Build the projector from its type and the parts' widths and load ``mm_projector/model.safetensors``."""
    projector = VilaProjector(
        info.projector_type, int(info.vision_config["hidden_size"]), int(info.llm_config["hidden_size"])
    )
    state: dict[str, torch.Tensor] = {}
    problems = _Problems(info.folder)
    for path in info.projector_weight_files:
        try:
            state.update(load_file(str(path), device="cpu"))
        except Exception as err:
            problems.add(path, f"cannot read ({err})")
    problems.raise_if_any()
    projector.load_state_dict(state, strict=True)  # keys and shapes were checked by inspect_checkpoint
    projector.to(device=_first_device(device), dtype=dtype)
    return projector.eval()


def _first_device(device_map: Any) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        device_map = next(iter(device_map.values()), "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map in ("disk", "meta"):
        return torch.device("cpu")
    return torch.device(device_map)


def _split_device_map(
    device_map: Any,
    config: VilaConfig,
    info: CheckpointInfo,
    dtype: torch.dtype,
    max_memory: dict | None,
    attn_implementation: str | None,
) -> dict[str, Any]:
    """Per-part device maps (``llm``, ``vision_tower``, ``mm_projector``) from a whole-model ``device_map``."""
    if device_map is None:
        return {"llm": None, "vision_tower": None, "mm_projector": None}
    if isinstance(device_map, (int, torch.device)) or (
        isinstance(device_map, str) and device_map not in _AUTO_DEVICE_MAPS
    ):
        return {"llm": {"": device_map}, "vision_tower": {"": device_map}, "mm_projector": device_map}
    if isinstance(device_map, str):
        device_map = _plan_device_map(device_map, config, info, dtype, max_memory)
    if not isinstance(device_map, dict):
        raise TypeError(f"Unsupported device_map {device_map!r}.")

    parts: dict[str, dict[str, Any]] = {"llm": {}, "vision_tower": {}, "mm_projector": {}}
    for key, device in device_map.items():
        if key == "":
            for sub in parts.values():
                sub[""] = device
            continue
        head, _, rest = key.partition(".")
        if head not in parts:
            raise ValueError(f"device_map key {key!r} does not name a part (llm, vision_tower, mm_projector).")
        parts[head][rest] = device
    for name, sub in parts.items():
        if not sub:
            raise ValueError(f"device_map does not place {name}.")
    projector_devices = set(parts["mm_projector"].values())
    if len(projector_devices) > 1:
        raise ValueError("device_map must keep mm_projector on one device.")
    return {
        "llm": parts["llm"],
        "vision_tower": parts["vision_tower"],
        "mm_projector": next(iter(projector_devices)),
    }


def _plan_device_map(
    strategy: str, config: VilaConfig, info: CheckpointInfo, dtype: torch.dtype, max_memory: dict | None
) -> dict[str, Any]:
    """Plan ``auto``/``balanced``/``balanced_low_0``/``sequential`` over the whole model with accelerate."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    config.set_part_configs(
        LlamaConfig.from_dict(_loadable(info.llm_config)), SiglipVisionConfig.from_dict(_loadable(info.vision_config))
    )
    with torch.device("meta"):
        skeleton = VilaForConditionalGeneration(config)
    no_split = sorted(set(skeleton._no_split_modules) | {"SiglipVisionModel", "VilaProjector"})
    if strategy != "sequential":
        max_memory = get_balanced_memory(
            skeleton,
            max_memory=max_memory,
            no_split_module_classes=no_split,
            dtype=dtype,
            low_zero=strategy == "balanced_low_0",
        )
    return infer_auto_device_map(skeleton, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def _loadable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("_name_or_path", "transformers_version")}


def _merged_device_map(llm: PreTrainedModel, vision_tower: PreTrainedModel, projector: VilaProjector) -> dict[str, Any]:
    """The whole model's device map, with the part prefixes."""
    merged: dict[str, Any] = {}
    for prefix, part in (("llm", llm), ("vision_tower", vision_tower)):
        part_map = getattr(part, "hf_device_map", None) or {"": next(part.parameters()).device}
        for key, device in part_map.items():
            merged[f"{prefix}.{key}" if key else prefix] = device
    merged["mm_projector"] = next(projector.parameters()).device
    return merged

