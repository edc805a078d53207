"""``POST /vila_m3/chat/{chat_id}/report``: the chat's findings as a DICOM Structured Report
(:mod:`vila_m3.reports.dicom_sr`), written only when a client asks for it.

- On a DICOMweb datastore (a PACS): a turn whose result became the series' final label (the final-label SEG in
  the PACS was saved from this chat, or holds the turn's labelmap voxel for voxel) references that SEG; every
  other turn's labelmap is written as a DICOM-SEG of the study's series (:mod:`vila_m3.imaging.dicom_seg`) and
  stored with the SR by STOW-RS through the datastore's DICOMweb client. Every reference resolves in the PACS.
  The answer is the UIDs (``StudyInstanceUID``, ``SeriesInstanceUID``, ``SOPInstanceUID`` of the SR, ``segs``:
  the SEGs stored with it, ``final_label``: the final-label SEG referenced, or null).
- Each turn names the chat model that answered it, as the chat recorded it (a turn of a chat saved before
  models were recorded says so), never the model served now.
- On the folder datastore (or a session) whose study is a DICOM series: the SR (``application/dicom``)
  referencing the series' instances; the experts are listed without a SEG (nothing stored to reference).
- A NIfTI study: 422 "a structured report needs a DICOM study".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

import vila_m3
from lib.pacs_datastore import PacsDatastore
from vila_m3.chat.service import ChatService
from vila_m3.chat.store import Chat
from vila_m3.imaging import read_labelmap
from vila_m3.imaging.dicom_seg import SegAlgorithm, SegError, labelmap_to_seg, read_series
from vila_m3.reports.dicom_sr import (
    ReportError,
    ReportExpert,
    ReportModel,
    ReportTurn,
    SegReference,
    build_report,
    chat_turns,
)
from vila_m3.security.paths import scrub_paths

logger = logging.getLogger(__name__)
NEEDS_DICOM = "a structured report needs a DICOM study"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage


class ChatReports:
    """Builds (and on a PACS stores) the SR of a chat; ``files`` resolves the chat's study id."""

    def __init__(self, service: ChatService, files: Any):
        self.service = service
        self.files = files

    @property
    def pacs(self) -> PacsDatastore | None:
        datastore = getattr(self.files, "datastore", None)
        return datastore if isinstance(datastore, PacsDatastore) else None

    def sources(self, chat: Chat) -> tuple[list[Dataset], bool]:
        """The DICOM instances of the chat's study and whether it is a PACS series; 422 for a NIfTI study or
        one the server no longer has."""
        study_id = str((chat.study or {}).get("image") or "")
        if not study_id:
            raise HTTPException(422, NEEDS_DICOM)
        pacs = self.pacs
        on_pacs = pacs is not None and study_id in pacs.list_images()
        if on_pacs:
            folder = pacs.series_folder(study_id)
            if folder is None:
                raise HTTPException(422, f"study '{study_id[:80]}' could not be read from the PACS")
        else:
            path = Path(self._local_path(study_id))
            # a DICOM series folder, or a session's folder of uploaded DICOM files; a NIfTI file is no series
            folder = path if path.is_dir() else path.parent
            if not path.is_dir() and not (path.suffix.lower() == ".dcm" or any(folder.glob("*.dcm"))):
                raise HTTPException(422, NEEDS_DICOM)
        try:
            return read_series(folder), on_pacs
        except SegError:
            raise HTTPException(422, NEEDS_DICOM) from None

    def _local_path(self, study_id: str) -> str:
        try:
            return self.files.image(study_id)
        except HTTPException:
            return self.files.session(study_id)

    @staticmethod
    def unrecorded_model() -> ReportModel:
        """What a turn of a chat saved before models were recorded names (never the model served now)."""
        return ReportModel("VILA-M3 (the model that answered was not recorded in the chat)", "unknown")

    def _expert_stand_in(self, name: str) -> bool:
        experts = self.service.experts
        try:
            spec = self.service.registry.get(name)
            return any(experts.manifest[weights].is_stand_in(experts.models_dir) for weights in spec.weights)
        except Exception:  # an expert no longer configured: nothing to say about its weights
            return False

    def _labels_file(self, chat: Chat, turn: ReportTurn) -> Path:
        """The labelmap the turn's experts left in the chat's folder (it may not exist)."""
        return self.service.store.folder(chat.chat_id) / f"turn{turn.number:03d}_labels.nii.gz"

    def _turn_seg(self, chat: Chat, turn: ReportTurn, sources: list[Dataset]) -> tuple[Dataset | None, int]:
        """The SEG of the turn's labelmap (``turnNNN_labels.nii.gz``) and the index of the expert that made it."""
        path = self._labels_file(chat, turn)
        runs = [(index, expert) for index, expert in enumerate(turn.experts) if not expert.error]
        specs = [(index, self.service.registry.get(expert.name)) for index, expert in runs
                 if expert.name in {spec.name for spec in self.service.registry.configured}]
        specs = [(index, spec) for index, spec in specs if spec.labels]
        if not path.is_file() or not specs:
            return None, -1
        index, spec = specs[-1]  # the turn's labelmap is its last segmentation's
        labels = read_labelmap(path)
        geometry = labels.geometry
        names = dict(spec.ids_by_name)
        colors = {name: tuple(int(c) for c in spec.label_color(value)) for name, value in names.items()}
        algorithm = SegAlgorithm(spec.name, f"vila-m3 {vila_m3.__version__}", stand_in=turn.experts[index].stand_in)
        seg = labelmap_to_seg(labels.array, (geometry.spacing, geometry.origin, geometry.direction), sources,
                              names, colors, algorithm, series_number=902)
        return seg, index

    def final_label(self, chat: Chat) -> tuple[Dataset, np.ndarray, bool] | None:
        """The final label of the chat's PACS series, through the datastore's label methods: the SEG instance's
        attributes (as the PACS holds them), its labelmap on the image's grid, and whether it was saved from this
        chat on this server; None without one (or off a PACS)."""
        pacs = self.pacs
        study_id = str((chat.study or {}).get("image") or "")
        seg_uid = (pacs.get_labels_by_image_id(study_id) or {}).get(DefaultLabelTag.FINAL) if pacs else None
        if not seg_uid:
            return None
        path = pacs.get_label_uri(seg_uid, DefaultLabelTag.FINAL)
        try:
            study = str(pacs.series_info(seg_uid).StudyInstanceUID)
            meta = Dataset.from_json(pacs._client.retrieve_series_metadata(study, seg_uid)[0])
            labels = read_labelmap(path).array if path else None
        except Exception as err:  # unreadable or gone: the report makes its own SEGs
            logger.warning("final label SEG %s of the chat's series not usable: %s", seg_uid, str(err)[:200])
            return None
        if labels is None:
            return None
        saved_here = pacs.get_label_info(seg_uid, DefaultLabelTag.FINAL).get("chat_id") == chat.chat_id
        return meta, labels, saved_here

    def build(self, chat: Chat) -> tuple[Dataset, list[Dataset], bool]:
        """The SR of ``chat``, the SEGs to store with it (none off a PACS; the final-label SEG it references is
        in the PACS already) and whether the study is a PACS series (the report goes there). HTTP 422 with the
        reason."""
        sources, on_pacs = self.sources(chat)
        turns = [ReportTurn(turn.question, turn.answer,
                            [ReportExpert(e.name, e.argument, self._expert_stand_in(e.name), None, e.error)
                             for e in turn.experts], turn.number, turn.model) for turn in chat_turns(chat)]
        segs: list[Dataset] = []
        final = self.final_label(chat) if on_pacs else None
        final_used = False
        try:
            if on_pacs:
                last_with_seg = max((turn.number for turn in turns if self._labels_file(chat, turn).is_file()),
                                    default=None)
                for position, turn in enumerate(turns):
                    seg, index = self._turn_seg(chat, turn, sources)
                    if seg is None:
                        continue
                    reference = SegReference.of(seg)
                    if final is not None and ((final[2] and turn.number == last_with_seg) or np.array_equal(
                            read_labelmap(self._labels_file(chat, turn)).array, final[1])):
                        reference, final_used = SegReference.of(final[0]), True  # the result became the final label
                    else:
                        segs.append(seg)
                    experts = list(turn.experts)
                    expert = experts[index]
                    experts[index] = ReportExpert(expert.name, expert.argument, expert.stand_in, reference, expert.error)
                    turns[position] = ReportTurn(turn.question, turn.answer, experts, turn.number, turn.model)
            evidence = [*segs, *([final[0]] if final is not None and final_used else [])]
            report = build_report(turns, sources, self.unrecorded_model(), segs=evidence)
        except (ReportError, SegError, ValueError, OSError) as err:
            raise HTTPException(422, f"report: {scrub_paths(str(err))}") from None
        return report, segs, on_pacs

    def store(self, report: Dataset, segs: list[Dataset]) -> dict[str, Any]:
        """STOW-RS of the SEGs and the SR to the PACS; the UIDs."""
        pacs = self.pacs
        assert pacs is not None
        try:
            pacs._client.store_instances([*segs, report])
        except Exception as err:  # refused or unreachable: the client gets no host, the log says what happened
            logger.warning("the PACS did not store the chat report: %s", scrub_paths(str(err))[:300])
            raise HTTPException(502, "the PACS did not store the report (see the server log)") from None
        logger.info("chat report stored in the PACS as SR series %s with %d SEG", report.SeriesInstanceUID, len(segs))
        return {
            "StudyInstanceUID": str(report.StudyInstanceUID),
            "SeriesInstanceUID": str(report.SeriesInstanceUID),
            "SOPInstanceUID": str(report.SOPInstanceUID),
            "segs": [{"SeriesInstanceUID": str(seg.SeriesInstanceUID), "SOPInstanceUID": str(seg.SOPInstanceUID)}
                     for seg in segs],
            "final_label": _referenced_final_label(report, segs),
        }


def _referenced_final_label(report: Dataset, stored: list[Dataset]) -> dict[str, str] | None:
    """The UIDs of the SEG among the report's evidence that was not stored with it (the final label), or None."""
    new = {str(seg.SOPInstanceUID) for seg in stored}
    for study in getattr(report, "CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for item in series.ReferencedSOPSequence:
                if str(item.ReferencedSOPClassUID) == SEG_SOP_CLASS and str(item.ReferencedSOPInstanceUID) not in new:
                    return {"SeriesInstanceUID": str(series.SeriesInstanceUID),
                            "SOPInstanceUID": str(item.ReferencedSOPInstanceUID)}
    return None


def dicom_bytes(report: Dataset) -> bytes:
    """The report as a DICOM Part 10 file."""
    from io import BytesIO

    buffer = BytesIO()
    report.save_as(buffer, write_like_original=False)
    return buffer.getvalue()

