"""The experts as MONAI Label infer tasks: ``vista3d``, ``brats`` and ``cxr``.

Each task turns a MONAI Label request into a call of the shared ``ExpertService`` and its result
into MONAI Label's usual answer: a labelmap file plus JSON with ``label_names`` and latencies.
Bad input becomes an HTTP 4xx with a message that names the problem; nothing is saved then.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.datastore import StudyFiles
from vila_m3.experts.registry import ExpertSpec, UnknownArgument
from vila_m3.experts.service import ExpertRun, ExpertService
from vila_m3.imaging import VolumeReadError, save_labelmap
from vila_m3.imaging.sequences import SEQUENCE_ALIASES, SEQUENCE_ORDER, sibling_sequences
from vila_m3.security.paths import scrub_paths
from vila_m3.work_queue import QueueFull

logger = logging.getLogger(__name__)
BAD_INPUT = 422


def datastore_path(datastore: Any, image: str) -> str:
    """The file of datastore image id ``image``; HTTP 422 for anything else (server paths are never accepted,
    and the answer is the same whether or not such a path exists)."""
    return StudyFiles(datastore).image(image)


def client_message(err: BaseException, files: dict[str, str] | None = None) -> str:
    """``err``'s text for a client: the request's files named by their ids, any other server path by its
    file name only (the full text stays in the server log)."""
    return scrub_paths(str(err), files)


def input_errors() -> tuple[type[Exception], ...]:
    """Exception types that mean "the request is wrong", answered with HTTP 422."""
    from vila_m3.experts.result import ExpertInputError

    return (ExpertInputError, UnknownArgument, VolumeReadError, FileNotFoundError)


class ExpertInferTask(InferTask):
    """Common request handling of the expert tasks; subclasses implement ``run``."""

    def __init__(self, service: ExpertService, spec: ExpertSpec, infer_type: str, dimension: int, description: str,
                 files: StudyFiles):
        labels = {name: label_id for label_id, name in sorted(spec.labels.items())}
        super().__init__(type=infer_type, labels=labels, dimension=dimension, description=description)
        self.service = service
        self.spec = spec
        self.files = files

    def is_valid(self) -> bool:
        return True

    def run(self, request: dict[str, Any]) -> ExpertRun:
        raise NotImplementedError

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        start = time.perf_counter()
        request = dict(request)
        # only a file the server put in the datastore, a session or its upload folder (never a client's path)
        request["image"] = self.files.trusted(request.get("image"))
        image_id = request.get("image_id")  # a datastore file is named by its id; others by their file name
        named = {request["image"]: image_id} if self.files.is_image_of(request["image"], image_id) else {}
        try:
            outcome = self.run(request)
        except input_errors() as err:
            logger.info("%s refused its input: %s", self.spec.name, err)
            raise HTTPException(status_code=BAD_INPUT, detail=f"{self.spec.name}: {client_message(err, named)}") from None
        except QueueFull as err:  # the device's work queue is full: 503 with Retry-After (a cached result never waits)
            logger.info("%s refused: %s", self.spec.name, err)
            raise HTTPException(503, f"{self.spec.name}: the server is busy ({err.waiting} jobs wait for "
                                     f"{err.device}); try again in {err.retry_after_s} s",
                                headers={"Retry-After": str(err.retry_after_s)}) from None
        label_file, answer = self.answer(outcome)
        answer["latencies"] = {**outcome.timings, "total": round(time.perf_counter() - start, 4)}
        answer["cached"] = outcome.cached
        answer["expert"] = self.spec.name
        answer["stand_in"] = bool(getattr(outcome.result, "stand_in", False))
        if answer["stand_in"]:
            note = getattr(outcome.result, "stand_in_note", None) or "random weights; not a medical model"
            answer["notice"] = f"stand-in weights ({note}): this result is not a medical model's output"
        return label_file, answer

    def answer(self, outcome: ExpertRun) -> tuple[str | None, dict[str, Any]]:
        """A segmentation result as a temporary NIfTI labelmap plus its label names."""
        result = outcome.result
        handle, path = tempfile.mkstemp(suffix=".nii.gz", prefix=f"{self.spec.name.lower()}-")
        os.close(handle)
        save_labelmap(result.labels, path)  # encoded once per result; a cached repeat writes the same bytes
        return path, {"label_names": result.ids_by_name, "argument": result.argument}


class Vista3DInferTask(ExpertInferTask):
    """``POST /infer/vista3d?image=ID`` with params ``{"group": "hepatic tumor"}`` or ``{"label_prompt": [1, 26]}``."""

    def run(self, request: dict[str, Any]) -> ExpertRun:
        group = request.get("group")
        if group is not None and (not isinstance(group, str) or not group.strip()):
            raise HTTPException(BAD_INPUT, f"VISTA3D: group must be one group name as text, e.g. 'hepatic tumor'; "
                                           f"valid groups are {self.spec.valid_args_text()}")
        label_ids = request.get("label_prompt") or request.get("label_ids")
        if label_ids is not None:
            if not isinstance(label_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in label_ids):
                raise HTTPException(BAD_INPUT, "VISTA3D: label_prompt must be a list of integer label ids, e.g. [1, 26]")
            unknown = sorted(set(label_ids) - set(self.spec.labels))
            if unknown:
                raise HTTPException(BAD_INPUT, f"VISTA3D: unknown label ids {unknown}; valid ids are 1-132")
        return self.service.segment_ct(request["image"], argument=request.get("group"), label_ids=label_ids)


class BratsInferTask(ExpertInferTask):
    """``POST /infer/brats?image=ID`` on one sequence of a study; the other three are found beside it
    by name (``<study>_t1c``, ``_t1``, ``_t2``, ``_flair``) or given as params ``{"sequences": {"t1": ID, ...}}``.
    """

    def __init__(self, service: ExpertService, spec: ExpertSpec, files: StudyFiles, description: str):
        super().__init__(service, spec, InferType.SEGMENTATION, 3, description, files)

    def sequence_paths(self, request: dict[str, Any]) -> dict[str, str]:
        given = request.get("sequences")
        if given is not None:
            if not isinstance(given, dict):
                raise HTTPException(BAD_INPUT, "sequences must map sequence names (t1c, t1, t2, flair) to image ids")
            for name, image in given.items():
                if SEQUENCE_ALIASES.get(str(name).lower()) is None:
                    raise HTTPException(BAD_INPUT, "BRATS: sequences: keys must be t1c, t1, t2 and flair")
                if not isinstance(image, str) or not image.strip():
                    raise HTTPException(BAD_INPUT, f"BRATS: sequences.{SEQUENCE_ALIASES[str(name).lower()]} must be an "
                                                   "image id (text)")
            return {name: self.files.named(image, f"sequences.{name}") for name, image in given.items()}
        in_pacs = getattr(self.files.datastore, "study_sequences", None)  # a PACS: by series description
        if in_pacs is not None and request.get("image_id"):
            found = {name: self.files.trusted(path) for name, path in in_pacs(str(request["image_id"])).items()}
            if found:
                return found
        found = {name: self.files.trusted(str(path)) for name, path in sibling_sequences(request["image"]).items()}
        return found or {"t1c": request["image"]}

    def run(self, request: dict[str, Any]) -> ExpertRun:
        paths = self.sequence_paths(request)
        logger.info("BRATS sequences: %s", {name: Path(paths[name]).name for name in SEQUENCE_ORDER if name in paths})
        return self.service.segment_brain(paths)


class CxrInferTask(ExpertInferTask):
    """``POST /infer/cxr?image=ID``: the 18 findings' probabilities and yes/no answers, as JSON."""

    def __init__(self, service: ExpertService, spec: ExpertSpec, description: str, files: StudyFiles):
        super().__init__(service, spec, InferType.CLASSIFICATION, 2, description, files)

    def run(self, request: dict[str, Any]) -> ExpertRun:
        return self.service.classify_cxr(request["image"])

    def answer(self, outcome: ExpertRun) -> tuple[str | None, dict[str, Any]]:
        result = outcome.result
        return None, {
            "probabilities": {name: float(p) for name, p in result.probabilities.items()},
            "answers": {name: "yes" if yes else "no" for name, yes in result.answers.items()},
            "feedback": result.feedback_text(None),
        }
