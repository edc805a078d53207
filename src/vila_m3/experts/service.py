"""Run the experts for a server: each runner is built once, shared by all requests, released after
a configurable idle time, and results are cached by (volume, expert, argument).

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

from vila_m3.experts.registry import ExpertRegistry, ExpertSpec
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

    def _build_runner(self, spec: ExpertSpec) -> Any:
        if spec.runner == "vista3d":
            from vila_m3.experts.vista3d import Vista3DRunner

            return Vista3DRunner(self.manifest[spec.weights[0]].location(self.models_dir), device=self.device)
        if spec.runner == "brats":
            from vila_m3.experts.brats import BratsRunner

            return BratsRunner(self.manifest[spec.weights[0]].location(self.models_dir), device=self.device)
        if spec.runner == "cxr":
            from vila_m3.experts.cxr import CxrRunner

            return CxrRunner(self.models_dir, device=self.device)
        raise ValueError(f"expert {spec.name} has no runner in this product")

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

    def segment_ct(self, path: str | Path, argument: str | None = None, label_ids: list[int] | None = None,
                   expert: str = "VISTA3D", control: JobControl | None = None) -> ExpertRun:
        """VISTA3D on the CT at ``path`` for a group (``argument``) or explicit ``label_ids``."""
        spec = self.registry.get(expert)
        if label_ids:
            resolved_ids, group = sorted(set(int(i) for i in label_ids)), None
        else:
            resolved = spec.resolve_argument(argument)
            resolved_ids, group = list(resolved.label_ids), resolved.group
        key, volume = self.load_volume(path)
        return self.run(expert, (key, group, tuple(resolved_ids)),
                        lambda runner: runner.run(volume, resolved_ids, group), control,
                        args=(volume, resolved_ids, group))

    def segment_brain(self, paths: Mapping[str, str | Path], expert: str = "BRATS",
                      control: JobControl | None = None) -> ExpertRun:
        """BRATS on four MRI sequences given as {sequence name: path}."""
        loaded = {name: self.load_volume(path) for name, path in paths.items()}
        key = tuple(sorted((name.lower(), volume_key) for name, (volume_key, _) in loaded.items()))
        sequences = {name: volume for name, (_, volume) in loaded.items()}
        return self.run(expert, key, lambda runner: runner.run(sequences), control)

    def classify_cxr(self, path: str | Path, expert: str = "CXR", control: JobControl | None = None) -> ExpertRun:
        """The chest X-ray ensemble on the image at ``path``."""
        key, volume = self.load_volume(path)
        return self.run(expert, (key,), lambda runner: runner.run(volume), control)
