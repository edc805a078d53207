"""Configuration of a released VILA (1.5 / M3) checkpoint: the top-level ``config.json``.

The release stores each part's full config as a dict (``llm_cfg``, ``vision_tower_cfg``,
``mm_projector_cfg``) next to a few multimodal fields. :class:`VilaConfig` keeps those dicts as they
are (so a save writes them back unchanged, unknown training fields included) and offers typed views
of them: :attr:`VilaConfig.text_config` (a ``LlamaConfig``) and :attr:`VilaConfig.vision_config`
(a ``SiglipVisionConfig``). When a model is loaded, the typed views are replaced by the configs read
from the part folders (``llm/config.json``, ``vision_tower/config.json``), which are authoritative.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, PreTrainedConfig, SiglipVisionConfig

from vila_m3.models.manifest import STAND_IN_FIELD

__all__ = ["STAND_IN_FIELD", "VilaConfig", "dtype_from_string", "legacy_config_dict"]

_DEFAULT_MAX_LENGTH = 4096


def dtype_from_string(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"torch.bfloat16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``None`` -> ``None``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Unknown dtype {value!r}; use e.g. 'bfloat16', 'float16' or 'float32'.")
    return dtype


def legacy_config_dict(config: PreTrainedConfig) -> dict[str, Any]:
    """A sub-config as a plain dict that both today's and the VILA 1.5 era transformers read.

    Adds the pre-v5 spellings ``torch_dtype`` (next to ``dtype``) and, for the default RoPE,
    ``rope_theta`` / ``rope_scaling`` (next to ``rope_parameters``).
    """
    data = config.to_dict()
    dtype = data.get("dtype")
    if dtype is not None:
        data["torch_dtype"] = str(dtype).removeprefix("torch.")
    rope = data.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        data.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") == "default":
            data.setdefault("rope_scaling", None)
    return data


class VilaConfig(PreTrainedConfig):
    r"""Top-level config of a VILA checkpoint (``model_type`` ``llava_llama``).

    Args:
        llm_cfg: full config dict of the language model (``llm/``); also holds the tokenizer limits
            ``tokenizer_model_max_length`` and ``tokenizer_padding_side``.
        vision_tower_cfg: full config dict of the vision tower (``vision_tower/``).
        mm_projector_cfg: config dict of the projector (``mm_projector/``), with ``mm_projector_type``.
        hidden_size: LLM width H.
        mm_hidden_size: vision feature width C.
        mm_vision_select_layer: index into the vision tower's hidden states (-2: output of the
            second-to-last layer, before the post-layernorm).
        mm_vision_select_feature: ``cls_patch`` keeps all tokens, ``patch`` drops the first one.
        image_aspect_ratio: ``resize`` (the only mode the released M3 checkpoints use).
        mm_use_im_start_end, mm_use_im_patch_token: extra image tokens (false in the releases).
        model_dtype: the dtype the checkpoint was trained in, as a string (``torch.bfloat16``).

    Other fields of the release (``s2``, ``num_video_frames``, ``tune_*``...) are kept as attributes
    and written back on save.
    """

    model_type = "llava_llama"

    llm_cfg: dict | None = None
    vision_tower_cfg: dict | None = None
    mm_projector_cfg: dict | None = None
    hidden_size: int | None = None
    mm_hidden_size: int | None = None
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "cls_patch"
    image_aspect_ratio: str = "resize"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    model_dtype: str | None = "torch.bfloat16"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.architectures is None:
            self.architectures = ["LlavaLlamaModel"]
        if self.mm_projector_cfg is None:
            self.mm_projector_cfg = {"mm_projector_type": "mlp_downsample", "model_type": "v2l_projector"}

    # ---- typed views of the part configs -------------------------------------------------------
    @property
    def text_config(self) -> LlamaConfig:
        """The LLM config: the one loaded from ``llm/config.json``, else built from ``llm_cfg``."""
        cached = self.__dict__.get("_text_config")
        if cached is None:
            cached = LlamaConfig.from_dict(_without_private(self.llm_cfg or {}))
            self.__dict__["_text_config"] = cached
        return cached

    @property
    def vision_config(self) -> SiglipVisionConfig:
        """The vision tower config: loaded from ``vision_tower/config.json``, else from ``vision_tower_cfg``."""
        cached = self.__dict__.get("_vision_config")
        if cached is None:
            cached = SiglipVisionConfig.from_dict(_without_private(self.vision_tower_cfg or {}))
            self.__dict__["_vision_config"] = cached
        return cached

    def set_part_configs(
        self,
        text_config: PreTrainedConfig | None = None,
        vision_config: PreTrainedConfig | None = None,
        projector_cfg: dict | None = None,
    ) -> None:
        """Make the given part configs authoritative and mirror them into the ``*_cfg`` dicts.

        Release-only keys of the old dicts that the new configs lack (``tokenizer_model_max_length``,
        ``_name_or_path`` ...) are kept.
        """
        if text_config is not None:
            self.__dict__["_text_config"] = text_config
            self.llm_cfg = {**(self.llm_cfg or {}), **legacy_config_dict(text_config)}
            self.hidden_size = text_config.hidden_size
        if vision_config is not None:
            self.__dict__["_vision_config"] = vision_config
            self.vision_tower_cfg = {**(self.vision_tower_cfg or {}), **legacy_config_dict(vision_config)}
            self.mm_hidden_size = vision_config.hidden_size
        if projector_cfg is not None:
            self.mm_projector_cfg = {**(self.mm_projector_cfg or {}), **projector_cfg}

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """The LLM config (used by generation to size the KV cache)."""
        return self.text_config

    # ---- convenience ---------------------------------------------------------------------------
    @property
    def projector_type(self) -> str:
        """``mm_projector_type`` of the projector config (``mlp_downsample``, ``linear``, ``mlp2x_gelu``)."""
        return str((self.mm_projector_cfg or {}).get("mm_projector_type", "mlp_downsample"))

    @property
    def tokenizer_model_max_length(self) -> int:
        """Context limit in tokens (``llm_cfg.tokenizer_model_max_length``, 4096 in the releases)."""
        for source in (self.llm_cfg or {}, self.text_config.to_dict()):
            for key in ("tokenizer_model_max_length", "model_max_length"):
                value = source.get(key)
                if isinstance(value, int) and value > 0:
                    return value
        return _DEFAULT_MAX_LENGTH

    @property
    def is_stand_in(self) -> bool:
        """True for stand-ins: tiny random test checkpoints and demo models (config field ``vila_m3_stand_in``)."""
        return bool(getattr(self, STAND_IN_FIELD, None))

    @property
    def stand_in_note(self) -> str | None:
        """What a stand-in is, in words shown with every answer (``vila_m3_stand_in``); None for real weights."""
        note = getattr(self, STAND_IN_FIELD, None)
        return str(note) if note else None

    def to_dict(self) -> dict[str, Any]:
        """The config as written to ``config.json`` (typed views are not serialized)."""
        data = super().to_dict()
        for key in ("_text_config", "_vision_config"):
            data.pop(key, None)
        return data


def _without_private(data: dict) -> dict:
    """Drop keys that ``from_dict`` must not see (``_name_or_path`` of the training machine)."""
    return {k: v for k, v in data.items() if k not in ("_name_or_path", "transformers_version")}
