"""The web viewer as the tests (and benchmarks/web_viewer_startup.py) run it: a real ``web/viewer.py``
process on a free port of 127.0.0.1, and Debian's headless Chromium driven by Playwright.

No browser is downloaded: Playwright launches ``/usr/bin/chromium`` (Debian's ``chromium``
package; ``make web-deps`` installs it) through ``executable_path``. Offscreen rendering uses EGL
(Mesa's ``libegl-mesa0`` and ``libgl1-mesa-dri`` on a CPU-only machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from server_harness import (  # noqa: F401  (chat_server_with_stand_ins: for the browser tests)
    REPO_ROOT,
    RunningServer,
    chat_server_with_stand_ins,
    free_port,
    isolated_env,
    stop_process_group,
)

VIEWER = REPO_ROOT / "web" / "viewer.py"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-headless-shell")
START_TIMEOUT_S = 120.0


def chromium_path() -> str | None:
    """Debian's Chromium (``CHROMIUM`` overrides), or None when it is not installed."""
    for candidate in (os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


def missing_for_browser_tests() -> str | None:
    """Why the browser tests cannot run here (naming what to install), or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package 'playwright' is missing (part of the test extra: pip install -e '.[test]')"
    try:
        import trame_slicer  # noqa: F401
    except ImportError as err:
        return f"the web extra is missing or broken ({err}); pip install -e '.[web]'"
    if chromium_path() is None:
        return ("Debian's package 'chromium' is missing (make web-deps, or: sudo apt-get install -y chromium "
                "libegl1 libegl-mesa0 libgl1-mesa-dri)")
    return None


def start_viewer(workdir: Path, server_url: str, encoder: str = "png", env: dict[str, str] | None = None,
                 timeout_s: float = START_TIMEOUT_S) -> RunningServer:
    """``web/viewer.py --server server_url`` on a free port; returns once its page answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(VIEWER), "--server", server_url, "--host", "127.0.0.1", "--port", str(port),
               "--encoder", encoder]
    log_path = workdir / "viewer.log"
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=workdir, env={**isolated_env(workdir), **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    viewer = RunningServer(url, process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the viewer exited with {process.returncode}:\n{viewer.log_tail()}")
        try:
            if requests.get(f"{url}/index.html", timeout=2).status_code == 200:
                return viewer
        except requests.RequestException:
            pass
        time.sleep(0.3)
    stop_process_group(process)
    raise RuntimeError(f"the viewer did not answer {url} within {timeout_s:.0f} s:\n{viewer.log_tail()}")


def launch_chromium(playwright):
    """Headless Chromium from Debian's package (never a downloaded one)."""
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                      args=["--no-sandbox", "--disable-dev-shm-usage"])


def browser_test_marks(*extra) -> list:
    """``pytestmark`` of a browser test module: ``web`` and ``server`` (and ``extra``), skipped with a line
    naming what is missing where the browser tests cannot run."""
    import pytest

    marks = [pytest.mark.web, pytest.mark.server, *extra]
    missing = missing_for_browser_tests()
    if missing:
        marks.append(pytest.mark.skip(reason=f"browser tests skipped: {missing}"))
    return marks


@contextmanager
def running_viewer(workdir: Path, server_url: str, **kwargs) -> Iterator[RunningServer]:
    """:func:`start_viewer`, stopped afterwards."""
    viewer = start_viewer(workdir, server_url, **kwargs)
    try:
        yield viewer
    finally:
        viewer.stop()


@contextmanager
def chromium_browser() -> Iterator[object]:
    """Playwright's headless Chromium from Debian's package (:func:`launch_chromium`), closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


def pick_ct(page, study: str = "ct_abdomen") -> None:
    """On a page showing the study list, pick CT ``study`` and wait until its axial slices are shown."""
    page.wait_for_selector(f"#study-select option[value={study}]", state="attached", timeout=60_000)
    page.select_option("#study-select", study)
    page.wait_for_function("document.querySelector('#status').innerText.includes('axial slices')", timeout=120_000)
