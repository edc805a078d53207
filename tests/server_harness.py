"""Start and stop a real MONAI Label server for the tests.

The server runs as a subprocess on a free port of 127.0.0.1. Everything it writes goes to a
temporary folder: a copy of the app (MONAI Label creates ``logs/``, ``model/`` ... inside the app),
the studies, the sessions, and ``HOME`` (MONAI Label's caches live under ``~/.cache``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_SOURCE = REPO_ROOT / "apps" / "vila_m3"
START_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def copy_app(destination: Path) -> Path:
    """A copy of ``apps/vila_m3`` (without run-time folders) at ``destination``."""
    shutil.copytree(APP_SOURCE, destination, ignore=shutil.ignore_patterns("logs", "model", "bin", "__pycache__"))
    return destination


def isolated_env(workdir: Path) -> dict[str, str]:
    """The environment for a server or command whose writes must stay inside ``workdir``."""
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    temporary = workdir / "tmp"  # MONAI Label leaves a logging config in the temp folder at each start
    temporary.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        HOME=str(home),
        TMPDIR=str(temporary),
        MONAI_LABEL_SESSION_PATH=str(workdir / "sessions"),
        MONAI_LABEL_DATASTORE_AUTO_RELOAD="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PYTHONUTF8="1",
    )
    env.pop("VILA_M3_MODELS_DIR", None)
    return env


@dataclass
class RunningServer:
    """A started server: its URL, process and log file."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=kwargs.pop("timeout", 30), **kwargs)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after 15 s."""
        stop_process_group(self.process)


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop ``process`` and its whole process group: SIGTERM, then SIGKILL after 15 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def start_process(command: list[str], workdir: Path, env: dict[str, str], url: str,
                  timeout_s: float = START_TIMEOUT_S) -> RunningServer:
    """Start ``command`` in its own process group and wait up to ``timeout_s`` seconds until ``url``/info/ answers."""
    log_path = workdir / "server.log"
    log = log_path.open("w", encoding="utf-8")
    process = subprocess.Popen(
        command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    server = RunningServer(url, process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering:\n{server.log_tail()}")
        try:
            if requests.get(f"{url}/info/", timeout=2).status_code in (200, 401):  # 401: up, login on
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server did not answer {url}/info/ within {timeout_s:.0f} s:\n{server.log_tail()}")


def monailabel_command(app_dir: Path, studies: Path | str, conf: dict[str, str], port: int) -> list[str]:
    """The ``monailabel start_server`` command line for ``app_dir`` on ``studies`` (a folder or a DICOMweb URL),
    on 127.0.0.1:``port``, with each of ``conf`` as a ``--conf``."""
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir)]
    command += ["--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        command += ["--conf", key, value]
    return command


def start_monailabel(workdir: Path, studies: Path | str, conf: dict[str, str] | None = None,
                     env: dict[str, str] | None = None, app_dir: Path | None = None) -> RunningServer:
    """``monailabel start_server`` with a copy of the app (or ``app_dir``, one the test prepared), on a free port,
    writing only in ``workdir``; ``studies``: a folder or a DICOMweb URL;
    ``env`` adds environment variables (MONAI Label reads its settings, e.g. ``MONAI_LABEL_AUTH_*``, from there)."""
    workdir.mkdir(parents=True, exist_ok=True)
    app_dir = app_dir or copy_app(workdir / "app")
    port = free_port()
    command = monailabel_command(app_dir, studies, {"models_dir": str(workdir / "models"), **(conf or {})}, port)
    return start_process(command, workdir, {**isolated_env(workdir), **(env or {})}, f"http://127.0.0.1:{port}")


def stand_in_site(root: Path, sample_data: Path, vlm_url: str, experts: tuple[str, ...] = ("vista3d",),
                  conf: dict[str, str] | None = None,
                  studies: Path | str | None = None) -> tuple[Path | str, dict[str, str]]:
    """(studies, server settings) for a VILA-M3 server under ``root``: ``experts`` staged on stand-in weights in
    ``root/models``, a copy of the sample studies in ``root/studies`` (unless ``studies``, a folder the test prepared
    or a PACS's DICOMweb URL, is given), chats in ``root/chats``, the chat's VLM at ``vlm_url``; ``conf`` overrides."""
    from vila_m3.standins.stand_ins import stage_stand_ins

    stage_stand_ins(root / "models", experts)
    if studies is None:
        studies = root / "studies"
        shutil.copytree(sample_data / "studies", studies)
    settings = {"models": ",".join(("vila_m3", *experts)), "vlm_url": vlm_url, "vlm_model": "fake-vila-m3",
                "chats_dir": str(root / "chats"), "models_dir": str(root / "models"), **(conf or {})}
    return studies, settings


@contextmanager
def chat_server_with_stand_ins(root: Path, sample_data: Path, vlm_url: str, experts: tuple[str, ...] = ("vista3d",),
                               conf: dict[str, str] | None = None, env: dict[str, str] | None = None,
                               studies: Path | str | None = None) -> Iterator[RunningServer]:
    """A real VILA-M3 server on the :func:`stand_in_site` under ``root`` (a copy of the sample studies unless
    ``studies`` is given), started in ``root/server``; the server gets ``.root``."""
    studies, settings = stand_in_site(root, sample_data, vlm_url, experts, conf, studies)
    server = start_monailabel(root / "server", studies, conf=settings, env=env)
    server.root = root  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


def multipart(response: requests.Response) -> tuple[dict, bytes | None]:
    """(params JSON, labelmap bytes) of MONAI Label's infer answer: its ``params`` and ``image`` parts when it is
    multipart, (JSON, None) when it is JSON only; asserts the answer is a 200."""
    assert response.status_code == 200, response.text[:1000]
    if response.headers["content-type"].startswith("application/json"):
        return response.json(), None
    fields = {part.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]: part.content
              for part in MultipartDecoder.from_response(response).parts}
    return json.loads(fields["params"]), fields["image"]
