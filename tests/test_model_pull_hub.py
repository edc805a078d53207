"""Pulling real weights without the internet: the Hugging Face path against a hub stand-in on 127.0.0.1
(tests/hf_hub_server.py, the hub's API and layout), and `make run MODELS=real` up to the server's plan,
with a manifest whose sources are local servers."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hf_hub_server import HubRepo, HubServer, start_hub
from server_harness import free_port, isolated_env
from test_model_staging import BUNDLE_FILES, bundle_zip, file_server  # noqa: F401  (file_server: a fixture)

from vila_m3.configs import DEFAULT_CONFIG_DIR
from vila_m3.models.manifest import ModelManifest
from vila_m3.models.staging import PULL_RECORD, StagingError, pull, verify
from vila_m3.serve import REAL_WEIGHTS_HINT

REPO_ROOT = Path(__file__).resolve().parents[1]
VILA_3B_REPO = "MONAI/Llama3-VILA-M3-3B"


@pytest.fixture(scope="module")
def tiny_vila(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VILA checkpoint folder in the released layout (sharded LLM, tokenizer.model, vision tower,
    projector), written as real weights (no stand-in note), as the hub would serve it."""
    from vila_m3.standins.tiny_vila import make_tiny_vila_checkpoint

    return make_tiny_vila_checkpoint(tmp_path_factory.mktemp("hub") / "vila3b", template="vicuna_v1", note="")


def source_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def hub(tiny_vila: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    from huggingface_hub import constants

    server = start_hub({VILA_3B_REPO: HubRepo.from_folder(tiny_vila)})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the pull asks for the network on purpose
    try:
        yield server
    finally:
        server.stop()


def vila_entry():
    return ModelManifest.load()["vila_m3_3b"]  # the product's own entry: MONAI/Llama3-VILA-M3-3B @ main


def test_huggingface_pull_fetches_the_hub_layout_records_checksums_and_a_second_pull_fetches_nothing(
        hub, tiny_vila, tmp_path):
    models = tmp_path / "models"
    entry = vila_entry()
    assert verify(entry, models).state == "not staged"

    report = pull(entry, models)

    assert report.state == "ready" and report.downloaded
    staged = models / "vila/Llama3-VILA-M3-3B"
    expected = source_files(tiny_vila)
    assert {"config.json", "llm/model-00001-of-00002.safetensors", "llm/tokenizer.model",
            "vision_tower/model.safetensors", "mm_projector/model.safetensors"} <= set(expected)
    for name, data in expected.items():
        assert (staged / name).read_bytes() == data, name
    record = json.loads((staged / PULL_RECORD).read_text(encoding="utf-8"))
    assert record["commit"] == hub.repos[VILA_3B_REPO].commit
    assert record["sha256"] == {name: hashlib.sha256(data).hexdigest() for name, data in expected.items()}
    # the weights went through the hub's LFS redirect to its CDN, the small files straight from /resolve
    assert ("GET", f"/api/models/{VILA_3B_REPO}/revision/main") in hub.requests
    assert any(method == "GET" and path.startswith("cdn:/blobs/") for method, path in hub.requests)
    assert ("GET", f"/{VILA_3B_REPO}/resolve/{record['commit']}/config.json") in hub.requests
    assert verify(entry, models).state == "ready"

    seen = len(hub.requests)
    again = pull(entry, models)
    assert again.state == "ready" and not again.downloaded
    assert hub.requests[seen:] == [], "a verified model is not asked for again"

    (staged / "llm/model-00002-of-00002.safetensors").write_bytes(b"0" * 10)
    assert verify(entry, models).state == "corrupt"


def test_a_download_that_differs_from_the_hubs_checksum_is_refused(hub, tiny_vila, tmp_path):
    repo = hub.repos[VILA_3B_REPO]
    original = repo.files["vision_tower/model.safetensors"]
    repo.cdn_tampered["vision_tower/model.safetensors"] = bytes(len(original))  # same size, other bytes
    with pytest.raises(StagingError) as failure:
        pull(vila_entry(), tmp_path / "models")
    message = str(failure.value)
    assert "\n" not in message
    assert "files differ from the hub's checksums" in message and "vision_tower/model.safetensors" in message
    assert not (tmp_path / "models" / "vila/Llama3-VILA-M3-3B" / PULL_RECORD).exists()


def test_an_unknown_repository_fails_in_one_line_naming_the_repo(hub, tmp_path):
    entry = ModelManifest.load({"models": {"vila_m3_3b": {
        "kind": "vila_checkpoint", "source": {"hub": "huggingface", "repo": "MONAI/not-there", "revision": "main"},
        "path": "vila/x", "required": ["config.json"]}}})["vila_m3_3b"]
    with pytest.raises(StagingError) as failure:
        pull(entry, tmp_path / "models")
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("cannot download vila_m3_3b from huggingface MONAI/not-there@main")


def test_url_downloads_show_the_file_its_size_and_the_elapsed_and_remaining_time(file_server, tmp_path, capsys):  # noqa: F811
    base_url, www = file_server
    (www / "a-best.pt").write_bytes(b"x" * 3_000_000)
    entry = ModelManifest.load({"models": {"xrv_a": {
        "kind": "xrv_weights", "source": {"hub": "url", "url": f"{base_url}/a-best.pt"},
        "path": "torchxrayvision/a-best.pt"}}})["xrv_a"]
    assert pull(entry, tmp_path / "models").downloaded
    err = capsys.readouterr().err  # not a terminal: plain lines (a bar on a terminal); the file server logs too
    lines = [line for line in err.splitlines() if line.startswith("Downloading")]
    assert lines[0] == "Downloading xrv_a (a-best.pt): 3 MB to go"
    assert re.fullmatch(r"Downloading xrv_a \(a-best\.pt\): 1/3 MB, \d+ s elapsed, ~\d+ s left", lines[1]), lines
    assert re.fullmatch(r"Downloading xrv_a \(a-best\.pt\): 3/3 MB, \d+ s elapsed, done", lines[-1]), lines


# --- `make run MODELS=real`: the Makefile's own commands, against local servers -------------------------

def local_configs(tmp_path: Path, files_url: str, www: Path) -> Path:
    """A copy of configs/ whose models.yaml downloads from the local file server (bundles as zips, the
    TorchXRayVision files as small stand-in bytes); the Hugging Face models come from $HF_ENDPOINT."""
    configs = tmp_path / "configs"
    shutil.copytree(DEFAULT_CONFIG_DIR, configs)
    manifest = yaml.safe_load((configs / "models.yaml").read_text(encoding="utf-8"))
    for model_id, spec in manifest["models"].items():
        source = spec["source"]
        if "url" not in source:
            continue
        name = source["url"].rsplit("/", 1)[1]
        source["url"] = f"{files_url}/{name}"
        if source.get("archive") == "zip":
            (www / name).write_bytes(bundle_zip(BUNDLE_FILES, top=source["name"]))
        else:
            (www / name).write_bytes(f"{model_id} weights".encode())
    (configs / "models.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return configs


def test_pull_real_replaces_the_demos_stand_ins_and_leaves_none_of_their_files(
        hub, tiny_vila, file_server, tmp_path, monkeypatch):  # noqa: F811
    from vila_m3.cli import main
    from vila_m3.standins.stand_ins import stage_stand_ins
    from vila_m3.tasks import select_tasks, task_statuses

    files_url, www = file_server
    monkeypatch.setenv("VILA_M3_CONFIG_DIR", str(local_configs(tmp_path, files_url, www)))
    models = tmp_path / "models"
    stage_stand_ins(models, ("vila_m3", "vista3d", "cxr"), vlm_id="vila_m3_3b")  # what the demo leaves there
    manifest = ModelManifest.load()
    assert all(manifest[mid].is_stand_in(models) for mid in ("vila_m3_3b", "vista3d", "xrv_resnet50_res512_all"))

    assert main(["models", "pull", "--real", "--models-dir", str(models)]) == 0

    statuses = task_statuses(select_tasks("all"), models, vlm_id="vila_m3_3b")
    assert [(s.name, s.available, s.stand_in) for s in statuses] == [
        ("vila_m3", True, False), ("vista3d", True, False), ("brats", True, False), ("cxr", True, False)]
    assert not (models / "torchxrayvision" / "VILA_M3_STAND_IN.txt").exists()
    vila = models / "vila/Llama3-VILA-M3-3B"
    staged = {p.relative_to(vila).as_posix() for p in vila.rglob("*")
              if p.is_file() and ".cache" not in p.parts and p.name != PULL_RECORD}
    assert staged == set(source_files(tiny_vila)), "no file of the stand-in stays beside the real ones"
    assert {p.relative_to(models / "bundles/vista3d").as_posix() for p in (models / "bundles/vista3d").rglob("*")
            if p.is_file() and p.name != PULL_RECORD} == set(BUNDLE_FILES)
    for model_id in ("vila_m3_3b", "vista3d", "xrv_densenet121_res224_pc"):
        assert verify(manifest[model_id], models).state == "ready"


def make_run(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`make run ...` with the venv and the sample studies taken as made (-o), and `serve --check` (through
    CONF) so that it prints its plan instead of starting the server."""
    studies = tmp_path / "studies"
    studies.mkdir(exist_ok=True)
    command = ["make", "--no-print-directory", "-C", str(REPO_ROOT), "-o", ".venv/.installed", "-o", "samples",
               "run", f"MODELS_DIR={tmp_path / 'models'}", f"STUDIES={studies}", f"PORT={free_port()}",
               "CONF=--check", "WEB=no", *args]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=300, env=env)


def test_make_run_models_real_pulls_the_real_set_then_serves_it_without_the_demo(
        file_server, tiny_vila, tmp_path):  # noqa: F811
    files_url, www = file_server
    hub = start_hub({VILA_3B_REPO: HubRepo.from_folder(tiny_vila)})
    try:
        env = isolated_env(tmp_path)
        env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0",
                   VILA_M3_CONFIG_DIR=str(local_configs(tmp_path, files_url, www)))
        result = make_run(tmp_path, env, "MODELS=real")
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        real_set = ["vila_m3_3b", "vista3d", "brats_mri_segmentation"] + [
            mid for mid, entry in ModelManifest.load().entries.items() if entry.kind == "xrv_weights"]
        for model_id in real_set:
            assert f"{model_id}: ready at " in out and "(downloaded, checksums recorded)" in out, model_id
        assert "vila_m3_8b" not in out.split("Infer tasks")[0] and "vila_m3_13b" not in out
        summary = next(line for line in out.splitlines() if line.startswith("Staged "))
        assert summary.startswith(f"Staged {len(real_set)} models in {tmp_path / 'models'} (vila_m3_3b, vista3d, ")
        assert re.search(rf"\): 0\.0\d GB on disk; {len(real_set)} downloaded, 0 already there; took \d+ (s|min)", summary)
        assert "Serve them with: make run MODELS=real VLM=vila_m3_3b" in out
        # then the server's plan: every task on the real weights, the 3B chosen, no demo staged, no hint
        plan = out.split("Infer tasks", 1)[1]
        assert "(4 of 4 available)" in plan  # the chat task too: it runs the 3B (app.yaml's default is the 8B)
        assert "STAND-IN" not in plan
        assert REAL_WEIGHTS_HINT not in out
        assert not (tmp_path / "models" / ".demo-build").exists()
        assert not list((tmp_path / "models").rglob("VILA_M3_STAND_IN.txt"))
        assert "Downloading xrv_densenet121_res224_all" in result.stderr  # the bars go to stderr

        seen = len(hub.requests)
        again = make_run(tmp_path, env, "MODELS=real")
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"0 downloaded, {len(real_set)} already there" in again.stdout
        assert hub.requests[seen:] == []
    finally:
        hub.stop()


def test_plain_make_run_without_real_weights_says_in_one_line_how_to_get_them(tmp_path):
    env = isolated_env(tmp_path)
    result = make_run(tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines.count(REAL_WEIGHTS_HINT) == 1 and lines[-1] == REAL_WEIGHTS_HINT
    assert "make run MODELS=real" in REAL_WEIGHTS_HINT and "huggingface.co" in REAL_WEIGHTS_HINT

    from vila_m3.standins.stand_ins import stage_stand_ins

    stage_stand_ins(tmp_path / "models", ("brats",))  # stand-ins are no real weights: the line stays
    assert make_run(tmp_path, env).stdout.splitlines()[-1] == REAL_WEIGHTS_HINT

    xrv = tmp_path / "models" / "torchxrayvision"  # with real weights of any model, no such line
    xrv.mkdir(parents=True)
    (xrv / "pc-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt").write_bytes(b"weights")
    assert REAL_WEIGHTS_HINT not in make_run(tmp_path, env).stdout


def test_cli_pull_real_rejects_a_vlm_that_is_not_a_vila_checkpoint(tmp_path):
    result = subprocess.run([str(REPO_ROOT / ".venv/bin/vila-m3"), "models", "pull", "--real", "--vlm", "vista3d",
                             "--models-dir", str(tmp_path / "m")], capture_output=True, text=True,
                            env=isolated_env(tmp_path), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --vlm vista3d is not a VILA-M3 checkpoint of configs/models.yaml; "
                                     "valid ids are: vila_m3_3b, vila_m3_8b, vila_m3_13b")


def test_the_makefile_and_the_manifest_agree_on_the_default_real_vlm():
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    default = re.search(r"^VLM \?= (\S+)$", makefile, re.MULTILINE).group(1)
    assert default == yaml.safe_load((DEFAULT_CONFIG_DIR / "models.yaml").read_text(encoding="utf-8"))[
        "real_default_vlm"] == "vila_m3_3b"
