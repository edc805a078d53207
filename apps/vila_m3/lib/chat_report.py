"""``POST /vila_m3/chat/{chat_id}/report``: the chat's findings as a DICOM Structured Report
(:mod:`vila_m3.reports.dicom_sr`), written only when a client asks for it.

- On a DICOMweb datastore (a PACS): each turn's labelmap is written as a DICOM-SEG of the study's series
  (:mod:`vila_m3.imaging.dicom_seg`) and stored with the SR by STOW-RS through the datastore's DICOMweb
  client; the answer is the UIDs (``StudyInstanceUID``, ``SeriesInstanceUID``, ``SOPInstanceUID`` of the SR,
  ``segs``: the SEGs' UIDs).
- On the folder datastore (or a session) whose study is a DICOM series: the SR (``application/dicom``)
  referencing the series' instances; the experts are listed without a SEG (nothing stored to reference).
- A NIfTI study: 422 "a structured report needs a DICOM study".
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from fastapi import HTTPException
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

    def model(self) -> ReportModel:
        info = self.service.loop().vlm_info
        version = f"{info.get('version') or 'base'}; VILA-M3 {vila_m3.__version__}"
        name = re.sub(r"\s+at\s+\S+://\S*", "", str(info.get("name") or "VILA-M3"))  # never the VLM's host
        return ReportModel(name, version, bool(info.get("stand_in")))

    def _expert_stand_in(self, name: str) -> bool:
        experts = self.service.experts
        try:
            spec = self.service.registry.get(name)
            return any(experts.manifest[weights].is_stand_in(experts.models_dir) for weights in spec.weights)
        except Exception:  # an expert no longer configured: nothing to say about its weights
            return False

    def _turn_seg(self, chat: Chat, turn: ReportTurn, sources: list[Dataset]) -> tuple[Dataset | None, int]:
        """The SEG of the turn's labelmap (``turnNNN_labels.nii.gz``) and the index of the expert that made it."""
        path = self.service.store.folder(chat.chat_id) / f"turn{turn.number:03d}_labels.nii.gz"
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

    def build(self, chat: Chat) -> tuple[Dataset, list[Dataset], bool]:
        """The SR of ``chat``, the SEGs it references (none off a PACS) and whether the study is a PACS series
        (the report goes there). HTTP 422 with the reason."""
        sources, on_pacs = self.sources(chat)
        turns = [ReportTurn(turn.question, turn.answer,
                            [ReportExpert(e.name, e.argument, self._expert_stand_in(e.name), None, e.error)
                             for e in turn.experts], turn.number) for turn in chat_turns(chat)]
        segs: list[Dataset] = []
        try:
            if on_pacs:
                for position, turn in enumerate(turns):
                    seg, index = self._turn_seg(chat, turn, sources)
                    if seg is None:
                        continue
                    segs.append(seg)
                    experts = list(turn.experts)
                    expert = experts[index]
                    experts[index] = ReportExpert(expert.name, expert.argument, expert.stand_in,
                                                  SegReference.of(seg), expert.error)
                    turns[position] = ReportTurn(turn.question, turn.answer, experts, turn.number)
            report = build_report(turns, sources, self.model(), segs=segs)
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
        }


def dicom_bytes(report: Dataset) -> bytes:
    """The report as a DICOM Part 10 file."""
    from io import BytesIO

    buffer = BytesIO()
    report.save_as(buffer, write_like_original=False)
    return buffer.getvalue()

