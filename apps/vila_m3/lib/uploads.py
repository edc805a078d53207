"""The app's own folders for a request's files: uploads in, results out.

Everything a request writes lives under ``<app_dir>/tmp/``, never in the system temp folder:

- ``<app_dir>/tmp/uploads/``: what a client sends to ``/infer`` and ``PUT /session/``, under a unique
  server-made name (only a known suffix such as ``.nii.gz`` is taken from the client's file name);
- ``<app_dir>/tmp/results/``: result files sent back, under a unique name, so a client on the same machine
  that saves a result under the server's file name (MONAI Label's ``MONAILabelClient`` does, in its own temp
  folder) never shares a file with the server.

Each request removes its files whatever the outcome (``RequestFiles``); what a crash leaves behind is
removed at start-up (``clear``). ``UPLOADS_SUBDIR`` tells the datastore checks which folder holds uploads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fastapi import HTTPException

logger = logging.getLogger(__name__)

UPLOADS_SUBDIR = Path("tmp") / "uploads"
RESULTS_SUBDIR = Path("tmp") / "results"
CHUNK_BYTES = 1024 * 1024
TOO_LARGE = 413

# Suffixes taken from a client's file name; longest first, so ``.nii.gz`` wins over ``.gz``.
SAFE_SUFFIXES: tuple[str, ...] = tuple(sorted(
    (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg", ".zip", ".bin",
     ".json", ".gz"),
    key=len, reverse=True,
))
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def upload_dir(app_dir: str | os.PathLike[str]) -> Path:
    """``<app_dir>/tmp/uploads``: the only folder outside the datastore and sessions that holds client files."""
    return Path(app_dir).resolve() / UPLOADS_SUBDIR


def results_dir(app_dir: str | os.PathLike[str]) -> Path:
    """``<app_dir>/tmp/results``: result files on their way to the client."""
    return Path(app_dir).resolve() / RESULTS_SUBDIR


def safe_suffix(filename: str | None, default: str = "") -> str:
    """The known suffix that ``filename`` ends with (case-insensitive, returned lower case), else ``default``."""
    name = (filename or "").lower()
    return next((suffix for suffix in SAFE_SUFFIXES if name.endswith(suffix)), default)


def safe_name(filename: str | None, fallback: str) -> str:
    """A plain file name from a client's ``filename``: its last path part if that is made only of letters,
    digits, ``.``, ``_`` and ``-`` and does not start with a dot; else ``fallback`` plus its known suffix."""
    base = re.split(r"[\\/]", filename or "")[-1]
    if _SAFE_NAME.fullmatch(base) and ".." not in base:
        return base
    return f"{fallback}{safe_suffix(base)}"


def unique_path(folder: Path, suffix: str) -> Path:
    """A new, unused path in ``folder`` (made if missing) named by a random UUID plus ``suffix``."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{uuid.uuid4().hex}{suffix}"


def too_large(limit_bytes: int) -> HTTPException:
    """The 413 answer for an upload over ``limit_bytes``."""
    return HTTPException(TOO_LARGE, f"upload too large: the limit is {limit_bytes / 2**20:g} MB")


def copy_limited(source: BinaryIO, target: Path, limit_bytes: int) -> int:
    """Stream ``source`` into the new file ``target`` in 1 MB chunks; returns the bytes written.

    Raises HTTP 413 (and removes ``target``) as soon as more than ``limit_bytes`` arrive.
    """
    written = 0
    try:
        with open(target, "xb") as out:
            while chunk := source.read(CHUNK_BYTES):
                written += len(chunk)
                if written > limit_bytes:
                    raise too_large(limit_bytes)
                out.write(chunk)
    except BaseException:
        remove(target)
        raise
    return written


def remove(path: str | os.PathLike[str] | None) -> None:
    """Remove a file or folder if it exists; never raises (a failure is logged)."""
    if not path:
        return
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
    except OSError as err:
        logger.warning("could not remove a temporary file: %s", err)


def clear(folder: Path, older_than_s: float = 0.0) -> int:
    """Remove the entries of ``folder`` last modified more than ``older_than_s`` seconds ago; returns how many."""
    if not folder.is_dir():
        return 0
    now = time.time()
    removed = 0
    for entry in folder.iterdir():
        with contextlib.suppress(OSError):
            if now - entry.lstat().st_mtime >= older_than_s:
                remove(entry)
                removed += 1
    return removed


class RequestFiles:
    """The temporary files of one request, removed together by ``cleanup`` (call it in ``finally``)."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def add(self, path: str | os.PathLike[str] | None) -> None:
        if path:
            self.paths.append(os.fspath(path))

    def release(self, path: str | os.PathLike[str]) -> None:
        """Stop tracking ``path``: its removal is someone else's now (e.g. a response's background task)."""
        with contextlib.suppress(ValueError):
            self.paths.remove(os.fspath(path))

    def cleanup(self) -> None:
        while self.paths:
            remove(self.paths.pop())


@contextlib.contextmanager
def request_files() -> Iterator[RequestFiles]:
    """``with request_files() as files:``: every path added is removed when the block ends, however it ends."""
    files = RequestFiles()
    try:
        yield files
    finally:
        files.cleanup()
