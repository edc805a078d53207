"""Login for the whole server: MONAI Label's roles, with tokens verified the way they must be.

MONAI Label 0.8.5 verifies tokens in ``monailabel.endpoints.user.auth.get_current_user`` by calling
``jwt.decode`` without ``algorithms``; PyJWT 2.x refuses that, so every token gets 401, and going back
to a PyJWT that accepts it re-opens algorithm confusion (CVE-2022-29217: an HS256 token signed with the
realm's *public* key passes). Every MONAI Label route depends on ``RBAC(role)``, which depends on
``get_current_user``; so :func:`install_auth` registers a FastAPI dependency override for that one
function, and every route, MONAI Label's and ours, gets tokens checked by
:class:`vila_m3.security.tokens.TokenVerifier` (explicit asymmetric algorithms, the realm's keys by
``kid``, expiry, issuer, audience). No installed file is touched, and PyJWT stays at 2.x.

It also closes what MONAI Label leaves open with auth on: ``POST /reload`` has no role (now admin),
and ``POST /auth/token`` answered a wrong password with a 500 (now 401). :func:`route_access` lists
every route with the roles it needs; only :data:`PUBLIC_ROUTES` may need none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests
from fastapi import Depends, FastAPI, Form, HTTPException
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordBearer
from monailabel.config import settings
from monailabel.endpoints.user import auth as monailabel_auth
from monailabel.endpoints.user.auth import DEFAULT_USER, RBAC, User
from starlette.routing import BaseRoute, Mount

from lib.audit_refusals import note_refusal, note_user
from vila_m3.security.tokens import RealmUnavailable, TokenError, TokenSettings, TokenVerifier

logger = logging.getLogger(__name__)

#: Routes anyone may call: the login itself and the API documentation (no data behind any of them).
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/auth/"),            # is login on, which realm and client (what a client needs to log in)
    ("POST", "/auth/token"),      # the password login
    ("GET", "/"),                 # the API page (Swagger UI)
    ("GET", "/docs"),             # the API page (ReDoc)
    ("GET", "/openapi.json"),     # the API description the two pages read
    ("GET", "/favicon.ico"),
    ("GET", "/static"),           # MONAI Label's packaged web files (icon, OHIF viewer code); no data
})

#: Marker in :attr:`RouteAccess.roles` of a route that any signed-in user may call.
SIGNED_IN = "(any signed-in user)"

#: The admin route that lists :func:`route_access`.
ROUTES_PATH = "/vila_m3/auth/routes"

_BEARER = OAuth2PasswordBearer(tokenUrl="/auth/token", auto_error=False)


def all_roles() -> tuple[str, ...]:
    """MONAI Label's four roles, most powerful first."""
    return (settings.MONAI_LABEL_AUTH_ROLE_ADMIN, settings.MONAI_LABEL_AUTH_ROLE_REVIEWER,
            settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR, settings.MONAI_LABEL_AUTH_ROLE_USER)


def token_settings(conf: dict[str, str]) -> TokenSettings:
    """The verifier's settings: MONAI Label's ``MONAI_LABEL_AUTH_*``, plus the app's ``--conf auth_issuer``
    (the expected ``iss`` when it differs from the realm's openid-configuration, e.g. behind a proxy)."""
    return TokenSettings(
        realm_uri=settings.MONAI_LABEL_AUTH_REALM_URI,
        client_id=settings.MONAI_LABEL_AUTH_CLIENT_ID,
        issuer=conf.get("auth_issuer", ""),
        roles_claim=settings.MONAI_LABEL_AUTH_TOKEN_ROLES,
        username_claim=settings.MONAI_LABEL_AUTH_TOKEN_USERNAME,
        email_claim=settings.MONAI_LABEL_AUTH_TOKEN_EMAIL,
        name_claim=settings.MONAI_LABEL_AUTH_TOKEN_NAME,
        timeout_s=float(settings.MONAI_LABEL_AUTH_TIMEOUT),
    )


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def current_user_dependency(verifier: TokenVerifier) -> Callable[..., User]:
    """The replacement of MONAI Label's ``get_current_user``: the user of a verified bearer token.

    A plain ``def``: FastAPI runs it in its thread pool, so a first fetch of the realm's keys never
    blocks the event loop.
    """

    def current_user(token: str | None = Depends(_BEARER)) -> User:
        if not token:
            note_refusal("no token")
            raise _unauthorized("login required: send 'Authorization: Bearer <token>' (POST /auth/token gives one)")
        try:
            verified = verifier.verify(token)
        except RealmUnavailable as err:
            logger.error("login service unavailable: %s", err.reason)
            raise HTTPException(503, "the login service cannot be reached; try again later") from None
        except TokenError as err:
            logger.warning("token refused: %s", err.reason)
            note_refusal("token not valid")
            raise _unauthorized("the token is not valid (expired, not signed by this server's realm, or not "
                                "issued for this client); log in again") from None
        note_user(verified.username)  # a refusal after this (a missing role) names the user in the audit line
        return User(username=verified.username, email=verified.email, name=verified.name, roles=list(verified.roles))

    return current_user


def _default_user() -> User:
    """Login off: everyone is MONAI Label's default user, who has every role (as MONAI Label does)."""
    return DEFAULT_USER


def install_auth(server: FastAPI, conf: dict[str, str]) -> TokenVerifier | None:
    """Put the verified login in front of every route of ``server``; returns the verifier (None with login off).

    Idempotent: the app may be created more than once in one process (``/reload``).
    """
    admin = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))
    replace_route(server, "/reload", "POST", _reload, dependencies=[admin], include_in_schema=False,
                  summary="Forget the app instance; the next request creates it again (admin)")
    replace_route(server, ROUTES_PATH, "GET", lambda: [access.as_dict() for access in route_access(server)],
                  dependencies=[admin], tags=["VILA-M3 login"],
                  summary="Every route of this server with the roles it needs; [] = public (admin)")
    if not settings.MONAI_LABEL_AUTH_ENABLE:
        server.dependency_overrides[monailabel_auth.get_current_user] = _default_user
        return None
    verifier = TokenVerifier(token_settings(conf))
    server.dependency_overrides[monailabel_auth.get_current_user] = current_user_dependency(verifier)
    replace_route(server, "/auth/token", "POST", _login, summary="Log in with user name and password; gives a token")
    logger.info("login on: realm %s, client %s", verifier.realm_uri, verifier.settings.client_id)
    return verifier


def replace_route(server: FastAPI, path: str, method: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
    """Answer ``method path`` with ``endpoint``: an old top-level route of ours or the app's is removed, and
    the new one goes first, so that it also wins over a route inside an included router (FastAPI keeps
    those inside the router object, where they cannot be removed from the app)."""
    def same(route: BaseRoute) -> bool:
        return isinstance(route, APIRoute) and route.path == path and method in route.methods

    server.router.routes[:] = [route for route in server.router.routes if not same(route)]
    server.add_api_route(path, endpoint, methods=[method], **kwargs)
    routes = server.router.routes
    routes.insert(0, routes.pop())  # add_api_route appends
    mark_changed = getattr(server.router, "_mark_routes_changed", None)
    if callable(mark_changed):
        mark_changed()
    server.openapi_schema = None


def _reload() -> dict[str, Any]:
    """MONAI Label's ``/reload``, for admins only."""
    from monailabel.interfaces.utils.app import clear_cache

    clear_cache()
    return {}


def _login(username: str = Form(...), password: str = Form(...)) -> dict[str, Any]:
    """The realm's password grant for our client; a refused login is 401, an unreachable realm 503."""
    try:
        endpoint = monailabel_auth.token_uri()
        response = requests.post(endpoint, timeout=settings.MONAI_LABEL_AUTH_TIMEOUT, data={
            "client_id": settings.MONAI_LABEL_AUTH_CLIENT_ID, "username": username, "password": password,
            "grant_type": "password",
        })
    except (requests.RequestException, ValueError, TypeError) as err:
        logger.error("login service unavailable: %s", err)
        raise HTTPException(503, "the login service cannot be reached; try again later") from None
    if response.status_code in (400, 401, 403):
        logger.info("login refused for a user (realm answered %d)", response.status_code)
        note_refusal("wrong user name or password")
        raise _unauthorized("wrong user name or password, or this account may not use this server")
    if response.status_code != 200:
        logger.error("login service answered %d", response.status_code)
        raise HTTPException(503, "the login service failed; try again later")
    body = response.json()
    return {"access_token": body.get("access_token"), "token_type": body.get("token_type", "Bearer"),
            "expires_in": body.get("expires_in")}


# --- which route needs which role ----------------------------------------------------------------


@dataclass(frozen=True)
class RouteAccess:
    """One route and who may call it.

    Attributes:
        method: ``GET``, ``POST``, ...; ``GET`` for a mounted folder.
        path: the route's path template.
        roles: the roles of which one is needed; ``(SIGNED_IN,)`` for any signed-in user; empty = public.
    """

    method: str
    path: str
    roles: tuple[str, ...]

    @property
    def public(self) -> bool:
        return not self.roles

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "roles": list(self.roles)}


def _required_roles(dependant: Any) -> tuple[str, ...]:
    """The roles a dependency tree demands (the first RBAC on the way wins; any RBAC means signed in)."""
    found: list[str] = []
    signed_in = False
    stack = [dependant]
    while stack:
        node = stack.pop()
        call = getattr(node, "call", None)
        if isinstance(call, RBAC):
            roles = call.roles
            roles = (list(all_roles()) if roles == "*" else [roles]) if isinstance(roles, str) else list(roles)
            found.extend(role for role in roles if role not in found)
        elif call is monailabel_auth.get_current_user:
            signed_in = True
        stack.extend(getattr(node, "dependencies", []))
    if found:
        return tuple(found)
    return (SIGNED_IN,) if signed_in else ()


def _flat_routes(server: FastAPI) -> Iterator[tuple[BaseRoute, str, set[str], Any]]:
    """(route, full path, methods, dependency tree) of every route in matching order, routers included."""
    try:  # FastAPI keeps included routers as one entry each and resolves their routes lazily
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: include_router copied every route into the app
        iter_route_contexts = None
    if iter_route_contexts is None:
        for route in server.router.routes:
            yield route, getattr(route, "path", "?"), set(getattr(route, "methods", None) or ()), \
                getattr(route, "dependant", None)
        return
    for context in iter_route_contexts(server.router.routes):
        original = context.original_route
        yield original, context.path or getattr(original, "path", "?"), set(context.methods or ()), \
            getattr(context, "dependant", None) or getattr(original, "dependant", None)


def route_access(server: FastAPI) -> list[RouteAccess]:
    """Every route of ``server`` (one entry per method) with the roles it requires. A route hidden behind
    an earlier one with the same path and method (it never answers) is left out."""
    listed: dict[tuple[str, str], RouteAccess] = {}
    for route, path, methods, dependant in _flat_routes(server):
        if isinstance(route, Mount):
            methods, roles = {"GET"}, ()
        elif isinstance(route, APIRoute):
            roles = _required_roles(dependant)
        else:  # starlette's own routes (the docs pages FastAPI adds): no dependencies at all
            methods, roles = (methods or {"GET"}) - {"HEAD"}, ()
        for method in methods:
            listed.setdefault((method, path), RouteAccess(method, path, roles))
    return sorted(listed.values(), key=lambda access: (access.path, access.method))


def unguarded_routes(server: FastAPI) -> list[RouteAccess]:
    """Routes that need no role and are not in :data:`PUBLIC_ROUTES` (must be none)."""
    return [access for access in route_access(server)
            if access.public and (access.method, access.path) not in PUBLIC_ROUTES]
