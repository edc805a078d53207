"""Expert latency: MONAI's per-call bundle workflow against our long-lived runners and result cache.

For VISTA3D (label group ``--group``, default "hepatic tumor") on the sample abdominal CT and for
BRATS on the sample four-sequence brain MRI (both generated into a temporary folder), with stand-in
bundles (random weights; by default ``real_sizes=True``, i.e. the real bundles' 1.5 mm resampling and
128³ windows for VISTA3D and 240 × 240 × 160 windows for BRATS; ``--tiny`` for the small variant),
three ways of answering the same request are timed:

* **per-call workflow** - what the reference VILA-M3 demo does on every request: build MONAI's
  workflow from the bundle with ``monai.bundle.create_workflow(config_file=<bundle>/configs/
  inference.json, meta_file=<bundle>/configs/metadata.json, workflow_type="infer", bundle_root=
  <bundle>, ...)``, overriding the input (VISTA3D ``input_dict`` with the image and the group's
  ``label_prompt``; BRATS ``test_datalist`` with the four sequences), ``output_dir`` (a fresh
  temporary folder) and, as the demo does, ``output_dtype``/``separate_folder``/``output_ext``; then
  ``run()`` and ``finalize()``. Every call parses the config, builds the network, loads the
  checkpoint, reads the file(s), infers and writes the labelmap as NIfTI.
* **warm** - the same request through ``ExpertService`` (``segment_ct`` / ``segment_brain``) whose
  runner is already loaded and whose volume cache already holds the input, with the result cache
  emptied before each call, so the runner really runs (preprocess, sliding windows, postprocess;
  the result stays in memory).
* **cached repeat** - the same request a second time through the same ``ExpertService``: served
  from the result cache. Compared with the first call of the pair (the warm call above) and with the
  very first call of a fresh service (cold-ish: builds the runner, reads the file, loads the weights).

How to read the output: a table of medians over ``--repeats`` (seconds), one column per expert, with
the per-step breakdown reported by MONAI's workflow stages and by our runner's ``timings``; then the
ratios ``per-call workflow / warm`` (target >= 3x) and ``cached / first`` (target <= 5 %). The
header says the device and that the weights are stand-ins: a tiny random network loads in
milliseconds, so the checkpoint-loading share of the per-call workflow is far smaller here than with
the real weights, while on a CPU the sliding-window inference dominates both paths. The ratio is
therefore a lower bound of what the real bundles on a GPU would show.

**Split per step** (printed first; ``--split-only`` prints only it): one VISTA3D call on a synthetic
512 × 512 × 200 CT (``--split-shape``; 0.8 × 0.8 × 2 mm, the CT of ``benchmarks/chat_overhead.py``)
with the stand-in bundle the server stages (``stage_stand_ins``: 4 mm resampling, 56 × 56 × 40
windows), timed step by step: read the volume, preprocess (the bundle's transforms, with the 4 mm
resampling), network (sliding windows), postprocess (``VistaPostTransformd`` and the way back to the
input grid), labelmap encode / write (the chat's copy and the file MONAI Label sends), overlay render
(the slice PNG the model sees) and the total outside the network, with and without the read (a chat
turn reads the CT once for the slice the model sees and for the expert call alike). ``cold`` is the first call of a fresh
runner (network load included in its network row), ``warm`` the next one (another result, so the
labelmap is encoded again). Two columns each: ``before``, the code path of the previous release (the
CT copied into (X, Y, Z) order as float32, MONAI's ``Invertd`` through every step, the labelmap
encoded for each file) rebuilt here from MONAI's transforms, and ``now``, :class:`Vista3DRunner`'s
``prepare`` (the CT resampled straight from its int16 pixels) / ``infer`` / ``finish`` and
:func:`save_labelmap`. Both run the same network on the same
input in the same process, one after the other, under ``torch.set_num_threads(--threads)`` (default
2, a two-core machine); the report says whether both labelmaps are equal voxel for voxel. Other work
on the machine inflates every number: the header prints the load average.

Run: ``.venv/bin/python benchmarks/expert_latency.py [--repeats 3] [--quick] [--tiny]
[--experts vista3d,brats] [--device auto|cpu|cuda] [--split-only] [--split-shape 512,512,200]
[--threads 2]``. Everything is written in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import monai
import numpy as np
import SimpleITK as sitk
import torch
from monai.apps.vista3d.transforms import VistaPostTransformd
from monai.bundle import create_workflow
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from vila_m3.experts.bundle import default_device, image_from_arrays
from vila_m3.experts.colors import overlay_colors_float
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.service import ExpertRun, ExpertService, LruCache
from vila_m3.experts.vista3d import PreparedCT, Vista3DRunner
from vila_m3.imaging import Volume, labelmap_like, read_volume, save_labelmap, write_labelmap
from vila_m3.imaging.overlay import render_overlay
from vila_m3.models.manifest import ModelManifest
from vila_m3.samples import CT_ID, MRI_ID, MRI_SEQUENCES, generate_samples
from vila_m3.standins.stand_ins import stage_stand_ins
from vila_m3.standins.tiny_bundles import make_tiny_brats_bundle, make_tiny_vista3d_bundle

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_overhead import write_ct  # noqa: E402  (the same synthetic CT as the chat benchmark)

EXPERTS = ("vista3d", "brats")
BUNDLE_IDS = {"vista3d": "vista3d", "brats": "brats_mri_segmentation"}
DISPLAY = {"vista3d": "VISTA3D", "brats": "BRATS"}

ADAPTATIONS = [
    "create_workflow() of MONAI {monai} already runs initialize(); it is not called a second time (that "
    "would parse the config, build the network and load the checkpoint twice per request).",
    "The stand-in bundles have no configs/logging.conf (the reference demo passes one as logging_file): "
    "MONAI skips its logging setup.",
    "Overrides as in the reference demo: output_dtype=uint8, separate_folder=False, output_ext=.nii.gz, "
    "output_dir=<fresh temporary folder>; the bundle folder is put first on sys.path (VISTA3D's "
    "inference.json imports its scripts package).",
    "BRATS: the bundle's DataLoader settings are kept (num_workers=4, as in the real bundle and the demo), "
    "so every per-call workflow starts 4 worker processes.",
    "VISTA3D label prompt: the ids our registry resolves for the group, the same in both paths.",
]


# --------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def quiet(enabled: bool) -> Iterator[None]:
    """Silence MONAI's per-call log lines and Python warnings while ``enabled``."""
    if not enabled:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


@contextlib.contextmanager
def bundle_on_path(bundle_dir: Path) -> Iterator[None]:
    """The bundle folder first on ``sys.path`` (as the demo does), removed afterwards."""
    sys.path.insert(0, str(bundle_dir))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(bundle_dir))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Request:
    """One expert request, as the workflow and as our service take it."""

    expert: str
    bundle: Path
    overrides: dict[str, Any]
    call: Callable[[ExpertService], ExpertRun]
    read_inputs: Callable[[], Any]
    output_reference: Callable[[Any], np.ndarray]
    description: str


@dataclass
class Measurements:
    workflow: dict[str, list[float]] = field(default_factory=dict)
    warm: dict[str, list[float]] = field(default_factory=dict)
    cached: list[float] = field(default_factory=list)
    cold_first: float = float("nan")
    read: list[float] = field(default_factory=list)
    agreement: float | None = None

    def add(self, table: dict[str, list[float]], key: str, value: float) -> None:
        table.setdefault(key, []).append(value)


# -------------------------------------------------------------------------------- the three paths


def per_call_workflow(request: Request, device_override: str | None, verbose: bool,
                      keep_output: Path | None = None) -> dict[str, float]:
    """One request the way the reference demo runs it; returns the stage times (s)."""
    times: dict[str, float] = {}
    overrides = dict(request.overrides)
    if device_override is not None:
        overrides["device"] = f"$torch.device('{device_override}')"
    with tempfile.TemporaryDirectory(prefix="vila-m3-bench-wf-") as out, quiet(not verbose), \
            bundle_on_path(request.bundle):
        synchronize()
        start = time.perf_counter()
        workflow = create_workflow(
            workflow_type="infer",
            bundle_root=str(request.bundle),
            config_file=str(request.bundle / "configs" / "inference.json"),
            meta_file=str(request.bundle / "configs" / "metadata.json"),
            output_dtype="uint8",
            separate_folder=False,
            output_ext=".nii.gz",
            output_dir=out,
            **overrides,
        )
        synchronize()
        times["create_workflow + initialize"] = time.perf_counter() - start
        step = time.perf_counter()
        workflow.run()
        synchronize()
        times["run (read, infer, write)"] = time.perf_counter() - step
        step = time.perf_counter()
        workflow.finalize()
        times["finalize"] = time.perf_counter() - step
        times["total"] = time.perf_counter() - start
        written = sorted(Path(out).glob("*.nii.gz"))
        if len(written) != 1:
            raise RuntimeError(f"the per-call workflow wrote {len(written)} files, expected 1: {written}")
        if keep_output is not None:
            keep_output.write_bytes(written[0].read_bytes())
    return times


def timed_call(service: ExpertService, request: Request) -> tuple[float, ExpertRun]:
    synchronize()
    start = time.perf_counter()
    run = request.call(service)
    synchronize()
    return time.perf_counter() - start, run


def measure(request: Request, models_dir: Path, device: str | None, repeats: int, verbose: bool,
            scratch: Path) -> Measurements:
    found = Measurements()
    service = ExpertService(models_dir, idle_release_s=0, device=device)
    try:
        with quiet(not verbose):
            found.cold_first, run = timed_call(service, request)
        if run.cached:
            raise RuntimeError("the first call of a fresh service came from the cache")
        if default_device(device).type == "cuda":  # cuDNN autotuning and lazy CUDA set-up out of the timings
            per_call_workflow(request, device, verbose)

        reference_output = scratch / f"{request.expert}_workflow.nii.gz"
        for repeat in range(repeats):
            times = per_call_workflow(request, device, verbose,
                                      keep_output=reference_output if repeat == 0 else None)
            for key, value in times.items():
                found.add(found.workflow, key, value)

            service.results = LruCache(service.results.max_entries)  # bypass the result cache, keep the runner
            with quiet(not verbose):
                seconds, run = timed_call(service, request)
            if run.cached:
                raise RuntimeError("the warm call came from the cache")
            found.add(found.warm, "total", seconds)
            for key, value in run.result.timings.items():
                if key != "total":
                    found.add(found.warm, key, value)
            if repeat == 0:
                workflow_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_output)))
                ours = np.asarray(run.result.labels.array)
                if workflow_labels.shape == ours.shape:
                    found.agreement = float(np.mean(request.output_reference(workflow_labels) == ours))

            seconds, run = timed_call(service, request)
            if not run.cached:
                raise RuntimeError("the repeated call did not come from the cache")
            found.cached.append(seconds)

            start = time.perf_counter()
            request.read_inputs()
            found.read.append(time.perf_counter() - start)
    finally:
        service.close()
    return found


# ----------------------------------------------------------------------------------------- setup


def make_requests(samples: Path, models_dir: Path, experts: list[str], group: str) -> list[Request]:
    registry = ExpertRegistry.from_config()
    requests: list[Request] = []
    if "vista3d" in experts:
        ct = samples / "studies" / f"{CT_ID}.nii.gz"
        resolved = registry.get("VISTA3D").resolve_argument(group)
        ids = list(resolved.label_ids)
        requests.append(Request(
            expert="vista3d",
            bundle=ModelManifest.load()[BUNDLE_IDS["vista3d"]].location(models_dir),
            overrides={"input_dict": {"image": str(ct), "label_prompt": ids}},
            call=lambda service: service.segment_ct(ct, argument=group),
            read_inputs=lambda: read_volume(ct),
            # the bundle writes 255 where the inversion leaves a voxel undefined; our runner writes 0
            output_reference=lambda labels: np.where(labels == 255, 0, labels),
            description=f"{ct.name}, group '{group}' -> label_prompt {ids}",
        ))
    if "brats" in experts:
        paths = {name: samples / "studies" / f"{MRI_ID}_{name}.nii.gz" for name in MRI_SEQUENCES}
        ordered = [str(paths[name]) for name in ("t1c", "t1", "t2", "flair")]
        requests.append(Request(
            expert="brats",
            bundle=ModelManifest.load()[BUNDLE_IDS["brats"]].location(models_dir),
            overrides={"test_datalist": [{"image": ordered}]},
            call=lambda service: service.segment_brain(paths),
            read_inputs=lambda: {name: read_volume(path) for name, path in paths.items()},
            output_reference=lambda labels: labels,
            description=f"{MRI_ID}_{{t1c,t1,t2,flair}}.nii.gz",
        ))
    return requests


def describe_device(device: str | None) -> str:
    resolved = default_device(device)
    if resolved.type == "cuda":
        return f"{resolved} ({torch.cuda.get_device_name(resolved)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


# ------------------------------------------------------------------------------ split per step

SPLIT_STEPS = ("read volume", "preprocess (resample)", "network", "postprocess (invert)",
               "labelmap encode/write x2", "overlay render")
SPLIT_PROMPT_GROUP = "hepatic tumor"
#: The total less the read: a chat turn reads the CT once for the slice the model sees and the expert
#: call alike (the service's volume cache), so the read is shared with rendering.
WITHOUT_READ = "outside, read excluded"


def _previous_prepare(runner: Vista3DRunner, volume: Volume, prompt: list[int]) -> PreparedCT:
    """The previous release's preprocessing: transforms instantiated per call, the CT copied into
    (X, Y, Z) order as float32 element by element (``np.ascontiguousarray(transpose).astype``)."""
    image = image_from_arrays([volume.array], volume.geometry)
    data = np.ascontiguousarray(volume.array.transpose(2, 1, 0)).astype(np.float32)
    image = MetaTensor(torch.from_numpy(data), affine=image.affine, meta=dict(image.meta))
    preprocessing = Compose(runner.bundle.transforms("preprocessing"))
    prepared = preprocessing({"image": image, "label_prompt": list(prompt)})
    prepared["_preprocessing"] = preprocessing
    return PreparedCT(volume, list(prompt), SPLIT_PROMPT_GROUP, prepared)


def _previous_finish(runner: Vista3DRunner, prepared: PreparedCT, logits: torch.Tensor) -> Volume:
    """The previous release's postprocessing: ``Invertd`` through every preprocessing step (a float64
    affine grid over the whole input), then NaN → 0, round, transpose and cast on the full volume."""
    data = prepared.data
    image = data["image"]
    class_vector = torch.as_tensor(data["label_prompt"], device=runner.device).reshape(-1, 1)
    post = Compose([
        VistaPostTransformd(keys="pred"),
        Invertd(keys="pred", transform=data["_preprocessing"], orig_keys="image", nearest_interp=True,
                to_tensor=True),
    ])
    pred = MetaTensor(logits.to(image.device), meta=dict(image.meta))
    with torch.no_grad():
        out = post({"image": image, "pred": pred, "label_prompt": class_vector})["pred"]
    array = torch.nan_to_num(out[0].float(), nan=0.0).round().cpu().numpy()
    labels = np.ascontiguousarray(array.transpose(2, 1, 0)).astype(np.uint16 if array.max() > 255 else np.uint8)
    return labelmap_like(prepared.volume, labels)


def _split_call(runner: Vista3DRunner, ct: Path, prompt: list[int], previous: bool, scratch: Path,
                volume: Volume | None) -> tuple[dict[str, float], Volume, np.ndarray]:
    """One VISTA3D call, step by step; returns (seconds per step, the volume read, the labels)."""
    times: dict[str, float] = {}

    def timed(step: str, action: Callable[[], Any]) -> Any:
        synchronize()
        start = time.perf_counter()
        value = action()
        synchronize()
        times[step] = time.perf_counter() - start
        return value

    if volume is None:
        volume = timed("read volume", lambda: read_volume(ct))
    else:
        times["read volume"] = 0.0  # warm: the service's volume cache holds it
    if previous:
        prepared = timed("preprocess (resample)", lambda: _previous_prepare(runner, volume, prompt))
    else:
        prepared = timed("preprocess (resample)", lambda: runner.prepare(volume, prompt, SPLIT_PROMPT_GROUP))
    logits = timed("network", lambda: runner.infer(prepared))
    if previous:
        labels = timed("postprocess (invert)", lambda: _previous_finish(runner, prepared, logits))
    else:
        labels = timed("postprocess (invert)", lambda: runner.finish(prepared, logits).labels)
    targets = [scratch / "chat" / "turn001_labels.nii.gz", scratch / "result.nii.gz"]
    if previous:
        timed("labelmap encode/write x2",
              lambda: [write_labelmap(labels.array, labels.geometry, target) for target in targets])
    else:
        timed("labelmap encode/write x2", lambda: [save_labelmap(labels, target) for target in targets])
    index = volume.array.shape[0] // 2
    timed("overlay render", lambda: render_overlay(volume, labels, "axial", index, overlay_colors_float(),
                                                    modality="CT"))
    times["outside the network"] = sum(v for k, v in times.items() if k != "network")
    times[WITHOUT_READ] = times["outside the network"] - times["read volume"]
    return times, volume, np.asarray(labels.array)


def measure_split(args: argparse.Namespace, device: str | None, work: Path) -> None:
    """Print the per-step table (before / now, cold / warm) for the large CT."""
    torch.set_num_threads(args.threads)
    ct = work / "split" / "ct.nii.gz"
    start = time.perf_counter()
    write_ct(ct, args.split_shape, (0.8, 0.8, 2.0))
    models = work / "split" / "models"
    stage_stand_ins(models, ("vista3d",))
    bundle = ModelManifest.load()[BUNDLE_IDS["vista3d"]].location(models)
    prompt = list(ExpertRegistry.from_config().get("VISTA3D").resolve_argument(SPLIT_PROMPT_GROUP).label_ids)
    print(f"split: CT {args.split_shape} written in {time.perf_counter() - start:.1f} s", flush=True)

    columns: dict[str, dict[str, float]] = {}
    labels: dict[str, np.ndarray] = {}
    for name, previous in (("before", True), ("now", False)):
        runner = Vista3DRunner(bundle, device=device)
        with quiet(not args.verbose):
            cold, volume, labels[name] = _split_call(runner, ct, prompt, previous, work / "split" / name, None)
            warm, _, _ = _split_call(runner, ct, prompt, previous, work / "split" / name, volume)
        columns[f"{name} cold"], columns[f"{name} warm"] = cold, warm
        runner.release()
        print(f"  {name}: done", flush=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print()
    print(f"split per step, seconds: VISTA3D stand-in (4 mm, 56x56x40 windows) on a {args.split_shape} int16 CT, "
          f"0.8 x 0.8 x 2 mm, group '{SPLIT_PROMPT_GROUP}' {prompt}")
    print(f"device {describe_device(device)}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          "(other work on the machine inflates every number)")
    names = list(columns)
    width = max(len(step) for step in (*SPLIT_STEPS, "outside the network", WITHOUT_READ))
    print(f"{'step':<{width}}  " + "  ".join(f"{n:>11}" for n in names))
    for step in (*SPLIT_STEPS, "outside the network", WITHOUT_READ):
        print(f"{step:<{width}}  " + "  ".join(f"{columns[n][step]:>11.3f}" for n in names))
    same = np.array_equal(labels["before"], labels["now"])
    print(f"labelmaps before / now equal voxel for voxel: {'yes' if same else 'NO'}; "
          f"target: outside the network <= 1 s (now: cold {columns['now cold']['outside the network']:.3f} s "
          f"with the read, {columns['now cold'][WITHOUT_READ]:.3f} s without; warm "
          f"{columns['now warm']['outside the network']:.3f} s, the CT already in memory)")
    print()


# ------------------------------------------------------------------------------------------ report


def print_report(requests: list[Request], results: dict[str, Measurements], args: argparse.Namespace,
                 device_text: str) -> None:
    names = [DISPLAY[r.expert] for r in requests]
    sizes = "tiny (4 mm resampling, 64^3 windows / 144x144x96)" if args.tiny else \
        "real sizes (1.5 mm resampling, 128^3 windows / 240x240x160 windows)"
    print()
    print(f"device: {device_text}; torch {torch.__version__}, MONAI {monai.__version__}")
    print(f"weights: STAND-INS (tiny random networks, not the real bundles), {sizes}")
    for request in requests:
        print(f"input {DISPLAY[request.expert]}: {request.description}")
    print(f"repeats: {args.repeats} (medians below)")
    print()

    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list[float | None], fmt: str = "{:.3f}") -> None:
        rows.append((label, ["-" if v is None or v != v else fmt.format(v) for v in values]))

    def stat(expert: str, pick: Callable[[Measurements], list[float]]) -> float:
        return median(pick(results[expert]))

    experts = [r.expert for r in requests]
    row("per-call workflow, total", [stat(e, lambda m: m.workflow["total"]) for e in experts])
    for key in ("create_workflow + initialize", "run (read, infer, write)", "finalize"):
        row(f"  {key}", [stat(e, lambda m, k=key: m.workflow[k]) for e in experts])
    row("warm runner via ExpertService, total", [stat(e, lambda m: m.warm["total"]) for e in experts])
    steps = sorted({k for e in experts for k in results[e].warm if k != "total"},
                   key=lambda k: ["resample", "load", "preprocess", "inference", "postprocess"].index(k)
                   if k in ("resample", "load", "preprocess", "inference", "postprocess") else 99)
    for key in steps:
        row(f"  runner {key}", [stat(e, lambda m, k=key: m.warm.get(k, [])) for e in experts])
    row("(reading the input file(s), not in warm)", [stat(e, lambda m: m.read) for e in experts])
    row("first call of a fresh service (cold-ish, once)", [results[e].cold_first for e in experts])
    row("cached repeat (identical second call)", [stat(e, lambda m: m.cached) for e in experts], "{:.6f}")

    width = max(len(label) for label, _ in rows)
    print(f"{'seconds':<{width}}  " + "  ".join(f"{name:>12}" for name in names))
    for label, values in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{value:>12}" for value in values))

    print()
    print("ratios")
    ratio_rows: list[tuple[str, list[str]]] = []
    per_call = [stat(e, lambda m: m.workflow["total"]) / stat(e, lambda m: m.warm["total"]) for e in experts]
    ratio_rows.append(("per-call workflow / warm (target >= 3x)",
                       [f"{v:.2f}x {'ok' if v >= 3 else 'MISS'}" for v in per_call]))
    cached_warm = [stat(e, lambda m: m.cached) / stat(e, lambda m: m.warm["total"]) for e in experts]
    ratio_rows.append(("cached / first, warm first call (target <= 5 %)",
                       [f"{100 * v:.4f} % {'ok' if v <= 0.05 else 'MISS'}" for v in cached_warm]))
    cached_cold = [stat(e, lambda m: m.cached) / results[e].cold_first for e in experts]
    ratio_rows.append(("cached / first, cold-ish first call (target <= 5 %)",
                       [f"{100 * v:.4f} % {'ok' if v <= 0.05 else 'MISS'}" for v in cached_cold]))
    ratio_rows.append(("voxels equal: our labelmap vs the workflow's",
                       ["-" if results[e].agreement is None else f"{100 * results[e].agreement:.2f} %"
                        for e in experts]))
    width = max(len(label) for label, _ in ratio_rows)
    for label, values in ratio_rows:
        print(f"{label:<{width}}  " + "  ".join(f"{value:>16}" for value in values))

    print()
    print("per-call workflow, as run here:")
    for note in ADAPTATIONS:
        print(f"- {note.format(monai=monai.__version__)}")
    print("- Weights are stand-ins: the real checkpoints are far larger, so the per-call workflow's "
          "config parsing + network build + checkpoint load share is a lower bound here.")


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="measured repeats per path (medians; default 3)")
    parser.add_argument("--quick", action="store_true", help="one repeat (about a minute on 2 CPU cores; the default takes about 2)")
    parser.add_argument("--tiny", action="store_true",
                        help="small stand-in bundles (4 mm, 64^3 windows) instead of the real sizes")
    parser.add_argument("--experts", default=",".join(EXPERTS), help="comma list of vista3d, brats (default both)")
    parser.add_argument("--group", default="hepatic tumor", help="VISTA3D label group (default 'hepatic tumor')")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--verbose", action="store_true", help="keep MONAI's log lines and warnings")
    parser.add_argument("--split-only", action="store_true", help="only the per-step split on the large CT")
    parser.add_argument("--split-shape", default="512,512,200", help="large CT size x,y,z (default 512,512,200)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the split (default 2)")
    args = parser.parse_args(argv)
    try:
        args.split_shape = tuple(int(v) for v in args.split_shape.split(","))
    except ValueError:
        parser.error("--split-shape takes three comma-separated integers")
    if len(args.split_shape) != 3 or min(args.split_shape) < 16:
        parser.error("--split-shape takes three sizes, each at least 16")
    if args.quick:
        args.repeats = 1
    args.experts = [name.strip().lower() for name in args.experts.split(",") if name.strip()]
    unknown = sorted(set(args.experts) - set(EXPERTS))
    if unknown or not args.experts:
        parser.error(f"--experts: unknown {unknown}; choose from {', '.join(EXPERTS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = None if args.device == "auto" else args.device
    device_text = describe_device(device)
    print(f"expert latency benchmark on {device_text}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vila-m3-bench-experts-") as tmp:
        work = Path(tmp)
        measure_split(args, device, work)
        if args.split_only:
            return
        start = time.perf_counter()
        generate_samples(work / "samples", seed=0)
        print(f"sample studies written in {time.perf_counter() - start:.1f} s", flush=True)
        models_dir = work / "models"
        manifest = ModelManifest.load()
        if "vista3d" in args.experts:
            make_tiny_vista3d_bundle(manifest[BUNDLE_IDS["vista3d"]].location(models_dir), real_sizes=not args.tiny)
        if "brats" in args.experts:
            make_tiny_brats_bundle(manifest[BUNDLE_IDS["brats"]].location(models_dir), real_sizes=not args.tiny)

        requests = make_requests(work / "samples", models_dir, args.experts, args.group)
        results: dict[str, Measurements] = {}
        for request in requests:
            began = time.perf_counter()
            print(f"measuring {DISPLAY[request.expert]} ...", flush=True)
            results[request.expert] = measure(request, models_dir, device, args.repeats, args.verbose, work)
            print(f"  done in {time.perf_counter() - began:.0f} s", flush=True)
        print_report(requests, results, args, device_text)


if __name__ == "__main__":
    main()
