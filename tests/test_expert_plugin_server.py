"""Adding an expert without changing the repository: a toy runner class and its experts file in a temporary
folder, given to a real MONAI Label server with ``--conf experts_file``. The toy is in the model card, is an
infer task of ``/info/``, runs from ``/infer/toy`` and from a chat turn whose (scripted) VLM writes
``<TOY(bone)>``; its labelmap is checked against the threshold computed here."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from expert_plugin import TOY_NAME, TOY_OVERVIEW, expected_toy_labels, write_toy_expert
from fake_openai_server import FakeOpenAIServer, sse
from server_harness import RunningServer, start_monailabel
from test_chat_server import ask, expected_feedback, parts
from test_expert_runner import FOOTER, TOY_LINE
from test_expert_tasks_server import infer, labelmap_from, multipart

from vila_m3.imaging import read_labelmap, read_volume

pytestmark = pytest.mark.server

HEADER = "Here is a list of available expert models:\n"


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
               fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("toy-server")
    experts_file = write_toy_expert(root / "site")  # outside the repository and the app
    studies = root / "studies"
    shutil.copytree(sample_data / "studies", studies)
    conf = {"models": "vila_m3,toy", "experts_file": str(experts_file), "vlm_url": fake_vlm.url,
            "vlm_model": "fake-vila-m3", "chats_dir": str(root / "chats"), "models_dir": str(root / "models")}
    server = start_monailabel(root / "server", studies, conf=conf)
    try:
        yield server
    finally:
        server.stop()


def test_info_lists_the_toy_as_an_infer_task(toy_server):
    models = toy_server.get("/info/").json()["models"]
    assert set(models) == {"vila_m3", "toy"}
    assert models["toy"]["type"] == "segmentation" and models["toy"]["dimension"] == 3
    assert models["toy"]["labels"] == {"bone": 1, "air": 2}
    assert models["toy"]["description"] == f"{TOY_NAME}: {TOY_OVERVIEW}"


def test_infer_toy_returns_the_threshold_labelmap_on_the_ct_grid(toy_server, sample_data, tmp_path):
    answer, data = multipart(infer(toy_server, "toy", "ct_abdomen", {"argument": "air"}))
    labels = labelmap_from(data, tmp_path)
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert labels.geometry.allclose(ct.geometry, atol=1e-4)
    assert np.array_equal(labels.array, expected_toy_labels(ct.array, "air"))
    assert answer["label_names"] == {"air": 2} and answer["argument"] == "air"
    assert answer["expert"] == TOY_NAME and answer["stand_in"] is False and answer["cached"] is False


def test_infer_toy_refuses_an_argument_it_does_not_take(toy_server):
    response = infer(toy_server, "toy", "ct_abdomen", {"argument": "lung"})
    assert response.status_code == 422, response.text[:300]
    assert "'lung'" in response.json()["detail"] and "'bone', 'air'" in response.json()["detail"]


def test_a_chat_turn_runs_the_toy_from_the_models_trigger(toy_server, fake_vlm, sample_data, tmp_path):
    fake_vlm.script(sse(["Let me mark the bone. ", "<TOY(bone)>"]), sse(["The bone is marked."]))
    before = len(fake_vlm.posts)
    question = "Where is the bone?"
    answer, label_bytes = parts(ask(toy_server, {"prompt": question, "chat_id": "toy-1", "slice_index": 30}))

    assert answer["answer"] == "The bone is marked."
    card = answer["transcript"][0]["text"]
    assert card.startswith(HEADER + TOY_LINE + FOOTER + "<image>This is a CT image.\n")
    sent = fake_vlm.posts[before].body["messages"][0]["content"]
    assert any(part.get("type") == "text" and TOY_LINE in part["text"] for part in sent)  # the model saw it
    assert [m["role"] for m in answer["transcript"]] == ["user", "assistant", "expert", "assistant"]
    assert answer["experts"][0]["expert"] == TOY_NAME and answer["experts"][0]["argument"] == "bone"
    assert answer["label_names"] == {"bone": 1}

    path = tmp_path / "labels.nii.gz"
    path.write_bytes(label_bytes)
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    labels = read_labelmap(path)
    assert labels.geometry.allclose(ct.geometry, atol=1e-4)
    assert np.array_equal(labels.array, expected_toy_labels(ct.array, "bone"))
    assert answer["transcript"][2]["text"] == expected_feedback(labels, "axial", 30, {"bone": 1}, question)
