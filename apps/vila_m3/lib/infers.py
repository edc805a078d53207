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

from vila_m3.experts.registry import ExpertSpec, UnknownArgument
from vila_m3.experts.service import ExpertRun, ExpertService
from vila_m3.imaging import VolumeReadError, write_labelmap
from vila_m3.imaging.sequences import SEQUENCE_ORDER, sibling_sequences

logger = logging.getLogger(__name__)
BAD_INPUT = 422


def datastore_path(datastore: Any, image: str) -> str:
    """The file of ``image``: an existing path as it is, else a datastore image id; HTTP 422 if neither."""
    if image and os.path.exists(image):
        return image
    uri = datastore.get_image_uri(image) if image else ""
    if not uri or not os.path.exists(uri):
        raise HTTPException(BAD_INPUT, f"image '{image}' is not in the datastore")
    return uri


def input_errors() -> tuple[type[Exception], ...]:
    """Exception types that mean "the request is wrong", answered with HTTP 422."""
    from vila_m3.experts.result import ExpertInputError

    return (ExpertInputError, UnknownArgument, VolumeReadError, FileNotFoundError)


class ExpertInferTask(InferTask):
    """Common request handling of the expert tasks; subclasses implement ``run``."""

    def __init__(self, service: ExpertService, spec: ExpertSpec, infer_type: str, dimension: int, description: str):
        labels = {name: label_id for label_id, name in sorted(spec.labels.items())}
        super().__init__(type=infer_type, labels=labels, dimension=dimension, description=description)
        self.service = service
        self.spec = spec

    def is_valid(self) -> bool:
        return True

    def run(self, request: dict[str, Any]) -> ExpertRun:
        raise NotImplementedError

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        start = time.perf_counter()
        try:
            outcome = self.run(request)
        except input_errors() as err:
            raise HTTPException(status_code=BAD_INPUT, detail=f"{self.spec.name}: {err}") from None
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
        write_labelmap(result.labels.array, result.labels.geometry, path)
        return path, {"label_names": result.ids_by_name, "argument": result.argument}


class Vista3DInferTask(ExpertInferTask):
    """``POST /infer/vista3d?image=ID`` with params ``{"group": "hepatic tumor"}`` or ``{"label_prompt": [1, 26]}``."""

    def run(self, request: dict[str, Any]) -> ExpertRun:
        label_ids = request.get("label_prompt") or request.get("label_ids")
        if label_ids is not None:
            if not isinstance(label_ids, list) or not all(isinstance(i, int) for i in label_ids):
                raise HTTPException(BAD_INPUT, f"label_prompt must be a list of integer label ids, got {label_ids!r}")
            unknown = sorted(set(label_ids) - set(self.spec.labels))
            if unknown:
                raise HTTPException(BAD_INPUT, f"VISTA3D: unknown label ids {unknown}; valid ids are 1-132")
        return self.service.segment_ct(request["image"], argument=request.get("group"), label_ids=label_ids)


class BratsInferTask(ExpertInferTask):
    """``POST /infer/brats?image=ID`` on one sequence of a study; the other three are found beside it
    by name (``<study>_t1c``, ``_t1``, ``_t2``, ``_flair``) or given as params ``{"sequences": {"t1": ID, ...}}``.
    """

    def __init__(self, service: ExpertService, spec: ExpertSpec, datastore, description: str):
        super().__init__(service, spec, InferType.SEGMENTATION, 3, description)
        self.datastore = datastore

    def sequence_paths(self, request: dict[str, Any]) -> dict[str, str]:
        given = request.get("sequences")
        if given is not None:
            if not isinstance(given, dict):
                raise HTTPException(BAD_INPUT, "sequences must map sequence names (t1c, t1, t2, flair) to image ids")
            return {name: datastore_path(self.datastore, image) for name, image in given.items()}
        found = {name: str(path) for name, path in sibling_sequences(request["image"]).items()}
        return found or {"t1c": request["image"]}

    def run(self, request: dict[str, Any]) -> ExpertRun:
        paths = self.sequence_paths(request)
        logger.info("BRATS sequences: %s", {name: Path(paths[name]).name for name in SEQUENCE_ORDER if name in paths})
        return self.service.segment_brain(paths)


class CxrInferTask(ExpertInferTask):
    """``POST /infer/cxr?image=ID``: the 18 findings' probabilities and yes/no answers, as JSON."""

    def __init__(self, service: ExpertService, spec: ExpertSpec, description: str):
        super().__init__(service, spec, InferType.CLASSIFICATION, 2, description)

    def run(self, request: dict[str, Any]) -> ExpertRun:
        return self.service.classify_cxr(request["image"])

    def answer(self, outcome: ExpertRun) -> tuple[str | None, dict[str, Any]]:
        result = outcome.result
        return None, {
            "probabilities": {name: float(p) for name, p in result.probabilities.items()},
            "answers": {name: "yes" if yes else "no" for name, yes in result.answers.items()},
            "feedback": result.feedback_text(None),
        }
