"""An independent reference of the VILA-M3 forward pass, for the tests.

Written plainly from the published facts (shared/docs/VILA_CHECKPOINT.md), without importing
anything from ``vila_m3.vlm``: prompt strings are literal, tokenization follows the VILA 1.5
``tokenizer_image_token`` algorithm, preprocessing is PIL + numpy, the SigLIP tower and the
``mlp_downsample`` projector are computed by hand from the safetensors weights (explicit loops for
the 2x2 merge and its column-major order), and only the LLM is run through transformers
(``LlamaForCausalLM`` loaded directly from ``llm/``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

IMAGE_ID = -200

LLAMA_3_SYSTEM = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)


def reference_prompt(template: str, question: str) -> str:
    """Single-turn generation prompt, written out literally."""
    if template == "llama_3":
        return (
            LLAMA_3_SYSTEM
            + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
            + question
            + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        )
    return VICUNA_SYSTEM + " USER: " + question + " ASSISTANT:"


def reference_input_ids(tokenizer, prompt: str) -> list[int]:
    """VILA 1.5 ``tokenizer_image_token``: offset logic and separator insertion as published."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    separated: list[list[int]] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            separated.append([IMAGE_ID] * (offset + 1))
        separated.append(chunk)
    for piece in separated:
        input_ids.extend(piece[offset:])
    return input_ids


def reference_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """RGB, PIL bicubic resize to size x size, x / 255, (x - 0.5) / 0.5 -> (3, size, size)."""
    resized = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(resized).astype(np.float64) / 255.0
    x = (x - 0.5) / 0.5
    return torch.tensor(x.transpose(2, 0, 1), dtype=torch.float32)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_exact(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_vision_features(folder: Path, pixels: torch.Tensor, select_layer: int = -2) -> torch.Tensor:
    """SigLIP by hand: patch conv + positions, then encoder layers; hidden_states[select_layer].

    ``hidden_states`` has num_layers + 1 entries (embeddings, then each layer's output), so index
    -2 is the output of layer num_layers - 1, before the post-layernorm.

    Args:
        pixels: ``(3, S, S)``.

    Returns:
        ``(S / patch)^2, C)`` features, all tokens kept.
    """
    cfg = json.loads((folder / "vision_tower" / "config.json").read_text(encoding="utf-8"))
    w = {k.removeprefix("vision_model."): v.float() for k, v in load_file(str(folder / "vision_tower" / "model.safetensors")).items()}
    heads, eps = cfg["num_attention_heads"], cfg["layer_norm_eps"]
    patches = torch.nn.functional.conv2d(
        pixels[None], w["embeddings.patch_embedding.weight"], w["embeddings.patch_embedding.bias"], stride=cfg["patch_size"]
    )  # (1, C, g, g)
    x = patches.flatten(2)[0].T  # (g*g, C), row-major over the grid
    x = x + w["embeddings.position_embedding.weight"]
    states = [x]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        h = _layer_norm(x, w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], eps)
        q = h @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]
        k = h @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]
        v = h @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]
        n, c = q.shape
        d = c // heads
        q, k, v = (t.reshape(n, heads, d).transpose(0, 1) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v  # (heads, n, d)
        attn = attn.transpose(0, 1).reshape(n, c)
        x = x + attn @ w[p + "self_attn.out_proj.weight"].T + w[p + "self_attn.out_proj.bias"]
        h = _layer_norm(x, w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], eps)
        h = _gelu_tanh(h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
        x = x + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
        states.append(x)
    return states[select_layer]


def reference_merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """The 2x2 merge with explicit loops: pad bottom row / right column, TL TR BL BR, column-major.

    Args:
        features: ``(N, C)``, N = n * n tokens in row-major order.

    Returns:
        ``(m * m, 4C)`` with m = ceil(n / 2); token k is block row k mod m, block column k div m.
    """
    n_tokens, c = features.shape
    n = math.isqrt(n_tokens)
    assert n * n == n_tokens
    m = (n + 1) // 2
    padded = torch.zeros(2 * m, 2 * m, c, dtype=features.dtype)
    for r in range(n):
        for col in range(n):
            padded[r, col] = features[r * n + col]
    merged = []
    for k in range(m * m):
        block_row, block_col = k % m, k // m
        r, col = 2 * block_row, 2 * block_col
        merged.append(torch.cat([padded[r, col], padded[r, col + 1], padded[r + 1, col], padded[r + 1, col + 1]]))
    return torch.stack(merged)


def reference_projector(folder: Path, features: torch.Tensor) -> torch.Tensor:
    """``mlp_downsample`` by hand: merge, LayerNorm(eps 1e-5), Linear, exact GELU, Linear."""
    w = {k: v.float() for k, v in load_file(str(folder / "mm_projector" / "model.safetensors")).items()}
    x = reference_merge_2x2(features)
    x = _layer_norm(x, w["layers.1.weight"], w["layers.1.bias"], 1e-5)
    x = _gelu_exact(x @ w["layers.2.weight"].T + w["layers.2.bias"])
    return x @ w["layers.4.weight"].T + w["layers.4.bias"]


def reference_logits(folder: Path, prompt: str, images: list[Image.Image]) -> tuple[torch.Tensor, list[int]]:
    """Logits ``(L, vocab)`` of the whole prompt and the prompt ids (with -200 placeholders)."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "llm"), local_files_only=True)
    llm = LlamaForCausalLM.from_pretrained(str(folder / "llm"), dtype=torch.float32, local_files_only=True).eval()
    size = json.loads((folder / "vision_tower" / "config.json").read_text(encoding="utf-8"))["image_size"]
    ids = reference_input_ids(tokenizer, prompt)
    embed = llm.get_input_embeddings()
    pieces = []
    image_iter = iter(images)
    with torch.no_grad():
        for token in ids:
            if token == IMAGE_ID:
                feats = reference_vision_features(folder, reference_pixels(next(image_iter), size))
                pieces.append(reference_projector(folder, feats))
            else:
                pieces.append(embed(torch.tensor([token])))
        inputs_embeds = torch.cat(pieces)[None]
        logits = llm(inputs_embeds=inputs_embeds).logits[0]
    return logits, ids
