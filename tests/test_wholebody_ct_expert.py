"""The WholeBodyCT expert (MONAI's ``wholeBody_ct_segmentation`` bundle), added with nothing but its runner class,
its experts file and its stand-in writer:

- without ``configs/experts_wholebody_ct.yaml`` neither the registry nor the models manifest knows it, and no other
  file of the product names it;
- its stand-in has the real bundle's layout (two weights files, the 105 channel names in metadata.json);
- on a small synthetic CT the runner gives, voxel for voxel, what the bundle's own transforms, inferer and
  post-processing give (read from its inference.json, with the file loader), on the CT's exact grid, with the 3.0 mm
  model on the CPU;
- a real server started with ``--conf experts_file`` lists it in ``/info/`` and the model card, runs it from
  ``/infer/wholebodyct`` and from a chat whose scripted VLM writes ``<WholeBodyCT()>``; it is a tool of the chat's
  tool list and of ``vila-m3 mcp``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from fake_openai_server import FakeOpenAIServer, sse
from server_harness import RunningServer, start_monailabel
from test_chat_server import ask, expected_feedback, parts
from test_expert_tasks_server import infer, labelmap_from, multipart
from test_mcp_server import FIXED, as_json, over_stdio

from vila_m3.configs import config_path
from vila_m3.experts.bundle import image_from_arrays
from vila_m3.experts.registry import EXPERTS_ENV, ExpertRegistry
from vila_m3.experts.tools import expert_tools
from vila_m3.experts.wholebody_ct import WholeBodyCTRunner
from vila_m3.imaging import Geometry, Volume, read_volume
from vila_m3.models.manifest import ModelManifest
from vila_m3.serve import experts_env
from vila_m3.standins.stand_ins import stage_stand_ins
from vila_m3.standins.wholebody_ct import MODEL_ID, STAND_IN_FILTERS

NAME, TASK, TOOL = "WholeBodyCT", "wholebodyct", "segment_whole_body_ct"
EXPERTS_FILE = config_path("experts_wholebody_ct.yaml")
REPO = Path(__file__).resolve().parents[1]
#: The only files of the product that may name this expert: its runner, its stand-in writer and its experts file.
OWN_FILES = {"src/vila_m3/experts/wholebody_ct.py", "src/vila_m3/standins/wholebody_ct.py",
             "configs/experts_wholebody_ct.yaml"}


def channel_names(bundle: Path) -> dict[int, str]:
    """metadata.json's output channel names, background left out."""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {int(k): v for k, v in channels.items() if int(k) != 0}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the stand-in staged where the experts file's manifest entry puts it."""
    root = tmp_path_factory.mktemp("wholebody-models")
    with experts_env((str(EXPERTS_FILE),)):
        stage_stand_ins(root, (MODEL_ID,))
    return root


@pytest.fixture(scope="module")
def bundle(models_dir: Path) -> Path:
    return models_dir / "bundles" / "wholeBody_ct_segmentation"


@pytest.fixture(scope="module")
def spec():
    return ExpertRegistry.from_config(experts_files=[EXPERTS_FILE]).get(NAME)


# ------------------------------------------------------------------------------------- nothing else knows it


def test_without_its_experts_file_the_product_knows_nothing_of_it(monkeypatch):
    monkeypatch.delenv(EXPERTS_ENV, raising=False)
    assert not ExpertRegistry.from_config().is_configured(NAME)
    assert MODEL_ID not in ModelManifest.load().entries
    with experts_env((str(EXPERTS_FILE),)):
        assert ExpertRegistry.from_config().is_configured(NAME)
        assert ModelManifest.load()[MODEL_ID].path == "bundles/wholeBody_ct_segmentation"

    pattern = re.compile(r"wholebody|whole_body|whole body ct", re.IGNORECASE)
    naming = {str(path.relative_to(REPO)) for folder in ("src", "apps", "configs", "slicer_extension", "web")
              for path in (REPO / folder).rglob("*") if path.is_file() and path.suffix in {".py", ".yaml", ".json"}
              and pattern.search(path.read_text(encoding="utf-8", errors="replace"))}
    assert naming == OWN_FILES


def test_an_experts_file_may_not_redefine_a_model_of_the_manifest(tmp_path):
    other = tmp_path / "site_experts.yaml"
    other.write_text("models:\n  vista3d: {kind: monai_bundle, path: elsewhere}\nexperts: []\n", encoding="utf-8")
    with experts_env((str(other),)), pytest.raises(ValueError, match="site_experts.yaml: model id 'vista3d'"):
        ModelManifest.load()


# ----------------------------------------------------------------------------------------------- stand-in


def test_the_stand_in_has_the_real_bundle_layout_and_is_marked(bundle, spec):
    files = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert {"configs/inference.json", "configs/metadata.json", "models/model.pt", "models/model_lowres.pt"} <= files
    inference = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert inference["network_def"]["_target_"] == "SegResNet" and inference["network_def"]["out_channels"] == 105
    assert inference["network_def"]["init_filters"] == STAND_IN_FILTERS  # fewer than the real 32, declared here
    assert inference["displayable_configs"]["highres"] is True
    meta = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert "random" in meta["vila_m3_stand_in"] and meta["version"] == "0.2.5"
    names = channel_names(bundle)
    assert len(names) == 104 and names[1] == "spleen" and names[104] == "urinary_bladder"
    assert names == dict(spec.labels)  # the experts file's labels are the bundle's channel names
    high = torch.load(bundle / "models" / "model.pt", weights_only=True)
    low = torch.load(bundle / "models" / "model_lowres.pt", weights_only=True)
    assert high.keys() == low.keys() and not torch.equal(high["conv_final.2.conv.weight"],
                                                         low["conv_final.2.conv.weight"])


# ------------------------------------------------------------------------------------------------- runner


def small_ct(path: Path) -> Volume:
    """A 48 × 40 × 20 voxel CT (0.9 × 1.1 × 4 mm, tilted about z) with a body, an organ and a bone; also written to
    ``path`` (NIfTI) for the bundle's own loader."""
    z, y, x = np.mgrid[0:20, 0:40, 0:48]
    body = ((x - 24) / 20.0) ** 2 + ((y - 20) / 16.0) ** 2 < 1
    hu = np.where(body, 40, -1000).astype(np.int16)
    hu[((x - 18) / 6.0) ** 2 + ((y - 22) / 5.0) ** 2 + ((z - 10) / 6.0) ** 2 < 1] = 90
    hu[((x - 30) ** 2 + (y - 14) ** 2 < 9)] = 700
    angle = np.deg2rad(12.0)
    direction = ((np.cos(angle), -np.sin(angle), 0.0), (np.sin(angle), np.cos(angle), 0.0), (0.0, 0.0, 1.0))
    geometry = Geometry(spacing=(0.9, 1.1, 4.0), origin=(-20.0, 15.0, -40.0), direction=direction, shape=(48, 40, 20))
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(tuple(np.asarray(direction).ravel()))
    sitk.WriteImage(image, str(path))
    return read_volume(path)


def bundle_own_labels(bundle: Path, image: Path | Any) -> np.ndarray:
    """The bundle's own pipeline from its inference.json (highres off, as on a CPU): its preprocessing (with
    LoadImaged when ``image`` is a file; without it for an image already loaded), its SlidingWindowInferer, its
    post-processing (soft-max, arg-max, Invertd) without the writer; the labels (z, y, x)."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["displayable_configs#highres"] = False
    parser["device"] = "$torch.device('cpu')"
    parser["inferer#device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / parser.get_parsed_content("modelname"), weights_only=True))
    network.eval()
    preprocessing = parser.get_parsed_content("preprocessing")
    if not isinstance(image, Path):
        preprocessing = Compose([t for t in preprocessing.transforms if type(t).__name__ != "LoadImaged"])
    data = preprocessing({"image": str(image) if isinstance(image, Path) else image})
    with torch.no_grad():
        data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], network)[0]
    post = parser.get_parsed_content("postprocessing")
    post.transforms[2].transform = preprocessing  # Invertd: the preprocessing this image went through
    out = Compose([t for t in post.transforms if type(t).__name__ != "SaveImaged"])(data)["pred"]
    return np.asarray(out[0]).transpose(2, 1, 0).round().astype(np.uint8)


def test_the_runner_gives_the_bundles_own_labels_on_the_cts_grid(bundle, spec, tmp_path):
    ct = small_ct(tmp_path / "ct.nii.gz")
    runner = WholeBodyCTRunner(bundle, device="cpu", spec=spec)
    assert runner.checkpoint == "models/model_lowres.pt" and runner.bundle.get("pixdim") == [3.0, 3.0, 3.0]
    low = torch.load(bundle / "models" / "model_lowres.pt", weights_only=True)
    result = runner.run(ct)
    assert torch.equal(runner._network.get().state_dict()["conv_final.2.conv.weight"], low["conv_final.2.conv.weight"])

    assert result.labels.geometry.allclose(ct.geometry, atol=1e-4)
    assert result.labels.array.shape == ct.array.shape
    assert result.labels.array.dtype == np.uint8 and int(result.labels.array.max()) <= 104
    assert len(np.unique(result.labels.array)) > 1  # random weights still label some voxels
    assert result.label_names == channel_names(bundle)
    assert result.expert == NAME and result.argument is None
    assert result.stand_in is True and "random" in result.stand_in_note
    # the bundle's own inferer and post-processing on the same image in memory: the same labels, voxel for voxel
    in_memory = image_from_arrays([ct.array], ct.geometry)
    assert np.array_equal(result.labels.array, bundle_own_labels(bundle, in_memory))
    # and with the bundle's own file loader (nibabel reads the NIfTI affine ~1e-6 mm apart from SimpleITK, which may
    # move a plane of nearest-neighbour choices)
    from_file = bundle_own_labels(bundle, tmp_path / "ct.nii.gz")
    assert np.mean(result.labels.array == from_file) > 0.99


def test_on_a_gpu_it_takes_the_high_resolution_model(bundle, spec):
    runner = WholeBodyCTRunner(bundle, device="cpu", spec=spec, highres=True)  # as on CUDA, without loading it
    assert runner.checkpoint == "models/model.pt" and runner.bundle.get("pixdim") == [1.5, 1.5, 1.5]
    assert WholeBodyCTRunner(bundle, device="cuda", spec=spec).highres is True


def test_it_is_a_tool_of_the_chat_that_takes_no_argument(spec):
    registry = ExpertRegistry.from_config(experts_files=[EXPERTS_FILE])
    tools = {tool["function"]["name"]: tool["function"] for tool in expert_tools(registry)}
    assert list(tools)[-1] == NAME  # after experts.yaml's, as in the card
    assert spec.overview in tools[NAME]["description"]
    assert tools[NAME]["parameters"] == {"type": "object", "properties": {}, "additionalProperties": False}


# ------------------------------------------------------------------------------------------------- server

LINE_START = f"<{NAME}(args)> Modality: CT, Task: segmentation, Overview: "


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, models_dir: Path,
           fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("wholebody-server")
    studies = root / "studies"
    shutil.copytree(sample_data / "studies", studies)
    conf = {"models": f"vila_m3,{TASK}", "experts_file": str(EXPERTS_FILE), "vlm_url": fake_vlm.url,
            "vlm_model": "fake-vila-m3", "chats_dir": str(root / "chats"), "models_dir": str(models_dir)}
    running = start_monailabel(root / "server", studies, conf=conf)
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.server
def test_the_server_lists_it_and_runs_it_from_infer(server, sample_data, tmp_path):
    models = server.get("/info/").json()["models"]
    assert set(models) == {"vila_m3", TASK}
    assert models[TASK]["type"] == "segmentation" and len(models[TASK]["labels"]) == 104
    assert models[TASK]["labels"]["liver"] == 5

    answer, data = multipart(infer(server, TASK, "ct_abdomen"))
    labels = labelmap_from(data, tmp_path)
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert labels.geometry.allclose(ct.geometry, atol=1e-4)
    assert 0 < int(labels.array.max()) <= 104
    assert answer["expert"] == NAME and answer["stand_in"] is True
    assert len(answer["label_names"]) == 104 and answer["label_names"]["urinary_bladder"] == 104


@pytest.mark.server
def test_a_chat_runs_it_from_the_models_trigger(server, fake_vlm, sample_data, tmp_path):
    fake_vlm.script(sse(["Let me segment the body. ", f"<{NAME}()>"]), sse(["These are the organs."]))
    before = len(fake_vlm.posts)
    question = "Which structures are on this slice?"
    answer, label_bytes = parts(ask(server, {"prompt": question, "chat_id": "wholebody-1", "slice_index": 30}))

    card = answer["transcript"][0]["text"]
    assert LINE_START in card
    sent = fake_vlm.posts[before].body["messages"][0]["content"]
    assert any(part.get("type") == "text" and LINE_START in part["text"] for part in sent)
    assert [m["role"] for m in answer["transcript"]] == ["user", "assistant", "expert", "assistant"]
    assert answer["experts"][0]["expert"] == NAME and answer["answer"] == "These are the organs."
    assert answer["notices"] == [f"{NAME} ran on stand-in weights (tiny random weights for tests; not a medical "
                                 "model): its result is not a medical model's"]  # announced with the answer

    labels = labelmap_from(label_bytes, tmp_path)
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert labels.geometry.allclose(ct.geometry, atol=1e-4)
    assert answer["transcript"][2]["text"] == expected_feedback(labels, "axial", 30, answer["label_names"], question)


@pytest.mark.server
def test_the_mcp_server_has_it_as_a_tool(server, sample_data, tmp_path, monkeypatch):
    monkeypatch.setenv(EXPERTS_ENV, str(EXPERTS_FILE))

    async def use(session) -> tuple[Any, ...]:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        result = as_json(await session.call_tool(TOOL, {"study": "ct_abdomen"}))
        return tools, result

    tools, result = over_stdio(server, tmp_path, use)
    assert set(tools) == FIXED | {TOOL}
    assert "argument" not in tools[TOOL].inputSchema.get("properties", {})
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert result["expert"] == NAME and result["stand_in"] is True
    assert result["geometry"]["shape"] == list(ct.geometry.shape)
    assert all(0 < item["id"] <= 104 for item in result["labels_found"])
