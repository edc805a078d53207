"""The request-handling pieces of the app without a server: the body-limit middleware driven through its ASGI
interface, the route and middleware hooks on a bare FastAPI app, upload names, and the params check."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.testclient import TestClient
from starlette.formparsers import MultiPartParser

pytestmark = pytest.mark.security

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "vila_m3"))

from lib.body_limit import BodyLimitMiddleware, limits_from_conf  # noqa: E402
from lib.form_params import StrictMultiPartParser, install_strict_multipart, parse_params  # noqa: E402
from lib.server_hooks import install_middleware, remove_routes, replace_routes, walk_routes  # noqa: E402
from lib.uploads import copy_limited, request_files, safe_name, safe_suffix  # noqa: E402

KB = 1024


def drive(middleware_limit: int, chunks: list[bytes], content_length: int | None = None, swallow: bool = False):
    """Send ``chunks`` through the middleware to an app that reads the whole body and answers 200 with its size.

    Returns (status, JSON body, chunks the middleware asked for, whether the app ran)."""
    pulled = []
    ran = []

    async def app(scope, receive, send):
        ran.append(True)
        size = 0
        try:
            while True:
                message = await receive()
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
        except HTTPException:
            if not swallow:
                raise
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b'{"detail": "the app\'s own answer"}'})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"size": size}).encode()})

    async def receive():
        index = len(pulled)
        pulled.append(index)
        return {"type": "http.request", "body": chunks[index], "more_body": index < len(chunks) - 1}

    sent = []

    async def send(message):
        sent.append(message)

    headers = [(b"content-length", str(content_length).encode())] if content_length is not None else []
    scope = {"type": "http", "path": "/infer/vista3d", "method": "POST", "headers": headers}
    middleware = BodyLimitMiddleware(app, limits={"/infer": middleware_limit}, default_bytes=10)
    asyncio.run(middleware(scope, receive, send))
    status = next(message["status"] for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return status, json.loads(body), len(pulled), bool(ran)


def test_a_body_within_the_limit_passes_through():
    assert drive(100 * KB, [bytes(40 * KB)] * 2) == (200, {"size": 80 * KB}, 2, True)


def test_a_declared_length_over_the_limit_is_refused_before_the_app_or_the_body():
    status, body, pulled, ran = drive(100 * KB, [bytes(KB)], content_length=200 * KB)
    assert (status, pulled, ran) == (413, 0, False)
    assert body["detail"] == "request body too large: the limit of this route is 100 KB"


def test_a_streamed_body_is_cut_at_the_chunk_that_passes_the_limit():
    status, body, pulled, _ = drive(100 * KB, [bytes(40 * KB)] * 10)
    assert status == 413 and pulled == 3  # 40 + 40 + 40 KB > 100 KB: the other seven chunks are never read
    assert "100 KB" in body["detail"]


def test_an_app_that_swallows_the_refusal_still_answers_413():
    status, body, pulled, _ = drive(100 * KB, [bytes(40 * KB)] * 10, swallow=True)
    assert (status, pulled) == (413, 3) and "too large" in body["detail"]


def test_limits_per_route_prefix():
    limits, other = limits_from_conf({"max_upload_mb": "2", "max_request_kb": "8"})
    middleware = BodyLimitMiddleware(lambda *_: None, limits, other)
    assert middleware.limit_for("/infer/vila_m3") == middleware.limit_for("/session/") == 2 * 2**20
    assert middleware.limit_for("/datastore/label") == 2 * 2**20
    assert middleware.limit_for("/inference") == middleware.limit_for("/vila_m3/chat/stream") == 8 * KB
    assert limits_from_conf({}) == ({prefix: 1024 * 2**20 for prefix in limits}, 1024 * KB)


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf"])
def test_a_bad_limit_names_its_key(value):
    with pytest.raises(ValueError, match="--conf max_upload_mb must be a positive number"):
        limits_from_conf({"max_upload_mb": value})


def test_hooks_replace_an_included_route_and_add_middleware_to_a_started_app():
    server = FastAPI()
    upstream = APIRouter(prefix="/infer")

    @upstream.post("/{model}")
    async def theirs(model: str):
        return {"by": "upstream"}

    @upstream.post("/wsi/{model}")
    async def wsi(model: str):
        return {"by": "upstream wsi"}

    server.include_router(upstream)
    with TestClient(server) as client:  # the middleware stack is built now, as at MONAI Label's lifespan
        assert server.middleware_stack is not None
        ours = APIRouter(prefix="/infer")

        @ours.post("/{model}")
        async def mine(model: str):
            return {"by": "us"}

        replace_routes(server, ours)
        replace_routes(server, ours)  # a second app instance (POST /reload) installs the same again
        assert remove_routes(server, {("/infer/wsi/{model}", "POST")}) == 1
        install_middleware(server, BodyLimitMiddleware, limits={"/infer": 10}, default_bytes=10)
        install_middleware(server, BodyLimitMiddleware, limits={"/infer": 20}, default_bytes=20)
        assert client.post("/infer/x").json() == {"by": "us"}
        assert client.post("/infer/wsi/x").status_code == 404
        assert client.post("/infer/x", content=bytes(21)).status_code == 413
        assert client.post("/infer/x", content=bytes(20)).status_code == 200
    paths = [(prefix + route.path, sorted(route.methods)) for _, route, prefix in walk_routes(server.router)
             if hasattr(route, "methods") and route.path.startswith("/infer")]
    assert paths == [("/infer/{model}", ["POST"])]
    assert sum(entry.cls is BodyLimitMiddleware for entry in server.user_middleware) == 1


@pytest.mark.parametrize(("filename", "suffix", "name"), [
    ("CT Scan.NII.GZ", ".nii.gz", "upload.nii.gz"),
    ("../../etc/passwd", "", "passwd"),
    ("..\\..\\evil.nrrd", ".nrrd", "evil.nrrd"),
    (".bashrc", "", "upload"),
    ("slice_0001.dcm", ".dcm", "slice_0001.dcm"),
    ("a..nii", ".nii", "upload.nii"),
    (None, "", "upload"),
])
def test_upload_names_keep_only_known_suffixes_and_plain_names(filename, suffix, name):
    assert safe_suffix(filename) == suffix
    assert safe_name(filename, "upload") == name


def test_a_copy_over_its_limit_is_removed(tmp_path):
    target = tmp_path / "upload.bin"
    with pytest.raises(HTTPException) as refused:
        copy_limited(io.BytesIO(bytes(3 * 2**20)), target, 2 * 2**20)
    assert refused.value.status_code == 413 and not target.exists()
    assert copy_limited(io.BytesIO(b"abc"), tmp_path / "small.bin", 3) == 3


def test_request_files_are_removed_however_the_block_ends(tmp_path):
    kept = tmp_path / "kept"
    with pytest.raises(RuntimeError), request_files() as files:
        for name in ("a", "b", "kept"):
            (tmp_path / name).write_text(name)
            files.add(tmp_path / name)
        (tmp_path / "folder").mkdir()
        files.add(tmp_path / "folder")
        files.release(kept)
        raise RuntimeError("the task failed")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kept"]


@pytest.mark.parametrize(("text", "fragment"), [
    ("{bad", "params is not JSON"),
    ("[1, 2]", "not an array"),
    ('"text"', "not a string"),
    ("null", "not null"),
    ('{"prompt": "\\ud800"}', "lone surrogate"),
    ('{"prompt": "\ufffd"}', "not UTF-8"),
    ('{"image": "/etc/passwd"}', "params may not set image"),
])
def test_params_that_are_not_a_utf8_json_object_are_422(text, fragment):
    with pytest.raises(HTTPException) as refused:
        parse_params(text, owned=frozenset({"image"}))
    assert refused.value.status_code == 422 and fragment in refused.value.detail


def test_multipart_text_fields_must_be_utf8_while_files_may_hold_any_bytes():
    install_strict_multipart()
    app = FastAPI()

    @app.post("/form")
    async def form(params: str = Form("{}"), file: UploadFile = File(None)) -> dict:
        return {"params": params, "size": len(await file.read()) if file else 0}

    client = TestClient(app)
    accepted = client.post("/form", files={"params": (None, '{"prompt": "Größe? 肝臓"}'.encode()),
                                           "file": ("ct.nii.gz", b"\xff\xfe\x00binary")})
    assert accepted.status_code == 200, accepted.text
    assert accepted.json() == {"params": '{"prompt": "Größe? 肝臓"}', "size": 9}
    refused = client.post("/form", files={"params": (None, b'{"prompt": "Gr\xf6\xdfe"}'),  # Latin-1 bytes
                                          "file": ("ct.nii.gz", b"data")})
    assert refused.status_code == 422 and refused.json()["detail"] == "form field 'params' is not UTF-8 text"
    assert issubclass(StrictMultiPartParser, MultiPartParser)


def test_params_accepts_objects_and_text_beyond_latin1():
    assert parse_params('{"prompt": "Läsion? 肝臓", "n": 1}') == {"prompt": "Läsion? 肝臓", "n": 1}
    assert parse_params("") == {} and parse_params(None) == {}
