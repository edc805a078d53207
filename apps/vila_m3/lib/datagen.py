"""``POST /vila_m3/datagen/?name=NAME&seed=0``: an admin exports expert-training conversations from
the datastore's final labels and the stored chats (the data engine, ``vila_m3.data``), reading the app's
MONAI Label datastore, folder or PACS, through ``lib.datastore_source.MonaiDatastoreSource``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.concurrency import run_in_threadpool
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from lib.datastore_source import app_source
from vila_m3.data import ExportError, export_from_app
from vila_m3.security.paths import scrub_paths

_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z: "$" would let a trailing newline through


def datagen_router(chats_dir: Path, exports_dir: Path) -> APIRouter:
    """The export route: the app's MONAI Label datastore (a studies folder or a PACS) and the chats in
    ``chats_dir``; exports go to ``exports_dir/<name>``."""
    router = APIRouter(prefix="/vila_m3/datagen", tags=["VILA-M3 data engine"])
    admin_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)

    @router.post("/", summary="Export expert-training conversations from final labels and chats (admin)")
    async def export(name: str, seed: int = 0,
                     user: User = Depends(admin_role)) -> dict[str, Any]:
        if not _NAME.fullmatch(name):
            raise HTTPException(422, "name: 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
        try:
            def run() -> dict[str, Any]:  # folder or PACS: MONAI Label's datastore (lib/datastore_source.py)
                source = app_source(app_instance().datastore())
                return export_from_app(source, str(chats_dir), str(exports_dir / name), seed)

            return await run_in_threadpool(run)
        except ExportError as err:
            raise HTTPException(409, scrub_paths(str(err), {str(exports_dir / name): name})) from None

    return router
