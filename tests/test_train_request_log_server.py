"""``POST /train/vila_m3`` on a real server with a tiny local chat VLM: MONAI Label logs the whole train request,
puts it on the background process's command line and shows it in ``GET /train/``, so the route hands it only
the request rebuilt from validated fields; a field outside its allowed values or pattern is answered 422 naming
the field, and its value reaches no log."""

from __future__ import annotations

import time

import pytest
import requests
from server_harness import start_monailabel

from vila_m3.models.manifest import ModelManifest
from vila_m3.samples.annotated import annotated_studies
from vila_m3.standins.tiny_vila import make_tiny_vila_checkpoint

pytestmark = [pytest.mark.server, pytest.mark.security]

SECRET = "Jane-Roe-19840312"  # typed into a field; must reach neither the server log nor GET /train/
TRAIN = {"max_steps": 1, "batch_size": 1, "gradient_accumulation": 1, "gradient_checkpointing": False,
         "logging_steps": 1}
#: every text field a valid request may hold, each from its list or pattern
VALID = {**TRAIN, "name": "run_7", "dataset": "CacheDataset", "gpus": "0", "parts": "llm,projector",
         "lr_scheduler": "constant", "precision": "auto", "device": "cpu", "model": "vila_m3", "activate": "false"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("train-log-server")
    studies = annotated_studies(root / "studies", seeds=(0,), scratch=root / "samples")
    models = root / "models"
    make_tiny_vila_checkpoint(ModelManifest.load()["vila_m3_8b"].location(models), template="llama_3",
                              image_size=14, num_shards=1)
    running = start_monailabel(root / "server", studies, conf={"models": "vila_m3", "models_dir": str(models)})
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("field, value, fragment", [
    ("name", f"train {SECRET}", "train.name: must be a run name"),
    ("dataset", SECRET, "train.dataset: must be 'Dataset'"),
    ("gpus", f"0,{SECRET}", "train.gpus: must be 'all' or a comma list of GPU indices"),
    ("lr_scheduler", SECRET, "train.lr_scheduler: must be"),
    ("parts", f"llm,{SECRET}", "train.parts: must be a comma list"),
    ("model", SECRET, "train.model: must be 'vila_m3'"),
    ("lora", {"r": SECRET}, "train.lora.r"),
    (SECRET, 1, "is not a known field"),
])
def test_a_field_outside_its_values_is_refused_naming_it(server, field, value, fragment):
    response = requests.post(f"{server.url}/train/vila_m3", json={**TRAIN, field: value}, timeout=30)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["detail"] and SECRET not in response.json()["detail"].replace(
        f"train.{SECRET}", ""), response.text


def test_another_model_is_refused_naming_the_model(server):
    response = requests.post(f"{server.url}/train/segmentation", json=TRAIN, timeout=30)
    assert response.status_code == 422 and response.json()["detail"].startswith("model: not a train task"), \
        response.text


def test_the_log_and_the_train_status_hold_only_validated_fields(server):
    """After the refusals above, one valid request with every text field: what MONAI Label logged and shows
    is exactly the validated request (the flag as a boolean), and the refused values are nowhere."""
    response = requests.post(f"{server.url}/train/vila_m3", json=VALID, timeout=30)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 600
    while (status := server.get("/train/").json()).get("status") not in ("DONE", "ERROR"):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(2)
    request = status["request"]
    config = server.get("/info/").json()["trainers"]["vila_m3"]["config"]
    # the request is the task's defaults overlaid with the validated fields, nothing else
    assert set(request) <= set(config) | set(VALID), sorted(set(request) - set(config) - set(VALID))
    # (MONAI Label hands gpus to the background process as CUDA_VISIBLE_DEVICES and shows "all")
    assert {key: request[key] for key in VALID} == {**VALID, "activate": False, "gpus": "all"}
    logged = server.log_path.read_text(encoding="utf-8", errors="replace")
    assert "Train request: {" in logged and "'name': 'run_7'" in logged  # MONAI Label's line, with checked values
    assert SECRET not in logged
    assert SECRET not in str(server.get("/train/", params={"all": "true"}).json())
