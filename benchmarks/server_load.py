"""Server load: N annotators sharing one server, each running chat turns and reading the datastore.

Setup (all in a temporary folder): the sample studies (``vila-m3 samples``), a stand-in VISTA3D bundle
(``stage_stand_ins``) and a real MONAI Label server on 127.0.0.1 (``tests/server_harness.py``) with
``--conf models vila_m3,vista3d``; the chat's VLM is the real remote backend talking to a scripted
OpenAI-compatible server in a child process of its own, which answers after ``--vlm-seconds`` (default 1 s):
a question gets "Let me trigger <VISTA3D(group)>." for the VISTA3D group the question names, the expert's
feedback gets a short final answer. So every turn is two model answers and one VISTA3D call.

Each of ``--annotators`` (default 8) simulated annotators, in a thread of its own, runs ``--turns`` (default 3)
chat turns through ``POST /infer/vila_m3`` (the route of MONAI Label's Slicer module and Python client), each on
a new chat, asking for a group: the first time a group is asked the expert runs (uncached), later times the
result comes from the cache; after each turn it reads the datastore ``--reads`` times (``GET /info/`` and
``GET /datastore/?output=all`` in turn). The run is bounded: ``--turns`` per annotator, and no annotator starts
new work after ``--max-seconds``.

Printed, per mode: p50/p95/p99/max latency per route (ms), the requests and errors (non-200 answers and
failed connections by kind), the turns' work-queue waits (from the audit log: ``queue_wait_s`` of each
``/infer/vila_m3`` line) and the expert calls run and cached. Two modes, one after the other, each with its
own server:

* ``off the loop``: the server as it ships (``/infer`` runs in a worker thread, model work in the queue);
* ``loop blocked``: the same server with ``VILA_M3_BENCH_BLOCKING_INFER=1``, which makes our ``/infer`` route
  run the request on the event loop as MONAI Label 0.8.5's route does (``apps/vila_m3/lib/infer_route.py``),
  i.e. today's code path for its users: every other request waits while a turn runs.

Run: ``.venv/bin/python benchmarks/server_load.py [--annotators 8] [--turns 3] [--reads 4]
[--vlm-seconds 1.0] [--max-seconds 300] [--mode both|off-loop|blocked]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai_server import FakeOpenAIServer, Reply, _Handler, stream_events  # noqa: E402
from server_harness import start_monailabel  # noqa: E402
from vlm_process import VLMProcess  # noqa: E402

from vila_m3.samples import CT_ID, generate_samples  # noqa: E402
from vila_m3.standins.stand_ins import stage_stand_ins  # noqa: E402

VLM_MODEL = "bench-vila-m3"
GROUPS = ("hepatic tumor", "pancreatic tumor", "organs", "lung tumor")
QUESTION = re.compile(r"Please segment the ([a-z ]+) on this CT\.")
BLOCKING_ENV = "VILA_M3_BENCH_BLOCKING_INFER"  # read by apps/vila_m3/lib/infer_route.py
TURN = "POST /infer/vila_m3 (chat turn)"
READS = ("GET /info/", "GET /datastore/?output=all")


# ------------------------------------------------------------------------------ the scripted VLM


class _AnswerByContent(_Handler):
    """Answers a chat completion by what it is asked: the expert's feedback gets the final answer, a question
    the trigger for the group it names; after ``delay_s`` seconds (the model's time)."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length).decode("utf-8")) if length else {}
        content = (body.get("messages") or [{}])[-1].get("content", "")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        text = " ".join(part.get("text", "") for part in parts if isinstance(part, dict))  # not the images
        asked = QUESTION.search(text)  # the annotator's question, not the expert card that lists every group
        if "The results are" in text or asked is None:
            pieces = ["The segmentation ", "is done."]
        else:
            pieces = ["This looks like a CT image. ", f"Let me trigger <VISTA3D({asked.group(1)})>."]
        self._send(Reply(events=stream_events(pieces), delay_s=self.server.owner.delay_s))


def _start_vlm(delay_s: float) -> FakeOpenAIServer:
    """The scripted VLM (run in its own process by VLMProcess), answering after ``delay_s`` seconds."""
    fake = FakeOpenAIServer(models=(VLM_MODEL,))
    fake.delay_s = delay_s
    fake._httpd.RequestHandlerClass = _AnswerByContent
    fake.start()
    return fake


# ---------------------------------------------------------------------------------- annotators


@dataclass
class Results:
    """Latencies (s) per route, errors per route and kind, and the turns' answers; shared by the annotators."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter = field(default_factory=Counter)
    answers: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, route: str, seconds: float, error: str | None = None, answer: dict | None = None) -> None:
        with self.lock:
            self.latencies.setdefault(route, []).append(seconds)
            if error:
                self.errors[(route, error)] += 1
            if answer is not None:
                self.answers.append(answer)


def timed_request(results: Results, route: str, method: str, url: str, **kwargs: Any) -> None:
    start = time.perf_counter()
    try:
        response = requests.request(method, url, timeout=600, **kwargs)
        error = None if response.status_code == 200 else f"HTTP {response.status_code}"
        answer = response.json() if route == TURN and error is None else None
    except requests.RequestException as err:
        error, answer = type(err).__name__, None
    results.add(route, time.perf_counter() - start, error, answer)


def annotator(number: int, url: str, args: argparse.Namespace, deadline: float, results: Results) -> None:
    """One annotator: ``args.turns`` chat turns on new chats, each followed by ``args.reads`` datastore reads."""
    time.sleep(0.1 * number)  # people do not all click at the same instant
    for turn in range(args.turns):
        if time.monotonic() > deadline:
            return
        group = GROUPS[(number + turn) % len(GROUPS)]
        params = {"prompt": f"Please segment the {group} on this CT.", "chat_id": f"load-{uuid.uuid4().hex[:12]}"}
        timed_request(results, TURN, "POST", f"{url}/infer/vila_m3", params={"image": CT_ID, "output": "json"},
                      data={"params": json.dumps(params)})
        for read in range(args.reads):
            if time.monotonic() > deadline:
                return
            route = READS[read % len(READS)]
            path, _, query = route.split(" ", 1)[1].partition("?")
            timed_request(results, route, "GET", f"{url}{path}", params=dict([query.split("=")]) if query else None)


# ------------------------------------------------------------------------------------- one mode


def run_mode(name: str, work: Path, studies: Path, models: Path, vlm_url: str, args: argparse.Namespace,
             blocking: bool) -> dict[str, Any]:
    """Start a server, run the annotators against it, stop it; the mode's figures."""
    folder = work / re.sub(r"\W+", "-", name)
    audit = folder / "audit.jsonl"
    conf = {"models": "vila_m3,vista3d", "vlm_url": vlm_url, "vlm_model": VLM_MODEL, "models_dir": str(models),
            "chats_dir": str(folder / "chats"), "audit_log": str(audit)}
    env = {BLOCKING_ENV: "1"} if blocking else {}
    server = start_monailabel(folder / "server", studies, conf=conf, env=env)
    results = Results()
    try:
        server.get("/info/").raise_for_status()
        started = time.perf_counter()
        deadline = time.monotonic() + args.max_seconds
        threads = [threading.Thread(target=annotator, args=(n, server.url, args, deadline, results))
                   for n in range(args.annotators)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    finally:
        server.stop()
    lines = [json.loads(text) for text in audit.read_text(encoding="utf-8").splitlines()] if audit.exists() else []
    waits = [line["queue_wait_s"] for line in lines
             if line["route"] == "/infer/vila_m3" and line["queue_wait_s"] is not None]
    experts = [call for answer in results.answers for call in answer.get("experts", [])]
    failed = Counter(str(call["error"])[:120] for call in experts if call.get("error"))
    return {"name": name, "results": results, "wall": wall, "waits": waits, "audit_lines": len(lines),
            "experts_run": sum(not call.get("cached") and not call.get("error") for call in experts),
            "experts_cached": sum(bool(call.get("cached")) for call in experts), "experts_failed": failed}


def percentiles(values: list[float]) -> tuple[float, float, float, float]:
    """(p50, p95, p99, max) in ms (linear interpolation between samples)."""
    if not values:
        return (float("nan"),) * 4
    p50, p95, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 95, 99])
    return float(p50), float(p95), float(p99), max(values) * 1000.0


def report(mode: dict[str, Any]) -> str:
    results: Results = mode["results"]
    rows = [f"== {mode['name']}: {mode['wall']:.1f} s wall, {mode['audit_lines']} audit lines, expert calls: "
            f"{mode['experts_run']} run, {mode['experts_cached']} cached, {sum(mode['experts_failed'].values())} failed",
            f"{'route':<32} {'requests':>8} {'errors':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'max ms':>9}"]
    for route in (TURN, *READS):
        values = results.latencies.get(route, [])
        errors = sum(count for (where, _), count in results.errors.items() if where == route)
        p50, p95, p99, top = percentiles(values)
        rows.append(f"{route:<32} {len(values):>8} {errors:>6} {p50:>9.0f} {p95:>9.0f} {p99:>9.0f} {top:>9.0f}")
    p50, p95, p99, top = percentiles(mode["waits"])
    rows.append(f"{'queue wait per turn (audit)':<32} {len(mode['waits']):>8} {'':>6} {p50:>9.0f} {p95:>9.0f} "
                f"{p99:>9.0f} {top:>9.0f}")
    for (route, kind), count in sorted(results.errors.items()):
        rows.append(f"  error: {route}: {kind} x{count}")
    for message, count in mode["experts_failed"].most_common():
        rows.append(f"  expert failed x{count}: {message}")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", type=int, default=8, help="simulated annotators, each in a thread")
    parser.add_argument("--turns", type=int, default=3, help="chat turns per annotator")
    parser.add_argument("--reads", type=int, default=4, help="datastore reads after each turn")
    parser.add_argument("--vlm-seconds", type=float, default=1.0, help="the scripted VLM's time per answer (s)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="no new work after this (s, per mode)")
    parser.add_argument("--mode", choices=("both", "off-loop", "blocked"), default="both")
    args = parser.parse_args(argv)
    if args.annotators < 1 or args.turns < 1 or args.reads < 0 or args.vlm_seconds < 0 or args.max_seconds <= 0:
        parser.error("--annotators and --turns must be at least 1, --reads and --vlm-seconds 0 or more")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"{args.annotators} annotators x {args.turns} chat turns (VLM {args.vlm_seconds:g} s per answer, two "
          f"answers and one VISTA3D call per turn), {args.reads} datastore reads after each turn; "
          f"{os.cpu_count()} CPU cores", flush=True)
    modes = {"off-loop": ("off the loop (as shipped)", False),
             "blocked": ("loop blocked (MONAI Label's /infer)", True)}
    chosen = list(modes) if args.mode == "both" else [args.mode]
    with tempfile.TemporaryDirectory(prefix="vila-m3-load-") as tmp:
        work = Path(tmp)
        generate_samples(work / "samples", seed=0)
        stage_stand_ins(work / "models", ("vista3d",))
        vlm = VLMProcess(_start_vlm, args.vlm_seconds)
        try:
            for key in chosen:
                name, blocking = modes[key]
                print(report(run_mode(name, work, work / "samples" / "studies", work / "models", vlm.url, args,
                                      blocking)), flush=True)
        finally:
            vlm.stop()


if __name__ == "__main__":
    main()
