"""An expert added from its own experts file (a toy runner in a temporary folder, nothing else changed) is an MCP
tool of ``vila-m3 mcp`` once the server serves it: listed with its card arguments, and its calls run it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from expert_plugin import TOY_NAME, expected_toy_labels, write_toy_expert
from server_harness import RunningServer, start_monailabel
from test_mcp_server import FIXED, as_json, error_text, over_stdio

from vila_m3.experts.registry import EXPERTS_ENV
from vila_m3.imaging import read_volume

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Iterator[tuple[RunningServer, Path]]:
    """A server whose only expert task is the toy of its own experts file; (server, that file)."""
    root = tmp_path_factory.mktemp("mcp-toy")
    experts_file = write_toy_expert(root / "site")
    studies = root / "studies"
    shutil.copytree(sample_data / "studies", studies)
    server = start_monailabel(root / "server", studies, conf={"models": "toy", "experts_file": str(experts_file)})
    try:
        yield server, experts_file
    finally:
        server.stop()


def test_the_toy_is_a_tool_named_after_it_and_runs_on_the_ct(toy, sample_data, tmp_path, monkeypatch):
    server, experts_file = toy
    monkeypatch.setenv(EXPERTS_ENV, str(experts_file))  # the MCP server reads the same experts file

    async def use(session) -> tuple[Any, ...]:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        air = as_json(await session.call_tool("toy", {"study": "ct_abdomen", "argument": "air"}))
        wrong = await session.call_tool("toy", {"study": "ct_abdomen", "argument": "lung"})
        return tools, air, wrong

    tools, air, wrong = over_stdio(server, tmp_path, use)
    assert set(tools) == FIXED | {"toy"}  # the server serves no other expert
    assert tools["toy"].inputSchema["properties"]["argument"]["enum"] == ["bone", "air"]
    assert "classes" not in tools["toy"].inputSchema["properties"]  # its entry names no label-id parameter

    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    expected = expected_toy_labels(ct.array, "air")
    assert air["expert"] == TOY_NAME and air["argument"] == "air" and air["stand_in"] is False
    assert air["geometry"]["shape"] == list(ct.geometry.shape)
    assert np.allclose(air["geometry"]["spacing"], ct.geometry.spacing, atol=1e-4)
    assert air["labels_found"] == [{"name": "air", "id": 2, "voxels": int(np.count_nonzero(expected == 2))}]
    assert "'lung'" in error_text(wrong) and "'bone'" in error_text(wrong)
