"""Stage tiny random stand-ins at the manifest's locations, so the server, the tests and an offline
demo run every code path of the real models without the real weights.

Every stand-in is marked as such on disk (a ``vila_m3_stand_in`` field or marker file), and every
answer produced with one says so (``stand_in: true`` and a notice).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from vila_m3.models.manifest import ModelManifest

STAND_IN_TASKS = ("vista3d", "brats", "cxr", "vila_m3")


def stage_stand_ins(models_dir: Path, tasks: tuple[str, ...] = STAND_IN_TASKS, vlm_id: str = "vila_m3_8b",
                    seed: int = 0, manifest: ModelManifest | None = None) -> list[Path]:
    """Write stand-ins for ``tasks`` under ``models_dir``; returns the folders/files written. A task may also be
    the id of a manifest model whose entry names its ``stand_in`` writer (``package.module:function``, called
    with the model's location and ``seed``), e.g. a model of an extra experts file.

    Refuses (ValueError) to write where something that is not a stand-in already lies.
    """
    manifest = manifest or ModelManifest.load()
    written: list[Path] = []
    for task in tasks:
        if task == "vista3d":
            from vila_m3.standins.tiny_bundles import make_tiny_vista3d_bundle

            written.append(make_tiny_vista3d_bundle(_fresh(manifest["vista3d"].location(models_dir)), seed=seed))
        elif task == "brats":
            from vila_m3.standins.tiny_bundles import make_tiny_brats_bundle

            location = _fresh(manifest["brats_mri_segmentation"].location(models_dir))
            written.append(make_tiny_brats_bundle(location, seed=seed))
        elif task == "cxr":
            from vila_m3.standins.stand_in_xrv import make_stand_in_xrv_weights

            written.extend(make_stand_in_xrv_weights(models_dir, seed=seed, manifest=manifest))
        elif task == "vila_m3":
            from vila_m3.standins.tiny_vila import make_tiny_vila_checkpoint

            entry = manifest[vlm_id]
            template = "llama_3" if vlm_id == "vila_m3_8b" else "vicuna_v1"
            written.append(make_tiny_vila_checkpoint(_fresh(entry.location(models_dir)), template=template, seed=seed))
        elif task in manifest.entries and manifest[task].stand_in:
            module, _, function = manifest[task].stand_in.partition(":")
            writer = getattr(importlib.import_module(module), function)
            written.append(writer(_fresh(manifest[task].location(models_dir)), seed=seed))
        else:
            raise ValueError(f"no stand-in for task '{task}'; stand-ins exist for {', '.join(STAND_IN_TASKS)}")
    return written


def _fresh(location: Path) -> Path:
    """``location`` if it is empty, absent, or already a stand-in; refuses to overwrite real weights."""
    if location.exists() and any(location.iterdir()):
        marker_files = [location / "configs" / "metadata.json", location / "config.json"]
        if not any(path.is_file() and "vila_m3_stand_in" in path.read_text(encoding="utf-8") for path in marker_files):
            raise ValueError(f"{location} holds something that is not a stand-in; not overwriting it")
    return location
