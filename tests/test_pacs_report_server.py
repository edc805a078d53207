"""The chat's findings as a DICOM SR stored in a real Orthanc (``POST /vila_m3/chat/{chat_id}/report``), read back
by QIDO/WADO with its references resolving to instances in Orthanc; the report beside the PACS for a DICOM
session (returned as a file) and refused for a NIfTI one; and the audit log, which on a PACS holds its study
ids only hashed. Experts run stand-in weights; the VLM is the scripted OpenAI-compatible test double."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from pacs_harness import RunningOrthanc
from server_harness import RunningServer, chat_server_with_stand_ins, multipart
from test_pacs_server import orthanc  # noqa: F401  (the module's Orthanc fixture)

from vila_m3.audit import hashed
from vila_m3.reports.dicom_sr import referenced_instances, report_texts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slicer_extension" / "VILAM3Chat"))
from VILAM3ChatLib.client import RequestRejected, VilaM3Client  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.pacs]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, orthanc: RunningOrthanc,  # noqa: F811
         fake_vlm: FakeOpenAIServer) -> Iterator[dict]:
    """MONAI Label on Orthanc's DICOMweb with the VISTA3D stand-in, the scripted VLM and an audit log."""
    root = tmp_path_factory.mktemp("pacs-report")
    audit = root / "audit" / "audit.jsonl"
    with chat_server_with_stand_ins(root, sample_data, fake_vlm.url, conf={"audit_log": str(audit)},
                                    studies=orthanc.dicomweb_url) as server:
        yield {"server": server, "audit": audit, "root": root}


def _chat(server: RunningServer, fake_vlm: FakeOpenAIServer, params: dict) -> dict:
    fake_vlm.script(sse(["Let me look: <VISTA3D(hepatic tumor)>."]), sse(["Yes, ", "the liver shows a lesion."]))
    response = requests.post(f"{server.url}/infer/vila_m3", params={**params, "output": "all"},
                             data={"params": json.dumps({"prompt": "Is there a liver tumor?", "chat_id": params.pop(
                                 "chat_id"), "slice_index": 30})}, timeout=300)
    answer, _ = multipart(response)
    return answer


def test_a_report_is_stored_in_orthanc_and_its_references_resolve_there(site, orthanc, fake_vlm):  # noqa: F811
    server = site["server"]
    series = orthanc.series["ct_abdomen"]
    answer = _chat(server, fake_vlm, {"image": series, "chat_id": "report-1"})
    assert answer["answer"] == "Yes, the liver shows a lesion."
    # no report is written without the explicit request
    assert requests.get(f"{orthanc.dicomweb_url}/series", params={"Modality": "SR"}, timeout=30).json() == []

    response = requests.post(f"{server.url}/vila_m3/chat/report-1/report", timeout=300)
    assert response.status_code == 200, response.text
    uids = response.json()
    study = uids["StudyInstanceUID"]
    assert len(uids["segs"]) == 1 and uids["final_label"] is None  # no final label yet: the turn's own SEG

    found = requests.get(f"{orthanc.dicomweb_url}/series", params={"Modality": "SR"}, timeout=30).json()
    assert [item["0020000E"]["Value"][0] for item in found] == [uids["SeriesInstanceUID"]]
    wado = requests.get(f"{orthanc.dicomweb_url}/studies/{study}/series/{uids['SeriesInstanceUID']}/instances/"
                        f"{uids['SOPInstanceUID']}", headers={"Accept": 'multipart/related; type="application/dicom"'},
                        timeout=60)
    assert wado.status_code == 200
    body = wado.content
    start = body.index(b"DICM") - 128
    report = hd.sr.srread(io.BytesIO(body[start:]))
    texts = report_texts(report)
    assert "Is there a liver tumor?" in texts and "Yes, the liver shows a lesion." in texts
    assert "VISTA3D" in texts and "argument: hepatic tumor" in texts
    assert any("VISTA3D ran on stand-in weights" in text for text in texts)

    # every instance the report references is in Orthanc: the CT's slices and the turn's SEG
    referenced = referenced_instances(report)
    ct_instances = requests.get(f"{orthanc.dicomweb_url}/studies/{study}/series/{series}/instances",
                                timeout=30).json()
    ct_uids = {item["00080018"]["Value"][0] for item in ct_instances}
    seg_uid = uids["segs"][0]["SOPInstanceUID"]
    assert referenced == ct_uids | {seg_uid}
    seg = requests.get(f"{orthanc.dicomweb_url}/studies/{study}/series/{uids['segs'][0]['SeriesInstanceUID']}/"
                       f"instances/{seg_uid}/metadata", timeout=30)
    assert seg.status_code == 200 and seg.json()[0]["00080060"]["Value"] == ["SEG"]
    # no server path in the report
    raw = body.decode("latin-1")
    assert str(site["root"]) not in raw and "/tmp/" not in raw


def test_a_dicom_session_beside_the_pacs_gets_its_report_as_a_file(site, sample_data, fake_vlm, tmp_path):
    server = site["server"]
    files = sorted((sample_data / "dicom" / "ct_abdomen").glob("*.dcm"))
    created = requests.put(f"{server.url}/session/", files=[("files", (p.name, p.read_bytes())) for p in files],
                           timeout=120)
    assert created.status_code == 200, created.text
    _chat(server, fake_vlm, {"session_id": created.json()["session_id"], "chat_id": "report-2"})
    response = requests.post(f"{server.url}/vila_m3/chat/report-2/report", timeout=300)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    report = pydicom.dcmread(io.BytesIO(response.content))
    assert report.Modality == "SR"
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    assert referenced_instances(report) == sources  # no SEG: nothing was stored to reference
    assert str(site["root"]).encode() not in response.content
    # the Slicer client downloads it to a .dcm file
    path = VilaM3Client(server.url, download_dir=str(tmp_path)).write_report("report-2")["path"]
    assert path.endswith(".dcm") and Path(path).parent == tmp_path
    assert referenced_instances(pydicom.dcmread(path)) == sources


def test_a_nifti_study_or_an_unknown_chat_gets_no_report(site, sample_data, fake_vlm):
    server = site["server"]
    nifti = sample_data / "studies" / "ct_abdomen.nii.gz"
    created = requests.put(f"{server.url}/session/", files=[("files", (nifti.name, nifti.read_bytes()))], timeout=120)
    assert created.status_code == 200, created.text
    _chat(server, fake_vlm, {"session_id": created.json()["session_id"], "chat_id": "report-3"})
    refused = requests.post(f"{server.url}/vila_m3/chat/report-3/report", timeout=60)
    assert refused.status_code == 422 and refused.json()["detail"] == "a structured report needs a DICOM study"
    assert requests.post(f"{server.url}/vila_m3/chat/no-such-chat/report", timeout=60).status_code == 404


def test_the_slicer_client_writes_a_report_to_the_pacs_and_names_a_refusal(site, orthanc, sample_data,  # noqa: F811
                                                                          fake_vlm, tmp_path):
    server = site["server"]
    _chat(server, fake_vlm, {"image": orthanc.series["ct_abdomen"], "chat_id": "report-client"})
    client = VilaM3Client(server.url, download_dir=str(tmp_path))
    uids = client.write_report("report-client")
    assert set(uids) == {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "segs", "final_label"}
    stored = requests.get(f"{orthanc.dicomweb_url}/instances", params={"SOPInstanceUID": uids["SOPInstanceUID"]},
                          timeout=30).json()
    assert [item["00080060"]["Value"][0] for item in stored] == ["SR"]

    nifti = sample_data / "studies" / "ct_abdomen.nii.gz"
    created = requests.put(f"{server.url}/session/", files=[("files", (nifti.name, nifti.read_bytes()))], timeout=120)
    _chat(server, fake_vlm, {"session_id": created.json()["session_id"], "chat_id": "report-client-nifti"})
    with pytest.raises(RequestRejected, match="a structured report needs a DICOM study"):
        client.write_report("report-client-nifti")


def test_the_audit_log_holds_pacs_study_ids_only_hashed(site, orthanc, sample_data, fake_vlm):  # noqa: F811
    server = site["server"]
    _chat(server, fake_vlm, {"image": orthanc.series["ct_abdomen"], "chat_id": "report-audit"})
    assert requests.post(f"{server.url}/vila_m3/chat/report-audit/report", timeout=300).status_code == 200
    text = Path(site["audit"]).read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.splitlines()]
    report = [line for line in lines if line["route"] == "/vila_m3/chat/report" and line["chat"] == hashed("report-audit")]
    assert len(report) == 1 and report[0]["study"] == hashed(orthanc.series["ct_abdomen"])
    assert any(line["route"] == "/infer/vila_m3" for line in lines)
    uids = set(orthanc.series.values())
    for path in (sample_data / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    leaked = [uid for uid in uids if uid in text]
    assert leaked == []


def test_a_result_saved_as_final_label_is_referenced_as_that_seg_and_each_turn_names_its_recorded_model(
        site, orthanc, fake_vlm, tmp_path):  # noqa: F811
    from vila_m3.experts.registry import ExpertRegistry
    from vila_m3.imaging import read_labelmap

    server = site["server"]
    series = orthanc.series["ct_abdomen"]
    _chat(server, fake_vlm, {"image": series, "chat_id": "report-final"})
    # the annotator keeps the chat's result as the series' final label (as the Slicer panel saves it)
    labels = requests.get(f"{server.url}/vila_m3/chat/report-final/labels", timeout=60)
    assert labels.status_code == 200
    path = tmp_path / "final.nii.gz"
    path.write_bytes(labels.content)
    names = {int(value): name for value, name in ExpertRegistry.from_config().get("VISTA3D").labels.items()}
    present = {int(v) for v in set(read_labelmap(path).array.ravel().tolist())} - {0}
    assert present
    saved = requests.put(f"{server.url}/datastore/label", params={"image": series, "tag": "final"},
                         data={"params": json.dumps({"label_names": {names[v]: v for v in present}})},
                         files={"label": ("final.nii.gz", labels.content)}, timeout=120)
    assert saved.status_code == 200, saved.text
    finals = requests.get(f"{orthanc.dicomweb_url}/series", params={"Modality": "SEG"}, timeout=30).json()
    final_series = {item["0020000E"]["Value"][0] for item in finals}

    response = requests.post(f"{server.url}/vila_m3/chat/report-final/report", timeout=300)
    assert response.status_code == 200, response.text
    uids = response.json()
    assert uids["segs"] == []  # the turn's result is in the PACS already: as the final label
    final = uids["final_label"]
    assert final is not None and final["SeriesInstanceUID"] in final_series
    study = uids["StudyInstanceUID"]
    wado = requests.get(f"{orthanc.dicomweb_url}/studies/{study}/series/{uids['SeriesInstanceUID']}/instances/"
                        f"{uids['SOPInstanceUID']}", headers={"Accept": 'multipart/related; type="application/dicom"'},
                        timeout=60)
    body = wado.content
    report = hd.sr.srread(io.BytesIO(body[body.index(b"DICM") - 128:]))
    composite = [item for turn in report.ContentSequence if turn.ValueType == "CONTAINER"
                 for run in turn.ContentSequence if run.ValueType == "CONTAINER"
                 for item in run.ContentSequence if item.ValueType == "COMPOSITE"]
    assert [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in composite] == [final["SOPInstanceUID"]]
    # the reference resolves to the final label's SEG instance in Orthanc
    found = requests.get(f"{orthanc.dicomweb_url}/instances", params={"SOPInstanceUID": final["SOPInstanceUID"]},
                         timeout=30).json()
    assert [item["00080060"]["Value"][0] for item in found] == ["SEG"]
    assert found[0]["0020000E"]["Value"][0] == final["SeriesInstanceUID"]
    ct = requests.get(f"{orthanc.dicomweb_url}/studies/{study}/series/{series}/instances", timeout=30).json()
    assert referenced_instances(report) == {item["00080018"]["Value"][0] for item in ct} | {final["SOPInstanceUID"]}
    # the turn names the model the chat recorded for it (the scripted VLM, without its address)
    texts = report_texts(report)
    assert "remote model 'fake-vila-m3'" in texts and not any("127.0.0.1" in text for text in texts)

    # a later report of the chat names what the chat recorded, not the model served now
    stored = site["root"] / "chats" / "report-final" / "chat.json"
    chat = json.loads(stored.read_text(encoding="utf-8"))
    assert set(chat["models"]) == {"1"} and chat["models"]["1"]["name"].startswith("remote model 'fake-vila-m3'")
    chat["models"]["1"] = {"name": "vila_m3_8b (fine-tuned v0002)", "version": "v0002", "stand_in": False}
    stored.write_text(json.dumps(chat), encoding="utf-8")
    again = requests.post(f"{server.url}/vila_m3/chat/report-final/report", timeout=300)
    assert again.status_code == 200, again.text
    wado = requests.get(f"{orthanc.dicomweb_url}/studies/{study}/series/{again.json()['SeriesInstanceUID']}/instances/"
                        f"{again.json()['SOPInstanceUID']}",
                        headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=60)
    texts = report_texts(hd.sr.srread(io.BytesIO(wado.content[wado.content.index(b"DICM") - 128:])))
    assert "vila_m3_8b (fine-tuned v0002)" in texts and "v0002" in texts
    assert "remote model 'fake-vila-m3'" not in texts
    # the audit log of every request of this module holds PACS ids only hashed: no series, SEG or SR UID
    audit = Path(site["audit"]).read_text(encoding="utf-8")
    lines = [json.loads(line) for line in audit.splitlines()]
    assert any(line["route"] == "/vila_m3/chat/report" and line["study"] == hashed(series) for line in lines)
    seg_uids = {item["0020000E"]["Value"][0] for item in requests.get(
        f"{orthanc.dicomweb_url}/series", params={"Modality": "SEG"}, timeout=30).json()}
    ids = {series, study, final["SOPInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"], *seg_uids,
           *(item["00080018"]["Value"][0] for item in ct)}
    assert [uid for uid in ids if uid in audit] == []
