"""Shared fixtures: the synthetic sample studies and a real MONAI Label server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer
from server_harness import RunningServer, start_monailabel

from vila_m3.samples import generate_samples


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample studies, generated once per test session (seed 0) in a temporary folder."""
    out = tmp_path_factory.mktemp("sample_data")
    generate_samples(out, seed=0)
    return out


@pytest.fixture(scope="session")
def sample_manifest(sample_data: Path) -> dict:
    return generate_samples(sample_data, seed=0)


@pytest.fixture(scope="session")
def sample_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Iterator[RunningServer]:
    """A real MONAI Label server with this app on a copy of the sample studies (no weights staged)."""
    workdir = tmp_path_factory.mktemp("server")
    studies = workdir / "studies"
    shutil.copytree(sample_data / "studies", studies)
    server = start_monailabel(workdir, studies)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fake_vlm() -> Iterator[FakeOpenAIServer]:
    """A scripted OpenAI-compatible VLM on 127.0.0.1, one per test module (the chat's remote VLM)."""
    with FakeOpenAIServer() as server:
        yield server
