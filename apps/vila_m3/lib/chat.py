"""The VILA-M3 chat as a MONAI Label infer task (``POST /infer/vila_m3``) and its extra routes:

- ``POST /vila_m3/chat/stream?image=ID|session_id=ID`` (form ``params`` as for the infer task): the
  turn as server-sent events: ``token``, ``expert_started``, ``expert_finished``, ``labelmap`` (its
  URL), then ``final`` with the same JSON as the infer task, or ``error``; ``queued`` (``position``: 1 = next,
  ``ahead``: jobs before it, running ones included) while its model work waits in the work queue, again
  whenever its place changes. A full work queue is 503 with ``Retry-After`` before the stream starts;
- ``POST /vila_m3/chat/{chat_id}/cancel``: stop the chat's running turn, or take a waiting one out of the queue
  at once (``cancelled: true``; closing the stream does the same);
- ``GET /vila_m3/chat/?limit=50&offset=0``: the chats the caller may read, newest first (``chats``: id, title,
  study, session, modality, turns, created, updated, owner, has_labels; ``more``: whether a next page exists);
- ``GET /vila_m3/chat/{chat_id}``: the stored chat (with ``label_names`` of its last labelmap's expert when it
  has one); ``GET /vila_m3/chat/{chat_id}/labels``: its last labelmap;
- ``POST /vila_m3/chat/{chat_id}/report``: the chat's findings as a DICOM SR (lib/chat_report.py).

With login on, a chat belongs to the user who started it: to anyone else (but reviewers and admins,
who may read every chat) it is 404 "no chat", for reading, continuing and cancelling alike
(:func:`vila_m3.chat.store.may_open` decides; :func:`chat_user` says who asks); the listing holds the
chats its caller may read, by the same rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.audit_hooks import AuditEvent, AuditTrail, audited, chat_id_of
from lib.chat_report import ChatReports, dicom_bytes
from lib.datastore import StudyFiles
from lib.form_params import parse_params
from lib.infer_route import ROUTE_KEYS, storage_refused
from lib.infers import BAD_INPUT, client_message
from vila_m3.chat.listing import DEFAULT_LIMIT, ListingError
from vila_m3.chat.loop import TurnRequest, TurnResult
from vila_m3.chat.params import TurnParamsError, parse_turn_params
from vila_m3.chat.service import ChatService
from vila_m3.chat.store import Chat, ChatIdError, ChatNotFound, ChatStorageError, ChatUser
from vila_m3.chat.study import StudyError
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.imaging import VolumeReadError
from vila_m3.imaging.sequences import SEQUENCE_ORDER, sibling_sequences
from vila_m3.vlm.errors import VlmError
from vila_m3.work_queue import QueueFull

logger = logging.getLogger(__name__)
ROUTE_PREFIX = "/vila_m3/chat"
# The streams' turns, which may wait a while for their chat or the work queue: their own threads, so waiting
# turns never use up the event loop's default executor (min(32, cores + 4) threads) that other work needs.
_TURN_THREADS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="chat-stream")


class ChatTurns:
    """Turns a MONAI Label request into a chat turn of the :class:`ChatService` (which owns the chats, their
    locks, the running turns and the VLM); shared by the infer task and the stream route. Maps the service's
    errors to HTTP: 404 another user's chat, 422 bad input, 503 (with ``Retry-After``) a full work queue or a
    VLM that cannot answer."""

    def __init__(self, service: ChatService, files: StudyFiles):
        self.service = service
        self.files = files  # what clients name (datastore and session ids), and the paths a turn may trust

    def turn_request(self, request: dict[str, Any]) -> TurnRequest:
        """The turn of ``request``, every parameter checked (TurnParams) before anything is read or stored;
        HTTP 422 names each problem. The bounds are the served VLM's once it is loaded (context, tokenizer)."""
        try:
            params = parse_turn_params({key: value for key, value in request.items() if value is not None},
                                       **self.service.limits())
        except TurnParamsError as err:
            raise HTTPException(BAD_INPUT, str(err)) from None
        image = request.get("image") or ""
        return TurnRequest(
            chat_id=params.chat_id, question=params.prompt, images=self.images(request, image), axis=params.axis,
            slice_index=params.slice_index, modality=params.modality, max_new_tokens=params.max_new_tokens,
            temperature=params.temperature, top_p=params.top_p, study=self.study_record(request, image),
            user=chat_user(request.get("user")),
        )

    @staticmethod
    def study_record(request: dict[str, Any], image: str) -> dict[str, str]:
        """What the chat keeps of its study: the client's id (``image``) and where it is (``source``):
        ``session`` (an uploaded session, gone once it expires) or ``datastore``, so a listing can say
        how to reopen it."""
        source = "session" if request.get("session") else "datastore"
        return {"image": request.get("image_id") or image, "source": source}

    def check(self, request: dict[str, Any]) -> None:
        """Everything a turn checks before its first word: the chat's owner, params against the served VLM,
        the study and the slice (the volume is read once and cached for the turn), and a place in the work
        queue. HTTP 404/422, or 503 with ``Retry-After`` when the queue is full."""
        turn = self.turn_request(request)
        try:
            self.service.check(turn)
        except ChatNotFound as err:  # another user's chat: 404 before the stream starts
            raise HTTPException(404, str(err)) from None
        except (TurnParamsError, StudyError, ChatIdError, VolumeReadError, FileNotFoundError) as err:
            raise self._refused(err, request, turn) from None
        try:
            self.service.admit()
        except QueueFull as err:
            raise busy(err) from None

    def _refused(self, err: Exception, request: dict[str, Any], turn: TurnRequest) -> HTTPException:
        """HTTP 422 for a turn's bad input, its files named by the client's ids (never by server paths)."""
        logger.info("chat turn refused its input: %s", err)
        image_id = request.get("image_id")  # a datastore file is named by its id; others by their file name
        named = {path: image_id for path in turn.images.values() if self.files.is_image_of(path, image_id)}
        return HTTPException(BAD_INPUT, client_message(err, named))

    def images(self, request: dict[str, Any], image: str) -> dict[str, str]:
        """``{"image": path}``, or the four sequences (given as ``params.sequences`` or found beside ``image``)."""
        given = request.get("sequences")
        if given:
            if not isinstance(given, dict):
                raise HTTPException(BAD_INPUT, "params.sequences must map t1c, t1, t2, flair to image ids")
            return {name: self.files.named(value, f"params.sequences.{name}", request.get("user"))
                    for name, value in given.items()}
        if not image:
            raise HTTPException(BAD_INPUT, "an image id, a session or params.sequences is required")
        image = self.files.trusted(image)  # a file the server resolved from an id or a session, never a client's path
        siblings = sibling_sequences(image) if os.path.isfile(image) else {}
        if len(siblings) == len(SEQUENCE_ORDER):
            return {name: self.files.trusted(str(path)) for name, path in siblings.items()}
        return {"image": image}

    def run(self, request: dict[str, Any], on_event=None, cancel: threading.Event | None = None) -> TurnResult:
        """Run the request's turn (after the chat's earlier ones); ``cancel`` set stops it, at once while it waits."""
        turn = self.turn_request(request)
        try:
            return self.service.run(turn, on_event=on_event, cancel=cancel)
        except ChatNotFound as err:
            raise HTTPException(404, str(err)) from None
        except (TurnParamsError, StudyError, ChatIdError, VolumeReadError, FileNotFoundError) as err:
            raise self._refused(err, request, turn) from None
        except QueueFull as err:
            raise busy(err) from None
        except ChatStorageError as err:  # a read-only (503) or full (507) chats folder
            raise storage_refused(err) from None
        except VlmError:
            raise server_fault(503, "the VLM could not answer") from None

    def open_chat(self, chat_id: str, user: ChatUser | None, write: bool = False) -> Chat:
        """The chat ``user`` may open (a new one is empty); HTTP 404 for another user's, 422 for a bad id.
        Never loads a model."""
        try:
            return self.service.open(chat_id, user, write)
        except ChatNotFound as err:
            raise HTTPException(404, str(err)) from None
        except ChatIdError as err:
            raise HTTPException(BAD_INPUT, str(err)) from None

    def cancel(self, chat_id: str, user: ChatUser | None) -> bool:
        """Stop the chat's turns that ``user`` started, running or waiting; False when none (or another user's)."""
        self.open_chat(chat_id, user, write=True)  # 404 / 422 as for a turn
        return self.service.cancel(chat_id, user)

    def labels_file(self, chat_id: str, user: ChatUser | None = None) -> str | None:
        self.open_chat(chat_id, user)
        path = self.service.labels_path(chat_id, user)
        return None if path is None else str(path)


def labelmap_names(chat: Chat, registry: ExpertRegistry) -> dict[str, int]:
    """``{name: label value}`` of the expert whose labelmap the chat holds (its last expert message without
    an error), so a client that reopens the chat names its segments; {} when that expert is not known."""
    for message in reversed(chat.messages):
        if message.role == "expert" and message.expert and not message.error:
            try:
                return dict(registry.get(message.expert).ids_by_name)
            except (KeyError, ValueError):
                return {}
    return {}


def busy(err: QueueFull) -> HTTPException:
    """HTTP 503 with ``Retry-After`` (seconds) for a full work queue."""
    logger.info("refused a request: %s", err)
    return HTTPException(503, f"the server is busy ({err.waiting} requests wait for the {err.device} queue); "
                              f"try again in {err.retry_after_s} s", headers={"Retry-After": str(err.retry_after_s)})


def chat_user(user: Any) -> ChatUser | None:
    """Who a request speaks for, as the chat store sees it: None with login off (every chat is everyone's).

    ``user`` is MONAI Label's ``User`` or ``request["user"]`` as our routes set it (``{"username", "roles"}``);
    with login on, a request that does not say who asks opens no chat (HTTP 403).
    """
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return None
    if isinstance(user, User):
        user = {"username": user.username, "roles": user.roles}
    name = user.get("username") if isinstance(user, dict) else None
    if not isinstance(name, str) or not name:
        raise HTTPException(403, "this request does not say who is asking; chats need a signed-in user")
    roles = set(user.get("roles") or ())
    readers = {settings.MONAI_LABEL_AUTH_ROLE_ADMIN, settings.MONAI_LABEL_AUTH_ROLE_REVIEWER}
    return ChatUser(name, reads_all=bool(roles & readers))


def server_fault(status: int, what: str) -> HTTPException:
    """A 5xx for the exception being handled: logged with its traceback and an error id; the client
    gets ``what`` and the id, never the exception's text (class names, paths, hosts stay in the log)."""
    error_id = uuid.uuid4().hex[:12]
    logger.exception("%s (error id %s)", what, error_id)
    return HTTPException(status, f"{what}; internal error, see the server log (error id {error_id})")


class ChatInferTask(InferTask):
    """``POST /infer/vila_m3?image=ID`` with params ``{"prompt", "chat_id", "slice_index", "axis", ...}``."""

    def __init__(self, turns: ChatTurns, description: str):
        super().__init__(type=InferType.OTHERS, labels=None, dimension=3, description=description,
                         config={"prompt": "", "chat_id": "", "axis": ["axial", "coronal", "sagittal"]})
        self.turns = turns

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        result = self.turns.run(request)
        answer = result.as_dict()
        if result.labels is None:
            return None, answer
        # this turn's own labelmap (a later turn of the chat may already have replaced chat.json's)
        label_file = self.turns.service.store.folder(result.chat.chat_id) / result.chat.labels
        handle, copy = tempfile.mkstemp(suffix=".nii.gz", prefix="vila_m3-")  # MONAI Label deletes what it sends
        os.close(handle)
        _link_or_copy(label_file, copy)
        return copy, answer


def _link_or_copy(source: os.PathLike[str] | str, target: str) -> None:
    """Put ``source``'s content at ``target`` (an existing temporary file): a hard link where the two
    are on one file system (labelmaps are never rewritten in place: a new one is a new file), else a copy."""
    link = f"{target}.link"
    try:
        os.link(source, link)
        os.replace(link, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(link)
        shutil.copyfile(source, target)


def chat_router(turns: ChatTurns, resolve_image: Callable[[str, str], str], audit: AuditTrail) -> APIRouter:
    """The extra routes; ``resolve_image(image_id, session_id)`` gives the file path of the request's image;
    each stream is one line of the audit log, a refusal before it starts too (lib/audit_hooks.py)."""
    router = APIRouter(prefix=ROUTE_PREFIX, tags=["VILA-M3 chat"])
    user_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)

    @router.post("/stream", summary="Run a chat turn and stream it as server-sent events")
    async def stream(http_request: Request, image: str = "", session_id: str = "", params: str = Form("{}"),
                     user: User = Depends(user_role)) -> StreamingResponse:
        event = audit.event(f"{ROUTE_PREFIX}/stream", user, model="vila_m3", chat_id=chat_id_of(params),
                            study_id=image or session_id)
        with audited(event, status=None):  # a refusal here is the line; else the stream's end writes it
            request = parse_params(params, owned=ROUTE_KEYS)  # a UTF-8 JSON object, checked as /infer checks it
            if session_id:  # another user's session is as unknown as a missing one (lib/session_owner.py)
                turns.files.session(session_id, user)
            request["image"] = resolve_image(image, session_id)
            request["image_id"] = session_id or image  # the session wins over an image id, as in resolve_image
            if session_id:
                request["session"] = {"name": session_id}
            request["user"] = {"username": user.username, "roles": list(user.roles)}  # never the client's "user"
            # every check is an HTTP 4xx before the stream starts: params first (cheap), then against the served
            # VLM, the study and the slice (loading the model and reading the volume, off the event loop)
            turns.turn_request(request)
            await run_in_threadpool(turns.check, request)
        return StreamingResponse(_events(turns, request, http_request, event), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/{chat_id}/cancel", summary="Stop the chat's running turn")
    async def cancel(chat_id: str, user: User = Depends(user_role)) -> dict[str, Any]:
        return {"chat_id": chat_id, "cancelled": turns.cancel(chat_id, chat_user(user))}

    @router.get("/", summary="The caller's chats, newest first (reviewers and admins: every chat)")
    async def list_chats(limit: int = DEFAULT_LIMIT, offset: int = 0,
                         user: User = Depends(user_role)) -> dict[str, Any]:
        try:
            chats, more = await run_in_threadpool(turns.service.chats, chat_user(user), limit, offset)
        except ListingError as err:
            raise HTTPException(BAD_INPUT, str(err)) from None
        return {"chats": [chat.as_dict() for chat in chats], "limit": limit, "offset": offset, "more": more}

    @router.get("/{chat_id}", summary="The stored chat: transcript, study, modality")
    async def get_chat(chat_id: str, user: User = Depends(user_role)) -> dict[str, Any]:
        chat = turns.open_chat(chat_id, chat_user(user))
        if not chat.messages:
            raise HTTPException(404, f"no chat '{chat_id}'")
        data = chat.as_dict()
        if chat.labels:
            data["label_names"] = labelmap_names(chat, turns.service.registry)
        return data

    @router.get("/{chat_id}/labels", summary="The chat's last labelmap (NIfTI, in the volume's geometry)")
    async def get_labels(chat_id: str, user: User = Depends(user_role)) -> FileResponse:
        path = turns.labels_file(chat_id, chat_user(user))
        if path is None or not os.path.isfile(path):
            raise HTTPException(404, f"chat '{chat_id}' has no labelmap")
        return FileResponse(path, media_type="application/gzip", filename=f"{chat_id}_labels.nii.gz")

    reports = ChatReports(turns.service, turns.files)

    @router.post("/{chat_id}/report", summary="Write the chat's findings as a DICOM Structured Report")
    async def write_report(chat_id: str, user: User = Depends(user_role)) -> Response:
        """Stored to the PACS (STOW-RS) on a DICOMweb datastore, answered with its UIDs; else the SR file."""
        event = audit.event(f"{ROUTE_PREFIX}/report", user, model="vila_m3", chat_id=chat_id)
        with audited(event):
            chat = turns.open_chat(chat_id, chat_user(user))  # the owner rule: reviewers and admins read all
            if not chat.messages:
                raise HTTPException(404, f"no chat '{chat_id}'")
            event.study_id = str((chat.study or {}).get("image") or "") or None  # hashed in the line
            report, segs, on_pacs = await run_in_threadpool(reports.build, chat)
            if on_pacs:
                return JSONResponse(await run_in_threadpool(reports.store, report, segs))
            return Response(dicom_bytes(report), media_type="application/dicom",
                            headers={"Content-Disposition": f'attachment; filename="{chat_id}_report.dcm"'})

    return router


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _events(turns: ChatTurns, request: dict[str, Any], http_request: Request,
                  audit: AuditEvent) -> AsyncIterator[bytes]:
    """Run the turn in a worker thread and relay its events; a closed connection cancels the turn. The audit
    line is written when the turn ends, with the status of its ``error`` event (200 without one)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    status = 200

    def on_event(name: str, data: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (name, data))

    cancel = threading.Event()  # this stream's turn only (another turn of the chat may be waiting)

    def work() -> None:
        nonlocal status
        try:
            result = turns.run(request, on_event=on_event, cancel=cancel)
            if result.labels is not None:
                on_event("labelmap", {"url": f"{ROUTE_PREFIX}/{result.chat.chat_id}/labels"})
            answer = result.as_dict()
            audit.note_answer(answer)
            on_event("final", answer)
        except HTTPException as err:
            status = err.status_code
            on_event("error", {"status": err.status_code, "detail": err.detail})
        except Exception:  # the stream must end with an event the client can show, without our internals
            fault = server_fault(500, "the chat turn failed")
            status = fault.status_code
            on_event("error", {"status": fault.status_code, "detail": fault.detail})
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    worker = loop.run_in_executor(_TURN_THREADS, work)
    worker.add_done_callback(lambda _: audit.finish(status))  # when the turn has ended, even if the stream has not
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                if await http_request.is_disconnected():
                    raise asyncio.CancelledError from None
                yield b": keep-alive\n\n"
                continue
            if item is done:
                break
            yield _sse(*item)
    except asyncio.CancelledError:
        cancel.set()  # a closed stream stops its turn, or takes it out of the queue at once
        raise
    finally:
        await asyncio.shield(worker)
