"""The web viewer's memory per browser tab (each tab has a viewer of its own), measured in Chromium.

A real MONAI Label server on the sample studies and ``web/viewer.py`` as ``make run`` starts it.
``--tabs N`` pages (each its own browser context) open one after another and show the sample CT;
then all close, and N open again (is a closed tab's memory used again?). Measured: the viewer's
resident memory (RSS, MB, its process and children) after each step.

Run: ``.venv/bin/python benchmarks/web_viewer_tabs.py [--tabs 3]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_openai_server import FakeOpenAIServer  # noqa: E402
from server_harness import start_monailabel  # noqa: E402
from web_harness import launch_chromium, start_viewer  # noqa: E402
from web_viewer import rss_mb  # noqa: E402

from vila_m3.samples import generate_samples  # noqa: E402


def open_with_ct(browser, url: str):
    """A new context (another person) showing the sample CT; returns the context."""
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_selector("#study-select option[value=ct_abdomen]", state="attached", timeout=120_000)
    page.select_option("#study-select", "ct_abdomen")
    page.wait_for_function("document.querySelector('#status').innerText.includes('axial slices')", timeout=120_000)
    return context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tabs", type=int, default=3, help="how many tabs at once (default 3)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="vila-m3-web-tabs-") as tmp, FakeOpenAIServer() as vlm:
        work = Path(tmp)
        generate_samples(work / "samples", seed=0)
        shutil.copytree(work / "samples" / "studies", work / "studies")
        server = start_monailabel(work / "server", work / "studies", conf={
            "models": "vila_m3", "vlm_url": vlm.url, "vlm_model": "fake-vila-m3", "chats_dir": str(work / "chats")})
        try:
            viewer = start_viewer(work / "viewer", server.url, encoder="jpeg")
            pid = viewer.process.pid
            rows.append(("started, no tab", rss_mb(pid)))
            try:
                with sync_playwright() as playwright:
                    browser = launch_chromium(playwright)
                    for round_ in ("", " again"):
                        contexts = []
                        for n in range(1, args.tabs + 1):
                            contexts.append(open_with_ct(browser, viewer.url))
                            rows.append((f"{n} tab(s) with the CT{round_}", rss_mb(pid)))
                        for context in contexts:
                            context.close()
                        time.sleep(5.0)  # the viewer releases the closed tabs
                        rows.append((f"all {args.tabs} closed{round_}", rss_mb(pid)))
                    browser.close()
            finally:
                viewer.stop()
                closed = [line for line in viewer.log_path.read_text(errors="replace").splitlines()
                          if "vila_m3_viewer.sessions" in line]
        finally:
            server.stop()
    print("\n".join(closed))
    print(f"{'step':<36} {'viewer RSS MB':>14}")
    for name, rss in rows:
        print(f"{name:<36} {rss:>14.0f}")


if __name__ == "__main__":
    main()
