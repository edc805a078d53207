"""The MCP server's tools without a server: schemas and /infer params from the registry, tool names from the
experts config, and kept labelmaps that only the token which made them can read."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

from vila_m3.experts.registry import ConfigError, ExpertRegistry
from vila_m3.imaging import Geometry, Volume, save_labelmap
from vila_m3.label_client import LabelServerClient
from vila_m3.mcp_server import StoredResult, ToolError, VilaM3Tools, expert_tools, owner_of, tool_fields


def tools_by_name() -> dict:
    return {tool.name: tool for tool in expert_tools()}


def test_each_runnable_expert_is_a_tool_named_by_its_entry():
    registry = ExpertRegistry.from_config()
    tools = tools_by_name()
    assert {tool.spec.name for tool in tools.values()} == {
        spec.name for spec in registry.configured if spec.runner is not None}
    assert {"segment_ct", "segment_brain_tumour", "classify_chest_xray"} <= set(tools)
    assert tools["segment_ct"].task == "vista3d" and tools["classify_chest_xray"].task == "cxr"
    assert [tool.name for tool in expert_tools(served=["cxr"])] == ["classify_chest_xray"]


def test_arguments_become_the_infer_params_the_runners_read():
    ct = tools_by_name()["segment_ct"]
    assert ct.infer_params({"study": "s"}) == {"argument": "everything"}
    assert ct.infer_params({"study": "s", "argument": " Hepatoma "}) == {"argument": "hepatic tumor"}
    assert ct.infer_params({"study": "s", "classes": ["spleen", "Liver"]}) == {"label_prompt": [1, 3]}
    for arguments, words in [({"study": "s", "argument": "kidney stones"}, "kidney stones"),
                             ({"study": "s", "classes": ["unicorn"]}, "unicorn"),
                             ({"study": "s", "classes": []}, "non-empty"),
                             ({"study": "s", "argument": "organs", "classes": ["liver"]}, "not both"),
                             ({"study": "s", "window": 3}, "window")]:
        with pytest.raises(ToolError, match=words):
            ct.infer_params(arguments)
    brats = tools_by_name()["segment_brain_tumour"]
    assert brats.infer_params({"study": "s"}) == {}
    assert set(brats.input_schema()["properties"]) == {"study"}
    with pytest.raises(ToolError, match="unknown argument.*it takes study"):
        brats.infer_params({"study": "s", "argument": "organs"})


def test_tool_names_must_be_lower_case_and_unique():
    entry = {"name": "A", "tool": "seg"}
    assert tool_fields({"experts": [entry, {"name": "Bee"}]})["Bee"].name == "bee"
    with pytest.raises(ConfigError, match="lower-case"):
        tool_fields({"experts": [{"name": "A", "tool": "Segment CT"}]})
    with pytest.raises(ConfigError, match="seg"):
        tool_fields({"experts": [entry, {"name": "B", "tool": "seg"}]})
    with pytest.raises(ConfigError, match="get_slice"):
        tool_fields({"experts": [{"name": "A", "tool": "get_slice"}]})


def test_a_kept_labelmap_is_read_only_with_the_token_that_made_it(tmp_path):
    volume = Volume(np.zeros((2, 3, 4), dtype=np.uint8), Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3), (4, 3, 2)))
    path = save_labelmap(volume, tmp_path / "labels.nii.gz")
    tools = VilaM3Tools(LabelServerClient("http://127.0.0.1:9"))
    stored = StoredResult("0123456789ab", path.read_bytes(), {"result": "0123456789ab"}, owner_of("token-a"))
    tools.results[stored.result_id] = stored

    assert tools.read(stored.uri, "token-a") == stored.data
    assert [str(item.uri) for item in tools.resources("token-a")] == [stored.uri]
    assert tools.resources("token-b") == [] and tools.resources(None) == []
    for token in ("token-b", None):
        with pytest.raises(ToolError, match="0123456789ab"):
            tools.get_labelmap({"result": stored.result_id}, token)
        with pytest.raises(ToolError):
            tools.read(stored.uri, token)
    anyio.run(tools.client.aclose)
