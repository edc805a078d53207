"""The contained datastore, sessions and study resolution of the app (apps/vila_m3/lib/datastore.py), without a server.

The same probes run against a real server in tests/test_containment_server.py; here each rule is checked on
the classes themselves, including what a server cannot easily stage (symbolic links out of the studies folder).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from fastapi import HTTPException

pytestmark = pytest.mark.security

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "vila_m3"))

from lib.datastore import (  # noqa: E402
    ContainedDatastore,
    ContainedSessions,
    StudyFiles,
    not_in_datastore,
    relative_datalist,
)

EXTENSIONS = ["*.nii.gz", "*.nii", "*.nrrd"]


@pytest.fixture()
def site(tmp_path: Path) -> dict[str, Path]:
    studies = tmp_path / "site" / "studies"
    studies.mkdir(parents=True)
    (studies / "ct.nii.gz").write_bytes(b"ct volume")
    (tmp_path / "site" / "outside.nii.gz").write_bytes(b"outside volume")
    upload = tmp_path / "upload.nii.gz"
    upload.write_bytes(b"uploaded volume")
    return {"root": tmp_path, "studies": studies, "upload": upload, "outside": tmp_path / "site" / "outside.nii.gz"}


def open_store(studies: Path) -> ContainedDatastore:
    return ContainedDatastore(str(studies), extensions=EXTENSIONS, auto_reload=False)


def status_of(call) -> int:
    with pytest.raises(HTTPException) as caught:
        call()
    return caught.value.status_code


def test_a_plain_upload_is_added_and_served_from_inside(site):
    store = open_store(site["studies"])
    assert store.add_image("scan_2", str(site["upload"]), {}) == "scan_2"
    assert Path(store.get_image_uri("scan_2")) == site["studies"].resolve() / "scan_2.nii.gz"
    assert "path" not in store.get_image_info("scan_2") and store.get_image_info("scan_2")["name"] == "scan_2.nii.gz"


@pytest.mark.parametrize("image_id", ["../../x/", "../outside", "/tmp/abs", ".hidden", "ct\n", "a/b"])
def test_traversal_ids_are_422_and_write_nothing(site, image_id):
    store = open_store(site["studies"])
    before = sorted(p.name for p in site["root"].rglob("*") if p != site["upload"])
    assert status_of(lambda: store.add_image(image_id, str(site["upload"]), {})) == 422
    assert sorted(p.name for p in site["root"].rglob("*")) == before
    assert not site["upload"].exists()  # the refused upload's temporary file (it lies in the temp folder) is gone


def test_an_upload_suffix_the_datastore_does_not_hold_is_422(site):
    dotfile = site["root"] / "tmpabc.bashrc"
    dotfile.write_text("echo owned")
    store = open_store(site["studies"])
    assert status_of(lambda: store.add_image("ok", str(dotfile), {})) == 422
    assert not any(p.suffix == ".bashrc" for p in site["studies"].rglob("*"))


def test_labels_check_the_tag_the_image_and_the_suffix(site):
    store = open_store(site["studies"])
    label = site["root"] / "label.nii.gz"
    for tag in ("../../../x/evil", "..", "final/../..", ""):
        label.write_bytes(b"label")
        assert status_of(lambda tag=tag: store.save_label("ct", str(label), tag, {})) == 422
    label.write_bytes(b"label")
    assert status_of(lambda: store.save_label("unknown", str(label), "final", {})) == 404
    findings = site["root"] / "findings.json"
    findings.write_text("{}")
    assert store.save_label("ct", str(findings), "final", {}) == "ct"  # JSON findings are labels too
    assert not (site["root"] / "x").exists()


def test_a_datastore_entry_naming_a_file_outside_is_neither_served_nor_deleted(site):
    config = {"name": "d", "description": "d", "images_dir": ".", "labels_dir": "labels",
              "objects": {"../outside": {"image": {"ext": ".nii.gz", "info": {}}, "labels": {}}}}
    (site["studies"] / "datastore_v2.json").write_text(json.dumps(config))
    store = open_store(site["studies"])
    assert "../outside" in store.list_images()  # MONAI Label keeps the entry: the file exists
    assert store.get_image_uri("../outside") == ""
    assert status_of(lambda: store.remove_image("../outside")) == 422
    assert status_of(lambda: store.update_image_info("../outside", {"a": 1})) == 422
    assert site["outside"].read_bytes() == b"outside volume"


def test_a_symbolic_link_out_of_the_studies_folder_is_not_served(site):
    os.symlink(site["outside"], site["studies"] / "linked.nii.gz")
    store = open_store(site["studies"])
    assert "linked" in store.list_images()
    assert store.get_image_uri("linked") == ""
    assert status_of(lambda: StudyFiles(store).image("linked")) == 422
    assert status_of(lambda: store.remove_image("linked")) == 422
    assert site["outside"].exists()


def test_a_symbolic_link_to_the_whole_studies_folder_works(site):
    alias = site["root"] / "alias"
    alias.symlink_to(site["studies"], target_is_directory=True)
    store = open_store(alias)
    assert Path(store.get_image_uri("ct")).read_bytes() == b"ct volume"


def test_unknown_images_and_labels_are_404(site):
    store = open_store(site["studies"])
    assert status_of(lambda: store.remove_image("nothing")) == 404
    assert status_of(lambda: store.remove_label("ct", "final")) == 404
    assert status_of(lambda: store.update_label_info("ct", "final", {})) == 404


def test_study_files_resolve_ids_and_trust_only_the_allowed_folders(site, tmp_path):
    store = open_store(site["studies"])
    sessions_dir = tmp_path / "sessions"
    sessions = ContainedSessions(str(sessions_dir), 3600)
    volume = tmp_path / "session_upload.nrrd"
    volume.write_bytes(b"nrrd")
    session_id, info = sessions.add_session(str(volume))
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    files = StudyFiles(store, lambda: sessions, [uploads])

    assert Path(files.image("ct")) == site["studies"].resolve() / "ct.nii.gz"
    assert files.named(session_id) == files.session(session_id) == str(sessions_dir / session_id / "session_upload.nrrd")
    assert info.to_json()["image"] == "session_upload.nrrd" and info.to_json()["path"] == session_id

    assert files.trusted(str(site["studies"] / "ct.nii.gz")) and files.trusted(str(uploads / "x.nii.gz"))
    with pytest.raises(HTTPException) as caught:
        files.trusted(str(site["studies"] / "ct.nii.gz"), in_request=True)  # a datastore file comes as its id
    assert caught.value.status_code == 422
    messages = set()
    for path in (str(site["outside"]), str(site["root"] / "missing.nii.gz"), "/", f"{site['studies']}/../outside.nii.gz"):
        with pytest.raises(HTTPException) as caught:
            files.trusted(path)
        messages.add(caught.value.detail)
        assert str(site["root"]) not in caught.value.detail
    assert len(messages) == 1
    for name in ("..", "../..", "no_such_session", "/"):
        assert sessions.get_session(name) is None
        assert status_of(lambda name=name: files.session(name)) == 422
    assert "session" in str(pytest.raises(HTTPException, files.named, "gone_id").value.detail)


def test_removing_a_traversal_session_removes_nothing(tmp_path):
    sessions_dir = tmp_path / "deep" / "sessions"
    sessions_dir.mkdir(parents=True)
    keep = tmp_path / "deep" / "keep.txt"
    keep.write_text("keep")
    sessions = ContainedSessions(str(sessions_dir), 3600)
    for name in ("..", "../..", "."):
        sessions.remove_session(name)
    assert keep.read_text() == "keep" and sessions_dir.is_dir()


def test_the_training_list_is_relative_to_the_studies_folder(site):
    store = open_store(site["studies"])
    label = site["root"] / "label.nii.gz"
    label.write_bytes(b"label")
    store.save_label("ct", str(label), "final", {})
    assert relative_datalist(store) == [{"image": "ct.nii.gz", "label": os.path.join("labels", "final", "ct.nii.gz")}]


def test_not_in_datastore_names_ids_but_never_paths():
    assert not_in_datastore("ct_abdomen") == "image 'ct_abdomen' is not in the datastore"
    assert "/etc" not in not_in_datastore("/etc/passwd") and "not accepted" in not_in_datastore("/etc/passwd")
    assert not_in_datastore(5) == "image must be a datastore image id, not int"

