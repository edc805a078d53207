"""Export throughput of the data engine (``vila-m3 datagen``) and how its time grows with the datastore.

A datastore of N abdominal CTs of 256 x 256 x 100 voxels, each with its final label, is exported with
the default settings (configs/datagen.yaml: every VISTA3D group present, 4 axial slices per group and
volume, the question kinds presence / visible / count / segment). The CTs are the synthetic sample
phantom (256 x 256 x 64, liver, spleen, kidneys, spine, three hepatic tumours) extended to 100 slices
by mirroring its last 36 slices, each copy with its own noise (so no record is a duplicate of another
copy's). Volumes are written once per run into a temporary folder; the timed part is
``export_dataset`` alone (read, render, write PNGs and JSON, hash, privacy scan).

For each N in ``--counts`` it prints wall-clock seconds, volumes per minute, unique records per second
(and as listed in train.json with the category repeats), images per second, seconds per volume, and
the time relative to the smallest N against the volume ratio (linear growth gives equal ratios).

Run: ``.venv/bin/python benchmarks/datagen_throughput.py [--counts 5,10,25,50] [--quick] [--repeat 1]``;
``--quick`` runs N = 2, 4, 8. Everything is written in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vila_m3.data import export_dataset
from vila_m3.samples.ct_phantom import geometry, make_ct_phantom

SLICES = 100


def make_volumes(folder: Path, count: int, seed: int = 0) -> list[tuple[Path, Path]]:
    """``count`` CTs (256 x 256 x 100, int16 HU) with labels, as NIfTI files under ``folder``."""
    phantom = make_ct_phantom(np.random.default_rng(seed))
    extra = SLICES - phantom.hu.shape[0]
    hu = np.concatenate([phantom.hu, phantom.hu[::-1][:extra]])
    labels = np.concatenate([phantom.labels, phantom.labels[::-1][:extra]])
    spacing, origin, direction = geometry()
    rng = np.random.default_rng(seed + 1)
    made = []
    for index in range(count):
        noisy = np.clip(hu + rng.normal(0.0, 4.0, hu.shape).astype(np.int16), -1024, 3071).astype(np.int16)
        pair = []
        for array, name in ((noisy, f"ct_{index:03d}.nii.gz"), (labels, f"label_{index:03d}.nii.gz")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(spacing)
            image.SetOrigin(origin)
            image.SetDirection(direction)
            path = folder / name
            sitk.WriteImage(image, str(path), useCompression=True)
            pair.append(path)
        made.append((pair[0], pair[1]))
    return made


def datastore_of(root: Path, volumes: list[tuple[Path, Path]]) -> Path:
    """A studies folder linking the first ``len(volumes)`` CTs and their labels (labels/final)."""
    studies = root / f"studies_{len(volumes)}"
    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    for index, (image, label) in enumerate(volumes):
        os.symlink(image, studies / f"ct_{index:03d}.nii.gz")
        os.symlink(label, final / f"ct_{index:03d}.nii.gz")
    return studies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="5,10,25,50", help="comma list of volume counts (default 5,10,25,50)")
    parser.add_argument("--quick", action="store_true", help="N = 2, 4, 8")
    parser.add_argument("--repeat", type=int, default=1, help="exports per N; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = [2, 4, 8] if args.quick else sorted({int(n) for n in args.counts.split(",") if n.strip()})

    print(f"datagen throughput: {platform.platform()}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPU cores; CT 256x256x{SLICES} + label per volume, default datagen.yaml")
    with tempfile.TemporaryDirectory(prefix="vila-m3-datagen-bench-") as scratch:
        root = Path(scratch)
        began = time.perf_counter()
        (root / "volumes").mkdir()
        volumes = make_volumes(root / "volumes", max(counts), args.seed)
        print(f"wrote {len(volumes)} volumes in {time.perf_counter() - began:.1f} s (not timed below)\n")
        header = (f"{'volumes':>7} {'seconds':>8} {'vol/min':>8} {'records':>8} {'rec/s':>7} {'listed/s':>9} "
                  f"{'images':>7} {'img/s':>7} {'s/volume':>9} {'time ratio':>11} {'volume ratio':>13}")
        print(header)
        first: tuple[int, float] | None = None
        rows = []
        for count in counts:
            studies = datastore_of(root, volumes[:count])
            times, result = [], None
            for attempt in range(args.repeat):
                out = root / f"out_{count}_{attempt}"
                start = time.perf_counter()
                result = export_dataset(studies, out, seed=args.seed, progress=False)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            counts_ = result.manifest["counts"]
            records, listed = counts_["records"], counts_["train"]["listed"] + counts_["val"]["records"]
            first = first or (count, seconds)
            rows.append((count, seconds))
            print(f"{count:>7} {seconds:>8.2f} {count / seconds * 60:>8.1f} {records:>8} {records / seconds:>7.1f} "
                  f"{listed / seconds:>9.1f} {counts_['images']:>7} {counts_['images'] / seconds:>7.1f} "
                  f"{seconds / count:>9.3f} {seconds / first[1]:>11.2f} {count / first[0]:>13.2f}")
            if not result.privacy_passed:
                print(f"privacy findings: {[str(f) for f in result.findings]}", file=sys.stderr)
                return 1
        if len(rows) >= 2:
            n = np.array([r[0] for r in rows], dtype=float)
            t = np.array([r[1] for r in rows])
            slope, intercept = np.polyfit(n, t, 1)
            print(f"\nlinear fit: time = {intercept:.2f} s + {slope:.3f} s x volumes "
                  f"(fixed cost: loading configs, question pools, expert registry; per volume: read, render, write)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
