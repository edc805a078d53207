"""The PACS datastore's containment without a PACS: ids that are not plain never become cache paths, the
study resolver trusts the download cache and nothing beside it, and an unreachable PACS is a 422 without paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi import HTTPException

pytestmark = pytest.mark.security

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "vila_m3"))

from dicomweb_client import DICOMwebClient  # noqa: E402
from lib.datastore import StudyFiles  # noqa: E402
from lib.pacs_datastore import PacsDatastore  # noqa: E402
from server_harness import free_port  # noqa: E402


@pytest.fixture()
def store(tmp_path: Path) -> PacsDatastore:
    """A datastore of a PACS that does not answer (nothing listens on its port)."""
    client = DICOMwebClient(url=f"http://127.0.0.1:{free_port()}/dicom-web")
    client.set_http_retry_params(retry=False)  # the client's default retries a refused connection for 30 s
    return PacsDatastore(client, {"Modality": "CT"}, cache_path=str(tmp_path / "cache"))


def test_the_study_resolver_trusts_the_download_cache_only(store, tmp_path):
    files = StudyFiles(store)
    cache = Path(store.cache_root)
    assert cache in files.roots() and cache.is_relative_to((tmp_path / "cache").resolve())
    (cache / "series.nii.gz").write_bytes(b"volume")
    assert files.trusted(str(cache / "series.nii.gz"))
    (tmp_path / "beside.nii.gz").write_bytes(b"volume")
    for path in (str(tmp_path / "beside.nii.gz"), f"{cache}/../../beside.nii.gz", str(tmp_path / "cache")):
        with pytest.raises(HTTPException) as caught:
            files.trusted(path)
        assert caught.value.status_code == 422 and str(tmp_path) not in caught.value.detail


@pytest.mark.parametrize("image_id", ["../../etc/passwd", "..", "a/b", "x" * 300, ""])
def test_ids_that_are_not_plain_are_no_image_and_ask_nothing(store, image_id):
    assert store.get_image_uri(image_id) == ""
    assert store.series_folder(image_id) is None
    assert store.get_label_uri(image_id, "final") == ""


def test_an_unreachable_pacs_is_a_422_without_paths(store, tmp_path):
    files = StudyFiles(store)
    assert store.get_image_uri("1.2.826.0.1.3680043.8.498.1") == ""
    with pytest.raises(HTTPException) as caught:
        files.image("1.2.826.0.1.3680043.8.498.1")
    assert caught.value.status_code == 422 and str(tmp_path) not in caught.value.detail
    assert "not in the datastore" in caught.value.detail


def test_a_label_of_an_unknown_series_is_refused_and_its_upload_dropped(store, tmp_path):
    upload = tmp_path / "tmp" / "label.nii.gz"
    upload.parent.mkdir()
    upload.write_bytes(b"label")
    with pytest.raises(HTTPException) as caught:
        store.save_label("../x", str(upload), "final", {})
    assert caught.value.status_code == 404 and str(tmp_path) not in caught.value.detail
    assert not upload.exists()  # MONAI Label removes an upload only after a success
