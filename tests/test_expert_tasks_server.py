"""The experts as MONAI Label infer tasks, through a real server with stand-in weights staged.

Covers datastore images and session uploads (NIfTI, NRRD, DICOM series), label names and geometry,
the result cache, MONAI Label's own Python client, and bad input (4xx, nothing saved).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient
from server_harness import RunningServer, multipart, start_monailabel

from vila_m3.imaging import read_labelmap, read_volume
from vila_m3.standins.stand_ins import stage_stand_ins

pytestmark = pytest.mark.server

HEPATIC = {"liver": 1, "hepatic tumor": 26}


@pytest.fixture(scope="module")
def expert_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Iterator[RunningServer]:
    """A server with stand-in VISTA3D, BRATS and CXR weights and a copy of the sample studies."""
    workdir = tmp_path_factory.mktemp("expert-server")
    stage_stand_ins(workdir / "models", ("vista3d", "brats", "cxr"))
    studies = workdir / "studies"
    shutil.copytree(sample_data / "studies", studies)
    server = start_monailabel(workdir, studies, conf={"models": "vista3d,brats,cxr"})
    try:
        yield server
    finally:
        server.stop()


def infer(server: RunningServer, task: str, image: str = "", params: dict | None = None,
          session_id: str = "") -> requests.Response:
    query = {"image": image, "output": "all"}
    if session_id:
        query["session_id"] = session_id
    return requests.post(f"{server.url}/infer/{task}", params=query,
                         data={"params": json.dumps(params or {})}, timeout=300)


def labelmap_from(data: bytes, tmp_path: Path, name: str = "label.nii.gz"):
    path = tmp_path / name
    path.write_bytes(data)
    return read_labelmap(path)


def label_rows(server: RunningServer) -> dict:
    listing = server.get("/datastore/", params={"output": "all"}).json()
    return {image: entry["labels"] for image, entry in listing["objects"].items()}


def test_info_lists_the_three_expert_tasks_with_their_labels(expert_server):
    models = expert_server.get("/info/").json()["models"]
    assert set(models) == {"vista3d", "brats", "cxr"}
    assert models["vista3d"]["labels"]["hepatic tumor"] == 26
    assert models["brats"]["labels"] == {"tumor core": 1, "edema": 2, "enhancing tumor": 4}
    assert models["cxr"]["type"] == "classification"


def test_vista3d_group_on_the_datastore_ct_returns_a_labelmap_in_the_input_geometry(expert_server, sample_data, tmp_path):
    answer, data = multipart(infer(expert_server, "vista3d", "ct_abdomen", {"group": "hepatic tumor"}))
    labels = labelmap_from(data, tmp_path)
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert labels.geometry.allclose(ct.geometry, atol=1e-4)
    assert labels.array.shape == ct.array.shape
    assert set(np.unique(labels.array)) <= {0, 1, 26}
    assert answer["label_names"] == HEPATIC
    assert answer["expert"] == "VISTA3D" and answer["argument"] == "hepatic tumor"
    assert answer["stand_in"] is True and "not a medical model" in answer["notice"]


def test_a_repeated_request_is_served_from_the_cache(expert_server, tmp_path):
    params = {"group": "pancreatic tumor"}
    first, first_data = multipart(infer(expert_server, "vista3d", "ct_abdomen", params))
    second, second_data = multipart(infer(expert_server, "vista3d", "ct_abdomen", params))
    assert first["cached"] is False and second["cached"] is True
    assert "run" in first["latencies"] and "run" not in second["latencies"]
    assert np.array_equal(labelmap_from(first_data, tmp_path, "a.nii.gz").array,
                          labelmap_from(second_data, tmp_path, "b.nii.gz").array)


def test_explicit_label_ids_and_the_hepatoma_alias(expert_server):
    by_ids, _ = multipart(infer(expert_server, "vista3d", "ct_abdomen", {"label_prompt": [3, 1]}))
    assert by_ids["label_names"] == {"liver": 1, "spleen": 3}
    by_alias, _ = multipart(infer(expert_server, "vista3d", "ct_abdomen", {"group": "hepatoma"}))
    assert by_alias["label_names"] == HEPATIC and by_alias["argument"] == "hepatic tumor"


@pytest.mark.parametrize("upload", ["nrrd", "dicom"])
def test_session_uploads_of_nrrd_and_a_dicom_series_keep_their_geometry(expert_server, sample_data, tmp_path, upload):
    if upload == "nrrd":
        files = [sample_data / "nrrd" / "ct_abdomen.nrrd"]
    else:
        files = sorted((sample_data / "dicom" / "ct_abdomen").glob("*.dcm"))
    handles = [("files", (path.name, path.read_bytes())) for path in files]
    created = requests.put(f"{expert_server.url}/session/", files=handles, timeout=120)
    assert created.status_code == 200, created.text
    session_id = created.json()["session_id"]
    answer, data = multipart(infer(expert_server, "vista3d", params={"group": "hepatic tumor"}, session_id=session_id))
    labels = labelmap_from(data, tmp_path)
    reference = read_volume(files[0] if upload == "nrrd" else files[0].parent)
    assert labels.geometry.allclose(reference.geometry, atol=1e-4)
    assert answer["label_names"] == HEPATIC


def test_brats_finds_the_other_sequences_and_answers_in_the_t1c_geometry(expert_server, sample_data, tmp_path):
    answer, data = multipart(infer(expert_server, "brats", "brain_mri_flair"))
    labels = labelmap_from(data, tmp_path)
    t1c = read_volume(sample_data / "studies" / "brain_mri_t1c.nii.gz")
    assert labels.geometry.allclose(t1c.geometry, atol=1e-4)
    assert set(np.unique(labels.array)) <= {0, 1, 2, 4}
    assert set(answer["label_names"].values()) <= {1, 2, 4}


def test_cxr_returns_eighteen_probabilities_as_json(expert_server):
    answer, data = multipart(infer(expert_server, "cxr", "cxr_chest"))
    assert data is None
    assert len(answer["probabilities"]) == 18
    assert set(answer["answers"].values()) <= {"yes", "no"}
    assert answer["feedback"].startswith("The resulting predictions are:\n")
    assert answer["stand_in"] is True


def test_monai_label_python_client_works_unchanged(expert_server, sample_data, tmp_path):
    client = MONAILabelClient(expert_server.url, tmpdir=str(tmp_path))
    label_file, params = client.infer("vista3d", "ct_abdomen", {"group": "hepatic tumor"})
    assert params["label_names"] == HEPATIC
    labels = read_labelmap(label_file)
    assert labels.geometry.allclose(read_volume(sample_data / "studies" / "ct_abdomen.nii.gz").geometry, atol=1e-4)
    session = client.create_session(str(sample_data / "nrrd" / "ct_abdomen.nrrd"))
    _, session_params = client.infer("vista3d", "", {"group": "organs"}, session_id=session["session_id"])
    assert session_params["argument"] == "organs"


@pytest.mark.parametrize(
    ("task", "image", "params", "message"),
    [
        ("vista3d", "cxr_chest", {"group": "hepatic tumor"}, "2D"),
        ("vista3d", "ct_abdomen", {"group": "kidney stones"}, "kidney stones"),
        ("vista3d", "ct_abdomen", {"label_prompt": [1, 999]}, "999"),
        ("brats", "ct_abdomen", {}, "t1"),
        ("brats", "brain_mri_t1c", {"sequences": {"t1c": "brain_mri_t1c", "t1": "brain_mri_t1", "t2": "brain_mri_t2"}},
         "flair"),
        ("brats", "brain_mri_t1c",
         {"sequences": {"t1c": "brain_mri_t1c", "t1": "brain_mri_t1", "t2": "brain_mri_t2", "flair": "ct_abdomen"}},
         "FLAIR"),
    ],
    ids=["2d-to-vista3d", "unknown-group", "unknown-label-id", "ct-to-brats", "three-sequences", "other-subject"],
)
def test_bad_input_is_a_4xx_that_names_the_problem_and_saves_nothing(expert_server, task, image, params, message):
    before = label_rows(expert_server)
    response = infer(expert_server, task, image, params)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert message.lower() in response.json()["detail"].lower()
    assert label_rows(expert_server) == before


def test_a_corrupt_upload_is_a_4xx(expert_server):
    files = [("files", ("broken.nii.gz", io.BytesIO(b"\x1f\x8b this is not a volume").read()))]
    session_id = requests.put(f"{expert_server.url}/session/", files=files, timeout=60).json()["session_id"]
    response = infer(expert_server, "vista3d", params={"group": "organs"}, session_id=session_id)
    assert 400 <= response.status_code < 500, response.text[:500]
    assert "broken.nii.gz" in response.json()["detail"]
