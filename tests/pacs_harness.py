"""Start and stop a real Orthanc PACS (with its DICOMweb plugin) and load the sample DICOM studies.

Orthanc comes from Debian's packages ``orthanc`` and ``orthanc-dicomweb`` (``make pacs-deps`` installs
them where missing). It runs as a subprocess serving HTTP on 127.0.0.1 only (remote access off, no
login, no DICOM port), its configuration, database and storage inside a given folder. Instances are
loaded through Orthanc's REST API (``POST /instances``); clients then use ``<url>/dicom-web``.

Run as a script it serves the samples until interrupted (``make pacs``)::

    python tests/pacs_harness.py --samples sample_data --workdir .pacs --port 8042
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_harness import free_port, stop_process_group  # noqa: E402

PACKAGES = "orthanc orthanc-dicomweb"
"""Debian's packages that provide Orthanc and its DICOMweb plugin."""
PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)
START_TIMEOUT_S = 60.0


def orthanc_binary() -> str | None:
    """The ``Orthanc`` executable on PATH (or in /usr/sbin, where Debian puts it), or None."""
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's shared library installed by ``orthanc-dicomweb``, or None."""
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def missing_reason() -> str | None:
    """Why Orthanc cannot be started here (naming the packages to install), or None if it can."""
    missing = [name for name, found in (("Orthanc", orthanc_binary()), ("its DICOMweb plugin", dicomweb_plugin()))
               if not found]
    if not missing:
        return None
    return (f"{' and '.join(missing)} not found: install Debian's packages {PACKAGES} "
            f"(`apt-get install -y {PACKAGES}`, or `make pacs-deps` as root)")


@dataclass
class RunningOrthanc:
    """A started Orthanc: its REST URL, DICOMweb root, process and log."""

    url: str
    process: subprocess.Popen
    log_path: Path
    series: dict[str, str] = field(default_factory=dict)
    """Loaded sample series: name (``ct_abdomen``, ``cxr_chest``, ``brain_mri_t1c`` ...) -> SeriesInstanceUID."""

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def upload(self, paths: Iterable[Path]) -> list[dict]:
        """POST each DICOM file to ``/instances``; Orthanc's answers (``ParentSeries`` ...)."""
        answers = []
        with requests.Session() as session:
            for path in paths:
                response = session.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=60,
                                        headers={"Content-Type": "application/dicom"})
                response.raise_for_status()
                answers.append(response.json())
        return answers

    def series_uids(self) -> list[str]:
        """SeriesInstanceUID of every series Orthanc holds (QIDO-RS)."""
        found = requests.get(f"{self.dicomweb_url}/series", timeout=30).json()
        return [item["0020000E"]["Value"][0] for item in found]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        stop_process_group(self.process)


def write_config(workdir: Path, port: int) -> Path:
    """Orthanc's configuration for ``workdir``: storage there, HTTP on ``port`` from this machine only,
    no login, no DICOM port, DICOMweb at ``/dicom-web/`` (STOW-RS included)."""
    plugin = dicomweb_plugin()
    if plugin is None:
        raise RuntimeError(missing_reason())
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "vila-m3-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def start_orthanc(workdir: Path, port: int | None = None, timeout_s: float = START_TIMEOUT_S) -> RunningOrthanc:
    """Orthanc on 127.0.0.1:``port`` (a free one by default) with everything inside ``workdir``; waits until
    its REST API and DICOMweb answer."""
    binary = orthanc_binary()
    if binary is None:
        raise RuntimeError(missing_reason())
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = write_config(workdir, port)
    log_path = workdir / "orthanc.log"
    log = log_path.open("w", encoding="utf-8")
    process = subprocess.Popen([binary, str(config)], cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    orthanc = RunningOrthanc(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{orthanc.log_tail()}")
        try:
            if requests.get(f"{orthanc.dicomweb_url}/studies", timeout=2).status_code == 200:
                return orthanc
        except requests.RequestException:
            pass
        time.sleep(0.3)
    orthanc.stop()
    raise RuntimeError(f"Orthanc did not answer within {timeout_s:.0f} s:\n{orthanc.log_tail()}")


def sample_series(samples: Path) -> dict[str, list[Path]]:
    """The sample DICOM files by series name: the CT, the chest X-ray and the four MRI sequences."""
    manifest = json.loads((samples / "manifest.json").read_text(encoding="utf-8"))
    studies = manifest["studies"]
    series = {"ct_abdomen": sorted((samples / studies["ct_abdomen"]["files"]["dicom"]).glob("*.dcm")),
              "cxr_chest": [samples / studies["cxr_chest"]["files"]["dicom"]]}
    for sequence, folder in studies["brain_mri"]["dicom_series"].items():
        series[f"brain_mri_{sequence}"] = sorted((samples / folder).glob("*.dcm"))
    return series


def load_samples(orthanc: RunningOrthanc, samples: Path, names: Sequence[str] | None = None) -> dict[str, str]:
    """Upload the sample series (all, or ``names``) and return name -> SeriesInstanceUID."""
    import pydicom

    for name, paths in sample_series(samples).items():
        if names is not None and name not in names:
            continue
        orthanc.upload(paths)
        orthanc.series[name] = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    return dict(orthanc.series)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the samples from an Orthanc on 127.0.0.1 until interrupted."""
    parser = argparse.ArgumentParser(description="An Orthanc PACS on 127.0.0.1 with the sample studies.")
    parser.add_argument("--samples", type=Path, default=Path("sample_data"))
    parser.add_argument("--workdir", type=Path, default=Path(".pacs"))
    parser.add_argument("--port", type=int, default=8042)
    args = parser.parse_args(argv)
    reason = missing_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    orthanc = start_orthanc(args.workdir.resolve(), args.port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop Orthanc on SIGTERM too, not only Ctrl-C
    try:
        series = load_samples(orthanc, args.samples.resolve())
        for name, uid in series.items():
            print(f"{name}: series {uid}")
        print(f"Orthanc on {orthanc.url} (storage in {args.workdir}); DICOMweb: {orthanc.dicomweb_url}")
        print(f"Start the server with: make run STUDIES={orthanc.dicomweb_url}   (Ctrl-C here stops the PACS)")
        orthanc.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        orthanc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
