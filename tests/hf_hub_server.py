"""A Hugging Face Hub stand-in on 127.0.0.1: serves model folders in the hub's layout and API, for
testing ``vila-m3 models pull`` without the internet (``HF_ENDPOINT=<url>``).

It answers the requests ``huggingface_hub.snapshot_download`` and ``HfApi.verify_repo_checksums`` make:

- ``GET /api/models/{repo}/revision/{rev}``: the model info, ``sha`` = the repository's commit;
- ``GET /api/models/{repo}/tree/{rev}?recursive=...``: the file listing, with git blob SHA-1 ``oid`` and,
  for LFS files, ``lfs: {oid: sha256, size, pointerSize}`` (one page: no ``Link`` header);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a small file directly (``ETag`` = its git blob SHA-1,
  ``X-Repo-Commit``, ``Content-Length``); an LFS file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.model``)
  as the hub does, a ``302`` to a second server on another port (the CDN) with ``X-Linked-Etag`` = its
  SHA-256, ``X-Linked-Size`` and ``X-Repo-Commit``;
- anything else: 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound``.

Every request is logged (``HubServer.requests``: method and path), so a test can check what was fetched.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".model")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding ``data`` (what the hub calls a small file's ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubRepo:
    """One model repository: its files (path → bytes) at one commit. ``cdn_tampered`` (path → bytes): what
    the CDN serves instead of an LFS file's content, to test that a corrupted download is caught."""

    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    revisions: tuple[str, ...] = ("main",)
    cdn_tampered: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path, **kwargs) -> HubRepo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls(files, **kwargs)

    def is_lfs(self, path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def tree_entry(self, path: str) -> dict:
        data = self.files[path]
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if self.is_lfs(path):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


@dataclass
class HubServer:
    """The running hub (``url``) and CDN servers and the requests they saw."""

    url: str
    cdn_url: str
    repos: dict[str, HubRepo]
    requests: list[tuple[str, str]] = field(default_factory=list)
    _servers: list[http.server.ThreadingHTTPServer] = field(default_factory=list)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


def _handler(hub: HubServer, cdn: bool) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _not_found(self, code: str) -> None:
            body = json.dumps({"error": code}).encode()
            self._send(404, body, {"X-Error-Code": code, "Content-Type": "application/json"})

        def _json(self, payload: object, repo: HubRepo | None = None) -> None:
            headers = {"Content-Type": "application/json"}
            if repo is not None:
                headers["X-Repo-Commit"] = repo.commit
            self._send(200, json.dumps(payload).encode(), headers)

        def _repo_and_rest(self, parts: list[str]) -> tuple[str, HubRepo | None, list[str]]:
            name = "/".join(parts[:2])
            return name, hub.repos.get(name), parts[2:]

        def _resolve(self, repo: HubRepo, revision: str, path: str) -> None:
            if revision not in (repo.commit, *repo.revisions):
                return self._not_found("RevisionNotFound")
            if path not in repo.files:
                return self._not_found("EntryNotFound")
            data = repo.files[path]
            if repo.is_lfs(path):
                sha256 = hashlib.sha256(data).hexdigest()
                return self._send(302, headers={
                    "Location": f"{hub.cdn_url}/blobs/{sha256}", "X-Repo-Commit": repo.commit,
                    "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_sha1(data)}"'})
            self._send(200, data, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": repo.commit,
                                   "Content-Type": "application/octet-stream"})

        def _cdn(self, parts: list[str]) -> None:
            if len(parts) == 2 and parts[0] == "blobs":
                for repo in hub.repos.values():
                    for path, data in repo.files.items():
                        if hashlib.sha256(data).hexdigest() == parts[1]:
                            served = repo.cdn_tampered.get(path, data)
                            return self._send(200, served, {"Content-Type": "application/octet-stream"})
            self._send(404)

        def _handle(self) -> None:
            hub.requests.append((self.command, ("cdn:" if cdn else "") + self.path))
            split = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(part) for part in split.path.strip("/").split("/")]
            if cdn:
                return self._cdn(parts)
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                name, repo, rest = self._repo_and_rest(parts[2:])
                if repo is None:
                    return self._not_found("RepoNotFound")
                revision = rest[1]
                if revision not in (repo.commit, *repo.revisions):
                    return self._not_found("RevisionNotFound")
                if rest[0] == "revision" and len(rest) == 2:
                    return self._json({"id": name, "modelId": name, "sha": repo.commit, "private": False,
                                       "siblings": [{"rfilename": path} for path in repo.files]}, repo)
                if rest[0] == "tree":
                    prefix = "/".join(rest[2:])
                    query = urllib.parse.parse_qs(split.query)
                    recursive = query.get("recursive", ["False"])[0].lower() == "true"
                    paths = [p for p in repo.files if not prefix or p.startswith(prefix + "/")]
                    if not recursive:
                        paths = [p for p in paths if "/" not in p[len(prefix) + 1 if prefix else 0:]]
                    return self._json([repo.tree_entry(p) for p in paths], repo)
            if len(parts) >= 5 and parts[2] == "resolve":
                name, repo, rest = self._repo_and_rest(parts)
                if repo is None:
                    return self._not_found("RepoNotFound")
                return self._resolve(repo, rest[1], "/".join(rest[2:]))
            self._not_found("RepoNotFound")

        do_GET = _handle
        do_HEAD = _handle

    return Handler


def start_hub(repos: dict[str, HubRepo]) -> HubServer:
    """Start the hub and its CDN on free ports of 127.0.0.1 (daemon threads); call ``stop()`` when done."""
    hub = HubServer(url="", cdn_url="", repos=repos)
    for cdn in (False, True):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, cdn))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        hub._servers.append(server)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        if cdn:
            hub.cdn_url = url
        else:
            hub.url = url
    return hub
