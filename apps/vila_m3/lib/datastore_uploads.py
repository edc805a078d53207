"""``PUT /datastore/image`` (and its deprecated alias ``PUT /datastore/``) and ``PUT /datastore/label`` in place
of MONAI Label's: its own handlers (``monailabel.endpoints.datastore.add_image`` / ``save_label``), with the same
parameters, roles and answers, and three differences:

- ``params`` is checked first: a form field that is not a UTF-8 JSON object is a 422 (MONAI Label answered 500
  after it had saved the upload in the temp folder);
- the upload's temporary file is removed whatever the outcome: MONAI Label schedules its removal as a background
  task, which only runs after a successful answer; here those tasks also run when the handler fails;
- the copy of the upload and the datastore's write run in a worker thread, not on the event loop.

The checks of ids, tags and file names are the datastore's (``lib/datastore.py``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, BackgroundTasks, Depends, File, Form, UploadFile
from monailabel.config import RBAC_ANNOTATOR, settings
from monailabel.endpoints import datastore as upstream
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from starlette.concurrency import run_in_threadpool

from lib.form_params import parse_params


async def _cleaned_up(background_tasks: BackgroundTasks, handler, *args: Any) -> Any:
    """``handler(background_tasks, *args)`` in a worker thread; its clean-up tasks run at once if it fails."""
    try:
        return await run_in_threadpool(handler, background_tasks, *args)
    except BaseException:
        await background_tasks()
        raise


def datastore_upload_router() -> APIRouter:
    """The datastore's upload routes (MONAI Label's paths, parameters, annotator role and answers)."""
    router = APIRouter(prefix="/datastore", tags=["Datastore"])
    annotator = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)

    @router.put("/", summary=f"{RBAC_ANNOTATOR}Upload new Image", include_in_schema=False, deprecated=True)
    @router.put("/image", summary=f"{RBAC_ANNOTATOR}Upload new Image")
    async def api_add_image(background_tasks: BackgroundTasks, image: str | None = None, params: str = Form("{}"),
                            file: UploadFile = File(...), user: User = Depends(annotator)):
        parse_params(params)
        return await _cleaned_up(background_tasks, upstream.add_image, image, params, file, user.username)

    @router.put("/label", summary=f"{RBAC_ANNOTATOR}Save Finished Label")
    async def api_save_label(background_tasks: BackgroundTasks, image: str, params: str = Form("{}"),
                             tag: str = DefaultLabelTag.FINAL.value, label: UploadFile = File(...),
                             user: User = Depends(annotator)):
        parse_params(params)
        return await _cleaned_up(background_tasks, upstream.save_label, image, params, tag, label, user.username)

    return router
