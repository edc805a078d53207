"""The manifest of model weights (``configs/models.yaml``): where each model comes from, where it
goes under the models directory, and whether it is there.

The models directory is resolved in this order: an explicit argument (``--conf models_dir`` on the
server, ``--models-dir`` on the command line), the ``VILA_M3_MODELS_DIR`` environment variable, and
finally ``./models`` under the current directory.

An extra experts file (``$VILA_M3_EXPERTS``, see :mod:`vila_m3.experts.registry`) may carry the entries
of its own models in a ``models:`` mapping of the same format; they join the manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from vila_m3.configs import load_config

MODELS_DIR_ENV = "VILA_M3_MODELS_DIR"
#: Environment variable: extra experts files (``os.pathsep``-separated); their ``models:`` join the manifest.
EXPERTS_ENV = "VILA_M3_EXPERTS"
STAND_IN_FIELD = "vila_m3_stand_in"  # in a stand-in's config.json / configs/metadata.json
STAND_IN_MARKER = "VILA_M3_STAND_IN.txt"  # beside stand-in single-file weights
XRV_FOLDER = "torchxrayvision"
"""Folder under the models directory that holds the TorchXRayVision weight files (xrv's ``cache_dir``)."""


def env_experts_files() -> tuple[Path, ...]:
    """The extra experts files of ``$VILA_M3_EXPERTS`` (``os.pathsep``-separated; empty entries ignored)."""
    return tuple(Path(p).expanduser() for p in os.environ.get(EXPERTS_ENV, "").split(os.pathsep) if p.strip())


def resolve_models_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The models directory: ``explicit``, else ``$VILA_M3_MODELS_DIR``, else ``./models``."""
    chosen = explicit or os.environ.get(MODELS_DIR_ENV) or "models"
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class ModelEntry:
    """One model of the manifest: its id, what it is, where it comes from and where it goes."""

    model_id: str
    description: str
    kind: str
    source: dict[str, str]
    path: str
    required: tuple[str, ...] = field(default_factory=tuple)
    sha256: dict[str, str] = field(default_factory=dict)
    stand_in: str = ""
    """``package.module:function`` that writes a stand-in at the model's location (``vila-m3 models stand-ins``)."""

    @property
    def is_single_file(self) -> bool:
        """True when ``path`` is one weight file rather than a folder."""
        return not self.required

    def location(self, models_dir: Path) -> Path:
        """The model's folder or file under ``models_dir``."""
        return models_dir / self.path

    def is_stand_in(self, models_dir: Path) -> bool:
        """True when what is staged is a stand-in (random or demo weights; its config or a marker file says so)."""
        return self.stand_in_note(models_dir) is not None

    def stand_in_note(self, models_dir: Path) -> str | None:
        """What the staged stand-in is, in its own words (``vila_m3_stand_in``); None for real weights."""
        root = self.location(models_dir)
        if self.is_single_file:
            marker = root.parent / STAND_IN_MARKER
            if not marker.is_file():
                return None
            lines = marker.read_text(encoding="utf-8", errors="replace").splitlines()
            return lines[0].strip() if lines and lines[0].strip() else "stand-in weights"
        for config in (root / "config.json", root / "configs" / "metadata.json"):
            if config.is_file():
                try:
                    note = json.loads(config.read_text(encoding="utf-8", errors="replace")).get(STAND_IN_FIELD)
                except (ValueError, AttributeError):
                    continue
                if note:
                    return str(note)
        return None

    def missing_files(self, models_dir: Path) -> list[Path]:
        """Required files that are not present under ``models_dir``; empty when the model is ready."""
        root = self.location(models_dir)
        if not self.required:
            return [] if root.exists() else [root]
        return [root / name for name in self.required if not (root / name).is_file()]


@dataclass(frozen=True)
class ModelManifest:
    """All models the product can use, keyed by model id."""

    entries: dict[str, ModelEntry]

    @classmethod
    def load(cls, config: dict | None = None) -> ModelManifest:
        """Build the manifest from ``configs/models.yaml`` and the ``models:`` of ``$VILA_M3_EXPERTS``'s files
        (or from an already loaded mapping only). ValueError: an experts file repeats a model id."""
        if config is None:
            config = load_config("models.yaml")
            models = dict(config["models"])
            for path in env_experts_files():
                for model_id, spec in (load_config(path.resolve()).get("models") or {}).items():
                    if model_id in models:
                        raise ValueError(f"experts file {path.name}: model id '{model_id}' is already in the manifest")
                    models[model_id] = spec
            config = {**config, "models": models}
        entries = {
            model_id: ModelEntry(
                model_id=model_id,
                description=str(spec.get("description", "")),
                kind=str(spec["kind"]),
                source=dict(spec.get("source", {})),
                path=str(spec["path"]),
                required=tuple(spec.get("required", ())),
                sha256=dict(spec.get("sha256") or {}),
                stand_in=str(spec.get("stand_in") or ""),
            )
            for model_id, spec in config["models"].items()
        }
        return cls(entries)

    def __getitem__(self, model_id: str) -> ModelEntry:
        try:
            return self.entries[model_id]
        except KeyError:
            valid = ", ".join(sorted(self.entries))
            raise KeyError(f"unknown model id '{model_id}'; the manifest has: {valid}") from None

    def missing(self, model_ids: list[str] | tuple[str, ...], models_dir: Path) -> list[Path]:
        """Every required file of ``model_ids`` that is absent under ``models_dir``."""
        return [path for model_id in model_ids for path in self[model_id].missing_files(models_dir)]
