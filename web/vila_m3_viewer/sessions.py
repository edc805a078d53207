"""One viewer per browser tab: trame's multi-client server (:mod:`trame.tools.serve`).

Every websocket the page opens gets a new trame server of its own, named after the connection, and
:func:`serve_tabs` builds a new :class:`~vila_m3_viewer.app.ChatViewer` on it: its own MRML scene,
HTTP client (and so its own login), chat and background jobs. When the tab closes (its websocket
ends), trame stops that server and :func:`release` lets the viewer go: its polling stops, its jobs
are asked to stop, its scene is emptied and its temporary folder removed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
from collections.abc import Callable
from typing import Any

from trame.app import core as trame_core
from trame.tools.serve import MultiClientServer

logger = logging.getLogger(__name__)

#: the name trame.tools.serve gives the app it builds only to learn the page's static files
WWW_APP = "__www__"


def release(viewer: Any) -> None:
    """Let ``viewer`` (a :class:`~vila_m3_viewer.app.ChatViewer` whose tab has closed) go: stop its page
    loop, ask its workers to stop, empty its scene, remove its temporary files and trame's record of its
    server. Safe to call twice."""
    task = getattr(viewer, "_poll_task", None)
    if task is not None:
        task.cancel()
        viewer._poll_task = None
    viewer.jobs.abort_all()
    login = getattr(viewer, "login", None)
    if login is not None:
        login.forget()
    try:
        viewer.slicer_app.scene.Clear(0)
    except Exception:  # the scene may already be gone
        logger.exception("clearing a closed tab's scene failed")
    shutil.rmtree(viewer.temp_dir, ignore_errors=True)
    trame_core.AVAILABLE_SERVERS.pop(viewer.server.name, None)


def tab_factory(make_viewer: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap ``make_viewer(server_name)`` so that each tab's viewer is released when its tab closes."""
    def make(name: str) -> Any:
        viewer = make_viewer(name)
        if name != WWW_APP:
            viewer.server.controller.on_server_exited.add(lambda **_: _released(viewer))
        logger.info("tab %s opened (%d open)", name, open_tabs())
        return viewer

    return make


def _released(viewer: Any) -> None:
    release(viewer)
    gc.collect()
    logger.info("tab %s closed (%d open)", viewer.server.name, open_tabs())


def open_tabs() -> int:
    """How many tabs have a viewer now."""
    return sum(1 for name in trame_core.AVAILABLE_SERVERS if name not in (WWW_APP, trame_core.DEFAULT_NAME))


def serve_tabs(make_viewer: Callable[[str], Any], host: str, port: int) -> None:
    """Serve the page on ``host:port``; each browser tab gets ``make_viewer(name)`` (blocks until stopped)."""
    server = MultiClientServer(tab_factory(make_viewer))
    asyncio.run(server.run(host=host, port=port))
