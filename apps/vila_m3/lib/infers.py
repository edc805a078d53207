"""The experts as MONAI Label infer tasks: one task class, :class:`ExpertInferTask`, built per expert of the
registry (``vista3d``, ``brats``, ``cxr`` and any expert added by an experts file).

Each task turns a MONAI Label request into a study and an argument (the expert's runner reads the
params: ``request_argument``), runs the expert through the shared ``ExpertService`` and answers as MONAI
Label does: a labelmap file for a segmentation plus JSON (the runner's ``answer``) with latencies.
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
from vila_m3.experts.registry import (
    EXPERTS_ENV,
    ExpertSpec,
    UnknownArgument,
    env_experts_files,
)
from vila_m3.experts.service import ExpertRun, ExpertService
from vila_m3.imaging import Volume, VolumeReadError, save_labelmap
from vila_m3.imaging.sequences import SEQUENCE_ALIASES, sibling_sequences
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
    """``POST /infer/<task>?image=ID`` for one expert of the registry, through its runner.

    The request's study: the image, or, for a runner whose ``inputs`` are several images (BRATS: the
    four MRI sequences), params ``{"sequences": {"t1": ID, ...}}``, else the PACS study's series, else the
    files beside the image named ``<study>_t1c``, ``_t1``, ``_t2``, ``_flair``. The argument: the runner's
    ``request_argument(params)`` (VISTA3D: ``{"group": "hepatic tumor"}`` or ``{"label_prompt": [1, 26]}``).

    Args:
        service: the server's experts.
        spec: the expert (its labels are the task's labels; ``output`` gives the task type).
        description: the task's text in ``/info/``.
        files: what clients name, resolved.
    """

    def __init__(self, service: ExpertService, spec: ExpertSpec, description: str, files: StudyFiles):
        labels = {name: label_id for label_id, name in sorted(spec.labels.items())}
        segmentation = spec.output == "segmentation"
        super().__init__(type=InferType.SEGMENTATION if segmentation else InferType.CLASSIFICATION, labels=labels,
                         dimension=3 if segmentation else 2, description=description)
        self.service = service
        self.spec = spec
        self.files = files

    def is_valid(self) -> bool:
        return True

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

    def run(self, request: dict[str, Any]) -> ExpertRun:
        """The expert on the request's study, for the argument its params ask for."""
        runner = self.service.runner(self.spec.name)
        argument = runner.request_argument(request)
        paths = self.study_paths(request, tuple(runner.inputs))
        study = self.service.open_study(paths, self.spec.name)
        return self.service.run_expert(self.spec.name, study, argument)

    def answer(self, outcome: ExpertRun) -> tuple[str | None, dict[str, Any]]:
        """The runner's JSON, and a segmentation's labelmap as a temporary NIfTI file."""
        result = outcome.result
        body = self.service.runner(self.spec.name).answer(result)
        labels = getattr(result, "labels", None)
        if not isinstance(labels, Volume):
            return None, body
        handle, path = tempfile.mkstemp(suffix=".nii.gz", prefix=f"{self.spec.name.lower()}-")
        os.close(handle)
        save_labelmap(labels, path)  # encoded once per result; a cached repeat writes the same bytes
        return path, body

    def study_paths(self, request: dict[str, Any], inputs: tuple[str, ...]) -> dict[str, str]:
        """``{"image": path}``, or for several inputs (MRI sequences) ``{sequence: path}``."""
        if len(inputs) <= 1:
            return {"image": request["image"]}
        given = request.get("sequences")
        if given is not None:
            if not isinstance(given, dict):
                raise HTTPException(BAD_INPUT, "sequences must map sequence names (t1c, t1, t2, flair) to image ids")
            for name, image in given.items():
                if SEQUENCE_ALIASES.get(str(name).lower()) is None:
                    raise HTTPException(BAD_INPUT, f"{self.spec.name}: sequences: keys must be t1c, t1, t2 and flair")
                if not isinstance(image, str) or not image.strip():
                    raise HTTPException(BAD_INPUT, f"{self.spec.name}: sequences.{SEQUENCE_ALIASES[str(name).lower()]} "
                                                   "must be an image id (text)")
            return {name: self.files.named(image, f"sequences.{name}", request.get("user"))  # owner rule
                    for name, image in given.items()}
        in_pacs = getattr(self.files.datastore, "study_sequences", None)  # a PACS: by series description
        if in_pacs is not None and request.get("image_id"):
            found = {name: self.files.trusted(path) for name, path in in_pacs(str(request["image_id"])).items()}
            if found:
                return found
        found = {name: self.files.trusted(str(path)) for name, path in sibling_sequences(request["image"]).items()}
        found = found or {inputs[0]: request["image"]}
        logger.info("%s sequences: %s", self.spec.name, {name: Path(path).name for name, path in found.items()})
        return found


def use_experts_files(conf: dict[str, str]) -> tuple[str, ...]:
    """Add ``--conf experts_file`` (comma-separated paths) to ``$VILA_M3_EXPERTS`` for this server process, so
    every reader of the expert registry (task statuses, chat, infer tasks) sees the same experts. Returns the
    extra files now in effect."""
    given = [p.strip() for p in str(conf.get("experts_file") or "").split(",") if p.strip()]
    files = [str(p) for p in env_experts_files()]
    files += [str(Path(p).expanduser().resolve()) for p in given if str(Path(p).expanduser().resolve()) not in files]
    if files:
        os.environ[EXPERTS_ENV] = os.pathsep.join(files)
    return tuple(files)
