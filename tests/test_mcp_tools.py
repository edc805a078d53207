"""The MCP server's tools without a server: schemas and /infer params from the registry, tool names from the
experts config, kept labelmaps that only the token which made them can read, the results folder (private, the
newest N, read back by a new instance) and progress notifications."""

from __future__ import annotations

import json
import stat

import anyio
import numpy as np
import pytest

from vila_m3.experts.registry import ConfigError, ExpertRegistry
from vila_m3.imaging import Geometry, Volume, save_labelmap
from vila_m3.label_client import LabelServerClient
from vila_m3.mcp_results import ResultStore, default_results_dir
from vila_m3.mcp_server import (
    Progress,
    ToolError,
    VilaM3Tools,
    expert_tools,
    owner_of,
    result_store,
    tool_fields,
)


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
    # every class of the table, not only those of the groups (vertebrae L6 and airway are in none)
    assert len(ct.classes) == len(ExpertRegistry.from_config().configured_spec("VISTA3D").labels) == 132
    assert ct.infer_params({"study": "s", "classes": ["vertebrae L6", "airway"]}) == {"label_prompt": [131, 132]}
    assert ct.input_schema()["properties"]["classes"]["items"]["enum"] == list(ct.classes)
    for arguments, words in [({"study": "s", "argument": "kidney stones"}, "kidney stones"),
                             ({"study": "s", "classes": ["unicorn"]}, "unicorn"),
                             ({"study": "s", "classes": ["livr", "spleen"]}, r"'livr' \(did you mean 'liver'"),
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


def labelmap_bytes(tmp_path) -> bytes:
    volume = Volume(np.zeros((2, 3, 4), dtype=np.uint8), Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3), (4, 3, 2)))
    return save_labelmap(volume, tmp_path / "labels.nii.gz").read_bytes()


def test_a_kept_labelmap_is_read_only_with_the_token_that_made_it(tmp_path):
    tools = VilaM3Tools(LabelServerClient("http://127.0.0.1:9"), results=ResultStore(tmp_path / "results"))
    stored = tools.results.put("0123456789ab", labelmap_bytes(tmp_path), {"result": "0123456789ab"},
                               owner_of("token-a"))

    assert tools.read(stored.uri, "token-a") == stored.data
    assert [str(item.uri) for item in tools.resources("token-a")] == [stored.uri]
    assert tools.resources("token-b") == [] and tools.resources(None) == []
    for token in ("token-b", None):
        with pytest.raises(ToolError, match="0123456789ab"):
            tools.get_labelmap({"result": stored.result_id}, token)
        with pytest.raises(ToolError):
            tools.read(stored.uri, token)
    anyio.run(tools.client.aclose)


def test_results_are_kept_private_on_disk_the_newest_n_and_a_new_instance_reads_them(tmp_path):
    folder = tmp_path / "cache" / "results"
    first = ResultStore(folder, keep=2)
    data = labelmap_bytes(tmp_path)
    for number in range(3):
        first.put(f"00000000000{number}", data + bytes([number]), {"expert": "VISTA3D", "n": number}, "owner")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {0o600}
    assert sorted(path.name for path in folder.iterdir()) == [
        "000000000001.json", "000000000001.nii.gz", "000000000002.json", "000000000002.nii.gz"]

    again = ResultStore(folder, keep=2)  # a new MCP server process on the same folder
    assert [kept.result_id for kept in again.newest_first()] == ["000000000002", "000000000001"]
    assert again.get("000000000002").data == data + bytes([2]) and again.get("000000000002").summary["n"] == 2
    assert again.get("000000000000") is None and again.get("../../etc/passwd") is None and again.get(7) is None
    assert json.loads((folder / "000000000001.json").read_text())["owner"] == "owner"


def test_the_results_folder_is_a_user_cache_folder_unless_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("VILA_M3_MCP_RESULTS", raising=False)
    assert default_results_dir() == tmp_path / "xdg" / "vila-m3" / "mcp-results"
    assert result_store().folder == default_results_dir() and result_store().keep == 32
    monkeypatch.setenv("VILA_M3_MCP_RESULTS", str(tmp_path / "chosen"))
    assert result_store(keep=3).folder == tmp_path / "chosen" and result_store(keep=3).keep == 3
    assert result_store(tmp_path / "flag").folder == tmp_path / "flag"
    with pytest.raises(ValueError, match="at least 1"):
        ResultStore(tmp_path / "none", keep=0)


def test_progress_reports_start_beats_and_end_in_increasing_order():
    sent: list[tuple[float, float | None, str | None]] = []

    async def send(value, total, message):
        sent.append((value, total, message))

    async def work() -> str:
        await anyio.sleep(0.35)
        return "done"

    async def failing() -> None:
        raise ToolError("refused")

    async def main() -> None:
        assert await Progress(send, interval_s=0.1).track("VISTA3D on ct", work) == "done"
        with pytest.raises(ToolError, match="refused"):
            await Progress(send, interval_s=0.1).track("VISTA3D on ct", failing)
        assert await Progress(None).track("quiet", work) == "done"

    anyio.run(main)
    first, failed = sent[:-2], sent[-2:]
    assert first[0] == (0.0, None, "VISTA3D on ct: started")
    assert len(first) >= 4 and all("running for" in message for _, _, message in first[1:-1])
    values = [value for value, _, _ in first]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert first[-1][1] == first[-1][0] and first[-1][2].startswith("VISTA3D on ct: finished after")
    assert failed[0][2] == "VISTA3D on ct: started" and "failed" in failed[1][2]
