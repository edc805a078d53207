"""The audit trail through a real server: one line per chat turn and per expert infer, whichever route it
comes by and however it ends, with every field, ids hashed, and nothing of the study's DICOM headers or the
prompts in the file, which stays valid JSON lines after the server is killed.

The VLM is the real remote backend talking to a scripted OpenAI-compatible test double on 127.0.0.1; VISTA3D
runs stand-in weights through the real runner. The chats are on the sample CT's DICOM series, uploaded as a
session (``PUT /session/``), as a Slicer user would send it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from fake_openai_server import FakeOpenAIServer, sse
from server_harness import RunningServer, chat_server_with_stand_ins

from vila_m3.audit import FIELDS, hashed

pytestmark = pytest.mark.server

TRIGGER = ["This looks like a CT image. ", "Let me trigger <VISTA3D(hepatic tumor)>."]
PROMPTS = {
    "infer": "Is there a liver tumour in patient audit-okapi-5521?",
    "stream": "Segment the organs of audit-heron-0193 please",
    "cancel": "Describe every organ of audit-lynx-7742 slowly",
}



@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, fake_vlm: FakeOpenAIServer) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("audit-server")
    audit = root / "audit" / "audit.jsonl"
    with chat_server_with_stand_ins(root, sample_data, fake_vlm.url, conf={"audit_log": str(audit)}) as server:
        series = sorted((sample_data / "dicom" / "ct_abdomen").glob("*.dcm"))
        files = [("files", (path.name, path.read_bytes())) for path in series]
        created = requests.put(f"{server.url}/session/", files=files, timeout=120)
        assert created.status_code == 200, created.text
        yield {"server": server, "audit": audit, "session": created.json()["session_id"], "series": series}


def lines(site: dict) -> list[dict]:
    path = site["audit"]
    return [json.loads(text) for text in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def new_line(site: dict, before: int, timeout_s: float = 10.0) -> dict:
    """The one line written since there were ``before`` lines (a stream's is written as its turn ends)."""
    deadline = time.monotonic() + timeout_s
    while len(found := lines(site)) <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # and no second one
    found = lines(site)
    assert len(found) == before + 1, found[before:]
    line = found[-1]
    assert tuple(line) == FIELDS
    assert line["user"] == "anonymous"  # login off: MONAI Label's default user would be "admin"
    assert isinstance(line["duration_s"], float) and line["duration_s"] > 0
    assert line["queue_wait_s"] is None or line["queue_wait_s"] >= 0
    return line


def chat(site: dict, params: dict, **query) -> requests.Response:
    query = {"session_id": site["session"], "output": "all", **query}
    return requests.post(f"{site['server'].url}/infer/vila_m3", params=query, data={"params": json.dumps(params)},
                         timeout=300)


def stream_events(site: dict, params: dict) -> tuple[requests.Response, list[tuple[str, dict]]]:
    response = requests.post(f"{site['server'].url}/vila_m3/chat/stream", params={"session_id": site["session"]},
                             data={"params": json.dumps(params)}, stream=True, timeout=300)
    events = []
    if response.status_code == 200:
        for block in response.iter_content(chunk_size=None, decode_unicode=True):
            for chunk in block.split("\n\n"):
                fields = dict(line.split(": ", 1) for line in chunk.splitlines() if line and not line.startswith(":"))
                if "event" in fields:
                    events.append((fields["event"], json.loads(fields["data"])))
    return response, events


def test_a_chat_turn_through_infer_that_runs_vista3d(site, fake_vlm):
    fake_vlm.script(sse(TRIGGER), sse(["Yes, ", "the liver shows a lesion."]))
    before = len(lines(site))
    response = chat(site, {"prompt": PROMPTS["infer"], "chat_id": "audit-chat-1", "slice_index": 20}, output="json")
    assert response.status_code == 200, response.text[:500]
    line = new_line(site, before)
    waits = [step["seconds"] for step in response.json()["timings"] if step["step"] == "queue wait"]
    assert line["queue_wait_s"] == (round(sum(waits), 4) if waits else None)  # the work queue's, where it reports
    assert line["route"] == "/infer/vila_m3"
    assert line["chat"] == hashed("audit-chat-1") and line["study"] == hashed(site["session"])
    assert "fake-vila-m3" in line["model"] and line["stand_in"] is False
    assert line["experts"] == [{"name": "VISTA3D", "argument": "hepatic tumor"}]
    assert (line["outcome"], line["status"]) == ("ok", 200)


def test_a_chat_turn_through_the_stream_route(site, fake_vlm):
    fake_vlm.script(sse(["Let me ", "trigger ", "<VISTA3D(organs)>."]), sse(["Organs ", "are ", "segmented."]))
    before = len(lines(site))
    response, events = stream_events(site, {"prompt": PROMPTS["stream"], "chat_id": "audit-chat-2"})
    assert response.status_code == 200 and events[-1][0] == "final", events[-3:]
    line = new_line(site, before)
    assert line["route"] == "/vila_m3/chat/stream"
    assert line["chat"] == hashed("audit-chat-2") and line["study"] == hashed(site["session"])
    assert "fake-vila-m3" in line["model"] and line["stand_in"] is False
    assert line["experts"] == [{"name": "VISTA3D", "argument": "organs"}]
    assert (line["outcome"], line["status"]) == ("ok", 200)


def test_a_vista3d_infer(site):
    before = len(lines(site))
    response = requests.post(f"{site['server'].url}/infer/vista3d", params={"image": "ct_abdomen", "output": "json"},
                             data={"params": json.dumps({"group": "hepatic tumor"})}, timeout=300)
    assert response.status_code == 200, response.text[:500]
    line = new_line(site, before)
    assert line["route"] == "/infer/vista3d" and line["chat"] is None and line["study"] == hashed("ct_abdomen")
    assert (line["model"], line["stand_in"]) == ("VISTA3D", True)
    queued = response.json()["latencies"].get("queue")  # an uncached run waits in the work queue, a cached one not
    assert line["queue_wait_s"] == (None if queued is None else round(queued, 4))
    assert line["experts"] == [{"name": "VISTA3D", "argument": "hepatic tumor"}]
    assert (line["outcome"], line["status"]) == ("ok", 200)


@pytest.mark.parametrize(
    ("route", "params"),
    [("/infer/vista3d", {"group": "kidney stones"}),
     ("/infer/vila_m3", {"prompt": PROMPTS["infer"], "chat_id": "audit-chat-3", "temperature": 99}),
     ("/vila_m3/chat/stream", {"prompt": PROMPTS["stream"], "chat_id": "audit-chat-3", "axis": "oblique"})],
    ids=["expert", "chat-infer", "chat-stream"],
)
def test_a_refused_request_is_a_failed_line_with_its_status(site, fake_vlm, route, params):
    before = len(lines(site))
    asked = len(fake_vlm.posts)
    response = requests.post(f"{site['server'].url}{route}", params={"session_id": site["session"]},
                             data={"params": json.dumps(params)}, timeout=300)
    assert response.status_code == 422, response.text[:500]
    line = new_line(site, before)
    assert line["route"] == route and line["study"] == hashed(site["session"])
    assert (line["outcome"], line["status"]) == ("failed", 422)
    assert line["experts"] == [] and line["model"] in ("vista3d", "vila_m3")
    assert line["chat"] == (hashed("audit-chat-3") if "chat_id" in params else None)
    assert len(fake_vlm.posts) == asked


def test_a_cancelled_turn_through_infer(site, fake_vlm):
    fake_vlm.script(sse([f"word{i} " for i in range(60)], event_delay_s=0.2))
    before = len(lines(site))
    answers: list[requests.Response] = []
    worker = threading.Thread(target=lambda: answers.append(
        chat(site, {"prompt": PROMPTS["cancel"], "chat_id": "audit-chat-4"}, output="json")))
    worker.start()
    deadline = time.monotonic() + 60
    cancelled = False
    while not cancelled and time.monotonic() < deadline and worker.is_alive():
        time.sleep(0.3)
        cancelled = requests.post(f"{site['server'].url}/vila_m3/chat/audit-chat-4/cancel", timeout=10).json()["cancelled"]
    worker.join(120)
    assert cancelled and answers and answers[0].status_code == 200, answers and answers[0].text[:300]
    assert answers[0].json()["cancelled"] is True
    line = new_line(site, before)
    assert line["route"] == "/infer/vila_m3" and line["chat"] == hashed("audit-chat-4")
    assert (line["outcome"], line["status"]) == ("cancelled", 200)


def dicom_identifiers(series: list[Path]) -> set[str]:
    """Every name, id, date and UID in the headers of the uploaded series: ``PN``, ``LO``, ``SH``, ``DA``,
    ``DT``, ``UI`` values of 4 characters or more (e.g. PatientName and its parts, PatientID, AccessionNumber,
    StudyInstanceUID), dates also as ISO dates (``2024-01-15``); a StudyID of "1" names nobody."""
    found: set[str] = set()
    for path in series:
        dataset = pydicom.dcmread(path)
        for element in [*dataset.iterall(), *dataset.file_meta]:
            value = str(element.value).strip()
            if element.VR not in ("PN", "LO", "SH", "DA", "DT", "UI") or len(value) < 4:
                continue
            found.add(value)
            if element.VR == "PN":
                found.update(part for part in value.split("^") if len(part) >= 4)
            if element.VR in ("DA", "DT") and len(value) >= 8:
                found.add(f"{value[:4]}-{value[4:6]}-{value[6:8]}")
    return found


def test_the_file_holds_no_dicom_identifiers_nor_prompts_and_survives_a_kill(site):
    identifiers = dicom_identifiers(site["series"])
    first = pydicom.dcmread(site["series"][0])
    assert {str(first.PatientName), str(first.PatientID), str(first.PatientBirthDate), str(first.StudyDate),
            str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.SOPInstanceUID)} <= identifiers
    server: RunningServer = site["server"]
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)

    text = site["audit"].read_text(encoding="utf-8")
    written = [json.loads(line) for line in text.splitlines()]  # every line is whole JSON after the kill
    assert len(written) == 7 and all(tuple(line) == FIELDS for line in written)
    assert {line["outcome"] for line in written} == {"ok", "failed", "cancelled"}
    leaked = sorted(value for value in identifiers if value in text)
    assert not leaked, f"DICOM header values in the audit log: {leaked}"
    for secret in [*PROMPTS.values(), "audit-okapi", "audit-heron", "audit-lynx", site["session"], "audit-chat",
                   "ct_abdomen", "admin"]:
        assert secret not in text
