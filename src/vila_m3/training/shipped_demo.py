"""The demo build shipped with the product: staged in seconds, and never apart from its recipe.

Building the demo (:mod:`vila_m3.training.demo`) takes about 40 minutes of two CPU cores, and CPUs with
other vector units sum in another order, so a build on the user's machine is slow and differs from one
machine to the next. The repository therefore ships one build, in ``demo/`` (a models directory's layout;
weights as safetensors, records as JSON; every file under 5 MB):

    demo/build.json                       the build record (below)
    demo/vila/Llama3-VILA-M3-8B/          the demo VLM, in the released VILA layout
    demo/bundles/vista3d/                 the VISTA3D stand-in trained on phantom CTs; models/model.safetensors
    demo/bundles/brats_mri_segmentation/  the BRATS stand-in trained on phantom brain MRIs

``build.json`` holds, per part, the *fingerprint* of the recipe it was built from (the same key a local
build is cached under: :func:`vila_m3.training.demo.demo_fingerprint` and the experts' fingerprints), its
results (the held-out table, the Dice on the sample studies) and build time; the digest of the data
engine's output for a probe of the demo's conversations (:func:`datagen_probe_digest`); the machine it
was built on (:func:`machine_record`); and the sha256 of every shipped file.

Staging (:func:`stage_shipped_part`) copies a part into the models directory when its fingerprint is the
current recipe's (a bundle's ``model.safetensors`` becomes the ``model.pt`` of the real bundle format);
otherwise the caller builds it as before. ``vila-m3 models demo-rebuild`` (``make demo-rebuild``)
builds everything again and compares it with the shipped build (:func:`compare_builds`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vila_m3.configs import DEFAULT_CONFIG_DIR
from vila_m3.training.record import file_sha256

__all__ = ["BUILD_RECORD", "SHIPPED_DEMO_DIR", "ShippedPart", "compare_builds", "cpu_profile", "current_fingerprints",
           "datagen_probe_digest", "machine_record", "read_build_record", "ship_build", "shipped_parts",
           "stage_shipped_part"]

#: The shipped build: the repository's ``demo/`` folder.
SHIPPED_DEMO_DIR: Path = DEFAULT_CONFIG_DIR.parent / "demo"
BUILD_RECORD = "build.json"
BUILD_FORMAT = "vila-m3-demo-build"
#: The bundle weights' file in the real format and as shipped.
BUNDLE_WEIGHTS = "models/model.pt"
SHIPPED_BUNDLE_WEIGHTS = "models/model.safetensors"
#: No shipped file may be larger (git handles small files well).
MAX_FILE_BYTES = 5 * 1024 * 1024
#: The demo's phantom seed whose conversations :func:`datagen_probe_digest` exports.
PROBE_SEED = 1
#: CPU features that decide which kernels torch, MKL and oneDNN pick (and so the order of their sums).
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl",
                "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "asimd", "sve")


#: The environment variables a CPU profile sets (``configs/demo_cpu_profiles.yaml``).
PROFILE_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpu_profile(name: str) -> dict[str, str]:
    """The environment of CPU profile ``name`` of ``configs/demo_cpu_profiles.yaml``; ValueError naming the
    profiles when there is none of that name. The variables are read when torch loads: set them before."""
    from vila_m3.configs import load_config

    profiles = load_config("demo_cpu_profiles.yaml")["profiles"]
    if name not in profiles:
        raise ValueError(f"unknown CPU profile {name!r}; configs/demo_cpu_profiles.yaml has {', '.join(profiles)}")
    return {str(key): str(value) for key, value in (profiles[name] or {}).items()}


@dataclass(frozen=True)
class ShippedPart:
    """One model of the shipped build: its name (``vlm``, ``vista3d``, ``brats``), manifest model id, folder
    (relative to ``demo/`` and to a models directory) and its entry of ``build.json``."""

    name: str
    model_id: str
    path: str
    record: Mapping[str, Any]

    @property
    def fingerprint(self) -> str:
        return str(self.record.get("fingerprint"))


def read_build_record(demo_dir: Path = SHIPPED_DEMO_DIR) -> dict[str, Any] | None:
    """``demo/build.json``, or None when there is no shipped build."""
    path = demo_dir / BUILD_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return record if record.get("format") == BUILD_FORMAT else None


def shipped_parts(demo_dir: Path = SHIPPED_DEMO_DIR) -> dict[str, ShippedPart]:
    """The parts of the shipped build by name (empty when nothing is shipped)."""
    record = read_build_record(demo_dir) or {}
    return {name: ShippedPart(name, str(entry["model_id"]), str(entry["path"]), entry)
            for name, entry in (record.get("parts") or {}).items()}


def current_fingerprints(overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The fingerprint of each part as the recipes in ``configs/`` (with ``overrides``) say now."""
    from vila_m3.training.demo import TRAINABLE_EXPERTS, demo_experts_config, demo_fingerprint

    overrides = dict(overrides or {})
    experts = demo_experts_config(overrides.pop("experts", None))
    prints = {"vlm": demo_fingerprint(overrides or None)}
    for task, expert in TRAINABLE_EXPERTS.items():
        if (experts.get(task) or {}).get("train", False):
            prints[task] = expert.fingerprint(experts[task])
    return prints


def datagen_probe_digest(work_dir: Path | None = None) -> str:
    """sha256 of the data engine's conversations for the demo on one phantom (seed :data:`PROBE_SEED`):
    the demo's datagen settings, training phrasings, ``train.json`` and ``val.json``. A change of the data
    engine that changes what the demo learns from changes this digest (about 10 s)."""
    from vila_m3.data.export import export_dataset
    from vila_m3.samples.annotated import annotated_studies
    from vila_m3.training.demo import demo_config, demo_datagen_config

    with tempfile.TemporaryDirectory(dir=work_dir, prefix="demo-probe-") as scratch:
        root = Path(scratch)
        studies = annotated_studies(root / "studies", seeds=(PROBE_SEED,), scratch=root / "samples")
        export_dataset(studies, root / "export", config=demo_datagen_config(demo_config()), progress=False,
                       phrasings="train")
        digest = hashlib.sha256()
        for name in ("train.json", "val.json"):
            digest.update(name.encode() + (root / "export" / name).read_bytes())
        return digest.hexdigest()


def machine_record() -> dict[str, Any]:
    """The machine a build ran on: CPU model and vector extensions, torch's kernel level, library versions."""
    from importlib import metadata

    import numpy
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("monai", "transformers", "tokenizers", "safetensors", "SimpleITK", "nibabel", "Pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu_profile": {name: os.environ[name] for name in PROFILE_VARIABLES if os.environ.get(name)},
        "cpu": model,
        "architecture": platform.machine(),
        "vector_extensions": [flag for flag in VECTOR_FLAGS if flag in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        "system": f"{platform.system()} {platform.release()}",
        "versions": versions,
    }


# ---- shipping a build ---------------------------------------------------------------------------

def _part_locations(overrides: Mapping[str, Any] | None = None) -> dict[str, tuple[str, str]]:
    """``{part: (manifest model id, path under a models directory)}`` of the demo's trained parts."""
    from vila_m3.configs import load_config
    from vila_m3.models.manifest import ModelManifest
    from vila_m3.training.demo import TRAINABLE_EXPERTS

    manifest = ModelManifest.load()
    vlm_id = load_config("app.yaml")["default_vlm"]
    locations = {"vlm": (vlm_id, manifest[vlm_id].path)}
    for task in current_fingerprints(overrides):
        if task != "vlm":
            model_id = TRAINABLE_EXPERTS[task].model_id
            locations[task] = (model_id, manifest[model_id].path)
    return locations


def _part_results(name: str, folder: Path) -> dict[str, Any]:
    """What a built part measured, from its own records: the held-out table (VLM) or the Dice (stand-ins)."""
    if name == "vlm":
        from vila_m3.training.demo import DEMO_EVALUATION

        evaluation = json.loads((folder / DEMO_EVALUATION).read_text(encoding="utf-8"))
        record = folder / "training_record.json"
        metrics = json.loads(record.read_text(encoding="utf-8")).get("metrics", {}) if record.is_file() else {}
        return {"evaluation": evaluation, "train_loss": metrics.get("train_loss"), "eval_loss": metrics.get("eval_loss")}
    from vila_m3.training.stand_in_training import TRAINING_RECORD

    record = json.loads((folder / TRAINING_RECORD).read_text(encoding="utf-8"))
    names = record.get("learned", {})
    return {"dice": {names.get(k, k): v for k, v in record.get("heldout_dice", {}).items()},
            "loss_first": record.get("loss_first"), "loss_last": record.get("loss_last")}


def _build_marker(name: str, folder: Path) -> Path:
    """Where a staged part records its build (fingerprint, seconds): the checkpoint's ``demo_build.json``,
    a bundle's ``docs/demo_build.json``."""
    from vila_m3.training.demo import DEMO_BUILD

    return folder / DEMO_BUILD if name == "vlm" else folder / "docs" / DEMO_BUILD


def _build_seconds(name: str, folder: Path) -> float | None:
    path = _build_marker(name, folder)
    return json.loads(path.read_text(encoding="utf-8")).get("seconds") if path.is_file() else None


def ship_build(models_dir: Path, out_dir: Path, machine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the demo parts built in ``models_dir`` as a shipped build into ``out_dir`` (replaced).

    Bundle weights are converted from ``model.pt`` to safetensors; nothing else changes. ``machine``: the
    build machine's record (default: this machine's). Returns the build record written.

    Raises:
        ValueError: a part is missing, is not a demo build of the current recipe, or a file exceeds 5 MB.
    """
    from safetensors.torch import save_file

    from vila_m3.training.demo import DEMO_BUILD

    fingerprints = current_fingerprints()
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        parts: dict[str, Any] = {}
        for name, (model_id, relative) in _part_locations().items():
            source = models_dir / relative
            marker = _build_marker(name, source)
            if not marker.is_file():
                raise ValueError(f"{name}: no demo build at {source}")
            if json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") != fingerprints[name]:
                raise ValueError(f"{name}: the build at {source} is not of the current recipe")
            target = staging / relative
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(DEMO_BUILD, "__pycache__"))
            kept = _kept_part(name, marker)
            if name != "vlm":
                _drop_package_scripts(name, target)
                weights = target / BUNDLE_WEIGHTS
                state = _load_state(weights)
                save_file(state, str(target / SHIPPED_BUNDLE_WEIGHTS))
                weights.unlink()
            parts[name] = kept or {"model_id": model_id, "path": relative, "fingerprint": fingerprints[name],
                                   "build_seconds": _build_seconds(name, source), **_part_results(name, source)}
        files = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"{path.relative_to(staging)} is {path.stat().st_size / 1e6:.1f} MB; shipped "
                                 f"files must stay under {MAX_FILE_BYTES / 1e6:.0f} MB")
            files[str(path.relative_to(staging))] = file_sha256(path)
        record = {"format": BUILD_FORMAT, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "machine": dict(machine or machine_record()), "datagen_probe": datagen_probe_digest(),
                  "parts": parts, "files": files,
                  "total_bytes": sum((staging / f).stat().st_size for f in files)}
        (staging / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
        return record
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _drop_package_scripts(name: str, bundle: Path) -> None:
    """Remove a bundle's ``scripts/`` from a build being shipped: they are the package's own files
    (:func:`vila_m3.standins.tiny_bundles.bundle_scripts`), which staging writes back.

    Raises:
        ValueError: the bundle's scripts are not the package's (they would be lost).
    """
    from vila_m3.standins.tiny_bundles import bundle_scripts

    scripts = bundle / "scripts"
    if not scripts.is_dir():
        return
    written = {path.name: path.read_bytes() for path in scripts.iterdir() if path.is_file()}
    if written != bundle_scripts(name):
        raise ValueError(f"{name}: the bundle's scripts/ are not those of vila_m3/standins/bundle_scripts/{name}/")
    shutil.rmtree(scripts)


def _kept_part(name: str, marker: Path) -> dict[str, Any] | None:
    """The shipped build's entry of a part that a partial rebuild kept (staged from ``demo/``, not built
    here), with the machine that built it; None for a part built here."""
    if not json.loads(marker.read_text(encoding="utf-8")).get("shipped"):
        return None
    shipped = read_build_record() or {}
    entry = (shipped.get("parts") or {}).get(name)
    if entry is None:
        raise ValueError(f"{name}: staged from a shipped build that no longer lists it")
    return {**entry, "kept_from_build": entry.get("kept_from_build") or shipped.get("built"),
            "machine": entry.get("machine") or shipped.get("machine")}


def _load_state(path: Path) -> dict[str, Any]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value.contiguous() for key, value in state.items()}


# ---- staging the shipped build --------------------------------------------------------------------

def stage_shipped_part(name: str, location: Path, fingerprint: str, demo_dir: Path = SHIPPED_DEMO_DIR) -> bool:
    """Copy shipped part ``name`` to ``location`` (a models directory's place for it) when the shipped build
    of it has ``fingerprint``; False (nothing changed) when it is not shipped or is of another recipe.

    The copy is written beside ``location`` and renamed into place, so a stopped copy leaves nothing half
    written; a stand-in already there is replaced (the caller never calls this over real weights).
    """
    import torch
    from safetensors.torch import load_file

    from vila_m3.standins.tiny_bundles import bundle_scripts

    part = shipped_parts(demo_dir).get(name)
    if part is None or part.fingerprint != fingerprint or not (demo_dir / part.path).is_dir():
        return False
    location.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=location.parent, prefix=f".{location.name}-"))
    try:
        target = staging / "part"
        shutil.copytree(demo_dir / part.path, target)
        marker = _build_marker(name, target)
        if name != "vlm":
            shipped = target / SHIPPED_BUNDLE_WEIGHTS
            torch.save(load_file(str(shipped)), target / BUNDLE_WEIGHTS)
            shipped.unlink()
            scripts = bundle_scripts(name)  # not shipped: the package's own files (see ship_build)
            if scripts:
                (target / "scripts").mkdir(exist_ok=True)
            for script, content in scripts.items():
                (target / "scripts" / script).write_bytes(content)
        marker.write_text(json.dumps({"fingerprint": fingerprint, "shipped": True,
                                      "seconds": part.record.get("build_seconds")}, indent=2) + "\n",
                          encoding="utf-8")
        if location.exists():
            shutil.rmtree(location)
        target.rename(location)
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- comparing a rebuild with the shipped build -----------------------------------------------------

def _weights(record: Mapping[str, Any], parts: set[str] | None = None) -> dict[str, str]:
    """The weight files' digests by path, of ``parts`` only when given."""
    folders = [str(entry.get("path", "")) + "/" for name, entry in (record.get("parts") or {}).items()
               if parts is None or name in parts]
    return {name: digest for name, digest in record.get("files", {}).items()
            if name.endswith(".safetensors") and (parts is None or any(name.startswith(f) for f in folders))}


def _rebuilt_parts(record: Mapping[str, Any]) -> set[str]:
    """The parts a build made itself (a partial rebuild keeps the others from the shipped build)."""
    return {name for name, entry in (record.get("parts") or {}).items() if not entry.get("kept_from_build")}


def _vlm_rows(part: Mapping[str, Any]) -> dict[str, str]:
    from vila_m3.training.evaluation import percent_text

    evaluation = part.get("evaluation") or {}
    return {name: percent_text(evaluation.get(key)) for name, key in (
        ("right expert and argument", "trigger_accuracy"), ("expert called without need", "false_call_rate"),
        ("yes/no answers right after the expert", "yes_no_accuracy"))}


def compare_builds(shipped: Mapping[str, Any], rebuilt: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether a rebuild equals the shipped build to the bit (its weight files), and a text saying how they
    compare: equal bits, or the held-out table and the Dice side by side, with both machines."""
    rebuilt_parts = _rebuilt_parts(rebuilt)
    kept = sorted(set(rebuilt.get("parts") or {}) - rebuilt_parts)
    only = rebuilt_parts if kept else None
    shipped_weights, rebuilt_weights = _weights(shipped, only), _weights(rebuilt, only)
    equal = bool(shipped_weights) and shipped_weights == rebuilt_weights
    lines = []
    if kept:
        lines.append(f"rebuilt: {', '.join(sorted(rebuilt_parts))}; kept from the shipped build: {', '.join(kept)}")
    if equal:
        lines.append(f"the rebuild equals the shipped build to the bit ({len(shipped_weights)} weight files)")
    else:
        differ = sorted(name for name in set(shipped_weights) | set(rebuilt_weights)
                        if shipped_weights.get(name) != rebuilt_weights.get(name))
        lines.append(f"the rebuild differs from the shipped build in {len(differ)} of {len(shipped_weights)} weight "
                     f"files: {', '.join(differ)}")
    rows: list[tuple[str, str, str]] = [("", "shipped", "rebuilt")]
    for side in ("cpu", "torch_cpu_capability", "cpu_profile"):
        rows.append((side.replace("_", " "), _text(shipped.get("machine", {}).get(side)),
                     _text(rebuilt.get("machine", {}).get(side))))
    for name in sorted(set(shipped.get("parts", {})) | set(rebuilt.get("parts", {}))):
        left, right = shipped.get("parts", {}).get(name, {}), rebuilt.get("parts", {}).get(name, {})
        if name == "vlm":
            left_rows, right_rows = _vlm_rows(left), _vlm_rows(right)
            rows += [(f"demo VLM: {key}", left_rows[key], right_rows[key]) for key in left_rows]
        else:
            for label in sorted(set(left.get("dice", {})) | set(right.get("dice", {}))):
                rows.append((f"{name} Dice: {label}", _num(left.get("dice", {}).get(label)),
                             _num(right.get("dice", {}).get(label))))
        rows.append((f"{name}: build time (s)", _num(left.get("build_seconds"), 0), _num(right.get("build_seconds"), 0)))
    width = max(len(row[0]) for row in rows)
    column = max(len(value) for row in rows for value in row[1:])
    lines += [f"{a:<{width}}  {b:>{column}}  {c:>{column}}" for a, b, c in rows]
    return equal, "\n".join(lines)


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "native"
    return str(value)


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


# ---- rebuilding -----------------------------------------------------------------------------------

def _train_expert(models_dir: str, task: str) -> str:
    """One trained stand-in built in ``models_dir`` (a worker process of :func:`rebuild`)."""
    from vila_m3.training.demo import TRAINABLE_EXPERTS, _stage_trained_expert, demo_experts_config

    config = demo_experts_config()
    line = _stage_trained_expert(Path(models_dir), task, config[task], True, print)
    return f"{TRAINABLE_EXPERTS[task].model_id}: {line}"


def rebuild(work_dir: Path, log: Any = print, progress: bool = True,
            parts: Sequence[str] | None = None) -> dict[str, Any]:
    """Build the demo again from the recipes in ``work_dir`` (replaced) and write it as a shipped build
    into ``work_dir/demo``; returns its build record. The stand-ins train side by side (one CPU thread each,
    as their recipes say), then the VLM (on its recipe's ``cpu_threads``).

    Args:
        parts: the parts to build (``vlm``, ``vista3d``, ``brats``; default all). The others are taken from
            the shipped build, which must then be of their current recipes; the record says which were kept.

    Raises:
        ValueError: an unknown part, or a kept part whose shipped build is not of its current recipe.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from vila_m3.training.demo import stage_demo_vlm

    fingerprints = current_fingerprints()
    wanted = list(fingerprints) if not parts else list(dict.fromkeys(parts))
    unknown = sorted(set(wanted) - set(fingerprints))
    if unknown:
        raise ValueError(f"no demo part named {', '.join(unknown)}; the parts are {', '.join(fingerprints)}")
    if work_dir.exists():
        shutil.rmtree(work_dir)
    models = work_dir / "models"
    models.mkdir(parents=True)
    for name, (_model_id, relative) in _part_locations().items():
        if name not in wanted and not stage_shipped_part(name, models / relative, fingerprints[name]):
            raise ValueError(f"{name}: the shipped build is not of its current recipe; rebuild it too "
                             f"(--parts {','.join([*wanted, name])})")
    tasks = [task for task in wanted if task != "vlm"]
    log(f"rebuilding {', '.join(wanted)} of the demo in {work_dir}"
        + (f"; kept from the shipped build: {', '.join(p for p in fingerprints if p not in wanted)}"
           if len(wanted) < len(fingerprints) else "")
        + (" (about 40 min on two CPU cores)" if len(wanted) == len(fingerprints) else ""))
    if tasks:
        log(f"the {', '.join(tasks)} stand-ins side by side")
        with ProcessPoolExecutor(max_workers=len(tasks), mp_context=get_context("spawn")) as pool:
            for line in pool.map(_train_expert, [str(models)] * len(tasks), tasks):
                log(line)
    if "vlm" in wanted:
        log(stage_demo_vlm(models, rebuild=True, progress=progress, log=log))
    return ship_build(models, work_dir / "demo")


def replace_shipped(built: Path, demo_dir: Path = SHIPPED_DEMO_DIR) -> None:
    """Make the build in ``built`` (a folder written by :func:`ship_build`) the shipped one."""
    if read_build_record(built) is None:
        raise ValueError(f"{built} holds no demo build")
    if demo_dir.exists():
        shutil.rmtree(demo_dir)
    shutil.copytree(built, demo_dir)
