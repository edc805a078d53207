"""A scripted VLM server in a process of its own, so that it competes with neither the MONAI Label server
nor the benchmark's own clients for one interpreter lock."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any


def _serve(connection: Any, start_server: Callable[..., Any], args: tuple) -> None:
    """Child process: ``start_server(*args)`` (a started server with ``url`` and ``stop()``) until the parent
    says stop."""
    server = start_server(*args)
    connection.send(server.url)
    connection.recv()
    server.stop()


class VLMProcess:
    """``start_server(*args)`` run in a child process; ``url`` is where it answers. ``start_server`` must be a
    module-level function (it crosses into the child)."""

    def __init__(self, start_server: Callable[..., Any], *args: Any):
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, start_server, args), daemon=True)
        self._process.start()
        if not self._connection.poll(60):
            self._process.kill()
            raise RuntimeError("the scripted VLM did not start")
        self.url: str = self._connection.recv()

    def stop(self) -> None:
        if self._process.is_alive():
            self._connection.send("stop")
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
