"""Tiny VILA checkpoints with RANDOM weights, in exactly the released on-disk layout.

They exist so that the real loading code can be tested (and the product demonstrated offline)
without the multi-gigabyte released weights, which cannot be downloaded here. They are not models:
their answers are random text. Every folder says so in ``README.txt`` and in its top-level
``config.json`` (field ``vila_m3_stand_in``), and a loaded model reports ``is_stand_in``.

Layout written (as the VILA 1.5 code base saves the released VILA-M3 checkpoints)::

    config.json                  model_type llava_llama, architectures LlavaLlamaModel, llm_cfg, ...
    README.txt
    llm/config.json              LlamaForCausalLM, transformers 4.36-era fields (torch_dtype, rope_theta)
    llm/model-0000k-of-0000n.safetensors, llm/model.safetensors.index.json
    llm/generation_config.json
    llm/tokenizer.json + tokenizer_config.json          (llama_3: byte-level BPE, Llama-3 special tokens)
    llm/tokenizer.model + tokenizer_config.json + ...   (vicuna_v1: sentencepiece, unk 0 / bos 1 / eos 2)
    vision_tower/config.json, model.safetensors (vision_model.* keys), preprocessor_config.json
    mm_projector/config.json, model.safetensors (layers.* keys)

Sizes: LLM width 64, 2 layers; SigLIP width 32, 3 layers, 54 px images with 2 px patches, i.e. a
27 x 27 = 729 token grid like the real 384 px / 14 px tower, so the 27 -> 14 padding path of the
``mlp_downsample`` projector is exercised (196 tokens per image).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from vila_m3.vlm.configuration import STAND_IN_FIELD
from vila_m3.vlm.projector import PROJECTOR_TYPES, VilaProjector

__all__ = ["STAND_IN_NOTE", "make_tiny_vila_checkpoint"]

STAND_IN_NOTE = "tiny random weights for tests; not a medical model"

_OLD_TRANSFORMERS = "4.36.2"  # what the VILA 1.5 code base wrote into the released configs

# Text the tiny tokenizers are trained on: the prompt templates, the expert protocol, plain English.
_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in this image? ASSISTANT: This looks like a CT image. Let me trigger <VISTA3D(hepatic tumor)>.",
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language.",
    "Here is a list of available expert models:\n<BRATS(args)> Modality: MRI, Task: segmentation, "
    "<VISTA3D(args)> Modality: CT, <VISTA2D(args)> Modality: cell imaging, <CXR(args)> chest x-ray (CXR), "
    "Task: classification, Valid args are: None\nGive the model <NAME(args)> when selecting a suitable expert model.",
    "This is a CT image.\nThis is a MRI image.\nThese are different MRI modalities.\nT1(contrast enhanced): T1: T2: FLAIR:",
    "The results are shown. The colors in this image describe red: liver, blue: hepatic tumor, yellow: spleen.",
    "Use this result to respond to this prompt:\nIs there a tumor in the liver? yes no There are 2 hepatic tumors.",
    "The resulting predictions are:\natelectasis: no\ncardiomegaly: yes\neffusion: no\n.",
    "Analyze the image and take these predictions into account when responding to this prompt:",
    "I segmented the entire image using everything organs skeleton muscles cardiovascular gastrointestinal.",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 10 100 2024 mm cm % ( ) [ ] , . ; : ? !",
]

_LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
_PAD = "[PAD]"


def make_tiny_vila_checkpoint(
    out_dir: str | Path,
    template: Literal["llama_3", "vicuna_v1"] = "llama_3",
    seed: int = 0,
    projector: str = "mlp_downsample",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    llm_hidden: int = 64,
    llm_layers: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    num_shards: int = 2,
    corpus: Sequence[str] = (),
    vocab_size: int | None = None,
    image_size: int = 54,
    note: str = STAND_IN_NOTE,
    rope_theta: float | None = None,
) -> Path:
    """Write a tiny random VILA checkpoint folder in the released layout.

    Args:
        out_dir: the folder to create (may exist; files are overwritten).
        template: ``llama_3`` (Llama-3 style tokenizer.json, like the 8B) or ``vicuna_v1``
            (sentencepiece tokenizer.model, like the 3B / 13B).
        seed: seed of the random weights and of nothing else (tokenizers are deterministic).
        projector: ``mlp_downsample`` (the releases), ``linear`` or ``mlp2x_gelu``.
        dtype: dtype the weights are stored in (the releases store bfloat16).
        llm_hidden, llm_layers: LLM width and depth.
        vision_hidden, vision_layers: SigLIP width and depth (image 54 px, patch 2 px: 729 tokens).
        num_shards: number of LLM safetensors shards (with an index, as in the releases).
        corpus: extra texts the tokenizer is trained on (with the built-in ones), e.g. a training set.
        vocab_size: tokenizer vocabulary size (default 384 for llama_3, 400 for vicuna_v1).
        image_size: SigLIP input size in px, patch 2 px (54: a 27 x 27 grid like the releases).
        note: what the folder is, stored in ``config.json`` (``vila_m3_stand_in``) and shown with answers.
        rope_theta: the LLM's rotary base (default: 500000 for ``llama_3`` like Llama 3, else 10000).

    Returns:
        The checkpoint folder.
    """
    if template not in ("llama_3", "vicuna_v1"):
        raise ValueError(f"template must be 'llama_3' or 'vicuna_v1', got {template!r}")
    if projector not in PROJECTOR_TYPES:
        raise ValueError(f"projector must be one of {PROJECTOR_TYPES}, got {projector!r}")
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    out = Path(out_dir)
    llm_dir, vision_dir, projector_dir = out / "llm", out / "vision_tower", out / "mm_projector"
    for folder in (llm_dir, vision_dir, projector_dir):
        folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)

    # ---- tokenizer (decides vocabulary size and special ids)
    if template == "llama_3":
        special = _write_llama3_tokenizer(llm_dir, [*_CORPUS * 4, *corpus], vocab_size or 384)
    else:
        special = _write_sentencepiece_tokenizer(llm_dir, [*_CORPUS * 4, *corpus], vocab_size or 400)

    # ---- LLM
    llama3 = template == "llama_3"
    heads = 4
    llm_cfg = {
        "_name_or_path": "./llm",
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "hidden_act": "silu",
        "hidden_size": llm_hidden,
        "initializer_range": 0.02,
        "intermediate_size": 2 * llm_hidden,
        "max_position_embeddings": 8192 if llama3 else 4096,
        "model_max_length": 4096,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": llm_layers,
        "num_key_value_heads": heads // 2 if llama3 else heads,
        "pad_token_id": special["pad"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": float(rope_theta) if rope_theta else (500000.0 if llama3 else 10000.0),
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
        "torch_dtype": dtype,
        "transformers_version": _OLD_TRANSFORMERS,
        "use_cache": True,
        "vocab_size": special["vocab_size"],
    }
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(LlamaConfig.from_dict({k: v for k, v in llm_cfg.items() if k != "_name_or_path"}))
    with torch.no_grad():  # larger embeddings than the 0.02 default, so that logits differ visibly
        llm.model.embed_tokens.weight.normal_(0.0, 1.0)
        llm.lm_head.weight.normal_(0.0, 0.1)
    _write_json(llm_dir / "config.json", llm_cfg)
    _write_sharded(llm.to(torch_dtype).state_dict(), llm_dir, num_shards)
    generation = {"bos_token_id": special["bos"], "eos_token_id": special["eos"], "transformers_version": _OLD_TRANSFORMERS}
    if llama3:  # as in Meta-Llama-3-8B-Instruct: sampling defaults the product must override for greedy decoding
        generation.update({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_length": 4096})
    _write_json(llm_dir / "generation_config.json", generation)

    # ---- vision tower (SigLIP)
    patch_size = 2
    vision_cfg = {
        "_name_or_path": "./vision_tower",
        "architectures": ["SiglipVisionModel"],
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": vision_hidden,
        "image_size": image_size,
        "intermediate_size": 2 * vision_hidden + 8,
        "layer_norm_eps": 1e-6,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 2,
        "num_channels": 3,
        "num_hidden_layers": vision_layers,
        "patch_size": patch_size,
        "torch_dtype": dtype,
        "transformers_version": _OLD_TRANSFORMERS,
    }
    torch.manual_seed(seed + 1)
    tower = SiglipVisionModel(
        SiglipVisionConfig.from_dict({k: v for k, v in vision_cfg.items() if k not in ("_name_or_path", "architectures")})
    )
    vision_state = {f"vision_model.{k}": v.to(torch_dtype).contiguous() for k, v in tower.state_dict().items()}
    save_file(vision_state, str(vision_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(vision_dir / "config.json", vision_cfg)
    _write_json(
        vision_dir / "preprocessor_config.json",
        {
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "SiglipProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"height": image_size, "width": image_size},
        },
    )

    # ---- projector: every parameter random (LayerNorm affine too, so tests see it)
    torch.manual_seed(seed + 2)
    proj = VilaProjector(projector, vision_hidden, llm_hidden)
    with torch.no_grad():
        for name, param in proj.named_parameters():
            is_norm = projector == "mlp_downsample" and name.startswith("layers.1.")
            base = 1.0 if is_norm and name.endswith("weight") else 0.0
            param.copy_(base + torch.randn_like(param) * (0.1 if is_norm else 1.0 / math.sqrt(param.shape[-1])))
    save_file(
        {k: v.to(torch_dtype).contiguous() for k, v in proj.state_dict().items()},
        str(projector_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    projector_cfg = {
        "_name_or_path": "./mm_projector",
        "architectures": ["MultimodalProjector"],
        "mm_projector_type": projector,
        "model_type": "v2l_projector",
        "torch_dtype": dtype,
        "transformers_version": _OLD_TRANSFORMERS,
    }
    _write_json(projector_dir / "config.json", projector_cfg)

    # ---- top-level config.json, as the VILA 1.5 code base writes it
    top = {
        "_name_or_path": "./vlm",
        "architectures": ["LlavaLlamaModel"],
        "drop_path_rate": 0.0,
        "fps": 0.0,
        "hidden_size": llm_hidden,
        "image_aspect_ratio": "resize",
        "interpolate_mode": "linear",
        "llm_cfg": llm_cfg,
        "mm_hidden_size": vision_hidden,
        "mm_projector_cfg": projector_cfg,
        "mm_projector_lr": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "cls_patch",
        "mm_vision_select_layer": -2,
        "model_dtype": f"torch.{dtype}",
        "model_type": "llava_llama",
        "num_video_frames": 8,
        "resume_path": "./vlm",
        "s2": False,
        "s2_max_split_size": 336,
        "s2_scales": "336,672,1008",
        "soft_ce_std": 1.0,
        "time_token_format": "<t{t}>",
        "time_token_ids": [],
        "transformers_version": _OLD_TRANSFORMERS,
        "tune_language_model": True,
        "tune_mm_projector": True,
        "tune_vision_tower": True,
        "vision_resolution": -1,
        "vision_tower_cfg": vision_cfg,
        STAND_IN_FIELD: note,
    }
    _write_json(out / "config.json", top)
    (out / "README.txt").write_text(
        "TINY RANDOM WEIGHTS FOR TESTS - NOT A MODEL, NOT A MEDICAL DEVICE.\n\n"
        f"This folder has the on-disk layout of a released VILA-M3 checkpoint ({template} template, "
        f"{projector} projector) but its weights are random numbers (seed {seed}). Its answers are "
        "meaningless text. It exists to test the loading code and to demonstrate the product offline.\n"
        "Stage the real weights (MONAI/Llama3-VILA-M3-3B, -8B or -13B) for actual use.\n",
        encoding="utf-8",
    )
    return out


# ------------------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_sharded(state: dict[str, torch.Tensor], folder: Path, num_shards: int) -> None:
    """Write ``model-0000k-of-0000n.safetensors`` shards and ``model.safetensors.index.json``."""
    keys = list(state)
    num_shards = max(1, min(num_shards, len(keys)))
    per_shard = math.ceil(len(keys) / num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {k: state[k].contiguous() for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(chunk, str(folder / name), metadata={"format": "pt"})
        for key, tensor in chunk.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_llama3_tokenizer(folder: Path, corpus: Sequence[str], vocab_size: int) -> dict[str, int]:
    """A small byte-level BPE tokenizer with the Llama-3 special tokens, saved as ``tokenizer.json``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*_LLAMA3_SPECIALS, _PAD]])
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    # Llama-3 adds <|begin_of_text|> to every encoded text
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in [*_LLAMA3_SPECIALS, _PAD]}
    _write_json(
        folder / "tokenizer_config.json",
        {
            "added_tokens_decoder": {
                str(i): {
                    "content": t,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for t, i in ids.items()
            },
            "bos_token": "<|begin_of_text|>",
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|end_of_text|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 4096,
            "pad_token": _PAD,
            "padding_side": "right",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": _PAD},
    )
    return {
        "bos": ids["<|begin_of_text|>"],
        "eos": ids["<|end_of_text|>"],
        "pad": ids[_PAD],
        "vocab_size": tokenizer.get_vocab_size(),
    }


def _write_sentencepiece_tokenizer(folder: Path, corpus: Sequence[str], vocab_size: int) -> dict[str, int]:
    """A small Llama-style sentencepiece model (unk 0, bos 1, eos 2, byte fallback) as ``tokenizer.model``."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": 4096,
            "pad_token": "<unk>",
            "padding_side": "right",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )
    _write_json(
        folder / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"},
    )
    return {"bos": 1, "eos": 2, "pad": 0, "vocab_size": processor.get_piece_size()}
