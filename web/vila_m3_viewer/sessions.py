"""One viewer per browser tab: trame's multi-client server (:mod:`trame.tools.serve`).

Every websocket the page opens gets a new trame server of its own, named after the connection, and
:func:`serve_tabs` builds a new :class:`~vila_m3_viewer.app.ChatViewer` on it: its own MRML scene,
HTTP client (and so its own login), chat and background jobs. When the tab closes (its websocket
ends), trame stops that server and :func:`release` lets the viewer go: its polling stops, its jobs
are asked to stop, its views' render loops end and their render windows are finalized, its scene is
emptied and its temporary folder removed, so that Python can free it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import weakref
from collections.abc import Callable
from typing import Any

from trame.app import core as trame_core
from trame.tools.serve import MultiClientServer

logger = logging.getLogger(__name__)

#: the name trame.tools.serve gives the app it builds only to learn the page's static files
WWW_APP = "__www__"

#: every tab's Slicer application (MRML scene, views) still in memory; a released one leaves once Python frees it
_SCENES: weakref.WeakSet = weakref.WeakSet()


async def close_views(viewer: Any) -> None:
    """End the render loops of ``viewer``'s views (trame-rca's schedulers hold the views while they run),
    finalize their render windows (the offscreen EGL contexts) and forget them."""
    manager = viewer.slicer_app.view_manager
    for factory in list(getattr(manager, "_factories", ())):  # trame-slicer keeps its view factories here
        for view_id in list(getattr(factory, "_views", {})):
            view = factory.get_factory_view(view_id)
            adapter = getattr(view, "view_adapter", None)
            try:
                if adapter is not None:
                    await adapter.close()
                slicer_view = getattr(view, "slicer_view", view)
                slicer_view.finalize()
            except Exception:  # one view that does not close must not keep the others
                logger.exception("closing the view %s of a closed tab failed", view_id)
            manager.remove_view(view_id)


def release(viewer: Any) -> None:
    """Let ``viewer`` (a :class:`~vila_m3_viewer.app.ChatViewer` whose tab has closed) go: stop its page
    loop, ask its workers to stop, empty its scene, remove its temporary files and trame's record of its
    server. Safe to call twice; :func:`close_views` ends its views."""
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


def cut_trame_links(viewer: Any) -> None:
    """Clear what a closed tab's trame server keeps of the tab: its state-change callbacks, its triggers and
    controller functions, its page's widgets, and the viewer's own attributes. trame keeps the last server
    started and the last page built in globals (``CoreServer.server``, the widgets' context, typed-state
    proxies); through those links it would keep the tab's whole scene."""
    server = viewer.server
    callbacks = getattr(server.state, "_change_callbacks", None)
    if isinstance(callbacks, dict):
        callbacks.clear()
    for name in ("_triggers", "_triggers_fn2name", "_func_dict"):
        table = getattr(server.controller, name, None)
        if isinstance(table, dict):
            table.clear()
    try:
        server.ui.clear()
    except Exception:  # an older trame-server without it: the widgets stay (small without the viewer)
        logger.debug("the closed tab's widgets stay", exc_info=True)
    vars(viewer).clear()


def tab_factory(make_viewer: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap ``make_viewer(server_name)`` so that each tab's viewer is released when its tab closes."""
    def make(name: str) -> Any:
        viewer = make_viewer(name)
        if name != WWW_APP:
            _SCENES.add(viewer.slicer_app)
            ref = weakref.ref(viewer)  # the server's callback must not keep the viewer alive
            viewer.server.controller.on_server_exited.add(lambda **_: _closed(ref))
            logger.info("tab %s opened (%d open)", name, open_tabs())
        return viewer

    return make


def _closed(ref: weakref.ref) -> None:
    viewer = ref()
    if viewer is None:
        return
    name = viewer.server.name
    release(viewer)
    asyncio.get_running_loop().create_task(_finish_release(viewer, name))


async def _finish_release(viewer: Any, name: str) -> None:
    await close_views(viewer)
    cut_trame_links(viewer)
    del viewer
    gc.collect()
    logger.info("tab %s closed (%d open, %d scenes in memory)", name, open_tabs(), len(_SCENES))


def open_tabs() -> int:
    """How many tabs have a viewer now."""
    return sum(1 for name in trame_core.AVAILABLE_SERVERS if name not in (WWW_APP, trame_core.DEFAULT_NAME))


def serve_tabs(make_viewer: Callable[[str], Any], host: str, port: int) -> None:
    """Serve the page on ``host:port``; each browser tab gets ``make_viewer(name)`` (blocks until stopped)."""
    server = MultiClientServer(tab_factory(make_viewer))
    asyncio.run(server.run(host=host, port=port))
