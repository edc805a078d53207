"""Stage model weights: ``pull`` fetches a model of the manifest on a connected machine, ``verify``
checks that what is staged is complete and unchanged.

Every pull records the SHA-256 of the files it wrote (``.vila_m3_pull.json`` in a model's folder,
``<file>.vila_m3_pull.json`` beside a single-file model), so a copy carried to an air-gapped machine
can be verified there. Checksums pinned in the manifest take precedence over the record.

Downloads show their progress per file (MB done of the size, elapsed and remaining time; the Hugging
Face client draws its own bars). Hugging Face models are fetched at the commit the hub names for the manifest's
revision, checked against the hub's own checksums (git SHA-1, or SHA-256 for LFS files), and the
commit is kept in the record. The hub is ``$HF_ENDPOINT`` (read at each pull, so a site mirror or a
test server can stand in for huggingface.co) or a manifest source's ``endpoint``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from vila_m3.models.manifest import STAND_IN_MARKER, ModelEntry, ModelManifest

PULL_RECORD = ".vila_m3_pull.json"
DOWNLOAD_TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20
MEGABYTE = 1_000_000  # progress is counted in MB (the pull's summary gives GB of 10^9 bytes)


class StagingError(RuntimeError):
    """A model could not be pulled; the message says what to copy where instead."""


@dataclass
class VerifyReport:
    """What ``verify`` found for one model.

    ``state`` is ``ready`` (complete, checksums match), ``unverified`` (complete, no checksum known),
    ``not staged`` (nothing there), ``incomplete`` (some required files missing) or ``corrupt``.
    ``downloaded`` is set by ``pull`` when it fetched the model (False: it was already verified).
    """

    model_id: str
    location: Path
    state: str
    problems: list[str] = field(default_factory=list)
    downloaded: bool = False

    @property
    def ok(self) -> bool:
        return self.state in ("ready", "unverified")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def record_path(entry: ModelEntry, models_dir: Path) -> Path:
    """Where the pull record of ``entry`` lives."""
    location = entry.location(models_dir)
    if entry.is_single_file:
        return location.with_name(location.name + PULL_RECORD)
    return location / PULL_RECORD


def _staged_files(entry: ModelEntry, models_dir: Path) -> dict[str, Path]:
    """Every staged file of ``entry`` by its path relative to the model's location."""
    location = entry.location(models_dir)
    if entry.is_single_file:
        return {location.name: location} if location.is_file() else {}
    return {
        path.relative_to(location).as_posix(): path
        for path in sorted(location.rglob("*"))
        if path.is_file() and path.name != PULL_RECORD and ".cache" not in path.relative_to(location).parts
    }


def real_models_staged(models_dir: Path, manifest: ModelManifest | None = None) -> list[str]:
    """Ids of the manifest's models with real weights (anything that is not a stand-in) under ``models_dir``."""
    manifest = manifest or ModelManifest.load()
    staged = []
    for model_id, entry in manifest.entries.items():
        location = entry.location(models_dir)
        present = location.is_file() or (location.is_dir() and any(location.iterdir()))
        if present and not entry.is_stand_in(models_dir):
            staged.append(model_id)
    return staged


def staged_bytes(entry: ModelEntry, models_dir: Path) -> int:
    """Total size in bytes of the files staged for ``entry`` (its pull record and hub metadata aside)."""
    return sum(path.stat().st_size for path in _staged_files(entry, models_dir).values())


def write_record(entry: ModelEntry, models_dir: Path, commit: str | None = None) -> Path:
    """Record the checksums of what is staged for ``entry`` now (and the hub ``commit`` it came from, if
    known); returns the record's path."""
    files = _staged_files(entry, models_dir)
    record = {
        "model_id": entry.model_id,
        "source": entry.source,
        "sha256": {name: sha256_file(path) for name, path in files.items()},
    }
    if commit:
        record["commit"] = commit
    path = record_path(entry, models_dir)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def verify(entry: ModelEntry, models_dir: Path) -> VerifyReport:
    """Check presence and checksums of ``entry`` under ``models_dir``."""
    location = entry.location(models_dir)
    missing = entry.missing_files(models_dir)
    if missing and not location.exists():
        return VerifyReport(entry.model_id, location, "not staged", [f"{location} does not exist"])
    if missing:
        return VerifyReport(entry.model_id, location, "incomplete", [f"missing {path}" for path in missing])

    expected = dict(entry.sha256)
    record = record_path(entry, models_dir)
    if not expected and record.is_file():
        try:
            expected = json.loads(record.read_text(encoding="utf-8"))["sha256"]
        except (ValueError, KeyError) as err:
            return VerifyReport(entry.model_id, location, "corrupt", [f"unreadable pull record {record}: {err}"])
    if not expected:
        return VerifyReport(entry.model_id, location, "unverified", ["present; no checksum pinned or recorded"])

    staged = _staged_files(entry, models_dir)
    problems = []
    for name, digest in sorted(expected.items()):
        path = staged.get(name)
        if path is None:
            problems.append(f"missing {location / name if not entry.is_single_file else location}")
        elif sha256_file(path) != digest:
            problems.append(f"checksum mismatch: {path}")
    return VerifyReport(entry.model_id, location, "corrupt" if problems else "ready", problems)


def _download(url: str, destination: Path, label: str) -> None:
    """Stream ``url`` to ``destination``, showing its progress in MB with the elapsed and remaining time (a bar
    on a terminal, plain lines in a log: ``vila_m3.progress``); raises StagingError on failure."""
    from vila_m3.progress import progress

    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, destination.open("wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with progress(total=math.ceil(size / MEGABYTE) if size else None, description=label, unit="MB") as shown:
                done = 0
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    done += len(chunk)
                    shown.update(done // MEGABYTE - shown.n)
                shown.update(math.ceil(done / MEGABYTE) - shown.n)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise StagingError(str(reason)) from None


def _extract_zip(archive: Path, destination: Path) -> None:
    """Extract ``archive`` into ``destination``, dropping one top-level folder if all entries share it."""
    with zipfile.ZipFile(archive) as bundle:
        names = [name for name in bundle.namelist() if not name.endswith("/")]
        tops = {name.split("/", 1)[0] for name in names}
        strip = len(tops) == 1 and all("/" in name for name in names)
        for name in names:
            relative = name.split("/", 1)[1] if strip else name
            target = (destination / relative).resolve()
            if destination.resolve() not in target.parents:
                raise StagingError(f"archive entry '{name}' would be written outside {destination}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with bundle.open(name) as source, target.open("wb") as out:
                shutil.copyfileobj(source, out)


def _pull_url(entry: ModelEntry, location: Path) -> None:
    url = entry.source["url"]
    location.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=location.parent, prefix=".pull-") as scratch:
        download = Path(scratch) / "download"
        _download(url, download, f"Downloading {entry.model_id} ({Path(urllib.parse.urlsplit(url).path).name})")
        if entry.source.get("archive") == "zip":
            unpacked = Path(scratch) / "unpacked"
            try:
                _extract_zip(download, unpacked)
            except zipfile.BadZipFile:
                raise StagingError(f"{url} is not a zip archive") from None
            if location.exists():
                shutil.rmtree(location)
            unpacked.rename(location)
        else:
            download.replace(location)


def hub_endpoint(entry: ModelEntry) -> str | None:
    """The Hugging Face endpoint for ``entry``: its source's ``endpoint``, else ``$HF_ENDPOINT`` now, else
    None (the client's default, huggingface.co)."""
    return entry.source.get("endpoint") or os.environ.get("HF_ENDPOINT") or None


def _pull_huggingface(entry: ModelEntry, location: Path, replace_stand_in: bool = False) -> str:
    """Fetch ``entry``'s repository into ``location`` at the commit its revision names now, and check every
    file against the hub's checksums; returns the commit. A pull cut short resumes where it stopped.
    ``replace_stand_in``: ``location`` holds a stand-in (demo) checkpoint, removed once the hub answered."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if constants.is_offline_mode():
        raise StagingError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set in the environment; unset it to download")
    repo, endpoint = entry.source["repo"], hub_endpoint(entry)
    try:
        api = HfApi(endpoint=endpoint)
        commit = api.model_info(repo, revision=entry.source.get("revision") or "main").sha
        print(f"{entry.model_id}: huggingface {repo} at commit {commit}", file=sys.stderr, flush=True)
        if replace_stand_in:  # no demo file may stay beside the real ones
            shutil.rmtree(location)
        snapshot_download(repo_id=repo, revision=commit, local_dir=location, endpoint=endpoint)
        check = api.verify_repo_checksums(repo, revision=commit, local_dir=location)
    except Exception as err:  # the hub client raises many types; all mean "could not fetch"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StagingError(first_line) from None
    wrong = [f"{item['path']} (expected {item['expected']}, got {item['actual']})" for item in check.mismatches]
    wrong += [f"{path} (not downloaded)" for path in check.missing_paths]
    if wrong:
        raise StagingError(f"files differ from the hub's checksums at commit {commit}: {', '.join(wrong)}")
    return commit


def source_text(entry: ModelEntry) -> str:
    """Where ``entry`` comes from, for people."""
    source = entry.source
    if source.get("hub") == "huggingface":
        return f"huggingface {source['repo']}@{source.get('revision', 'main')}"
    if source.get("hub") == "monai_model_zoo":
        return f"MONAI model zoo {source['name']} {source['version']}"
    return source.get("url", str(source))


def _settle_stand_in_marker(entry: ModelEntry, models_dir: Path, manifest: ModelManifest) -> None:
    """After real single-file weights replaced a stand-in: drop the folder's stand-in marker once every weight
    file of the manifest in that folder is a pulled one (until then the folder still counts as stand-ins)."""
    folder = entry.location(models_dir).parent
    marker = folder / STAND_IN_MARKER
    if not marker.is_file():
        return
    siblings = [e for e in manifest.entries.values() if e.is_single_file and e.location(models_dir).parent == folder]
    if all(record_path(e, models_dir).is_file() or not e.location(models_dir).exists() for e in siblings):
        marker.unlink()


def pull(entry: ModelEntry, models_dir: Path, manifest: ModelManifest | None = None) -> VerifyReport:
    """Fetch ``entry`` into ``models_dir`` unless it is already staged and verified.

    Stand-ins (the demo's or random ones) staged there are replaced, never kept beside the real files;
    real weights that do not verify are fetched again. ``manifest``: the one ``entry`` comes from (default
    ``configs/models.yaml``), for the other files that share a stand-in marker.

    Raises:
        StagingError: the download failed (e.g. no network); the one-line message names what to
            copy where from a machine that has it.
    """
    current = verify(entry, models_dir)
    stand_in = entry.is_stand_in(models_dir)
    if current.state == "ready" and not stand_in:
        return current
    location = entry.location(models_dir)
    commit = None
    try:
        if entry.source.get("hub") == "huggingface":
            commit = _pull_huggingface(entry, location, replace_stand_in=stand_in and location.is_dir())
        elif "url" in entry.source:
            _pull_url(entry, location)
        else:
            raise StagingError(f"the manifest gives no download source for {entry.model_id}")
    except StagingError as err:
        relative = entry.path + ("" if entry.is_single_file else "/")
        raise StagingError(
            f"cannot download {entry.model_id} from {source_text(entry)} ({err}); on a machine that has it, "
            f"run `vila-m3 models pull {entry.model_id}` and copy <models dir>/{relative} to {location}"
        ) from None
    write_record(entry, models_dir, commit)
    if stand_in and entry.is_single_file:
        _settle_stand_in_marker(entry, models_dir, manifest or ModelManifest.load())
    report = verify(entry, models_dir)
    if not report.ok:
        raise StagingError(f"{entry.model_id} was downloaded but is not usable: {'; '.join(report.problems)}")
    report.downloaded = True
    return report
