"""Loading released-layout VILA checkpoints: exact forward pass, save/reload, dtype, device_map, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from vlm_fixtures import chat_llama3, chat_vicuna, make_images, tiny_llama3, tiny_vicuna  # noqa: F401
from vlm_reference import reference_logits, reference_merge_2x2, reference_prompt

from vila_m3.standins.tiny_vila import make_tiny_vila_checkpoint
from vila_m3.vlm import (
    IMAGE_TOKEN_INDEX,
    CheckpointError,
    VilaChat,
    VilaForConditionalGeneration,
    downsample_2x2,
    inspect_checkpoint,
)


def _logits(model: VilaForConditionalGeneration, chat: VilaChat, question: str, images) -> torch.Tensor:
    prompt = chat.prepare([("user", question)], n_images=len(images))
    with torch.no_grad():
        return model(input_ids=prompt.as_tensor(), pixel_values=model.image_processor(images)).logits[0]


# ---- the forward pass against the independent reference ---------------------------------------
@pytest.mark.parametrize("template", ["llama_3", "vicuna_v1"])
def test_logits_match_independent_reference(template: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue("tiny_llama3" if template == "llama_3" else "tiny_vicuna")
    chat = request.getfixturevalue("chat_llama3" if template == "llama_3" else "chat_vicuna")
    question = "Compare <image> with <image>\nWhat changed between the two CT images?"
    images = make_images(2)

    ref_logits, ref_ids = reference_logits(folder, reference_prompt(template, question), images)
    prompt = chat.prepare([("user", question)], n_images=2)
    assert prompt.text == reference_prompt(template, question)
    assert list(prompt.input_ids) == ref_ids

    bos = chat.tokenizer.bos_token_id
    if template == "llama_3":  # the system text starts with <|begin_of_text|> and the tokenizer adds one
        assert ref_ids[:2] == [bos, bos] and ref_ids.count(bos) == 2
    else:
        assert ref_ids[0] == bos and ref_ids[1] != bos and ref_ids.count(bos) == 1
    image_positions = [i for i, t in enumerate(ref_ids) if t == IMAGE_TOKEN_INDEX]
    assert len(image_positions) == 2
    assert all(ref_ids[i + 1] != bos for i in image_positions)  # later chunks dropped their BOS

    ours = _logits(chat.model, chat, question, images)
    assert ours.shape == ref_logits.shape == (len(ref_ids) - 2 + 2 * 196, len(chat.tokenizer))
    torch.testing.assert_close(ours, ref_logits, atol=1e-5, rtol=1e-5)


def test_reference_is_sensitive_to_image_order(chat_llama3: VilaChat, tiny_llama3: Path) -> None:  # noqa: F811
    """Swapping the two images changes the logits: the comparison above could fail."""
    question = "Compare <image> with <image>\nWhat changed?"
    images = make_images(2)
    a = _logits(chat_llama3.model, chat_llama3, question, images)
    b = _logits(chat_llama3.model, chat_llama3, question, images[::-1])
    assert (a - b).abs().max() > 1e-3


def test_merge_2x2_literal_column_major() -> None:
    """3 x 3 grid of 1..9 -> padded 4 x 4 -> blocks TL TR BL BR, column-major block order."""
    grid = torch.arange(1.0, 10.0).reshape(1, 9, 1)
    merged = downsample_2x2(grid)[0]
    expected = torch.tensor([[1.0, 2, 4, 5], [7, 8, 0, 0], [3, 0, 6, 0], [9, 0, 0, 0]])
    assert torch.equal(merged, expected)


@pytest.mark.parametrize("side", [27, 4, 5])
def test_merge_2x2_matches_loops(side: int) -> None:
    features = torch.randn(2, side * side, 3)
    ours = downsample_2x2(features)
    m = (side + 1) // 2
    assert ours.shape == (2, m * m, 12)
    for b in range(2):
        assert torch.equal(ours[b], reference_merge_2x2(features[b]))
    with pytest.raises(ValueError, match="square"):
        downsample_2x2(torch.randn(1, 10, 3))


# ---- loading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["llama_3", "vicuna_v1"])
def test_load_reads_shapes_and_fields_from_files(template: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue("tiny_llama3" if template == "llama_3" else "tiny_vicuna")
    model = VilaForConditionalGeneration.from_pretrained(folder)
    cfg = model.config
    assert model.is_stand_in and "not a medical model" in cfg.vila_m3_stand_in
    assert cfg.hidden_size == model.llm.config.hidden_size == 64
    assert cfg.mm_hidden_size == model.vision_tower.config.hidden_size == 32
    assert model.mm_projector.projector_type == "mlp_downsample"
    assert model.num_vision_tokens == 729 and model.tokens_per_image == 196
    assert model.context_length == 4096
    assert cfg.mm_vision_select_layer == -2 and cfg.mm_vision_select_feature == "cls_patch"
    assert cfg.s2 is False and cfg.num_video_frames == 8  # unknown training fields are kept
    assert model.image_processor.size == (54, 54)
    assert model.dtype == torch.float32  # stored dtype ("auto")
    llama3 = template == "llama_3"
    assert model.llm.config.rope_parameters["rope_theta"] == (500000.0 if llama3 else 10000.0)
    info = inspect_checkpoint(folder)
    assert len(info.llm_weight_files) == 2 and info.has_tokenizer


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_other_projector_types(projector: str, tmp_path: Path) -> None:
    folder = make_tiny_vila_checkpoint(tmp_path / projector, template="vicuna_v1", projector=projector)
    model = VilaForConditionalGeneration.from_pretrained(folder)
    assert model.mm_projector.projector_type == projector
    assert model.tokens_per_image == 729
    features = model.get_image_features(model.image_processor(make_images(1)))
    assert features.shape == (1, 729, 64)
    # the loaded projector weights are the stored ones
    stored = load_file(str(folder / "mm_projector" / "model.safetensors"))
    for key, value in model.mm_projector.state_dict().items():
        assert torch.equal(value, stored[key])


def test_save_pretrained_writes_release_layout_and_reloads(chat_llama3: VilaChat, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "saved"
    chat_llama3.model.save_pretrained(out, tokenizer=chat_llama3.tokenizer, max_shard_size="100KB")

    top = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert top["model_type"] == "llava_llama" and top["architectures"] == ["LlavaLlamaModel"]
    assert top["hidden_size"] == 64 and top["mm_hidden_size"] == 32 and top["mm_vision_select_layer"] == -2
    assert top["llm_cfg"]["tokenizer_model_max_length"] == 4096
    assert top["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample"
    assert top["vila_m3_stand_in"] and top["s2"] is False
    llm_cfg = json.loads((out / "llm" / "config.json").read_text(encoding="utf-8"))
    assert llm_cfg["torch_dtype"] == "float32" and llm_cfg["rope_theta"] == 500000.0  # readable by old code too
    index = json.loads((out / "llm" / "model.safetensors.index.json").read_text(encoding="utf-8"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith("model-0000") for s in shards)
    with safe_open(str(out / "vision_tower" / "model.safetensors"), "pt") as handle:
        assert all(key.startswith("vision_model.") for key in handle.keys())  # noqa: SIM118
    assert (out / "vision_tower" / "preprocessor_config.json").is_file()
    assert set(load_file(str(out / "mm_projector" / "model.safetensors"))) == {
        "layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias", "layers.4.weight", "layers.4.bias",
    }
    assert (out / "llm" / "tokenizer.json").is_file()

    reloaded = VilaChat.from_pretrained(out, device="cpu")
    question = "Here <image> and <image> again."
    images = make_images(2, seed=3)
    before = _logits(chat_llama3.model, chat_llama3, question, images)
    after = _logits(reloaded.model, reloaded, question, images)
    assert torch.equal(before, after)
    assert reloaded.template.name == "llama_3" and reloaded.is_stand_in


def test_save_without_tokenizer_copies_the_source_tokenizer(tiny_vicuna: Path, tmp_path: Path) -> None:  # noqa: F811
    model = VilaForConditionalGeneration.from_pretrained(tiny_vicuna)
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "llm" / "tokenizer.model").read_bytes() == (tiny_vicuna / "llm" / "tokenizer.model").read_bytes()
    assert VilaChat.from_pretrained(tmp_path / "copy", device="cpu").template.name == "vicuna_v1"


# ---- dtype and device_map -------------------------------------------------------------------------
def test_dtype_applies_to_every_part(tiny_llama3: Path) -> None:  # noqa: F811
    for kwargs in ({"dtype": torch.bfloat16}, {"torch_dtype": "bfloat16"}, {"dtype": "torch.bfloat16"}):
        model = VilaForConditionalGeneration.from_pretrained(tiny_llama3, **kwargs)
        dtypes = {p.dtype for p in model.parameters()}
        assert dtypes == {torch.bfloat16}, kwargs
    with pytest.raises(ValueError, match="disagree"):
        VilaForConditionalGeneration.from_pretrained(tiny_llama3, dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_auto_dtype_is_the_stored_one(tmp_path: Path) -> None:
    folder = make_tiny_vila_checkpoint(tmp_path / "bf16", template="llama_3", dtype="bfloat16")
    model = VilaForConditionalGeneration.from_pretrained(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model32 = VilaForConditionalGeneration.from_pretrained(folder, dtype="float32")
    assert {p.dtype for p in model32.parameters()} == {torch.float32}


def test_device_maps(chat_llama3: VilaChat, tiny_llama3: Path) -> None:  # noqa: F811
    question = "Look: <image>"
    images = make_images(1)
    expected = _logits(chat_llama3.model, chat_llama3, question, images)
    for device_map in ("auto", "sequential", {"": "cpu"}, {"llm": "cpu", "vision_tower": "cpu", "mm_projector": "cpu"}, "cpu"):
        model = VilaForConditionalGeneration.from_pretrained(tiny_llama3, device_map=device_map)
        assert set(model.hf_device_map) >= {"mm_projector"}
        assert {str(d) for d in model.hf_device_map.values()} == {"cpu"}, device_map
        torch.testing.assert_close(_logits(model, chat_llama3, question, images), expected)
    with pytest.raises(ValueError, match="does not name a part"):
        VilaForConditionalGeneration.from_pretrained(tiny_llama3, device_map={"language_model": "cpu"})
    with pytest.raises(TypeError, match="Unexpected"):
        VilaForConditionalGeneration.from_pretrained(tiny_llama3, not_an_option=1)


# ---- broken checkpoints: one CheckpointError naming the file and the problem ----------------------
def _broken_copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(source, target)
    return target


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data))


def _load_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        VilaForConditionalGeneration.from_pretrained(folder)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_error_missing_projector_folder(tiny_llama3: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _broken_copy(tiny_llama3, tmp_path)
    shutil.rmtree(folder / "mm_projector")
    message = _load_error(folder)
    assert "mm_projector/" in message and "folder missing" in message and str(folder) in message


def test_error_missing_top_config(tiny_llama3: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _broken_copy(tiny_llama3, tmp_path)
    (folder / "config.json").unlink()
    message = _load_error(folder)
    assert "config.json: missing" in message


def test_error_wrong_hidden_size(tiny_llama3: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _broken_copy(tiny_llama3, tmp_path)
    _edit_json(folder / "config.json", hidden_size=128)
    message = _load_error(folder)
    assert "config.json: hidden_size is 128, expected 64" in message and "llm/config.json" in message


def test_error_vision_width_mismatch(tiny_llama3: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _broken_copy(tiny_llama3, tmp_path)
    _edit_json(folder / "config.json", mm_hidden_size=1152)
    message = _load_error(folder)
    assert "mm_hidden_size is 1152, expected 32" in message and "vision_tower/config.json" in message


def test_error_unknown_projector_type(tiny_llama3: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _broken_copy(tiny_llama3, tmp_path)
    _edit_json(folder / "mm_projector" / "config.json", mm_projector_type="mlp_resampler")
    message = _load_error(folder)
    assert "mm_projector/config.json" in message and "unknown mm_projector_type 'mlp_resampler'" in message


def test_error_projector_weight_shapes(tiny_llama3: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _broken_copy(tiny_llama3, tmp_path)
    path = folder / "mm_projector" / "model.safetensors"
    state = load_file(str(path))
    state["layers.4.weight"] = torch.zeros(64, 48)
    save_file(state, str(path))
    message = _load_error(folder)
    assert "mm_projector/model.safetensors: layers.4.weight shape is (64, 48), expected (64, 64)" in message


def test_error_corrupt_safetensors(tiny_llama3: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _broken_copy(tiny_llama3, tmp_path)
    shard = folder / "llm" / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    message = _load_error(folder)
    assert "llm/model-00002-of-00002.safetensors: corrupt or truncated safetensors file" in message


def test_error_invalid_json_and_several_problems_in_one_message(tiny_vicuna: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _broken_copy(tiny_vicuna, tmp_path)
    (folder / "vision_tower" / "config.json").write_text("{not json")
    (folder / "mm_projector" / "model.safetensors").unlink()
    message = _load_error(folder)
    assert "vision_tower/config.json: not valid JSON" in message
    assert "mm_projector/: no model.safetensors" in message
    assert message.count("\n  - ") == 2


def test_error_missing_llm_tensor(tiny_llama3: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _broken_copy(tiny_llama3, tmp_path)
    index_path = folder / "llm" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    key = "model.layers.1.mlp.down_proj.weight"
    shard = folder / "llm" / index["weight_map"].pop(key)
    state = load_file(str(shard))
    del state[key]
    save_file(state, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    message = _load_error(folder)
    assert "llm/" in message and "weights missing" in message and key in message


def test_error_not_a_folder(tmp_path: Path) -> None:
    message = _load_error(tmp_path / "nowhere")
    assert "not a folder" in message


def test_error_missing_tokenizer_for_chat(tiny_vicuna: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _broken_copy(tiny_vicuna, tmp_path)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / "llm" / name).unlink()
    with pytest.raises(CheckpointError, match="llm/: no tokenizer"):
        VilaChat.from_pretrained(folder, device="cpu")
    with pytest.raises(CheckpointError, match="no tokenizer"):
        inspect_checkpoint(folder, require_tokenizer=True)


# ---- batches and labels ----------------------------------------------------------------------------
def test_batched_generation_matches_single_prompts(chat_vicuna: VilaChat) -> None:  # noqa: F811
    """Left padding in embed_multimodal: a padded batch decodes like each prompt alone."""
    model, tokenizer = chat_vicuna.model, chat_vicuna.tokenizer
    prompts = [chat_vicuna.prepare([("user", "<image> Short?")], 1),
               chat_vicuna.prepare([("user", "A much longer question about <image> and <image> here?")], 2)]
    images = make_images(3, seed=7)
    pixel_values = model.image_processor(images)
    width = max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):  # right-padded ids: the model re-pads on the left
        input_ids[row, : len(prompt.input_ids)] = prompt.as_tensor()[0]
        mask[row, : len(prompt.input_ids)] = 1
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    batched = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, **kwargs)
    single = [
        model.generate(input_ids=prompts[0].as_tensor(), pixel_values=pixel_values[:1], **kwargs)[0],
        model.generate(input_ids=prompts[1].as_tensor(), pixel_values=pixel_values[1:], **kwargs)[0],
    ]
    assert batched.shape == (2, 6)
    assert batched[0].tolist() == single[0].tolist() and batched[1].tolist() == single[1].tolist()


def test_labels_ignore_image_positions(chat_llama3: VilaChat) -> None:  # noqa: F811
    model = chat_llama3.model
    prompt = chat_llama3.prepare([("user", "<image> What is it?")], 1)
    ids = prompt.as_tensor()
    labels = ids.clone()
    labels[labels == IMAGE_TOKEN_INDEX] = -100
    pixel_values = model.image_processor(make_images(1))
    embeds, mask, spliced = model.embed_multimodal(ids, model.get_image_features(pixel_values), labels=labels)
    assert embeds.shape[1] == spliced.shape[1] == prompt.n_tokens and bool(mask.all())
    assert int((spliced == -100).sum()) == 196 + int((labels == -100).sum()) - 1
    loss = model(input_ids=ids, pixel_values=pixel_values, labels=labels).loss
    assert torch.isfinite(loss) and loss > 0
