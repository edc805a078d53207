"""The training record written with every fine-tuned checkpoint: what was trained on what, how, and how it went."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

from vila_m3 import __version__
from vila_m3.training.options import TrainingOptions

__all__ = ["RECORD_FORMAT", "RECORD_NAME", "build_record", "file_sha256", "read_record"]

RECORD_NAME = "training_record.json"
RECORD_FORMAT = "vila-m3-training-record"


def file_sha256(path: Path) -> str | None:
    """sha256 of a file's bytes (None when it does not exist)."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The training record of a checkpoint or run folder, or None."""
    path = Path(folder) / RECORD_NAME
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def build_record(base: Path, data: Path, options: TrainingOptions, metrics: dict[str, Any], started: float,
                 finished: float, resumed_from: Path | None = None, world_size: int = 1) -> dict[str, Any]:
    """The record: base checkpoint (and its own record: the lineage), data hashes, settings, metrics.

    Args:
        base: the checkpoint fine-tuned.
        data: the export trained on; its ``manifest.json``, ``train.json`` and ``val.json`` are hashed.
        options: the hyper-parameters.
        metrics: losses, steps, record counts, the log history.
        started, finished: wall-clock times (seconds since the epoch).
        resumed_from: the step checkpoint the run continued from.
        world_size: number of processes that trained.
    """
    import torch
    import transformers

    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    return {
        "format": RECORD_FORMAT,
        "format_version": 1,
        "base_checkpoint": {
            "path": str(base.resolve()),
            "config_sha256": file_sha256(base / "config.json"),
            "record": read_record(base),
        },
        "data": {
            "path": str(data.resolve()),
            "manifest_sha256": file_sha256(manifest_path),
            "train_sha256": file_sha256(data / "train.json"),
            "val_sha256": file_sha256(data / "val.json"),
            "config_sha256": manifest.get("config_sha256"),
            "seed": manifest.get("seed"),
        },
        "hyperparameters": options.as_dict(),
        "metrics": metrics,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "started": _iso(started),
        "finished": _iso(finished),
        "seconds": round(finished - started, 3),
        "world_size": world_size,
        "software": {
            "vila_m3": __version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
