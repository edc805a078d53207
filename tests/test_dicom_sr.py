"""A chat's findings as a DICOM Comprehensive SR (vila_m3.reports.dicom_sr) on the sample CT series, read back
with highdicom: content, observer DEVICE, evidence and SEG references, stand-in wording, no server paths."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from vila_m3.chat.store import Chat
from vila_m3.chat.transcript import Message
from vila_m3.imaging.dicom_seg import SegAlgorithm, labelmap_to_seg, read_series
from vila_m3.reports.dicom_sr import (
    ReportError,
    ReportExpert,
    ReportModel,
    ReportTurn,
    SegReference,
    build_report,
    chat_turns,
    referenced_instances,
    report_texts,
)


def _seg(sample_data: Path, sources: list) -> pydicom.Dataset:
    image = sitk.ReadImage(str(sample_data / "ground_truth" / "ct_abdomen.nii.gz"))
    labels = sitk.GetArrayFromImage(image).astype(np.int32)
    geometry = (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return labelmap_to_seg(labels, geometry, sources, {"liver": 1, "spleen": 3}, {},
                           SegAlgorithm("VISTA3D", "0.5.1", stand_in=True))


def _chat() -> Chat:
    chat = Chat("c1", study={"image": "ct_abdomen"}, modality="CT")
    chat.messages = [
        Message("user", "card <image> Is the liver enlarged?", question="Is the liver enlarged?"),
        Message("assistant", "<VISTA3D(liver)>"),
        Message("expert", "liver segmented", expert="VISTA3D", argument="liver"),
        Message("assistant", "The liver looks normal in size."),
        Message("user", "And the spleen?", question="And the spleen?"),
        Message("assistant", "half an answ"),
        Message("expert", "", error="the server stopped", to_model=False, interrupted=True),
    ]
    for message in chat.messages[4:]:
        message.interrupted = True
    return chat


def test_chat_turns_keep_finished_turns_with_their_experts_and_drop_interrupted_ones():
    turns = chat_turns(_chat())
    assert len(turns) == 1
    turn = turns[0]
    assert turn.question == "Is the liver enlarged?"
    assert turn.answer == "The liver looks normal in size."
    assert [(e.name, e.argument) for e in turn.experts] == [("VISTA3D", "liver")]
    assert turn.number == 1


def test_a_turn_after_an_interrupted_one_keeps_its_labelmap_number():
    chat = _chat()
    chat.messages += [Message("user", "Kidneys?", question="Kidneys?"), Message("assistant", "Both look normal.")]
    turns = chat_turns(chat)
    assert [(turn.question, turn.answer, turn.number) for turn in turns] == [
        ("Is the liver enlarged?", "The liver looks normal in size.", 1), ("Kidneys?", "Both look normal.", 3)]


def test_the_report_reads_back_with_its_content_observer_and_references(sample_data, tmp_path):
    sources = read_series(sample_data / "dicom" / "ct_abdomen")
    seg = _seg(sample_data, sources)
    turns = [ReportTurn("Is the liver enlarged?", "The liver looks normal in size.",
                        [ReportExpert("VISTA3D", "liver", stand_in=True, seg=SegReference.of(seg))], 1)]
    report = build_report(turns, sources, ReportModel("fake-vila-m3", "1.0"), segs=[seg])
    path = tmp_path / "sr.dcm"
    report.save_as(path)
    back = hd.sr.srread(path)

    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert back.PatientID == sources[0].PatientID
    assert back.Modality == "SR"
    texts = report_texts(back)
    assert "Is the liver enlarged?" in texts and "The liver looks normal in size." in texts
    assert "VISTA3D" in texts and "argument: liver" in texts
    assert any("VISTA3D ran on stand-in weights" in text for text in texts)
    assert not any("chat model ran on stand-in" in text for text in texts)  # the model is not a stand-in here
    assert "(stand-in)" in back.SeriesDescription

    observer = [item for item in back.ContentSequence if item.RelationshipType == "HAS OBS CONTEXT"]
    observer_type = next(item for item in observer if item.ConceptNameCodeSequence[0].CodeValue == "121005")
    assert observer_type.ConceptCodeSequence[0].CodeValue == "121007"  # DEVICE
    assert any(item.get("TextValue") == "VILA-M3" for item in observer)

    referenced = referenced_instances(back)
    assert {str(ds.SOPInstanceUID) for ds in sources} | {str(seg.SOPInstanceUID)} == referenced
    composite = [item for turn in back.ContentSequence if turn.ValueType == "CONTAINER"
                 for run in turn.ContentSequence if run.ValueType == "CONTAINER"
                 for item in run.ContentSequence if item.ValueType == "COMPOSITE"]
    assert composite[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert composite[0].ReferencedSOPSequence[0].ReferencedSOPClassUID == seg.SOPClassUID
    raw = path.read_bytes()
    assert str(sample_data).encode() not in raw and str(tmp_path).encode() not in raw


def test_a_stand_in_model_is_said_in_words_and_the_version(sample_data):
    sources = read_series(sample_data / "dicom" / "ct_abdomen")
    report = build_report([ReportTurn("q", "a")], sources, ReportModel("tiny", "0.1", stand_in=True))
    texts = report_texts(report)
    assert "0.1 (stand-in)" in texts
    assert any(text.startswith("The chat model ran on stand-in weights") for text in texts)


def test_no_report_without_turns_sources_or_the_referenced_seg(sample_data):
    sources = read_series(sample_data / "dicom" / "ct_abdomen")
    with pytest.raises(ReportError, match="no finished turn"):
        build_report([], sources, ReportModel("m", "1"))
    with pytest.raises(ReportError, match="DICOM instances"):
        build_report([ReportTurn("q", "a")], [], ReportModel("m", "1"))
    seg = _seg(sample_data, sources)
    turn = ReportTurn("q", "a", [ReportExpert("VISTA3D", seg=SegReference.of(seg))])
    with pytest.raises(ReportError, match="evidence"):
        build_report([turn], sources, ReportModel("m", "1"))


def test_each_turn_names_the_model_the_chat_recorded_for_it(sample_data):
    chat = _chat()
    chat.messages = chat.messages[:4] + [Message("user", "Kidneys?", question="Kidneys?"),
                                         Message("assistant", "Both look normal.")]
    chat.models = {"1": {"name": "vila_m3_8b (local checkpoint)", "version": "base", "stand_in": False},
                   "2": {"name": "remote model 'vila-m3' at http://gpu-7:8000/v1", "version": None, "stand_in": True}}
    turns = chat_turns(chat)
    assert [turn.model for turn in turns] == [ReportModel("vila_m3_8b (local checkpoint)", "base"),
                                              ReportModel("remote model 'vila-m3'", "base", stand_in=True)]
    served_now = ReportModel("vila_m3_8b (fine-tuned v0009)", "v0009")
    report = build_report(turns, read_series(sample_data / "dicom" / "ct_abdomen"), served_now)
    texts = report_texts(report)
    assert "v0009" not in " ".join(texts) and "gpu-7" not in " ".join(texts)  # not the model served now, no host
    findings = [[str(item.TextValue) for item in turn.ContentSequence if item.ValueType == "TEXT"]
                for turn in report.ContentSequence if turn.ValueType == "CONTAINER"]
    assert findings[0][2:] == ["vila_m3_8b (local checkpoint)", "base"]
    assert findings[1][2:] == ["remote model 'vila-m3'", "base (stand-in)"]
    assert any(text.startswith("The chat model ran on stand-in weights") for text in texts)
    # a chat saved before models were recorded: its turns get the report's default, which the route makes "not recorded"
    chat.models = {}
    assert [turn.model for turn in chat_turns(chat)] == [None, None]
