"""``GET /ohif/{path}`` in place of MONAI Label's: the same files and role, every path contained.

MONAI Label 0.8.5 joins the request path onto its OHIF folder (after turning ``/`` into ``:``) and serves
whatever exists there: ``/ohif/..`` and ``/ohif/.`` name folders and answer 500. Here a path is resolved
inside the OHIF folder (``vila_m3.security.paths.contained``): a file there is served, a path that leaves
the folder is 404, and anything else gets OHIF's ``index.html`` (the viewer routes its own URLs), as before.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse
from monailabel.config import settings
from monailabel.endpoints import ohif as upstream
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.utils.others.generic import get_mime_type

from vila_m3.security.paths import OutsideRootError, contained

OHIF_DIR = Path(os.path.dirname(os.path.realpath(upstream.__file__))) / "static" / "ohif"


def ohif_file(path: str, folder: Path = OHIF_DIR) -> Path:
    """The file to answer ``/ohif/{path}`` with; HTTP 404 if ``path`` leaves ``folder`` or nothing is there."""
    index = folder / "index.html"
    target = index
    if path:
        try:
            found = contained(folder, path)
        except OutsideRootError:
            raise HTTPException(404, "Resource NOT Found") from None
        target = found if found.is_file() else index
    if not target.is_file():
        raise HTTPException(404, "Resource NOT Found")
    return target


def ohif_router() -> APIRouter:
    """The OHIF viewer's files (MONAI Label's path and user role)."""
    router = APIRouter(prefix="/ohif", tags=["Others"])
    user_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)

    @router.get("/{path:path}", include_in_schema=False)
    async def api_get_ohif(path: str, user: User = Depends(user_role)) -> FileResponse:
        target = ohif_file(path)
        return FileResponse(target, media_type=get_mime_type(str(target)))

    return router
