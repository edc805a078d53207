"""How long the sample studies take to generate, the server takes to answer, and the datastore
takes to list and serve an image.

Run: ``.venv/bin/python benchmarks/server_startup.py [--repeats N]``. Prints a table of seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from server_harness import start_monailabel  # noqa: E402

from vila_m3.samples import CT_ID, generate_samples  # noqa: E402


def timed(action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20, help="requests per measured endpoint")
    args = parser.parse_args()

    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="vila-m3-bench-") as tmp:
        work = Path(tmp)
        seconds, _ = timed(lambda: generate_samples(work / "samples", seed=0))
        rows.append(("generate sample studies (cold)", seconds))
        seconds, _ = timed(lambda: generate_samples(work / "samples", seed=0))
        rows.append(("generate sample studies (up to date)", seconds))

        seconds, server = timed(lambda: start_monailabel(work / "server", work / "samples" / "studies"))
        rows.append(("server start until /info/ answers", seconds))
        try:
            for label, path, params in (
                ("GET /info/ (median)", "/info/", {}),
                ("GET /datastore/?output=all (median)", "/datastore/", {"output": "all"}),
                (f"GET /datastore/image {CT_ID} (median)", "/datastore/image", {"image": CT_ID}),
            ):
                samples = [timed(lambda p=path, q=params: server.get(p, params=q).raise_for_status())[0]
                           for _ in range(args.repeats)]
                rows.append((label, statistics.median(samples)))
        finally:
            server.stop()

    width = max(len(label) for label, _ in rows)
    print(f"{'measurement':<{width}}  seconds")
    for label, seconds in rows:
        print(f"{label:<{width}}  {seconds:8.3f}")


if __name__ == "__main__":
    main()
