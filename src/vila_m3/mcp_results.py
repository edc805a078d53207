"""Where ``vila-m3 mcp`` keeps its segmentation results: the newest N on disk, private to the user.

A result is two files in the results folder: ``<id>.nii.gz`` (the labelmap as the server sent it) and
``<id>.json`` (the summary given with it, the owner digest of the token that made it, when it was made), the
JSON written last so that a result is complete once it is listed. The folder is the index: a new MCP server
process (a client that spawns ``vila-m3 mcp`` again, a restart) reads the results of the earlier ones, and
processes that share the folder see each other's results. After each new result only the newest ``keep`` stay.

The folder is the user's choice (``vila-m3 mcp --results-dir``, ``$VILA_M3_MCP_RESULTS``, ``configs/tools.yaml``
``mcp.results_dir``), by default a cache folder of the user (``$XDG_CACHE_HOME/vila-m3/mcp-results``, else
``~/.cache/vila-m3/mcp-results``), never the repository. Labelmaps are patient data: the folder is made
``0700`` and the files ``0600`` (readable by the user only). Result ids are 12 hex digits; nothing else is ever
turned into a file name.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_ENV = "VILA_M3_MCP_RESULTS"
RESULT_SCHEME = "vila-m3"
_RESULT_ID = re.compile(r"[0-9a-f]{12}\Z")
_LABELMAP = ".nii.gz"
_META = ".json"


def default_results_dir() -> Path:
    """The user's cache folder for MCP results: ``$XDG_CACHE_HOME/vila-m3/mcp-results`` or
    ``~/.cache/vila-m3/mcp-results``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "vila-m3" / "mcp-results"


@dataclass(frozen=True)
class StoredResult:
    """A kept segmentation result: its labelmap file, the summary given with it, and whose it is (the owner
    digest of the token it was made with: only calls with that token see it).

    Attributes:
        result_id: 12 hex digits.
        path: the labelmap file (NIfTI, gzip) in the results folder.
        summary: the JSON the segmentation tool answered with.
        owner: :func:`vila_m3.mcp_server.owner_of` of the token.
        created: when it was kept (seconds since the epoch).
    """

    result_id: str
    path: Path
    summary: Mapping[str, Any]
    owner: str
    created: float

    @property
    def uri(self) -> str:
        return f"{RESULT_SCHEME}://results/{self.result_id}/labelmap.nii.gz"

    @property
    def data(self) -> bytes:
        """The labelmap's bytes (read now)."""
        return self.path.read_bytes()

    @property
    def size(self) -> int:
        """The labelmap's size in bytes."""
        return self.path.stat().st_size


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a ``0600`` file, whole or not at all (a temporary file, then a rename)."""
    partial = path.with_name(path.name + ".part")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
        os.chmod(partial, 0o600)  # an existing .part file keeps its mode through O_CREAT
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class ResultStore:
    """The newest ``keep`` segmentation results in a private folder (see the module doc).

    Args:
        folder: where to keep them; None: :func:`default_results_dir`. Made (with its parents) if missing, and
            set to ``0700``.
        keep: how many results stay (at least 1).

    Raises:
        ValueError: ``keep`` below 1. OSError: the folder cannot be made or made private.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None, keep: int = 32) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder = Path(folder).expanduser() if folder else default_results_dir()
        self.keep = int(keep)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)

    def put(self, result_id: str, data: bytes, summary: Mapping[str, Any], owner: str) -> StoredResult:
        """Keep a result (the labelmap's bytes and its summary); the oldest beyond ``keep`` are removed."""
        if not _RESULT_ID.match(result_id):
            raise ValueError("a result id is 12 hex digits")
        path = self.folder / f"{result_id}{_LABELMAP}"
        created = time.time()
        _write_private(path, data)
        meta = {"summary": dict(summary), "owner": owner, "created": created}
        _write_private(self.folder / f"{result_id}{_META}", json.dumps(meta).encode("utf-8"))
        self._prune()
        return StoredResult(result_id, path, dict(summary), owner, created)

    def get(self, result_id: Any) -> StoredResult | None:
        """The kept result ``result_id``, or None (not a result id, never kept, removed, or unreadable)."""
        if not isinstance(result_id, str) or not _RESULT_ID.match(result_id):
            return None
        path = self.folder / f"{result_id}{_LABELMAP}"
        try:
            meta = json.loads((self.folder / f"{result_id}{_META}").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not path.is_file() or not isinstance(meta, dict) or not isinstance(meta.get("summary"), dict):
            return None
        return StoredResult(result_id, path, meta["summary"], str(meta.get("owner", "")),
                            float(meta.get("created", 0.0)))

    def newest_first(self) -> list[StoredResult]:
        """Every kept result, the newest first."""
        kept = [self.get(path.name[:-len(_META)]) for path in self.folder.glob(f"*{_META}")]
        return sorted((result for result in kept if result is not None),
                      key=lambda result: (result.created, result.result_id), reverse=True)

    def _prune(self) -> None:
        for result in self.newest_first()[self.keep:]:
            (self.folder / f"{result.result_id}{_META}").unlink(missing_ok=True)  # unlisted first
            result.path.unlink(missing_ok=True)
