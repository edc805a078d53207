"""The first ``make run`` on a fresh copy of the repository, as a newcomer runs it: within two minutes the
server answers with the shipped demo, every task is available and the stand-ins are announced, the web
viewer's address is printed, and the README's question gets the expert call the README shows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from server_harness import free_port, isolated_env, stop_process_group

from vila_m3.samples import ct_tumour_slice

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "slicer_extension" / "VILAM3Chat"))
from VILAM3ChatLib.client import StudyRef, VilaM3Client, turn_params  # noqa: E402

#: From ``make run`` to ``/info/`` answering, on a fresh copy with an empty models folder (s).
FIRST_ANSWER_S = 120
TASKS = {"vila_m3", "vista3d", "brats", "cxr"}


def fresh_copy(destination: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked and new files; nothing ignored: no models,
    no generated samples, no caches)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def _answers(url: str, within_s: float) -> bool:
    """Whether ``url`` answers 200 within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).ok:
                return True
        except requests.ConnectionError:
            pass
        time.sleep(1)
    return False


@pytest.mark.server
def test_make_run_on_a_fresh_copy_answers_with_the_shipped_demo_within_two_minutes(tmp_path):
    copy = fresh_copy(tmp_path / "repo")
    venv = Path(sys.prefix)
    # the copy uses this test run's environment: its install stamp must not look older than the copy's files
    stamp = venv / ".installed"
    if stamp.is_file():
        for name in ("setup.cfg", "requirements/constraints.txt"):
            os.utime(copy / name, (stamp.stat().st_mtime - 1, stamp.stat().st_mtime - 1))
    env = isolated_env(tmp_path / "run")
    env["PYTHONPATH"] = str(copy / "src")  # the copy's own code, not the editable install's
    port, web_port = free_port(), free_port()
    log_path = tmp_path / "make-run.log"
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(["make", "run", f"VENV={venv}", f"PORT={port}", f"WEB_PORT={web_port}"], cwd=copy, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        info = None
        while time.monotonic() - started < FIRST_ANSWER_S and process.poll() is None:
            try:
                response = requests.get(f"{url}/info/", timeout=2)
                if response.ok:
                    info = response.json()
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        elapsed = time.monotonic() - started
        output = log_path.read_text(encoding="utf-8", errors="replace")
        assert info is not None, f"no answer from /info/ after {elapsed:.0f} s:\n{output[-4000:]}"
        print(f"make run on a fresh copy: /info/ answered after {elapsed:.1f} s")
        assert set(info["models"]) >= TASKS, output[-4000:]
        assert not (copy / "models" / ".demo-build").exists(), "nothing was trained: the shipped demo was staged"
        for task in TASKS:
            assert any(line.lstrip().startswith(task) and "STAND-IN" in line for line in output.splitlines()), (
                f"the {task} stand-in is not announced:\n{output[-4000:]}")

        assert f"http://127.0.0.1:{web_port}/" in output, f"the web viewer's address is not printed:\n{output[-4000:]}"
        assert _answers(f"http://127.0.0.1:{web_port}/", within_s=60), "the web viewer does not answer"

        client = VilaM3Client(url)
        answer = client.ask(StudyRef.image("ct_abdomen"),
                            turn_params("Is there a liver tumour?", "first-run", "axial",
                                        ct_tumour_slice(copy / "sample_data")))
        print(f"make run on a fresh copy: the first answer came {time.monotonic() - started:.1f} s after make run")
        assert [(call.get("expert"), call.get("argument")) for call in answer.experts] == [("VISTA3D", "hepatic tumor")]
        assert answer.labelmap_path is not None
        # the slice shows the tumours and the expert's result names them: the answer is a plain "yes"
        assert answer.answer.strip().lower().rstrip(".") == "yes", [m.get("text") for m in answer.turn][1:]
        assert answer.stand_in and any("demo model" in notice for notice in answer.raw.get("notices") or [])
    finally:
        stop_process_group(process)
