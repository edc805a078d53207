"""The data engine: exports of expert-training conversations from final labels and chats.

The datastore is a copy of the sample studies with their ground truths saved as the annotator's
final labels (``labels/final/<image file name>``; the chest X-ray's findings as
``labels/final/cxr_chest.json``). Answers are recomputed here from the labels, independently of the
engine. Questions are matched back to the phrasings of the pools (``phrasing_pattern``) to check that
they name what they ask about, use synonyms as configured, and come from the chosen side of the
held-out split.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from chat_doubles import ScriptedVLM
from PIL import Image, PngImagePlugin
from scipy import ndimage
from server_harness import start_monailabel

from vila_m3.chat.loop import ChatLoop, TurnRequest
from vila_m3.chat.store import ChatStore
from vila_m3.chat.transcript import Message, vlm_conversation
from vila_m3.data import check_structure, export_dataset, load_datagen_config, scan_export
from vila_m3.data.cli import main as datagen_main
from vila_m3.data.config import DatagenConfigError, parse_datagen_config
from vila_m3.data.conversations import ConversationBuilder
from vila_m3.data.privacy import dicom_identifiers, find_dicom_files, hashed_id
from vila_m3.data.questions import (
    HELDOUT,
    TRAIN,
    QuestionPoolError,
    QuestionPools,
    phrasing_side,
    split_phrasings,
)
from vila_m3.data.records import ImageWriter
from vila_m3.data.validate import load_schema, schema_errors
from vila_m3.experts.colors import overlay_colors_float
from vila_m3.experts.feedback import brats_feedback, classification_feedback, segmentation_feedback
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.service import ExpertService
from vila_m3.imaging import labelmap_like, read_labelmap, read_volume, write_labelmap
from vila_m3.imaging.overlay import render_overlay
from vila_m3.imaging.slices import render_label_slice, render_slice
from vila_m3.standins.stand_ins import stage_stand_ins

SEQUENCES = ("t1c", "t1", "t2", "flair")
CT_TRIGGER = "This looks like a CT image. Let me trigger <VISTA3D({group})>. "
BRATS_TRIGGER = "This looks like an MRI image sequence. Let me first trigger <BRATS()>."
CXR_TRIGGER = "This looks like an chest x-ray. Let me first trigger <CXR()>."
BRATS_PREFIX = "T1(contrast enhanced): <image>, T1: <image>, T2: <image>, FLAIR: <image> These are different MRI modalities.\n"
PATIENT_NAME = "Phantom^Abdomen"  # PatientName of the sample CT series
PATIENT_ID = "PHANTOM-CT-ABD"  # its PatientID


def make_datastore(root: Path, sample_data: Path, cxr: bool = True, ct: bool = True, brats: bool = True) -> Path:
    """A MONAI Label studies folder with the sample ground truths as final labels."""
    studies = root / "studies"
    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    if ct:
        shutil.copy(sample_data / "studies" / "ct_abdomen.nii.gz", studies)
        shutil.copy(sample_data / "ground_truth" / "ct_abdomen.nii.gz", final / "ct_abdomen.nii.gz")
    if brats:
        for sequence in SEQUENCES:
            shutil.copy(sample_data / "studies" / f"brain_mri_{sequence}.nii.gz", studies)
        shutil.copy(sample_data / "ground_truth" / "brain_mri.nii.gz", final / "brain_mri_t1c.nii.gz")
    if cxr:
        shutil.copy(sample_data / "studies" / "cxr_chest.png", studies)
        shutil.copy(sample_data / "ground_truth" / "cxr_chest.json", final / "cxr_chest.json")
    return studies


def load_split(folder: Path) -> tuple[list[dict], list[dict]]:
    return (json.loads((folder / "train.json").read_text(encoding="utf-8")),
            json.loads((folder / "val.json").read_text(encoding="utf-8")))


def images_of(record: dict) -> list[str]:
    return [record["image"]] if "image" in record else record.get("images", [])


def unique_records(folder: Path) -> list[tuple[dict, dict]]:
    """(record, its manifest provenance) once per record (repeats left out)."""
    train, val = load_split(folder)
    provenance = {entry["id"]: entry for entry in json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["records"]}
    return [(record, provenance[record["id"]]) for record in train + val if record["id"] in provenance]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def product_registry() -> ExpertRegistry:
    return ExpertRegistry.from_config(available=lambda spec: None if spec.runner else "not run by this product")


def all_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def question_of(record: dict) -> str:
    """The question of a record's first turn (the text after the last line break)."""
    return record["conversations"][0]["value"].rsplit("\n", 1)[1]


def phrasing_pattern(phrasing: str) -> re.Pattern:
    """A regex matching the phrasing with its placeholders filled (each placeholder is a named group)."""
    parts, names = [], []
    for literal, name, _, _ in string.Formatter().parse(phrasing):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(f"(?P={name})" if name in names else f"(?P<{name}>.+?)")
            names.append(name)
    return re.compile("".join(parts))


def matching_phrasings(pools: QuestionPools, task: str, kind: str, question: str) -> list[tuple[str, dict]]:
    """(phrasing, filled fields) of every phrasing of ``task`` / ``kind`` that gives ``question``."""
    found = []
    for phrasing in pools.phrasings(task, kind):
        match = phrasing_pattern(phrasing).fullmatch(question)
        if match:
            found.append((phrasing, match.groupdict()))
    return found


def config_with(**changes: dict) -> object:
    """configs/datagen.yaml with some sections updated (``section={key: value}``)."""
    raw = dict(load_datagen_config().raw)
    for section, values in changes.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    return parse_datagen_config(raw)


@pytest.fixture(scope="module")
def datastore(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Path:
    return make_datastore(tmp_path_factory.mktemp("datastore"), sample_data)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, datastore: Path) -> Path:
    out = tmp_path_factory.mktemp("exports") / "seed0"
    result = export_dataset(datastore, out, seed=0, progress=False)
    assert result.privacy_passed and not result.skips, (result.findings, result.skips)
    return out


# ------------------------------------------------------------------------------------- format


def test_the_export_validates_against_the_schema(export):
    schema = load_schema()
    jsonschema = pytest.importorskip("jsonschema")
    for records in load_split(export):
        jsonschema.Draft7Validator(schema).validate(records)
        assert schema_errors(records, schema) == []
    assert check_structure(export) == []
    # The built-in validator does reject what the schema forbids.
    broken = [{"id": "Phantom", "image": "x.png", "images": ["images/ab12cd34.png"] * 2,
               "conversations": [{"from": "doctor", "value": ""}]}]
    errors = schema_errors(broken, schema)
    assert any("$[0].id" in e for e in errors) and any("from" in e for e in errors)
    assert any("must not have" in e for e in errors) and any("fewer than 2" in e for e in errors)


def test_every_image_placeholder_has_its_image_and_every_file_exists(export):
    train, val = load_split(export)
    assert train and val
    for record in train + val:
        paths = images_of(record)
        text = "".join(turn["value"] for turn in record["conversations"])
        assert text.count("<image>") == len(paths) >= 1
        assert [t["from"] for t in record["conversations"]] == ["human", "gpt"] * (len(record["conversations"]) // 2)
        for path in paths:
            assert (export / path).is_file() and re.fullmatch(r"images/[0-9a-f]{16}\.png", path)
    listed = {entry["path"] for entry in json.loads((export / "manifest.json").read_text(encoding="utf-8"))["files"]}
    assert {f"images/{p.name}" for p in (export / "images").iterdir()} <= listed
    assert {"train.json", "val.json", "summary.txt", "summary.png"} <= listed


def test_conversations_follow_the_protocol_texts(export, sample_data):
    card = product_registry().model_card()
    by_category: dict[str, list[dict]] = {}
    for record, meta in unique_records(export):
        by_category.setdefault(meta["category"], []).append((record, meta))
    assert set(by_category) == {"vista3d", "brats", "cxr", "general"}
    for record, meta in by_category["vista3d"]:
        turns = [t["value"] for t in record["conversations"]]
        assert turns[0].startswith(card + " <image>This is a CT image.\n")
        question = turns[0][len(card + " <image>This is a CT image.\n"):]
        if meta["kind"] == "segment":
            assert len(turns) == 2 and len(images_of(record)) == 1
            assert re.fullmatch(rf"I segmented .+ using <VISTA3D\({meta['group']}\)>\.", turns[1])
            continue
        assert turns[1] == CT_TRIGGER.format(group=meta["group"])
        assert turns[2].startswith("The results are <image>. The colors in this image describe ")
        assert turns[2].endswith("Use this result to respond to this prompt:\n" + question)
    for record, meta in by_category["brats"]:
        turns = [t["value"] for t in record["conversations"]]
        assert turns[0].startswith(card + BRATS_PREFIX)
        if meta["kind"] != "segment":
            assert turns[1] == BRATS_TRIGGER and len(images_of(record)) == 5
    findings = json.loads((sample_data / "ground_truth" / "cxr_chest.json").read_text(encoding="utf-8"))["findings"]
    for record, _ in by_category["cxr"]:
        turns = [t["value"] for t in record["conversations"]]
        question = turns[0].split("This is a CXR image.\n", 1)[1]
        assert turns[1] == CXR_TRIGGER
        assert turns[2] == classification_feedback(findings, question)
    segment = [record for record, meta in by_category["vista3d"] if meta["group"] == "everything"
               and meta["kind"] == "segment"]
    assert segment[0]["conversations"][1]["value"] == "I segmented the entire image using <VISTA3D(everything)>."


def test_vista3d_answers_agree_with_the_final_label(export, sample_data):
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    labels = read_labelmap(sample_data / "ground_truth" / "ct_abdomen.nii.gz")
    tumours = ndimage.label(labels.array == 26)[1]
    spec = product_registry().get("VISTA3D")
    pools = QuestionPools.load()
    synonyms = load_datagen_config().vista3d["synonyms"]
    canonical = {name: name for name in spec.ids_by_name}
    canonical.update({other: name for name, others in synonyms.items() for other in others})
    checked = {"presence": 0, "count": 0, "visible": 0}
    answers = set()
    for record, meta in unique_records(export):
        if meta["category"] != "vista3d":
            continue
        axis, index = meta["axis"], meta["slice"]
        slice_png, *rest = images_of(record)
        assert np.array_equal(pixels(export / slice_png), np.asarray(render_slice(ct, axis, index, "CT")))
        if meta["kind"] == "segment":
            continue
        group = spec.resolve_argument(meta["group"]).labels
        ids = [i for i in group.values() if (labels.array == i).any()]
        restricted = labelmap_like(ct, np.where(np.isin(labels.array, ids), labels.array, 0))
        overlay, drawn = render_overlay(ct, restricted, axis, index, overlay_colors_float(), "CT")
        assert np.array_equal(pixels(export / rest[0]), np.asarray(overlay))
        on_slice = set(np.unique(render_label_slice(labels, axis, index))) & set(ids)
        question = record["conversations"][0]["value"].rsplit("\n", 1)[1]
        names = {label_id: name for name, label_id in group.items()}
        assert record["conversations"][2]["value"] == segmentation_feedback(sorted(on_slice), names, question)
        answer = record["conversations"][3]["value"]
        if meta["kind"] == "presence":
            said = {fields["structure"] for _, fields in matching_phrasings(pools, "vista3d", "presence", question)}
            assert len(said) == 1, (question, said)
            asked = canonical[said.pop()]
            assert answer == ("yes" if group[asked] in on_slice else "no")
            answers.add((meta["group"], answer))
        elif meta["kind"] == "count":
            assert meta["group"] == "hepatic tumor"
            assert answer == f"There are {tumours} hepatic tumors." and tumours >= 2  # canonical, never a synonym
        else:
            shown = [names[i] for i in sorted(on_slice)]
            if len(shown) > 1:
                assert answer == f"The image shows {', '.join(shown[:-1])} and {shown[-1]}."
            elif shown:
                assert answer == f"The image shows {shown[0]}."
            else:
                assert answer == "None of the segmented structures is visible in this image."
        checked[meta["kind"]] += 1
    assert all(checked.values()), checked
    # Slices through and away from the tumour: both answers occur for the hepatic tumor group.
    assert {("hepatic tumor", "yes"), ("hepatic tumor", "no")} <= answers


def test_brats_and_cxr_answers_agree_with_the_final_labels(export, sample_data):
    labels = read_labelmap(sample_data / "ground_truth" / "brain_mri.nii.gz")
    t1c = read_volume(sample_data / "studies" / "brain_mri_t1c.nii.gz")
    findings = json.loads((sample_data / "ground_truth" / "cxr_chest.json").read_text(encoding="utf-8"))["findings"]
    regions = {"presence": {1, 2, 4}, "core": {1, 4}, "enhancing": {4}, "edema": {2}}
    seen = set()
    for record, meta in unique_records(export):
        turns = [t["value"] for t in record["conversations"]]
        if meta["category"] == "brats" and meta["kind"] in regions:
            on_slice = set(np.unique(render_label_slice(labels, meta["axis"], meta["slice"]))) - {0}
            expected = "yes" if on_slice & regions[meta["kind"]] else "no"
            assert turns[3] == expected
            question = turns[0].rsplit("\n", 1)[1]
            assert turns[2] == brats_feedback(sorted(on_slice), question)
            overlay, _ = render_overlay(t1c, labels, meta["axis"], meta["slice"], overlay_colors_float(), "MRI")
            assert np.array_equal(pixels(export / images_of(record)[4]), np.asarray(overlay))
            seen.add(("brats", expected))
        if meta["category"] == "cxr" and meta["kind"] == "finding":
            asked = next(name for name in findings if name.lower() in turns[0].lower().rsplit("\n", 1)[1])
            assert turns[3] == ("yes" if findings[asked] else "no")
            seen.add(("cxr", turns[3]))
    assert seen == {("brats", "yes"), ("brats", "no"), ("cxr", "yes"), ("cxr", "no")}


# -------------------------------------------------------------------------- reproducibility, split


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_draws(export, datastore, tmp_path, capsys):
    capsys.readouterr()
    again = export_dataset(datastore, tmp_path / "again", seed=0, progress=True).out_dir
    assert all_files(again) == all_files(export)  # showing the progress changes nothing
    # off a terminal (captured stderr), the progress is plain lines with the time
    shown = capsys.readouterr().err.splitlines()
    assert shown[0] == "Writing conversations about the labelled studies (data engine): 3 volumes to go"
    assert re.fullmatch(r"Writing conversations about the labelled studies \(data engine\): 1/3 volumes, \d+ s "
                        r"elapsed, ~\d+ s left", shown[1])
    assert re.fullmatch(r".*: 3/3 volumes, \d+ s elapsed, done", shown[-1])
    other = export_dataset(datastore, tmp_path / "other", seed=1, progress=False).out_dir

    def questions(folder: Path) -> list[str]:
        return sorted(r["conversations"][0]["value"].rsplit("\n", 1)[1] for r, _ in unique_records(folder))

    assert questions(other) != questions(export)
    assert json.loads((other / "manifest.json").read_text(encoding="utf-8"))["seed"] == 1


def test_the_split_never_shares_a_volume_and_train_repeats_follow_the_multipliers(export):
    manifest = json.loads((export / "manifest.json").read_text(encoding="utf-8"))
    split_of_unit: dict[str, set[str]] = {}
    for entry in manifest["records"]:
        split_of_unit.setdefault(entry["unit"], set()).add(entry["split"])
    assert len(split_of_unit) == 3 and all(len(splits) == 1 for splits in split_of_unit.values())
    train, val = load_split(export)
    assert val and {r["id"] for r in train}.isdisjoint({r["id"] for r in val})
    assert {p for r in train for p in images_of(r)}.isdisjoint({p for r in val for p in images_of(r)})
    multipliers = load_datagen_config().multipliers
    for entry in manifest["records"]:
        expected = multipliers[entry["category"]] if entry["split"] == "train" else 1
        copies = [r for r in (train if entry["split"] == "train" else val) if r["id"].split(".")[0] == entry["id"]]
        assert entry["repeats"] == expected == len(copies)
        assert len({json.dumps(r["conversations"]) for r in copies}) == 1
    summary = (export / "summary.txt").read_text(encoding="utf-8")
    assert re.search(r"records by expert", summary) and re.search(r"\n  vista3d\s+\d+", summary)
    assert (export / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ privacy


def test_the_privacy_check_passes_on_the_export_and_fails_on_planted_identifiers(export, tmp_path, sample_data,
                                                                                 capsys):
    assert datagen_main(["datagen-check", str(export)]) == 0
    dicom = str(sample_data / "dicom" / "ct_abdomen")
    # A value from the DICOM headers that matches no generic pattern is found once the headers are read.
    planted = tmp_path / "planted-id"
    shutil.copytree(export, planted)
    train = json.loads((planted / "train.json").read_text(encoding="utf-8"))
    train[0]["conversations"][-1]["value"] += f" (patient {PATIENT_ID})"
    (planted / "train.json").write_text(json.dumps(train))
    assert datagen_main(["datagen-check", str(planted), "--privacy-only"]) == 0
    assert datagen_main(["datagen-check", str(planted), "--privacy-only", "--dicom", dicom]) == 1
    assert PATIENT_ID in capsys.readouterr().out
    assert datagen_main(["datagen-check", str(planted)]) == 1  # the checksum no longer matches either
    assert "sha256 differs" in capsys.readouterr().out
    # The patient's name in a file name, a JSON value, or a PNG text chunk.
    for where in ("file name", "json", "png chunk"):
        copy = tmp_path / where.replace(" ", "-")
        shutil.copytree(export, copy)
        if where == "file name":
            (copy / "images" / f"{PATIENT_NAME}.png").write_bytes((next((copy / "images").iterdir())).read_bytes())
        elif where == "json":
            manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
            manifest["note"] = {"PatientName": PATIENT_NAME}
            (copy / "manifest.json").write_text(json.dumps(manifest))
        else:
            target = next((copy / "images").iterdir())
            info = PngImagePlugin.PngInfo()
            info.add_text("Comment", f"scan of {PATIENT_NAME.replace('^', ' ')}")
            Image.open(target).save(target, pnginfo=info)
        assert datagen_main(["datagen-check", str(copy), "--privacy-only", "--dicom", dicom]) == 1, where
        output = capsys.readouterr().out
        assert "Phantom" in output and "privacy:" in output, where


def test_a_dicom_series_is_split_by_hashed_patient_and_its_identifiers_never_reach_the_export(
        tmp_path, sample_data):
    studies = make_datastore(tmp_path, sample_data, ct=False, brats=False)
    shutil.copytree(sample_data / "dicom" / "ct_abdomen", studies / "ct_series")
    shutil.copy(sample_data / "ground_truth" / "ct_abdomen.nii.gz", studies / "labels" / "final" / "ct_series.nii.gz")
    # A chat whose question names the patient: its record must be left out.
    store = ChatStore(tmp_path / "chats")
    chat = store.load("named")
    store.save_image("named", "turn001_slice0.png", Image.new("RGB", (8, 8)))
    chat.study = {"image": "ct_series"}
    chat.messages = [Message("user", f"<image>This is a CT image.\nIs {PATIENT_NAME} sick?", ["turn001_slice0.png"],
                             question=f"Is {PATIENT_NAME} sick?"), Message("assistant", "I cannot tell.")]
    store.save(chat)
    result = export_dataset(studies, tmp_path / "out", chats_dir=tmp_path / "chats", seed=3, progress=False)
    assert result.privacy_passed
    assert [s.reason for s in result.skips if s.source == "named"] == [
        "left out: free text held a value from the study's DICOM headers"]
    manifest = json.loads((result.out_dir / "manifest.json").read_text(encoding="utf-8"))
    units = {entry["unit"] for entry in manifest["records"] if entry["category"] == "vista3d"}
    assert units == {hashed_id(3, "unit", f"patient:{PATIENT_ID}")}
    identifiers = dicom_identifiers(find_dicom_files(studies / "ct_series"))
    assert {PATIENT_NAME, PATIENT_ID, "20240115"} <= identifiers
    assert scan_export(result.out_dir, identifiers) == []
    blob = b"".join(all_files(result.out_dir).values()).lower()
    assert b"phantom" not in blob and b"ct_series" not in blob
    # datagen-check reads the identifiers from the manifest's source folder by itself.
    assert datagen_main(["datagen-check", str(result.out_dir)]) == 0


# ---------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_skipped_with_reasons_and_the_export_completes(tmp_path, sample_data):
    studies = make_datastore(tmp_path, sample_data, ct=False, brats=False)
    final = studies / "labels" / "final"
    shutil.copy(sample_data / "ground_truth" / "ct_abdomen.nii.gz", final / "ghost.nii.gz")
    shutil.copy(sample_data / "studies" / "ct_abdomen.nii.gz", studies / "shifted.nii.gz")
    truth = read_labelmap(sample_data / "ground_truth" / "ct_abdomen.nii.gz")
    write_labelmap(truth.array[:-4], type(truth.geometry)(truth.geometry.spacing, truth.geometry.origin,
                                                          truth.geometry.direction, truth.geometry.shape[:2] + (60,)),
                   final / "shifted.nii.gz")
    (studies / "broken.nii.gz").write_bytes(b"not a volume at all")
    shutil.copy(sample_data / "ground_truth" / "ct_abdomen.nii.gz", final / "broken.nii.gz")
    shutil.copy(sample_data / "studies" / "brain_mri_t2.nii.gz", studies / "lonely_t2.nii.gz")
    shutil.copy(sample_data / "ground_truth" / "brain_mri.nii.gz", final / "lonely_t2.nii.gz")
    result = export_dataset(studies, tmp_path / "out", seed=0, progress=False)
    reasons = {skip.source: skip.reason for skip in result.skips}
    assert reasons["ghost.nii.gz"] == "label without its image"
    assert reasons["shifted.nii.gz"].startswith("label geometry does not match its image")
    assert reasons["broken.nii.gz"].startswith("unreadable image") and str(studies) not in reasons["broken.nii.gz"]
    assert "four sequences" in reasons["lonely_t2.nii.gz"]
    summary = (result.out_dir / "summary.txt").read_text(encoding="utf-8")
    assert "skipped: 4" in summary and "label without its image" in summary and "ghost" not in summary
    per_case = load_datagen_config().general["per_case"]
    assert result.manifest["counts"]["records"] == 5 + per_case  # the chest X-ray's records are still there
    assert check_structure(result.out_dir) == []


def test_a_study_stored_twice_is_exported_once(tmp_path, sample_data):
    studies = make_datastore(tmp_path, sample_data, ct=False, brats=False)
    shutil.copy(studies / "cxr_chest.png", studies / "cxr_copy.png")
    shutil.copy(studies / "labels" / "final" / "cxr_chest.json", studies / "labels" / "final" / "cxr_copy.json")
    result = export_dataset(studies, tmp_path / "out", seed=0, progress=False)
    per_case = load_datagen_config().general["per_case"]
    assert result.manifest["counts"]["records"] == 5 + per_case
    assert result.summary["notes"]["duplicates_removed"] == 5 + per_case
    assert len({entry["unit"] for entry in result.manifest["records"]}) == 1


# -------------------------------------------------------------------------------------------- chats


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory: pytest.TempPathFactory, sample_data: Path):
    """A chat about the CT (one expert turn, one plain turn) made by the real chat loop with stand-in
    VISTA3D weights, in a datastore where the CT has no final label yet."""
    root = tmp_path_factory.mktemp("chat")
    studies = make_datastore(root, sample_data, cxr=False, brats=False)
    (studies / "labels" / "final" / "ct_abdomen.nii.gz").unlink()
    stage_stand_ins(root / "models", ("vista3d",))
    registry = product_registry()
    service = ExpertService(root / "models", registry=registry, idle_release_s=0)
    answers = ["This looks like a CT image. Let me trigger <VISTA3D(hepatic tumor)>.", "Yes, one is visible.",
               "The spleen looks normal."]
    loop = ChatLoop(ScriptedVLM(answers), service, registry, ChatStore(root / "chats"))
    ct = str(studies / "ct_abdomen.nii.gz")
    loop.run_turn(TurnRequest("ct-chat", "Is there a liver tumor?", {"image": ct}, slice_index=44,
                              study={"image": "ct_abdomen"}))
    loop.run_turn(TurnRequest("ct-chat", "And the spleen?", {"image": ct}, slice_index=30,
                              study={"image": "ct_abdomen"}))
    service.close()
    return root, studies


def test_a_chat_becomes_one_multi_turn_record_as_the_model_saw_it(chat_setup, tmp_path):
    root, studies = chat_setup
    result = export_dataset(studies, tmp_path / "out", chats_dir=root / "chats", seed=0, progress=False)
    records = unique_records(result.out_dir)
    assert [meta["category"] for _, meta in records] == ["chat"]
    record, meta = records[0]
    chat = ChatStore(root / "chats").load("ct-chat")
    turns, names = vlm_conversation(chat.messages)
    assert [(t["from"], t["value"]) for t in record["conversations"]] == [
        ({"user": "human", "assistant": "gpt"}[role], text) for role, text in turns]
    assert [t["from"] for t in record["conversations"]] == ["human", "gpt"] * 3
    assert len(images_of(record)) == len(names) == 3
    for path, name in zip(images_of(record), names, strict=True):
        assert np.array_equal(pixels(result.out_dir / path), pixels(root / "chats" / "ct-chat" / name))
    assert meta["answer"] == "as recorded" and meta["group"] == "VISTA3D(hepatic tumor)"


def test_a_final_label_saved_after_the_chat_replaces_the_experts_result(chat_setup, tmp_path, sample_data):
    root, studies = chat_setup
    final = studies / "labels" / "final" / "ct_abdomen.nii.gz"
    shutil.copy(sample_data / "ground_truth" / "ct_abdomen.nii.gz", final)
    try:
        result = export_dataset(studies, tmp_path / "out", chats_dir=root / "chats", seed=0, progress=False)
        chat_records = [r for r, meta in unique_records(result.out_dir) if meta["category"] == "chat"]
        assert len(chat_records) == 1 and result.summary["notes"]["chat_expert_turns_corrected"] == 1
        record = chat_records[0]
        ct = read_volume(studies / "ct_abdomen.nii.gz")
        truth = read_labelmap(final)
        restricted = labelmap_like(ct, np.where(np.isin(truth.array, [1, 26]), truth.array, 0))
        overlay, drawn = render_overlay(ct, restricted, "axial", 44, overlay_colors_float(), "CT")
        expected = segmentation_feedback([i for i, _ in drawn], {1: "liver", 26: "hepatic tumor"},
                                         "Is there a liver tumor?")
        assert expected == ("The results are <image>. The colors in this image describe red: liver, blue: hepatic "
                            "tumor. Use this result to respond to this prompt:\nIs there a liver tumor?")
        assert record["conversations"][2]["value"] == expected
        corrected = pixels(result.out_dir / images_of(record)[1])
        assert np.array_equal(corrected, np.asarray(overlay))
        assert not np.array_equal(corrected, pixels(root / "chats" / "ct-chat" / "expert001_vista3d.png"))
        # The CT's own records come from the same final label and share the chat's split unit.
        manifest = json.loads((result.out_dir / "manifest.json").read_text(encoding="utf-8"))
        assert len({entry["unit"] for entry in manifest["records"]}) == 1
        assert {entry["category"] for entry in manifest["records"]} == {"chat", "vista3d", "general"}

        # A final label older than the chat's expert result is not a correction of it.
        chat_labels = root / "chats" / "ct-chat" / ChatStore(root / "chats").load("ct-chat").labels
        old = chat_labels.stat().st_mtime - 60
        os.utime(final, (old, old))
        again = export_dataset(studies, tmp_path / "again", chats_dir=root / "chats", seed=0, progress=False)
        metas = [meta for _, meta in unique_records(again.out_dir) if meta["category"] == "chat"]
        assert [meta["answer"] for meta in metas] == ["as recorded"]
    finally:
        final.unlink()


# ------------------------------------------------------ questions: subjects, synonyms, no expert, held out


def expected_owners(spec, config) -> dict[str, str]:
    """Which group presence questions about a structure belong to: its focus group, else the first group
    in argument order holding it, ``everything`` last (computed here from the spec, not the engine)."""
    focus = config.vista3d["focus"]
    owners = {structure: group for group, structure in focus.items()}
    for group in [*(g for g in spec.args if g != spec.default_arg), spec.default_arg]:
        for name in spec.groups[group]:
            owners.setdefault(name, group)
    return owners


def test_every_vista3d_question_names_what_it_asks_about_so_the_argument_follows(export):
    config = load_datagen_config()
    spec = product_registry().get("VISTA3D")
    pools = QuestionPools.load()
    subjects = {group: config.vista3d["subjects"].get(group, config.vista3d["default_subject"].format(group=group))
                for group in spec.args}
    assert len(set(subjects.values())) == len(spec.args) == 10  # one subject per argument, no two alike
    assert all("{subject}" in phrasing for phrasing in pools.phrasings("vista3d", "visible"))
    synonyms = config.vista3d["synonyms"]
    canonical = {name: name for name in spec.ids_by_name}
    canonical.update({other: name for name, others in synonyms.items() for other in others})
    owners = expected_owners(spec, config)
    routed: dict[tuple[str, str], set[str]] = {}
    kinds = set()
    for record, meta in unique_records(export):
        if meta["category"] != "vista3d" or meta["kind"] == "segment":
            continue
        question = question_of(record)
        filled = matching_phrasings(pools, "vista3d", meta["kind"], question)
        assert filled, question
        if meta["kind"] == "visible":
            assert {fields["subject"] for _, fields in filled} == {subjects[meta["group"]]}, question
            key = subjects[meta["group"]]
        else:
            field = "structure" if meta["kind"] == "presence" else "structures"
            said = {fields.get(field) for _, fields in filled} - {None}
            assert len(said) == 1, question
            name = said.pop()
            key = canonical[name] if meta["kind"] == "presence" else canonical[name[:-1]]
            assert owners[key] == meta["group"], (question, meta["group"])
        routed.setdefault((meta["kind"], key), set()).add(meta["group"])
        kinds.add(meta["kind"])
    assert kinds == {"presence", "visible", "count"}
    # The same question (up to phrasing and synonym) never asks for two different arguments.
    assert all(len(groups) == 1 for groups in routed.values()), routed
    assert len({group for groups in routed.values() for group in groups}) >= 3


def test_synonyms_name_structures_in_questions_while_triggers_and_answers_stay_canonical(tmp_path, sample_data):
    studies = make_datastore(tmp_path, sample_data, cxr=False, brats=False)
    config = config_with(vista3d={"synonym_fraction": 1.0}, slices={"axes": ["axial", "sagittal"]})
    result = export_dataset(studies, tmp_path / "out", seed=0, config=config, progress=False)
    synonyms = config.vista3d["synonyms"]
    pools = QuestionPools.load()
    seen = set()
    for record, meta in unique_records(result.out_dir):
        turns = [turn["value"] for turn in record["conversations"]]
        question = question_of(record)
        if meta["category"] == "general" and meta["kind"] == "plane":
            assert turns[1] == f"This is {'an' if meta['axis'] == 'axial' else 'a'} {meta['axis']} slice."
            seen.add(("plane", meta["axis"]))
        if meta["category"] != "vista3d" or meta["group"] != "hepatic tumor":
            continue
        if meta["kind"] == "segment":
            targets = {f["target"] for _, f in matching_phrasings(pools, "vista3d", "segment", question)}
            assert targets & {f"the {name}" for name in synonyms["hepatic tumor"]}, question
            assert turns[1] == "I segmented the hepatic tumor using <VISTA3D(hepatic tumor)>."
            seen.add("segment")
            continue
        assert turns[1] == CT_TRIGGER.format(group="hepatic tumor")
        if meta["kind"] == "presence":
            said = {f["structure"] for _, f in matching_phrasings(pools, "vista3d", "presence", question)}
            assert len(said) == 1 and said <= set(synonyms["hepatic tumor"]), question
            assert turns[3] in ("yes", "no")
            seen.add("presence")
        elif meta["kind"] == "count":
            said = {f["structures"] for _, f in matching_phrasings(pools, "vista3d", "count", question)}
            assert len(said) == 1 and said <= {f"{name}s" for name in synonyms["hepatic tumor"]}, question
            assert re.fullmatch(r"There are \d+ hepatic tumors\.", turns[3])
            seen.add("count")
    assert seen == {"segment", "presence", "count", ("plane", "axial"), ("plane", "sagittal")}


def test_synonyms_are_drawn_with_their_fraction_and_clashes_are_refused(tmp_path):
    pools, registry = QuestionPools.load(), product_registry()
    builder = ConversationBuilder(load_datagen_config(), pools, registry, ImageWriter(tmp_path))
    names = ["hepatic tumor", *builder.synonyms["hepatic tumor"]]
    assert {"liver tumour", "liver tumor", "hepatic tumour", "liver lesion", "hepatoma"} <= set(names)
    for structure in ("pancreatic tumor", "lung tumor", "bone lesion", "left kidney", "right kidney", "liver",
                      "spleen"):
        assert builder.synonyms[structure], structure
    rng = np.random.default_rng(5)
    draws = [builder.spoken("hepatic tumor", rng) for _ in range(3000)]
    assert 0.45 < sum(d != "hepatic tumor" for d in draws) / len(draws) < 0.55
    assert set(draws) == set(names)
    again = np.random.default_rng(5)
    assert [builder.spoken("hepatic tumor", again) for _ in range(3000)] == draws
    assert builder.spoken("gallbladder", rng) == "gallbladder"  # no synonyms configured
    assert builder.plural("liver tumour") == "liver tumours" and builder.plural("hepatoma") == "hepatomas"
    never = ConversationBuilder(config_with(vista3d={"synonym_fraction": 0.0}), pools, registry, ImageWriter(tmp_path))
    assert {never.spoken("hepatic tumor", rng) for _ in range(200)} == {"hepatic tumor"}
    with pytest.raises(DatagenConfigError, match="spleen"):
        ConversationBuilder(config_with(vista3d={"synonyms": {"spleen": ["liver"]}}), pools, registry,
                            ImageWriter(tmp_path))
    with pytest.raises(DatagenConfigError, match="more than one structure"):
        config_with(vista3d={"synonyms": {"spleen": ["lien"], "liver": ["lien"]}})
    with pytest.raises(DatagenConfigError, match="synonym_fraction"):
        config_with(vista3d={"synonym_fraction": 1.5})


def test_questions_that_need_no_expert_are_one_exchange_without_a_trigger(export, sample_data):
    config = load_datagen_config()
    card = product_registry().model_card()
    pools = QuestionPools.load()
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    t1c = read_volume(sample_data / "studies" / "brain_mri_t1c.nii.gz")
    per_case = config.general["per_case"]
    answers = config.general["answers"]
    counts: dict[tuple[str, str], int] = {}
    cxr_images = {images_of(r)[0] for r, meta in unique_records(export) if meta["category"] == "cxr"}
    for record, meta in unique_records(export):
        if meta["category"] != "general":
            continue
        modality, kind = meta["group"], meta["kind"]
        turns = [(turn["from"], turn["value"]) for turn in record["conversations"]]
        question = question_of(record)
        assert len(turns) == 2 and len(images_of(record)) == 1
        assert turns[0] == ("human", card + f" <image>This is a {modality} image.\n" + question)
        assert question in pools.phrasings("general", kind)
        expected = answers["modality"][modality] if kind == "modality" else answers["plane"][meta["axis"]]
        assert turns[1] == ("gpt", expected) and "<" not in expected and "trigger" not in expected
        picture = pixels(export / images_of(record)[0])
        if modality == "CXR":
            assert kind == "modality" and images_of(record)[0] in cxr_images
        else:
            volume = ct if modality == "CT" else t1c  # the BRATS study shows its T1c slice alone
            assert np.array_equal(picture, np.asarray(render_slice(volume, meta["axis"], meta["slice"], modality)))
        counts[(modality, kind)] = counts.get((modality, kind), 0) + 1
    axes = len(config.axes)
    assert counts == {("CT", "modality"): per_case * axes, ("CT", "plane"): per_case * axes,
                      ("MRI", "modality"): per_case * axes, ("MRI", "plane"): per_case * axes,
                      ("CXR", "modality"): per_case}
    # No phrasing names a structure, a tumour or a finding: those need an expert.
    findings = json.loads((sample_data / "ground_truth" / "cxr_chest.json").read_text(encoding="utf-8"))["findings"]
    names = {*product_registry().get("VISTA3D").ids_by_name, *product_registry().get("BRATS").ids_by_name,
             *(name.lower().replace("_", " ") for name in findings), "tumor", "tumour", "lesion", "mass", "finding"}
    for kind in ("modality", "plane"):
        for phrasing in pools.phrasings("general", kind):
            assert not [n for n in names if re.search(rf"\b{re.escape(n)}s?\b", phrasing.lower())], phrasing
    with pytest.raises(DatagenConfigError, match="general.answers.plane"):
        config_with(general={"answers": {"modality": answers["modality"]}})


def test_each_kinds_phrasings_are_split_into_train_and_held_out_by_their_text(tmp_path):
    pools = QuestionPools.load()
    train, heldout = pools.restricted("train"), pools.restricted("heldout", 0.25)
    assert pools.restricted("all") is pools and (train.use, heldout.use) == (TRAIN, HELDOUT)
    assert len({pools.sha256, train.sha256, heldout.sha256}) == 3
    assignment = pools.assignment(0.25)
    for task, kinds in pools.pools.items():
        for kind, phrasings in kinds.items():
            sides = assignment[task][kind]
            assert set(train.phrasings(task, kind)) == {p for p in phrasings if sides[p] == TRAIN}
            assert set(heldout.phrasings(task, kind)) == {p for p in phrasings if sides[p] == HELDOUT}
            assert set(train.phrasings(task, kind)) | set(heldout.phrasings(task, kind)) == set(phrasings)
            assert not set(train.phrasings(task, kind)) & set(heldout.phrasings(task, kind))
    held = sum(len(p) for kinds in heldout.pools.values() for p in kinds.values())
    total = sum(len(p) for kinds in pools.pools.values() for p in kinds.values())
    assert 0.15 < held / total < 0.35
    rng = np.random.default_rng(0)
    assert {heldout.draw("cxr", "findings", rng) for _ in range(1000)} == set(heldout.phrasings("cxr", "findings"))
    # By text alone: another file's phrasings never move the existing ones.
    folder = tmp_path / "questions"
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs" / "questions", folder)
    extra = [f"Site question {i} about {{finding}}?" for i in range(12)]
    (folder / "zz_site.yaml").write_text("task: cxr\nkinds:\n  finding:\n" + "".join(f'    - "{q}"\n' for q in extra))
    extended = QuestionPools.load(folder).assignment(0.25)["cxr"]["finding"]
    assert all(extended[p] == side for p, side in assignment["cxr"]["finding"].items())
    assert all(extended[q] == phrasing_side(q, 0.25) for q in extra)
    # At least one on each side; a kind's only phrasing is trained on.
    tiny, huge = split_phrasings(["a?", "b?", "c?"], 1e-12), split_phrasings(["a?", "b?", "c?"], 1 - 1e-12)
    assert sorted(tiny.values()) == [HELDOUT, TRAIN, TRAIN] and sorted(huge.values()) == [HELDOUT, HELDOUT, TRAIN]
    assert split_phrasings(["only?"], 1 - 1e-12) == {"only?": TRAIN}
    with pytest.raises(QuestionPoolError, match="already restricted"):
        train.restricted("heldout")
    with pytest.raises(QuestionPoolError, match="phrasings must be one of"):
        pools.restricted("test")
    for bad in ({"heldout_fraction": 0}, {"heldout_fraction": 1}, {"use": "test"}):
        with pytest.raises(DatagenConfigError, match="questions"):
            config_with(questions=bad)


def test_train_and_heldout_exports_draw_only_their_side_of_the_phrasings(datastore, tmp_path, monkeypatch, capsys):
    all_pools = QuestionPools.load()
    fraction = load_datagen_config().heldout_fraction
    assert datagen_main(["datagen", "--datastore", str(datastore), "--out", str(tmp_path / "train"),
                         "--phrasings", "train", "--no-progress"]) == 0
    # questions.use from a datagen config file given with --config (relative to the working directory)
    raw = load_datagen_config().raw
    custom = {**raw, "questions": {**raw["questions"], "use": "heldout"}}
    (tmp_path / "custom.yaml").write_text(json.dumps(custom), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert datagen_main(["datagen", "--datastore", str(datastore), "--out", "heldout", "--config", "custom.yaml",
                         "--no-progress"]) == 0
    used: dict[str, set[str]] = {}
    for side in (TRAIN, HELDOUT):
        folder = tmp_path / side
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["phrasings"]["use"] == side and manifest["phrasings"]["heldout_fraction"] == fraction
        assert manifest["questions_sha256"] == all_pools.sha256
        assert check_structure(folder) == []
        pools = all_pools.restricted(side, fraction)
        assert manifest["phrasings"]["questions_sha256"] == pools.sha256
        for record, meta in unique_records(folder):
            question = question_of(record)
            assert matching_phrasings(pools, meta["category"], meta["kind"], question), (side, question)
            only = matching_phrasings(all_pools, meta["category"], meta["kind"], question)
            if len(only) == 1:
                used.setdefault(side, set()).add(only[0][0])
    assert used[TRAIN] and used[HELDOUT] and not used[TRAIN] & used[HELDOUT]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        datagen_main(["datagen", "--datastore", str(datastore), "--out", "x", "--phrasings", "test"])
    assert "invalid choice" in capsys.readouterr().err


# --------------------------------------------------------------------------- question pools, server


def test_question_pools_have_many_phrasings_and_a_site_can_add_its_own(tmp_path):
    pools = QuestionPools.load()
    expected = {"vista3d": ("presence", "count", "visible", "segment"),
                "brats": ("presence", "core", "enhancing", "edema", "visible", "segment"),
                "cxr": ("finding", "findings"), "general": ("modality", "plane")}
    for task, kinds in expected.items():
        for kind in kinds:
            assert len(pools.phrasings(task, kind)) >= (15 if task == "general" else 10), (task, kind)
    folder = tmp_path / "questions"
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs" / "questions", folder)
    (folder / "zz_site.yaml").write_text('task: cxr\nkinds:\n  finding:\n    - "Our own {finding} question?"\n')
    extended = QuestionPools.load(folder)
    assert extended.phrasings("cxr", "finding")[-1] == "Our own {finding} question?"
    assert extended.sha256 != pools.sha256
    (folder / "zz_bad.yaml").write_text('task: cxr\nkinds:\n  finding:\n    - "Is there {0}?"\n')
    with pytest.raises(QuestionPoolError, match="zz_bad.yaml"):
        QuestionPools.load(folder)


def test_the_data_engine_does_not_import_monai_label():
    code = "import sys, vila_m3.data, vila_m3.data.cli; print(any(m.startswith('monailabel') for m in sys.modules))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", check=True).stdout
    assert output.strip() == "False"


@pytest.mark.server
def test_a_running_servers_datastore_gives_the_same_records_as_its_folder(tmp_path, sample_data, export):
    studies = make_datastore(tmp_path, sample_data)
    server = start_monailabel(tmp_path / "server", studies)
    try:
        # The chest X-ray's findings reach the server the way a client saves them.
        (studies / "labels" / "final" / "cxr_chest.json").unlink()
        with open(sample_data / "ground_truth" / "cxr_chest.json", "rb") as findings:
            response = requests.put(f"{server.url}/datastore/label", params={"image": "cxr_chest", "tag": "final"},
                                    files={"label": ("cxr_chest.json", findings)}, timeout=60)
        assert response.status_code == 200, response.text
        assert datagen_main(["datagen", "--datastore", server.url, "--out", str(tmp_path / "http"), "--seed", "0",
                             "--no-progress"]) == 0
    finally:
        server.stop()
    assert (studies / "datastore_v2.json").is_file()  # the folder now has the server's datastore model
    export_dataset(studies, tmp_path / "folder", seed=0, progress=False)
    remote, folder, fixture = all_files(tmp_path / "http"), all_files(tmp_path / "folder"), all_files(export)
    assert set(remote) == set(folder) == set(fixture)
    for name in remote:
        if name != "manifest.json":
            assert remote[name] == folder[name] == fixture[name], name
    assert json.loads(remote["manifest.json"])["source"] == server.url
