"""Generation: greedy/sampled, stop handling, streaming, cancel, KV cache, limits."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import LogitsProcessor
from vlm_fixtures import chat, chat_llama3, chat_vicuna, make_images, tiny_llama3, tiny_vicuna  # noqa: F401

from vila_m3.vlm import ImageCountError, PromptTooLongError, VilaChat, default_device_and_dtype

QUESTION = [("user", "<image>This is a CT image.\nWhat do you see?")]


class Script(LogitsProcessor):
    """Pushes the ``step``-th scripted token to the top (a bonus, so built-in processors still apply)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1]  # only new tokens: the prompt went in as embeddings
        scores = scores.clone()
        if step < len(self.token_ids):
            scores[:, self.token_ids[step]] += 1000.0
        return scores


def _ids(chat: VilaChat, text: str) -> list[int]:  # noqa: F811
    return list(chat.tokenizer(text, add_special_tokens=False).input_ids)


# ---- greedy, deterministic, the stand-in flag ------------------------------------------------------
def test_greedy_is_deterministic(chat: VilaChat) -> None:  # noqa: F811
    images = make_images(1)
    first = chat.generate(QUESTION, images, max_new_tokens=12, min_new_tokens=12)
    second = chat.generate(QUESTION, images, max_new_tokens=12, min_new_tokens=12)
    assert first.text == second.text and first.text
    assert first.n_tokens == 12 and first.stopped_by == "max_new_tokens"
    assert first.prompt_tokens == chat.prepare(QUESTION, 1).n_tokens
    assert chat.is_stand_in


def test_sampling_differs_from_greedy_and_follows_the_seed(chat_vicuna: VilaChat) -> None:  # noqa: F811
    images = make_images(1)
    greedy = chat_vicuna.generate(QUESTION, images, max_new_tokens=10, min_new_tokens=10)
    samples = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        samples.append(chat_vicuna.generate(QUESTION, images, max_new_tokens=10, min_new_tokens=10, temperature=1.5).text)
    torch.manual_seed(0)
    again = chat_vicuna.generate(QUESTION, images, max_new_tokens=10, min_new_tokens=10, temperature=1.5).text
    assert again == samples[0]
    assert any(s != greedy.text for s in samples)
    with pytest.raises(ValueError, match="temperature"):
        chat_vicuna.generate(QUESTION, images, temperature=-1)


def test_decoding_uses_the_kv_cache(chat_llama3: VilaChat) -> None:  # noqa: F811
    """The prompt goes in once as embeddings; every later step feeds one token id."""
    calls: list[tuple[str, int]] = []
    llm = chat_llama3.model.llm
    original = llm.forward

    def spy(*args, **kwargs):
        if kwargs.get("inputs_embeds") is not None:
            calls.append(("embeds", kwargs["inputs_embeds"].shape[1]))
        else:
            calls.append(("ids", kwargs["input_ids"].shape[1]))
        return original(*args, **kwargs)

    llm.forward = spy
    try:
        result = chat_llama3.generate(QUESTION, make_images(1), max_new_tokens=6, min_new_tokens=6)
    finally:
        del llm.forward
    prompt_tokens = chat_llama3.prepare(QUESTION, 1).n_tokens
    assert calls[0] == ("embeds", prompt_tokens)
    assert calls[1:] == [("ids", 1)] * (result.n_tokens - 1)


# ---- stop handling ---------------------------------------------------------------------------------
def test_stops_on_eot_token(chat_llama3: VilaChat) -> None:  # noqa: F811
    eot = chat_llama3.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    script = _ids(chat_llama3, " Hello world") + [eot] + _ids(chat_llama3, " never shown")
    pieces: list[str] = []
    result = chat_llama3.generate(QUESTION, make_images(1), max_new_tokens=30, logits_processor=[Script(script)],
                                  stream=pieces.append)
    assert result.text == "Hello world"
    assert result.stopped_by == "stop_string" and result.n_tokens == script.index(eot) + 1
    assert "".join(pieces) == "Hello world"


def test_stops_on_other_eos_id(chat_llama3: VilaChat) -> None:  # noqa: F811
    eos = chat_llama3.tokenizer.convert_tokens_to_ids("<|end_of_text|>")
    script = _ids(chat_llama3, "Yes.") + [eos]
    result = chat_llama3.generate(QUESTION, make_images(1), max_new_tokens=30, logits_processor=[Script(script)])
    assert (result.text, result.stopped_by, result.n_tokens) == ("Yes.", "eos", len(script))


def test_stop_string_spelled_in_pieces_is_stripped_and_never_streamed(chat_vicuna: VilaChat) -> None:  # noqa: F811
    """``</s>`` generated as plain text (byte tokens), not as the eos id: stop, strip, stream nothing of it."""
    tok = chat_vicuna.tokenizer
    pieces_of_stop = [tok.convert_tokens_to_ids(f"<0x{ord(c):02X}>") for c in "</s>"]
    script = _ids(chat_vicuna, "Answer is no ") + pieces_of_stop + _ids(chat_vicuna, "tail")
    streamed: list[str] = []
    result = chat_vicuna.generate(QUESTION, make_images(1), max_new_tokens=40, logits_processor=[Script(script)],
                                  stream=streamed.append)
    assert result.text == "Answer is no"
    assert result.stopped_by == "stop_string"
    assert result.n_tokens == len(script) - len(_ids(chat_vicuna, "tail"))
    assert "".join(streamed) == "Answer is no" and not any("<" in p for p in streamed)


def test_min_new_tokens_suppresses_an_early_stop(chat_llama3: VilaChat) -> None:  # noqa: F811
    eot = chat_llama3.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    result = chat_llama3.generate(QUESTION, make_images(1), max_new_tokens=10, min_new_tokens=2,
                                  logits_processor=[Script([eot] * 10)])
    assert result.n_tokens == 3 and result.stopped_by == "stop_string"
    immediate = chat_llama3.generate(QUESTION, make_images(1), max_new_tokens=10, min_new_tokens=0,
                                     logits_processor=[Script([eot] * 10)])
    assert immediate.n_tokens == 1 and immediate.text == ""


def test_a_one_token_answer_ends_where_the_model_ends_it(chat_llama3: VilaChat) -> None:  # noqa: F811
    """The protocol's answers are often one token (``no``): by default the stop right after it is taken,
    rather than forcing a second token that sends the model on past its answer."""
    eot = chat_llama3.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    word = _ids(chat_llama3, "no")[:1]
    script = word + [eot] + _ids(chat_llama3, " first trigger")
    result = chat_llama3.generate(QUESTION, make_images(1), max_new_tokens=20, logits_processor=[Script(script)])
    assert (result.n_tokens, result.stopped_by) == (2, "stop_string")
    assert result.text == chat_llama3.tokenizer.decode(word).strip()
    forced = chat_llama3.generate(QUESTION, make_images(1), max_new_tokens=20, min_new_tokens=2,
                                  logits_processor=[Script(script)])
    assert forced.n_tokens > 2 and "first" in forced.text


def test_decode_strips_trailing_stop_string(chat_vicuna: VilaChat) -> None:  # noqa: F811
    ids = _ids(chat_vicuna, "  It is a liver.  ")
    assert chat_vicuna.decode(ids) == "It is a liver."
    assert chat_vicuna.decode(ids + [chat_vicuna.tokenizer.eos_token_id]) == "It is a liver."


# ---- streaming and cancel --------------------------------------------------------------------------
def test_streaming_yields_the_same_text(chat: VilaChat) -> None:  # noqa: F811
    images = make_images(2, seed=5)
    conversation = [("user", "Compare <image> and <image>.")]
    plain = chat.generate(conversation, images, max_new_tokens=25, min_new_tokens=25)
    pieces: list[str] = []
    streamed = chat.generate(conversation, images, max_new_tokens=25, min_new_tokens=25, stream=pieces.append)
    assert streamed.text == plain.text and "".join(pieces) == plain.text
    assert len(pieces) > 3  # token by token, not one piece at the end


def test_cancel_from_the_stream_callback(chat_llama3: VilaChat) -> None:  # noqa: F811
    cancel = threading.Event()
    pieces: list[str] = []

    def on_piece(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 2:
            cancel.set()

    result = chat_llama3.generate(QUESTION, make_images(1), max_new_tokens=200, min_new_tokens=200,
                                  stream=on_piece, cancel=cancel)
    assert result.stopped_by == "cancelled" and result.n_tokens < 20
    assert "".join(pieces) == result.text


def test_cancel_from_another_thread(chat_vicuna: VilaChat) -> None:  # noqa: F811
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    start = time.perf_counter()
    result = chat_vicuna.generate(QUESTION, make_images(1), max_new_tokens=4000, min_new_tokens=4000,
                                  stream=lambda _: time.sleep(0.005), cancel=cancel)
    timer.cancel()
    assert result.stopped_by == "cancelled" and result.n_tokens < 3000
    assert time.perf_counter() - start < 30
    already = chat_vicuna.generate(QUESTION, make_images(1), cancel=cancel)
    assert (already.n_tokens, already.stopped_by, already.text) == (0, "cancelled", "")


def test_stream_callback_errors_abort_generation(chat_vicuna: VilaChat) -> None:  # noqa: F811
    def broken(_: str) -> None:
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        chat_vicuna.generate(QUESTION, make_images(1), max_new_tokens=20, min_new_tokens=20, stream=broken)
    assert chat_vicuna.generate(QUESTION, make_images(1), max_new_tokens=3).n_tokens > 0  # still usable


def test_concurrent_calls_are_serialised(chat_vicuna: VilaChat) -> None:  # noqa: F811
    images = make_images(1)
    expected = chat_vicuna.generate(QUESTION, images, max_new_tokens=8, min_new_tokens=8).text
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(
        chat_vicuna.generate(QUESTION, images, max_new_tokens=8, min_new_tokens=8).text)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3


# ---- inputs and limits -----------------------------------------------------------------------------
def test_brats_five_images(chat_llama3: VilaChat) -> None:  # noqa: F811
    conversation = [
        ("user", "T1(contrast enhanced): <image>, T1: <image>, T2: <image>, FLAIR: <image> "
                 "These are different MRI modalities.\nIs there a tumor?"),
        ("assistant", "This looks like an MRI image sequence. Let me first trigger <BRATS()>."),
        ("user", "The results are <image>. Use this result to respond to this prompt:\nIs there a tumor?"),
    ]
    result = chat_llama3.generate(conversation, make_images(5), max_new_tokens=4)
    assert result.prompt_tokens == chat_llama3.prepare(conversation, 5).n_text_tokens + 5 * 196
    assert 1 <= result.n_tokens <= 4


def test_image_inputs_of_every_kind_give_the_same_answer(chat_vicuna: VilaChat, tmp_path) -> None:  # noqa: F811
    import numpy as np

    image = make_images(1)[0]
    path = tmp_path / "slice.png"
    image.save(path)
    grey = np.asarray(image.convert("L"))
    answers = {
        kind: chat_vicuna.generate(QUESTION, [value], max_new_tokens=6, min_new_tokens=6).text
        for kind, value in {"pil": image, "array": np.asarray(image), "path": path,
                            "tensor": chat_vicuna.model.image_processor([image])[0]}.items()
    }
    assert len(set(answers.values())) == 1
    grey_answer = chat_vicuna.generate(QUESTION, [grey], max_new_tokens=6, min_new_tokens=6)
    assert grey_answer.n_tokens == 6  # a grey slice is replicated to 3 channels
    with pytest.raises(ValueError, match="uint8"):
        chat_vicuna.generate(QUESTION, [grey.astype(float)])


def test_errors_before_generation(chat_vicuna: VilaChat) -> None:  # noqa: F811
    with pytest.raises(ImageCountError):
        chat_vicuna.generate(QUESTION, make_images(2))
    with pytest.raises(ImageCountError):
        chat_vicuna.generate([("user", "no placeholder")], make_images(1))
    many = [("user", " ".join(["<image>"] * 21))]
    with pytest.raises(PromptTooLongError, match="21 image"):
        chat_vicuna.generate(many, make_images(21))


def test_max_new_tokens_is_capped_by_the_context(chat_vicuna: VilaChat) -> None:  # noqa: F811
    conversation = [("user", " ".join(["<image>"] * 20))]  # 20 x 196 = 3920 image tokens
    prompt = chat_vicuna.prepare(conversation, 20)
    room = 4096 - prompt.n_tokens
    result = chat_vicuna.generate(conversation, make_images(20), max_new_tokens=1000, min_new_tokens=1000)
    assert result.n_tokens == room and result.stopped_by == "max_new_tokens"


def test_default_device_and_dtype() -> None:
    device, dtype = default_device_and_dtype()
    if torch.cuda.is_available():
        assert device.type == "cuda" and dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        assert (device.type, dtype) == ("cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_generation(tiny_llama3) -> None:  # noqa: F811
    chat_gpu = VilaChat.from_pretrained(tiny_llama3)
    assert chat_gpu.model.device.type == "cuda"
    assert next(chat_gpu.model.parameters()).dtype in (torch.bfloat16, torch.float16)
    result = chat_gpu.generate(QUESTION, make_images(1), max_new_tokens=8, min_new_tokens=8)
    assert result.n_tokens == 8


def test_text_after_a_stop_string_is_never_part_of_the_answer(chat_vicuna: VilaChat) -> None:  # noqa: F811
    ids = _ids(chat_vicuna, "Liver") + [chat_vicuna.tokenizer.convert_tokens_to_ids(f"<0x{ord(c):02X}>") for c in "</s>"]
    assert chat_vicuna.decode(ids + _ids(chat_vicuna, " trailing words")) == "Liver"
