"""The MONAI Label app on the sample studies, through a real server, and the run command's checks."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from server_harness import REPO_ROOT, copy_app, free_port, isolated_env, start_monailabel, start_process

from vila_m3.samples import CT_ID, CXR_ID, MRI_ID, MRI_SEQUENCES

pytestmark = pytest.mark.server

EXPECTED_IMAGES = {CT_ID, CXR_ID, *(f"{MRI_ID}_{sequence}" for sequence in MRI_SEQUENCES)}


def test_info_names_the_app_and_lists_no_task_without_weights(sample_server):
    info = sample_server.get("/info/").json()
    assert info["name"] == "VILA-M3"
    assert info["version"] == "0.1.0"
    assert info["models"] == {}, "no weights are staged, so no infer task may be registered"
    assert info["datastore"]["total"] == len(EXPECTED_IMAGES)


def test_datastore_lists_every_sample_study(sample_server):
    listing = sample_server.get("/datastore/", params={"output": "all"}).json()
    assert set(listing["objects"]) == EXPECTED_IMAGES
    ct = listing["objects"][CT_ID]["image"]
    assert ct["ext"] == ".nii.gz"


def test_datastore_serves_the_image_bytes_unchanged(sample_server, sample_data):
    response = sample_server.get("/datastore/image", params={"image": CT_ID})
    assert response.status_code == 200
    assert response.content == (sample_data / "studies" / f"{CT_ID}.nii.gz").read_bytes()


def test_server_log_says_why_each_task_is_unavailable(sample_server):
    log = sample_server.log_path.read_text(encoding="utf-8")
    for task in ("vila_m3", "vista3d", "brats", "cxr"):
        assert re.search(rf"^\s+{task}\s+not available: weights not found: ", log, re.MULTILINE), task


def test_unknown_model_name_stops_the_app_with_the_valid_names(tmp_path, sample_data):
    """Started directly with monailabel, an unknown task name fails app start with a message listing valid names."""
    studies = tmp_path / "studies"
    shutil.copytree(sample_data / "studies", studies)
    with pytest.raises(RuntimeError) as failure:
        server = start_monailabel(tmp_path / "work", studies, conf={"models": "vista3d,segment_anything"})
        server.stop()
    message = str(failure.value)
    assert "unknown model 'segment_anything' in --conf models; valid names are: all, vila_m3, vista3d, brats, cxr" in message


# --- `vila-m3 serve`, which `make run` calls -------------------------------------------------------


def run_serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "vila_m3.cli", "serve", "--models-dir", str(tmp_path / "models"), *args]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120, env=isolated_env(tmp_path))


def assert_one_clear_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_serve_refuses_a_studies_folder_that_does_not_exist(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = run_serve(tmp_path, "--studies", str(missing), "--port", str(free_port()))
    assert_one_clear_line(result, "studies folder", str(missing), "does not exist")
    assert not missing.exists(), "the missing folder must not be created"


def test_serve_refuses_a_port_in_use(tmp_path, sample_data):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_serve(tmp_path, "--studies", str(sample_data / "studies"), "--port", str(port))
    assert_one_clear_line(result, f"port {port}", "already in use")


def test_serve_refuses_an_unknown_model_name(tmp_path, sample_data):
    result = run_serve(tmp_path, "--studies", str(sample_data / "studies"), "--port", str(free_port()),
                       "models", "vista3d,sam2")
    assert_one_clear_line(result, "unknown model 'sam2'", "valid names are: all, vila_m3, vista3d, brats, cxr")


def test_serve_refuses_an_unpaired_conf_value(tmp_path, sample_data):
    result = run_serve(tmp_path, "--studies", str(sample_data / "studies"), "--port", str(free_port()), "models")
    assert_one_clear_line(result, "KEY VALUE pairs", "'models' has no value")


def test_serve_check_reports_tasks_and_how_to_find_the_weights(tmp_path, sample_data):
    result = run_serve(tmp_path, "--studies", str(sample_data / "studies"), "--port", str(free_port()), "--check")
    assert result.returncode == 0, result.stderr
    assert "VILA-M3 MONAI Label server on http://127.0.0.1:" in result.stdout
    assert "Infer tasks (0 of 4 available)" in result.stdout
    assert "brats    not available: weights not found" in result.stdout
    assert "vila-m3 models list" in result.stdout


def make_run_command(tmp_path: Path, port: int, *settings: str) -> list[str]:
    """``make run`` with every path pointed into ``tmp_path`` (a copy of the app included), plus ``settings``."""
    app = copy_app(tmp_path / "app")
    return ["make", "--no-print-directory", "-C", str(REPO_ROOT), "run", f"PORT={port}",
            f"SAMPLES={tmp_path / 'samples'}", f"MODELS_DIR={tmp_path / 'models'}", f"APP={app}", "WEB=no", *settings]


def test_make_run_serves_the_sample_studies_on_the_demo_model(tmp_path):
    """The README's run command on a machine with no weights, every path pointed into tmp_path: it builds
    the demo model (here with the shortened test recipe), stages expert stand-ins, and serves every task
    and the datastore, each stand-in labelled."""
    port = free_port()
    command = make_run_command(tmp_path, port, f"DEMO_RECIPE={REPO_ROOT / 'tests' / 'data' / 'demo_quick.yaml'}")
    # the samples, the demo build and the stand-ins come before the server: more time than a bare start
    server = start_process(command, tmp_path, isolated_env(tmp_path), f"http://127.0.0.1:{port}", timeout_s=600)
    try:
        listing = requests.get(f"{server.url}/datastore/", params={"output": "all"}, timeout=30).json()
        assert set(listing["objects"]) == EXPECTED_IMAGES
        info = requests.get(f"{server.url}/info/", timeout=30).json()
        assert set(info["models"]) == {"vila_m3", "vista3d", "brats", "cxr"}
        log = server.log_path.read_text(encoding="utf-8")
        assert f"VILA-M3 MONAI Label server on http://127.0.0.1:{port}" in log
        assert "Sample studies (synthetic phantoms, seed 0)" in log
        assert "demo model built in" in log and "tiny RANDOM stand-in weights" in log
        assert "vista3d: tiny stand-in trained on synthetic phantom CTs" in log
        assert "Infer tasks (4 of 4 available)" in log
    finally:
        server.stop()


def test_make_run_with_demo_no_stages_nothing(tmp_path):
    """``make run DEMO=no`` serves the sample studies at once and stages nothing in the models directory."""
    port = free_port()
    models = tmp_path / "models"
    command = make_run_command(tmp_path, port, "DEMO=no")
    server = start_process(command, tmp_path, isolated_env(tmp_path), f"http://127.0.0.1:{port}")
    try:
        info = requests.get(f"{server.url}/info/", timeout=30).json()
        assert info["models"] == {} and info["datastore"]["total"] == len(EXPECTED_IMAGES)
        assert "Infer tasks (0 of 4 available)" in server.log_path.read_text(encoding="utf-8")
        assert not models.exists() or not any(models.iterdir())
    finally:
        server.stop()


def test_an_admin_exports_training_conversations_from_the_running_server(sample_server, sample_data):
    """The data engine's route: a final label saved through MONAI Label becomes training records."""
    label = sample_data / "ground_truth" / f"{CT_ID}.nii.gz"
    with label.open("rb") as stream:
        saved = requests.put(f"{sample_server.url}/datastore/label", params={"image": CT_ID, "tag": "final"},
                             files={"label": (label.name, stream)}, timeout=60)
    assert saved.status_code == 200, saved.text[:300]
    response = requests.post(f"{sample_server.url}/vila_m3/datagen/", params={"name": "round1", "seed": 0}, timeout=300)
    assert response.status_code == 200, response.text[:500]
    result = response.json()
    assert result["out_dir"] == "round1" and result["privacy"]["passed"] is True  # a name, not a server path
    export = sample_server.log_path.parent / "app" / "datagen" / "round1"
    assert str(sample_server.log_path.parent) not in response.text
    manifest = json.loads((export / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"] == "studies" and str(sample_server.log_path.parent) not in json.dumps(manifest)
    train = json.loads((export / "train.json").read_text(encoding="utf-8"))
    val = json.loads((export / "val.json").read_text(encoding="utf-8"))
    assert any("<VISTA3D(hepatic tumor)>" in turn["value"] for record in train + val for turn in record["conversations"])
    bad = requests.post(f"{sample_server.url}/vila_m3/datagen/", params={"name": "../escape"}, timeout=60)
    assert bad.status_code == 422
