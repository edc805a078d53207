"""The app on a hospital's PACS: a real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) started on
127.0.0.1 by tests/pacs_harness.py with the sample DICOM studies, and a real MONAI Label server whose
studies are Orthanc's DICOMweb URL. Experts run stand-in weights; the VLM is the scripted
OpenAI-compatible test double. Without Orthanc these tests are skipped, the reason naming the packages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from pacs_harness import RunningOrthanc, load_samples, missing_reason, start_orthanc
from requests_toolbelt.multipart.decoder import MultipartDecoder
from server_harness import RunningServer, chat_server_with_stand_ins, multipart

from vila_m3.imaging import read_labelmap, read_volume

pytestmark = [pytest.mark.server, pytest.mark.pacs]

MRI_SERIES = ("brain_mri_t1c", "brain_mri_t1", "brain_mri_t2", "brain_mri_flair")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Iterator[RunningOrthanc]:
    """Orthanc on a free port of 127.0.0.1 holding the CT, the chest X-ray and the four MRI series."""
    reason = missing_reason()
    if reason:
        pytest.skip(f"no PACS to test against: {reason}")
    pacs = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        load_samples(pacs, sample_data)
        yield pacs
    finally:
        pacs.stop()



@pytest.fixture(scope="module")
def pacs_server(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, orthanc: RunningOrthanc,
                fake_vlm: FakeOpenAIServer) -> Iterator[RunningServer]:
    """MONAI Label with this app on Orthanc's DICOMweb, VISTA3D, BRATS and CXR stand-ins and the scripted VLM."""
    with chat_server_with_stand_ins(tmp_path_factory.mktemp("pacs-server"), sample_data, fake_vlm.url,
                                    experts=("vista3d", "brats", "cxr"), studies=orthanc.dicomweb_url) as server:
        yield server


def infer(server: RunningServer, task: str, image: str, params: dict) -> requests.Response:
    return requests.post(f"{server.url}/infer/{task}", params={"image": image, "output": "all"},
                         data={"params": json.dumps(params)}, timeout=300)


def test_the_harness_loads_every_sample_series_into_orthanc(orthanc):
    assert set(orthanc.series) == {"ct_abdomen", "cxr_chest", *MRI_SERIES}
    assert set(orthanc.series_uids()) == set(orthanc.series.values())
    ct = orthanc.series["ct_abdomen"]
    instances = requests.get(f"{orthanc.dicomweb_url}/series", params={"SeriesInstanceUID": ct,
                             "includefield": "00201209"}, timeout=30).json()
    assert instances[0]["00201209"]["Value"] == [64]  # Number of Series Related Instances
    t2 = requests.get(f"{orthanc.dicomweb_url}/studies/{_study_of(orthanc, 'brain_mri_t2')}/series",
                      timeout=30).json()
    assert len(t2) == 4  # the four sequences are one study


def _study_of(orthanc: RunningOrthanc, name: str) -> str:
    found = requests.get(f"{orthanc.dicomweb_url}/series", params={"SeriesInstanceUID": orthanc.series[name]},
                         timeout=30).json()
    return found[0]["0020000D"]["Value"][0]


def test_the_datastore_lists_the_pacs_image_series_by_uid(pacs_server, orthanc):
    listing = pacs_server.get("/datastore/", params={"output": "all"}).json()
    assert set(listing["objects"]) == set(orthanc.series.values())
    assert "/" not in json.dumps(listing["objects"]).replace("\\/", "")  # no server paths


def test_vista3d_on_the_ct_series_from_dicomweb_answers_in_its_geometry(pacs_server, orthanc, sample_data, tmp_path):
    answer, data = multipart(infer(pacs_server, "vista3d", orthanc.series["ct_abdomen"], {"group": "hepatic tumor"}))
    assert answer["label_names"] == {"liver": 1, "hepatic tumor": 26} and answer["stand_in"] is True
    path = tmp_path / "labels.nii.gz"
    path.write_bytes(data)
    labels = read_labelmap(path)
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")  # the sample CT is oblique
    assert labels.geometry.allclose(ct.geometry, atol=1e-3)
    assert labels.array.shape == ct.array.shape


def test_a_chat_turn_calls_vista3d_on_the_ct_series_from_dicomweb(pacs_server, orthanc, fake_vlm, sample_data,
                                                                  tmp_path):
    fake_vlm.script(sse(["This looks like a CT image. ", "Let me trigger <VISTA3D(hepatic tumor)>."]),
                    sse(["Yes, ", "the liver shows a lesion."]))
    series = orthanc.series["ct_abdomen"]
    response = requests.post(f"{pacs_server.url}/infer/vila_m3", params={"image": series, "output": "all"},
                             data={"params": json.dumps({"prompt": "Is there a liver tumor?", "chat_id": "pacs-1",
                                                         "slice_index": 30})}, timeout=300)
    answer, data = multipart(response)
    assert answer["answer"] == "Yes, the liver shows a lesion."
    assert answer["experts"][0]["expert"] == "VISTA3D" and answer["experts"][0]["argument"] == "hepatic tumor"
    assert answer["label_names"] == {"liver": 1, "hepatic tumor": 26}
    assert answer["slice"] == {"axis": "axial", "index": 30}
    path = tmp_path / "labels.nii.gz"
    path.write_bytes(data)
    labels = read_labelmap(path)
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert labels.geometry.allclose(ct.geometry, atol=1e-3)
    # the slice the VLM saw is the one on screen: the same pixels as the folder study's slice 30
    image_parts = [p for p in fake_vlm.posts[-2].body["messages"][0]["content"] if p["type"] == "image_url"]
    assert len(image_parts) == 1


def test_cxr_on_the_chest_xray_from_dicomweb(pacs_server, orthanc):
    answer, data = multipart(infer(pacs_server, "cxr", orthanc.series["cxr_chest"], {}))
    assert data is None and len(answer["probabilities"]) == 18


def test_an_id_that_is_not_a_pacs_image_series_is_a_422_without_paths(pacs_server):
    for image in ("1.2.3.4.5", "../../etc/passwd"):
        response = infer(pacs_server, "vista3d", image, {"group": "liver"})
        assert response.status_code == 422, response.text
        assert "/etc" not in response.text and ".cache" not in response.text


def test_brats_on_one_mri_series_finds_the_other_three_by_series_description(pacs_server, orthanc, sample_data,
                                                                             tmp_path):
    answer, data = multipart(infer(pacs_server, "brats", orthanc.series["brain_mri_flair"], {}))
    assert set(answer["label_names"].values()) <= {1, 2, 4}
    (tmp_path / "labels.nii.gz").write_bytes(data)
    labels = read_labelmap(tmp_path / "labels.nii.gz")
    t1c = read_volume(sample_data / "studies" / "brain_mri_t1c.nii.gz")
    assert labels.geometry.allclose(t1c.geometry, atol=1e-3)


def test_a_dicom_session_works_beside_the_pacs(pacs_server, sample_data):
    files = sorted((sample_data / "dicom" / "ct_abdomen").glob("*.dcm"))
    created = requests.put(f"{pacs_server.url}/session/", files=[("files", (p.name, p.read_bytes())) for p in files],
                           timeout=120)
    assert created.status_code == 200, created.text
    response = requests.post(f"{pacs_server.url}/infer/vista3d", params={"session_id": created.json()["session_id"],
                             "output": "all"}, data={"params": json.dumps({"group": "hepatic tumor"})}, timeout=300)
    answer, _ = multipart(response)
    assert answer["label_names"] == {"liver": 1, "hepatic tumor": 26}


def test_output_dicom_seg_is_a_seg_of_the_series_equal_to_the_labelmap(pacs_server, orthanc, sample_data, tmp_path):
    import highdicom as hd
    import pydicom

    series = orthanc.series["ct_abdomen"]
    params = {"label_prompt": [1, 3, 26]}
    answer, data = multipart(infer(pacs_server, "vista3d", series, params))
    (tmp_path / "labels.nii.gz").write_bytes(data)
    labels = read_labelmap(tmp_path / "labels.nii.gz").array
    response = requests.post(f"{pacs_server.url}/infer/vista3d", params={"image": series, "output": "dicom_seg"},
                             data={"params": json.dumps(params)}, timeout=300)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"].startswith("application/dicom")
    (tmp_path / "seg.dcm").write_bytes(response.content)
    seg = hd.seg.segread(tmp_path / "seg.dcm")

    sources = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p, stop_before_pixels=True)
                                                for p in (sample_data / "dicom" / "ct_abdomen").glob("*.dcm"))}
    by_slice = [uid for uid, _ in sorted(sources.items(), key=lambda item: int(item[1].InstanceNumber))]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=by_slice, combine_segments=True)
    names = {int(d.SegmentNumber): d.SegmentLabel for d in seg.SegmentSequence}
    expected = np.zeros_like(labels)
    for number, name in names.items():
        expected[labels == answer["label_names"][name]] = number
    np.testing.assert_array_equal(pixels, expected)  # voxel for voxel
    assert set(names.values()) <= {"liver", "spleen", "hepatic tumor"} and names
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert seg.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = sources[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in source.ImagePositionPatient], atol=1e-4)
    segment = seg.SegmentSequence[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert segment.SegmentAlgorithmName == "VISTA3D"
    assert "stand-in" in segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion


def test_output_dicom_seg_of_a_classification_is_a_422(pacs_server, orthanc):
    response = requests.post(f"{pacs_server.url}/infer/cxr", params={"image": orthanc.series["cxr_chest"],
                             "output": "dicom_seg"}, data={"params": "{}"}, timeout=300)
    assert response.status_code == 422 and "labelmap" in response.text


CT_LABELS = {"liver": 1, "spleen": 3, "right kidney": 5, "left kidney": 14, "bone": 21, "hepatic tumor": 26}


def _segs_in(orthanc: RunningOrthanc) -> list[dict]:
    return requests.get(f"{orthanc.dicomweb_url}/series", params={"Modality": "SEG"}, timeout=30).json()


def test_a_final_label_is_stored_in_orthanc_as_a_seg_with_named_coded_segments(pacs_server, orthanc, sample_data):
    import highdicom as hd
    import pydicom

    series = orthanc.series["ct_abdomen"]
    before = len(_segs_in(orthanc))
    label = sample_data / "ground_truth" / "ct_abdomen.nii.gz"
    response = requests.put(f"{pacs_server.url}/datastore/label", params={"image": series, "tag": "final"},
                            data={"params": json.dumps({"segments": list(CT_LABELS), "chat_id": "pacs-1"})},
                            files={"label": ("ct_abdomen.nii.gz", label.read_bytes())}, timeout=120)
    assert response.status_code == 200, response.text
    segs = _segs_in(orthanc)
    assert len(segs) == before + 1
    new = segs[-1]
    study, seg_uid = new["0020000D"]["Value"][0], new["0020000E"]["Value"][0]
    instances = requests.get(f"{orthanc.dicomweb_url}/studies/{study}/series/{seg_uid}/instances", timeout=30).json()
    sop = instances[0]["00080018"]["Value"][0]
    raw = requests.get(f"{orthanc.dicomweb_url}/studies/{study}/series/{seg_uid}/instances/{sop}",
                       headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=60)
    assert raw.status_code == 200
    body = MultipartDecoder.from_response(raw).parts[0].content
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(__import__("io").BytesIO(body)))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    segments = {d.SegmentLabel: d for d in seg.SegmentSequence}
    assert set(segments) == set(CT_LABELS)
    liver = segments["liver"].SegmentedPropertyTypeCodeSequence[0]
    assert (liver.CodingSchemeDesignator, liver.CodeValue) == ("SCT", "10200004")
    assert all(d.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT" for d in segments.values())


def test_datagen_reads_the_final_label_back_from_the_pacs_and_writes_conversations(pacs_server, orthanc, sample_data):
    if not _segs_in(orthanc):
        test_a_final_label_is_stored_in_orthanc_as_a_seg_with_named_coded_segments(pacs_server, orthanc, sample_data)
    response = requests.post(f"{pacs_server.url}/vila_m3/datagen/", params={"name": "from-pacs", "seed": 0},
                             timeout=600)
    assert response.status_code == 200, response.text[:1000]
    result = response.json()
    assert result["out_dir"] == "from-pacs"
    assert result["privacy"]["passed"] is True, result["privacy"]  # no header identifier of the PACS series
    export = pacs_server.log_path.parent / "app" / "datagen" / "from-pacs"
    manifest = json.loads((export / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["source"] == orthanc.url  # the PACS's host, no path
    records = [record for part in ("train", "val") for record in
               json.loads((export / f"{part}.json").read_text(encoding="utf-8"))]
    triggers = [turn["value"] for record in records for turn in record["conversations"]]
    assert any("<VISTA3D(hepatic tumor)>" in text for text in triggers)  # the label read back with VISTA3D's ids
    text = (export / "train.json").read_text(encoding="utf-8")
    assert "PHANTOM-CT-ABD" not in text and orthanc.series["ct_abdomen"] not in text


def _bad_series(sample_data: Path, folder: Path) -> dict[str, tuple[str, list[Path]]]:
    """Series that must be refused: name -> (series UID, files). A CT with a missing slice, a CT with truncated
    pixel data, a structured report and a PDF, all in the CT's study."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ct_files = sorted((sample_data / "dicom" / "ct_abdomen").glob("*.dcm"))
    made: dict[str, tuple[str, list[Path]]] = {}
    for name in ("missing_slice", "corrupt"):
        uid, paths = generate_uid(), []
        for k, path in enumerate(ct_files):
            if name == "missing_slice" and k == 30:
                continue
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            if name == "corrupt" and k == 10:
                ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
            out = folder / f"{name}-{k:03d}.dcm"
            ds.save_as(out)
            paths.append(out)
        made[name] = (uid, paths)
    template = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    for name, sop_class, modality in (("report", "1.2.840.10008.5.1.4.1.1.88.11", "SR"),
                                      ("pdf", "1.2.840.10008.5.1.4.1.1.104.1", "DOC")):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate"):
            setattr(ds, keyword, getattr(template, keyword))
        ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), modality, 77, 1
        if modality == "SR":
            ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
        else:
            ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
            ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
        out = folder / f"{name}.dcm"
        ds.save_as(out)
        made[name] = (str(ds.SeriesInstanceUID), [out])
    return made


def test_a_corrupt_a_non_image_and_an_incomplete_series_are_refused_and_the_rest_keeps_working(
        pacs_server, orthanc, sample_data, tmp_path):
    bad = _bad_series(sample_data, tmp_path)
    for _, paths in bad.values():
        orthanc.upload(paths)
    expected = {"missing_slice": "missing slices", "corrupt": "truncated pixel data", "report": "SR series",
                "pdf": "DOC series"}
    for name, (uid, _) in bad.items():
        response = infer(pacs_server, "vista3d", uid, {"group": "liver"})
        assert response.status_code == 422, (name, response.text)
        assert expected[name] in response.json()["detail"], (name, response.text)
        assert ".cache" not in response.text and str(tmp_path) not in response.text
    good, _ = multipart(infer(pacs_server, "vista3d", orthanc.series["ct_abdomen"], {"group": "hepatic tumor"}))
    assert good["label_names"] == {"liver": 1, "hepatic tumor": 26}
    listing = pacs_server.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert bad["report"][0] not in listing and bad["pdf"][0] not in listing


def test_the_chat_slice_is_the_one_on_screen_whatever_the_series_instance_order(pacs_server, orthanc, fake_vlm,
                                                                              sample_data, tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    uid, paths = generate_uid(), []
    files = sorted((sample_data / "dicom" / "ct_abdomen").glob("*.dcm"))
    for k, path in enumerate(files):  # the same CT, instances numbered head to feet instead of feet to head
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = len(files) - k
        paths.append(tmp_path / f"r{len(files) - k:03d}.dcm")
        ds.save_as(paths[-1])
    orthanc.upload(sorted(paths))
    seen = []
    for series, chat in ((orthanc.series["ct_abdomen"], "order-a"), (uid, "order-b")):
        fake_vlm.script(sse(["A CT slice."]))
        response = requests.post(f"{pacs_server.url}/infer/vila_m3", params={"image": series, "output": "all"},
                                 data={"params": json.dumps({"prompt": "Describe it.", "chat_id": chat,
                                                             "slice_index": 20})}, timeout=300)
        answer, _ = multipart(response)
        assert answer["slice"] == {"axis": "axial", "index": 20}
        seen.append([part["image_url"]["url"] for part in fake_vlm.posts[-1].body["messages"][-1]["content"]
                     if part["type"] == "image_url"])
    assert seen[0] and seen[0] == seen[1]  # the same pixels reached the VLM
