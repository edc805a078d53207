"""The Slicer panel's pure-Python library (slicer_extension/VILAM3Chat/VILAM3ChatLib), without Slicer:
event-stream and multipart parsing, the chat display, segment specs and terminology, background
jobs, and the mapping from a slice view to the slice the server renders (checked against the
server's own ``vila_m3.imaging.slices``)."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from requests_toolbelt import MultipartEncoder

from vila_m3.imaging import Geometry, Volume
from vila_m3.imaging.slices import extract_slice, slice_index_at, slice_index_count

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "slicer_extension" / "VILAM3Chat"))

from VILAM3ChatLib import client as vclient  # noqa: E402
from VILAM3ChatLib.chat_state import ROLE_STYLES, ChatState  # noqa: E402
from VILAM3ChatLib.multipart import MultipartError, parse_multipart  # noqa: E402
from VILAM3ChatLib.segments import (  # noqa: E402
    TERMINOLOGY_FILE,
    assign_label_values,
    decode_label_values,
    encode_label_values,
    load_terminology,
    segment_specs,
    unnamed_segment_spec,
)
from VILAM3ChatLib.slice_mapping import (  # noqa: E402
    decode_grid,
    encode_grid,
    grid_axes_map,
    grids_match,
    slice_position,
    view_axis,
)
from VILAM3ChatLib.sse import SSEParser  # noqa: E402
from VILAM3ChatLib.worker import BackgroundJobs  # noqa: E402


def server_event(event: str, data: dict) -> bytes:
    """An event exactly as the server's stream route writes it."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


STREAM = b"".join([
    b": keep-alive\n\n",
    server_event("token", {"text": "Let me ", "round": 0}),
    server_event("token", {"text": "trigger <VISTA3D(hepatic tumor)> \u00e9t\u00e9", "round": 0}),
    b": keep-alive\n\n",
    server_event("expert_started", {"expert": "VISTA3D", "argument": "hepatic tumor"}),
    server_event("final", {"answer": "Yes.", "label_names": {"liver": 1}}),
])


# --- server-sent events --------------------------------------------------------------------------------


def parse_all(chunks) -> tuple[list, SSEParser]:
    parser = SSEParser()
    events = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.close())
    return events, parser


def test_sse_parses_the_servers_events_and_counts_keep_alives():
    events, parser = parse_all([STREAM])
    assert [event.event for event in events] == ["token", "token", "expert_started", "final"]
    assert events[1].json()["text"] == "trigger <VISTA3D(hepatic tumor)> \u00e9t\u00e9"
    assert events[3].json() == {"answer": "Yes.", "label_names": {"liver": 1}}
    assert parser.comments == 2


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_sse_gives_the_same_events_whatever_the_chunking(size):
    whole, _ = parse_all([STREAM])
    pieces = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]  # splits lines, CRLFs and UTF-8 characters
    split, _ = parse_all(pieces)
    assert split == whole and len(split) == 4


def test_sse_line_ends_crlf_cr_and_a_crlf_split_between_reads():
    crlf = b"event: a\r\ndata: 1\r\n\r\n"
    cr = b"event: b\rdata: 2\r\r"
    events, _ = parse_all([crlf[:9], crlf[9:10], crlf[10:], cr])  # 9/10 split the first CRLF pair
    assert [(event.event, event.data) for event in events] == [("a", "1"), ("b", "2")]


def test_sse_joins_data_lines_drops_events_without_data_and_unterminated_ones():
    events, _ = parse_all([b"\xef\xbb\xbfdata: one\ndata:two\n\nevent: empty\n\nid: 7\ndata: three\n\n", b"data: cut off"])
    assert [(event.event, event.data, event.id) for event in events] == [
        ("message", "one\ntwo", None), ("message", "three", "7")]


# --- multipart -----------------------------------------------------------------------------------------


def test_multipart_parses_monai_labels_answer_with_exact_binary_bytes():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes() + b"\r\n--\r\r\n\n"
    answer = {"answer": "Yes \u2014 a lesion.", "label_names": {"liver": 1}}
    encoder = MultipartEncoder(fields={"params": (None, json.dumps(answer), "application/json"),
                                       "image": ("vila_m3-x.nii.gz", label, "application/gzip")})
    parts = parse_multipart(encoder.to_string(), encoder.content_type)
    assert [part.name for part in parts] == ["params", "image"]
    assert json.loads(parts[0].text()) == answer and parts[0].filename is None
    assert parts[1].content == label and parts[1].filename == "vila_m3-x.nii.gz"
    assert parts[1].content_type == "application/gzip"


def test_multipart_rejects_what_is_not_multipart():
    with pytest.raises(MultipartError, match="not a multipart"):
        parse_multipart(b"{}", "application/json")
    with pytest.raises(MultipartError, match="boundary"):
        parse_multipart(b"--x\r\n\r\n--x--", "multipart/form-data")


# --- chat display --------------------------------------------------------------------------------------

TURN = [
    {"role": "user", "text": "Here is a list of available expert models:...<image>This is a CT image.\nIs it <b>?",
     "images": ["turn001_slice0.png"], "question": "Is it <b>?"},
    {"role": "assistant", "text": "Let me trigger <VISTA3D(hepatic tumor)>."},
    {"role": "expert", "text": "The results are <image>. The colors in this image describe red: liver.",
     "expert": "VISTA3D", "argument": "hepatic tumor", "images": ["expert001_vista3d.png"]},
    {"role": "expert", "text": "", "error": "unknown expert FOO", "to_model": False},
    {"role": "assistant", "text": "Yes, a lesion & more."},
]


def test_chat_state_streams_tokens_and_expert_lines_then_shows_the_servers_record():
    state = ChatState()
    state.start_turn("Is it <b>?", chat_id="c1")
    state.on_event("token", {"text": "Let me ", "round": 0})
    state.on_event("token", {"text": "trigger", "round": 0})
    assert state.busy and "Let me trigger" in state.to_html()
    state.on_event("expert_started", {"expert": "VISTA3D", "argument": "hepatic tumor"})
    assert [m.role for m in state.messages] == ["user", "assistant", "expert"]
    assert "running" in state.messages[-1].text
    state.on_event("expert_finished", {"expert": "VISTA3D", "argument": "hepatic tumor", "seconds": 2.25,
                                       "cached": True, "label_names": {"liver": 1, "hepatic tumor": 26}})
    assert state.messages[-1].text == "labels: liver, hepatic tumor (2.2 s, cached)"
    state.on_event("token", {"text": "Yes", "round": 1})
    state.on_event("final", {"chat_id": "c1", "answer": "Yes, a lesion & more.", "turn": TURN,
                             "vlm": {"stand_in": True, "notice": "random stand-in"},
                             "notices": ["random stand-in", "VISTA3D ran on stand-in weights (demo)"]})
    assert not state.busy
    assert [m.role for m in state.messages] == ["user", "assistant", "expert", "notice", "assistant", "notice",
                                                "notice"]
    assert state.messages[-1].text == "VISTA3D ran on stand-in weights (demo)"
    del state.messages[-1]
    assert state.messages[0].text == "Is it <b>?"  # the question, not the model card
    assert state.messages[2].title == "VISTA3D(hepatic tumor)" and "[overlay]" in state.messages[2].text
    assert state.messages[3].text == "unknown expert FOO"
    assert state.messages[-1].text == "random stand-in"
    shown = list(state.messages)
    state.finish_turn({"chat_id": "c1", "answer": "Yes, a lesion & more.", "turn": TURN})  # the returned answer
    assert state.messages == shown


def test_chat_state_shows_where_a_queued_turn_waits_and_ignores_unknown_events():
    state = ChatState()
    state.start_turn("Is it there?", chat_id="c1")
    state.on_event("queued", {"position": 2, "ahead": 3})
    assert state.waiting == "waiting for the server: 3 ahead" and "3 ahead" in state.to_html()
    state.on_event("queued", {"position": 1, "ahead": 1})
    assert "1 ahead" in state.to_html() and "3 ahead" not in state.to_html()
    state.on_event("some_future_event", {"anything": True})  # a newer server's event changes nothing shown
    assert [m.role for m in state.messages] == ["user"] and state.busy
    state.on_event("token", {"text": "Yes", "round": 0})
    assert state.waiting == "" and "ahead" not in state.to_html()
    state.on_event("queued", {"position": 1, "ahead": 0})
    assert state.waiting == "waiting for the server: next"
    state.on_event("final", {"chat_id": "c1", "answer": "", "turn": [], "cancelled": True})
    assert not state.busy and state.waiting == ""


def test_chat_state_html_escapes_text_and_styles_each_role_differently():
    state = ChatState()
    state.start_turn("<script>alert(1)</script>")
    state.on_event("final", {"answer": "a & b", "turn": TURN, "cancelled": True})
    state.fail("the server failed\nbadly")
    page = state.to_html()
    assert "<script>" not in page and "&lt;b&gt;" in page and "&amp; more" in page
    assert "the server failed<br>badly" in page
    assert len(set(ROLE_STYLES.values())) == len(ROLE_STYLES)
    for role in ("user", "assistant", "expert", "notice", "error"):
        assert ROLE_STYLES[role] in page, role
    assert "Stopped" in page


def test_chat_state_keeps_a_partial_answer_when_the_turn_fails():
    state = ChatState()
    state.start_turn("Describe")
    state.on_event("token", {"text": "The liver", "round": 0})
    state.fail("the server stopped answering")
    assert [(m.role, m.text) for m in state.messages] == [
        ("user", "Describe"), ("assistant", "The liver …(incomplete)"), ("error", "the server stopped answering")]
    assert not state.busy and not any(m.live for m in state.messages)


# --- segments and terminology --------------------------------------------------------------------------


def verhoeff_ok(number: str) -> bool:
    """SNOMED CT identifiers end with a Verhoeff check digit."""
    d = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
         [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
         [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
         [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
    p = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
         [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
         [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]
    check = 0
    for position, digit in enumerate(reversed(number)):
        check = d[check][p[position % 8][int(digit)]]
    return check == 0


def test_terminology_codes_are_well_formed_snomed_concepts_and_names_are_real_labels():
    table = json.loads(TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    for key, (scheme, value, meaning) in table["codes"].items():
        assert scheme == "SCT" and value.isdigit() and meaning, key
        assert verhoeff_ok(value), f"{key}: {value} fails the SNOMED CT check digit"
        assert value[-3:-1] == "00", f"{key}: {value} is not a concept id (partition 00)"
    vista3d = set(json.loads((REPO / "configs" / "vista3d_classes.json").read_text(encoding="utf-8"))["classes"].values())
    brats = {"tumor core", "edema", "enhancing tumor"}
    assert set(table["entries"]) <= vista3d | brats
    assert {"liver", "spleen", "left kidney", "pancreas", "hepatic tumor", "lung", "bone", "aorta",
            "vertebrae L1"} <= set(table["entries"])


def test_segment_specs_give_names_values_colours_and_terminology():
    specs = segment_specs({"hepatic tumor": 26, "background": 0, "liver": 1, "vertebrae S1": 127, "right kidney": 5},
                          {"liver": [221, 130, 101], "hepatic tumor": [255, 235, 0]})
    assert [(s.name, s.label_value) for s in specs] == [
        ("liver", 1), ("right kidney", 5), ("hepatic tumor", 26), ("vertebrae S1", 127)]
    assert specs[0].color == pytest.approx((221 / 255, 130 / 255, 101 / 255))
    assert specs[1].color == segment_specs({"right kidney": 5})[0].color  # no colour sent: a stable one
    assert specs[0].terminology_entry == ("Segmentation category and type - 3D Slicer General Anatomy list"
                                          "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
                                          "~Anatomic codes - DICOM master list~^^~^^")
    assert "~SCT^64033007^Kidney~SCT^24028007^Right~" in specs[1].terminology_entry
    tumor = specs[2].terminology
    assert (tumor.category.value, tumor.type.value, tumor.region.value) == ("49755003", "108369006", "10200004")
    generic = specs[3].terminology
    assert not generic.standard and generic.category.meaning == "Anatomical Structure"
    assert generic.type.meaning == "vertebrae S1" and generic.type.scheme == "99VILAM3"
    assert len(specs[3].terminology_entry.split("~")) == 7


def test_segment_specs_reject_bad_label_values():
    with pytest.raises(ValueError, match="share the value 3"):
        segment_specs({"a": 3, "b": 3})
    with pytest.raises(ValueError, match="non-negative"):
        segment_specs({"a": "3"})


def test_label_values_survive_on_a_node_and_corrections_keep_the_servers_ids():
    specs = segment_specs({"liver": 1, "hepatic tumor": 26})
    known = decode_label_values(encode_label_values(specs))
    assert known == {"liver": 1, "hepatic tumor": 26}
    assert decode_label_values("not json") == {} and decode_label_values(None) == {}
    assert assign_label_values(["hepatic tumor", "missed lesion", "liver", "other"], known) == {
        "hepatic tumor": 26, "missed lesion": 27, "liver": 1, "other": 28}
    with pytest.raises(ValueError, match="liver"):
        assign_label_values(["liver", "liver"], known)
    assert load_terminology() is load_terminology()


# --- background jobs -----------------------------------------------------------------------------------


def poll_until(jobs: BackgroundJobs, done: list, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done and time.monotonic() < deadline:
        jobs.poll()
        time.sleep(0.01)


def test_background_jobs_deliver_posts_results_and_errors_on_the_polling_thread():
    jobs = BackgroundJobs()
    seen: list = []
    done: list = []
    main = threading.get_ident()

    def work(job):
        assert threading.get_ident() != main
        for i in range(3):
            job.post(lambda value: seen.append((value, threading.get_ident())), i)
        return "result"

    jobs.start("turn", work, on_done=lambda value: done.append(value), on_error=done.append)
    with pytest.raises(RuntimeError, match="still running"):
        jobs.start("turn", work, on_done=done.append, on_error=done.append)
    poll_until(jobs, done)
    assert done == ["result"] and [value for value, _ in seen] == [0, 1, 2]
    assert all(thread == main for _, thread in seen) and not jobs.running("turn")

    failed: list = []
    jobs.start("turn", lambda job: 1 / 0, on_done=failed.append, on_error=failed.append)
    poll_until(jobs, failed)
    assert isinstance(failed[0], ZeroDivisionError)


def test_background_jobs_can_be_asked_to_stop():
    jobs = BackgroundJobs()
    done: list = []

    def work(job):
        job.abort.wait(10)
        return job.abort.is_set()

    jobs.start("turn", work, on_done=done.append, on_error=done.append)
    jobs.abort_all()
    poll_until(jobs, done)
    assert done == [True]


# --- client helpers (no server) ------------------------------------------------------------------------


def test_server_url_study_and_turn_params():
    assert vclient.normalize_server_url(" 127.0.0.1:8000/ ") == "http://127.0.0.1:8000"
    assert vclient.normalize_server_url("https://host/monai/") == "https://host/monai"
    for bad in ("", "ftp://x", "http://"):
        with pytest.raises(ValueError):
            vclient.normalize_server_url(bad)
    assert vclient.StudyRef.image("ct").query() == {"image": "ct"}
    assert vclient.StudyRef.session("s1").query() == {"session_id": "s1"}
    with pytest.raises(ValueError):
        vclient.StudyRef()
    params = vclient.turn_params(" Is there a tumor? ", "c1", "axial", 30, modality="CT", max_new_tokens=None)
    assert params == {"prompt": "Is there a tumor?", "chat_id": "c1", "axis": "axial", "slice_index": 30,
                      "modality": "CT"}
    with pytest.raises(ValueError, match="question"):
        vclient.turn_params("  ", "c1")
    assert vclient.modality_param("MR") == "MRI" and vclient.modality_param("US") is None
    chat_id = vclient.new_chat_id()
    assert chat_id != vclient.new_chat_id() and all(c.isalnum() or c in "-_." for c in chat_id)


def test_a_server_that_is_not_there_is_one_readable_line():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = vclient.VilaM3Client(f"http://127.0.0.1:{port}", timeout_s=5)
    with pytest.raises(vclient.ServerUnavailable) as caught:
        client.info()
    message = str(caught.value)
    assert "cannot reach the server at http://127.0.0.1:" in message and "refused" in message.lower()
    assert "\n" not in message and len(message) < 200


class ScriptedChatServer:
    """A tiny HTTP/1.1 server with the chat routes: ``/auth/`` (off), ``/info/``, a scripted event
    stream (chunks written as given, with pauses), a labelmap download, and an infer route that
    answers late."""

    def __init__(self, chunks: list[tuple[bytes, float]], infer_delay_s: float = 0.0):
        self.chunks, self.infer_delay_s = chunks, infer_delay_s
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def send_json(self, body: dict) -> None:
                payload = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if self.path == "/auth/":
                    self.send_json({"enabled": False})
                elif self.path == "/info/":
                    self.send_json({"models": {"vila_m3": {}}})
                else:  # the labelmap
                    self.send_response(200)
                    self.send_header("Content-Type", "application/gzip")
                    self.send_header("Content-Disposition", 'attachment; filename="c_labels.nii.gz"')
                    self.send_header("Content-Length", "4")
                    self.end_headers()
                    self.wfile.write(b"\x1f\x8bLM")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith("/infer/"):
                    time.sleep(owner.infer_delay_s)
                    self.send_json({"answer": "late"})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for data, pause in owner.chunks:
                        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                        self.wfile.flush()
                        time.sleep(pause)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def chunked(stream: bytes, size: int) -> list[tuple[bytes, float]]:
    return [(stream[i:i + size], 0.0) for i in range(0, len(stream), size)]


def test_stream_reassembles_events_from_any_chunks_and_downloads_the_labelmap(tmp_path):
    final = {"chat_id": "c", "answer": "Yes.", "label_names": {"liver": 1}, "turn": [], "vlm": {"stand_in": True}}
    body = (b": keep-alive\n\n" + server_event("token", {"text": "\u00e9t\u00e9 ", "round": 0})
            + server_event("labelmap", {"url": "/vila_m3/chat/c/labels"}) + server_event("final", final))
    server = ScriptedChatServer(chunked(body, 5))
    try:
        events: list = []
        answer = vclient.VilaM3Client(server.url, download_dir=str(tmp_path)).stream(
            vclient.StudyRef.image("ct"), {"prompt": "q", "chat_id": "c"}, on_event=lambda *e: events.append(e))
    finally:
        server.close()
    assert [name for name, _ in events] == ["token", "labelmap", "final"]
    assert events[0][1]["text"] == "\u00e9t\u00e9 "
    assert answer.answer == "Yes." and answer.stand_in and answer.label_names == {"liver": 1}
    assert answer.labelmap_path.endswith(".nii.gz") and Path(answer.labelmap_path).read_bytes() == b"\x1f\x8bLM"


def test_stream_error_events_and_cut_streams_are_one_line_errors():
    error = server_event("token", {"text": "a", "round": 0}) + server_event("error", {"status": 422, "detail": "slice 99 is out of range"})
    server = ScriptedChatServer(chunked(error, 7))
    try:
        with pytest.raises(vclient.RequestRejected, match="asking VILA-M3: slice 99 is out of range"):
            vclient.VilaM3Client(server.url).stream(vclient.StudyRef.image("ct"), {})
        server.chunks = chunked(server_event("token", {"text": "a", "round": 0}), 9)  # ends without a final answer
        with pytest.raises(vclient.ServerError, match="closed the stream before the turn finished"):
            vclient.VilaM3Client(server.url).stream(vclient.StudyRef.image("ct"), {})
    finally:
        server.close()


def test_a_silent_server_is_a_timeout_not_a_hang():
    silent = [(server_event("token", {"text": "a", "round": 0}), 5.0)]  # then nothing, not even keep-alives
    server = ScriptedChatServer(silent, infer_delay_s=5.0)
    try:
        client = vclient.VilaM3Client(server.url, timeout_s=5, turn_timeout_s=0.5, stream_idle_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(vclient.ServerError, match="stopped answering in the middle of the turn") as caught:
            client.stream(vclient.StudyRef.image("ct"), {})
        assert "\n" not in str(caught.value)
        with pytest.raises(vclient.RequestTimeout, match="did not answer within 0.5 s"):
            client.ask(vclient.StudyRef.image("ct"), {})
        assert time.monotonic() - started < 4
    finally:
        server.close()


# --- slice mapping against the server's convention -----------------------------------------------------

#: rotation part of Slicer's standard slice-to-RAS matrices (the third column is the view normal)
VIEWS = {
    "axial": [[-1, 0, 0], [0, 1, 0], [0, 0, 1]],
    "sagittal": [[0, 0, 1], [-1, 0, 0], [0, 1, 0]],
    "coronal": [[-1, 0, 0], [0, 0, 1], [0, 1, 0]],
}


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


#: volume directions (LPS, columns = i, j, k), named as a user would meet them
DIRECTIONS = {
    "LPS (DICOM axial)": np.eye(3),
    "RAS identity (Slicer-made)": np.diag([-1.0, -1.0, 1.0]),
    "oblique": rotation(2, 10) @ rotation(0, 12) @ rotation(1, -7),
    "sagittal acquisition": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float),
    "coronal acquisition, flipped": np.array([[-1, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=float) @ rotation(2, 20),
}


def make_volume(direction: np.ndarray) -> Volume:
    geometry = Geometry(spacing=(0.8, 1.1, 2.5), origin=(-31.0, 12.5, 40.0), direction=direction, shape=(11, 13, 9))
    return Volume(np.zeros(geometry.shape[::-1], dtype=np.int16), geometry)


def slicer_ijk_to_ras(geometry: Geometry) -> np.ndarray:
    """What Slicer's GetIJKToRASMatrix gives for a volume of this geometry."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.affine_lps


def view_matrix(rotation_part, centre_ras) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation_part
    m[:3, 3] = centre_ras
    return m


def lps_to_ras(point) -> np.ndarray:
    return np.asarray(point, dtype=float) * np.array([-1.0, -1.0, 1.0])


@pytest.mark.parametrize("direction_name", list(DIRECTIONS))
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_the_view_through_a_marker_voxel_maps_to_the_server_slice_that_shows_it(direction_name, axis):
    volume = make_volume(DIRECTIONS[direction_name])
    ijk_to_ras = slicer_ijk_to_ras(volume.geometry)
    for marker in [(0, 0, 0), (10, 12, 8), (3, 7, 5), (6, 1, 8)]:
        volume.array[:] = 0
        volume.array[marker[2], marker[1], marker[0]] = 1
        centre = lps_to_ras(volume.geometry.index_to_physical(marker))
        position = slice_position(view_matrix(VIEWS[axis], centre), ijk_to_ras, volume.geometry.shape)
        assert position.axis == axis
        assert position.count == slice_index_count(volume, axis)
        assert extract_slice(volume, axis, position.index).sum() == 1, (direction_name, axis, marker)
        assert position.offset_voxels == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("direction_name", list(DIRECTIONS))
def test_any_view_position_gives_the_servers_slice_index_at_that_point(direction_name):
    volume = make_volume(DIRECTIONS[direction_name])
    ijk_to_ras = slicer_ijk_to_ras(volume.geometry)
    rng = np.random.default_rng(1)
    corners = volume.geometry.index_to_physical(np.array([[0, 0, 0], [10, 12, 8]]))
    low, high = corners.min(axis=0) - 5.0, corners.max(axis=0) + 5.0  # some points fall outside: clipped
    for point_lps in rng.uniform(low, high, size=(60, 3)):
        for axis, rotation_part in VIEWS.items():
            position = slice_position(view_matrix(rotation_part, lps_to_ras(point_lps)), ijk_to_ras, volume.geometry.shape)
            assert position.index == slice_index_at(volume, axis, tuple(point_lps)), (direction_name, axis, point_lps)


def test_an_oblique_view_takes_the_closest_patient_axis():
    tilted = rotation(0, 25) @ np.array(VIEWS["axial"], dtype=float)
    assert view_axis(view_matrix(tilted, (0, 0, 0))) == "axial"
    assert view_axis(view_matrix(rotation(0, 50) @ np.array(VIEWS["axial"], dtype=float), (0, 0, 0))) == "coronal"
    assert view_axis(view_matrix(rotation(2, 60) @ np.array(VIEWS["coronal"], dtype=float), (0, 0, 0))) == "sagittal"
    volume = make_volume(DIRECTIONS["LPS (DICOM axial)"])
    ijk_to_ras = slicer_ijk_to_ras(volume.geometry)
    centre = lps_to_ras(volume.geometry.index_to_physical((5, 6, 4)))
    position = slice_position(view_matrix(tilted, centre), ijk_to_ras, volume.geometry.shape)
    assert (position.axis, position.index) == ("axial", 4)


def test_a_view_between_slices_picks_the_nearest_and_outside_the_volume_is_clipped():
    volume = make_volume(DIRECTIONS["LPS (DICOM axial)"])
    ijk_to_ras = slicer_ijk_to_ras(volume.geometry)
    base = lps_to_ras(volume.geometry.index_to_physical((5, 6, 4)))
    for shift_mm, expected in [(0.9, 4), (1.4, 5), (-1.4, 3)]:  # slice spacing 2.5 mm along S
        position = slice_position(view_matrix(VIEWS["axial"], base + [0, 0, shift_mm]), ijk_to_ras, (11, 13, 9))
        assert position.index == expected
    below = slice_position(view_matrix(VIEWS["axial"], base - [0, 0, 100]), ijk_to_ras, (11, 13, 9))
    assert below.index == 0 and below.offset_voxels > 30
    with pytest.raises(ValueError, match="4x4"):
        slice_position([[1, 0, 0]], ijk_to_ras, (11, 13, 9))


def test_grids_match_compares_dimensions_and_matrices():
    ijk_to_ras = slicer_ijk_to_ras(make_volume(DIRECTIONS["oblique"]).geometry)
    assert grids_match(ijk_to_ras, (11, 13, 9), ijk_to_ras.copy(), (11, 13, 9))
    moved = ijk_to_ras.copy()
    moved[0, 3] += 0.5
    assert not grids_match(ijk_to_ras, (11, 13, 9), moved, (11, 13, 9))
    assert not grids_match(ijk_to_ras, (11, 13, 9), ijk_to_ras, (11, 13, 8))


def test_the_library_imports_without_slicer_and_uses_only_stdlib_and_requests():
    import ast

    allowed = set(sys.stdlib_module_names) | {"requests"}
    lib = REPO / "slicer_extension" / "VILAM3Chat" / "VILAM3ChatLib"
    for path in lib.glob("*.py"):
        # scene.py is the scene logic on Slicer's MRML core (the module's and the web viewer's): slicer, vtk, numpy too
        allowed_here = allowed | {"slicer", "vtk", "numpy"} if path.name == "scene.py" else allowed
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed_here, f"{path.name} imports {name}"
    assert os.path.isfile(lib / "terminology.json")


class TokenServer:
    """``/auth/`` (on), ``/auth/token`` (gives ``fresh`` for annotator/s3cret) and ``/info/``, which answers
    only ``Authorization: Bearer <one of valid>``; records the Authorization headers it got."""

    def __init__(self, valid: tuple[str, ...] = ("sso-token", "fresh")):
        self.valid, self.seen = valid, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def answer(self, status: int, body: dict) -> None:
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                if self.path == "/auth/":
                    self.answer(200, {"enabled": True})
                    return
                owner.seen.append(self.headers.get("Authorization"))
                if self.headers.get("Authorization") in {f"Bearer {token}" for token in owner.valid}:
                    self.answer(200, {"models": {"vila_m3": {}}})
                else:
                    self.answer(401, {"detail": "the token is not valid"})

            def do_POST(self) -> None:
                form = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                if "username=annotator" in form and "password=s3cret" in form:
                    self.answer(200, {"access_token": "fresh", "token_type": "Bearer"})
                else:
                    self.answer(401, {"detail": "wrong user name or password"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_given_access_token_is_sent_as_bearer_and_a_refused_one_says_so():
    server = TokenServer()
    try:
        assert "vila_m3" in vclient.VilaM3Client(server.url, token="sso-token", timeout_s=5).info()["models"]
        assert server.seen == ["Bearer sso-token"]
        with pytest.raises(vclient.AuthError, match="refused the access token") as refused:
            vclient.VilaM3Client(server.url, token="expired", timeout_s=5).info()
        assert refused.value.status == 401
        assert server.seen[-1] == "Bearer expired"
        # with a password as well, a refused token is replaced by a login
        client = vclient.VilaM3Client(server.url, username="annotator", password="s3cret", token="expired", timeout_s=5)
        assert "vila_m3" in client.info()["models"]
        assert server.seen[-2:] == ["Bearer expired", "Bearer fresh"]
    finally:
        server.close()


def test_grid_axes_map_reads_a_k_reversed_copy_back_on_the_original_grid():
    original = [[-1.2, 0, 0, -20.0], [0, -0.8, 0, 15.0], [0, 0, -2.5, 33.0], [0, 0, 0, 1]]
    reversed_k = [[-1.2, 0, 0, -20.0], [0, -0.8, 0, 15.0], [0, 0, 2.5, 33.0 - 9 * 2.5], [0, 0, 0, 1]]
    assert grid_axes_map(original, (14, 12, 10), reversed_k, (14, 12, 10)) == ((0, 1, 2), (False, False, True))
    assert grid_axes_map(original, (14, 12, 10), original, (14, 12, 10)) == ((0, 1, 2), (False, False, False))
    permuted = [[0, -1.2, 0, -20.0], [-0.8, 0, 0, 15.0], [0, 0, -2.5, 33.0], [0, 0, 0, 1]]
    assert grid_axes_map(original, (14, 12, 10), permuted, (12, 14, 10)) == ((1, 0, 2), (False, False, False))
    half_voxel = [row[:] for row in reversed_k]
    half_voxel[2][3] += 1.25
    assert grid_axes_map(original, (14, 12, 10), half_voxel, (14, 12, 10)) is None  # other voxel centres
    assert grid_axes_map(original, (14, 12, 11), reversed_k, (14, 12, 10)) is None  # other extent
    scaled = [row[:] for row in reversed_k]
    scaled[0][0] = -2.4
    assert grid_axes_map(original, (14, 12, 10), scaled, (14, 12, 10)) is None  # other spacing


def test_a_grid_survives_a_node_attribute_and_bad_text_is_no_grid():
    matrix = [[-1.0, 0, 0, 1.5], [0, -1.0, 0, 2.5], [0, 0, 3.0, -4.0], [0, 0, 0, 1]]
    assert decode_grid(encode_grid(matrix, (4, 5, 6))) == (matrix, [4, 5, 6])
    for text in (None, "", "not json", '{"ijkToRas": [[1]], "dimensions": [1, 2, 3]}', '{"dimensions": []}'):
        assert decode_grid(text) is None


def test_a_label_value_without_a_name_gets_one_that_is_unique():
    spec = unnamed_segment_spec(7, ["liver"])
    assert (spec.name, spec.label_value, spec.terminology.standard) == ("label 7", 7, False)
    assert unnamed_segment_spec(7, ["label 7", "label 7 (2)"]).name == "label 7 (3)"
    assert spec.terminology.type.meaning == "label 7" and len(spec.color) == 3
