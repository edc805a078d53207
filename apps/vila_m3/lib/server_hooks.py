"""Changes to MONAI Label's running FastAPI app made from the app instance: middleware and replaced routes.

MONAI Label creates the app instance inside the FastAPI lifespan, after Starlette has built its middleware
stack and while the routes are already registered; both helpers work at that point and are idempotent (a
``POST /reload`` builds a new app instance, which installs the same things again).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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


def walk_routes(router: APIRouter, prefix: str = "") -> Iterator[tuple[APIRouter, BaseRoute, str]]:
    """(the router holding it, route, prefix it is served under) for every route reachable from ``router``.

    FastAPI keeps an included router as one entry (``original_router`` plus the include's ``prefix``) rather
    than copying its routes into the parent, so MONAI Label's routes live in its endpoint modules' routers.
    """
    for route in list(router.routes):
        original = getattr(route, "original_router", None)
        if isinstance(original, APIRouter):
            yield from walk_routes(original, prefix + getattr(getattr(route, "include_context", None), "prefix", ""))
        else:
            yield router, route, prefix


def route_keys(route: BaseRoute, prefix: str = "") -> set[tuple[str, str]]:
    """The (path, method) pairs a route answers under ``prefix``; empty for mounts and websockets."""
    path = getattr(route, "path", None)
    methods = getattr(route, "methods", None) or set()
    return {(prefix + path, method) for method in methods} if path else set()


def remove_routes(server: FastAPI, pairs: Iterable[tuple[str, str]], keep: APIRouter | None = None) -> int:
    """Remove the routes answering any of the (path, method) ``pairs``, wherever they were included from
    (except those of ``keep``); returns how many went."""
    wanted = set(pairs)
    removed = 0
    for holder, route, prefix in list(walk_routes(server.router)):
        if holder is not keep and route_keys(route, prefix) & wanted:
            holder.routes.remove(route)
            removed += 1
            _mark_changed(holder)
    _mark_changed(server.router)
    server.openapi_schema = None  # the docs are built again from the routes now in place
    return removed


def replace_routes(server: FastAPI, router: APIRouter, prefix: str = "") -> None:
    """Put ``router``'s routes in place of the server's routes with the same path and method."""
    remove_routes(server, {pair for _, route, base in walk_routes(router, prefix) for pair in route_keys(route, base)},
                  keep=router)
    if not any(holder is router for holder, _, _ in walk_routes(server.router)):
        server.include_router(router, prefix=prefix)


def _mark_changed(router: APIRouter) -> None:
    """Tell FastAPI (versions that cache included routes) that ``router``'s routes changed."""
    mark = getattr(router, "_mark_routes_changed", None)
    if callable(mark):
        mark()
