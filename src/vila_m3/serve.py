"""``vila-m3 serve``: check what the user asked for, say what will run, then start MONAI Label.

Every problem found before the server starts (a studies folder that does not exist, a port in use,
an unknown task or VLM) is reported as one line naming the problem; nothing is started then.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vila_m3.chat.vlm_backend import remote_settings
from vila_m3.experts.registry import EXPERTS_ENV, ExpertRegistry, env_experts_files
from vila_m3.models.manifest import resolve_models_dir
from vila_m3.tasks import TaskStatus, format_statuses, select_tasks, task_catalogue, task_statuses

DEFAULT_APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "vila_m3"
APP_DIR_ENV = "VILA_M3_APP_DIR"


REAL_WEIGHTS_HINT = (
    "Serving the DEMO models (trained on synthetic phantoms; not medical models). For the real VILA-M3, VISTA3D, "
    "BRATS and TorchXRayVision weights (about 7.5 GB with the 3B VLM): make run MODELS=real (or `vila-m3 models pull "
    "--real`; needs access to huggingface.co and the MONAI model zoo)"
)
"""What ``make run`` prints when it serves the demo (no real weights staged, no remote VLM)."""


class ServeError(RuntimeError):
    """A problem with the requested server settings, worded for the user."""


@dataclass
class ServePlan:
    """Everything needed to start the server, already checked."""

    host: str
    port: int
    studies: str
    app_dir: Path
    models_dir: Path
    conf: dict[str, str] = field(default_factory=dict)
    statuses: list[TaskStatus] = field(default_factory=list)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def experts_files(self) -> tuple[str, ...]:
        """The extra experts files in effect: ``$VILA_M3_EXPERTS`` then ``--conf experts_file`` (absolute)."""
        return experts_files_of(self.conf)

    def command(self) -> list[str]:
        """The ``monailabel start_server`` command line, run with this Python."""
        argv = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(self.app_dir)]
        argv += ["--studies", self.studies, "--host", self.host, "--port", str(self.port)]
        for key, value in self.conf.items():
            argv += ["--conf", key, value]
        return argv


def parse_conf_pairs(pairs: list[str]) -> dict[str, str]:
    """``["models", "vista3d", "vlm", "vila_m3_3b"]`` → ``{"models": "vista3d", "vlm": "vila_m3_3b"}``."""
    if len(pairs) % 2:
        raise ServeError(f"--conf values come in KEY VALUE pairs; '{pairs[-1]}' has no value")
    return {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}


def given_experts_files(conf: dict[str, str]) -> list[str]:
    """The files of ``--conf experts_file`` (comma-separated) as absolute paths, each once."""
    names = [name.strip() for name in str(conf.get("experts_file") or "").split(",") if name.strip()]
    return list(dict.fromkeys(str(Path(name).expanduser().resolve()) for name in names))


def experts_files_of(conf: dict[str, str]) -> tuple[str, ...]:
    """The extra experts files the server will read, as it reads them: those of ``$VILA_M3_EXPERTS`` then those
    of ``--conf experts_file``, as absolute paths, each once."""
    files = [str(path) for path in env_experts_files()]
    return tuple(files + [path for path in given_experts_files(conf) if path not in files])


@contextmanager
def experts_env(files: tuple[str, ...]) -> Iterator[None]:
    """``$VILA_M3_EXPERTS`` set to ``files`` while the block runs (every expert registry built in it reads them),
    restored afterwards."""
    before = os.environ.get(EXPERTS_ENV)
    if files:
        os.environ[EXPERTS_ENV] = os.pathsep.join(files)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(EXPERTS_ENV, None)
        else:
            os.environ[EXPERTS_ENV] = before


def check_port_free(host: str, port: int) -> None:
    """Raise ServeError when ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    if not 0 < port < 65536:
        raise ServeError(f"port {port} is out of range (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ServeError(f"cannot resolve host '{host}': {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ServeError(
                    f"port {port} on {host} is already in use; stop the other server or choose another "
                    f"port (make run PORT=...)"
                ) from None
            raise ServeError(f"cannot listen on {host}:{port}: {err.strerror}") from None


def check_studies(studies: str) -> str:
    """The studies folder as an absolute path (or a DICOMweb URL unchanged); it must exist."""
    if studies.startswith(("http://", "https://")):
        return studies
    path = Path(studies).expanduser()
    if not path.exists():
        raise ServeError(f"studies folder '{studies}' does not exist (make run STUDIES=<folder or DICOMweb URL>)")
    if not path.is_dir():
        raise ServeError(f"studies path '{studies}' is not a folder")
    return str(path.resolve())


def plan_server(
    host: str,
    port: int,
    studies: str,
    models_dir: str | None = None,
    conf: dict[str, str] | None = None,
    app_dir: str | None = None,
) -> ServePlan:
    """Check every setting and work out which tasks can run; raise ServeError on the first problem."""
    conf = dict(conf or {})
    app = Path(app_dir or os.environ.get(APP_DIR_ENV) or DEFAULT_APP_DIR).resolve()
    if not (app / "main.py").is_file():
        raise ServeError(f"MONAI Label app not found: {app / 'main.py'} does not exist")
    resolved_studies = check_studies(studies)
    models = resolve_models_dir(models_dir or conf.get("models_dir"))
    conf["models_dir"] = str(models)
    conf.setdefault("models", "all")
    if given := given_experts_files(conf):  # absolute: the server reads them whatever its working folder
        conf["experts_file"] = ",".join(given)
    try:
        with experts_env(experts_files_of(conf)):  # the catalogue and the statuses see the extra experts, as the app does
            catalogue = ExpertRegistry.from_config().with_expert_tasks(task_catalogue())
            names = select_tasks(conf["models"], catalogue)
            statuses = task_statuses(names, models, vlm_id=conf.get("vlm"), catalogue=catalogue,
                                     remote_vlm=remote_settings(conf) is not None)
    except (ValueError, KeyError) as err:  # ConfigError (a bad experts file) is a ValueError
        raise ServeError(str(err).strip("'\"")) from None
    check_port_free(host, port)
    return ServePlan(host, port, resolved_studies, app, models, conf, statuses)


def describe(plan: ServePlan) -> str:
    """What the user is told before the server starts."""
    available = sum(status.available for status in plan.statuses)
    lines = [
        f"VILA-M3 MONAI Label server on {plan.url}",
        f"  studies: {plan.studies}",
        f"  models:  {plan.models_dir}",
        f"Infer tasks ({available} of {len(plan.statuses)} available):",
        format_statuses(plan.statuses),
    ]
    if not available:
        lines.append("The server still serves the datastore (/datastore/) and sessions; stage weights to add tasks.")
    return "\n".join(lines)


def serve(plan: ServePlan) -> None:
    """Replace this process with the MONAI Label server (no return)."""
    env = dict(os.environ)
    # Nothing downloads at run time: weights are staged beforehand (`vila-m3 models ...`).
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("PYTHONUTF8", "1")  # text I/O stays UTF-8 even after a library switches the C locale
    if plan.experts_files:
        env[EXPERTS_ENV] = os.pathsep.join(plan.experts_files)
    command = plan.command()
    os.execve(command[0], command, env)
