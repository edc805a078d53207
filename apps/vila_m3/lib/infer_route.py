"""``POST /infer/{model}`` in place of MONAI Label's, with the same request and response formats.

Same query parameters (``image``, ``session_id``, ``output`` = ``image`` | ``json`` | ``all`` | ``dicom_seg``),
form fields (``params``, ``file``, ``label``), role and answers (``all``: multipart with ``params`` and ``image``,
or the JSON alone when the result has no file; ``image``: the file; ``json``: the JSON), so MONAI Label's
Slicer module, OHIF plugin and Python client work unchanged. Differences, each deliberate:

- **The task runs off the event loop** (Starlette's thread pool). MONAI Label 0.8.5's handler is ``async`` but
  calls the task synchronously, so one chat turn or VISTA3D infer froze ``/info/``, the datastore, other users'
  infers and the chat streams until it ended. Here everything slow (saving uploads, resolving the image, the
  task, packing the answer) runs in a worker thread and the event loop keeps answering.
- **Bad requests are 4xx**: ``params`` that is not a UTF-8 JSON object, or that sets one of the keys the route
  owns (``image``, ``model``, ``label``, ...) → 422; an unknown model → 404; no image, file or session → 422;
  an unknown or expired session → 422; ``output=image`` on a result without a file → 422. A fault of the server
  is a 500 whose message holds an error id that the log line with the traceback carries, no internals.
- **Files stay in the app's folders and are always removed**: uploads are streamed (with the upload size limit)
  into ``<app_dir>/tmp/uploads/`` under unique names, taking only a known suffix from the client's file name, and
  removed in ``finally`` whatever the outcome. The task's result file is moved to ``<app_dir>/tmp/results/`` under
  a unique name and sent with that name, then removed. MONAI Label's client saves a result under the server's
  file name in its own temp folder; with the server's file in the system temp folder, on one machine that was the
  same file, which the server then deleted.
- **Every request is on record**: one line of the audit log (``--conf audit_log``, lib/audit_hooks.py) per
  request, with its model, outcome and HTTP status, failures included.
- **No prompt text in the log**: one line per request with the model, image id or session, user, the param keys
  and the prompt's length and SHA-256 prefix (MONAI Label logged the whole request).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse, Response
from monailabel.config import RBAC_USER, settings
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import get_mime_type
from monailabel.utils.sessions import SessionInfo
from requests_toolbelt import MultipartEncoder
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from lib.audit_hooks import AuditEvent, AuditTrail, audited, chat_id_of, infer_route_name, open_audit_log
from lib.audit_refusals import RefusalAuditMiddleware, refusals_per_minute
from lib.batch_route import batch_router
from lib.body_limit import BodyLimitMiddleware, limits_from_conf
from lib.datastore_uploads import datastore_upload_router
from lib.form_params import install_strict_multipart, parse_params
from lib.infers import BAD_INPUT, datastore_path
from lib.server_hooks import install_middleware, remove_routes, replace_routes
from lib.session_owner import may_use
from lib.session_route import SessionUploads, find_session, session_router, sessions_max_bytes
from lib.uploads import (
    RequestFiles,
    clear,
    copy_limited,
    remove,
    request_files,
    results_dir,
    safe_suffix,
    unique_path,
    upload_dir,
)
from vila_m3.chat.store import ChatStorageError
from vila_m3.logtext import fingerprint

logger = logging.getLogger(__name__)

# Keys of the task's request that only the route sets (MONAI Label let ``params`` override ``image``).
ROUTE_KEYS = frozenset({"model", "image", "image_id", "session", "session_id", "label", "file", "user"})
RESULT_MAX_AGE_S = 3600.0  # results older than this are left over from an interrupted answer
WSI_ROUTES = (("/infer/wsi/{model}", "POST"), ("/infer/wsi_v2/{model}", "POST"))
_INSTALLED_FOR: dict[str, bool] = {}  # upload folders this process has installed the routes for
#: For ``benchmarks/server_load.py`` only: ``1`` runs each ``/infer`` request on the event loop, as MONAI Label
#: 0.8.5's route does (one request holds every other until it ends), so the benchmark can show the difference.
#: Never set it on a server people use.
BLOCKING_INFER_ENV = "VILA_M3_BENCH_BLOCKING_INFER"
STORAGE_STATUS = {"read_only": 503, "full": 507}  # a chats folder that cannot take a turn (vila_m3.chat.store)


def storage_refused(err: ChatStorageError) -> HTTPException:
    """HTTP 503 (read-only chats folder) or 507 (full disk) with the store's message, which names the problem
    and no server path; reads (GET of chats, /info/, the datastore) keep working."""
    logger.warning("a chat turn was not saved: %s", err)
    return HTTPException(STORAGE_STATUS.get(err.problem, 503), str(err))


@dataclass(frozen=True)
class InferFolders:
    """Where the route keeps a request's files, and the upload limit in bytes."""

    uploads: Path
    results: Path
    max_upload_bytes: int


def text_digest(text: Any) -> str:
    """``<n> chars, sha256 <12 hex>`` for a text (:func:`vila_m3.logtext.fingerprint`, as the chat loop logs
    it), so logs can tell prompts apart without holding them; ``-`` for anything that is not text."""
    return fingerprint(text) if isinstance(text, str) else "-"


def _loggable(value: str, limit: int = 80) -> str:
    """A client-given id made safe for one log line (printable ASCII, cut at ``limit`` characters)."""
    return ascii(value[:limit])[1:-1] if value else "-"


class InferRequestHandler:
    """Runs one ``/infer/{model}`` request in a worker thread (see the module docstring)."""

    def __init__(self, folders: InferFolders):
        self.folders = folders

    def __call__(self, model: str, image: str, session_id: str, params: str | None, file: UploadFile | None,
                 label: UploadFile | None, output: ResultType | None, user: User,
                 event: AuditEvent | None = None) -> Any:
        clear(self.folders.results, older_than_s=RESULT_MAX_AGE_S)
        with request_files() as files:
            return self.run(files, model, image, session_id, params, file, label, output, user, event)

    def run(self, files: RequestFiles, model: str, image: str, session_id: str, params: str | None,
            file: UploadFile | None, label: UploadFile | None, output: ResultType | None, user: User,
            event: AuditEvent | None = None) -> Any:
        given = parse_params(params, owned=ROUTE_KEYS)
        instance = app_instance()
        info = instance.info()
        if model not in info.get("models", {}):
            raise HTTPException(404, f"no model '{model}' on this server; see GET /info/ for the models")

        request: dict[str, Any] = {**info.get("config", {}).get("infer", {}), **given}
        request["model"] = model
        request["user"] = {"username": user.username, "roles": list(user.roles)}
        request["image"], request["image_id"], session = self.image(files, instance, image, session_id, file, user)
        if session is not None:
            request["session"] = session.to_json()
        if label is not None:
            request["label"] = self.label(files, label, request["image"])

        logger.info("infer %s: image %s, session %s, upload %s, user %s, params %s, prompt %s", model,
                    _loggable(image), _loggable(session_id), file is not None, _loggable(user.username),
                    sorted(given), text_digest(given.get("prompt")))
        result = self.infer(instance, request)
        if event is not None:
            event.note_answer(result.get("params"))  # its model and experts go in the audit line
        from_datastore = session is None and file is None
        if from_datastore and request.get("save_label") and result.get("file"):
            tag = request.get("label_tag", DefaultLabelTag.ORIGINAL)
            result["label"] = instance.datastore().save_label(
                image, result["file"], tag, {"model": model, "params": result.get("params")})

        result_file = self.result_file(files, instance, result)
        answer = result.get("params")
        if output == ResultType.json:
            return answer
        if output == ResultType.image:
            if result_file is None:
                raise HTTPException(BAD_INPUT, f"this result has no image: '{model}' answered with JSON only; "
                                               "ask with output=json or output=all")
            return self.file_response(files, result_file)
        if output == ResultType.dicom_seg:
            return self.dicom_seg(files, instance, request, result_file, answer)
        if result_file is None:
            return answer
        with open(result_file, "rb") as handle:
            fields = {"params": (None, json.dumps(answer), "application/json"),
                      "image": (result_file.name, handle, get_mime_type(str(result_file)))}
            message = MultipartEncoder(fields=fields)
            return Response(content=message.to_string(), media_type=message.content_type)

    def image(self, files: RequestFiles, instance: Any, image: str, session_id: str,
              file: UploadFile | None, user: Any = None) -> tuple[str, str, SessionInfo | None]:
        """(file path, id for the task, the session if any) of the request's image: the session, else the
        uploaded file, else the datastore id (MONAI Label's order); HTTP 422 if none or unknown (another user's
        session, with login on, is unknown: lib/session_owner.py)."""
        if session_id:
            sessions = instance.sessions()
            session = find_session(sessions, session_id, update_ts=False) if sessions is not None else None
            if session is None or not may_use(session, user):
                raise HTTPException(BAD_INPUT, f"session '{session_id}' not found (expired?)")
            session = find_session(sessions, session_id) or session  # in use: its expiry starts again
            return session.image, session_id, session
        if file is not None:
            return str(self.save_upload(files, file, ".nii.gz")), "upload", None
        if image:
            return datastore_path(instance.datastore(), image), image, None
        raise HTTPException(BAD_INPUT, "no image: give a datastore id (image=), a session (session_id=) or a file")

    def save_upload(self, files: RequestFiles, upload: UploadFile, default_suffix: str) -> Path:
        """Stream ``upload`` into the upload folder under a unique name, within the upload limit."""
        target = unique_path(self.folders.uploads, safe_suffix(upload.filename, default_suffix))
        files.add(target)
        copy_limited(upload.file, target, self.folders.max_upload_bytes)
        return target

    def label(self, files: RequestFiles, upload: UploadFile, image_path: str) -> str:
        """The uploaded label as a file; a raw ``.bin`` mask (OHIF scribbles) becomes a NIfTI on the image's grid."""
        path = self.save_upload(files, upload, ".nii.gz")
        if path.suffix != ".bin":
            return str(path)
        from monailabel.datastore.utils.convert import binary_to_image

        try:
            converted = binary_to_image(image_path, str(path))
        except (ValueError, OSError, RuntimeError) as err:
            raise HTTPException(BAD_INPUT, f"the .bin label does not fit the image: {type(err).__name__}") from None
        files.add(converted)
        return converted

    @staticmethod
    def infer(instance: Any, request: dict[str, Any]) -> dict[str, Any]:
        """``instance.infer(request)``; a server fault becomes a 500 with an error id, never its internals."""
        try:
            result = instance.infer(request)
        except HTTPException:
            raise
        except MONAILabelException as err:
            raise HTTPException(BAD_INPUT, f"{request['model']}: {err.msg}") from None
        except ChatStorageError as err:
            raise storage_refused(err) from None
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            logger.exception("infer %s failed (error id %s)", request["model"], error_id)
            raise HTTPException(500, f"internal error while running '{request['model']}'; "
                                     f"see the server log (error id {error_id})") from None
        if result is None:
            raise HTTPException(500, f"'{request['model']}' returned no result")
        return result

    def result_file(self, files: RequestFiles, instance: Any, result: dict[str, Any]) -> Path | None:
        """The result's file to send: the task's temporary file, moved into the results folder under a unique
        name (and removed after the answer), or a label already in the datastore (kept); None if there is none."""
        produced = result.get("file") or result.get("label")
        if not produced:
            return None
        if os.path.isfile(produced):
            target = unique_path(self.folders.results, safe_suffix(os.path.basename(produced), ""))
            files.add(target)
            files.add(produced)  # removed even if the move fails half way
            try:
                os.replace(produced, target)
            except OSError:  # another file system: copy, then remove
                with open(produced, "rb") as source:
                    copy_limited(source, target, 2**62)
                remove(produced)
            return target
        stored = instance.datastore().get_label_uri(produced, result.get("tag"))
        return Path(stored) if stored and os.path.isfile(stored) else None

    def file_response(self, files: RequestFiles, path: Path, media_type: str | None = None) -> FileResponse:
        """Send ``path``; if it is one of this request's files, it is removed once sent."""
        background = None
        if str(path) in files.paths:
            files.release(path)
            background = BackgroundTask(remove, path)
        return FileResponse(path, media_type=media_type or get_mime_type(str(path)), filename=path.name,
                            background=background)

    def dicom_seg(self, files: RequestFiles, instance: Any, request: dict[str, Any], result_file: Path | None,
                  answer: dict[str, Any] | None = None) -> FileResponse:
        """The result as a DICOM Segmentation of the request's DICOM study (lib/dicom_seg_out.py): a PACS series
        or a DICOM session; 422 for any other study or a result without a labelmap."""
        from lib.dicom_seg_out import source_series, write_seg

        series = source_series(instance.datastore(), str(request.get("image_id") or ""), str(request.get("image") or ""))
        task = getattr(instance, "_infers", {}).get(request.get("model"))
        seg = write_seg(self.folders.results, task, answer, result_file, series)
        files.add(seg)
        return self.file_response(files, seg, media_type="application/dicom")


def infer_router(folders: InferFolders, audit: AuditTrail) -> APIRouter:
    """The ``/infer/{model}`` route (MONAI Label's path, parameters, role and answers); each request is one
    line of the audit log, whatever its outcome (lib/audit_hooks.py)."""
    router = APIRouter(prefix="/infer", tags=["Infer"], responses={404: {"description": "Not found"}})
    handler = InferRequestHandler(folders)
    user_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)
    blocking = os.environ.get(BLOCKING_INFER_ENV) == "1"
    if blocking:
        logger.warning("%s=1: /infer runs on the event loop and blocks the server (for the load benchmark only)",
                       BLOCKING_INFER_ENV)

    @router.post("/{model}", summary=f"{RBAC_USER}Run Inference for supported model")
    async def api_run_inference(
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: ResultType | None = None,
        user: User = Depends(user_role),
    ):
        event = audit.event(infer_route_name(model), user, model=model, chat_id=chat_id_of(params),
                            study_id=image or session_id)
        with audited(event):
            if blocking:  # the benchmark's comparison: MONAI Label's own way, on the event loop
                return handler(model, image, session_id, params, file, label, output, user, event)
            return await run_in_threadpool(handler, model, image, session_id, params, file, label, output, user,
                                           event)

    return router


def install_request_routes(server: FastAPI, app_dir: str, conf: Mapping[str, str],
                           audit: AuditTrail | None = None) -> InferFolders:
    """Body limits, our ``/infer/{model}``, ``/session/`` and datastore upload routes in place of MONAI Label's
    (``lib/datastore_uploads.py``), and the app's
    temporary folders emptied of what an earlier run left; MONAI Label's whole-slide (pathology) infer routes,
    which this app has no task for, are removed (they too logged whole requests and left uploads behind), and
    MONAI Label's batch infer is refused (lib/batch_route.py)."""
    limits, other = limits_from_conf(conf)
    api = settings.MONAI_LABEL_API_STR
    folders = InferFolders(upload_dir(app_dir), results_dir(app_dir), limits[f"{api.rstrip('/')}/infer"])
    # At the process's first install everything there is left over; a later one (POST /reload makes a new app
    # instance) may run beside requests in flight, so it removes only what is past any request's age.
    older_than_s = RESULT_MAX_AGE_S if _INSTALLED_FOR.get(str(folders.uploads)) else 0.0
    _INSTALLED_FOR[str(folders.uploads)] = True
    for folder in (folders.uploads, folders.results):
        stale = clear(folder, older_than_s=older_than_s)
        if stale:
            logger.info("removed %d file(s) left in %s by an earlier run", stale, folder.name)
        folder.mkdir(parents=True, exist_ok=True)
    audit = audit or AuditTrail(open_audit_log(app_dir, conf))  # --conf audit_log (lib/audit_hooks.py)
    # outside the body limits, so that their 413 (and the login's 401/403) are on record too
    install_middleware(server, RefusalAuditMiddleware, log=audit.log, per_minute=refusals_per_minute(conf))
    install_middleware(server, BodyLimitMiddleware, limits=limits, default_bytes=other)
    install_strict_multipart()
    remove_routes(server, {(f"{api}{path}", method) for path, method in WSI_ROUTES})
    replace_routes(server, infer_router(folders, audit), prefix=api)
    sessions = SessionUploads(folders.uploads, limits[f"{api.rstrip('/')}/session"], sessions_max_bytes(conf))
    replace_routes(server, session_router(sessions), prefix=api)
    replace_routes(server, datastore_upload_router(), prefix=api)
    replace_routes(server, batch_router(), prefix=api)  # MONAI Label's logs whole requests: refused here
    return folders
