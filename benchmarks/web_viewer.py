"""The web viewer's start-up time and memory, measured in Debian's headless Chromium.

A real MONAI Label server on the sample studies (chat with the scripted VLM of the tests,
VISTA3D on stand-in weights) and ``web/viewer.py`` as ``make run`` starts it. Measured: seconds
from starting the viewer's process until its page answers, until Chromium lists the server's
studies, until the sample CT is on screen after picking it, and until a chat turn's labelmap is
listed as segments; the viewer's resident memory (RSS, MB, its process and children) at each step.

Run: ``.venv/bin/python benchmarks/web_viewer.py [--screenshot docs/web_viewer.png]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai_server import FakeOpenAIServer, sse  # noqa: E402
from server_harness import start_monailabel  # noqa: E402
from web_harness import launch_chromium, start_viewer  # noqa: E402

from vila_m3.samples import generate_samples  # noqa: E402
from vila_m3.standins.stand_ins import stage_stand_ins  # noqa: E402


def rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--screenshot", type=Path, help="save the page after the answer here (PNG)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="vila-m3-web-bench-") as tmp, FakeOpenAIServer() as vlm:
        work = Path(tmp)
        generate_samples(work / "samples", seed=0)
        stage_stand_ins(work / "models", ("vista3d",))
        shutil.copytree(work / "samples" / "studies", work / "studies")
        server = start_monailabel(work / "server", work / "studies", conf={
            "models": "vila_m3,vista3d", "vlm_url": vlm.url, "vlm_model": "fake-vila-m3",
            "chats_dir": str(work / "chats"), "models_dir": str(work / "models")})
        vlm.script(sse(["Let me trigger <VISTA3D(hepatic tumor)>."]), sse(["Yes."]))
        try:
            start = time.perf_counter()
            viewer = start_viewer(work / "viewer", server.url, encoder="jpeg")
            rows.append(("viewer process start → page answers", time.perf_counter() - start,
                         rss_mb(viewer.process.pid)))
            try:
                with sync_playwright() as playwright:
                    browser = launch_chromium(playwright)
                    page = browser.new_page(viewport={"width": 1600, "height": 900})
                    page.goto(viewer.url + "/")
                    page.wait_for_selector("#study-select option[value=ct_abdomen]", state="attached",
                                           timeout=120_000)
                    rows.append(("… → the page lists the studies", time.perf_counter() - start,
                                 rss_mb(viewer.process.pid)))
                    picked = time.perf_counter()
                    page.select_option("#study-select", "ct_abdomen")
                    page.wait_for_function(
                        "document.querySelector('#status').innerText.includes('axial slices')", timeout=120_000)
                    rows.append(("pick the sample CT → shown in three views", time.perf_counter() - picked,
                                 rss_mb(viewer.process.pid)))
                    asked = time.perf_counter()
                    page.fill("#question", "Is there a liver tumour?")
                    page.click("#send")
                    page.wait_for_selector("#segments .segment", timeout=600_000)
                    rows.append(("ask → answer and segments listed (stand-in VISTA3D)",
                                 time.perf_counter() - asked, rss_mb(viewer.process.pid)))
                    if args.screenshot:
                        page.wait_for_timeout(2000)
                        page.screenshot(path=str(args.screenshot))
                    browser.close()
            finally:
                viewer.stop()
        finally:
            server.stop()
    print(f"{'step':<55} {'seconds':>8} {'viewer RSS MB':>14}")
    for name, seconds, rss in rows:
        print(f"{name:<55} {seconds:>8.1f} {rss:>14.0f}")


if __name__ == "__main__":
    main()
