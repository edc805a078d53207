"""Sessions belong to the user who made them (with login on).

``PUT /session/`` records the signed-in user's name in the session's ``meta`` (MONAI Label's ``SessionInfo.meta``,
saved in the session's ``meta.info``, so it survives a restart). With login on, only that user and admins may read,
delete or use a session (``GET``/``DELETE /session/{id}``, ``session_id=`` of ``/infer`` and the chat routes, a
session named as an MRI sequence); for anyone else the session does not exist: they get the answer of an unknown
session, never a sign that it exists. A session without a recorded owner (made before owners were recorded, or
with login off) is the admins' only. With login off nothing changes: everyone may use every session.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monailabel.config import settings
from monailabel.utils.sessions import SessionInfo, Sessions

#: The key of ``SessionInfo.meta`` that holds the owner's user name.
OWNER_KEY = "owner"


def _name_and_roles(user: Any) -> tuple[str, list[str]]:
    """(user name, roles) of MONAI Label's ``User`` or of a request's ``{"username", "roles"}``."""
    if isinstance(user, Mapping):
        name, roles = user.get("username"), user.get("roles")
    else:
        name, roles = getattr(user, "username", None), getattr(user, "roles", None)
    return (name if isinstance(name, str) else "",
            [role for role in roles or () if isinstance(role, str)] if isinstance(roles, (list, tuple)) else [])


def owner_of(info: SessionInfo) -> str | None:
    """The user name recorded as the session's owner, or None."""
    meta = info.meta if isinstance(info.meta, dict) else {}
    owner = meta.get(OWNER_KEY)
    return owner if isinstance(owner, str) and owner else None


def record_owner(sessions: Sessions, info: SessionInfo, user: Any) -> None:
    """Save the signed-in ``user`` as the owner of the new session ``info`` (nothing with login off: then the
    default user is no person, and the session stays the admins' only should login be turned on later)."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return
    name, _ = _name_and_roles(user)
    if not name:
        return
    info.meta = {**(info.meta if isinstance(info.meta, dict) else {}), OWNER_KEY: name}
    sessions[info.name] = info
    sessions._write_meta_info(info.name, info)  # MONAI Label's own writer of meta.info


def may_use(info: SessionInfo, user: Any) -> bool:
    """Whether ``user`` may see and use session ``info``: always with login off; with login on its owner and
    admins (a session without an owner: admins only)."""
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        return True
    name, roles = _name_and_roles(user)
    if settings.MONAI_LABEL_AUTH_ROLE_ADMIN in roles:
        return True
    owner = owner_of(info)
    return owner is not None and owner == name
