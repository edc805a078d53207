"""A small in-process work queue for model work: one queue per device (``cuda:0``, ``cuda:1``, ``cpu``, and
``remote`` for a VLM served elsewhere), each running at most ``concurrency`` jobs at a time, first come first
served, with at most ``max_waiting`` jobs waiting.

What is inside a job is only the model's own work:

- a VLM generation (one answer of the model; a turn with expert rounds queues once per answer);
- an expert's run on a volume (``runner.run``: the network and the pre/post-processing that the runner does
  on the device around it), only when the result is not cached already.

Outside any job: reading the volume, rendering slices and overlays, writing labelmaps and chats, and the
cache lookup, so a waiting job waits only for other jobs' model time.

A job waiting its turn can be told its place (``on_queued(position, ahead)``, again whenever it changes) and
be cancelled (its ``cancel`` event set): it leaves the line at once with :class:`JobCancelled`. A new job
finding ``max_waiting`` jobs already waiting is refused with :class:`QueueFull`, which carries a
``retry_after_s`` estimate for an HTTP ``Retry-After`` header.

This schedules one server's devices and nothing more: a site that needs more runs the VLM on a serving
engine (vLLM, NIM) through the remote backend, which schedules its own GPUs.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

DEFAULT_MAX_WAITING = 16
REMOTE = "remote"
DEFAULT_CONCURRENCY = {REMOTE: 4}  # a serving engine batches requests; local devices default to 1
_POLL_S = 0.05  # how often a waiting job looks at its cancel event (seconds)


class QueueFull(RuntimeError):
    """The device's queue already holds its maximum of waiting jobs; try again after ``retry_after_s``."""

    def __init__(self, device: str, waiting: int, retry_after_s: int):
        super().__init__(f"the server is busy: {waiting} jobs wait for {device}; try again in {retry_after_s} s")
        self.device = device
        self.waiting = waiting
        self.retry_after_s = retry_after_s


class JobCancelled(Exception):
    """A job was cancelled while it waited; it never ran."""


@dataclass
class JobControl:
    """What a caller (a chat turn, an infer request) gives its jobs.

    Attributes:
        cancel: set to take a waiting job out of the line (a running job is told through its own work).
        on_queued: ``on_queued(position, ahead)`` when a job has to wait and whenever its place changes;
            ``position`` is 1 for the next job to start, ``ahead`` counts the jobs waiting before it plus those
            running. Called on the waiting thread.
        waited_s: seconds spent waiting, summed over this control's jobs.
        admitted: set once a job of this control has started: its later jobs (a turn's next answer, its
            experts) wait however long the line is, never refused half way through a request.
    """

    cancel: threading.Event | None = None
    on_queued: Callable[[int, int], None] | None = None
    waited_s: float = 0.0
    admitted: bool = False


@dataclass(eq=False)
class _Waiting:
    control: JobControl
    reported: tuple[int, int] | None = None


@dataclass
class QueueStats:
    """A queue's state now: jobs running and waiting, the bound on each, and its mean job time (s)."""

    device: str
    running: int
    waiting: int
    concurrency: int
    max_waiting: int
    mean_job_s: float | None = None
    done: int = 0


class WorkQueue:
    """One device's queue: at most ``concurrency`` jobs at a time, ``max_waiting`` waiting, in arrival order."""

    def __init__(self, device: str, concurrency: int = 1, max_waiting: int = DEFAULT_MAX_WAITING):
        if concurrency < 1:
            raise ValueError(f"queue concurrency for {device} must be at least 1, not {concurrency}")
        if max_waiting < 0:
            raise ValueError(f"queue_max must be 0 or more, not {max_waiting}")
        self.device = device
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self._running = 0
        self._waiting: deque[_Waiting] = deque()
        self._changed = threading.Condition()
        self._mean_job_s: float | None = None
        self._done = 0

    def stats(self) -> QueueStats:
        with self._changed:
            return QueueStats(self.device, self._running, len(self._waiting), self.concurrency, self.max_waiting,
                              self._mean_job_s, self._done)

    def retry_after_s(self) -> int:
        """Seconds until a place is likely free: the waiting jobs' share of the device at the mean job time."""
        with self._changed:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> int:
        mean = self._mean_job_s if self._mean_job_s is not None else 5.0
        return max(1, min(600, math.ceil(mean * (len(self._waiting) + 1) / self.concurrency)))

    def admit(self) -> None:
        """Raise :class:`QueueFull` if a new job would be refused now (for routes that answer before queueing)."""
        with self._changed:
            if self._must_wait() and len(self._waiting) >= self.max_waiting:
                raise QueueFull(self.device, len(self._waiting), self._retry_after_locked())

    def _must_wait(self) -> bool:
        return self._running >= self.concurrency or bool(self._waiting)

    def run(self, work: Callable[[], T], control: JobControl | None = None) -> T:
        """Run ``work()`` as a job of this queue once its turn comes; its result or exception is returned or raised.

        Raises :class:`QueueFull` when it would have to wait and the line is full (not for a control already
        admitted), :class:`JobCancelled` when ``control.cancel`` is set before it starts (it is out of the line
        at once).
        """
        control = control or JobControl()
        began = time.monotonic()
        self._enter(control)
        control.admitted = True
        waited = time.monotonic() - began
        control.waited_s += waited
        started = time.monotonic()
        try:
            return work()
        finally:
            seconds = time.monotonic() - started
            with self._changed:
                self._running -= 1
                self._done += 1
                self._mean_job_s = seconds if self._mean_job_s is None else 0.8 * self._mean_job_s + 0.2 * seconds
                self._changed.notify_all()

    def _enter(self, control: JobControl) -> None:
        """Wait for a place (reporting the job's position as it changes); on return the job counts as running."""
        cancel = control.cancel
        with self._changed:
            if cancel is not None and cancel.is_set():
                raise JobCancelled(f"cancelled before it started on {self.device}")
            if not self._must_wait():
                self._running += 1
                return
            if len(self._waiting) >= self.max_waiting and not control.admitted:
                raise QueueFull(self.device, len(self._waiting), self._retry_after_locked())
            me = _Waiting(control)
            self._waiting.append(me)
            self._changed.notify_all()
        try:
            while True:
                with self._changed:
                    if cancel is not None and cancel.is_set():
                        self._waiting.remove(me)
                        self._changed.notify_all()
                        raise JobCancelled(f"cancelled while waiting for {self.device}")
                    if self._waiting[0] is me and self._running < self.concurrency:
                        self._waiting.popleft()
                        self._running += 1
                        self._changed.notify_all()
                        return
                    index = self._waiting.index(me)
                    place = (index + 1, index + self._running)
                    settling = self._running < self.concurrency  # the head is about to start: not a place to tell
                    if place == me.reported or control.on_queued is None or settling:
                        self._changed.wait(_POLL_S)
                        continue
                me.reported = place
                control.on_queued(*place)  # outside the lock: a slow listener holds up no one else
        except BaseException:
            with self._changed:
                if me in self._waiting:
                    self._waiting.remove(me)
                    self._changed.notify_all()
            raise


@dataclass
class WorkQueues:
    """The queues of one server, one per device, made on first use.

    Attributes:
        concurrency: jobs at a time per device; ``"default"`` applies to devices not named (1 unless set).
        max_waiting: waiting jobs per device before new ones are refused (``--conf queue_max``).
    """

    concurrency: Mapping[str, int] = field(default_factory=dict)
    max_waiting: int = DEFAULT_MAX_WAITING
    _queues: dict[str, WorkQueue] = field(default_factory=dict, init=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False)

    @classmethod
    def from_conf(cls, conf: Mapping[str, str]) -> WorkQueues:
        """From app settings: ``queue_concurrency`` (``2`` for every device, or ``cuda:0=2,cpu=1,remote=8``)
        and ``queue_max`` (waiting jobs per device, default 16). ValueError names a bad setting."""
        return cls(parse_concurrency(conf.get("queue_concurrency") or ""),
                   _count("queue_max", conf.get("queue_max") or str(DEFAULT_MAX_WAITING), minimum=0))

    def queue(self, device: str) -> WorkQueue:
        """The queue of ``device`` (``cuda`` means ``cuda:0``)."""
        device = normalize_device(device)
        with self._guard:
            found = self._queues.get(device)
            if found is None:
                fallback = DEFAULT_CONCURRENCY.get(device, 1)
                count = self.concurrency.get(device, self.concurrency.get("default", fallback))
                found = self._queues[device] = WorkQueue(device, count, self.max_waiting)
            return found

    def run(self, device: str, work: Callable[[], T], control: JobControl | None = None) -> T:
        """``work()`` as a job of ``device``'s queue (see :meth:`WorkQueue.run`)."""
        return self.queue(device).run(work, control)

    def stats(self) -> list[QueueStats]:
        with self._guard:
            queues = list(self._queues.values())
        return [queue.stats() for queue in queues]


def normalize_device(device: object) -> str:
    """A queue name for a torch device or its text: ``cuda`` → ``cuda:0``; ``cpu``, ``remote`` as they are."""
    text = str(device or "cpu").strip().lower()
    return "cuda:0" if text == "cuda" else text


def parse_concurrency(text: str) -> dict[str, int]:
    """``"2"`` → every device 2 at a time; ``"cuda:0=2,remote=8"`` per device (others keep their default)."""
    text = text.strip()
    if not text:
        return {}
    if "=" not in text:
        return {"default": _count("queue_concurrency", text)}
    found: dict[str, int] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if not name.strip() or not value.strip():
            raise ValueError(f"queue_concurrency: '{item.strip()}' is not DEVICE=COUNT (e.g. cuda:0=2,remote=8)")
        found[normalize_device(name)] = _count(f"queue_concurrency {name.strip()}", value)
    return found


def _count(name: str, value: str, minimum: int = 1) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not '{value.strip()}'") from None
    if number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {number}")
    return number
