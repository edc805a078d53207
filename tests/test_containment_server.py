"""Containment through a real MONAI Label server: nothing outside the datastore is written, deleted or read.

Probes of issue #17 item 1: traversal ids, tags and upload names on MONAI Label's own datastore routes,
a datastore file left by an older server naming a file outside, and server paths sent where a study is
named (``image``, ``params.image``, ``params.sequences``, the chat stream route). Each is refused with a
4xx whose message names no server path; files outside the studies folder survive and nothing new
appears beside it. Normal uploads, labels and deletes still work.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from server_harness import RunningServer, chat_server_with_stand_ins

pytestmark = [pytest.mark.server, pytest.mark.security]

CT = "ct_abdomen"
T1C, T1, T2, FLAIR = "brain_mri_t1c", "brain_mri_t1", "brain_mri_t2", "brain_mri_flair"



@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> dict[str, Path]:
    """``<root>/site/data/studies`` (the datastore) with files beside it that clients must never reach:
    a sentinel, a host CT and four host MRI sequences, and a file an older server's datastore names."""
    root = tmp_path_factory.mktemp("containment")
    site = root / "site"
    studies = site / "data" / "studies"
    shutil.copytree(sample_data / "studies", studies)
    (site / "sentinel.txt").write_text("keep me", encoding="utf-8")
    host = site / "host"
    host.mkdir()
    shutil.copy(studies / f"{CT}.nii.gz", host / "ct.nii.gz")
    for name in (T1C, T1, T2, FLAIR):
        shutil.copy(studies / f"{name}.nii.gz", host / f"{name}.nii.gz")
    # an entry an older server wrote through a traversal id: "../outside" names <studies>/../outside.nii.gz
    shutil.copy(studies / f"{CT}.nii.gz", site / "data" / "outside.nii.gz")
    config = studies / "datastore_v2.json"
    listing = json.loads(config.read_text()) if config.exists() else {
        "name": "new-dataset", "description": "New Dataset", "images_dir": ".", "labels_dir": "labels", "objects": {}}
    listing["objects"]["../outside"] = {"image": {"ext": ".nii.gz", "info": {"name": "../outside.nii.gz"}},
                                        "labels": {}}
    config.write_text(json.dumps(listing), encoding="utf-8")
    return {"root": root, "site": site, "studies": studies, "host": host}


@pytest.fixture(scope="module")
def server(site: dict[str, Path], sample_data: Path, fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    """The app with the scripted chat VLM and stand-in VISTA3D and BRATS, on the site's studies."""
    with chat_server_with_stand_ins(site["root"], sample_data, fake_vlm.url, experts=("vista3d", "brats"),
                                    studies=site["studies"]) as running:
        yield running


def tree(folder: Path, skip: Path) -> dict[str, int]:
    """Every file under ``folder`` (but not under ``skip``) with its size."""
    return {str(path.relative_to(folder)): path.stat().st_size for path in folder.rglob("*")
            if path.is_file() and not path.is_relative_to(skip)}


def assert_no_server_path(response: requests.Response, site: dict[str, Path]) -> None:
    text = response.text
    for folder in (site["root"], site["root"].resolve(), Path.cwd(), Path.home()):
        assert str(folder) not in text, f"the answer names a server folder: {text[:300]}"
    assert "/etc" not in text and "passwd" not in text, text[:300]


# --- MONAI Label's datastore routes ---------------------------------------------------------------------------


def test_a_traversal_image_id_with_a_dotfile_upload_writes_nothing_outside(server, site):
    before = tree(site["site"], site["studies"])
    response = requests.put(f"{server.url}/datastore/image", params={"image": "../../x/"},
                            files={"file": ("a.bashrc", b"echo owned\n")}, data={"params": "{}"}, timeout=30)
    assert 400 <= response.status_code < 500, response.text
    assert not (site["site"] / "x").exists() and not (site["root"] / "x").exists()
    assert tree(site["site"], site["studies"]) == before
    assert_no_server_path(response, site)


@pytest.mark.parametrize("image, filename", [
    ("../../y", "ct.nii.gz"),          # traversal id, allowed suffix
    ("/tmp/abs", "ct.nii.gz"),          # absolute id
    (".hidden", "ct.nii.gz"),           # leading dot
    ("ok_id\n", "ct.nii.gz"),           # trailing newline
    ("ok_id", "a.bashrc"),              # suffix the datastore does not hold
    ("", "..nii.gz"),                   # the id taken from the file name is '.'
])
def test_bad_image_ids_and_upload_names_are_refused_with_422(server, site, image, filename):
    before = tree(site["site"], site["studies"])
    listed = set(server.get("/datastore/", params={"output": "all"}).json()["objects"])
    query = {"image": image} if image else {}
    response = requests.put(f"{server.url}/datastore/image", params=query,
                            files={"file": (filename, b"not a volume")}, data={"params": "{}"}, timeout=30)
    assert response.status_code == 422, response.text
    assert tree(site["site"], site["studies"]) == before
    assert set(server.get("/datastore/", params={"output": "all"}).json()["objects"]) == listed
    assert_no_server_path(response, site)


def test_a_traversal_label_tag_writes_nothing_outside(server, site):
    before = tree(site["site"], site["studies"])
    for tag in ("../../../x/evil", "../../escape", "..", "final/../../up"):
        response = requests.put(f"{server.url}/datastore/label", params={"image": CT, "tag": tag},
                                files={"label": ("label.nii.gz", b"label bytes")}, data={"params": "{}"}, timeout=30)
        assert response.status_code == 422, (tag, response.text)
        assert "tag" in response.json()["detail"]
        assert_no_server_path(response, site)
    assert tree(site["site"], site["studies"]) == before
    assert not any(path.name.startswith("evil") for path in site["root"].rglob("*"))


def test_a_label_for_an_unknown_or_traversal_image_is_refused(server, site):
    for image, status in (("../outside", 422), ("no_such_image", 404)):
        response = requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": "final"},
                                files={"label": ("label.nii.gz", b"label bytes")}, data={"params": "{}"}, timeout=30)
        assert response.status_code == status, (image, response.text)
    assert not (site["site"] / "data" / "labels").exists()


def test_a_label_file_of_another_kind_is_refused(server, site):
    response = requests.put(f"{server.url}/datastore/label", params={"image": CT, "tag": "final"},
                            files={"label": ("run.sh", b"#!/bin/sh\n")}, data={"params": "{}"}, timeout=30)
    assert response.status_code == 422 and "must end in one of" in response.json()["detail"]
    assert not (site["studies"] / "labels" / "final" / f"{CT}.sh").exists()


def test_deleting_through_a_traversal_id_or_tag_removes_nothing(server, site):
    outside = site["site"] / "data" / "outside.nii.gz"
    for method, route, query in (
        ("DELETE", "/datastore/image", {"id": "../outside"}),
        ("DELETE", "/datastore/image", {"id": "../../sentinel.txt"}),
        ("DELETE", "/datastore/label", {"id": CT, "tag": "../../.."}),
        ("DELETE", "/datastore/label", {"id": "../outside", "tag": "final"}),
        ("PUT", "/datastore/image/info", {"image": "../outside"}),
        ("PUT", "/datastore/label/info", {"label": CT, "tag": "../x"}),
    ):
        response = requests.request(method, f"{server.url}{route}", params=query, data={"info": "{}"}, timeout=30)
        assert 400 <= response.status_code < 500, (route, query, response.status_code, response.text)
        assert_no_server_path(response, site)
    assert outside.is_file() and (site["site"] / "sentinel.txt").read_text() == "keep me"
    assert (site["studies"] / f"{CT}.nii.gz").is_file()


def test_a_file_outside_named_by_an_old_datastore_entry_is_not_served(server, site):
    for route, query in (("/datastore/image", {"image": "../outside"}),
                         ("/datastore/image", {"image": "../../sentinel.txt"}),
                         ("/datastore/label", {"label": CT, "tag": "../.."})):
        response = server.get(route, params=query)
        assert response.status_code == 404, (query, response.status_code)
    assert server.get("/datastore/image/info", params={"image": "../outside"}).json() == {}


def test_a_normal_upload_label_and_delete_still_work_and_answer_without_paths(server, site, sample_data):
    volume = (sample_data / "studies" / f"{CT}.nii.gz").read_bytes()
    added = requests.put(f"{server.url}/datastore/image", params={"image": "uploaded_ct"},
                         files={"file": ("scan.nii.gz", volume)}, data={"params": "{}"}, timeout=60)
    assert added.status_code == 200, added.text
    assert added.json() == {"image": "uploaded_ct"}
    assert (site["studies"] / "uploaded_ct.nii.gz").read_bytes() == volume

    info = server.get("/datastore/image/info", params={"image": "uploaded_ct"})
    assert info.status_code == 200 and info.json()["name"] == "uploaded_ct.nii.gz" and "path" not in info.json()
    assert_no_server_path(info, site)

    by_name = requests.put(f"{server.url}/datastore/image", files={"file": ("named_by_file.nii.gz", volume)},
                           data={"params": "{}"}, timeout=60)
    assert by_name.status_code == 200 and by_name.json() == {"image": "named_by_file"}

    label = requests.put(f"{server.url}/datastore/label", params={"image": "uploaded_ct", "tag": "final"},
                         files={"label": ("any name.nii.gz", volume)}, data={"params": "{}"}, timeout=60)
    assert label.status_code == 200, label.text
    assert (site["studies"] / "labels" / "final" / "uploaded_ct.nii.gz").is_file()
    assert server.get("/datastore/label", params={"label": "uploaded_ct", "tag": "final"}).content == volume

    assert requests.delete(f"{server.url}/datastore/label", params={"id": "uploaded_ct", "tag": "final"},
                           timeout=30).status_code == 200
    assert not (site["studies"] / "labels" / "final" / "uploaded_ct.nii.gz").exists()
    for image in ("uploaded_ct", "named_by_file"):
        assert requests.delete(f"{server.url}/datastore/image", params={"id": image}, timeout=30).status_code == 200
        assert not (site["studies"] / f"{image}.nii.gz").exists()
    assert requests.delete(f"{server.url}/datastore/image", params={"id": "uploaded_ct"}, timeout=30).status_code == 404


def test_the_training_list_names_files_relative_to_the_studies_folder(server, site, sample_data):
    label = (sample_data / "ground_truth" / f"{CT}.nii.gz").read_bytes()
    saved = requests.put(f"{server.url}/datastore/label", params={"image": CT, "tag": "final"},
                         files={"label": (f"{CT}.nii.gz", label)}, data={"params": "{}"}, timeout=60)
    assert saved.status_code == 200, saved.text
    try:
        listing = server.get("/datastore/", params={"output": "train"})
        assert listing.status_code == 200
        assert {"image": f"{CT}.nii.gz", "label": f"labels/final/{CT}.nii.gz"} in listing.json()
        assert_no_server_path(listing, site)
        assert server.get("/datastore/").json()["total"] >= 1  # the other outputs as MONAI Label answers them
    finally:
        requests.delete(f"{server.url}/datastore/label", params={"id": CT, "tag": "final"}, timeout=30)


def test_listings_and_info_name_no_server_folder(server, site):
    for route, query in (("/info/", {}), ("/datastore/", {"output": "all"}), ("/datastore/", {}),
                         ("/datastore/image/info", {"image": CT})):
        response = server.get(route, params=query)
        assert response.status_code == 200, route
        assert_no_server_path(response, site)


def test_the_next_sample_names_its_image_by_id_only(server, site):
    response = requests.post(f"{server.url}/activelearning/random", json={}, timeout=30)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["id"] and "path" not in response.json()
    assert_no_server_path(response, site)


def test_an_export_refused_for_its_folder_names_the_export_not_the_folder(server, site):
    occupied = site["root"] / "server" / "app" / "datagen" / "occupied"
    occupied.mkdir(parents=True)
    (occupied / "notes.txt").write_text("someone else's", encoding="utf-8")
    response = requests.post(f"{server.url}/vila_m3/datagen/", params={"name": "occupied"}, timeout=120)
    assert response.status_code == 409, response.text[:300]
    assert "occupied" in response.json()["detail"]
    assert_no_server_path(response, site)


def test_the_ohif_route_keeps_to_its_folder(server):
    host, port = server.url.removeprefix("http://").split(":")
    answers = {}
    for path in ("/ohif/..", "/ohif/.", "/ohif/%2E%2E", "/ohif/..%2F..%2F..%2Fapp.py", "/ohif/", "/ohif/index.html"):
        connection = http.client.HTTPConnection(host, int(port), timeout=30)  # sent as written, not normalised
        connection.request("GET", path)
        response = connection.getresponse()
        answers[path] = (response.status, response.read()[:15])
        connection.close()
    assert answers["/ohif/"] == answers["/ohif/index.html"] == (200, b"<!doctype html>")
    for path in ("/ohif/..", "/ohif/.", "/ohif/%2E%2E", "/ohif/..%2F..%2F..%2Fapp.py"):  # MONAI Label's: 500
        assert answers[path][0] == 404, (path, answers[path])


# --- studies named by server path -------------------------------------------------------------------------------


def infer(server: RunningServer, task: str, image: str, params: dict | None = None, **query) -> requests.Response:
    return requests.post(f"{server.url}/infer/{task}", params={"image": image, "output": "json", **query},
                         data={"params": json.dumps(params or {})}, timeout=300)


def host_paths(site: dict[str, Path]) -> list[str]:
    """Server paths a client might send: a real CT outside, one that does not exist, the root, a system file."""
    return [str(site["host"] / "ct.nii.gz"), str(site["host"] / "missing.nii.gz"), "/", "/etc/passwd",
            f"{site['studies']}/../outside.nii.gz", str(site["studies"] / f"{CT}.nii.gz")]


def test_server_paths_as_image_are_refused_with_one_message_whether_or_not_they_exist(server, site):
    details = set()
    for path in host_paths(site):
        response = infer(server, "vista3d", path, {"group": "hepatic tumor"})
        assert response.status_code == 422, (path, response.status_code, response.text[:300])
        assert_no_server_path(response, site)
        assert path not in response.text
        details.add(response.json()["detail"])
    assert len(details) == 1, details  # nothing tells a client which host paths exist
    assert "not accepted" in details.pop()


def test_params_image_cannot_replace_the_datastore_image(server, site):
    for path in host_paths(site):
        response = infer(server, "vista3d", CT, {"group": "hepatic tumor", "image": path})
        assert response.status_code == 422, (path, response.status_code, response.text[:300])
        assert_no_server_path(response, site)


def test_an_unknown_id_names_the_id_and_reads_nothing(server, site):
    response = infer(server, "vista3d", "no_such_study", {"group": "hepatic tumor"})
    assert response.status_code == 422
    assert response.json()["detail"] == "image 'no_such_study' is not in the datastore"
    for bad in ("..", ".", "models", "logs"):  # names of folders in the server's working directory
        response = infer(server, "vista3d", bad, {"group": "hepatic tumor"})
        assert response.status_code == 422, (bad, response.text[:300])
        assert "DICOM" not in response.text
        assert_no_server_path(response, site)


def test_a_traversal_session_id_is_refused(server, site):
    for session in ("..", "../..", "../../site", "/"):
        response = infer(server, "vista3d", "", {"group": "hepatic tumor"}, session_id=session)
        assert 400 <= response.status_code < 500, (session, response.status_code, response.text[:300])
        assert_no_server_path(response, site)


def test_brats_sequences_named_by_server_path_are_refused(server, site):
    host = {name: str(site["host"] / f"{stem}.nii.gz")
            for name, stem in (("t1c", T1C), ("t1", T1), ("t2", T2), ("flair", FLAIR))}
    response = infer(server, "brats", T1C, {"sequences": host})
    assert response.status_code == 422, response.text[:300]
    assert_no_server_path(response, site)
    one_host = {"t1c": T1C, "t1": T1, "t2": T2, "flair": host["flair"]}
    response = infer(server, "brats", T1C, {"sequences": one_host})
    assert response.status_code == 422 and "sequences.flair" in response.json()["detail"]
    assert_no_server_path(response, site)


def test_the_chat_refuses_server_paths_on_both_routes(server, site, fake_vlm):
    posts = len(fake_vlm.posts)
    host = {name: str(site["host"] / f"{stem}.nii.gz")
            for name, stem in (("t1c", T1C), ("t1", T1), ("t2", T2), ("flair", FLAIR))}
    turn = {"prompt": "What is this?", "chat_id": "host-probe"}
    probes = [infer(server, "vila_m3", path, turn) for path in host_paths(site)]
    probes += [infer(server, "vila_m3", CT, {**turn, "image": host_paths(site)[0]})]
    probes += [infer(server, "vila_m3", T1C, {**turn, "sequences": host})]
    for path in host_paths(site):
        probes.append(requests.post(f"{server.url}/vila_m3/chat/stream", params={"image": path},
                                    data={"params": json.dumps(turn)}, timeout=60))
    probes.append(requests.post(f"{server.url}/vila_m3/chat/stream", params={"image": T1C},
                                data={"params": json.dumps({**turn, "sequences": host})}, timeout=60))
    probes.append(requests.post(f"{server.url}/vila_m3/chat/stream", params={"session_id": "../.."},
                                data={"params": json.dumps(turn)}, timeout=60))
    for response in probes:
        assert response.status_code == 422, (response.request.url, response.status_code, response.text[:300])
        assert_no_server_path(response, site)
    assert len(fake_vlm.posts) == posts, "no refused turn reached the VLM"
    assert server.get("/vila_m3/chat/host-probe").status_code == 404, "no refused turn was stored"


def test_a_stored_chat_holds_ids_and_file_names_not_server_paths(server, site, fake_vlm):
    fake_vlm.script(sse(["It is a CT image of the abdomen."]))
    response = infer(server, "vila_m3", CT, {"prompt": "What is this?", "chat_id": "paths-free"})
    assert response.status_code == 200, response.text[:500]
    chat = server.get("/vila_m3/chat/paths-free")
    assert chat.status_code == 200
    assert chat.json()["study"]["image"] == CT
    assert chat.json()["study"]["images"] == {"image": f"{CT}.nii.gz"}
    assert_no_server_path(chat, site)
    assert_no_server_path(response, site)
    stored = next((site["root"] / "chats").rglob("chat.json")).read_text(encoding="utf-8")
    assert str(site["root"]) not in stored and str(site["root"].resolve()) not in stored


def test_nothing_appeared_beside_the_studies_folder(server, site):
    created = {path.relative_to(site["site"]) for path in site["site"].rglob("*")
               if not path.is_relative_to(site["studies"])}
    expected = {Path("sentinel.txt"), Path("host"), Path("data"), Path("data/outside.nii.gz")}
    expected |= {path.relative_to(site["site"]) for path in site["host"].iterdir()}
    assert created == expected, sorted(map(str, created - expected))
    assert (site["site"] / "sentinel.txt").read_text() == "keep me"
    assert os.path.isfile(site["site"] / "data" / "outside.nii.gz")
