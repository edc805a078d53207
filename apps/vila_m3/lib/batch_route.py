"""``POST /batch/infer/{model}``: refused on this server (HTTP 501), in place of MONAI Label's.

MONAI Label 0.8.5's batch infer logs its whole request, ``params`` included (``AsyncTask.run``: "Batch_infer
request: {...}"), and passes it on the command line of a second server process, which logs it again; ``params``
is free JSON (a chat prompt, any key a client adds), so it may carry patient data. The app has no use for it:
every model here answers one study per request through ``POST /infer/{model}``, which logs ids and counts only
and writes an audit line per request. So the route answers 501 with a message saying so, to admins (the role
MONAI Label's route needs); everyone else still gets 401/403. ``GET`` and ``DELETE /batch/infer`` (the status of
batch runs, of which there are none, and stopping one) stay MONAI Label's.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from monailabel.config import RBAC_ADMIN, settings
from monailabel.endpoints.user.auth import RBAC, User

NOT_OFFERED = 501
MESSAGE = ("batch inference is not offered by this server: its request would be logged whole, and every model "
           "here answers one study per request; call POST /infer/{model} for each study instead")


def batch_router() -> APIRouter:
    """``POST /batch/infer/{model}`` answering 501 (admins; others 401/403 first)."""
    router = APIRouter(prefix="/batch", tags=["Infer"])
    admin_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)

    @router.post("/infer/{model}", summary=f"{RBAC_ADMIN}Batch inference: not offered (use /infer/{{model}})")
    async def api_run(model: str, user: User = Depends(admin_role)) -> None:
        raise HTTPException(NOT_OFFERED, MESSAGE)

    return router
