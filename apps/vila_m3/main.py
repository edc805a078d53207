"""The VILA-M3 MONAI Label app: ``monailabel start_server --app apps/vila_m3 --studies <folder>``.

A thin shell over the ``vila_m3`` package. App settings (``--conf KEY VALUE``):

- ``models``: ``all`` (default) or a comma list of infer tasks (``vila_m3``, ``vista3d``, ``brats``, ``cxr``, and
  the lower-case name of each expert of an experts file);
- ``experts_file``: extra experts files (comma-separated; added to ``$VILA_M3_EXPERTS``): their experts are appended
  to configs/experts.yaml's, each one an infer task, in the model card and callable from the chat;
- ``models_dir``: where weights are staged (default ``$VILA_M3_MODELS_DIR`` or ``./models``);
- ``vlm``: the VILA-M3 checkpoint of ``configs/models.yaml`` the chat task uses;
- ``vlm_url`` + ``vlm_model``: answer chats with a remote OpenAI-compatible server instead (vLLM, NIM,
  TGI; API key in ``VILA_M3_REMOTE_API_KEY``); the chat task then needs no local checkpoint;
- ``chats_dir``: where chats are kept (default ``<app>/chats``); ``chat_max_rounds``: expert rounds per turn (3);
- ``datagen_dir``: where ``POST /vila_m3/datagen/?name=...`` writes exports (default ``<app>/datagen``);
- ``expert_idle_release_s``: seconds after which an unused expert frees its weights (default 600; 0 = never).
- ``queue_concurrency``: model jobs (VLM answers, uncached expert runs) at a time per device: ``1`` (the
  default for each GPU and the CPU; ``remote``, a VLM on a serving engine, defaults to 4), a number for every
  device, or ``cuda:0=2,cpu=1,remote=8``; ``queue_max``: jobs that may wait per device (default 16): past it a
  request is 503 with ``Retry-After`` (src/vila_m3/work_queue.py).
- ``max_upload_mb``: largest request body of the upload routes (``/infer``, ``/session``, ``/datastore``,
  ``/model``, ``/proxy``) in MB (default 1024); ``max_request_kb``: of every other route in KB (default 1024).
  Both are enforced while the body streams in (413); ``sessions_max_gb``: all sessions together (default 20;
  a new session past it is refused with 507). Uploads and results wait in ``<app>/tmp/`` (emptied at start).
- ``audit_log``: the audit trail, one JSON line per chat turn, per expert infer and per request refused
  before a route (login, roles, body limits: lib/audit_refusals.py), failures included (default
  ``<app>/logs/audit.jsonl``; ids hashed, no prompt text: lib/audit_hooks.py); ``audit_log_max_mb``: size at
  which it rotates (default 10 MB, 5 old files kept; 0 = never); ``audit_refusals_per_minute``: refusal lines
  per client address and reason in a minute (default 60), then one line counting those left out.

Train task ``vila_m3`` (local chat VLM only): ``POST /train/vila_m3`` fine-tunes the served checkpoint on
the datastore's export; versions live in ``<models_dir>/finetuned/<vlm>/`` (``GET /vila_m3/versions/``,
``PUT /vila_m3/versions/current?version=...``).

A task whose weights are missing is not registered; the log says why, once, at start.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

# Nothing is downloaded at run time: weights are staged beforehand.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from fastapi import HTTPException
from lib.audit_hooks import AuditTrail, open_audit_log
from lib.auth import install_auth
from lib.chat import ChatInferTask, ChatTurns, chat_router
from lib.datagen import datagen_router
from lib.datastore import (
    ContainedDatastore,
    ContainedSessions,
    StudyFiles,
    datastore_router,
    not_in_datastore,
)
from lib.infer_route import install_request_routes
from lib.infers import ExpertInferTask, use_experts_files
from lib.ohif_route import ohif_router
from lib.pacs_datastore import open_pacs_datastore
from lib.scoring_route import scoring_router
from lib.server_hooks import replace_routes
from lib.train import VilaM3TrainTask, train_router, versions_router
from lib.uploads import upload_dir
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

import vila_m3
from vila_m3.chat.loop import DEFAULT_MAX_ROUNDS
from vila_m3.chat.service import ChatService, ServedVLM, VlmProvider
from vila_m3.chat.store import ChatStore
from vila_m3.chat.vlm_backend import open_vlm, remote_settings
from vila_m3.configs import load_config
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.service import DEFAULT_IDLE_RELEASE_S, ExpertService
from vila_m3.models.manifest import ModelManifest, resolve_models_dir
from vila_m3.security.paths import is_valid_id
from vila_m3.tasks import TaskStatus, format_statuses, select_tasks, task_catalogue, task_statuses
from vila_m3.training.versions import ModelVersions
from vila_m3.work_queue import WorkQueues

logger = logging.getLogger(__name__)


class VilaM3App(MONAILabelApp):
    """VILA-M3 chat and its experts (VISTA3D, BRATS, CXR) as MONAI Label infer tasks."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        from monailabel.app import app as server  # the running FastAPI app

        install_auth(server, conf)  # verified tokens and roles on every route (lib/auth.py)
        self.audit = AuditTrail(open_audit_log(app_dir, conf))  # one line per turn and infer (lib/audit_hooks.py)
        install_request_routes(server, app_dir, conf, self.audit)  # our /infer, /session, body limits
        replace_routes(server, datastore_router(), prefix=settings.MONAI_LABEL_API_STR)  # no paths in its list
        replace_routes(server, ohif_router(), prefix=settings.MONAI_LABEL_API_STR)  # paths kept inside OHIF's folder
        replace_routes(server, scoring_router(), prefix=settings.MONAI_LABEL_API_STR)  # none: 501
        self.models_dir = resolve_models_dir(conf.get("models_dir"))
        self.vlm_id = conf.get("vlm") or load_config("app.yaml")["default_vlm"]
        use_experts_files(conf)  # extra experts (--conf experts_file), seen by every registry of this process
        self.catalogue = ExpertRegistry.from_config().with_expert_tasks(task_catalogue())
        self.task_statuses: list[TaskStatus] = task_statuses(
            select_tasks(conf.get("models"), self.catalogue), self.models_dir, vlm_id=self.vlm_id,
            remote_vlm=remote_settings(conf) is not None, catalogue=self.catalogue,
        )
        logger.info("VILA-M3 infer tasks (models dir %s):\n%s", self.models_dir, format_statuses(self.task_statuses))
        self.vlm_versions = ModelVersions(self.models_dir, self.vlm_id)
        self.work_queues = WorkQueues.from_conf(conf)  # model work, one queue per device (vila_m3.work_queue)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="VILA-M3",
            description="VILA-M3 medical vision-language chat that calls expert models on the whole volume",
            version=vila_m3.__version__,
        )
        self._recover_chats()

    def _recover_chats(self) -> None:
        """Start-up check of the chats folder (vila_m3.chat.store): one line when it is read-only or full (the
        server still serves reads; turns get 503 / 507), else the sweep of what a crash left there."""
        store = ChatStore(self._chats_dir())
        problem = store.writable()
        if problem is not None:
            logger.warning("chats folder %s: %s", self._chats_dir(), problem)
            return
        done = store.recover()
        if done.interrupted or done.removed or done.problems:
            logger.info("chats: %d turn(s) left by a crash marked interrupted, %d leftover file(s) removed, "
                        "%d chat(s) not checked (%s) in %.2f s", len(done.interrupted), done.removed,
                        len(done.problems), "; ".join(done.problems[:5]) or "-", done.seconds)

    def init_infers(self) -> dict[str, InferTask]:
        """The infer tasks whose weights are staged (or, for the chat, whose remote VLM is set)."""
        available = {status.name for status in self.task_statuses if status.available}
        catalogue = self.catalogue
        usable_experts = {catalogue[name]["expert"] for name in available if catalogue[name].get("expert")}
        registry = ExpertRegistry.from_config(available=lambda spec: self._expert_unavailable(spec, usable_experts))
        self.experts = ExpertService(
            self.models_dir,
            registry=registry,
            idle_release_s=float(self.conf.get("expert_idle_release_s", DEFAULT_IDLE_RELEASE_S)),
            queues=self.work_queues,
        )
        self._add_datagen_route()
        infers: dict[str, InferTask] = {}
        for name in [name for name in catalogue if name in available]:
            task = catalogue[name]
            description = str(task.get("description", ""))
            if task.get("vlm"):
                infers[name] = self._chat_task(registry, description)
                continue
            if task["expert"] in registry:  # one task class for every expert, through its runner
                infers[name] = ExpertInferTask(self.experts, registry.get(task["expert"]), description,
                                               self.study_files)
        return infers

    @staticmethod
    def _expert_unavailable(spec: Any, usable: set[str]) -> str | None:
        """Why expert ``spec`` cannot be used on this server (weights, selection, its runner class), or None."""
        if spec.name not in usable:
            return "not staged or not selected on this server"
        try:
            ExpertRegistry.runner_class_of(spec)
        except ValueError as err:  # ConfigError: the class cannot be imported or is not a runner
            logger.warning("%s", err)
            return str(err)
        return None

    def init_trainers(self) -> dict[str, TrainTask]:
        """``vila_m3``: fine-tune the served checkpoint on the datastore (a local chat VLM only)."""
        from monailabel.app import app as server

        chat = next((status for status in self.task_statuses if self.catalogue[status.name].get("vlm")), None)
        if chat is None or not chat.available or remote_settings(self.conf) is not None:
            replace_routes(server, train_router(None))  # no train task: POST /train/* refused
            return {}
        server.include_router(versions_router(self.vlm_versions))
        base = ModelManifest.load()[self.vlm_id].location(self.models_dir)
        task = VilaM3TrainTask(self.vlm_versions, base, self.studies, self._chats_dir(),
                               "Fine-tune VILA-M3 on the datastore's final labels and chats", self._exports_dir())
        replace_routes(server, train_router(task))  # checked requests only; POST /train/: 501
        return {"vila_m3": task}

    def _exports_dir(self) -> Path:
        return Path(self.conf.get("datagen_dir") or Path(self.app_dir) / "datagen")

    def _chats_dir(self) -> Path:
        return Path(self.conf.get("chats_dir") or Path(self.app_dir) / "chats")

    def _add_datagen_route(self) -> None:
        """``POST /vila_m3/datagen/``: the data engine for admins (the app's datastore: a studies folder or a PACS)."""
        from monailabel.app import app as server

        server.include_router(datagen_router(self._chats_dir(), self._exports_dir()))

    def _chat_task(self, registry: ExpertRegistry, description: str) -> ChatInferTask:
        """The chat infer task, and its streaming routes on this server."""
        chats_dir = self._chats_dir()
        max_rounds = int(self.conf.get("chat_max_rounds", DEFAULT_MAX_ROUNDS))

        remote = remote_settings(self.conf) is not None

        def open_served_vlm() -> ServedVLM:
            vlm = open_vlm(self.conf, self.models_dir, self.vlm_id)
            if remote:
                return ServedVLM(vlm)
            version = self.vlm_versions.current()
            name = f"{self.vlm_id} ({f'fine-tuned {version}' if version else 'local checkpoint'})"
            # the turn's answer and its audit line say which weights answered
            return ServedVLM(vlm, name, {"version": version or "base"})

        # one chat service for the server's life: chats, their locks and running turns; the VLM swapped under it
        provider = VlmProvider(open_served_vlm, version=None if remote else self.vlm_versions.current)
        service = ChatService(ChatStore(chats_dir), provider, self.experts, registry, queues=self.work_queues,
                              max_rounds=max_rounds)
        turns = ChatTurns(service, self.study_files)
        from monailabel.app import app as server  # the running FastAPI app

        server.include_router(chat_router(turns, self._image_path, self.audit))
        return ChatInferTask(turns, description)

    def _image_path(self, image: str, session_id: str) -> str:
        """The file of a datastore image id or a session id; HTTP 422 for anything else (never a server path)."""
        if session_id:
            return self.study_files.session(session_id)
        return self.study_files.image(image)

    # --- containment: clients name studies by datastore id or session id (lib/datastore.py) ---------

    def init_datastore(self) -> Datastore:
        """The studies folder as a ``ContainedDatastore``; a DICOMweb URL as a ``PacsDatastore`` (lib/pacs_datastore.py)."""
        if self.studies.startswith(("http://", "https://")):
            return open_pacs_datastore(self.studies)
        return ContainedDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _load_sessions(self, load: bool = False) -> ContainedSessions | None:
        """MONAI Label's sessions with checked ids (a session id never leaves the sessions folder)."""
        if not load:
            return None
        return ContainedSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY)

    @property
    def study_files(self) -> StudyFiles:
        """What clients name, resolved; server paths trusted only inside the datastore, sessions or uploads."""
        if getattr(self, "_study_files", None) is None:
            self._study_files = StudyFiles(self.datastore(), self.sessions, [upload_dir(self.app_dir)])
        return self._study_files

    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        """MONAI Label's infer after checking ``image``: a datastore id, or a file the server put in a
        session or the upload folder. A client's ``params.image`` (MONAI Label merges params into the
        request) naming any other path is refused with 422, whether or not the path exists."""
        image, image_id = request.get("image"), request.get("image_id")
        if isinstance(image, str) and image and not is_valid_id(image):
            if not (is_valid_id(image_id) and self.study_files.is_image_of(image, image_id)):  # our /infer resolved it
                self.study_files.trusted(image, in_request=True)  # 422 unless a session's or upload's file
            request = {**request, "image_id": image_id or self.study_files.id_of(image)}
        elif isinstance(image, str) and image:
            # the datastore's file, never a same-named file in the working directory
            request = {**request, "image": self.study_files.image(image), "image_id": image}
        elif image is not None and not isinstance(image, str):
            raise HTTPException(422, not_in_datastore(image))
        return super().infer(request, datastore)

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """MONAI Label's next sample (``POST /activelearning/{strategy}``) without its image's server path:
        clients fetch the image by its id."""
        sample = super().next_sample(request)
        sample.pop("path", None)
        return sample
