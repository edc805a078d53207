"""Chat overhead: a chat turn's wall time through the HTTP endpoint against the model and expert calls.

Two modes (``--vlm``) pick what answers the chat; everything else is the same.

Setup (all in a temporary folder): a synthetic 512 x 512 x 200 int16 CT (``--shape``; a body with a
liver, a tumour and a spine, written with SimpleITK), a stand-in VISTA3D bundle
(``stage_stand_ins(models_dir, ("vista3d",))``) and a real MONAI Label server
(``tests/server_harness.py``) with ``--conf models vila_m3,vista3d`` and, per mode:

* ``--vlm remote`` (default): a scripted OpenAI-compatible server on 127.0.0.1 that answers instantly
  (``tests/fake_openai_server.py``, in a child process of its own; per turn "... Let me trigger
  <VISTA3D(hepatic tumor)>." and then "Yes."), with ``vlm_url``/``vlm_model`` pointing at it. The
  model computes nothing, so this mode measures the absolute overhead (ms per turn).
* ``--vlm local``: a real local VILA checkpoint through the product's own code path
  (``--conf vlm vila_m3_8b``; the server loads it with ``VilaChat.from_pretrained`` on its first turn),
  staged at the manifest location ``ModelManifest.load()["vila_m3_8b"].location(models_dir)`` of the
  temporary models folder: ``--checkpoint DIR`` is linked there (a symbolic link, a copy where links
  fail), e.g. the demo model of ``vila-m3 models demo`` (``models/vila/Llama3-VILA-M3-8B``) or real
  weights; without it a tiny RANDOM stand-in is written there
  (``make_tiny_vila_checkpoint(location, template="llama_3")``): its words are random, so it writes no
  trigger and the turn has no expert step (the report says so and the compute is the VLM's alone).
  The demo model asked "Is there a liver tumour?" (``--question``) writes ``<VISTA3D(hepatic tumor)>``
  and the expert runs. Both paths decode greedily (``temperature`` 0) with the same
  ``max_new_tokens`` (``--max-new-tokens``, sent as request params), so both generate the same tokens;
  the report prints the token counts of both.

What is measured:

* **HTTP turn**: ``POST /infer/vila_m3?image=ID`` with form field ``params`` =
  ``{"prompt", "chat_id", "slice_index", "axis"}`` (local mode: also ``max_new_tokens`` and
  ``temperature`` 0), new ``chat_id`` every turn, same image and slice, after two warm-up turns (the
  first loads the volume, in local mode the checkpoint too, and runs the expert; later turns hit the
  volume and result caches). Wall time from sending the request to having the whole response (answer
  JSON + labelmap when an expert ran). ``headers at`` is when the response headers arrived.
* **compute, endpoint steps**: the sum of the ``generate k`` and ``expert X`` steps of the
  ``timings`` list the endpoint returns for the same turn (in local mode: the server's own
  generation, i.e. the real model compute, plus the cached expert call when there is one).
* **compute, calls alone (in-process)**: the same turns run in this process with ``ChatLoop`` and the
  same VLM (no HTTP in front of the loop; same conversations): remote mode, the real ``RemoteVLM``
  against the same fake server; local mode, the same staged checkpoint loaded here with
  ``VilaChat.from_pretrained(location, device=...)`` (``cpu`` unless a GPU is present, i.e. the device
  the server picks by default). The number is the time inside ``generate`` plus inside
  ``ExpertService.segment_ct`` (cached). The in-process ``run_turn`` wall time is printed too ("loop
  without HTTP").
* **tokens** (local mode): the in-process ``GenerationResult.n_tokens`` of each round, whether the
  HTTP turns' answer texts equal the in-process ones, and both texts re-encoded with the checkpoint's
  tokenizer (the endpoint does not return token counts; equal greedy texts mean equal tokens).

The report prints medians: HTTP turn time, compute, overhead = HTTP - compute (ms) and overhead /
compute (%), against the targets (overhead <= 5 % of compute, and <= 50 ms per turn on a cached CT).
With the instant fake VLM (remote mode), "compute" is a few milliseconds of request building and
local HTTP, so the percentage is dominated by the tiny denominator and misses by construction; the
absolute overhead (ms per turn) is the number to compare with the 50 ms target. In local mode the
model really generates, so the percentage is meaningful (for the tiny stand-ins on CPU the compute is
still small; real weights take seconds per turn). Then where the time goes: every endpoint step
(``load``, ``render``, ``generate k``, ``expert X``, the rest of ``total``), what happens after the
loop (``HTTP - total``), and in-process timings of the suspects (labelmap NIfTI write, its copy and
its hand-off to MONAI Label, the multipart body, JSON encoding, slice and overlay rendering, the PNGs
stored and sent to the VLM, the modality check, with the whole-volume scan it does once per volume for
comparison; the labelmap rows only when an expert ran).

Both paths run one after the other on the same CPU (the server is stopped before the in-process
turns), with the same torch thread count: ``--threads N`` sets it for both (``OMP_NUM_THREADS`` of the
server, ``torch.set_num_threads`` here). On a machine whose cores are busy with other work, torch's
default of one thread per core makes CPU generation times swing by an order of magnitude from one
call to the next; ``--threads 1`` keeps them stable, so "endpoint steps" and "calls alone" compare.

Run: ``.venv/bin/python benchmarks/chat_overhead.py [--turns 10] [--quick] [--shape 512,512,200]
[--vlm remote|local] [--checkpoint DIR] [--question TEXT] [--max-new-tokens N] [--threads N]``, e.g.
``--vlm local --checkpoint models/vila/Llama3-VILA-M3-8B --question "Is there a liver tumour?"``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai_server import FakeOpenAIServer, sse  # noqa: E402
from requests_toolbelt import MultipartEncoder  # noqa: E402
from requests_toolbelt.multipart.decoder import MultipartDecoder  # noqa: E402
from server_harness import RunningServer, start_monailabel  # noqa: E402
from vlm_process import VLMProcess  # noqa: E402

from vila_m3.chat.loop import ChatLoop, TurnRequest  # noqa: E402
from vila_m3.chat.store import ChatStore  # noqa: E402
from vila_m3.chat.study import detect_modality  # noqa: E402
from vila_m3.chat.vlm_backend import open_vlm  # noqa: E402
from vila_m3.experts.colors import overlay_colors_float  # noqa: E402
from vila_m3.experts.registry import ExpertRegistry  # noqa: E402
from vila_m3.experts.service import ExpertService  # noqa: E402
from vila_m3.imaging import render_overlay, render_slice, write_labelmap  # noqa: E402
from vila_m3.models.manifest import STAND_IN_FIELD, ModelManifest  # noqa: E402
from vila_m3.standins.stand_ins import stage_stand_ins  # noqa: E402
from vila_m3.vlm.remote import build_messages, image_data_url  # noqa: E402

TRIGGER = "This looks like a CT image. Let me trigger <VISTA3D(hepatic tumor)>."
FINAL = "Yes."
QUESTION = "Is there a liver tumor?"
VLM_MODEL = "fake-vila-m3"
VLM_ID = "vila_m3_8b"  # the checkpoint the server chats with in local mode (--conf vlm)
WARMUP_TURNS = 2
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Mode:
    """What answers the chat and how the turns are asked.

    Attributes:
        vlm: ``remote`` (the scripted fake server) or ``local`` (a staged VILA checkpoint).
        question: the annotator's question of every turn.
        params: extra request params of both paths (local mode: ``max_new_tokens``, ``temperature`` 0).
        expect_final: remote mode: the scripted final answer every turn must end with (and an expert call).
        location: local mode: the staged checkpoint folder (the manifest location).
        source: local mode: where the checkpoint comes from, in words.
        note: local mode: its ``vila_m3_stand_in`` note (None for real weights).
    """

    vlm: str
    question: str
    params: dict[str, Any] = field(default_factory=dict)
    expect_final: str | None = None
    location: Path | None = None
    source: str = ""
    note: str | None = None

    @property
    def is_demo(self) -> bool:
        return bool(self.note) and "demo" in self.note.lower()

    def describe(self) -> str:
        if self.vlm == "remote":
            return "scripted fake OpenAI server on 127.0.0.1 in its own process (instant answers)"
        if self.note is None:
            what = "real weights"
        elif self.is_demo:
            what = f"demo model: {self.note}"
        else:
            what = f"stand-in: {self.note}; its words are RANDOM, so it writes no expert trigger"
        return (f"local checkpoint {VLM_ID} ({self.source}; {what}); greedy decoding, "
                f"max_new_tokens {self.params['max_new_tokens']} in both paths")


def stand_in_note(checkpoint: Path) -> str | None:
    """The checkpoint's ``vila_m3_stand_in`` note (config.json), None for real weights."""
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    note = config.get(STAND_IN_FIELD)
    return str(note) if note else None


def stage_checkpoint(models_dir: Path, checkpoint: Path | None) -> tuple[Path, str]:
    """Put the chat's checkpoint at its manifest location under ``models_dir``: ``checkpoint`` linked
    there (copied where links fail), else a tiny random stand-in written there. Returns (location, source)."""
    location = ModelManifest.load()[VLM_ID].location(models_dir)
    location.parent.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        from vila_m3.standins.tiny_vila import make_tiny_vila_checkpoint

        make_tiny_vila_checkpoint(location, template="llama_3")
        return location, "tiny random stand-in written by make_tiny_vila_checkpoint(template='llama_3')"
    source = checkpoint.expanduser().resolve()
    try:
        location.symlink_to(source, target_is_directory=True)
        how = "linked"
    except OSError:
        shutil.copytree(source, location)
        how = "copied"
    return location, f"{how} from {source}"


# ------------------------------------------------------------------------------------------- data


def write_ct(path: Path, shape_xyz: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0) -> None:
    """A synthetic abdominal CT (int16 HU): air, a body with fat and muscle, liver with a tumour, spine."""
    nx, ny, nz = shape_xyz
    sx, sy, sz = spacing
    u = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx)[None, None, :]
    v = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy)[None, :, None]
    w = ((np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * sz)[:, None, None]
    half = np.array([nx * sx, ny * sy, nz * sz], dtype=np.float32) / 2

    def ellipse(cu: float, cv: float, a: float, b: float) -> np.ndarray:  # (1, y, x), same on every slice
        return ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2 <= 1.0

    def ellipsoid(cu: float, cv: float, cw: float, a: float, b: float, c: float) -> np.ndarray:
        return ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2 + ((w - cw) / c) ** 2 <= 1.0

    hu = np.full((nz, ny, nx), -1000, dtype=np.int16)
    body = np.broadcast_to(ellipse(0.0, 0.0, 0.85 * half[0], 0.65 * half[1]), hu.shape)
    hu[body] = -100
    hu[np.broadcast_to(ellipse(0.0, 0.0, 0.78 * half[0], 0.58 * half[1]), hu.shape)] = 45
    liver = ellipsoid(-0.35 * half[0], -0.05 * half[1], 0.15 * half[2], 0.3 * half[0], 0.3 * half[1], 0.45 * half[2])
    hu[liver] = 60
    hu[ellipsoid(-0.4 * half[0], -0.05 * half[1], 0.15 * half[2], 0.06 * half[0], 0.06 * half[0], 0.06 * half[0])] = 20
    hu[np.broadcast_to(ellipse(0.0, 0.4 * half[1], 0.06 * half[0], 0.06 * half[0]), hu.shape)] = 700
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(hu.shape, dtype=np.float32) * 8.0
    hu = np.where(body, hu + np.rint(noise).astype(np.int16), hu).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(float(-h + s / 2) for h, s in zip(half, spacing, strict=True)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))


# ------------------------------------------------------------------------------------ the fake VLM


def _start_fake_vlm(turns: int) -> FakeOpenAIServer:
    """The scripted fake server with ``turns`` (trigger, final answer) pairs queued (run in its own process by
    VLMProcess; every turn of both paths takes the next two replies, in order)."""
    fake = FakeOpenAIServer(models=(VLM_MODEL,))
    fake.script(*[reply for _ in range(turns) for reply in (sse([TRIGGER]), sse([FINAL]))])
    fake.start()
    return fake


# ------------------------------------------------------------------------------------- HTTP turns


@dataclass
class HttpTurn:
    wall: float
    headers_at: float
    response_bytes: int
    labelmap_bytes: int
    decode_s: float
    answer: dict[str, Any]

    def step(self, name: str) -> float:
        return sum(t["seconds"] for t in self.answer["timings"] if t["step"] == name)

    def steps(self, prefix: str) -> float:
        return sum(t["seconds"] for t in self.answer["timings"] if t["step"].startswith(prefix))

    @property
    def compute(self) -> float:
        return self.steps("generate ") + self.steps("expert ")


def assistant_texts(messages: list[dict[str, Any]]) -> list[str]:
    """The model's answers among a turn's messages, in order (one per generation round)."""
    return [message["text"] for message in messages if message.get("role") == "assistant"]


def http_turn(server: RunningServer, mode: Mode, image_id: str, slice_index: int, axis: str) -> HttpTurn:
    params = {"prompt": mode.question, "chat_id": f"bench-{uuid.uuid4().hex[:12]}", "slice_index": slice_index,
              "axis": axis, **mode.params}
    start = time.perf_counter()
    response = requests.post(f"{server.url}/infer/vila_m3", params={"image": image_id},
                             data={"params": json.dumps(params)}, timeout=600)
    body = response.content
    wall = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"turn failed: HTTP {response.status_code}: {body[:500]!r}\n{server.log_tail()}")
    began = time.perf_counter()
    labelmap = b""
    if response.headers.get("content-type", "").startswith("application/json"):
        answer = response.json()
    else:
        fields = {}
        for part in MultipartDecoder.from_response(response).parts:
            name = part.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]
            fields[name] = part.content
        answer = json.loads(fields["params"])
        labelmap = fields.get("image", b"")
    decode_s = time.perf_counter() - began
    if mode.expect_final is not None and (answer.get("answer") != mode.expect_final or not answer.get("experts")):
        raise RuntimeError(f"unexpected answer: {json.dumps(answer)[:500]}")
    return HttpTurn(wall, response.elapsed.total_seconds(), len(body), len(labelmap), decode_s, answer)


# ------------------------------------------------------------------------------ in-process turns


class TimedVLM:
    """The real VLM (RemoteVLM client or local VilaChat), timing each ``generate`` and keeping its
    inputs and result."""

    def __init__(self, vlm: Any):
        self.vlm = vlm
        self.is_stand_in = bool(getattr(vlm, "is_stand_in", False))
        self.stand_in_note = getattr(vlm, "stand_in_note", None)
        self.calls: list[tuple[float, list, list, Any]] = []

    def describe(self) -> str:
        describe = getattr(self.vlm, "describe", None)
        return describe() if callable(describe) else f"{VLM_ID} (local checkpoint)"

    def generate(self, conversation, images=(), **kwargs):
        start = time.perf_counter()
        result = self.vlm.generate(conversation, images, **kwargs)
        self.calls.append((time.perf_counter() - start, list(conversation), list(images), result))
        return result


class TimedExperts(ExpertService):
    """The real expert service, timing each ``segment_ct`` call."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[float, bool]] = []

    def segment_ct(self, *args: Any, **kwargs: Any):
        start = time.perf_counter()
        run = super().segment_ct(*args, **kwargs)
        self.calls.append((time.perf_counter() - start, run.cached))
        return run


@dataclass
class LoopTurn:
    wall: float
    vlm: float
    experts: float
    request_build: float
    result: Any = field(repr=False)
    vlm_calls: list = field(repr=False, default_factory=list)

    @property
    def n_tokens(self) -> list[int]:
        """Tokens generated in each round (local VilaChat: ``GenerationResult.n_tokens``)."""
        return [int(getattr(call[3], "n_tokens", 0) or 0) for call in self.vlm_calls]

    @property
    def texts(self) -> list[str]:
        return [message.text for message in self.result.chat.messages[self.result.first_message:]
                if message.role == "assistant"]

    def step(self, name: str) -> float:
        return sum(t["seconds"] for t in self.result.timings if t["step"] == name)


def loop_turn(loop: ChatLoop, mode: Mode, ct_path: Path, image_id: str, slice_index: int, axis: str) -> LoopTurn:
    vlm: TimedVLM = loop.vlm  # type: ignore[assignment]
    experts: TimedExperts = loop.experts  # type: ignore[assignment]
    vlm.calls.clear()
    experts.calls.clear()
    request = TurnRequest(chat_id=f"inproc-{uuid.uuid4().hex[:12]}", question=mode.question,
                          images={"image": str(ct_path)}, axis=axis, slice_index=slice_index,
                          study={"image": image_id}, **mode.params)
    start = time.perf_counter()
    result = loop.run_turn(request)
    wall = time.perf_counter() - start
    if mode.expect_final is not None and (result.answer != mode.expect_final or not result.experts):
        raise RuntimeError(f"unexpected in-process answer: {result.answer!r}")
    calls = list(vlm.calls)
    build = 0.0
    for _, conversation, images, _ in calls if mode.vlm == "remote" else ():
        began = time.perf_counter()  # what building the VLM request (PNG + base64 of each image) costs
        build_messages(conversation, images)
        build += time.perf_counter() - began
    return LoopTurn(wall, sum(c[0] for c in calls), sum(c[0] for c in experts.calls), build, result, calls)


# ----------------------------------------------------------------------------------------- report


def ms(seconds: float) -> str:
    return f"{1000 * seconds:9.1f}"


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def suspects(loop_result: Any, loop: ChatLoop, ct_volume: Any, answer: dict[str, Any], scratch: Path,
             repeats: int, remote: bool = True) -> list[tuple[str, float, str]]:
    """In-process timings (median of ``repeats``) of the steps that may make up the overhead, and a few
    variants of them for comparison (the labelmap ones only when the turn has a labelmap, the remote
    request one only for the remote VLM)."""
    labels = loop_result.labels
    rows: list[tuple[str, float, str]] = []

    def timed(label: str, action, note: str = "") -> Any:
        values, out = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            out = action()
            values.append(time.perf_counter() - start)
        rows.append((label, med(values), note))
        return out

    target = scratch / "labels.nii.gz"
    if labels is not None:
        timed("labelmap write, .nii.gz (ChatLoop._store_labels, every turn)",
              lambda: write_labelmap(labels.array, labels.geometry, target))
        rows[-1] = (*rows[-1][:2], f"{'x'.join(map(str, labels.array.shape[::-1]))} {labels.array.dtype}, "
                    f"{target.stat().st_size / 1e6:.2f} MB")
        plain = scratch / "labels.nii"
        timed("  for comparison: the same written uncompressed (.nii)",
              lambda: write_labelmap(labels.array, labels.geometry, plain))
        timed("labelmap copy (ChatLoop._store_labels, cached result)",
              lambda: shutil.copyfile(target, scratch / "copy.nii.gz"))

        def hand_off() -> None:  # a fresh temporary file replaced by a link; MONAI Label deletes it after sending
            handle, sent = tempfile.mkstemp(dir=scratch, suffix=".nii.gz")
            os.close(handle)
            os.link(target, sent + ".link")
            os.replace(sent + ".link", sent)
            os.unlink(sent)

        timed("labelmap hand-off to MONAI Label (ChatInferTask: hard link)", hand_off)
    text = timed("json.dumps of the turn's answer", lambda: json.dumps(answer))
    rows[-1] = (*rows[-1][:2], f"{len(text) / 1e3:.1f} kB")

    if labels is not None:
        def multipart() -> bytes:
            with (scratch / "copy.nii.gz").open("rb") as handle:
                fields = {"params": (None, text, "application/json"),
                          "image": ("labels.nii.gz", handle, "application/gzip")}
                return MultipartEncoder(fields=fields).to_string()

        timed("multipart body (MultipartEncoder.to_string)", multipart)
    timed("chat.json save (ChatStore.save; a turn saves it ~6 times)", lambda: loop.store.save(loop_result.chat))
    timed("modality check (detect_modality; the volume's lowest value is remembered)",
          lambda: detect_modality(ct_volume))
    timed("  for comparison: nanmin over the whole volume (once per volume)", lambda: np.nanmin(ct_volume.array))
    axis, index = loop_result.axis, loop_result.slice_index
    picture = timed("slice rendering (render_slice)", lambda: render_slice(ct_volume, axis, index, "CT"))
    store = ChatStore(scratch / "store")
    if labels is not None:
        overlay, _ = timed("overlay rendering (render_overlay)", lambda: render_overlay(
            ct_volume, labels, axis, index, overlay_colors_float(), modality="CT"))
    timed("PNG save of the slice (ChatStore.save_image: grey PNG, level 1)",
          lambda: store.save_image("bench", "slice.png", picture))
    timed("  for comparison: the slice as an RGB PNG, level 1",
          lambda: picture.save(scratch / "slice-rgb.png", format="PNG", compress_level=1))
    if labels is not None:
        timed("PNG save of the overlay (ChatStore.save_image: RGB PNG, level 1)",
              lambda: store.save_image("bench", "overlay.png", overlay))
    timed("PNG re-read for the VLM (ChatStore.image)", lambda: loop.store.image(loop_result.chat.chat_id,
                                                                                loop_result.chat.messages[0].images[0]))
    if remote:
        timed("PNG + base64 data URL of one slice (RemoteVLM request)", lambda: image_data_url(picture))
    return rows


def token_lines(mode: Mode, turns: list[HttpTurn], local: list[LoopTurn], tokenizer: Any) -> list[str]:
    """Local mode: tokens generated per round in both paths, and whether the answers are the same."""
    def encoded(texts: list[str]) -> list[int]:
        return [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]

    def rounds(values: list[list[int]]) -> str:
        counts = sorted({len(v) for v in values})
        if len(counts) != 1:
            return " / ".join("+".join(map(str, v)) for v in values) + " (per turn)"
        per_round = [med([float(v[k]) for v in values]) for k in range(counts[0])]
        return " + ".join(f"{value:g}" for value in per_round) or "0"

    http_texts = [assistant_texts(t.answer["turn"]) for t in turns]
    local_texts = [t.texts for t in local]
    same = sum(1 for h, x in zip(http_texts, local_texts, strict=True) if h == x)
    all_texts = {tuple(texts) for texts in http_texts + local_texts}
    stopped = sorted({str(getattr(call[3], "stopped_by", "?")) for t in local for call in t.vlm_calls})
    lines = [
        f"generated tokens per turn, by round (medians; max_new_tokens {mode.params['max_new_tokens']}, greedy):",
        f"  in-process VilaChat.generate (GenerationResult.n_tokens): {rounds([t.n_tokens for t in local])} "
        f"(stopped by: {', '.join(stopped)})",
        f"  answer texts re-encoded with the checkpoint's tokenizer: HTTP {rounds([encoded(x) for x in http_texts])}, "
        f"in-process {rounds([encoded(x) for x in local_texts])}",
        f"  HTTP answer texts identical to the in-process ones: {same}/{len(turns)} turns "
        f"({len(all_texts)} distinct answer{'s' if len(all_texts) != 1 else ''} over both paths)",
    ]
    tokens = med([float(sum(t.n_tokens)) for t in local])
    if tokens:
        server = med([t.steps("generate ") for t in turns])
        here = med([t.vlm for t in local])
        lines.append(f"  generation speed (same tokens): in the server {1000 * server / tokens:.1f} ms/token, "
                     f"in-process {1000 * here / tokens:.1f} ms/token")
    first = local_texts[-1][0] if local_texts and local_texts[-1] else ""
    lines.append(f"  first round's answer: {ascii(first[:160])}{' ...' if len(first) > 160 else ''}")
    return lines


def report(args: argparse.Namespace, mode: Mode, shape_text: str, warm: list[HttpTurn], turns: list[HttpTurn],
           local_warm: list[LoopTurn], local: list[LoopTurn], suspect_rows: list[tuple[str, float, str]],
           extra: list[str]) -> None:
    http = med([t.wall for t in turns])
    compute_steps = med([t.compute for t in turns])
    compute_alone = med([t.vlm + t.experts for t in local])
    loop_wall = med([t.wall for t in local])
    remote = mode.vlm == "remote"
    with_expert = all(t.answer.get("experts") for t in turns) and all(t.result.experts for t in local)
    no_expert = not any(t.answer.get("experts") for t in turns) and not any(t.result.experts for t in local)
    client = "RemoteVLM.generate" if remote else "VilaChat.generate"

    print()
    print(f"mode: --vlm {mode.vlm}; VLM: {mode.describe()}")
    threads = f"{args.threads} (--threads)" if args.threads is not None else "torch's default"
    print(f"chat turn on a cached {shape_text} CT (axis {args.axis}, slice {args.slice_index}); question "
          f"{mode.question!r}; VISTA3D: stand-in weights; CPU, torch threads per path: {threads}")
    if mode.note is not None:
        print(f"note: the checkpoint is a stand-in ({mode.note}); its answers are not a medical model's"
              + ("" if mode.is_demo else ": its words are random"))
    if no_expert:
        print("no expert in this turn (the model wrote no trigger): the compute is the VLM's generation alone")
    elif not with_expert:
        print("note: only some turns ran an expert (the medians mix turns with and without one)")
    cold = ", ".join(f"{item['step']} {item['seconds']:.2f} s" for item in warm[0].answer["timings"])
    print(f"first (cold) HTTP turn {warm[0].wall:.2f} s: {cold}")
    print(f"first (cold) in-process turn {local_warm[0].wall:.2f} s")
    for line in extra:
        print(line)
    print(f"medians over {len(turns)} turns per path (new chat_id each turn, same image and slice)")
    print()
    rows = [
        ("HTTP turn (request sent -> whole response read)", http),
        ("  response headers received after", med([t.headers_at for t in turns])),
        ("compute, endpoint steps (sum of 'generate k' + 'expert X')", compute_steps),
        (f"compute, calls alone in-process ({client} + segment_ct)", compute_alone),
        (f"  {client}, all rounds", med([t.vlm for t in local])),
    ]
    if remote:
        rows += [
            ("    of which building the request (PNG + base64 of the images)", med([t.request_build for t in local])),
            ("    the rest (HTTP to the fake VLM, SSE parsing)", med([t.vlm - t.request_build for t in local])),
        ]
    rows += [
        ("  ExpertService.segment_ct (cached)" + ("" if not no_expert else ": no expert in this turn"),
         med([t.experts for t in local])),
        ("in-process ChatLoop.run_turn (no HTTP)", loop_wall),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"{'':<{width}}  {'ms':>9}")
    for label, value in rows:
        print(f"{label:<{width}}  {ms(value)}")

    print()
    for name, compute in (("endpoint steps", compute_steps), ("calls alone", compute_alone)):
        overhead = http - compute
        if overhead < 0:  # the compute alone took longer than the whole HTTP turn: the two ran at different speeds
            print(f"overhead = HTTP - compute ({name}): {1000 * overhead:.1f} ms per turn, {100 * overhead / compute:.0f} % "
                  "of compute [n/a: negative, i.e. these calls ran slower here than in the server (a busy CPU); "
                  "not a pass]")
            continue
        print(f"overhead = HTTP - compute ({name}): {1000 * overhead:.1f} ms per turn "
              f"[{'ok' if overhead <= 0.050 else 'MISS'}: target <= 50 ms]; {100 * overhead / compute:.0f} % of "
              f"compute [{'ok' if overhead <= 0.05 * compute else 'MISS'}: target <= 5 %]")
    print(f"HTTP turn - in-process loop: {1000 * (http - loop_wall):.1f} ms ({http / loop_wall:.2f}x)")
    if remote:
        print("(with an instant fake VLM, 'compute' is mostly our own request building and local HTTP, so the "
              "percentage says little; the ms per turn is the number to compare)")
    else:
        print("(compute = the model's real generation" + (" plus the cached expert call" if not no_expert else "")
              + ", so the percentage is meaningful; 'endpoint steps' is the server's own generate, 'calls alone' the "
              "same generate in this process: they differ when the model runs slower or faster in the server)")

    print()
    print("where the turn goes (each turn's 'timings' steps, medians, ms)")
    names: list[str] = []
    for t in [*turns, *local]:
        for item in (t.answer["timings"] if isinstance(t, HttpTurn) else t.result.timings):
            if item["step"] not in names and item["step"] != "total":
                names.append(item["step"])
    table = [(f"step '{name}'", med([t.step(name) for t in turns]), med([t.step(name) for t in local]))
             for name in names]
    table.append(("rest of 'total' (labelmap .nii.gz write or copy, chat.json saves)",
                  med([t.step("total") - sum(t.step(n) for n in names) for t in turns]),
                  med([t.step("total") - sum(t.step(n) for n in names) for t in local])))
    table.append(("= ChatLoop 'total'", med([t.step("total") for t in turns]), med([t.step("total") for t in local])))
    table.append(("after the loop (labelmap hand-off, multipart, MONAI Label, transfer)",
                  med([t.wall - t.step("total") for t in turns]), med([t.wall - t.step("total") for t in local])))
    width = max(len(label) for label, _, _ in table)
    print(f"  {'':<{width}}  {'HTTP':>9}  {'in-proc':>9}")
    for label, server_value, local_value in table:
        print(f"  {label:<{width}}  {ms(server_value)}  {ms(local_value)}")
    print(f"  client side, not in the HTTP turn: decoding the response {ms(med([t.decode_s for t in turns]))} ms")
    print(f"  response {med([t.response_bytes for t in turns]) / 1e6:.2f} MB, of which the labelmap "
          f"{med([t.labelmap_bytes for t in turns]) / 1e6:.2f} MB")

    print()
    print("suspects, timed in-process on the same data (median of 3, ms)")
    width = max(len(label) for label, _, _ in suspect_rows)
    for label, value, note in suspect_rows:
        print(f"  {label:<{width}}  {ms(value)}  {note}")


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=20, help="measured turns per path (default 20)")
    parser.add_argument("--quick", action="store_true", help="5 measured turns per path")
    parser.add_argument("--shape", default="512,512,200", help="CT size x,y,z in voxels (default 512,512,200)")
    parser.add_argument("--spacing", default="0.8,0.8,2.0", help="CT voxel size x,y,z in mm (default 0.8,0.8,2.0)")
    parser.add_argument("--compressed", action="store_true", help="write the CT as .nii.gz instead of .nii")
    parser.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"))
    parser.add_argument("--slice-index", type=int, default=None, help="slice shown (default: the middle one)")
    parser.add_argument("--vlm", default="remote", choices=("remote", "local"),
                        help="remote: the instant scripted fake OpenAI server (default); local: a real VILA "
                             f"checkpoint served with --conf vlm {VLM_ID}")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="--vlm local: the checkpoint folder to serve (linked to the manifest location), e.g. "
                             "the demo model models/vila/Llama3-VILA-M3-8B; default: a tiny random stand-in")
    parser.add_argument("--question", default=QUESTION, help=f"the question of every turn (default {QUESTION!r})")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"--vlm local: max_new_tokens of both paths (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of both paths (OMP_NUM_THREADS of the server, torch.set_num_threads "
                             "here); default: torch's own (one per core). On a busy shared machine 1 gives "
                             "stable generation times")
    args = parser.parse_args(argv)
    if args.quick:
        args.turns = 5
    try:
        args.shape = tuple(int(v) for v in args.shape.split(","))
        args.spacing = tuple(float(v) for v in args.spacing.split(","))
    except ValueError:
        parser.error("--shape and --spacing take three comma-separated numbers")
    if len(args.shape) != 3 or len(args.spacing) != 3 or min(args.shape) < 16:
        parser.error("--shape and --spacing take three numbers; each size at least 16")
    if args.turns < 1:
        parser.error("--turns must be at least 1")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.checkpoint is not None:
        if args.vlm != "local":
            parser.error("--checkpoint needs --vlm local")
        if not (args.checkpoint / "config.json").is_file():
            parser.error(f"--checkpoint {args.checkpoint}: no config.json there (not a VILA checkpoint folder)")
    if args.vlm == "remote" and args.question != QUESTION:
        parser.error("--question needs --vlm local (the fake server's script answers the default question)")
    count = {"axial": args.shape[2], "coronal": args.shape[1], "sagittal": args.shape[0]}[args.axis]
    if args.slice_index is None:
        args.slice_index = count // 2
    elif not 0 <= args.slice_index < count:
        parser.error(f"--slice-index must be within 0..{count - 1} for the {args.axis} axis")
    return args


def start_server(work: Path, conf: dict[str, str]) -> RunningServer:
    """The MONAI Label server, with its temporary files (MONAI Label writes a logging config there at
    start; the infer task its labelmap copies) inside ``work`` too."""
    server_tmp = work / "server-tmp"
    server_tmp.mkdir(exist_ok=True)
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(server_tmp)  # read by the child at start; this process's tempdir is already set
    try:
        return start_monailabel(work / "server", work / "studies", conf=conf)
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shape_text = "x".join(map(str, args.shape))
    remote = args.vlm == "remote"
    if remote:
        mode = Mode("remote", args.question, expect_final=FINAL)
    else:
        mode = Mode("local", args.question, params={"max_new_tokens": args.max_new_tokens, "temperature": 0.0})
    if args.threads is not None:  # the server reads these at start; this process's torch is already imported
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    # remote: started first, before this process has any threads: (warm-up + measured turns) x (HTTP, in-process)
    fake = VLMProcess(_start_fake_vlm, 2 * (WARMUP_TURNS + args.turns)) if remote else None
    server: RunningServer | None = None
    experts: TimedExperts | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="vila-m3-bench-chat-") as tmp:
            work = Path(tmp)
            image_id = f"ct_{shape_text}"
            ct_path = work / "studies" / (image_id + (".nii.gz" if args.compressed else ".nii"))
            start = time.perf_counter()
            write_ct(ct_path, args.shape, args.spacing)
            print(f"CT {shape_text} int16 written in {time.perf_counter() - start:.1f} s "
                  f"({ct_path.stat().st_size / 1e6:.0f} MB, {ct_path.name})", flush=True)
            models_dir = work / "models"
            stage_stand_ins(models_dir, ("vista3d",))
            conf = {"models": "vila_m3,vista3d", "chats_dir": str(work / "chats"), "models_dir": str(models_dir)}
            if fake is not None:
                conf.update(vlm_url=fake.url, vlm_model=VLM_MODEL)
            else:
                start = time.perf_counter()
                mode.location, mode.source = stage_checkpoint(models_dir, args.checkpoint)
                mode.note = stand_in_note(mode.location)
                conf["vlm"] = VLM_ID
                print(f"checkpoint {VLM_ID} staged at {mode.location} in {time.perf_counter() - start:.1f} s: "
                      f"{mode.source}", flush=True)
                if mode.note is not None:
                    print(f"  it is a stand-in: {mode.note}" + ("" if mode.is_demo else
                          " (random words: no expert trigger, so no expert step)"), flush=True)

            try:
                start = time.perf_counter()
                server = start_server(work, conf)
                print(f"server up in {time.perf_counter() - start:.1f} s at {server.url}", flush=True)
                warm = []
                for number in range(WARMUP_TURNS):
                    warm.append(http_turn(server, mode, image_id, args.slice_index, args.axis))
                    called = warm[-1].answer["experts"]
                    print(f"warm-up HTTP turn {number + 1}: {warm[-1].wall:.2f} s "
                          + (f"(expert cached: {called[0]['cached']})" if called else "(no expert in this turn)"),
                          flush=True)
                turns = [http_turn(server, mode, image_id, args.slice_index, args.axis) for _ in range(args.turns)]
                if not all(call["cached"] for t in turns for call in t.answer["experts"]):
                    print("note: some measured turns did not hit the expert result cache")
                print(f"{len(turns)} HTTP turns measured", flush=True)
            finally:
                if server is not None:
                    server.stop()

            # the same turns in this process: the app's VLM, registry and expert service, no HTTP
            registry = ExpertRegistry.from_config(
                available=lambda spec: None if spec.name == "VISTA3D" else "not staged or not selected on this server")
            experts = TimedExperts(models_dir, registry=registry, idle_release_s=0)
            extra: list[str] = []
            if remote:
                vlm = open_vlm(conf, models_dir, VLM_ID)
            else:
                from vila_m3.vlm.generation import VilaChat, default_device_and_dtype

                device = str(default_device_and_dtype()[0])  # what the server picks: cpu unless a GPU is present
                start = time.perf_counter()
                vlm = VilaChat.from_pretrained(mode.location, device=device)
                extra.append(f"in-process checkpoint load (VilaChat.from_pretrained, device={device}): "
                             f"{time.perf_counter() - start:.2f} s (not in any turn)")
            loop = ChatLoop(TimedVLM(vlm), experts, registry, ChatStore(work / "chats-in-process"))
            local_warm = []
            for number in range(WARMUP_TURNS):
                local_warm.append(loop_turn(loop, mode, ct_path, image_id, args.slice_index, args.axis))
                print(f"warm-up in-process turn {number + 1}: {local_warm[-1].wall:.2f} s", flush=True)
            local = [loop_turn(loop, mode, ct_path, image_id, args.slice_index, args.axis) for _ in range(args.turns)]
            print(f"{len(local)} in-process turns measured", flush=True)
            if not remote:
                extra += token_lines(mode, turns, local, vlm.tokenizer)

            _, ct_volume = experts.load_volume(ct_path)
            scratch = work / "scratch"
            scratch.mkdir()
            suspect_rows = suspects(local[-1].result, loop, ct_volume, turns[-1].answer, scratch, 3, remote=remote)
            report(args, mode, shape_text, warm, turns, local_warm, local, suspect_rows, extra)
    finally:
        if experts is not None:
            experts.close()
        if fake is not None:
            fake.stop()


if __name__ == "__main__":
    main()
