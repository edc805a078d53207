"""Fine-tuned versions of the chat's VLM, kept side by side; one of them (or the base) is served.

Layout under the models directory::

    finetuned/<vlm_id>/versions.json     {"current": "v0002" | null, "versions": [{"id", "created", ...}]}
    finetuned/<vlm_id>/v0001/            a training run (vila_m3.training.trainer): model/ is the checkpoint
    finetuned/<vlm_id>/v0002/ ...

``current`` null means the base checkpoint (the manifest's location) is served. Versions are never
deleted by training; switching back is a matter of setting ``current``. ``versions.json`` is replaced
atomically, so a server reading it never sees half a file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vila_m3.training.layout import MODEL_DIR

__all__ = ["BASE", "ModelVersions", "VersionError"]

BASE = "base"
_VERSION = re.compile(r"^v(\d{4,})$")
_LOCK = threading.Lock()


class VersionError(ValueError):
    """An unknown version, or a version folder without a finished checkpoint."""


@dataclass(frozen=True)
class ModelVersions:
    """The fine-tuned versions of one VLM (``vlm_id``) under ``models_dir``."""

    models_dir: Path
    vlm_id: str

    @property
    def root(self) -> Path:
        return Path(self.models_dir) / "finetuned" / self.vlm_id

    @property
    def index_path(self) -> Path:
        return self.root / "versions.json"

    def read(self) -> dict[str, Any]:
        """The index (``current`` and ``versions``); an empty one when nothing was trained yet."""
        if not self.index_path.is_file():
            return {"current": None, "versions": []}
        return json.loads(self.index_path.read_text(encoding="utf-8"))

    def _write(self, index: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=self.root, prefix=".versions.", suffix=".json")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(index, out, indent=2)
            out.write("\n")
        os.replace(temporary, self.index_path)

    def current(self) -> str | None:
        """The served version's id, or None for the base checkpoint."""
        return self.read().get("current")

    def checkpoint(self, version: str | None = None) -> Path | None:
        """The checkpoint folder of ``version`` (default: the current one); None for the base."""
        version = self.current() if version is None else version
        if version in (None, BASE):
            return None
        folder = self.root / version / MODEL_DIR
        if not (folder / "config.json").is_file():
            raise VersionError(f"version {version} has no finished checkpoint at {folder}")
        return folder

    def reserve(self) -> tuple[str, Path]:
        """A new version id and its (created, empty) run folder: ``v0001``, ``v0002``, ..."""
        with _LOCK:
            self.root.mkdir(parents=True, exist_ok=True)
            numbers = [int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION.match(p.name))]
            version = f"v{max(numbers, default=0) + 1:04d}"
            run = self.root / version
            run.mkdir()
            return version, run

    def register(self, version: str, summary: dict[str, Any], make_current: bool = True) -> None:
        """Add a finished version (its run folder holds ``model/``) and, by default, serve it."""
        self.checkpoint(version)  # must be complete
        with _LOCK:
            index = self.read()
            index["versions"] = [v for v in index["versions"] if v.get("id") != version]
            index["versions"].append({"id": version, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                      **summary})
            if make_current:
                index["current"] = version
            self._write(index)

    def use(self, version: str) -> None:
        """Serve ``version`` (or ``base``) from now on."""
        with _LOCK:
            index = self.read()
            known = [v.get("id") for v in index["versions"]]
            if version != BASE and version not in known:
                raise VersionError(f"unknown version {version!r}; known: {', '.join([BASE, *known])}")
            if version != BASE:
                self.checkpoint(version)
            index["current"] = None if version == BASE else version
            self._write(index)
