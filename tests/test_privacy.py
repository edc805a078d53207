"""Privacy where text is free: names and record numbers typed into chats never reach an export, the
export's own skip reasons pass its check, training refuses an export whose check failed, and no log
line holds prompt text."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import requests
from chat_doubles import ScriptedVLM
from PIL import Image
from server_harness import start_monailabel

from vila_m3.chat.loop import ChatLoop, TurnRequest
from vila_m3.chat.store import ChatStore
from vila_m3.chat.transcript import Message
from vila_m3.cli import main as vila_main
from vila_m3.data.cli import main as datagen_main
from vila_m3.data.export import export_dataset
from vila_m3.data.privacy import SKIP_REASONS, export_privacy_problem, scan_text
from vila_m3.data.questions import QuestionPools
from vila_m3.data.sources import Skip
from vila_m3.data.summary import WITHHELD_REASON, summarize
from vila_m3.experts.cxr import default_pathologies
from vila_m3.experts.feedback import (
    brats_feedback,
    classification_feedback,
    error_feedback,
    segmentation_feedback,
)
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.service import ExpertService
from vila_m3.logtext import fingerprint
from vila_m3.models.manifest import ModelManifest
from vila_m3.standins.tiny_vila import make_tiny_vila_checkpoint
from vila_m3.training.trainer import PrivacyCheckFailed, fine_tune

pytestmark = pytest.mark.security

TYPED = "Patient John Q Smith, MRN 12345678: is there an effusion?"
NUMBER_ONLY = "Compare with the study of medical record number 0815-4711. Any effusion?"
CLEAN = "Is there a pleural effusion on this chest x-ray?"
TYPED_WORDS = ("John Q Smith", "Smith", "12345678", "0815-4711")


# ------------------------------------------------------------------------------------------ patterns


@pytest.mark.parametrize("text, kind", [
    ("Patient John Q Smith, MRN 12345678", "name"),
    ("patient: Anna Maria Meier has pain", "name"),
    ("Is Mr. Smith's liver enlarged?", "name"),
    ("Dr Jones asked for a second look", "name"),
    ("Mrs Miller, left lung", "name"),
    ("the patient's name is Olsen", "name"),
    ("MRN 12345678", "record_number"),
    ("M.R.N.: 1234-5678", "record_number"),
    ("medical record number 0815-4711", "record_number"),
    ("patient id 44556677", "record_number"),
    ("Patient ID: A-4711", None),  # letters in the number: not a digit run (kept; a site adds --identifier)
    ("DOB 01/02/1960", "record_number"),
    ("date of birth: 3.4.1955", "record_number"),
    ("12345678 is her hospital number", "record_number"),
    ("the ID is 99887766", "record_number"),
    ("NHS 943 476 5919", "record_number"),
])
def test_names_and_record_numbers_typed_in_free_text_are_flagged(text, kind):
    kinds = {finding.kind for finding in scan_text(text, "prompt")}
    if kind is None:
        assert "record_number" not in kinds
    else:
        assert kind in kinds, kinds


@pytest.mark.parametrize("text", [
    "Is there a liver tumor?", "Does the patient have a brain tumor visible in this slice?",
    "Segment the spleen, then the kidneys.", "Is this an MR image or a CT?", "Any MS lesions on this slice?",
    "How many vertebrae are visible? Give the ID of each label.", "Is the lesion larger than 12 mm?",
    "The volume is 512 x 512 x 120 voxels.", "Did I miss anything on this slice?", "The patient is lying supine.",
])
def test_ordinary_questions_are_not_flagged(text):
    assert scan_text(text, "prompt") == []


def test_none_of_the_shipped_question_phrasings_card_or_expert_feedback_is_flagged():
    pools = QuestionPools.load()
    phrasings = [p for kinds in pools.pools.values() for ps in kinds.values() for p in ps]
    assert len(phrasings) > 500
    registry = ExpertRegistry.from_config()
    texts = [*phrasings, registry.model_card()]
    names = dict(registry.configured_spec("VISTA3D").labels)  # {label id: name}
    ids = sorted(names)
    for start in range(0, len(ids), 7):  # every label name, seven per slice
        texts.append(segmentation_feedback(ids[start:start + 7], names, phrasings[start % len(phrasings)]))
    texts.append(segmentation_feedback([], names, None))
    for present in ([], [1], [2], [4], [1, 2, 4]):
        texts.append(brats_feedback(present, "Is there a tumor?"))
    findings = {name: index % 2 == 0 for index, name in enumerate(default_pathologies())}
    texts += [classification_feedback(findings, "Is there an effusion?"), classification_feedback(findings, None)]
    texts.append(error_feedback("VISTA3D ran out of memory"))
    flagged = [(text[:80], [f.reason for f in scan_text(text, "")]) for text in texts if scan_text(text, "")]
    assert flagged == []


def test_skip_reasons_quote_nothing_and_are_not_flagged_themselves():
    assert all(scan_text(reason, "summary.txt") == [] for reason in SKIP_REASONS.values())
    findings = scan_text(TYPED, "prompt")
    assert findings and all(word not in f.skip_reason for f in findings for word in TYPED_WORDS)
    # a reason that quotes a value (e.g. an error message) is withheld from the summary
    summary = summarize([], [Skip("x", "label", "unreadable image: PatientName Smith^John"),
                             Skip("y", "label", "label without its image")], seed=0)
    assert [s["reason"] for s in summary["skipped"]] == [WITHHELD_REASON, "label without its image"]
    assert scan_text(WITHHELD_REASON, "summary.txt") == []


# ------------------------------------------------------------------------------------------ exports


def cxr_datastore(root: Path, sample_data: Path) -> Path:
    """A studies folder with the sample chest X-ray and its findings as the final label."""
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(sample_data / "studies" / "cxr_chest.png", studies)
    shutil.copy(sample_data / "ground_truth" / "cxr_chest.json", studies / "labels" / "final")
    return studies


def add_chat(chats: Path, chat_id: str, question: str, image: str = "cxr_chest",
             modality: str = "CXR", answer: str = "No effusion is visible.") -> None:
    """A stored one-exchange chat about ``image`` whose question is ``question``."""
    store = ChatStore(chats)
    chat = store.load(chat_id)
    store.save_image(chat_id, "turn001_slice0.png", Image.new("RGB", (8, 8), (40, 40, 40)))
    chat.study = {"image": image}
    chat.messages = [Message("user", f"<image>This is a {modality} image.\n{question}", ["turn001_slice0.png"],
                             question=question), Message("assistant", answer)]
    store.save(chat)


@pytest.fixture(scope="module")
def typed_export(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("typed")
    studies = cxr_datastore(root, sample_data)
    add_chat(root / "chats", "typed", TYPED)
    add_chat(root / "chats", "number", NUMBER_ONLY)
    add_chat(root / "chats", "clean", CLEAN)
    result = export_dataset(studies, root / "export", chats_dir=root / "chats", seed=0, progress=False)
    return root, result


def export_text(folder: Path) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in sorted(folder.rglob("*"))
                     if path.is_file() and path.suffix in (".json", ".txt"))


def test_a_chat_with_a_typed_name_and_record_number_is_left_out_with_a_reason_that_quotes_nothing(typed_export):
    root, result = typed_export
    reasons = {skip.source: skip.reason for skip in result.skips if skip.kind == "record"}
    assert reasons == {"typed": SKIP_REASONS["name"], "number": SKIP_REASONS["record_number"]}
    assert result.summary["notes"]["chats"] == 3  # all three became records; two were dropped by the privacy gate
    text = export_text(result.out_dir)
    assert CLEAN in text  # the clean chat is exported
    assert not any(word in text for word in TYPED_WORDS)
    summary = (result.out_dir / "summary.txt").read_text(encoding="utf-8")
    assert SKIP_REASONS["name"] in summary and SKIP_REASONS["record_number"] in summary
    assert result.privacy_passed
    assert result.manifest["privacy"] == json.loads((result.out_dir / "manifest.json").read_text())["privacy"]
    assert result.manifest["privacy"]["passed"] is True and result.manifest["privacy"]["findings"] == 0


def test_an_export_that_dropped_records_passes_datagen_check_and_a_doctored_copy_fails(typed_export, tmp_path,
                                                                                        capsys):
    root, result = typed_export
    assert datagen_main(["datagen-check", str(result.out_dir)]) == 0
    assert export_privacy_problem(result.out_dir) is None
    # put the typed text back into a record, and fix the checksum so that only privacy can fail
    doctored = tmp_path / "doctored"
    shutil.copytree(result.out_dir, doctored)
    split = "train.json" if json.loads((doctored / "train.json").read_text()) else "val.json"
    records = json.loads((doctored / split).read_text(encoding="utf-8"))
    records[0]["conversations"][0]["value"] += " " + TYPED
    (doctored / split).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    manifest = json.loads((doctored / "manifest.json").read_text(encoding="utf-8"))
    for entry in manifest["files"]:
        if entry["path"] == split:
            data = (doctored / split).read_bytes()
            entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (doctored / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert datagen_main(["datagen-check", str(doctored)]) == 1
    output = capsys.readouterr().out
    assert "structure:" not in output and "privacy:" in output
    # training refuses it although its manifest says the check passed when it was made
    problem = export_privacy_problem(doctored)
    assert problem is not None and "'doctored'" in problem and "edited since" in problem
    with pytest.raises(PrivacyCheckFailed, match="privacy check"):
        fine_tune(tmp_path / "no-checkpoint", doctored, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_chat_about_an_unlabelled_dicom_study_is_searched_for_that_studys_header_identifiers(tmp_path,
                                                                                                sample_data):
    studies = cxr_datastore(tmp_path, sample_data)
    shutil.copytree(sample_data / "dicom" / "ct_abdomen", studies / "ct_series")  # no final label
    add_chat(tmp_path / "chats", "named", "Is Abdomen Phantom worse than last time?", image="ct_series",
             modality="CT", answer="I cannot compare studies.")
    result = export_dataset(studies, tmp_path / "out", chats_dir=tmp_path / "chats", seed=0, progress=False)
    assert {s.source: s.reason for s in result.skips if s.kind == "record"} == {
        "named": SKIP_REASONS["identifier"]}
    assert "Phantom" not in export_text(result.out_dir) and result.privacy_passed


@pytest.fixture(scope="module")
def failed_export(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Path:
    """An export whose final scan fails: a site identifier that the export's own texts hold."""
    root = tmp_path_factory.mktemp("failed")
    studies = cxr_datastore(root, sample_data)
    result = export_dataset(studies, root / "failed", seed=0, progress=False, identifiers=["VILA-M3"])
    assert not result.privacy_passed
    return result.out_dir


def test_the_manifest_records_a_failed_check_and_training_refuses_that_export(failed_export, tmp_path, capsys):
    manifest = json.loads((failed_export / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["privacy"]["passed"] is False and manifest["privacy"]["findings"] > 0
    capsys.readouterr()
    code = vila_main(["train", "--base", str(tmp_path / "base"), "--data", str(failed_export),
                      "--out", str(tmp_path / "run"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2
    assert "export 'failed' failed" in error and "privacy check" in error and "datagen-check" in error
    assert not (tmp_path / "run").exists()


def test_training_refuses_exports_without_a_recorded_privacy_result(typed_export, tmp_path):
    root, result = typed_export
    old = tmp_path / "old"
    shutil.copytree(result.out_dir, old)
    manifest = json.loads((old / "manifest.json").read_text(encoding="utf-8"))
    del manifest["privacy"]
    (old / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert "records no result" in export_privacy_problem(old)
    (old / "manifest.json").unlink()
    assert "no readable manifest.json" in export_privacy_problem(old)


# --------------------------------------------------------------------------------------------- logs


def test_a_chat_turn_logs_no_prompt_or_answer_text(tmp_path, sample_data, caplog):
    registry = ExpertRegistry.from_config(available=lambda spec: None if spec.runner else "not run by this product")
    service = ExpertService(tmp_path / "models", registry=registry, idle_release_s=0)
    answer = "Mr. Smith's liver looks normal; MRN 12345678 has no tumor."
    loop = ChatLoop(ScriptedVLM([answer]), service, registry, ChatStore(tmp_path / "chats"))
    caplog.set_level(logging.DEBUG)
    try:
        result = loop.run_turn(TurnRequest("private", TYPED, {"image": str(sample_data / "studies" /
                                                                           "ct_abdomen.nii.gz")}))
    finally:
        service.close()
    assert result.answer == answer
    logged = "\n".join(f"{record.getMessage()} {record.args!r}" for record in caplog.records)
    assert fingerprint(TYPED) in logged and fingerprint(answer) in logged  # the turn was logged, as hashes
    for words in (TYPED, "John Q Smith", "Smith", "12345678", "effusion", answer):
        assert words not in logged, words


# --------------------------------------------------------------------------------- the train route


@pytest.mark.server
def test_the_train_route_refuses_a_named_export_that_failed_its_check_before_starting(tmp_path, sample_data,
                                                                                       failed_export):
    exports = tmp_path / "exports"
    shutil.copytree(failed_export, exports / "failed")
    models = tmp_path / "models"
    make_tiny_vila_checkpoint(ModelManifest.load()["vila_m3_8b"].location(models), template="llama_3",
                              image_size=14, num_shards=1)
    # a studies folder named by a date: the fresh export's manifest names it, so its final scan fails
    studies = cxr_datastore(tmp_path, sample_data).rename(tmp_path / "20240115")
    server = start_monailabel(tmp_path / "server", studies,
                              conf={"models": "vila_m3", "models_dir": str(models), "datagen_dir": str(exports)})
    try:
        response = requests.post(f"{server.url}/train/vila_m3", json={"export": "failed", "max_steps": 1}, timeout=30)
        assert response.status_code == 409, response.text
        detail = response.json()["detail"]
        assert "export 'failed' failed" in detail and "privacy check" in detail and str(exports) not in detail
        for name, fragment in (("missing", "does not exist"), ("../failed", "name of an export")):
            response = requests.post(f"{server.url}/train/vila_m3", json={"export": name}, timeout=30)
            assert response.status_code == 422 and fragment in response.json()["detail"], response.text
        assert server.get("/train/").status_code == 404  # no training task was ever started
        # a fresh export (no export named) that fails its check ends the background run untrained
        before = server.get("/vila_m3/versions/").json()
        response = requests.post(f"{server.url}/train/vila_m3", json={"max_steps": 1}, timeout=30)
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 300
        while (status := server.get("/train/").json()).get("status") not in ("DONE", "ERROR"):
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(1)
        assert status["status"] == "ERROR", status
        assert any("training refused" in line and "privacy check" in line for line in status["details"]), status
        assert server.get("/vila_m3/versions/").json() == before
    finally:
        server.stop()
