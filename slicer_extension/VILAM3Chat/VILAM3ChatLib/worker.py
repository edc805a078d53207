"""Work off the GUI thread, results delivered on it.

A Qt panel must never wait for the network, and must only touch widgets and the scene from its own
thread. :class:`BackgroundJobs` runs a function in a worker thread and queues what it produces
(its result, its error, and any messages it posts while running); the panel calls :meth:`poll`
from a timer, which runs the callbacks on the panel's thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["BackgroundJobs", "Job"]

logger = logging.getLogger(__name__)


class Job:
    """A running piece of work: its name, a way to post messages to the GUI, and an abort flag."""

    def __init__(self, jobs: BackgroundJobs, name: str):
        self.name = name
        self.abort = threading.Event()
        self._jobs = jobs

    def post(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the GUI thread at the next poll."""
        self._jobs._queue.put((callback, args))


class BackgroundJobs:
    """Worker threads whose callbacks run on the thread that calls :meth:`poll`."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._running: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, name: str, work: Callable[[Job], Any], on_done: Callable[[Any], None],
              on_error: Callable[[BaseException], None]) -> Job:
        """Run ``work(job)`` in a daemon thread; then ``on_done(result)`` or ``on_error(exception)``
        on the GUI thread. One job per name at a time.

        Raises:
            RuntimeError: a job with that name is still running.
        """
        with self._lock:
            if name in self._running:
                raise RuntimeError(f"'{name}' is still running")
            job = Job(self, name)
            self._running[name] = job

        def run() -> None:
            try:
                result = work(job)
            except BaseException as err:  # delivered to the GUI, which shows it
                job.post(self._finish, job, on_error, err)
            else:
                job.post(self._finish, job, on_done, result)

        threading.Thread(target=run, name=f"vila-m3-{name}", daemon=True).start()
        return job

    def _finish(self, job: Job, callback: Callable[[Any], None], value: Any) -> None:
        with self._lock:
            self._running.pop(job.name, None)
        callback(value)

    def running(self, name: str) -> bool:
        with self._lock:
            return name in self._running

    def abort(self, name: str) -> bool:
        """Ask the job ``name`` to stop; False when no such job runs."""
        with self._lock:
            job = self._running.get(name)
        if job is None:
            return False
        job.abort.set()
        return True

    def abort_all(self) -> None:
        """Ask every running job to stop (each checks ``job.abort`` where it can)."""
        with self._lock:
            for job in self._running.values():
                job.abort.set()

    def poll(self, limit: int = 1000) -> int:
        """Run the queued callbacks (at most ``limit``) on this thread; returns how many ran.

        A callback that raises is logged and does not stop the others.
        """
        count = 0
        while count < limit:
            try:
                callback, args = self._queue.get_nowait()
            except queue.Empty:
                break
            count += 1
            try:
                callback(*args)
            except Exception:
                logger.exception("VILA-M3 panel callback failed")
        return count
