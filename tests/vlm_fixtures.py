"""Fixtures of the VLM tests: tiny random checkpoints (both templates) and chats loaded from them.

Imported by the ``test_vlm_*`` modules (``from vlm_fixtures import ...``); everything is written
under pytest's temporary directories.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from vila_m3.standins.tiny_vila import make_tiny_vila_checkpoint  # noqa: E402
from vila_m3.vlm import VilaChat  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama_3 checkpoint folder (like the 8B release)."""
    return make_tiny_vila_checkpoint(tmp_path_factory.mktemp("vila") / "tiny-llama3", template="llama_3", seed=0)


@pytest.fixture(scope="session")
def tiny_vicuna(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny vicuna_v1 checkpoint folder (like the 3B / 13B releases)."""
    return make_tiny_vila_checkpoint(tmp_path_factory.mktemp("vila") / "tiny-vicuna", template="vicuna_v1", seed=1)


@pytest.fixture(scope="session")
def chat_llama3(tiny_llama3: Path) -> VilaChat:
    return VilaChat.from_pretrained(tiny_llama3, device="cpu")


@pytest.fixture(scope="session")
def chat_vicuna(tiny_vicuna: Path) -> VilaChat:
    return VilaChat.from_pretrained(tiny_vicuna, device="cpu")


@pytest.fixture(params=["llama_3", "vicuna_v1"])
def chat(request: pytest.FixtureRequest) -> VilaChat:
    """Each template's chat in turn."""
    return request.getfixturevalue("chat_llama3" if request.param == "llama_3" else "chat_vicuna")


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` random RGB images of odd sizes (so preprocessing has to resize)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (37 + 5 * i, 61, 3), dtype=np.uint8)) for i in range(n)]

