# ruff: noqa: F811  (the expert_server fixture imported from test_expert_tasks_server is a test argument of that name)
"""``vila-m3 mcp`` with the MCP SDK's own client, over stdio and streamable HTTP, against a real server with
stand-in weights: the tools come from the registry, each runs, labelmaps keep the study's geometry, refusals
are tool errors in words, progress notifications while an expert runs, results kept on disk for the next
process, and a result's overlay on a slice."""

from __future__ import annotations

import base64
import io
import json
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import requests
from PIL import Image
from server_harness import RunningServer, free_port, isolated_env, start_monailabel, stop_process_group
from test_expert_tasks_server import expert_server  # noqa: F401  (a server with stand-in experts)

# isort: off
import vila_m3.mcp_server  # noqa: F401  (before mcp: its compatibility name for mcp 1.9)
from mcp import ClientSession, StdioServerParameters, types
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamablehttp_client
# isort: on
from vila_m3.chat.study import detect_modality
from vila_m3.experts.colors import overlay_colors_float
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.imaging import read_labelmap, read_volume, render_slice
from vila_m3.imaging.overlay import render_overlay
from vila_m3.imaging.slices import extract_slice, slice_index_count
from vila_m3.mcp_results import RESULTS_ENV
from vila_m3.mcp_server import TOKEN_ENV
from vila_m3.standins.stand_ins import stage_stand_ins

pytestmark = pytest.mark.server

VILA_M3 = shutil.which("vila-m3", path=str(Path(sys.executable).parent)) or "vila-m3"
EXPERT_TOOLS = {"segment_ct", "segment_brain_tumour", "classify_chest_xray"}
FIXED = {"list_studies", "get_slice", "get_labelmap"}
Session = Callable[[ClientSession], Awaitable[Any]]


def mcp_env(workdir: Path, token: str | None = None) -> dict[str, str]:
    env = isolated_env(workdir)  # results go to the default folder: ~/.cache/vila-m3/mcp-results of its HOME
    for name in (TOKEN_ENV, RESULTS_ENV, "XDG_CACHE_HOME"):
        env.pop(name, None)
    if token:
        env[TOKEN_ENV] = token
    return env


def over_stdio(server: RunningServer, workdir: Path, use: Session, token: str | None = None) -> Any:
    """Spawn ``vila-m3 mcp --server URL`` and run ``use`` in an initialised client session over its stdio."""
    parameters = StdioServerParameters(command=VILA_M3, args=["mcp", "--server", server.url],
                                       env=mcp_env(workdir, token), cwd=str(workdir))

    async def main() -> Any:
        with (workdir / "mcp-stderr.log").open("a", encoding="utf-8") as errlog:
            async with stdio_client(parameters, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                return await use(session)

    return anyio.run(main)


@asynccontextmanager
async def http_session(url: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with (streamablehttp_client(url, headers=headers, timeout=600) as (read, write, _),
                ClientSession(read, write) as session):
        await session.initialize()
        yield session


def start_http(server: RunningServer, workdir: Path, token: str | None = None) -> tuple[subprocess.Popen, str]:
    """``vila-m3 mcp --transport http`` on a free port; (process, its /mcp URL) once it answers."""
    port = free_port()
    log = (workdir / "mcp-http.log").open("w", encoding="utf-8")
    process = subprocess.Popen([VILA_M3, "mcp", "--server", server.url, "--transport", "http", "--port", str(port)],
                               cwd=workdir, env=mcp_env(workdir, token), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError((workdir / "mcp-http.log").read_text())
        try:
            requests.get(url, timeout=2)
            return process, url
        except requests.RequestException:
            time.sleep(0.3)
    stop_process_group(process)
    raise RuntimeError("the MCP HTTP server did not start")


def as_json(result: types.CallToolResult) -> dict[str, Any]:
    assert not result.isError, result.content
    texts = [item.text for item in result.content if isinstance(item, types.TextContent)]
    return json.loads(texts[-1])


def error_text(result: types.CallToolResult) -> str:
    assert result.isError, result.content
    return " ".join(item.text for item in result.content if isinstance(item, types.TextContent))


def labelmap_of(data: bytes, folder: Path, name: str):
    path = folder / name
    path.write_bytes(data)
    return read_labelmap(path)


def assert_geometry(reported: dict[str, Any], volume) -> None:
    geometry = volume.geometry
    assert reported["shape"] == list(geometry.shape)
    assert np.allclose(reported["spacing"], geometry.spacing, atol=1e-4)
    assert np.allclose(reported["origin"], geometry.origin, atol=1e-3)
    assert np.allclose(np.asarray(reported["direction"]).ravel(), np.asarray(geometry.direction).ravel(), atol=1e-4)


# --- stdio ---------------------------------------------------------------------------------------------------


def test_the_tools_come_from_the_expert_registry(expert_server, tmp_path):
    async def use(session: ClientSession) -> list[types.Tool]:
        return (await session.list_tools()).tools

    tools = {tool.name: tool for tool in over_stdio(expert_server, tmp_path, use)}
    assert set(tools) == EXPERT_TOOLS | FIXED
    vista3d = ExpertRegistry.from_config().configured_spec("VISTA3D")
    properties = tools["segment_ct"].inputSchema["properties"]
    assert properties["argument"]["enum"] == list(vista3d.args)
    assert {"liver", "hepatic tumor", "spleen"} <= set(properties["classes"]["items"]["enum"])
    assert tools["segment_ct"].inputSchema["required"] == ["study"]
    assert set(tools["segment_brain_tumour"].inputSchema["properties"]) == {"study"}
    assert set(tools["classify_chest_xray"].inputSchema["properties"]) == {"study"}
    assert tools["get_slice"].inputSchema["properties"]["axis"]["enum"] == ["axial", "coronal", "sagittal"]


def test_segment_ct_and_its_labelmap_keep_the_study_geometry(expert_server, sample_data, tmp_path):
    async def use(session: ClientSession) -> tuple[Any, ...]:
        studies = as_json(await session.call_tool("list_studies", {}))
        by_group = as_json(await session.call_tool("segment_ct", {"study": "ct_abdomen", "argument": "hepatoma"}))
        by_classes = as_json(await session.call_tool("segment_ct", {"study": "ct_abdomen",
                                                                    "classes": ["liver", "spleen"]}))
        labelmap = await session.call_tool("get_labelmap", {"result": by_group["result"]})
        resource = await session.read_resource(by_group["labelmap"])
        listed = (await session.list_resources()).resources
        return studies, by_group, by_classes, labelmap, resource, listed

    studies, by_group, by_classes, labelmap, resource, listed = over_stdio(expert_server, tmp_path, use)
    datastore = expert_server.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert [entry["study"] for entry in studies["studies"]] == sorted(datastore)
    assert {"ct_abdomen", "brain_mri_flair", "cxr_chest"} <= set(datastore)

    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert by_group["expert"] == "VISTA3D" and by_group["argument"] == "hepatic tumor"
    assert by_group["stand_in"] is True and "not a medical model" in by_group["notice"]
    assert_geometry(by_group["geometry"], ct)
    found = {entry["name"]: entry for entry in by_group["labels_found"]}
    assert set(found) | set(by_group["labels_not_found"]) == {"liver", "hepatic tumor"}
    assert {entry["id"] for entry in by_classes["labels_found"]} <= {1, 3}
    assert set(by_classes["labels_not_found"]) <= {"liver", "spleen"}

    assert not labelmap.isError, labelmap.content
    embedded = next(item for item in labelmap.content if isinstance(item, types.EmbeddedResource))
    assert embedded.resource.mimeType == "application/gzip"
    labels = labelmap_of(base64.b64decode(embedded.resource.blob), tmp_path, "embedded.nii.gz")
    assert labels.geometry.allclose(ct.geometry, atol=1e-4)
    for name, entry in found.items():
        assert int(np.count_nonzero(labels.array == entry["id"])) == entry["voxels"], name
    assert base64.b64decode(resource.contents[0].blob) == base64.b64decode(embedded.resource.blob)
    assert {str(item.uri) for item in listed} == {by_group["labelmap"], by_classes["labelmap"]}


def test_brats_cxr_and_a_slice(expert_server, sample_data, tmp_path):
    async def use(session: ClientSession) -> tuple[Any, ...]:
        brats = as_json(await session.call_tool("segment_brain_tumour", {"study": "brain_mri_flair"}))
        cxr = as_json(await session.call_tool("classify_chest_xray", {"study": "cxr_chest"}))
        picture = await session.call_tool("get_slice", {"study": "ct_abdomen", "axis": "coronal", "index": 7})
        middle = await session.call_tool("get_slice", {"study": "ct_abdomen"})
        return brats, cxr, picture, middle

    brats, cxr, picture, middle = over_stdio(expert_server, tmp_path, use)
    assert_geometry(brats["geometry"], read_volume(sample_data / "studies" / "brain_mri_t1c.nii.gz"))
    assert {entry["id"] for entry in brats["labels_found"]} <= {1, 2, 4} and brats["stand_in"] is True
    assert "result" not in cxr and len(cxr["probabilities"]) == 18
    assert set(cxr["answers"].values()) <= {"yes", "no"} and cxr["stand_in"] is True

    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    image = next(item for item in picture.content if isinstance(item, types.ImageContent))
    assert image.mimeType == "image/png"
    shown = Image.open(io.BytesIO(base64.b64decode(image.data)))
    assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(render_slice(ct, "coronal", 7, "CT")))
    assert as_json(picture)["modality"] == detect_modality(ct) == "CT"
    described = as_json(middle)
    assert described["axis"] == "axial" and described["index"] == described["slices"] // 2


@pytest.mark.parametrize("tool", ["segment_ct", "segment_brain_tumour", "classify_chest_xray", "get_slice"])
def test_a_bad_study_id_is_a_tool_error_that_names_it(expert_server, tmp_path, tool):
    async def use(session: ClientSession) -> types.CallToolResult:
        return await session.call_tool(tool, {"study": "no_such_study"})

    message = error_text(over_stdio(expert_server, tmp_path, use))
    assert "no_such_study" in message
    assert str(tmp_path.parent) not in message and "/studies" not in message


def test_bad_arguments_and_unknown_results_are_tool_errors_in_words(expert_server, tmp_path):
    async def use(session: ClientSession) -> list[str]:
        calls = [("segment_ct", {"study": "ct_abdomen", "argument": "kidney stones"}),
                 ("segment_ct", {"study": "ct_abdomen", "classes": ["liver", "unicorn"]}),
                 ("segment_ct", {"study": "ct_abdomen", "argument": "organs", "classes": ["liver"]}),
                 ("segment_brain_tumour", {"study": "brain_mri_flair", "argument": "organs"}),
                 ("get_slice", {"study": "ct_abdomen", "axis": "axial", "index": 10_000}),
                 ("get_labelmap", {"result": "0123456789ab"})]
        return [error_text(await session.call_tool(name, arguments)) for name, arguments in calls]

    stones, unicorn, both, brats_arg, index, result = over_stdio(expert_server, tmp_path, use)
    assert "kidney stones" in stones and "hepatic tumor" in stones
    assert "unicorn" in unicorn
    assert "not both" in both
    assert "argument" in brats_arg
    assert "10000" in index and "axial" in index
    assert "0123456789ab" in result


def test_progress_while_an_expert_runs_results_kept_for_the_next_process_and_a_result_overlay(
        expert_server, sample_data, tmp_path):
    notes: list[tuple[float, float | None, str | None]] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        notes.append((value, total, message))

    async def first(session: ClientSession) -> dict[str, Any]:
        return as_json(await session.call_tool("segment_ct", {"study": "ct_abdomen", "classes": ["liver", "spleen"]},
                                               progress_callback=progress))

    made = over_stdio(expert_server, tmp_path, first)
    assert notes[0] == (0.0, None, "VISTA3D on ct_abdomen: started")
    assert notes[-1][2].startswith("VISTA3D on ct_abdomen: finished after") and notes[-1][1] == notes[-1][0] > 0
    assert [value for value, _, _ in notes] == sorted({value for value, _, _ in notes})
    folder = tmp_path / "home" / ".cache" / "vila-m3" / "mcp-results"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(path.name for path in folder.iterdir()) == [f"{made['result']}.json", f"{made['result']}.nii.gz"]
    assert {stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {0o600}

    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    labels = labelmap_of((folder / f"{made['result']}.nii.gz").read_bytes(), tmp_path, "kept.nii.gz")
    counts = [np.count_nonzero(extract_slice(labels, "axial", i)) for i in range(slice_index_count(labels, "axial"))]
    index = int(np.argmax(counts))
    assert np.count_nonzero(extract_slice(labels, "axial", index)) > 0

    async def second(session: ClientSession) -> tuple[Any, ...]:  # a new `vila-m3 mcp` process
        return (await session.call_tool("get_labelmap", {"result": made["result"]}),
                await session.call_tool("get_slice", {"study": "ct_abdomen", "index": index, "result": made["result"]}),
                await session.call_tool("get_slice", {"study": "brain_mri_flair", "result": made["result"]}),
                [str(item.uri) for item in (await session.list_resources()).resources])

    labelmap, overlaid, other_study, listed = over_stdio(expert_server, tmp_path, second)
    assert as_json(labelmap)["result"] == made["result"] and listed == [made["labelmap"]]
    shown = as_json(overlaid)
    image = next(item for item in overlaid.content if isinstance(item, types.ImageContent))
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(image.data))).convert("RGB"))
    expected, drawn = render_overlay(ct, labels, "axial", index, overlay_colors_float(), "CT")  # the chat's overlay
    assert np.array_equal(pixels, np.asarray(expected))
    marked = extract_slice(labels, "axial", index) != 0
    coloured = (pixels[..., 0] != pixels[..., 1]) | (pixels[..., 1] != pixels[..., 2])
    assert np.array_equal(coloured, marked)  # colour exactly where the labelmap is, the grey slice elsewhere
    assert [entry["id"] for entry in shown["overlay"]["labels_drawn"]] == [label_id for label_id, _ in drawn]
    assert {entry["name"] for entry in shown["overlay"]["labels_drawn"]} <= {"liver", "spleen"}
    assert shown["overlay"]["labels_drawn"][0]["color"] == "red"
    assert "another study" in error_text(other_study)


# --- streamable HTTP ------------------------------------------------------------------------------------------


def test_streamable_http_lists_runs_and_returns_the_labelmap(expert_server, sample_data, tmp_path):
    process, url = start_http(expert_server, tmp_path)
    notes: list[str | None] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        notes.append(message)

    try:
        async def main() -> tuple[Any, ...]:
            async with http_session(url) as session:
                tools = (await session.list_tools()).tools
                answer = as_json(await session.call_tool("segment_ct", {"study": "ct_abdomen",
                                                                        "argument": "pancreatic tumor"},
                                                         progress_callback=progress))
                labelmap = await session.call_tool("get_labelmap", {"result": answer["result"]})
                return tools, answer, labelmap

        tools, answer, labelmap = anyio.run(main)
        foreign = requests.post(url, json={}, headers={"Origin": "http://evil.example"}, timeout=10)
    finally:
        stop_process_group(process)
    assert {tool.name for tool in tools} == EXPERT_TOOLS | FIXED
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert_geometry(answer["geometry"], ct)
    embedded = next(item for item in labelmap.content if isinstance(item, types.EmbeddedResource))
    assert labelmap_of(base64.b64decode(embedded.resource.blob), tmp_path, "http.nii.gz").geometry.allclose(
        ct.geometry, atol=1e-4)
    assert foreign.status_code == 403 and "origin" in foreign.json()["detail"]
    assert notes[0] == "VISTA3D on ct_abdomen: started" and "finished" in notes[-1]  # on the request's own stream


def test_without_a_server_every_configured_expert_is_listed_and_calls_say_it_cannot_be_reached(tmp_path):
    """Also: one HTTP MCP server serves session after session (mcp 1.9 stopped after the first one ended)."""
    nowhere = RunningServer(f"http://127.0.0.1:{free_port()}", None, tmp_path / "none.log")  # type: ignore[arg-type]
    process, url = start_http(nowhere, tmp_path)
    try:
        async def main() -> tuple[set[str], str]:
            async with http_session(url) as session:
                names = {tool.name for tool in (await session.list_tools()).tools}
                return names, error_text(await session.call_tool("segment_ct", {"study": "ct_abdomen"}))

        answers = [anyio.run(main) for _ in range(3)]
    finally:
        stop_process_group(process)
    configured = {spec.name for spec in ExpertRegistry.from_config().configured if spec.runner is not None}
    for names, message in answers:
        assert names == EXPERT_TOOLS | FIXED and len(configured) == len(EXPERT_TOOLS)
        assert "cannot be reached" in message and nowhere.url in message and "ct_abdomen" in message
    assert "Traceback" not in (tmp_path / "mcp-http.log").read_text()


# --- login on -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def realm():
    from keycloak_realm import KeycloakRealm

    with KeycloakRealm() as served:
        yield served


@pytest.fixture(scope="module")
def login_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, realm) -> Iterator[RunningServer]:
    """A server with login on (the test realm) and stand-in CXR weights."""
    workdir = tmp_path_factory.mktemp("mcp-login-server")
    stage_stand_ins(workdir / "models", ("cxr",))
    studies = workdir / "studies"
    shutil.copytree(sample_data / "studies", studies)
    env = realm.server_env()
    server = start_monailabel(workdir, studies, conf={"models": "cxr"}, env=env)
    try:
        yield server
    finally:
        server.stop()


def test_with_login_on_a_missing_token_is_refused_in_words_and_a_token_is_used(login_server, realm, tmp_path):
    from keycloak_realm import ROLES

    async def use(session: ClientSession) -> tuple[Any, ...]:
        return (await session.call_tool("list_studies", {}),
                await session.call_tool("classify_chest_xray", {"study": "cxr_chest"}))

    studies, cxr = over_stdio(login_server, tmp_path, use)
    for refused in (error_text(studies), error_text(cxr)):
        assert "requires login" in refused and "no token" in refused

    token = realm.token("alice", [ROLES["user"], ROLES["annotator"]])
    studies, cxr = over_stdio(login_server, tmp_path, use, token=token)
    assert "cxr_chest" in {entry["study"] for entry in as_json(studies)["studies"]}
    assert len(as_json(cxr)["probabilities"]) == 18

    wrong = over_stdio(login_server, tmp_path, use, token="abc.def.ghi")[0]
    assert "refused the token" in error_text(wrong)


def test_over_http_the_mcp_request_brings_its_own_token(login_server, realm, tmp_path):
    from keycloak_realm import ROLES

    process, url = start_http(login_server, tmp_path)  # no token of its own
    try:
        async def main(token: str | None) -> types.CallToolResult:
            async with http_session(url, token) as session:
                return await session.call_tool("list_studies", {})

        without = anyio.run(main, None)
        with_token = anyio.run(main, realm.token("bob", [ROLES["user"]]))
    finally:
        stop_process_group(process)
    assert "requires login" in error_text(without)
    assert "cxr_chest" in {entry["study"] for entry in as_json(with_token)["studies"]}

