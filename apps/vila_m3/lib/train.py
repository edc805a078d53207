"""The ``vila_m3`` train task and the routes that show and switch the fine-tuned versions.

``POST /train/vila_m3`` (MONAI Label runs it in its usual background process; ``GET /train/`` shows
its progress lines): export the datastore's final labels and the stored chats with the data engine,
fine-tune the checkpoint being served on that export, and register the result as a new version,
which the chat serves from its next turn. Request fields are the options of ``configs/training.yaml``
(``max_steps``, ``epochs``, ``learning_rate``, ``parts``, ``lora_enabled``, ...) plus ``seed`` (the
export's) and ``activate`` (default true). A failed run registers nothing and changes nothing served.

``GET /vila_m3/versions/``: the versions and which one is served; ``PUT /vila_m3/versions/current?version=
v0001|base`` (admin): serve another one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.tasks.train import TrainTask

from vila_m3.data import export_from_app
from vila_m3.training.options import TrainingOptions, TrainingOptionsError
from vila_m3.training.trainer import fine_tune
from vila_m3.training.versions import ModelVersions, VersionError

logger = logging.getLogger(__name__)

_NOT_OPTIONS = {"model", "device", "gpus", "seed", "activate", "local_rank", "dataset", "name"}


class VilaM3TrainTask(TrainTask):
    """Fine-tune the served VILA-M3 checkpoint on the datastore's export.

    Args:
        versions: the fine-tuned versions of the served VLM.
        base_checkpoint: the checkpoint fine-tuned when no version is served yet.
        studies: the datastore (a local studies folder or a DICOMweb URL).
        chats_dir: the stored chats, exported with the final labels.
        description: shown in ``/info/``.
    """

    def __init__(self, versions: ModelVersions, base_checkpoint: Path, studies: str, chats_dir: Path,
                 description: str):
        super().__init__(description)
        self.versions = versions
        self.base_checkpoint = base_checkpoint
        self.studies = studies
        self.chats_dir = chats_dir

    def config(self) -> dict[str, Any]:
        options = TrainingOptions.from_config().as_dict()
        lora = options.pop("lora")
        return {**options, **{f"lora_{key}": value for key, value in lora.items()}, "seed": 0, "activate": True}

    def stats(self) -> dict[str, Any]:
        return self.versions.read()

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        overrides = {key: value for key, value in request.items() if key not in _NOT_OPTIONS}
        try:
            options = TrainingOptions.from_config(overrides)
        except TrainingOptionsError as err:
            raise ValueError(f"train request: {err}") from None
        base = self.versions.checkpoint() or self.base_checkpoint
        version, run = self.versions.reserve()
        print(f"{version}: exporting conversations from {self.studies}", flush=True)
        export = export_from_app(self.studies, str(self.chats_dir), str(run / "data"), int(request.get("seed", 0)))
        counts = export.get("counts", {})
        print(f"{version}: export done ({counts}); fine-tuning {base}", flush=True)
        result = fine_tune(base, run / "data", run, options, progress=False)
        summary = {
            "base": str(base),
            "steps": result.metrics["steps"],
            "train_loss": result.metrics["train_loss"],
            "eval_loss": result.metrics["eval_loss"],
            "train_records": result.metrics["train_records"],
        }
        activate = request.get("activate", True) not in (False, "false", "False", 0)
        self.versions.register(version, summary, make_current=activate)
        print(f"{version}: registered{' and served' if activate else ''}: {result.checkpoint}", flush=True)
        return {"version": version, "checkpoint": str(result.checkpoint), **summary}


def versions_router(versions: ModelVersions) -> APIRouter:
    """``GET /vila_m3/versions/`` and ``PUT /vila_m3/versions/current``."""
    router = APIRouter(prefix="/vila_m3/versions", tags=["VILA-M3 fine-tuned versions"])
    user_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)
    admin_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)

    @router.get("/", summary="Fine-tuned versions of the chat's VLM and the one being served")
    async def list_versions(user: User = Depends(user_role)) -> dict[str, Any]:
        return versions.read()

    @router.put("/current", summary="Serve another version (or 'base') from the next chat turn (admin)")
    async def use_version(version: str, user: User = Depends(admin_role)) -> dict[str, Any]:
        try:
            versions.use(version)
        except VersionError as err:
            raise HTTPException(422, str(err)) from None
        return versions.read()

    return router
