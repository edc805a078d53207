"""Uploads, results and the event loop, through a real MONAI Label server (our ``/infer`` and ``/session``).

Failed uploads leave no file behind; bodies over a route's limit are refused with 413 while they stream in;
sessions are bounded; MONAI Label's own client on the same machine keeps every result file; and ``/info/``
keeps answering while slow chat turns run. The VLM is the remote backend talking to a scripted
OpenAI-compatible server on 127.0.0.1; VISTA3D is the stand-in through the real runner.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import statistics
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from fake_openai_server import FakeOpenAIServer, Reply, sse, stream_events
from monailabel.client import MONAILabelClient
from server_harness import RunningServer, copy_app, stand_in_site, start_monailabel

from vila_m3.imaging import read_labelmap

pytestmark = [pytest.mark.server, pytest.mark.security]

MB = 2**20
UPLOAD_LIMIT_MB = 3
SESSIONS_MAX_GB = 0.006  # 6.4 MB: two copies of the sample CT (2.2 MB each) fit, a third does not



@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, fake_vlm: FakeOpenAIServer) -> Iterator[dict]:
    """A server with the chat and stand-in VISTA3D, small upload and session limits, and files left in its
    upload and result folders as if an earlier run had crashed."""
    root = tmp_path_factory.mktemp("uploads-server")
    studies, conf = stand_in_site(root, sample_data, fake_vlm.url, conf={
        "max_upload_mb": str(UPLOAD_LIMIT_MB), "max_request_kb": "64", "sessions_max_gb": str(SESSIONS_MAX_GB)})
    app_dir = copy_app(root / "app")
    stale = [app_dir / "tmp" / "uploads" / "left-over.nii.gz", app_dir / "tmp" / "results" / "old-result.nii.gz"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"from a crashed run")
    server = start_monailabel(root, studies, conf=conf, app_dir=app_dir)
    try:
        yield {"server": server, "root": root, "app": app_dir, "port": int(server.url.rsplit(":", 1)[1]),
               "stale": stale, "tmp": root / "tmp", "sessions": root / "sessions"}
    finally:
        server.stop()


def listing(folder: Path) -> set[str]:
    """Every path under ``folder``, relative to it."""
    return {str(path.relative_to(folder)) for path in folder.rglob("*")} if folder.exists() else set()


def infer(server: RunningServer, model: str, query: dict | None = None, params: str | dict = "{}",
          files: dict | None = None) -> requests.Response:
    data = {"params": params if isinstance(params, str) else json.dumps(params)}
    return requests.post(f"{server.url}/infer/{model}", params=query or {}, data=data, files=files, timeout=300)


def new_session(server: RunningServer, path: Path, **query) -> requests.Response:
    return requests.put(f"{server.url}/session/", params=query, files=[("files", (path.name, path.read_bytes()))],
                        timeout=120)


def test_files_left_by_an_earlier_run_are_removed_at_start(site):
    assert not any(path.exists() for path in site["stale"])
    assert listing(site["app"] / "tmp" / "uploads") == set() and listing(site["app"] / "tmp" / "results") == set()


def test_failed_uploads_leave_no_file_behind(site, sample_data, fake_vlm, tmp_path):
    server = site["server"]
    ct = (sample_data / "studies" / "ct_abdomen.nii.gz").read_bytes()
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.raw", bytes(2 * UPLOAD_LIMIT_MB * MB))
    fake_vlm.script(sse(["It is a CT of the abdomen."]))
    before = {"tmp": listing(site["tmp"]), "sessions": listing(site["sessions"]), "studies": listing(site["root"] / "studies")}
    corrupt = ("scan.nii.gz", gzip.compress(b"not a volume at all"))

    cases = [
        ("corrupt .nii.gz", lambda: infer(server, "vista3d", params={"group": "organs"}, files={"file": corrupt})),
        ("truncated .nii.gz", lambda: infer(server, "vista3d", params={"group": "organs"},
                                            files={"file": ("ct.nii.gz", ct[: len(ct) // 2])})),
        ("random .nrrd", lambda: infer(server, "vista3d", files={"file": ("ct.nrrd", b"NRRD0004\nrandom")})),
        ("empty file", lambda: infer(server, "vista3d", files={"file": ("ct.nii.gz", b"")})),
        ("traversing name", lambda: infer(server, "vista3d", files={"file": ("../../evil.nii.gz", b"\x1f\x8b!")})),
        ("params not JSON", lambda: infer(server, "vista3d", params="{group: organs", files={"file": corrupt})),
        ("params an array", lambda: infer(server, "vista3d", params="[1, 2]", files={"file": corrupt})),
        ("params not UTF-8", lambda: requests.post(
            f"{server.url}/infer/vista3d", files={"params": (None, b'{"group": "\xff\xfe organs"}'), "file": corrupt},
            timeout=60)),
        ("params.image a host path", lambda: infer(server, "vista3d", params={"image": "/etc/passwd"},
                                                   files={"file": corrupt})),
        ("unknown model", lambda: infer(server, "segment_anything", files={"file": corrupt})),
        ("expert not on this server", lambda: infer(server, "brats", files={"file": corrupt})),
        ("unknown group", lambda: infer(server, "vista3d", params={"group": "kidney stones"},
                                        files={"file": ("ct.nii.gz", ct)})),
        ("unknown label id", lambda: infer(server, "vista3d", params={"label_prompt": [999]},
                                           files={"file": ("ct.nii.gz", ct)})),
        (".bin label of the wrong size", lambda: infer(server, "vista3d", {"image": "ct_abdomen"},
                                                       files={"label": ("scribbles.bin", b"\x01\x02\x03")})),
        ("output=image without labels", lambda: infer(server, "vila_m3", {"output": "image"},
                                                      {"prompt": "What is this?", "chat_id": "upload-chat"},
                                                      files={"file": ("ct.nii.gz", ct)})),
        ("upload over the limit", lambda: infer(server, "vista3d", files={"file": ("big.nii.gz", bytes(4 * MB))})),
        ("session: uncompress a non-zip", lambda: requests.put(
            f"{server.url}/session/", params={"uncompress": "true"}, files=[("files", ("ct.nii.gz", ct))], timeout=60)),
        ("session: over the limit", lambda: requests.put(
            f"{server.url}/session/", files=[("files", ("big.nii.gz", bytes(4 * MB)))], timeout=60)),
        ("session: zip unpacking past the limit", lambda: requests.put(
            f"{server.url}/session/", params={"uncompress": "true"}, files=[("files", ("bomb.zip", bomb.getvalue()))],
            timeout=60)),
        ("session: two files to uncompress", lambda: requests.put(
            f"{server.url}/session/", params={"uncompress": "true"},
            files=[("files", ("a.zip", bomb.getvalue())), ("files", ("b.zip", bomb.getvalue()))], timeout=60)),
        ("datastore: params not JSON", lambda: requests.put(
            f"{server.url}/datastore/image", params={"image": "new_ct"}, data={"params": "{bad"},
            files={"file": ("new_ct.nii.gz", ct)}, timeout=60)),
        ("datastore: label params an array", lambda: requests.put(
            f"{server.url}/datastore/label", params={"image": "ct_abdomen"}, data={"params": "[1]"},
            files={"label": ("label.nii.gz", ct)}, timeout=60)),
        ("datastore: traversing tag", lambda: requests.put(
            f"{server.url}/datastore/label", params={"image": "ct_abdomen", "tag": "../../../x/evil"},
            files={"label": ("label.nii.gz", ct)}, timeout=60)),
    ]
    assert len(cases) >= 20
    statuses = {}
    for name, send in cases:
        response = send()
        statuses[name] = response.status_code
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        assert str(site["root"]) not in response.text, (name, response.text[:300])
    assert statuses["unknown model"] == 404 and statuses["upload over the limit"] == 413
    assert statuses["session: over the limit"] == 413 and statuses["session: uncompress a non-zip"] == 422
    assert statuses["datastore: params not JSON"] == 422

    assert listing(site["app"] / "tmp" / "uploads") == set()
    assert listing(site["app"] / "tmp" / "results") == set()
    assert listing(site["tmp"]) == before["tmp"]
    assert listing(site["sessions"]) == before["sessions"]
    assert listing(site["root"] / "studies") == before["studies"]
    assert not list(site["root"].rglob("evil.nii.gz"))


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(site):
    """Content-Length over the limit: the 413 comes back although not one byte of the body was sent."""
    conn = http.client.HTTPConnection("127.0.0.1", site["port"], timeout=30)
    conn.putrequest("POST", "/infer/vista3d?image=ct_abdomen")
    conn.putheader("Content-Type", "multipart/form-data; boundary=xyz")
    conn.putheader("Content-Length", str(6 * MB))
    conn.endheaders()  # the headers only
    response = conn.getresponse()
    assert response.status == 413
    assert f"the limit of this route is {UPLOAD_LIMIT_MB} MB" in json.loads(response.read())["detail"]
    conn.close()


def test_a_streamed_body_over_the_limit_is_refused_while_it_streams(site):
    """No Content-Length (chunked): the server counts the chunks and answers 413 once past the limit,
    without waiting for the rest; nothing of the body stays on disk."""
    conn = http.client.HTTPConnection("127.0.0.1", site["port"], timeout=60)
    conn.putrequest("PUT", "/session/")
    conn.putheader("Content-Type", "multipart/form-data; boundary=xyz")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    head = b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="big.nii.gz"\r\n\r\n'
    chunk = bytes(256 * 1024)
    sent = 0
    try:
        conn.send(b"%x\r\n%s\r\n" % (len(head), head))
        while sent < 40 * UPLOAD_LIMIT_MB * MB:  # far more than the limit: the server must stop it first
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = conn.getresponse()
    assert response.status == 413
    assert "request body too large" in json.loads(response.read())["detail"]
    conn.close()
    assert sent < 40 * UPLOAD_LIMIT_MB * MB, "the server read the whole body instead of stopping at the limit"
    assert listing(site["app"] / "tmp" / "uploads") == set()


def test_json_routes_have_the_small_limit(site):
    response = requests.post(f"{site['server'].url}/vila_m3/chat/stream", params={"image": "ct_abdomen"},
                             data={"params": json.dumps({"prompt": "x" * 100_000, "chat_id": "big"})}, timeout=60)
    assert response.status_code == 413 and "64 KB" in response.json()["detail"]


def test_sessions_are_bounded_in_total_and_expired_ones_make_room(site, sample_data):
    server = site["server"]
    ct = sample_data / "studies" / "ct_abdomen.nii.gz"
    created = [new_session(server, ct, expiry=2) for _ in range(2)]
    assert [response.status_code for response in created] == [200, 200], created[-1].text
    full = new_session(server, ct)
    assert full.status_code == 507 and "session storage is full" in full.json()["detail"]
    assert str(site["root"]) not in full.text
    time.sleep(3.5)  # both sessions have expired
    for response in created:
        assert server.get(f"/session/{response.json()['session_id']}").status_code == 404
    again = new_session(server, ct)
    assert again.status_code == 200, again.text
    info = again.json()["session_info"]
    assert info["image"] == "ct_abdomen.nii.gz" and info["path"] == again.json()["session_id"]
    assert requests.delete(f"{server.url}/session/{again.json()['session_id']}", timeout=30).status_code == 200


def test_a_session_from_a_zip_and_bad_session_ids(site, sample_data, tmp_path):
    server = site["server"]
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted((sample_data / "dicom" / "ct_abdomen").glob("*.dcm"))[:5]:
            bundle.write(path, f"series/{path.name}")
    created = new_session(server, archive, uncompress="true")
    assert created.status_code == 200, created.text
    session_id = created.json()["session_id"]
    assert server.get(f"/session/{session_id}").status_code == 200
    assert server.get(f"/session/{session_id}", params={"image": "true"}).status_code == 422  # a folder
    assert requests.delete(f"{server.url}/session/{session_id}", timeout=30).status_code == 200
    for bad in ("..", "%2E%2E", "not-a-session", "0" * 36):
        conn = http.client.HTTPConnection("127.0.0.1", site["port"], timeout=30)
        conn.request("DELETE", f"/session/{bad}")  # sent as written: no client-side '..' folding
        assert conn.getresponse().status == 404, bad
        conn.close()
    assert site["sessions"].is_dir() and site["root"].is_dir()


def test_a_session_of_more_than_a_thousand_files(site):
    """A thin-slice DICOM series comes as one file per slice: past Starlette's default of 1000 files a form."""
    files = [("files", (f"slice{number:04d}.dcm", b"DICM slice %d" % number)) for number in range(1200)]
    created = requests.put(f"{site['server'].url}/session/", files=files, timeout=120)
    assert created.status_code == 200, created.text[:300]
    session_id = created.json()["session_id"]
    stored = [path for path in (site["sessions"] / session_id).rglob("*.dcm")]
    assert len(stored) == 1200
    assert requests.delete(f"{site['server'].url}/session/{session_id}", timeout=30).status_code == 200


def test_the_stock_client_keeps_twenty_of_twenty_result_files(site, sample_data, monkeypatch):
    """MONAI Label's client with its default temp folder, which here is the server's own (one machine)."""
    monkeypatch.setattr(tempfile, "tempdir", str(site["tmp"]))
    client = MONAILabelClient(site["server"].url)
    session_id = client.create_session(str(sample_data / "nrrd" / "ct_abdomen.nrrd"))["session_id"]
    results = []
    for number in range(20):
        if number % 2:
            label_file, params = client.infer("vista3d", "", {"group": "organs"}, session_id=session_id)
        else:
            label_file, params = client.infer("vista3d", "ct_abdomen", {"group": "hepatic tumor"})
        assert params["expert"] == "VISTA3D"
        results.append(Path(label_file))
    time.sleep(1.0)  # the server removes its copies after each answer
    assert all(path.parent == site["tmp"] for path in results)
    assert len(set(results)) == 20
    assert sum(path.is_file() for path in results) == 20
    assert read_labelmap(results[-1]).array.ndim == 3
    assert listing(site["app"] / "tmp" / "results") == set()
    client.remove_session(session_id)


def test_output_formats_are_monai_labels(site):
    server = site["server"]
    as_json = infer(server, "vista3d", {"image": "ct_abdomen", "output": "json"}, {"group": "organs"})
    assert as_json.status_code == 200 and as_json.json()["expert"] == "VISTA3D"
    as_image = infer(server, "vista3d", {"image": "ct_abdomen", "output": "image"}, {"group": "organs"})
    assert as_image.status_code == 200 and as_image.content[:2] == b"\x1f\x8b"
    assert as_image.headers["content-disposition"].endswith('.nii.gz"')
    as_all = infer(server, "vista3d", {"image": "ct_abdomen", "output": "all"}, {"group": "organs"})
    assert as_all.headers["content-type"].startswith("multipart/form-data")
    assert infer(server, "vista3d", {"image": "ct_abdomen"}, "[]").status_code == 422
    missing = infer(server, "vista3d", params={"group": "organs"})
    assert missing.status_code == 422 and "no image" in missing.json()["detail"]
    time.sleep(0.5)
    assert listing(site["app"] / "tmp" / "results") == set()


def test_info_and_datastore_answer_within_200_ms_while_chat_turns_and_an_expert_run(site, fake_vlm):
    """Two chat turns whose VLM takes 4 s each and one uncached VISTA3D infer run through /infer; /info/ and
    /datastore/ are polled meanwhile (MONAI Label's own /infer route held both for the whole turn)."""
    server = site["server"]
    server.get("/info/")  # warm
    fake_vlm.script(Reply(events=stream_events(["It is ", "a CT."]), delay_s=4.0),
                    Reply(events=stream_events(["Still ", "a CT."]), delay_s=4.0))
    prompt = "Describe the abdomen of patient canary-zebra-4471"
    answers: dict[str, requests.Response] = {}

    def turn(chat_id: str) -> None:
        answers[chat_id] = infer(server, "vila_m3", {"image": "ct_abdomen", "output": "json"},
                                 {"prompt": prompt, "chat_id": chat_id})

    def expert() -> None:
        answers["vista3d"] = infer(server, "vista3d", {"image": "ct_abdomen", "output": "json"},
                                   {"label_prompt": [3, 5, 14]})  # asked for by no other test: not cached

    workers = [threading.Thread(target=turn, args=(f"slow-{n}",)) for n in range(2)]
    workers.append(threading.Thread(target=expert))
    started = time.perf_counter()
    for thread in workers:
        thread.start()
    time.sleep(0.3)
    latencies: dict[str, list[float]] = {"/info/": [], "/datastore/": []}
    while any(thread.is_alive() for thread in workers):
        for route, timings in latencies.items():
            begin = time.perf_counter()
            assert server.get(route, timeout=30).status_code == 200
            timings.append(time.perf_counter() - begin)
        time.sleep(0.05)
    for thread in workers:
        thread.join()
    assert time.perf_counter() - started >= 4.0
    assert {name: answer.status_code for name, answer in answers.items()} == \
        {"slow-0": 200, "slow-1": 200, "vista3d": 200}, [a.text[:300] for a in answers.values()]
    assert answers["vista3d"].json()["cached"] is False
    for route, timings in latencies.items():
        assert len(timings) >= 10, route
        p95 = statistics.quantiles(timings, n=20)[-1]
        assert p95 <= 0.2, f"{route} p95 {p95:.3f} s during the turns (max {max(timings):.3f} s)"

    log = server.log_path.read_text(encoding="utf-8", errors="replace")
    assert "canary-zebra" not in log
    assert hashlib.sha256(prompt.encode()).hexdigest()[:12] in log
