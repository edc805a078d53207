"""The ``vila_m3`` train task and the routes that show and switch the fine-tuned versions.

``POST /train/vila_m3`` (MONAI Label runs it in its usual background process; ``GET /train/`` shows
its progress lines): export the datastore's final labels and the stored chats with the data engine,
fine-tune the checkpoint being served on that export, and register the result as a new version,
which the chat serves from its next turn. Request fields are the options of ``configs/training.yaml``
(``max_steps``, ``epochs``, ``learning_rate``, ``parts``, ``lora_enabled``, ...) plus ``seed`` (the
export's), ``activate`` (default true) and ``export``: the name of an export an admin made with
``POST /vila_m3/datagen/`` to train on instead of a fresh one. A failed run registers nothing and
changes nothing served.

Every field of a request is checked before anything starts (types from the options' dataclasses, finite
numbers, ranges, known keys, allowed values): a bad one is answered 422 naming it, not found 20 s later in the
background. MONAI Label's ``AsyncTask.run`` logs the whole request ("Train request: {...}"), puts it on the
background process's command line and returns it in ``GET /train/``: so what reaches it is the checked request
rebuilt from its validated fields (numbers, flags, and text only from a fixed list or an id pattern: ``name``,
``dataset``, ``gpus``, ``export``, ``lr_scheduler``...), never a value as the client typed it.
MONAI Label's ``POST /train/`` (every trainer, nothing checked) answers 501 (:func:`train_router`), and a
server without the train task (a remote chat VLM) still answers ``POST /train/{model}`` here: 422.

Privacy: an export whose privacy check failed is never trained on. A named ``export`` is checked
before anything starts (:func:`train_router` replaces MONAI Label's ``POST /train/{model}``: 422 for
an unknown name, 409 for a failed or unconfirmed check); a fresh export is checked when it is made,
in the background task, which then ends in ERROR with the reason and trains nothing.

``GET /vila_m3/versions/``: the versions and which one is served; ``PUT /vila_m3/versions/current?version=
v0001|base`` (admin): serve another one.
"""

from __future__ import annotations

import logging
import re
import typing
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from monailabel.config import RBAC_ADMIN, settings
from monailabel.endpoints.train import run_model
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.tasks.train import TrainTask
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model
from transformers.trainer_utils import SchedulerType

from lib.datastore_source import app_source
from vila_m3.chat.params import describe_validation_error
from vila_m3.data import export_from_app
from vila_m3.data.privacy import PRIVACY_CHECK, export_privacy_problem
from vila_m3.security.paths import scrub_paths
from vila_m3.training.options import (
    DEVICES,
    PARTS,
    PRECISIONS,
    LoraOptions,
    TrainingOptions,
    TrainingOptionsError,
)
from vila_m3.training.trainer import fine_tune
from vila_m3.training.versions import ModelVersions, VersionError

logger = logging.getLogger(__name__)

_NOT_OPTIONS = {"model", "device", "gpus", "seed", "activate", "local_rank", "dataset", "name", "export"}
_EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: MONAI Label's own request keys: a run name, its dataset classes, GPUs ("all" or a comma list of indices).
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DATASETS = ("Dataset", "CacheDataset", "PersistentDataset", "SmartCacheDataset")
GPUS_PATTERN = r"^(all|[0-9]{1,3}(,[0-9]{1,3}){0,63})$"
#: The learning-rate schedules of transformers' Trainer (``lr_scheduler_type``).
LR_SCHEDULERS = tuple(schedule.value for schedule in SchedulerType)


def _Text(pattern: str, expected: str) -> Any:  # noqa: N802 (a type)
    """Text matching ``pattern`` (anchored); a mismatch says ``must be <expected>`` without echoing the text."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"must be {expected}")
        return value

    return typing.Annotated[str, AfterValidator(check)]


def _check_parts(value: str | list[str]) -> str | list[str]:
    """``parts`` as a comma list or a list of :data:`PARTS`; a mismatch names them without echoing the value."""
    items = value.split(",") if isinstance(value, str) else value
    if not items or any(item.strip() not in PARTS for item in items):
        raise ValueError(f"must be a comma list or a list of {', '.join(PARTS)}")
    return value


#: The fields with text values and what they allow; every other field is a number or a flag.
_TEXT_FIELDS: dict[str, Any] = {
    "lr_scheduler": (typing.Literal[LR_SCHEDULERS] | None, None),  # type: ignore[valid-type]
    "precision": (typing.Literal[PRECISIONS] | None, None),  # type: ignore[valid-type]
    "device": (typing.Literal[DEVICES] | None, None),  # type: ignore[valid-type]
    "parts": (typing.Annotated[str | list[str], AfterValidator(_check_parts)] | None, None),
    "name": (_Text(RUN_NAME_PATTERN, "a run name: 1-64 letters, digits, '_', '-' or '.', starting with a letter "
                                     "or digit") | None, None),
    "dataset": (typing.Literal[DATASETS] | None, None),  # type: ignore[valid-type]
    "gpus": (_Text(GPUS_PATTERN, "'all' or a comma list of GPU indices, e.g. 0,1") | None, None),
    "export": (str | None, None),  # checked by VilaM3TrainTask.named_export before anything starts
}


def _request_model(model: str) -> type[BaseModel]:
    """The types of a train request's fields, from the options' own dataclasses (one source of truth):
    strict (``"abc"`` or ``true`` is no step count), finite numbers, no unknown keys, text only from
    :data:`_TEXT_FIELDS`'s lists and patterns; ``model`` (MONAI Label's key) must be the route's model."""
    fields: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(TrainingOptions).items():
        if name not in ("lora", "parts"):
            fields[name] = (hint | None, None)
    lora: dict[str, Any] = {name: (hint | None, None) for name, hint in typing.get_type_hints(LoraOptions).items()}
    config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
    fields["lora"] = (create_model("LoraRequest", __config__=config, **lora) | None, None)
    fields.update({f"lora_{name}": field for name, field in lora.items()})
    fields["activate"] = (bool | None, Field(None, strict=False))  # "false" is accepted, as before
    fields["local_rank"] = (int | None, Field(None, ge=0, le=1023))
    fields["model"] = (typing.Literal[model] | None, None)  # type: ignore[valid-type]
    fields.update(_TEXT_FIELDS)
    return create_model("TrainRequest", __config__=config, **fields)


TrainRequest = _request_model("vila_m3")


class TrainRefused(ValueError):
    """A train request that must not start; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class VilaM3TrainTask(TrainTask):
    """Fine-tune the served VILA-M3 checkpoint on the datastore's export.

    Args:
        versions: the fine-tuned versions of the served VLM.
        base_checkpoint: the checkpoint fine-tuned when no version is served yet.
        studies: the datastore (a local studies folder or a DICOMweb URL).
        chats_dir: the stored chats, exported with the final labels.
        description: shown in ``/info/``.
        exports_dir: the admins' exports (``POST /vila_m3/datagen/``), which a request may name.
    """

    def __init__(self, versions: ModelVersions, base_checkpoint: Path, studies: str, chats_dir: Path,
                 description: str, exports_dir: Path | None = None):
        super().__init__(description)
        self.versions = versions
        self.base_checkpoint = base_checkpoint
        self.studies = studies
        self.chats_dir = chats_dir
        self.exports_dir = exports_dir

    def check_options(self, request: dict[str, Any]) -> TrainingOptions:
        """The training options of a request, every field checked (types, finite numbers, ranges, known keys).

        Raises:
            TrainRefused: 422 naming each problem.
        """
        return self.checked_request(request)[1]

    def checked_request(self, request: Any) -> tuple[dict[str, Any], TrainingOptions]:
        """(the request rebuilt from its validated fields only, its training options): the rebuilt request is
        what MONAI Label may log, pass on a command line and show in ``GET /train/``.

        Raises:
            TrainRefused: 422 naming each problem (never echoing a value).
        """
        if not isinstance(request, dict):
            raise TrainRefused(422, "train: the request must be a JSON object")
        try:
            checked = TrainRequest.model_validate(request).model_dump(exclude_unset=True)
        except ValidationError as err:
            raise TrainRefused(422, describe_validation_error(err, prefix="train")) from None
        try:
            options = TrainingOptions.from_config({key: value for key, value in checked.items()
                                                   if key not in _NOT_OPTIONS})
        except (TrainingOptionsError, TypeError, ValueError) as err:
            raise TrainRefused(422, f"train: {err}") from None
        return checked, options

    def named_export(self, request: dict[str, Any]) -> Path | None:
        """The export a request names (``export``), checked; None when it names none (a fresh export is made).

        Raises:
            TrainRefused: 422 for a name that is not an export of this server, 409 when the export's
                privacy check failed or cannot be confirmed (the message names the export and the check).
        """
        name = request.get("export")
        if name is None or name == "":
            return None
        if not isinstance(name, str) or not _EXPORT_NAME.fullmatch(name):
            raise TrainRefused(422, "export: the name of an export made with POST /vila_m3/datagen/ (1-64 letters, "
                                    "digits, '_', '-' or '.', starting with a letter or digit)")
        folder = self.exports_dir / name if self.exports_dir is not None else None
        if folder is None or not folder.is_dir():
            raise TrainRefused(422, f"export {name!r} does not exist; make it with POST /vila_m3/datagen/?name={name}")
        problem = export_privacy_problem(folder)
        if problem is not None:
            raise TrainRefused(409, f"training refused: {problem}")
        return folder

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
        named = self.named_export(request)
        base = self.versions.checkpoint() or self.base_checkpoint
        version, run = self.versions.reserve()
        if named is not None:
            data = named
            print(f"{version}: training on export {named.name!r} (its privacy check passed)", flush=True)
        else:
            data = run / "data"
            print(f"{version}: exporting conversations from {self.studies}", flush=True)
            source = app_source(datastore)  # folder or PACS: MONAI Label's datastore (lib/datastore_source.py)
            export = export_from_app(source, str(self.chats_dir), str(data), int(request.get("seed", 0)))
            if not export.get("privacy", {}).get("passed"):
                count = len(export.get("privacy", {}).get("findings", []))
                raise RuntimeError(f"{version}: training refused: the fresh export failed {PRIVACY_CHECK} "
                                   f"({count} finding(s)); nothing was trained or registered. Run "
                                   f"`vila-m3 datagen-check` on the run's data folder to see the findings.")
            print(f"{version}: export done ({export.get('counts', {})}); privacy check passed; fine-tuning {base}",
                  flush=True)
        result = fine_tune(base, data, run, options, progress=False)
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


NOT_OFFERED = 501
RUN_ALL_MESSAGE = ("training every model at once is not offered by this server: that route checks nothing and "
                   "logs its whole request; call POST /train/{model} for the model to train instead")


def train_router(task: VilaM3TrainTask | None, name: str = "vila_m3") -> APIRouter:
    """``POST /train/{model}`` and ``POST /train/`` in place of MONAI Label's (admins; others 401/403 first).

    ``POST /train/{model}``: the same parameters and answer as MONAI Label's, but only ``name``'s task (422
    naming ``model`` for any other, or for every model when ``task`` is None: no train task on this server),
    and the request is checked before the background task starts (:meth:`VilaM3TrainTask.checked_request`,
    :meth:`VilaM3TrainTask.named_export`); MONAI Label is given the checked request only.
    ``POST /train/``: 501 (its audit line: the refusal middleware, lib/audit_refusals.py).
    """
    router = APIRouter(prefix="/train", tags=["Train"])
    admin_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)

    @router.post("/{model}", summary=f"{RBAC_ADMIN}Run the training task of one model")
    async def run_train(model: str, params: dict[str, Any] | None = None, run_sync: bool = False,
                        enqueue: bool = False, user: User = Depends(admin_role)) -> Any:
        if task is None:
            raise HTTPException(422, "model: this server has no train task (training needs a local chat VLM; "
                                     "a remote one is served)")
        if model != name:
            raise HTTPException(422, f"model: not a train task of this server; it trains: {name}")
        try:
            checked, _ = task.checked_request(params or {})
            task.named_export(checked)
        except TrainRefused as err:
            raise HTTPException(err.status, scrub_paths(str(err))) from None
        logger.info("train %s requested by an admin: options %s", name, ", ".join(sorted(checked)) or "none")
        return run_model(model, checked, run_sync, enqueue)

    @router.post("/", summary=f"{RBAC_ADMIN}Run all training tasks: not offered (use /train/{{model}})",
                 include_in_schema=False)
    async def run_all(user: User = Depends(admin_role)) -> None:
        raise HTTPException(NOT_OFFERED, RUN_ALL_MESSAGE)  # its audit line: lib/audit_refusals.py

    return router


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
            raise HTTPException(422, scrub_paths(str(err))) from None
        return versions.read()

    return router
