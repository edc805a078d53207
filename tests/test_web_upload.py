"""The web viewer's upload check (web/vila_m3_viewer/study_upload.py) and its chat list entries, without a
browser: a NIfTI goes as it is, a zipped DICOM series as a flat zip with a NIfTI of the same voxels and
geometry to show, anything else is refused in words; and how a listed chat reads in the reopen list."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pacs_harness import sample_series

from vila_m3.imaging import read_volume

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "slicer_extension" / "VILAM3Chat"), str(REPO / "web")]
pytest.importorskip("trame", reason="the web extra is missing (pip install -e '.[web]')")

from vila_m3_viewer.chat_list import entry_text, study_key  # noqa: E402
from vila_m3_viewer.study_upload import UploadError, prepare_upload, session_of  # noqa: E402

MB = 2**20


def test_a_nifti_goes_as_it_is(sample_data, tmp_path):
    content = (sample_data / "studies" / "ct_abdomen.nii.gz").read_bytes()
    prepared = prepare_upload("My CT.nii.gz", content, tmp_path / "up", 64 * MB)
    assert prepared.upload.name == "My_CT.nii.gz" and not prepared.uncompress
    assert prepared.upload.read_bytes() == content and prepared.display == prepared.upload
    assert prepared.description.startswith("NIfTI, ")


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("notes.nii.gz", b"these are notes, not an image", "is not a NIfTI image the viewer can read"),
    ("scan.png", b"\x89PNG", "is neither a NIfTI image (.nii, .nii.gz) nor a .zip of a DICOM series"),
    ("series.zip", b"PK not really", "is not a readable .zip archive"),
    ("big.nii", bytes(3 * MB), "is 3.0 MB: too large to upload (the largest is 2.0 MB)"),
])
def test_a_bad_file_is_refused_in_words(tmp_path, name, content, problem):
    with pytest.raises(UploadError, match="Nothing was sent") as refused:
        prepare_upload(name, content, tmp_path / "up", 2 * MB)
    assert problem in str(refused.value) and str(tmp_path) not in str(refused.value)


def test_a_zip_without_dicom_files_is_refused(tmp_path):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("readme.txt", "no images here")
    with pytest.raises(UploadError, match="holds no DICOM series"):
        prepare_upload("series.zip", archive.getvalue(), tmp_path / "up", 64 * MB)


def test_a_zipped_dicom_series_in_a_folder_goes_flat_with_a_nifti_of_the_same_geometry(sample_data, tmp_path):
    files = sample_series(sample_data)["ct_abdomen"]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        for path in files:
            out.write(path, arcname=f"patient/CT series/{path.name}")
    prepared = prepare_upload("ct series.zip", archive.getvalue(), tmp_path / "up", 256 * MB)
    assert prepared.uncompress and prepared.description == f"DICOM series of {len(files)} files"
    with zipfile.ZipFile(prepared.upload) as sent:
        names = sent.namelist()
        assert len(names) == len(files) and all("/" not in name for name in names)  # the server reads the top folder
        sent.extractall(tmp_path / "server-side")
    served = read_volume(tmp_path / "server-side")  # as the server reads the session's folder
    shown = read_volume(prepared.display)
    assert shown.geometry.allclose(served.geometry) and np.array_equal(shown.array, served.array)


def test_listed_chats_read_title_study_and_time():
    chat = {"chat_id": "c1", "title": "Is there a liver tumour?", "study": "ct_abdomen", "session": False,
            "updated": "2026-12-06T08:30:12Z", "owner": None}
    assert entry_text(chat) == "Is there a liver tumour? · ct_abdomen · 2026-12-06 08:30 UTC"
    assert study_key(chat) == "ct_abdomen"
    session = "0b7c3f0e-6f1e-4c55-9d2a-5b7e8f9a1c2d"
    uploaded = {**chat, "study": session, "session": True, "owner": "alice"}
    assert entry_text(uploaded) == "Is there a liver tumour? · upload 0b7c3f0e · 2026-12-06 08:30 UTC · alice"
    assert session_of(study_key(uploaded)) == session and session_of("ct_abdomen") is None
