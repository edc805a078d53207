"""Changes to MONAI Label's running FastAPI app made from the app instance: middleware and replaced routes.

MONAI Label creates the app instance inside the FastAPI lifespan, after Starlette has built its middleware
stack and while the routes are already registered; both helpers work at that point and are idempotent (a
``POST /reload`` builds a new app instance, which installs the same things again).
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter, FastAPI
from starlette.middleware import Middleware
from starlette.routing import BaseRoute


def install_middleware(server: FastAPI, cls: type, **options) -> None:
    """Add the ASGI middleware ``cls(app, **options)`` to a running ``server``, innermost of the user middleware
    (so MONAI Label's CORS middleware still wraps its answers); a middleware of the same class is replaced.

    Starlette refuses ``add_middleware`` once its stack is built (at the first request or the lifespan start,
    which is before MONAI Label creates the app instance). Its ``__call__`` sends every request through
    ``server.middleware_stack``, so this edits ``user_middleware`` and builds that stack anew; requests already
    in flight finish on the old stack.
    """
    server.user_middleware[:] = [entry for entry in server.user_middleware if entry.cls is not cls]
    server.user_middleware.append(Middleware(cls, **options))
    if server.middleware_stack is not None:
        server.middleware_stack = server.build_middleware_stack()


def route_key(route: BaseRoute) -> set[tuple[str, str]]:
    """The (path, method) pairs a route answers; empty for mounts and websockets."""
    path = getattr(route, "path", None)
    methods = getattr(route, "methods", None) or set()
    return {(path, method) for method in methods} if path else set()


def remove_routes(server: FastAPI, pairs: Iterable[tuple[str, str]]) -> int:
    """Remove the routes answering any of the (path, method) ``pairs``; returns how many went."""
    wanted = set(pairs)
    kept = [route for route in server.router.routes if not route_key(route) & wanted]
    removed = len(server.router.routes) - len(kept)
    server.router.routes[:] = kept
    server.openapi_schema = None  # the docs are built again from the routes now in place
    return removed


def replace_routes(server: FastAPI, router: APIRouter, prefix: str = "") -> None:
    """Put ``router``'s routes in place of the server's routes with the same path and method."""
    probe = APIRouter()
    probe.include_router(router, prefix=prefix)
    remove_routes(server, {pair for route in probe.routes for pair in route_key(route)})
    server.include_router(router, prefix=prefix)
