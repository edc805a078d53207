"""The multimodal projector of VILA checkpoints: vision features (C wide) -> LLM embeddings (H wide).

Weights live in ``mm_projector/model.safetensors`` under ``layers.*``; ``mm_projector/config.json``
names the type:

* ``mlp_downsample`` (VILA 1.5 / M3): a 2x2 token merge, then LayerNorm(4C) -> Linear(4C, H) -> GELU ->
  Linear(H, H); keys ``layers.1`` (norm), ``layers.2``, ``layers.4``. 729 SigLIP tokens -> 196.
* ``linear``: Linear(C, H); keys ``layers.weight`` / ``layers.bias``.
* ``mlp2x_gelu``: Linear(C, H) -> GELU -> Linear(H, H); keys ``layers.0``, ``layers.2``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PROJECTOR_TYPES", "DownSample2x2", "VilaProjector", "downsample_2x2"]

PROJECTOR_TYPES = ("mlp_downsample", "linear", "mlp2x_gelu")


def downsample_2x2(features: torch.Tensor) -> torch.Tensor:
    """Merge each 2x2 block of a square token grid into one token, as VILA 1.5 does.

    The N tokens are read as an n x n grid in row-major order (n = sqrt(N)); a zero row is added at
    the bottom and a zero column at the right when n is odd; each 2x2 block becomes one 4C vector
    (top-left, top-right, bottom-left, bottom-right). The merged tokens come out in **column-major**
    block order: token k is block row ``k mod m``, block column ``k div m`` (m = ceil(n / 2)).

    Args:
        features: ``(B, N, C)`` vision tokens, N a perfect square (729 for SigLIP-384/14).

    Returns:
        ``(B, m * m, 4C)`` merged tokens (196 x 4608 for SigLIP so400m).
    """
    batch, n_tokens, channels = features.shape
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"mlp_downsample needs a square token grid, got {n_tokens} tokens.")
    grid = features.reshape(batch, side, side, channels)
    if side % 2:
        # one zero row at the bottom and one zero column at the right
        grid = nn.functional.pad(grid, (0, 0, 0, 1, 0, 1))
    half = (side + 1) // 2
    # (B, row_block, row_in_block, col_block, col_in_block, C)
    blocks = grid.reshape(batch, half, 2, half, 2, channels)
    # column-major over blocks: (B, col_block, row_block, row_in_block, col_in_block, C); the last
    # three dims flatten to TL, TR, BL, BR
    blocks = blocks.permute(0, 3, 1, 2, 4, 5)
    return blocks.reshape(batch, half * half, 4 * channels)


class DownSample2x2(nn.Module):
    """Parameter-free module wrapper of :func:`downsample_2x2` (``layers.0`` of ``mlp_downsample``)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return downsample_2x2(features)


class VilaProjector(nn.Module):
    """Maps vision features ``(B, N, C)`` to LLM input embeddings ``(B, N', H)``.

    Args:
        projector_type: one of :data:`PROJECTOR_TYPES`.
        mm_hidden_size: vision feature width C.
        hidden_size: LLM width H.
    """

    def __init__(self, projector_type: str, mm_hidden_size: int, hidden_size: int) -> None:
        super().__init__()
        if projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"Unknown mm_projector_type {projector_type!r}; supported: {', '.join(PROJECTOR_TYPES)}.")
        self.projector_type = projector_type
        self.mm_hidden_size = mm_hidden_size
        self.hidden_size = hidden_size
        c, h = mm_hidden_size, hidden_size
        if projector_type == "mlp_downsample":
            self.layers: nn.Module = nn.Sequential(
                DownSample2x2(), nn.LayerNorm(4 * c, eps=1e-5), nn.Linear(4 * c, h), nn.GELU(), nn.Linear(h, h)
            )
        elif projector_type == "linear":
            self.layers = nn.Linear(c, h)
        else:
            self.layers = nn.Sequential(nn.Linear(c, h), nn.GELU(), nn.Linear(h, h))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` vision features -> ``(B, num_output_tokens(N), H)`` embeddings."""
        return self.layers(features)

    def num_output_tokens(self, num_vision_tokens: int) -> int:
        """Tokens per image after the projector (729 -> 196 for ``mlp_downsample``)."""
        if self.projector_type == "mlp_downsample":
            side = math.isqrt(num_vision_tokens)
            if side * side != num_vision_tokens:
                raise ValueError(f"mlp_downsample needs a square token grid, got {num_vision_tokens} tokens.")
            return ((side + 1) // 2) ** 2
        return num_vision_tokens

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape this projector expects in ``mm_projector/model.safetensors``."""
        return {name: tuple(p.shape) for name, p in self.state_dict().items()}

    def projector_config(self) -> dict[str, object]:
        """The ``mm_projector/config.json`` content of this projector (VILA layout)."""
        return {
            "architectures": ["MultimodalProjector"],
            "model_type": "v2l_projector",
            "mm_projector_type": self.projector_type,
        }

    def extra_repr(self) -> str:
        return f"type={self.projector_type}, C={self.mm_hidden_size}, H={self.hidden_size}"
