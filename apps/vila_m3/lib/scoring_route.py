"""``POST /scoring/{method}`` (and the deprecated ``POST /scoring/``): refused on this server (HTTP 501).

MONAI Label 0.8.5 runs a scoring request through ``AsyncTask.run``, which logs the whole request, ``params``
included ("Scoring request: {...}"), and passes it on the command line of a second server process; ``params``
is free JSON, so it may carry patient data. This app defines no scoring methods (``init_scoring_methods`` is
MONAI Label's, which returns none), so there is nothing to score: the routes answer 501 with a message saying
so, to annotators (the role MONAI Label's routes need; everyone else still gets 401/403); the refusal middleware
(lib/audit_refusals.py) writes its audit line (``outcome: refused``, ``reason: not offered``), never the body. ``GET`` and ``DELETE
/scoring/`` (the status of scoring runs, of which there are none, and stopping one) stay MONAI Label's.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException
from monailabel.config import RBAC_ANNOTATOR, settings
from monailabel.endpoints.user.auth import RBAC, User

NOT_OFFERED = 501
MESSAGE = ("scoring is not offered by this server: it has no scoring methods, and MONAI Label's scoring route "
           "would log its whole request")


def scoring_router() -> APIRouter:
    """``POST /scoring/{method}`` and ``POST /scoring/`` answering 501 (annotators; others 401/403 first)."""
    router = APIRouter(prefix="/scoring", tags=["Scoring"])
    annotator_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)

    @router.post("/{method}", summary=f"{RBAC_ANNOTATOR}Scoring: not offered (this server has no scoring methods)")
    async def api_run_method(method: str, user: User = Depends(annotator_role)) -> None:
        raise HTTPException(NOT_OFFERED, MESSAGE)

    @router.post("/", summary=f"{RBAC_ANNOTATOR}Scoring: not offered", include_in_schema=False)
    async def api_run(user: User = Depends(annotator_role)) -> None:
        raise HTTPException(NOT_OFFERED, MESSAGE)

    return router
