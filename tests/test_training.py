"""Fine-tuning on data-engine exports: loss labels, a real (tiny) training run on CPU, resume, LoRA,
the training record, trigger evaluation and the fine-tuned versions a server serves."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from vila_m3.data.export import export_dataset
from vila_m3.experts.triggers import find_triggers
from vila_m3.samples.annotated import annotated_studies
from vila_m3.standins.tiny_vila import make_tiny_vila_checkpoint
from vila_m3.training.evaluation import evaluate_triggers, format_report, product_registry
from vila_m3.training.examples import ConversationDataset, DataError, collate, encode_conversation
from vila_m3.training.options import TrainingOptions, TrainingOptionsError
from vila_m3.training.record import file_sha256
from vila_m3.training.trainer import TrainingError, fine_tune
from vila_m3.training.versions import ModelVersions, VersionError
from vila_m3.vlm.generation import VilaChat
from vila_m3.vlm.modeling import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VilaForConditionalGeneration
from vila_m3.vlm.prompting import tokenize_with_images
from vila_m3.vlm.templates import get_template

CONVERSATION = [
    ("human", "Experts card.\n<image>This is a CT image.\nIs there a liver tumour?"),
    ("gpt", "This looks like a CT image. Let me trigger <VISTA3D(hepatic tumor)>. "),
    ("human", "The results are <image>. Use this result to respond to this prompt:\nIs there a liver tumour?"),
    ("gpt", "yes"),
]
QUICK = {"max_steps": 6, "batch_size": 2, "gradient_accumulation": 1, "learning_rate": 5e-3, "logging_steps": 1,
         "warmup_ratio": 0.0, "gradient_checkpointing": False}


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data-engine export of the annotated sample studies (seed 0)."""
    root = tmp_path_factory.mktemp("training-data")
    studies = annotated_studies(root / "studies", seeds=(0,), scratch=root / "samples")
    out = root / "export"
    export_dataset(studies, out, progress=False)
    return out


def _texts(export: Path) -> list[str]:
    records = json.loads((export / "train.json").read_text(encoding="utf-8"))
    return sorted({turn["value"].replace("<image>", " ") for record in records for turn in record["conversations"]})


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, export: Path) -> Path:
    """A tiny random checkpoint in the released layout; tokenizer trained on the export (short sequences)."""
    return make_tiny_vila_checkpoint(tmp_path_factory.mktemp("base") / "ckpt", template="llama_3", corpus=_texts(export),
                                     vocab_size=800, image_size=14, num_shards=1)


@pytest.fixture(scope="module")
def training_log() -> list[str]:
    """The log lines of the ``trained`` run."""
    return []


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, base: Path, export: Path, training_log: list[str]):
    run = tmp_path_factory.mktemp("run") / "run"
    options = TrainingOptions.from_config({**QUICK, "save_steps": 3})
    return fine_tune(base, export, run, options, progress=False, log=training_log.append)


def test_without_a_bar_each_logged_step_says_the_loss_and_the_time_left(trained, training_log):
    assert "Fine-tuning the VLM: 6 steps to go" in training_log
    steps = [line for line in training_log if line.startswith("Fine-tuning the VLM: step ") and "; loss " in line]
    assert [line.split(",")[0] for line in steps] == [f"Fine-tuning the VLM: step {n}/6" for n in range(1, 7)]
    assert all(re.search(r", \d+ (s|min) elapsed, ~\d+ (s|min)( \d+ s)? left; loss \d", line) for line in steps[:-1])
    assert " elapsed; loss " in steps[-1]  # nothing left to estimate at the last step
    assert any("validation records before training" in line for line in training_log)
    assert training_log[-1].startswith("saved the fine-tuned checkpoint")


@pytest.mark.parametrize("template", ["llama_3", "vicuna_v1"])
def test_labels_cover_exactly_the_answers_and_their_end_tokens(tmp_path, template):
    folder = make_tiny_vila_checkpoint(tmp_path / "ckpt", template=template)
    tokenizer = AutoTokenizer.from_pretrained(folder / "llm")
    chosen = get_template(template)
    encoded = encode_conversation(CONVERSATION, tokenizer, chosen)

    # the ids are the inference tokenization of the rendered conversation
    text = chosen.render([("user" if r == "human" else "assistant", t) for r, t in CONVERSATION],
                         add_generation_prompt=False)
    assert encoded.input_ids == tokenize_with_images(text, tokenizer)
    assert encoded.n_images == 2 and encoded.input_ids.count(IMAGE_TOKEN_INDEX) == 2

    trained = [i for i, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(encoded.input_ids, encoded.labels, strict=True))
    decoded = tokenizer.decode(trained)
    end_first, end_last = (chosen.sep, chosen.sep2) if template == "llama_3" else (chosen.sep2, chosen.sep2)
    assert decoded.replace(" ", "") == (CONVERSATION[1][1] + end_first + CONVERSATION[3][1] + end_last).replace(" ", "")
    first_answer = encoded.labels.index(next(label for label in encoded.labels if label != IGNORE_INDEX))
    assert tokenizer.decode([i for i in encoded.input_ids[:first_answer] if i >= 0]).endswith(
        ("<|end_header_id|>\n\n", "ASSISTANT:"))


def test_a_conversation_must_end_with_an_answer(base):
    tokenizer = AutoTokenizer.from_pretrained(base / "llm")
    with pytest.raises(DataError, match="end with an assistant turn"):
        encode_conversation(CONVERSATION[:3], tokenizer, get_template("llama_3"))


def test_the_dataset_gives_images_through_the_models_processor_and_pads_batches(base, export):
    model = VilaForConditionalGeneration.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base / "llm")
    dataset = ConversationDataset(export, "train", tokenizer, get_template("llama_3"), model.image_processor,
                                  model.tokens_per_image, 4096)
    items = [dataset[0], dataset[1]]
    assert items[0]["pixel_values"].shape[1:] == (3, 14, 14)
    batch = collate(items, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape[0] == sum(int((i["input_ids"] == IMAGE_TOKEN_INDEX).sum()) for i in items)
    loss = model(**batch).loss
    assert torch.isfinite(loss)

    short = ConversationDataset(export, "train", tokenizer, get_template("llama_3"), model.image_processor,
                                model.tokens_per_image, 300)
    assert short.skipped > 0 and len(short) + short.skipped == len(dataset)


def test_fine_tuning_lowers_the_loss_and_saves_a_checkpoint_that_loads_and_generates(trained, base, export):
    history = [entry["loss"] for entry in trained.metrics["log_history"] if "loss" in entry]
    assert len(history) == 6
    assert sum(history[-2:]) / 2 < sum(history[:2]) / 2
    assert trained.metrics["eval_loss"] < trained.metrics["eval_loss_before"]

    checkpoint = trained.checkpoint
    for part in ("config.json", "llm/config.json", "vision_tower/model.safetensors", "mm_projector/model.safetensors",
                 "llm/tokenizer.json", "training_record.json"):
        assert (checkpoint / part).is_file(), part
    chat = VilaChat.from_pretrained(checkpoint, device="cpu")
    result = chat.generate([("user", "<image>This is a CT image.\nIs there a liver tumour?")],
                           images=[torch.zeros(3, 14, 14)], max_new_tokens=5, min_new_tokens=5)
    assert result.n_tokens == 5
    before = VilaForConditionalGeneration.from_pretrained(base)
    after = chat.model
    assert not torch.equal(before.llm.lm_head.weight, after.llm.lm_head.weight)
    assert not torch.equal(before.vision_tower.embeddings.patch_embedding.weight,
                           after.vision_tower.embeddings.patch_embedding.weight)


def test_the_training_record_names_the_base_the_data_and_the_settings(trained, base, export):
    record = json.loads((trained.checkpoint / "training_record.json").read_text(encoding="utf-8"))
    assert record["base_checkpoint"]["path"] == str(base.resolve())
    assert record["base_checkpoint"]["config_sha256"] == file_sha256(base / "config.json")
    assert record["data"]["manifest_sha256"] == file_sha256(export / "manifest.json")
    assert record["data"]["train_sha256"] == file_sha256(export / "train.json")
    assert record["hyperparameters"]["learning_rate"] == QUICK["learning_rate"]
    assert record["hyperparameters"]["parts"] == ["llm", "projector", "vision"]
    assert record["metrics"]["steps"] == 6
    assert record == json.loads((trained.run_dir / "training_record.json").read_text(encoding="utf-8"))


def test_a_resumed_run_continues_from_its_step_with_the_same_losses(trained, base, export):
    steps = sorted((trained.run_dir / "steps").glob("checkpoint-*"))
    assert [p.name for p in steps] == ["checkpoint-3", "checkpoint-6"]
    # the step checkpoint is itself a loadable checkpoint in the released layout
    VilaForConditionalGeneration.from_pretrained(steps[0])

    options = TrainingOptions.from_config({**QUICK, "save_steps": 3})
    resumed = fine_tune(base, export, trained.run_dir, options, resume=steps[0], progress=False, log=lambda line: None)
    assert resumed.record["resumed_from"] == str(steps[0])
    assert resumed.metrics["steps"] == 6
    first = {e["step"]: e["loss"] for e in trained.metrics["log_history"] if "loss" in e}
    again = {e["step"]: e["loss"] for e in resumed.metrics["log_history"] if "loss" in e and e["step"] > 3}
    assert sorted(again) == [4, 5, 6]
    for step, loss in again.items():
        assert loss == pytest.approx(first[step], rel=1e-3)


def test_a_finished_run_folder_is_not_overwritten_and_nothing_to_resume_is_said(trained, base, export, tmp_path):
    options = TrainingOptions.from_config(QUICK)
    with pytest.raises(TrainingError, match="holds an earlier run"):
        fine_tune(base, export, trained.run_dir, options, progress=False)
    with pytest.raises(TrainingError, match="nothing to resume"):
        fine_tune(base, export, tmp_path / "new", options, resume=True, progress=False)


def test_lora_trains_adapters_and_saves_them_merged_in_the_released_layout(base, export, tmp_path):
    options = TrainingOptions.from_config({**QUICK, "max_steps": 2, "lora_enabled": True, "lora_r": 4,
                                           "parts": "llm", "learning_rate": 5e-2})
    result = fine_tune(base, export, tmp_path / "lora", options, progress=False, log=lambda line: None)
    saved = VilaForConditionalGeneration.from_pretrained(result.checkpoint)
    original = VilaForConditionalGeneration.from_pretrained(base)
    keys = saved.state_dict().keys()
    assert not any("lora" in key for key in keys) and keys == original.state_dict().keys()
    layer = "llm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved.state_dict()[layer], original.state_dict()[layer])
    # only the LLM learnt: the projector is untouched
    assert torch.equal(saved.mm_projector.layers[1].weight, original.mm_projector.layers[1].weight)


@pytest.mark.parametrize("overrides, message", [
    ({"parts": "llm,decoder"}, "parts must be"),
    ({"learning_rat": 1.0}, "unknown training option"),
    ({"lora_enabled": True, "parts": "projector"}, "LoRA adapts the LLM"),
    ({"precision": "fp8"}, "precision must be"),
    ({"device": "tpu"}, "device must be one of auto, cpu; got 'tpu'"),
    ({"device": "cpu", "precision": "bf16"}, "bf16 needs a GPU; with device cpu"),
    ({"warmup_ratio": 1.5}, "warmup_ratio"),
])
def test_bad_options_are_refused_by_name(overrides, message):
    with pytest.raises(TrainingOptionsError, match=message):
        TrainingOptions.from_config(overrides)


class _RoutingDouble:
    """Answers each first turn with the right trigger, except for the questions listed as wrong."""

    def __init__(self, wrong: set[str], false_call: set[str], rambling: frozenset[str] = frozenset()):
        self.wrong, self.false_call, self.rambling = wrong, false_call, rambling

    def generate(self, conversation, images=(), max_new_tokens=64, **_):
        question = conversation[0][1].rsplit("\n", 1)[-1]
        if len(conversation) > 1:  # after the expert's feedback: "no" (and on past it, for the rambling ones)
            return type("R", (), {"text": "no first trigger <CXR(" if question in self.rambling else "no"})()
        if question in self.false_call:
            return type("R", (), {"text": "Let me trigger <CXR()>."})()
        expected = _EXPECTED.get(question, "")
        if question in self.wrong:
            expected = "This looks like a CT image. Let me trigger <VISTA3D(lung tumor)>."
        return type("R", (), {"text": expected})()


_EXPECTED: dict[str, str] = {}


def test_trigger_evaluation_counts_right_calls_false_calls_and_answers(export):
    records = json.loads((export / "val.json").read_text(encoding="utf-8")) + \
        json.loads((export / "train.json").read_text(encoding="utf-8"))
    unique = {r["id"].split(".")[0]: r for r in records}
    registry = product_registry()
    needs = [r for r in unique.values() if find_triggers(r["conversations"][1]["value"], registry).triggers]
    no_need = [r for r in unique.values() if r not in needs]
    assert needs and no_need
    for record in unique.values():
        _EXPECTED[record["conversations"][0]["value"].rsplit("\n", 1)[-1]] = record["conversations"][1]["value"]
    questions = [r["conversations"][0]["value"].rsplit("\n", 1)[-1] for r in needs]
    wrong = {q for q in questions if questions.count(q) == 1 and "tumor" not in q}
    wrong = set(sorted(wrong)[:2])
    false_call = {no_need[0]["conversations"][0]["value"].rsplit("\n", 1)[-1]}

    answered = [r for r in needs if len(r["conversations"]) >= 4 and _answer_of(unique, r["id"]) == "no"]
    rambling = frozenset({answered[0]["conversations"][0]["value"].rsplit("\n", 1)[-1]})

    shown: list[str] = []
    report = evaluate_triggers(_RoutingDouble(wrong, false_call, rambling), export, split="all", log=shown.append)
    total = len(report.outcomes)
    assert shown[0] == f"Evaluating the model's expert calls: {total} records to go"  # off a terminal: lines
    assert re.fullmatch(rf"Evaluating the model's expert calls: {total}/{total} records, \d+ s elapsed, done", shown[-1])
    n_wrong = sum(q in wrong for q in questions)
    assert report.trigger_accuracy == pytest.approx((len(needs) - n_wrong) / len(needs))
    n_false = sum(r["conversations"][0]["value"].rsplit("\n", 1)[-1] in false_call for r in no_need)
    assert report.false_call_rate == pytest.approx(n_false / len(no_need))
    yes_no = [o for o in report.outcomes if o.answer_type == "yes/no"]
    assert yes_no and report.answer_accuracy("yes/no") == pytest.approx(
        sum(o.final_answer.startswith("no") and "no" in _answer_of(unique, o.record_id) for o in yes_no) / len(yes_no))
    # a "no" that runs on past itself is the right word but not the answer
    checked = [o for o in report.outcomes if o.answer_type]
    ran_on = [o for o in checked if o.final_answer.startswith("no first")]
    assert ran_on and all(o.answer_right and not o.answer_exact for o in ran_on)
    assert report.exact_answer_rate == pytest.approx(
        sum(o.final_answer == _answer_of(unique, o.record_id) for o in checked) / len(checked))
    table = format_report(report, {"trigger_accuracy": 0.95, "false_call_rate": 0.05})
    assert "right expert and argument" in table and "NOT met" in table and "whole answers exact" in table


def test_the_evaluation_of_a_held_out_export_is_named_so_in_its_progress(export, tmp_path):
    heldout = tmp_path / "heldout"
    shutil.copytree(export, heldout)
    manifest = json.loads((heldout / "manifest.json").read_text(encoding="utf-8"))
    manifest["phrasings"]["use"] = "heldout"
    (heldout / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    shown: list[str] = []
    report = evaluate_triggers(_RoutingDouble(set(), set()), heldout, limit=2, check_answers=False, log=shown.append)
    assert len(report.outcomes) == 2
    assert shown[0] == "Evaluating the model on held-out phrasings: 2 records to go"
    assert shown[-1].startswith("Evaluating the model on held-out phrasings: 2/2 records, ")
    evaluate_triggers(_RoutingDouble(set(), set()), heldout, limit=2, check_answers=False, log=shown.append,
                      progress=False)
    assert len(shown) == 3  # the start and each record; nothing more without progress


def _answer_of(unique: dict, record_id: str) -> str:
    return unique[record_id.split(".")[0]]["conversations"][3]["value"].lower()


def test_versions_are_kept_served_and_switched_back(tmp_path, base):
    versions = ModelVersions(tmp_path, "vila_m3_8b")
    assert versions.current() is None and versions.checkpoint() is None
    first, run = versions.reserve()
    assert first == "v0001" and run.is_dir()
    with pytest.raises(VersionError, match="no finished checkpoint"):
        versions.register(first, {})
    import shutil

    shutil.copytree(base, run / "model")
    versions.register(first, {"steps": 1})
    second, run2 = versions.reserve()
    shutil.copytree(base, run2 / "model")
    versions.register(second, {"steps": 2})
    assert versions.current() == "v0002" and versions.checkpoint() == run2 / "model"
    versions.use("v0001")
    assert versions.checkpoint() == run / "model"
    versions.use("base")
    assert versions.current() is None
    with pytest.raises(VersionError, match="unknown version"):
        versions.use("v0009")
    assert [v["id"] for v in versions.read()["versions"]] == ["v0001", "v0002"]
