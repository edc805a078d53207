"""RemoteVLM against a fake OpenAI-compatible server on 127.0.0.1: messages, streaming, errors, retries."""

from __future__ import annotations

import base64
import io
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer, Reply, completion, error, sse, stream_events
from PIL import Image

from vila_m3.vlm import GenerationResult, ImageCountError, VlmError
from vila_m3.vlm.remote import API_KEY_ENV, MODEL_ENV, URL_ENV, RemoteVLM, RemoteVLMError, build_messages

QUESTION = [("user", "<image>What do you see?")]


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as running:
        yield running


def client(server: FakeOpenAIServer, **kwargs) -> RemoteVLM:
    """A client of ``server`` with test-sized backoff and timeouts."""
    settings = {"model": "vila-m3-8b", "backoff_s": 0.01, "timeout_s": 5.0, "connect_timeout_s": 2.0}
    settings.update(kwargs)
    return RemoteVLM(server.url, **settings)


def tiny_image(value: int = 128) -> np.ndarray:
    return np.full((8, 8), value, dtype=np.uint8)


def decode_data_url(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    png = base64.b64decode(url[len(prefix) :])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image)


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- messages ----------------------------------------------------------------------------------------
def brats_case(tmp_path: Path) -> tuple[list[tuple[str, str]], list, list[np.ndarray]]:
    """A two-turn conversation: 4 MRI sequences, an answer, then a segmentation overlay.

    Returns the conversation, the images as given (array, PIL, path, array, RGB array) and the pixels
    each data URL must decode to.
    """
    rng = np.random.default_rng(7)
    t1, t1c, t2, flair = (rng.integers(0, 256, (24 + 4 * i, 32), dtype=np.uint8) for i in range(4))
    overlay = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    t2_path = tmp_path / "t2.png"
    Image.fromarray(t2).save(t2_path)  # a path is read as RGB, like the local model does
    given = [t1, Image.fromarray(t1c), t2_path, flair[:, :, None], overlay]
    expected = [t1, t1c, np.stack([t2] * 3, axis=-1), flair, overlay]
    conversation = [
        ("user", "<image><image><image><image>These are T1, T1c, T2 and FLAIR of a brain MRI. Is there a tumor?"),
        ("assistant", "Yes, there is an enhancing lesion in the left frontal lobe."),
        ("user", "Here is the segmentation overlay: <image> Which label is the largest?"),
    ]
    return conversation, given, expected


def test_messages_for_a_two_turn_conversation_with_five_images(tmp_path: Path) -> None:
    conversation, given, expected = brats_case(tmp_path)
    messages = build_messages(conversation, given, system_prompt="You are a radiology assistant.")

    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == "You are a radiology assistant."
    first, answer, second = messages[1]["content"], messages[2]["content"], messages[3]["content"]
    assert [p["type"] for p in first] == ["image_url"] * 4 + ["text"]  # empty text parts dropped
    assert first[4]["text"] == "These are T1, T1c, T2 and FLAIR of a brain MRI. Is there a tumor?"
    assert answer == "Yes, there is an enhancing lesion in the left frontal lobe."
    assert [p["type"] for p in second] == ["text", "image_url", "text"]
    assert second[0]["text"] == "Here is the segmentation overlay: "
    assert second[2]["text"] == " Which label is the largest?"
    urls = [p["image_url"]["url"] for p in first + second if p["type"] == "image_url"]
    for i, (url, pixels) in enumerate(zip(urls, expected, strict=True)):
        assert np.array_equal(decode_data_url(url), pixels), f"image {i} differs"


def test_request_body_carries_messages_and_parameters(server: FakeOpenAIServer, tmp_path: Path) -> None:
    conversation, given, _ = brats_case(tmp_path)
    server.script(completion("A large tumor core."))
    vlm = client(server, stop=("<|eot_id|>",), system_prompt="Be brief.")

    vlm.generate(conversation, given, max_new_tokens=64, temperature=0.2, top_p=0.9, min_new_tokens=3)

    (request,) = server.posts
    assert request.path == "/v1/chat/completions"
    body = request.body
    assert body["model"] == "vila-m3-8b"
    assert body["messages"] == build_messages(conversation, given, system_prompt="Be brief.")
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (64, 0.2, 0.9)
    assert body["stop"] == ["<|eot_id|>"]
    assert body["min_tokens"] == 3
    assert body["stream"] is False and "stream_options" not in body
    assert "authorization" not in request.headers


def test_placeholder_image_mismatch_raises_before_any_request(server: FakeOpenAIServer) -> None:
    vlm = client(server)
    with pytest.raises(ImageCountError, match="1 <image> placeholder"):
        vlm.generate(QUESTION, [tiny_image(), tiny_image()])
    with pytest.raises(ImageCountError):
        vlm.generate([("user", "No image here.")], [tiny_image()])
    assert server.requests == []


# ---- answers -----------------------------------------------------------------------------------------
def test_streaming_pieces_arrive_in_order_and_join_to_the_text(server: FakeOpenAIServer) -> None:
    events = stream_events(["  The ", "lesion ", "enhances", ".\n"], finish_reason="length",
                           usage={"prompt_tokens": 231, "completion_tokens": 7, "total_tokens": 238})
    events.insert(1, ": keep-alive")  # a comment line
    events.insert(3, {"choices": [{"index": 0, "delta": {}, "finish_reason": None}]})  # an empty delta
    server.script(Reply(events=events))
    pieces: list[str] = []

    result = client(server).generate(QUESTION, [tiny_image()], stream=pieces.append)

    assert pieces == ["The", " lesion", " enhances", "."]
    assert "".join(pieces) == result.text == "The lesion enhances."
    assert isinstance(result, GenerationResult)
    assert (result.n_tokens, result.prompt_tokens) == (7, 231)
    assert result.stopped_by == "max_new_tokens"
    body = server.posts[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_stream_without_usage_counts_chunks(server: FakeOpenAIServer) -> None:
    server.script(sse(["No", " acute", " findings"], usage=None))
    result = client(server).generate(QUESTION, [tiny_image()], stream=lambda piece: None)
    assert result.text == "No acute findings"
    assert (result.n_tokens, result.prompt_tokens, result.stopped_by) == (3, 0, "stop_string")


def test_non_streaming_answer_with_usage(server: FakeOpenAIServer) -> None:
    server.script(completion("  Normal chest X-ray.\n", usage={"prompt_tokens": 205, "completion_tokens": 5}))
    result = client(server).generate(QUESTION, [tiny_image()], min_new_tokens=0)
    assert result.text == "Normal chest X-ray."
    assert (result.n_tokens, result.prompt_tokens, result.stopped_by) == (5, 205, "stop_string")
    assert result.seconds > 0
    assert "min_tokens" not in server.posts[0].body


def test_a_server_that_does_not_stream_still_feeds_the_callback(server: FakeOpenAIServer) -> None:
    server.script(completion("Whole answer at once."))
    pieces: list[str] = []
    result = client(server).generate(QUESTION, [tiny_image()], stream=pieces.append)
    assert pieces == ["Whole answer at once."] == [result.text]
    assert server.posts[0].body["stream"] is True


def test_cancel_after_the_second_chunk_stops_early(server: FakeOpenAIServer) -> None:
    pieces_sent = [f"word{i} " for i in range(20)]
    server.script(sse(pieces_sent, event_delay_s=0.15))
    cancel = threading.Event()
    received: list[str] = []

    def on_piece(piece: str) -> None:
        received.append(piece)
        if len(received) == 2:
            cancel.set()

    start = time.perf_counter()
    result = client(server).generate(QUESTION, [tiny_image()], stream=on_piece, cancel=cancel)
    elapsed = time.perf_counter() - start

    assert result.stopped_by == "cancelled"
    assert result.text == "word0 word1" == "".join(received)
    assert result.n_tokens == 2
    assert elapsed < 2.0  # the whole stream takes > 3 s
    assert server.disconnected.wait(2.0), "the client did not close the connection"
    assert server.streams_completed == 0


def test_cancel_before_start_sends_nothing(server: FakeOpenAIServer) -> None:
    cancel = threading.Event()
    cancel.set()
    result = client(server).generate(QUESTION, [tiny_image()], cancel=cancel)
    assert (result.text, result.stopped_by) == ("", "cancelled")
    assert server.requests == []


# ---- errors and retries ------------------------------------------------------------------------------
def test_bad_request_shows_the_server_message_and_is_not_retried(server: FakeOpenAIServer) -> None:
    server.script(error(400, "image too large"), completion("never sent"))
    vlm = client(server, retries=3)
    with pytest.raises(RemoteVLMError, match="image too large") as caught:
        vlm.generate(QUESTION, [tiny_image()])
    message = str(caught.value)
    assert "HTTP 400" in message and f"{server.url}/chat/completions" in message
    assert caught.value.status_code == 400
    assert isinstance(caught.value, VlmError)
    assert len(server.posts) == 1


@pytest.mark.parametrize("status", [401, 404, 422])
def test_client_errors_are_not_retried(server: FakeOpenAIServer, status: int) -> None:
    server.script(error(status, f"problem {status}"), completion("never sent"))
    with pytest.raises(RemoteVLMError, match=f"HTTP {status}.*problem {status}"):
        client(server, retries=2).generate(QUESTION, [tiny_image()])
    assert len(server.posts) == 1


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_overload_statuses_are_retried(server: FakeOpenAIServer, status: int) -> None:
    server.script(error(status, "busy"), completion("Recovered."))
    result = client(server, retries=2).generate(QUESTION, [tiny_image()])
    assert result.text == "Recovered."
    assert len(server.posts) == 2


def test_retries_give_up_with_the_last_server_message(server: FakeOpenAIServer) -> None:
    server.script(*(error(503, "model is loading") for _ in range(3)))
    with pytest.raises(RemoteVLMError, match=r"HTTP 503.*model is loading.*after 3 attempts"):
        client(server, retries=2).generate(QUESTION, [tiny_image()])
    assert len(server.posts) == 3


def test_connection_refused_names_the_url_after_all_attempts(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    vlm = RemoteVLM(url, "vila-m3-8b", retries=2, backoff_s=0.01)
    with caplog.at_level(logging.WARNING, logger="vila_m3.vlm.remote"), pytest.raises(RemoteVLMError) as caught:
        vlm.generate(QUESTION, [tiny_image()])
    message = str(caught.value)
    assert f"{url}/chat/completions" in message
    assert "connection refused" in message and "after 3 attempts" in message
    assert caught.value.attempts == 3
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2


def test_retry_after_of_the_server_is_honoured(server: FakeOpenAIServer) -> None:
    server.script(error(429, "slow down", headers={"Retry-After": "0.3"}), completion("ok"))
    start = time.perf_counter()
    assert client(server, retries=1).generate(QUESTION, [tiny_image()]).text == "ok"
    assert time.perf_counter() - start >= 0.3
    assert len(server.posts) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relies on Linux dropping SYNs to a full backlog")
def test_connect_timeout_names_the_seconds_and_is_retried() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue: further connection attempts hang
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.1)
        try:
            vlm = RemoteVLM(f"http://127.0.0.1:{port}/v1", "m", retries=1, backoff_s=0.01, connect_timeout_s=0.3)
            with pytest.raises(RemoteVLMError, match=r"no connection within 0\.3 s.*after 2 attempts"):
                vlm.generate(QUESTION, [tiny_image()])
        finally:
            for filler in fillers:
                filler.close()


def test_read_timeout_names_the_seconds_and_is_not_retried(server: FakeOpenAIServer) -> None:
    server.script(Reply(json_body={}, delay_s=3.0), completion("never sent"))
    start = time.perf_counter()
    with pytest.raises(RemoteVLMError, match=r"timed out: no data for 0\.5 s") as caught:
        client(server, timeout_s=0.5, retries=2).generate(QUESTION, [tiny_image()])
    assert time.perf_counter() - start < 2.5
    assert server.url in str(caught.value)
    assert len(server.posts) == 1


def test_stream_interrupted_by_an_error_event_is_not_retried(server: FakeOpenAIServer) -> None:
    events = stream_events(["Partial"], finish_reason=None, done=False)
    events.append({"error": {"message": "CUDA out of memory", "code": 500}})
    server.script(Reply(events=events), completion("never sent"))
    received: list[str] = []
    with pytest.raises(RemoteVLMError, match="CUDA out of memory"):
        client(server).generate(QUESTION, [tiny_image()], stream=received.append)
    assert received == ["Partial"]
    assert len(server.posts) == 1


def test_stream_cut_off_without_finish_is_an_error(server: FakeOpenAIServer) -> None:
    server.script(sse(["Half an"], finish_reason=None, done=False))
    with pytest.raises(RemoteVLMError, match="stream ended before the answer was complete"):
        client(server).generate(QUESTION, [tiny_image()], stream=lambda piece: None)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(raw_body="<html>Login</html>", content_type="text/html"), r"not JSON \(text/html\): <html>Login"),
        (Reply(json_body={"id": "x", "choices": []}), r"no choices\[0\]"),
        (Reply(events=["data: {not json"]), "an event is not JSON"),
    ],
)
def test_malformed_answers(server: FakeOpenAIServer, reply: Reply, expected: str) -> None:
    server.script(reply)
    stream = (lambda piece: None) if reply.events is not None else None
    with pytest.raises(RemoteVLMError, match=f"malformed response: {expected}"):
        client(server).generate(QUESTION, [tiny_image()], stream=stream)


def test_logits_processors_are_refused(server: FakeOpenAIServer) -> None:
    with pytest.raises(RemoteVLMError, match="logits_processor"):
        client(server).generate(QUESTION, [tiny_image()], logits_processor=[object()])
    assert server.requests == []


# ---- authentication and settings ---------------------------------------------------------------------
def test_api_key_is_sent_as_bearer_and_never_shown(server: FakeOpenAIServer) -> None:
    server.script(completion("ok"), completion("ok"))
    secret = "sk-test-4242"
    with_key = client(server, api_key=secret, extra_headers={"X-Route": "gpu-1"})
    with_key.generate(QUESTION, [tiny_image()])
    client(server, api_key=None).generate(QUESTION, [tiny_image()])

    first, second = server.posts
    assert first.headers["authorization"] == f"Bearer {secret}"
    assert first.headers["x-route"] == "gpu-1"
    assert "authorization" not in second.headers
    assert secret not in repr(with_key) and secret not in with_key.describe()
    assert not with_key.is_stand_in


def test_describe_and_url_forms() -> None:
    assert RemoteVLM("http://gpu-host:8000", "m").describe() == "remote model 'm' at http://gpu-host:8000/v1"
    assert RemoteVLM("http://gpu-host:8000/v1/", "m").chat_url == "http://gpu-host:8000/v1/chat/completions"
    assert RemoteVLM("https://nim.example/v1/chat/completions", "m").base_url == "https://nim.example/v1"
    assert "secret" not in RemoteVLM("http://user:secret@gpu-host/v1", "m").describe()
    with pytest.raises(ValueError, match="http"):
        RemoteVLM("gpu-host:8000", "m")


def test_from_config_and_from_env(server: FakeOpenAIServer) -> None:
    environ = {API_KEY_ENV: "sk-from-env"}
    vlm = RemoteVLM.from_config({"base_url": server.url, "model": "m", "retries": 0, "stop": ["</s>"]}, environ)
    server.script(completion("ok"))
    vlm.generate(QUESTION, [tiny_image()])
    assert server.posts[0].headers["authorization"] == "Bearer sk-from-env"
    assert server.posts[0].body["stop"] == ["</s>"]
    with pytest.raises(ValueError, match="environment variable"):
        RemoteVLM.from_config({"base_url": server.url, "model": "m", "api_key": "sk-x"}, {})
    with pytest.raises(ValueError, match="Unknown remote VLM setting"):
        RemoteVLM.from_config({"base_url": server.url, "model": "m", "timeout": 3}, {})

    assert RemoteVLM.from_env({}) is None
    from_env = RemoteVLM.from_env({URL_ENV: server.url, MODEL_ENV: "m"})
    assert from_env is not None and from_env.describe() == f"remote model 'm' at {server.url}"
    with pytest.raises(ValueError, match=MODEL_ENV):
        RemoteVLM.from_env({URL_ENV: server.url})


def test_list_models(server: FakeOpenAIServer) -> None:
    assert client(server).list_models() == ["fake-vila-m3"]
    assert server.requests[0].method == "GET" and server.requests[0].path == "/v1/models"
