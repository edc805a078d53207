"""A DICOM series directly in a studies folder (the series folder is the image, its name the id) on a real MONAI
Label server: listed by the datastore, VISTA3D with ``output=dicom_seg`` answers a SEG of the series equal to the
labelmap on its slices, a chat on it gets its structured report as a file referencing the series' instances and
naming the model the chat recorded, and a final label saved for it becomes training conversations through the
app's datastore (the same adapter as a PACS). Experts run stand-in weights; the VLM is the scripted double."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from server_harness import RunningServer, chat_server_with_stand_ins, multipart

from vila_m3.imaging import read_labelmap
from vila_m3.reports.dicom_sr import referenced_instances, report_texts

pytestmark = pytest.mark.server

SERIES = "ct_series"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, sample_data: Path,
         fake_vlm: FakeOpenAIServer) -> Iterator[dict]:
    """A studies folder holding the sample CT as a DICOM series folder; VISTA3D stand-in, scripted VLM."""
    root = tmp_path_factory.mktemp("dicom-folder")
    studies = root / "studies"
    studies.mkdir()
    shutil.copytree(sample_data / "dicom" / "ct_abdomen", studies / SERIES)
    with chat_server_with_stand_ins(root, sample_data, fake_vlm.url, studies=studies) as server:
        yield {"server": server, "root": root, "series": sample_data / "dicom" / "ct_abdomen"}


def sources(folder: Path) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(path, stop_before_pixels=True)
                                                  for path in folder.glob("*.dcm"))}


def test_the_series_folder_is_an_image_of_the_datastore(site):
    listing = requests.get(f"{site['server'].url}/datastore/", params={"output": "all"}, timeout=60).json()
    assert SERIES in listing["objects"]
    assert str(site["root"]) not in json.dumps(listing)


def test_output_dicom_seg_on_the_series_folder_is_a_seg_of_the_series_equal_to_the_labelmap(site, tmp_path):
    server: RunningServer = site["server"]
    params = {"label_prompt": [1, 3, 26]}
    answer, data = multipart(requests.post(f"{server.url}/infer/vista3d", params={"image": SERIES, "output": "all"},
                                           data={"params": json.dumps(params)}, timeout=300))
    (tmp_path / "labels.nii.gz").write_bytes(data)
    labels = read_labelmap(tmp_path / "labels.nii.gz").array
    response = requests.post(f"{server.url}/infer/vista3d", params={"image": SERIES, "output": "dicom_seg"},
                             data={"params": json.dumps(params)}, timeout=300)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"].startswith("application/dicom")
    seg = hd.seg.segread(io.BytesIO(response.content))
    found = sources(site["series"])
    by_slice = [uid for uid, _ in sorted(found.items(), key=lambda item: int(item[1].InstanceNumber))]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=by_slice, combine_segments=True)
    names = {int(d.SegmentNumber): d.SegmentLabel for d in seg.SegmentSequence}
    expected = np.zeros_like(labels)
    for number, name in names.items():
        expected[labels == answer["label_names"][name]] = number
    assert names and expected.any()
    np.testing.assert_array_equal(pixels, expected)  # voxel for voxel, on the series' own slices
    first = next(iter(found.values()))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = found[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in source.ImagePositionPatient], atol=1e-4)


def test_a_chat_on_the_series_folder_gets_its_report_as_a_file(site, fake_vlm):
    server: RunningServer = site["server"]
    fake_vlm.script(sse(["Let me look: <VISTA3D(hepatic tumor)>."]), sse(["Yes, ", "the liver shows a lesion."]))
    turn = requests.post(f"{server.url}/infer/vila_m3", params={"image": SERIES, "output": "all"},
                         data={"params": json.dumps({"prompt": "Is there a liver tumor?", "chat_id": "folder-report",
                                                     "slice_index": 30})}, timeout=300)
    assert multipart(turn)[0]["answer"] == "Yes, the liver shows a lesion."
    response = requests.post(f"{server.url}/vila_m3/chat/folder-report/report", timeout=300)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    report = hd.sr.srread(io.BytesIO(response.content))
    assert report.Modality == "SR" and report.StudyInstanceUID == next(iter(sources(site["series"]).values())).StudyInstanceUID
    assert referenced_instances(report) == set(sources(site["series"]))  # the series' instances; no SEG stored
    texts = report_texts(report)
    assert "Is there a liver tumor?" in texts and "Yes, the liver shows a lesion." in texts
    assert "remote model 'fake-vila-m3'" in texts  # the model the chat recorded for the turn
    assert str(site["root"]).encode() not in response.content


def test_a_final_label_of_the_series_folder_becomes_conversations_through_the_apps_datastore(site, sample_data):
    server: RunningServer = site["server"]
    label = sample_data / "ground_truth" / "ct_abdomen.nii.gz"
    saved = requests.put(f"{server.url}/datastore/label", params={"image": SERIES, "tag": "final"},
                         files={"label": ("ct_series.nii.gz", label.read_bytes())}, timeout=60)
    assert saved.status_code == 200, saved.text
    response = requests.post(f"{server.url}/vila_m3/datagen/", params={"name": "series", "seed": 0}, timeout=600)
    assert response.status_code == 200, response.text[:1000]
    result = response.json()
    assert result["privacy"]["passed"] is True and result["counts"], result
    export = server.log_path.parent / "app" / "datagen" / "series"
    text = "".join((export / name).read_text(encoding="utf-8") for name in ("train.json", "val.json"))
    assert "<VISTA3D(hepatic tumor)>" in text
    manifest = json.loads((export / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"] == "studies"
    blob = b"".join(path.read_bytes() for path in export.rglob("*") if path.is_file())
    assert b"PHANTOM" not in blob.upper() and SERIES.encode() not in blob  # no header identifier, no raw id
