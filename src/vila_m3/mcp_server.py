"""An MCP server that offers the experts, the studies and their slices as tools any MCP client can call.

``vila-m3 mcp --server http://127.0.0.1:8000`` serves the Model Context Protocol over stdio (a desktop client
spawns it) or, with ``--transport http``, over streamable HTTP at ``http://127.0.0.1:PORT/mcp``.

Design: the MCP server is a *client of the running VILA-M3 server* over its REST API
(:mod:`vila_m3.label_client`), not a second place that runs the experts. Reasons:

- **One datastore, one set of rules.** Study ids are resolved by the server (contained datastore, PACS), so an
  MCP client sees exactly the studies a Slicer user sees and can name nothing else; no second path check.
- **Auth follows the server's settings.** Each call carries a bearer token (``$VILA_M3_TOKEN``, or over HTTP the
  MCP request's own ``Authorization`` header), and the server's login and roles decide; with login off, no token
  is needed. A refusal is passed on in words.
- **One copy of each model, one work queue per device.** Experts run where the weights are loaded, behind the
  server's queue and result cache; an MCP client cannot start a second VISTA3D beside the server's.
- **The core stays free of MONAI Label**: this module needs only HTTP, the expert registry and the imaging code.

The cost is a network hop and the server having to run; both are small beside an expert's run time.

Tools. The experts' tools come from the registry (``configs/experts.yaml`` and extra experts files): one tool
per expert that has a runner and whose infer task (``configs/app.yaml``'s, else its lower-case name) the server
serves, named by the expert's ``tool`` field (``segment_ct``, ``segment_brain_tumour``, ``classify_chest_xray``)
or else its lower-case name. Its arguments are ``study`` plus the chat's tool schema (:mod:`vila_m3.experts.tools`:
``argument``, an enum of the card's arguments, for an expert that takes one) and, where the entry names the
``/infer`` parameter for label ids (``tool_classes``), ``classes`` (label names, an enum). So a new expert in the
YAML appears without code changes. Beside them:
``list_studies``, ``get_slice`` (a PNG in the display orientation the model sees; CT window 50/400; with
``result``, that segmentation's labels blended on the slice as the chat's overlay draws them) and
``get_labelmap`` (a segmentation result's labelmap as an embedded NIfTI resource, also readable as
``vila-m3://results/<id>/labelmap.nii.gz``). Results are JSON text: the labels found with voxel counts, the
labelmap's geometry, and the server's stand-in notice when the weights are stand-ins.

Results are kept on disk (:mod:`vila_m3.mcp_results`: the newest N in a private folder of the user's choice), so
they outlive the process: a client that spawns ``vila-m3 mcp`` again still reads them. While an expert runs, a
client that sent a progress token gets MCP progress notifications: started, every few seconds while the
server works (``progress`` = seconds so far; the ``/infer`` route tells no queue position or expert step), and
finished or failed (``configs/tools.yaml`` ``mcp``).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import numpy as np
from pydantic import AnyUrl
from pydantic._internal import _typing_extra


def _pydantic_compat() -> None:
    """mcp 1.9 (the last release that installs beside jsonschema 3.2) imports pydantic's private
    ``eval_type_backport``, which later pydantic releases call ``eval_type`` (same arguments); only FastMCP, not
    used here, calls it. Without the name, ``import mcp`` fails."""
    if not hasattr(_typing_extra, "eval_type_backport"):
        _typing_extra.eval_type_backport = _typing_extra.eval_type  # type: ignore[attr-defined]


_pydantic_compat()

from mcp import types  # noqa: E402  (after the compatibility name above)
from mcp.server.lowlevel import Server  # noqa: E402
from mcp.server.lowlevel.helper_types import ReadResourceContents  # noqa: E402

from vila_m3 import __version__  # noqa: E402
from vila_m3.configs import load_config  # noqa: E402
from vila_m3.experts.registry import (  # noqa: E402
    EXPERTS_CONFIG,
    ConfigError,
    ExpertRegistry,
    ExpertSpec,
    env_experts_files,
)
from vila_m3.experts.tools import (  # noqa: E402
    TOOLS_CONFIG,
    ToolCallError,
    resolve_tool_call,
    tool_argument_name,
    tool_classes_name,
)
from vila_m3.experts.tools import expert_tools as openai_tools  # noqa: E402
from vila_m3.label_client import LabelServerClient, ServerRefused  # noqa: E402
from vila_m3.mcp_results import RESULT_SCHEME, ResultStore, StoredResult  # noqa: E402
from vila_m3.tasks import task_catalogue  # noqa: E402

logger = logging.getLogger(__name__)

TOKEN_ENV = "VILA_M3_TOKEN"
SERVER_NAME = "vila-m3"
MAX_VOLUMES = 2  # downloaded studies kept for get_slice
VOLUME_TTL_S = 300.0
NIFTI_MIME = "application/gzip"
_TOOL_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg")
AXES = ("axial", "coronal", "sagittal")


class ToolError(Exception):
    """A tool call that cannot be done; the message is shown to the client as the tool's error."""


# ----------------------------------------------------------------------------------------- expert tools


@dataclass(frozen=True)
class ExpertTool:
    """One expert offered as an MCP tool.

    Attributes:
        name: the tool name (``tool`` field of the expert's entry, else the expert's name in lower case).
        task: the server's infer task (MONAI Label model) that runs the expert.
        spec: the expert's registry entry.
        registry: the registry it comes from (arguments are resolved as for the chat's tool calls).
        parameters: the JSON schema of its arguments as the chat offers it to a tool-calling model
            (:func:`vila_m3.experts.tools.expert_tools`: ``argument``, and ``classes`` for VISTA3D); the MCP
            tool adds ``study``.
        classes_param: the ``/infer`` parameter that takes the label ids of ``classes`` (``label_prompt``).
    """

    name: str
    task: str
    spec: ExpertSpec
    registry: ExpertRegistry
    parameters: Mapping[str, Any]
    classes_param: str | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        """Label names a client may ask for one by one: every label of the expert's class table, by id
        (VISTA3D: its 132 classes); empty unless the expert takes label ids (``tool_classes``)."""
        return self.spec.class_names if self.classes_param else ()

    @property
    def argument(self) -> str:
        """The name of the group argument (``argument``, from configs/tools.yaml, as in the chat's tools)."""
        return tool_argument_name()

    def description(self) -> str:
        spec = self.spec
        text = (f"Run the {spec.name} expert ({spec.task}, {spec.modality}) on a study of the server's datastore. "
                f"{spec.overview.rstrip('.')}. Accuracy: {spec.accuracy}. Input: a {spec.input_modality} study id "
                "from list_studies.")
        if spec.args:
            aliases = "".join(f" ('{a}' means '{t}')" for a, t in spec.aliases.items())
            text += (f" Give `{self.argument}` (one of {spec.valid_args_text()}{aliases}; default "
                     f"'{spec.default_arg or spec.args[0]}')")
            text += " or `classes` (label names), not both." if self.classes else "."
        if spec.output == "segmentation":
            text += " Answers with the labels found (voxel counts) and the labelmap's geometry; get_labelmap gives it."
        else:
            text += " Answers with each finding's probability and yes/no."
        return text

    def input_schema(self) -> dict[str, Any]:
        """JSON schema of the arguments: ``study`` and the chat tools' (``argument``; ``classes`` for an expert
        that takes label ids)."""
        properties: dict[str, Any] = {
            "study": {"type": "string", "description": "datastore image id (see list_studies)"},
            **copy.deepcopy(dict(self.parameters.get("properties") or {}))}
        if not self.classes:
            properties.pop(tool_classes_name(), None)
        return {"type": "object", "properties": properties, "required": ["study"], "additionalProperties": False}

    def infer_params(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The ``/infer`` params for ``arguments`` (checked as the chat's tool calls are; ToolError naming a bad
        one): ``{"argument": group}``, ``{classes_param: label ids}`` for ``classes``, or none."""
        unknown = sorted(set(arguments) - set(self.input_schema()["properties"]))
        if unknown:
            allowed = ", ".join(self.input_schema()["properties"])
            raise ToolError(f"{self.name}: unknown argument(s) {', '.join(unknown)}; it takes {allowed}")
        rest = {key: value for key, value in arguments.items() if key != "study"}
        try:
            call = resolve_tool_call(self.spec.name, rest, self.registry)
        except ToolCallError as err:
            raise ToolError(f"{self.name}: {err}") from None
        if rest.get(tool_classes_name()) is not None:
            return {str(self.classes_param): list(call.resolved.label_ids)}
        return {"argument": call.argument} if call.argument is not None else {}


@dataclass(frozen=True)
class ToolFields:
    """What an expert's entry says about its MCP tool.

    Attributes:
        name: ``tool``: the tool name; default: the expert's name in lower case. (``tool_classes``, the
            ``/infer`` parameter for the label ids of ``classes``, is the registry's: ``ExpertSpec.tool_classes``.)
    """

    name: str


def tool_fields(config: Mapping[str, Any] | None = None) -> dict[str, ToolFields]:
    """``{expert name: ToolFields}`` from the ``tool`` fields of the experts' entries
    (``configs/experts.yaml`` and the extra experts files of ``$VILA_M3_EXPERTS``).

    Raises:
        ConfigError: a tool name is not ``[a-z][a-z0-9_]*`` (at most 64 characters) or is used twice.
    """
    entries = list((config if config is not None else load_config(EXPERTS_CONFIG)).get("experts") or [])
    if config is None:
        for path in env_experts_files():
            entries += list(load_config(path.resolve()).get("experts") or [])
    fields: dict[str, ToolFields] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            continue
        tool = entry.get("tool") or entry["name"].lower()
        if not isinstance(tool, str) or not _TOOL_NAME.match(tool):
            raise ConfigError(f"expert {entry['name']}: tool must be lower-case letters, digits or '_' "
                              f"(at most 64), got {tool!r}")
        fields[entry["name"]] = ToolFields(tool)
    used = [f.name for f in fields.values()] + list(FIXED_TOOLS)
    repeated = sorted({n for n in used if used.count(n) > 1})
    if repeated:
        raise ConfigError(f"tool names must be unique; repeated: {', '.join(repeated)}")
    return fields


def expert_tools(served: Sequence[str] | None = None) -> list[ExpertTool]:
    """The experts as tools, in card order: those with a runner, and when ``served`` (the server's model names)
    is given, only those the server serves. An expert's infer task is the one ``configs/app.yaml`` names for
    it, else its name in lower case."""
    registry = ExpertRegistry.from_config()
    task_of = {str(task["expert"]): name for name, task in task_catalogue().items() if task.get("expert")}
    parameters = {tool["function"]["name"]: tool["function"]["parameters"] for tool in openai_tools(registry)}
    fields = tool_fields()
    tools = []
    for spec in registry.configured:
        task = task_of.get(spec.name, spec.name.lower())
        if spec.runner is None or spec.name not in parameters or (served is not None and task not in served):
            continue
        own = fields.get(spec.name) or ToolFields(spec.name.lower())
        tools.append(ExpertTool(own.name, task, spec, registry, parameters[spec.name], spec.tool_classes))
    return tools


# ----------------------------------------------------------------------------------------- fixed tools

FIXED_TOOLS: dict[str, types.Tool] = {
    "list_studies": types.Tool(
        name="list_studies",
        description="The studies of the server's datastore: their ids (give these to the other tools) and how "
                    "many labels each has.",
        inputSchema={"type": "object", "properties": {}, "additionalProperties": False}),
    "get_slice": types.Tool(
        name="get_slice",
        description="One slice of a study as a PNG, in radiological display (axial: anterior at the top, the "
                    "patient's right on the image left; CT in a 50/400 HU window, MRI min-max, X-rays as stored). "
                    "Without index, the middle slice. A 2D image (X-ray) has one slice, index 0. With `result` "
                    "(a segmentation of this study), its labels are blended on the slice in colour, named in "
                    "the answer.",
        inputSchema={"type": "object", "properties": {
            "study": {"type": "string", "description": "datastore image id (see list_studies)"},
            "axis": {"type": "string", "enum": list(AXES), "default": "axial"},
            "index": {"type": "integer", "minimum": 0,
                      "description": "slice number along the axis: 0 = inferior / posterior / the patient's left"},
            "result": {"type": "string",
                       "description": "the `result` id of a segmentation of this study, to overlay its labels"}},
            "required": ["study"], "additionalProperties": False}),
    "get_labelmap": types.Tool(
        name="get_labelmap",
        description="The labelmap of an earlier segmentation result (its `result` id) as a NIfTI (.nii.gz) "
                    "resource, on the study's voxel grid, with its labels and geometry.",
        inputSchema={"type": "object", "properties": {
            "result": {"type": "string", "description": "the `result` id of a segmentation tool's answer"}},
            "required": ["result"], "additionalProperties": False}),
}


# ----------------------------------------------------------------------------------------- results


def mcp_settings() -> dict[str, Any]:
    """``configs/tools.yaml``'s ``mcp`` section: ``keep_results``, ``results_dir``, ``progress_interval_s``."""
    return dict(load_config(TOOLS_CONFIG).get("mcp") or {})


def result_store(folder: str | os.PathLike[str] | None = None, keep: int | None = None) -> ResultStore:
    """The results folder: ``folder``, else ``$VILA_M3_MCP_RESULTS``, else ``mcp.results_dir`` of
    configs/tools.yaml, else the user's cache folder; ``keep`` (else ``mcp.keep_results``) newest results."""
    from vila_m3.mcp_results import RESULTS_ENV

    settings = mcp_settings()
    chosen = folder or os.environ.get(RESULTS_ENV, "").strip() or settings.get("results_dir") or None
    return ResultStore(chosen, int(keep if keep is not None else settings.get("keep_results", 32)))


def owner_of(token: str | None) -> str:
    """Who a cached result or study belongs to: a digest of the bearer token (``-`` without one). Over HTTP one
    MCP server serves several users; what one token fetched is never given to a call with another."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:16] if token else "-"


def geometry_of(volume: Any) -> dict[str, Any]:
    """A volume's geometry as JSON: shape (x, y, z voxels), spacing (mm), origin (mm, LPS), direction (3×3 rows)."""
    geometry = volume.geometry
    return {"shape": list(geometry.shape), "spacing": [float(v) for v in geometry.spacing],
            "origin": [float(v) for v in geometry.origin],
            "direction": [[float(v) for v in row] for row in np.asarray(geometry.direction, float).reshape(3, 3)],
            "frame": "LPS, mm; shape and spacing in x, y, z order"}


def _labelmap_summary(data: bytes, label_names: Mapping[str, int]) -> dict[str, Any]:
    """Labels found (name, id, voxel count) and the geometry of a NIfTI labelmap's bytes."""
    from vila_m3.imaging import read_labelmap

    with tempfile.TemporaryDirectory(prefix="vila-m3-mcp-") as folder:
        path = Path(folder) / "labels.nii.gz"
        path.write_bytes(data)
        labels = read_labelmap(path)
    ids, counts = np.unique(labels.array, return_counts=True)
    voxels = {int(i): int(c) for i, c in zip(ids, counts, strict=True) if i != 0}
    names = {int(label_id): name for name, label_id in label_names.items()}
    found = [{"name": names.get(label_id, f"label {label_id}"), "id": label_id, "voxels": count}
             for label_id, count in sorted(voxels.items())]
    absent = sorted(name for label_id, name in names.items() if label_id not in voxels)
    return {"labels_found": found, "labels_not_found": absent, "geometry": geometry_of(labels)}


def _suffix(file_name: str) -> str:
    lower = os.path.basename(file_name).lower()
    return next((s for s in _SUFFIXES if lower.endswith(s)), ".nii.gz")


def _read_image(data: bytes, file_name: str) -> Any:
    """A downloaded study's bytes as a Volume (read from a temporary file with the server's suffix)."""
    from vila_m3.imaging import VolumeReadError, read_volume

    with tempfile.TemporaryDirectory(prefix="vila-m3-mcp-") as folder:
        path = Path(folder) / f"study{_suffix(file_name)}"
        path.write_bytes(data)
        try:
            return read_volume(path)
        except VolumeReadError as err:
            raise ToolError(f"the study's file cannot be read here ({type(err).__name__})") from None


def _render_png(volume: Any, axis: str, index: int | None, overlay: StoredResult | None = None
                ) -> tuple[bytes, dict[str, Any]]:
    """PNG bytes of one slice and what it shows (axis, index, slice count, modality); with ``overlay``, that
    result's labelmap blended on the slice by the chat's overlay code (:func:`vila_m3.imaging.overlay.
    render_overlay`, the chat's colours) and the labels drawn, with their colour names."""
    from vila_m3.chat.study import detect_modality
    from vila_m3.experts.colors import overlay_colors_float, slice_label_colors
    from vila_m3.imaging import read_labelmap, render_slice, slice_index_count
    from vila_m3.imaging.overlay import render_overlay

    count = slice_index_count(volume, axis)
    index = count // 2 if index is None else index
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ToolError(f"{axis} slice index must be an integer in 0..{count - 1}; got {index!r}")
    modality = detect_modality(volume)
    drawn_labels: list[dict[str, Any]] | None = None
    if overlay is None:
        picture = render_slice(volume, axis, index, modality)
    else:
        try:
            picture, drawn = render_overlay(volume, read_labelmap(overlay.path), axis, index, overlay_colors_float(),
                                            modality=modality)
        except ValueError:
            raise ToolError(f"the labelmap of result '{overlay.result_id}' is not on this study's voxel grid") from None
        names = {entry["id"]: entry["name"] for entry in overlay.summary.get("labels_found") or []}
        colours = slice_label_colors(label_id for label_id, _ in drawn)
        drawn_labels = [{"id": label_id, "name": names.get(label_id, f"label {label_id}"), "color": colours[label_id]}
                        for label_id, _ in drawn]
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    window = {"CT": "window 50/400 HU", "MRI": "min-max of the volume", "CXR": "as stored"}[modality]
    shown = {"axis": axis, "index": index, "slices": count, "modality": modality, "rendering": window,
             "size": list(picture.size)}
    if overlay is not None:
        shown["overlay"] = {"result": overlay.result_id, "expert": overlay.summary.get("expert"),
                            "labels_drawn": drawn_labels}
    return buffer.getvalue(), shown


class Progress:
    """MCP progress notifications of one tool call, when its client sent a progress token.

    ``send(progress, total, message)`` sends one notification (None: the client asked for none). While
    :meth:`track` awaits the work: ``started`` (progress 0), then every ``interval_s`` the seconds so far, then
    ``finished`` or ``failed`` with total = progress; each value is above the one before (as MCP asks).
    """

    def __init__(self, send: Callable[[float, float | None, str | None], Awaitable[None]] | None,
                 interval_s: float = 5.0) -> None:
        self.send = send
        self.interval_s = max(float(interval_s), 0.1)
        self.value = 0.0

    async def _report(self, value: float, total: float | None, message: str) -> None:
        if self.send is None:
            return
        self.value = max(value, self.value)
        try:
            await self.send(self.value, total, message)
        except Exception as err:  # a client gone away must not fail the tool call
            logger.debug("progress notification not sent: %s", err)

    async def _beat(self, what: str, began: float) -> None:
        while True:
            await anyio.sleep(self.interval_s)
            seconds = time.monotonic() - began
            await self._report(seconds, None, f"{what}: running for {seconds:.0f} s")

    async def track(self, what: str, work: Callable[[], Awaitable[Any]]) -> Any:
        """``await work()`` with notifications around it (none without a token)."""
        if self.send is None:
            return await work()
        began = time.monotonic()
        await self._report(0.0, None, f"{what}: started")
        failure: Exception | None = None
        result = None
        async with anyio.create_task_group() as group:
            group.start_soon(self._beat, what, began)
            try:
                result = await work()
            except Exception as err:
                failure = err
            finally:
                group.cancel_scope.cancel()
        seconds = time.monotonic() - began
        final = max(seconds, self.value + 1e-3)
        await self._report(final, final, f"{what}: {'failed' if failure else 'finished'} after {seconds:.1f} s")
        if failure is not None:
            raise failure
        return result


# ----------------------------------------------------------------------------------------- the server


class VilaM3Tools:
    """The tools' behaviour over one server connection (transport-independent).

    Args:
        client: the REST client of the running server.
        token: the bearer token used when the MCP request brings none (``$VILA_M3_TOKEN``).
        results: where segmentation results are kept; None: :func:`result_store`'s default folder.
        progress_interval_s: seconds between progress notifications while an expert runs; None:
            ``configs/tools.yaml`` ``mcp.progress_interval_s``.
    """

    def __init__(self, client: LabelServerClient, token: str | None = None, results: ResultStore | None = None,
                 progress_interval_s: float | None = None):
        self.client = client
        self.token = token or None
        self.results = results if results is not None else result_store()
        interval = progress_interval_s if progress_interval_s is not None else mcp_settings().get(
            "progress_interval_s", 5.0)
        self.progress_interval_s = float(interval)
        self.volumes: OrderedDict[tuple[str, str], tuple[float, Any]] = OrderedDict()

    async def experts(self, token: str | None) -> list[ExpertTool]:
        """The expert tools the server serves now; every configured one when its ``/info/`` cannot be read
        (e.g. no token yet), so that a client still sees them and a call explains the refusal."""
        try:
            served = list((await self.client.info(token)).get("models", {}))
        except ServerRefused as err:
            logger.info("listing every configured expert: %s", err)
            served = None
        return expert_tools(served)

    async def list_tools(self, token: str | None) -> list[types.Tool]:
        tools = [types.Tool(name=tool.name, description=tool.description(), inputSchema=tool.input_schema())
                 for tool in await self.experts(token)]
        return [FIXED_TOOLS["list_studies"], FIXED_TOOLS["get_slice"], *tools, FIXED_TOOLS["get_labelmap"]]

    async def call(self, name: str, arguments: Mapping[str, Any], token: str | None,
                   progress: Progress | None = None) -> list[types.Content]:
        """Run tool ``name``; ToolError (shown to the client) for anything it cannot do. ``progress``: the
        call's progress notifications (an expert's run reports them)."""
        try:
            if name == "list_studies":
                return await self.list_studies(token)
            if name == "get_slice":
                return await self.get_slice(arguments, token)
            if name == "get_labelmap":
                return self.get_labelmap(arguments, token)
            tools = {tool.name: tool for tool in expert_tools()}
            if name not in tools:
                valid = ", ".join([*FIXED_TOOLS, *tools])
                raise ToolError(f"unknown tool '{name}'; tools: {valid}")
            return await self.run_expert(tools[name], arguments, token, progress)
        except ServerRefused as err:
            raise ToolError(str(err)) from None

    async def list_studies(self, token: str | None) -> list[types.Content]:
        objects = await self.client.studies(token)
        studies = [{"study": image_id, "labels": sorted((entry.get("labels") or {}).keys())}
                   for image_id, entry in sorted(objects.items())]
        return [_json_text({"studies": studies, "count": len(studies)})]

    @staticmethod
    def _study(arguments: Mapping[str, Any]) -> str:
        study = arguments.get("study")
        if not isinstance(study, str) or not study.strip():
            raise ToolError("study: give a datastore image id (see list_studies)")
        return study

    async def volume(self, study: str, token: str | None) -> Any:
        """The study as a Volume, downloaded from the server (the last few kept for a few minutes)."""
        now, key = time.monotonic(), (owner_of(token), study)
        kept = self.volumes.get(key)
        if kept is not None and now - kept[0] < VOLUME_TTL_S:
            self.volumes.move_to_end(key)
            return kept[1]
        image = await self.client.image(study, token)
        volume = await anyio.to_thread.run_sync(_read_image, image.data, image.file_name)
        self.volumes[key] = (now, volume)
        while len(self.volumes) > MAX_VOLUMES:
            self.volumes.popitem(last=False)
        return volume

    async def get_slice(self, arguments: Mapping[str, Any], token: str | None) -> list[types.Content]:
        study = self._study(arguments)
        axis = arguments.get("axis", "axial")
        if axis not in AXES:
            raise ToolError(f"axis must be one of {', '.join(AXES)}; got {axis!r}")
        index = arguments.get("index")
        overlay = None if arguments.get("result") is None else self.stored(arguments.get("result"), token)
        if overlay is not None and overlay.summary.get("study") != study:
            raise ToolError(f"result '{overlay.result_id}' is a segmentation of another study, not '{study}'")
        volume = await self.volume(study, token)
        png, shown = await anyio.to_thread.run_sync(_render_png, volume, axis, index, overlay)
        return [types.ImageContent(type="image", data=base64.b64encode(png).decode("ascii"), mimeType="image/png"),
                _json_text({"study": study, **shown})]

    async def run_expert(self, tool: ExpertTool, arguments: Mapping[str, Any], token: str | None,
                         progress: Progress | None = None) -> list[types.Content]:
        study = self._study(arguments)
        params = tool.infer_params(arguments)
        progress = progress or Progress(None)
        answer = await progress.track(f"{tool.spec.name} on {study}",
                                      lambda: self.client.infer(tool.task, study, params, token))
        reply = answer.params
        summary: dict[str, Any] = {"tool": tool.name, "expert": reply.get("expert", tool.spec.name), "study": study}
        for key in ("argument", "probabilities", "answers", "feedback", "cached", "stand_in", "notice"):
            if key in reply:
                summary[key] = reply[key]
        if answer.file is None:
            return [_json_text(summary)]
        result_id = uuid.uuid4().hex[:12]
        summary["result"] = result_id
        summary.update(await anyio.to_thread.run_sync(_labelmap_summary, answer.file, reply.get("label_names") or {}))
        summary["labelmap"] = f"{RESULT_SCHEME}://results/{result_id}/labelmap.nii.gz"
        await anyio.to_thread.run_sync(self.results.put, result_id, answer.file, summary, owner_of(token))
        return [_json_text(summary)]

    def stored(self, result_id: Any, token: str | None) -> StoredResult:
        """The kept result ``result_id`` made with ``token``; ToolError naming it otherwise."""
        stored = self.results.get(result_id)
        if stored is None or stored.owner != owner_of(token):
            raise ToolError(f"no result '{result_id}' here: the MCP server keeps the last {self.results.keep} "
                            "segmentation results, each for the token it was made with")
        return stored

    def get_labelmap(self, arguments: Mapping[str, Any], token: str | None) -> list[types.Content]:
        stored = self.stored(arguments.get("result"), token)
        resource = types.BlobResourceContents(uri=AnyUrl(stored.uri), mimeType=NIFTI_MIME,
                                              blob=base64.b64encode(stored.data).decode("ascii"))
        facts = {key: stored.summary[key] for key in ("result", "expert", "study", "labels_found", "geometry",
                                                      "stand_in", "notice") if key in stored.summary}
        return [types.EmbeddedResource(type="resource", resource=resource),
                _json_text({**facts, "labelmap": stored.uri, "format": "NIfTI-1, gzip", "bytes": len(stored.data)})]

    def resources(self, token: str | None) -> list[types.Resource]:
        """The kept labelmaps made with ``token``, newest first."""
        owner = owner_of(token)
        return [types.Resource(uri=AnyUrl(stored.uri), name=f"labelmap {stored.result_id}",
                               description=f"{stored.summary.get('expert')} on {stored.summary.get('study')}",
                               mimeType=NIFTI_MIME, size=stored.size)
                for stored in self.results.newest_first() if stored.owner == owner]

    def read(self, uri: str, token: str | None) -> bytes:
        match = re.fullmatch(rf"{RESULT_SCHEME}://results/([0-9a-f]+)/labelmap\.nii\.gz", uri)
        if match is None:
            raise ToolError(f"unknown resource {uri}; labelmaps are {RESULT_SCHEME}://results/<result>/labelmap.nii.gz")
        return self.stored(match.group(1), token).data


def _json_text(value: Any) -> types.TextContent:
    return types.TextContent(type="text", text=json.dumps(value, indent=1))


class _SessionServer(Server):
    """The SDK's low-level server, where a session whose client has gone ends quietly.

    With mcp 1.9 a streamable HTTP session that its client ends (``DELETE /mcp``) closes the session's streams
    under the running session, which raises ``ClosedResourceError`` out of ``run`` and, through the session
    manager's task group, stops every later request with HTTP 500. A closed stream is the session's end here.
    """

    async def run(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().run(*args, **kwargs)
        except* anyio.ClosedResourceError:
            logger.debug("an MCP session ended with its client")


def build_server(tools: VilaM3Tools) -> Server:
    """The MCP server (low-level SDK API: the tools' schemas come from the registry at each listing)."""
    server: Server = _SessionServer(SERVER_NAME, version=__version__,
                            instructions="VILA-M3's expert models (segmentation, classification) on the studies "
                                         "of a VILA-M3 server. Call list_studies first; results name stand-ins.")

    def token() -> str | None:
        """The MCP HTTP request's bearer token if it brings one, else the configured token."""
        try:
            request = server.request_context.request
        except LookupError:
            request = None
        header = request.headers.get("authorization", "") if request is not None else ""
        if header.lower().startswith("bearer ") and header[7:].strip():
            return header[7:].strip()
        return tools.token

    @server.list_tools()
    async def list_tools() -> list[types.Tool]:
        return await tools.list_tools(token())

    def progress() -> Progress:
        """The call's progress notifications: to the client's progress token, on the request's own stream."""
        context = server.request_context
        progress_token = context.meta.progressToken if context.meta is not None else None
        if progress_token is None:
            return Progress(None)

        async def send(value: float, total: float | None, message: str | None) -> None:
            await context.session.send_progress_notification(progress_token, value, total, message,
                                                             related_request_id=context.request_id)

        return Progress(send, tools.progress_interval_s)

    @server.call_tool()
    async def call_tool(name: str, arguments: dict[str, Any]) -> list[types.Content]:
        try:
            return await tools.call(name, arguments or {}, token(), progress())
        except ToolError:
            raise
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            logger.exception("tool %s failed (error id %s)", name, error_id)
            raise ToolError(f"{name}: internal error; see the MCP server's log (error id {error_id})") from None

    @server.list_resources()
    async def list_resources() -> list[types.Resource]:
        return tools.resources(token())

    @server.read_resource()
    async def read_resource(uri: AnyUrl) -> list[ReadResourceContents]:
        return [ReadResourceContents(tools.read(str(uri), token()), NIFTI_MIME)]

    return server


# ----------------------------------------------------------------------------------------- transports

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


async def serve_stdio(server_url: str, token: str | None, results: ResultStore | None = None) -> None:
    """Serve MCP on stdin/stdout until the client closes them (``results``: where results are kept; None:
    :func:`result_store`'s default)."""
    from mcp.server.stdio import stdio_server

    client = LabelServerClient(server_url)
    try:
        server = build_server(VilaM3Tools(client, token, results))
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
    finally:
        await client.aclose()


def http_app(server_url: str, token: str | None, results: ResultStore | None = None) -> Any:
    """The ASGI app of the streamable HTTP transport: ``/mcp``. A browser page of another origin is refused
    (the MCP specification asks servers to check ``Origin`` against DNS rebinding)."""
    import contextlib

    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    client = LabelServerClient(server_url)
    manager = StreamableHTTPSessionManager(app=build_server(VilaM3Tools(client, token, results)))

    class Endpoint:  # an ASGI app (a class instance, so that Route passes the raw ASGI call through)
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            origin = dict(scope.get("headers") or []).get(b"origin", b"").decode("latin-1")
            if origin and (urlsplit(origin).hostname or "") not in LOCAL_HOSTS:
                refused = JSONResponse({"detail": "requests from another origin are refused"}, 403)
                await refused(scope, receive, send)
                return
            await manager.handle_request(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any):
        async with manager.run():
            try:
                yield
            finally:
                await client.aclose()

    return Starlette(routes=[Route("/mcp", Endpoint())], lifespan=lifespan)


class _EndedSessionFilter(logging.Filter):
    """Drops the SDK's tracebacks of a closed stream when a client ends its HTTP session (mcp 1.9 logs them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, anyio.ClosedResourceError)


def serve_http(server_url: str, token: str | None, host: str, port: int, results: ResultStore | None = None) -> None:
    """Serve MCP over streamable HTTP at ``http://host:port/mcp`` until interrupted."""
    import uvicorn

    logging.getLogger("mcp.server.streamable_http").addFilter(_EndedSessionFilter())
    uvicorn.run(http_app(server_url, token, results), host=host, port=port, log_level="warning")


def token_from_env() -> str | None:
    """The bearer token for the server, from ``$VILA_M3_TOKEN`` (None when unset or empty)."""
    return os.environ.get(TOKEN_ENV, "").strip() or None
