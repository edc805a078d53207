"""Run the experts for a server: each runner is built once, shared by all requests, released after
a configurable idle time, and results are cached by (volume, expert, argument).

Every expert is reached the same way: :meth:`ExpertService.run_expert` on a study and an argument, through
the expert's runner (vila_m3.experts.runner.ExpertRunner), whose class the registry names. The runner checks
the study, runs, and writes the result's text for the model (:meth:`ExpertService.feedback`).

Volumes are identified by a content key (path, size and modification time of their files), so a
repeated request on an unchanged study is served from the cache without reading it again.

With the server's work queues (``queues``), an uncached run is one job of the experts' device queue; a
cached result never waits in the queue. The job is the network's work only where the runner splits its run
into ``prepare`` / ``infer`` / ``finish`` (VISTA3D: preprocessing and inversion to the input grid happen
outside the job); otherwise it is the runner's whole ``run``. The volume read and the cache lookup come
before, the caller's labelmap writing after.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vila_m3.experts.registry import ExpertRegistry, ExpertSpec, ResolvedArgument
from vila_m3.experts.runner import ExpertRunner, StudyView, build_runner, explicit_labels, study_from_paths
from vila_m3.imaging import Volume, read_volume
from vila_m3.models.manifest import ModelManifest
from vila_m3.work_queue import JobControl, WorkQueues, normalize_device

DEFAULT_IDLE_RELEASE_S = 600.0
DEFAULT_CACHE_ENTRIES = 16


def file_key(path: str | Path) -> str:
    """A key that changes when the file (or any file of a DICOM folder) changes: path, sizes, mtimes."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamps = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return f"{path.resolve()}|{stamps}"


class LruCache:
    """A small thread-safe least-recently-used cache."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class ExpertRun:
    """One expert call's outcome: the runner's result, whether it came from the cache, and timings (s)."""

    result: Any
    cached: bool
    timings: dict[str, float] = field(default_factory=dict)


class ExpertService:
    """Owns the expert runners of one server.

    Args:
        models_dir: where weights are staged (``configs/models.yaml`` paths are relative to it).
        registry: the experts; ``ExpertRegistry.from_config()`` by default.
        idle_release_s: a runner unused this long frees its weights (GPU memory); 0 = never.
        device: torch device for the runners (None: CUDA when available, else CPU).
        queues: the server's work queues; uncached runs wait in the queue of the runners' device.
    """

    def __init__(
        self,
        models_dir: Path,
        registry: ExpertRegistry | None = None,
        manifest: ModelManifest | None = None,
        idle_release_s: float = DEFAULT_IDLE_RELEASE_S,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
        device: str | None = None,
        queues: WorkQueues | None = None,
    ):
        self.models_dir = Path(models_dir)
        self.registry = registry or ExpertRegistry.from_config()
        self.manifest = manifest or ModelManifest.load()
        self.idle_release_s = idle_release_s
        self.device = device
        self.queues = queues
        self.volumes = LruCache(cache_entries)
        self.results = LruCache(cache_entries * 4)
        self._runners: dict[str, Any] = {}
        self._last_used: dict[str, float] = {}
        self._in_use: dict[str, int] = {}  # requests between their first and last step, per expert
        self._locks: dict[str, threading.Lock] = {}
        self._registry_lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        self._stopping = threading.Event()

    # --- volumes -------------------------------------------------------------------------------

    def load_volume(self, path: str | Path) -> tuple[str, Volume]:
        """Read ``path`` once; later calls on the unchanged file come from the cache. Returns (key, volume)."""
        key = file_key(path)
        volume = self.volumes.get(key)
        if volume is None:
            volume = read_volume(path)
            self.volumes.put(key, volume)
        return key, volume

    # --- runners -------------------------------------------------------------------------------

    def _build_runner(self, spec: ExpertSpec) -> ExpertRunner:
        """The runner class experts.yaml names for ``spec``, built for this server's models folder and device."""
        return build_runner(spec, self.models_dir, self.device)

    def runner(self, name: str) -> ExpertRunner:
        """The runner of usable expert ``name``, built on first use (its weights load when it first runs).

        Raises:
            UnknownExpert: not usable. ConfigError: its runner class cannot be imported or built.
        """
        return self._runner(name)[0]

    def _runner(self, name: str) -> tuple[Any, threading.Lock]:
        with self._registry_lock:
            if name not in self._runners:
                self._runners[name] = self._build_runner(self.registry.get(name))
                self._locks[name] = threading.Lock()
            self._last_used[name] = time.monotonic()
            self._start_reaper()
            return self._runners[name], self._locks[name]

    def _start_reaper(self) -> None:
        if self.idle_release_s <= 0 or self._reaper is not None:
            return
        self._reaper = threading.Thread(target=self._release_idle_loop, name="expert-idle-release", daemon=True)
        self._reaper.start()

    def _release_idle_loop(self) -> None:
        interval = min(30.0, max(self.idle_release_s / 4, 0.05))
        while not self._stopping.wait(interval):
            self.release_idle()

    def release_idle(self, now: float | None = None) -> list[str]:
        """Release runners unused for ``idle_release_s``; returns the names released."""
        now = time.monotonic() if now is None else now
        released = []
        with self._registry_lock:
            for name, runner in self._runners.items():
                lock = self._locks[name]
                idle = now - self._last_used.get(name, now)
                if idle >= self.idle_release_s and not self._in_use.get(name) and lock.acquire(blocking=False):
                    try:
                        if getattr(runner, "loaded", True):
                            runner.release()
                            released.append(name)
                    finally:
                        lock.release()
        return released

    def close(self) -> None:
        """Stop the idle-release thread and free every runner."""
        self._stopping.set()
        with self._registry_lock:
            for runner in self._runners.values():
                runner.release()

    # --- running -------------------------------------------------------------------------------

    @property
    def queue_device(self) -> str:
        """The work queue the runners' jobs wait in: ``device``, else ``cuda:0`` when CUDA is available, else ``cpu``."""
        if self.device is not None:
            return normalize_device(self.device)
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"

    def run(self, name: str, cache_key: tuple, call: Callable[[Any], Any],
            control: JobControl | None = None, args: tuple | None = None) -> ExpertRun:
        """Run expert ``name`` through ``call(runner)`` unless ``cache_key`` has a result already; the run is a
        job of the device's work queue (QueueFull, JobCancelled as :meth:`WorkQueue.run`). With ``args`` (those
        of ``runner.run``) and a runner that has ``prepare``/``infer``/``finish``, only ``infer`` is the job.
        Timings in seconds: ``queue`` (waiting for the device), ``wait`` (for the runner), ``run`` (the job),
        ``prepare`` and ``finish`` where staged."""
        start = time.perf_counter()
        cached = self.results.get((name, *cache_key))
        if cached is not None:
            return ExpertRun(cached, True, {"cache_lookup": time.perf_counter() - start})
        control = control or JobControl()
        waited_before = control.waited_s
        times: dict[str, float] = {}
        staged = args is not None and self._staged(name)
        if staged and self.queues is not None:
            self.queues.queue(self.queue_device).admit()  # a full queue refuses before the preparation
        with self._registry_lock:
            self._in_use[name] = self._in_use.get(name, 0) + 1  # not idle while any step of it runs
        try:
            result = self._run_steps(name, call, control, args if staged else None, times)
        finally:
            with self._registry_lock:
                self._in_use[name] -= 1
                self._last_used[name] = time.monotonic()  # the runner's idle time starts when the request is done
        self.results.put((name, *cache_key), result)
        return ExpertRun(result, False, {"queue": control.waited_s - waited_before, **times})

    def _run_steps(self, name: str, call: Callable[[Any], Any], control: JobControl, args: tuple | None,
                   times: dict[str, float]) -> Any:
        """``call(runner)`` as the job; or, with ``args``, ``prepare`` / ``infer`` (the job) / ``finish``."""
        staged = args is not None
        prepared: Any = None
        if staged:
            runner, _ = self._runner(name)
            began = time.perf_counter()
            prepared = runner.prepare(*args)
            times["prepare"] = time.perf_counter() - began

        def job() -> Any:
            runner, lock = self._runner(name)
            queued = time.perf_counter()
            with lock:  # one inference per runner at a time: the weights and GPU memory are shared
                began = time.perf_counter()
                result = runner.infer(prepared) if staged else call(runner)
                self._last_used[name] = time.monotonic()
            times.update(wait=began - queued, run=time.perf_counter() - began)
            return result

        result = job() if self.queues is None else self.queues.run(self.queue_device, job, control)
        if staged:
            began = time.perf_counter()
            result = self._runner(name)[0].finish(prepared, result)
            times["finish"] = time.perf_counter() - began
        return result

    def _staged(self, name: str) -> bool:
        """Whether expert ``name``'s runner splits its run into ``prepare``, ``infer`` and ``finish``."""
        runner, _ = self._runner(name)
        return all(callable(getattr(runner, step, None)) for step in ("prepare", "infer", "finish"))

    def open_study(self, paths: Mapping[str, str | Path], expert: str) -> StudyView:
        """The study of ``paths`` (``{"image": path}`` or named sequences) read through the volume cache, for
        running ``expert`` on it: a volume that does not say its modality (NIfTI, NRRD, PNG) is taken as the
        expert's input modality."""
        spec = self.registry.get(expert)
        hint = spec.input_modality if spec.input_modality in ("CT", "MRI", "CXR") else None
        return study_from_paths(paths, self.load_volume, hint)

    def run_expert(self, name: str, study: StudyView, argument: str | ResolvedArgument | None = None,
                   control: JobControl | None = None) -> ExpertRun:
        """Expert ``name`` on ``study`` through its runner: ``check``, the argument resolved (a trigger's
        text, or an already resolved argument), then ``run`` (staged where the runner has ``prepare`` /
        ``infer`` / ``finish``), cached by (study content, argument).

        Raises:
            UnknownExpert, UnknownArgument, ExpertInputError (the study does not fit), ExpertRunError,
            QueueFull / JobCancelled (as :meth:`run`).
        """
        spec = self.registry.get(name)
        runner = self.runner(name)
        runner.check(study)
        resolved = argument if isinstance(argument, ResolvedArgument) else spec.resolve_argument(argument)
        key = (tuple(sorted(study.keys.items())), resolved.group, tuple(resolved.label_ids))
        return self.run(name, key, lambda built: built.run(study, resolved), control, args=(study, resolved))

    def feedback(self, name: str, result: Any, question: str | None, present_ids: list[int] | None = None) -> str:
        """The text for the model of expert ``name``'s ``result`` (its runner's ``feedback``)."""
        return self.runner(name).feedback(result, question, present_ids)

    def segment_ct(self, path: str | Path, argument: str | None = None, label_ids: list[int] | None = None,
                   expert: str = "VISTA3D", control: JobControl | None = None) -> ExpertRun:
        """VISTA3D on the CT at ``path`` for a group (``argument``) or explicit ``label_ids``."""
        spec = self.registry.get(expert)
        resolved = explicit_labels(spec, label_ids) if label_ids else spec.resolve_argument(argument)
        return self.run_expert(expert, self.open_study({"image": path}, expert), resolved, control)

    def segment_brain(self, paths: Mapping[str, str | Path], expert: str = "BRATS",
                      control: JobControl | None = None) -> ExpertRun:
        """BRATS on four MRI sequences given as {sequence name: path}."""
        return self.run_expert(expert, self.open_study(paths, expert), None, control)

    def classify_cxr(self, path: str | Path, expert: str = "CXR", control: JobControl | None = None) -> ExpertRun:
        """The chest X-ray ensemble on the image at ``path``."""
        return self.run_expert(expert, self.open_study({"image": path}, expert), None, control)
