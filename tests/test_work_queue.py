"""The work queue without a server: arrival order, the concurrency bound, cancelling a waiting job,
the bound on waiting jobs and the position reports."""

from __future__ import annotations

import threading
import time

import pytest

from vila_m3.work_queue import JobCancelled, JobControl, QueueFull, WorkQueue, WorkQueues, parse_concurrency


class Gate:
    """A job that records when it starts and runs until it is opened."""

    def __init__(self, name: str, log: list[str], lock: threading.Lock):
        self.name, self.log, self.lock = name, log, lock
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> str:
        with self.lock:
            self.log.append(self.name)
        self.started.set()
        assert self.release.wait(10), f"{self.name} was never released"
        return self.name


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def submit(queue: WorkQueue, job, control: JobControl | None = None) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = queue.run(job, control)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_jobs_start_in_arrival_order_one_at_a_time():
    queue, log, lock = WorkQueue("cpu", concurrency=1, max_waiting=10), [], threading.Lock()
    gates = [Gate(f"job{n}", log, lock) for n in range(5)]
    threads = []
    for gate in gates:
        threads.append(submit(queue, gate))
        wait_until(lambda: queue.stats().running + queue.stats().waiting == len(threads))
    for gate in gates:
        assert gate.started.wait(5)
        time.sleep(0.05)
        assert queue.stats().running == 1  # never two at once
        gate.release.set()
    for thread, out in threads:
        thread.join(5)
        assert "error" not in out
    assert log == [f"job{n}" for n in range(5)]
    assert queue.stats().done == 5 and queue.stats().running == 0


def test_concurrency_bounds_the_jobs_running_at_once():
    queue, log, lock = WorkQueue("cuda:0", concurrency=2, max_waiting=10), [], threading.Lock()
    gates = [Gate(f"job{n}", log, lock) for n in range(4)]
    for gate in gates:
        submit(queue, gate)
    wait_until(lambda: gates[0].started.is_set() and gates[1].started.is_set())
    time.sleep(0.1)
    assert queue.stats().running == 2 and queue.stats().waiting == 2
    assert not gates[2].started.is_set()
    gates[0].release.set()
    assert gates[2].started.wait(5)
    assert not gates[3].started.is_set()
    for gate in gates:
        gate.release.set()
    wait_until(lambda: queue.stats().done == 4)


def test_cancelling_a_waiting_job_removes_it_at_once_and_it_never_runs():
    queue, log, lock = WorkQueue("cpu", max_waiting=10), [], threading.Lock()
    first, second, third = (Gate(name, log, lock) for name in ("first", "second", "third"))
    submit(queue, first)
    assert first.started.wait(5)
    cancel = threading.Event()
    places: list[tuple[int, int]] = []
    thread, out = submit(queue, second, JobControl(cancel=cancel, on_queued=lambda *place: places.append(place)))
    third_places: list[tuple[int, int]] = []
    submit(queue, third, JobControl(on_queued=lambda *place: third_places.append(place)))
    wait_until(lambda: queue.stats().waiting == 2)
    wait_until(lambda: third_places == [(2, 2)])
    began = time.monotonic()
    cancel.set()
    thread.join(5)
    assert time.monotonic() - began < 1.0, "a cancelled job left the line at once, not when its turn came"
    assert isinstance(out.get("error"), JobCancelled)
    assert queue.stats().waiting == 1 and places == [(1, 1)]
    wait_until(lambda: third_places[-1] == (1, 1))  # moved up when the cancelled job left
    first.release.set()
    third.release.set()
    wait_until(lambda: queue.stats().done == 2)
    assert log == ["first", "third"]


def test_a_job_cancelled_before_it_asks_never_runs():
    queue = WorkQueue("cpu")
    cancel = threading.Event()
    cancel.set()
    ran = []
    with pytest.raises(JobCancelled):
        queue.run(lambda: ran.append(1), JobControl(cancel=cancel))
    assert ran == [] and queue.stats().running == 0


def test_past_queue_max_new_jobs_are_refused_with_a_retry_estimate():
    queue, log, lock = WorkQueue("cpu", concurrency=1, max_waiting=2), [], threading.Lock()
    gates = [Gate(f"job{n}", log, lock) for n in range(3)]
    for gate in gates:
        submit(queue, gate)
    wait_until(lambda: queue.stats().waiting == 2)
    with pytest.raises(QueueFull) as refused:
        queue.run(lambda: "never")
    assert refused.value.device == "cpu" and refused.value.waiting == 2 and refused.value.retry_after_s >= 1
    with pytest.raises(QueueFull):
        queue.admit()
    gates[0].release.set()
    wait_until(lambda: queue.stats().waiting == 1)
    queue.admit()  # a place is free again
    for gate in gates:
        gate.release.set()
    wait_until(lambda: queue.stats().done == 3)
    assert queue.run(lambda: "free") == "free"  # an idle queue runs at once


def test_a_request_already_admitted_is_not_refused_half_way():
    queue, log, lock = WorkQueue("cpu", concurrency=1, max_waiting=1), [], threading.Lock()
    turn = JobControl()
    assert queue.run(lambda: "first answer", turn) == "first answer" and turn.admitted
    gates = [Gate(f"job{n}", log, lock) for n in range(2)]
    for gate in gates:
        submit(queue, gate)
    wait_until(lambda: queue.stats().waiting == 1)
    with pytest.raises(QueueFull):
        queue.run(lambda: "a new request", JobControl())
    thread, out = submit(queue, lambda: "its expert", turn)  # the same request's next job waits in line
    wait_until(lambda: queue.stats().waiting == 2)
    for gate in gates:
        gate.release.set()
    thread.join(5)
    assert out == {"result": "its expert"}


def test_positions_are_reported_when_waiting_and_again_when_they_change():
    queue, log, lock = WorkQueue("cpu", max_waiting=10), [], threading.Lock()
    gates = [Gate(f"job{n}", log, lock) for n in range(4)]
    reports: dict[int, list[tuple[int, int]]] = {n: [] for n in range(4)}
    controls = [JobControl(on_queued=lambda *place, n=n: reports[n].append(place)) for n in range(4)]
    for gate, control in zip(gates, controls, strict=True):
        submit(queue, gate, control)
        time.sleep(0.05)
    wait_until(lambda: queue.stats().waiting == 3 and reports[3] == [(3, 3)])
    assert reports[0] == [] and reports[1] == [(1, 1)] and reports[2] == [(2, 2)]
    gates[0].release.set()
    wait_until(lambda: reports[3][-1] == (2, 2))
    gates[1].release.set()
    wait_until(lambda: reports[3][-1] == (1, 1))
    for gate in gates:
        gate.release.set()
    wait_until(lambda: queue.stats().done == 4)
    assert reports[3] == [(3, 3), (2, 2), (1, 1)] and reports[2] == [(2, 2), (1, 1)]
    assert controls[3].waited_s > 0 and controls[0].waited_s < 0.05


def test_an_exception_of_the_work_frees_its_place():
    queue = WorkQueue("cpu")
    with pytest.raises(ValueError):
        queue.run(lambda: (_ for _ in ()).throw(ValueError("model failed")))
    assert queue.stats().running == 0
    assert queue.run(lambda: 3) == 3


def test_queues_per_device_and_their_settings():
    queues = WorkQueues.from_conf({"queue_concurrency": "cuda:1=2,remote=8", "queue_max": "5"})
    assert queues.queue("cuda").device == "cuda:0" and queues.queue("cuda").concurrency == 1
    assert queues.queue("cuda:1").concurrency == 2 and queues.queue("remote").concurrency == 8
    assert queues.queue("cpu").max_waiting == 5 and queues.queue("cpu") is queues.queue("CPU")
    assert WorkQueues.from_conf({}).queue("remote").concurrency == 4  # a serving engine batches
    assert WorkQueues.from_conf({"queue_concurrency": "3"}).queue("remote").concurrency == 3
    assert parse_concurrency("") == {}
    for bad in ("0", "two", "cuda:0=", "cuda:0=-1"):
        with pytest.raises(ValueError, match="queue_concurrency"):
            parse_concurrency(bad)
    with pytest.raises(ValueError, match="queue_max"):
        WorkQueues.from_conf({"queue_max": "-1"})


def test_devices_queue_independently():
    queues, log, lock = WorkQueues(), [], threading.Lock()
    busy = Gate("gpu-job", log, lock)
    threading.Thread(target=queues.run, args=("cuda:0", busy), daemon=True).start()
    assert busy.started.wait(5)
    assert queues.run("cpu", lambda: "cpu-job") == "cpu-job"  # the GPU's job holds up nothing on the CPU
    busy.release.set()


# --- the experts through the queue (stand-in VISTA3D through the real runner) -------------------------


@pytest.fixture(scope="module")
def vista3d_models(tmp_path_factory: pytest.TempPathFactory):
    from vila_m3.standins.stand_ins import stage_stand_ins

    root = tmp_path_factory.mktemp("queue-models")
    stage_stand_ins(root, ("vista3d",))
    return root


def test_an_uncached_expert_waits_in_its_devices_queue_and_a_cached_one_never_does(vista3d_models, sample_data):
    from vila_m3.experts.service import ExpertService

    queues = WorkQueues({"cpu": 1}, max_waiting=0)  # nothing may wait: a busy CPU refuses new jobs
    experts = ExpertService(vista3d_models, queues=queues, device="cpu", idle_release_s=0)
    ct = sample_data / "studies" / "ct_abdomen.nii.gz"
    control = JobControl()
    first = experts.segment_ct(ct, argument="hepatic tumor", control=control)
    assert first.cached is False and queues.queue("cpu").stats().done == 1
    assert {"queue", "prepare", "run", "finish"} <= set(first.timings)  # only the network's step is the job
    assert first.result.ids_by_name == {"liver": 1, "hepatic tumor": 26}

    log, lock = [], threading.Lock()
    busy = Gate("busy", log, lock)
    threading.Thread(target=queues.run, args=("cpu", busy), daemon=True).start()
    assert busy.started.wait(5)
    again = experts.segment_ct(ct, argument="hepatic tumor")  # cached: served while the CPU queue is busy
    assert again.cached is True and again.result is first.result
    with pytest.raises(QueueFull):
        experts.segment_ct(ct, argument="organs")  # uncached: it would have to wait, and none may
    busy.release.set()
    wait_until(lambda: queues.queue("cpu").stats().running == 0)
    experts.close()
