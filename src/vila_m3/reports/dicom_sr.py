"""A chat's findings as a DICOM Comprehensive SR (highdicom), written only on an explicit request.

The answers of a chat are free text, which TID 1500's measurement groups do not hold, so the report is a
text-based content tree in a Comprehensive SR (SOP class 1.2.840.10008.5.1.4.1.1.88.33):

- root CONTAINER *Diagnostic imaging report* (LOINC 18748-4), with the observation context: observer type
  DEVICE (DCM 121007), the device's UID, name ``VILA-M3``, the model as model name;
- IMAGE *Source* (SCT 260753009) per instance of the source series;
- TEXT *Algorithm* (each model that answered a turn, as the chat recorded it, and its version; ``stand-in``
  said in words when the weights are one) and, for a stand-in, TEXT *Comment* saying its findings are not a
  medical model's;
- per finished turn (interrupted turns are left out) a CONTAINER *Finding* holding TEXT *Request*
  (the annotator's question), TEXT *Finding* (the model's answer) and TEXT *Algorithm Name* / *Version* of the
  model that answered it, and per expert run a CONTAINER *Algorithm* with its name, argument, stand-in note and
  a COMPOSITE reference to the DICOM-SEG it produced (the turn's result, or the final label it became).

Every source instance and every referenced SEG is listed as evidence (Current Requested Procedure Evidence
Sequence), so a viewer finds the images the report speaks of. No file paths ever go into the report.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from vila_m3.chat.store import Chat

MANUFACTURER = "VILA-M3"
DEVICE_NAME = "VILA-M3"
SERIES_DESCRIPTION = "VILA-M3 chat report"
STAND_IN_TEXT = "stand-in weights (tiny random weights for tests): these findings are not a medical model's"


class ReportError(ValueError):
    """No report can be written (the message says why, without server paths)."""


@dataclass(frozen=True)
class SegReference:
    """A DICOM Segmentation the report references: its dataset (evidence), or its UIDs alone."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str

    @classmethod
    def of(cls, seg: Dataset) -> SegReference:
        return cls(str(seg.SOPClassUID), str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID),
                   str(seg.StudyInstanceUID))


@dataclass(frozen=True)
class ReportExpert:
    """One expert run of a turn: name, argument, whether its weights are a stand-in, the SEG it produced."""

    name: str
    argument: str | None = None
    stand_in: bool = False
    seg: SegReference | None = None
    error: str | None = None


@dataclass(frozen=True)
class ReportTurn:
    """One finished turn: the annotator's question, the model's answer, the experts it ran."""

    question: str
    answer: str
    experts: list[ReportExpert] = field(default_factory=list)
    number: int = 0  # 1-based turn number in the chat (the turn's labelmap is ``turnNNN_labels.nii.gz``)
    model: ReportModel | None = None  # the chat model that answered it (None: not recorded; the report's default)


@dataclass(frozen=True)
class ReportModel:
    """The chat model that answered."""

    name: str
    version: str
    stand_in: bool = False


def chat_turns(chat: Chat) -> list[ReportTurn]:
    """The chat's finished turns (not interrupted ones, not a turn still running), in order; a turn's answer
    is the model's last message of it (the earlier ones called experts, which the report lists)."""
    turns: list[ReportTurn] = []
    finished = {id(message) for message in chat.finished_messages()}
    users = 0  # user messages so far, interrupted turns' too: the number in the turn's labelmap file name
    question: str | None = None
    answer = ""
    experts: list[ReportExpert] = []

    def close() -> None:
        if question is not None:
            turns.append(ReportTurn(question, answer.strip(), list(experts), users, recorded_model(chat, users)))

    for message in chat.messages:
        if message.role == "user" and message.question is not None:
            close()
            question = None
        if message.role == "user":
            users += 1
        if id(message) not in finished:
            continue
        if message.role == "user" and message.question is not None:
            question, answer, experts = message.question, "", []
        elif message.role == "assistant" and question is not None:
            answer = message.text  # the turn's answer is its last word (earlier ones called the experts)
        elif message.role == "expert" and message.expert and question is not None:
            experts.append(ReportExpert(message.expert, message.argument, error=message.error))
    close()
    return turns


def recorded_model(chat: Chat, number: int) -> ReportModel | None:
    """The chat model that answered turn ``number`` as the chat recorded it (name without a server address,
    version, stand-in), or None for a turn of a chat saved before models were recorded."""
    entry = chat.models.get(str(number)) if isinstance(chat.models, dict) else None
    if not isinstance(entry, dict) or not entry.get("name"):
        return None
    name = re.sub(r"\s+at\s+\S+://\S*", "", str(entry["name"]))  # never the VLM's host
    return ReportModel(name, str(entry.get("version") or "base"), bool(entry.get("stand_in")))


def _code(value: str, scheme: str, meaning: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value, scheme, meaning)


def _text(name, value: str, relationship: str = "CONTAINS"):
    import highdicom as hd

    return hd.sr.TextContentItem(name=name, value=value[:1024 * 64] or "(empty)", relationship_type=relationship)


def build_report(turns: Sequence[ReportTurn], sources: Sequence[Dataset], model: ReportModel,
                 segs: Sequence[Dataset] = (), series_number: int = 950) -> Dataset:
    """The Comprehensive SR of ``turns`` on the source series ``sources`` (its instances are the evidence and
    give patient and study); ``model``: the model of turns that recorded none; ``segs``: the SEG datasets the
    experts' references name (evidence too). Raises ReportError without turns or sources."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not turns:
        raise ReportError("the chat has no finished turn to report")
    if not sources:
        raise ReportError("a structured report needs the study's DICOM instances")
    models = list(dict.fromkeys(turn.model or model for turn in turns))  # who answered, in order of first turn
    device_uid = hd.UID()
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=DEVICE_NAME, manufacturer_name=MANUFACTURER,
            model_name="; ".join(dict.fromkeys(used.name for used in models))[:64]),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    root = hd.sr.ContainerContentItem(name=_code("18748-4", "LN", "Diagnostic imaging report"))
    items = list(context)
    algorithm = _code("111001", "DCM", "Algorithm Name")
    version = _code("111003", "DCM", "Algorithm Version")
    comment = _code("121106", "DCM", "Comment")

    def model_items(used: ReportModel) -> list:
        return [_text(algorithm, used.name), _text(version, f"{used.version} (stand-in)" if used.stand_in else used.version)]

    for used in models:
        items += model_items(used)
        if used.stand_in:
            items.append(_text(comment, f"The chat model ran on {STAND_IN_TEXT}."))
    source = _code("260753009", "SCT", "Source")
    for ds in sorted(sources, key=lambda ds: int(ds.get("InstanceNumber") or 0)):
        items.append(hd.sr.ImageContentItem(name=source, referenced_sop_class_uid=str(ds.SOPClassUID),
                                            referenced_sop_instance_uid=str(ds.SOPInstanceUID),
                                            relationship_type="CONTAINS"))
    known = {str(seg.SOPInstanceUID) for seg in segs}
    for turn in turns:
        finding = hd.sr.ContainerContentItem(name=_code("121071", "DCM", "Finding"), relationship_type="CONTAINS")
        children = [_text(_code("121062", "DCM", "Request"), turn.question),
                    _text(_code("121071", "DCM", "Finding"), turn.answer), *model_items(turn.model or model)]
        for expert in turn.experts:
            run = hd.sr.ContainerContentItem(name=_code("111001", "DCM", "Algorithm Name"),
                                             relationship_type="CONTAINS")
            parts = [_text(algorithm, expert.name)]
            if expert.argument:
                parts.append(_text(_code("121106", "DCM", "Comment"), f"argument: {expert.argument}"))
            if expert.stand_in:
                parts.append(_text(comment, f"{expert.name} ran on {STAND_IN_TEXT}."))
            if expert.error:
                parts.append(_text(comment, f"{expert.name} did not finish: {expert.error}"))
            if expert.seg is not None:
                if expert.seg.sop_instance_uid not in known:
                    raise ReportError("a referenced segmentation is not among the report's evidence")
                parts.append(hd.sr.CompositeContentItem(
                    name=_code("121191", "DCM", "Referenced Segment"),
                    referenced_sop_class_uid=expert.seg.sop_class_uid,
                    referenced_sop_instance_uid=expert.seg.sop_instance_uid, relationship_type="CONTAINS"))
            run.ContentSequence = hd.sr.ContentSequence(parts)
            children.append(run)
        finding.ContentSequence = hd.sr.ContentSequence(children)
        items.append(finding)
    root.ContentSequence = hd.sr.ContentSequence(items)
    report = hd.sr.ComprehensiveSR(
        evidence=[*sources, *segs], content=root, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
    )
    report.SeriesDescription = SERIES_DESCRIPTION + (" (stand-in)" if any(used.stand_in for used in models) or any(
        expert.stand_in for turn in turns for expert in turn.experts) else "")
    return report


def report_texts(report: Dataset) -> list[str]:
    """Every TEXT value of a report's content tree, depth first (how tests and clients read it back)."""
    texts: list[str] = []

    def walk(items) -> None:
        for item in items:
            if getattr(item, "ValueType", "") == "TEXT":
                texts.append(str(item.TextValue))
            walk(getattr(item, "ContentSequence", []))

    walk(getattr(report, "ContentSequence", []))
    return texts


def referenced_instances(report: Dataset) -> set[str]:
    """The SOP Instance UIDs a report lists as evidence and in its COMPOSITE items."""
    uids: set[str] = set()
    for study in getattr(report, "CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            uids.update(str(item.ReferencedSOPInstanceUID) for item in series.ReferencedSOPSequence)

    def walk(items) -> None:
        for item in items:
            for ref in getattr(item, "ReferencedSOPSequence", []):
                uids.add(str(ref.ReferencedSOPInstanceUID))
            walk(getattr(item, "ContentSequence", []))

    walk(getattr(report, "ContentSequence", []))
    return uids
