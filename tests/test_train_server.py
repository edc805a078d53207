"""The ``vila_m3`` train task through a real MONAI Label server, and fine-tuning in two processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import requests
from server_harness import free_port, isolated_env, start_monailabel

from vila_m3.data.export import export_dataset
from vila_m3.models.manifest import ModelManifest
from vila_m3.samples.annotated import annotated_studies
from vila_m3.standins.tiny_vila import make_tiny_vila_checkpoint
from vila_m3.vlm.modeling import VilaForConditionalGeneration

pytestmark = pytest.mark.server
TRAIN = {"max_steps": 2, "batch_size": 1, "gradient_accumulation": 1, "gradient_checkpointing": False,
         "logging_steps": 1}


@pytest.fixture(scope="module")
def train_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("train-server")
    studies = annotated_studies(root / "studies", seeds=(0,), scratch=root / "samples")
    models = root / "models"
    vlm = ModelManifest.load()["vila_m3_8b"].location(models)
    make_tiny_vila_checkpoint(vlm, template="llama_3", image_size=14, num_shards=1)
    server = start_monailabel(root / "server", studies, conf={"models": "vila_m3", "models_dir": str(models)})
    try:
        yield server, models
    finally:
        server.stop()


def _wait_for_training(server, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = server.get("/train/", params={"all": "false"}).json()
        if status.get("status") in ("DONE", "ERROR"):
            return status
        time.sleep(2)
    raise AssertionError(f"training did not finish in {timeout_s} s:\n{server.log_tail()}")


def _turn(server, chat_id: str) -> dict:
    params = {"prompt": "What imaging modality is this?", "chat_id": chat_id, "slice_index": 30, "max_new_tokens": 4}
    response = requests.post(f"{server.url}/infer/vila_m3", params={"image": "ct_abdomen", "output": "json"},
                             data={"params": json.dumps(params)}, timeout=300)
    assert response.status_code == 200, response.text[:1000]
    return response.json()


def test_the_train_task_fine_tunes_registers_a_version_and_the_chat_serves_it(train_server):
    server, models = train_server
    info = server.get("/info/").json()
    assert "vila_m3" in info["trainers"]
    assert info["trainers"]["vila_m3"]["config"]["learning_rate"] == pytest.approx(2e-5)
    assert "local checkpoint" in _turn(server, "before")["vlm"]["name"]

    response = requests.post(f"{server.url}/train/vila_m3", json=TRAIN, timeout=30)
    assert response.status_code == 200, response.text
    status = _wait_for_training(server)
    assert status["status"] == "DONE", "\n".join(status.get("details", [])) + server.log_tail()
    assert any("step 2/2" in line for line in status["details"])  # progress reached /train/

    versions = server.get("/vila_m3/versions/").json()
    assert versions["current"] == "v0001" and versions["versions"][0]["steps"] == 2
    run = models / "finetuned" / "vila_m3_8b" / "v0001"
    record = json.loads((run / "model" / "training_record.json").read_text(encoding="utf-8"))
    assert record["data"]["manifest_sha256"] and record["metrics"]["train_records"] > 0
    assert "fine-tuned v0001" in _turn(server, "after")["vlm"]["name"]

    # the previous checkpoint is kept and an admin can switch back
    response = requests.put(f"{server.url}/vila_m3/versions/current", params={"version": "base"}, timeout=30)
    assert response.status_code == 200 and response.json()["current"] is None
    assert "local checkpoint" in _turn(server, "back")["vlm"]["name"]
    response = requests.put(f"{server.url}/vila_m3/versions/current", params={"version": "v0042"}, timeout=30)
    assert response.status_code == 422 and "unknown version" in response.text


def test_a_bad_train_request_is_refused_before_anything_starts(train_server):
    server, models = train_server
    before = server.get("/vila_m3/versions/").json()
    tasks = server.get("/train/", params={"all": "true"}).json()
    for options, fragment in (({"learning_rat": 1.0}, "train.learning_rat"), ({"max_steps": "abc"}, "train.max_steps"),
                              ({"batch_size": 0}, "batch_size must be > 0")):
        response = requests.post(f"{server.url}/train/vila_m3", json=options, timeout=30)
        assert response.status_code == 422 and fragment in response.json()["detail"], response.text
    assert server.get("/train/", params={"all": "true"}).json() == tasks  # no background task was started
    assert server.get("/vila_m3/versions/").json() == before


def test_fine_tuning_runs_in_two_processes(tmp_path):
    studies = annotated_studies(tmp_path / "studies", seeds=(0,), scratch=tmp_path / "samples")
    export = tmp_path / "export"
    export_dataset(studies, export, progress=False)
    base = make_tiny_vila_checkpoint(tmp_path / "base", template="vicuna_v1", image_size=14, num_shards=1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "vila_m3.cli", "train", "--base", str(base), "--data", str(export),
               "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "1", "--gradient-accumulation", "1",
               "--no-progress", "--no-gradient-checkpointing"]
    env = {**isolated_env(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "training_record.json").read_text(encoding="utf-8"))
    assert record["world_size"] == 2 and record["metrics"]["steps"] == 2
    VilaForConditionalGeneration.from_pretrained(tmp_path / "run" / "model")
    assert not os.path.exists(tmp_path / "run" / "model" / "adapter_config.json")
    shutil.rmtree(tmp_path / "samples")
