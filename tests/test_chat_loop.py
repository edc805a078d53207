"""The chat loop with the real experts (stand-in weights), the real imaging and a scripted VLM."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from bundle_fixtures import dice, make_probe_bundle
from chat_doubles import ScriptedVLM

from vila_m3.chat.loop import ChatLoop, TurnRequest
from vila_m3.chat.store import ChatIdError, ChatStore
from vila_m3.chat.study import StudyError
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.service import ExpertService
from vila_m3.imaging import read_labelmap, read_volume
from vila_m3.imaging.slices import render_label_slice
from vila_m3.standins.stand_ins import stage_stand_ins

QUESTION = "Is there a liver tumor?"
TRIGGER = "This looks like a CT image. Let me trigger <VISTA3D(hepatic tumor)>."
CARD = (
    "Here is a list of available expert models:\n"
    "<BRATS(args)> Modality: MRI, Task: segmentation, Overview: A pre-trained model for volumetric (3D) "
    "segmentation of brain tumor subregions from multimodal MRIs based on BraTS 2018 data, Accuracy: Tumor core "
    "(TC): 0.8559 - Whole tumor (WT): 0.9026 - Enhancing tumor (ET): 0.7905 - Average: 0.8518, Valid args are: None\n"
    "<VISTA3D(args)> Modality: CT, Task: segmentation, Overview: domain-specialized interactive foundation model "
    "developed for segmenting and annotating human anatomies with precision, Accuracy: 127 organs: 0.792 Dice on "
    "average, Valid args are: 'everything', 'hepatic tumor', 'pancreatic tumor', 'lung tumor', 'bone lesion', "
    "'organs', 'cardiovascular', 'gastrointestinal', 'skeleton', or 'muscles'\n"
    "<CXR(args)> Modality: chest x-ray (CXR), Task: classification, Overview: pre-trained model which are trained "
    "on large cohorts of data, Accuracy: Good accuracy across several diverse chest x-rays datasets, Valid args "
    "are: None\n"
    "Give the model <NAME(args)> when selecting a suitable expert model.\n"
)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-in BRATS and CXR weights, and a VISTA3D bundle whose network labels every voxel above
    300 HU (the spine) with the first prompted id, so expert results are known exactly."""
    root = tmp_path_factory.mktemp("chat-models")
    stage_stand_ins(root, ("brats", "cxr"))
    make_probe_bundle(root / "bundles" / "vista3d", threshold_hu=300.0)
    return root


@pytest.fixture(scope="module")
def registry() -> ExpertRegistry:
    return ExpertRegistry.from_config(available=lambda spec: None if spec.runner else "not run by this product")


@pytest.fixture(scope="module")
def service(models_dir: Path, registry: ExpertRegistry) -> ExpertService:
    service = ExpertService(models_dir, registry=registry, idle_release_s=0)
    yield service
    service.close()


def make_loop(tmp_path: Path, service: ExpertService, registry: ExpertRegistry, answers, **kwargs):
    vlm = ScriptedVLM(answers)
    return ChatLoop(vlm, service, registry, ChatStore(tmp_path / "chats"), **kwargs), vlm


def ct_request(sample_data: Path, question: str = QUESTION, chat_id: str = "chat-1", **kwargs) -> TurnRequest:
    return TurnRequest(chat_id, question, {"image": str(sample_data / "studies" / "ct_abdomen.nii.gz")}, **kwargs)


def test_first_turn_is_card_image_modality_and_question_byte_for_byte(tmp_path, sample_data, service, registry):
    loop, vlm = make_loop(tmp_path, service, registry, ["No tumor is visible."])
    result = loop.run_turn(ct_request(sample_data))
    assert vlm.calls[0][0] == [("user", CARD + "<image>This is a CT image.\n" + QUESTION)]
    assert vlm.calls[0][1] == 1
    assert result.answer == "No tumor is visible."
    assert result.experts == [] and result.labels is None
    assert (result.axis, result.slice_index) == ("axial", 32)


def test_a_trigger_runs_vista3d_on_the_volume_and_feeds_back_the_protocol_text(tmp_path, sample_data, service,
                                                                                registry):
    loop, vlm = make_loop(tmp_path, service, registry, [TRIGGER, "Yes, there is one."])
    result = loop.run_turn(ct_request(sample_data, slice_index=20))
    expert_text = ("The results are <image>. The colors in this image describe red: liver. "
                   "Use this result to respond to this prompt:\n" + QUESTION)
    assert result.as_dict()["transcript"] == [
        {"role": "user", "text": CARD + "<image>This is a CT image.\n" + QUESTION,
         "images": ["turn001_slice0.png"], "question": QUESTION},
        {"role": "assistant", "text": TRIGGER},
        {"role": "expert", "text": expert_text, "images": ["expert001_vista3d.png"], "expert": "VISTA3D",
         "argument": "hepatic tumor"},
        {"role": "assistant", "text": "Yes, there is one."},
    ]
    # The second generation saw the expert's message as the next user turn, with the overlay image.
    assert vlm.calls[1][0] == [("user", CARD + "<image>This is a CT image.\n" + QUESTION),
                               ("assistant", TRIGGER), ("user", expert_text)]
    assert vlm.calls[1][1] == 2
    ct = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert result.labels.geometry.allclose(ct.geometry, atol=1e-4)
    # The probe labels the spine; a thin structure resampled to the bundle grid and back keeps most of its voxels.
    assert dice(result.labels.array > 0, ct.array > 300) > 0.8
    assert result.label_names == {"liver": 1, "hepatic tumor": 26}
    assert [call.expert for call in result.experts] == ["VISTA3D"]
    # The overlay is red where the labelmap's slice is labelled, grey elsewhere.
    overlay = np.asarray(vlm.calls[1][2][1]).astype(int)
    labelled = render_label_slice(result.labels, "axial", 20) > 0
    assert labelled.any()
    assert (overlay[labelled][:, 0] > overlay[labelled][:, 2] + 30).all()
    assert (overlay[~labelled][:, 0] == overlay[~labelled][:, 2]).all()
    stored = read_labelmap(loop.store.folder("chat-1") / result.chat.labels)
    assert np.array_equal(stored.array, result.labels.array)


def test_the_users_own_trigger_text_never_runs_an_expert(tmp_path, sample_data, service, registry):
    loop, vlm = make_loop(tmp_path, service, registry, ["I can describe the image instead."])
    result = loop.run_turn(ct_request(sample_data, question="<VISTA3D(everything)> <BRATS()> run these"))
    assert result.experts == []
    assert len(vlm.calls) == 1


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("Let me trigger <VISTA3D(hepatic tumor>.", "unbalanced"),
        ("Let me trigger <VISTA3D((hepatic tumor))>.", "VISTA3D"),
        ("Let me trigger <SAM(liver)>.", "SAM"),
        ("Let me trigger <VISTA3D(kidney stones)>.", "kidney stones"),
        ("Let me trigger <BRATS(t1)>.", "BRATS"),
        ("Let me trigger <VISTA2D()>.", "VISTA2D"),
    ],
    ids=["unbalanced", "nested", "unknown-expert", "unknown-argument", "extra-argument", "unavailable-expert"],
)
def test_bad_triggers_are_reported_and_the_answer_still_comes_back(tmp_path, sample_data, service, registry,
                                                                    answer, problem):
    loop, vlm = make_loop(tmp_path, service, registry, [answer])
    result = loop.run_turn(ct_request(sample_data))
    assert result.answer == answer
    assert result.experts == [] and len(vlm.calls) == 1
    notes = [m for m in result.chat.messages if m.role == "expert"]
    assert notes and all(not m.to_model for m in notes)
    assert any(problem.lower() in m.error.lower() for m in notes), [m.error for m in notes]


def test_fifty_triggers_in_one_answer_run_each_distinct_request_once_up_to_the_limit(tmp_path, sample_data, service,
                                                                                      registry):
    groups = ["hepatic tumor", "organs", "skeleton"] * 16 + ["hepatoma", "everything"]
    answer = " ".join(f"<VISTA3D({group})>" for group in groups)
    loop, _ = make_loop(tmp_path, service, registry, [answer, "Done."], max_triggers=3)
    result = loop.run_turn(ct_request(sample_data))
    assert [call.argument for call in result.experts] == ["hepatic tumor", "organs", "skeleton"]
    assert any("everything" in (m.error or "") for m in result.chat.messages if m.role == "expert")


def test_triggers_in_the_answer_after_feedback_run_too_and_rounds_are_bounded(tmp_path, sample_data, service,
                                                                              registry):
    answers = [TRIGGER, "Let me also trigger <VISTA3D(organs)>.", "Now <VISTA3D(skeleton)>.",
               "And <VISTA3D(muscles)>.", "Never reached."]
    loop, vlm = make_loop(tmp_path, service, registry, answers, max_rounds=2)
    result = loop.run_turn(ct_request(sample_data))
    assert [call.argument for call in result.experts] == ["hepatic tumor", "organs"]
    assert len(vlm.calls) == 3
    assert result.answer == "Now <VISTA3D(skeleton)>."
    assert "round limit (2) reached; not run: <VISTA3D(skeleton)>" in result.chat.messages[-1].error


def test_an_expert_failure_goes_to_the_model_and_the_user_and_the_turn_completes(tmp_path, sample_data, service,
                                                                                 registry, caplog):
    loop, vlm = make_loop(tmp_path, service, registry, ["Let me trigger <BRATS()>.", "I could not run it."])
    with caplog.at_level("WARNING", logger="vila_m3.chat.loop"):
        result = loop.run_turn(ct_request(sample_data))
    logged = [record for record in caplog.records if "BRATS" in record.getMessage()]
    assert logged and logged[0].exc_info is not None  # the server's log keeps the traceback
    failure = result.chat.messages[2]
    assert failure.role == "expert" and failure.expert == "BRATS"
    assert failure.text.startswith("Sorry I met an error: BRATS needs the four MRI sequences")
    assert failure.error and result.experts[0].error
    assert vlm.calls[1][0][-1] == ("user", failure.text)
    assert result.answer == "I could not run it."


def test_the_segmented_form_returns_the_result_without_a_follow_up(tmp_path, sample_data, service, registry):
    answer = "I segmented the entire image using <VISTA3D(everything)>."
    loop, vlm = make_loop(tmp_path, service, registry, [answer, "must not be asked"])
    result = loop.run_turn(ct_request(sample_data, question="Segment everything."))
    assert len(vlm.calls) == 1
    assert result.labels is not None and result.answer == answer
    # The result text without the follow-up instruction.
    assert result.chat.messages[-1].text == "The results are <image>. The colors in this image describe red: liver."


def test_a_chat_survives_a_restart_and_the_card_is_sent_once(tmp_path, sample_data, service, registry):
    loop, _ = make_loop(tmp_path, service, registry, ["First answer."])
    loop.run_turn(ct_request(sample_data, chat_id="kept"))
    restarted, vlm = make_loop(tmp_path, service, registry, ["Second answer."])
    restarted.run_turn(ct_request(sample_data, question="And the spleen?", chat_id="kept", slice_index=10))
    turns = vlm.calls[0][0]
    assert [role for role, _ in turns] == ["user", "assistant", "user"]
    assert turns[0][1].startswith(CARD) and not turns[2][1].startswith(CARD)
    assert turns[2][1] == "<image>This is a CT image.\nAnd the spleen?"
    assert vlm.calls[0][1] == 2


def test_two_chats_at_the_same_time_keep_their_own_histories(tmp_path, sample_data, service, registry):
    barrier = threading.Barrier(2, timeout=60)
    vlm = ScriptedVLM(["An answer."], on_generate=lambda number: barrier.wait() if number < 2 else None)
    loop = ChatLoop(vlm, service, registry, ChatStore(tmp_path / "chats"))
    requests = [
        ct_request(sample_data, question="CT question", chat_id="ct-chat"),
        TurnRequest("mri-chat", "MRI question",
                    {s: str(sample_data / "studies" / f"brain_mri_{s}.nii.gz") for s in ("t1c", "t1", "t2", "flair")}),
    ]
    results = {}
    threads = [threading.Thread(target=lambda r=r: results.setdefault(r.chat_id, loop.run_turn(r))) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results["ct-chat"].chat.modality == "CT" and results["mri-chat"].chat.modality == "MRI"
    ct_first = results["ct-chat"].chat.messages[0].text
    mri_first = results["mri-chat"].chat.messages[0].text
    assert ct_first.endswith("<image>This is a CT image.\nCT question")
    assert mri_first.endswith("T1(contrast enhanced): <image>, T1: <image>, T2: <image>, FLAIR: <image> "
                              "These are different MRI modalities.\nMRI question")
    assert len(results["mri-chat"].chat.messages[0].images) == 4


def test_cancel_stops_the_answer_and_keeps_what_came(tmp_path, sample_data, service, registry):
    cancel = threading.Event()
    loop, _ = make_loop(tmp_path, service, registry, ["one two three four five six"])
    pieces = []

    def on_event(name, data):
        if name == "token":
            pieces.append(data["text"])
            if len(pieces) == 2:
                cancel.set()

    result = loop.run_turn(ct_request(sample_data), on_event=on_event, cancel=cancel)
    assert result.cancelled and result.answer == "one two"
    assert result.chat.messages[-1].text == "one two"


@pytest.mark.parametrize(
    ("image", "expected"),
    [("studies/ct_abdomen.nii.gz", "CT"), ("dicom/ct_abdomen", "CT"), ("studies/brain_mri_t2.nii.gz", "MRI"),
     ("studies/cxr_chest.png", "CXR"), ("dicom/cxr_chest.dcm", "CXR")],
)
def test_modality_comes_from_the_data(tmp_path, sample_data, service, registry, image, expected):
    loop, vlm = make_loop(tmp_path, service, registry, ["ok"])
    result = loop.run_turn(TurnRequest("m", "What is this?", {"image": str(sample_data / image)}))
    assert result.chat.modality == expected
    assert f"This is a {expected} image.\n" in vlm.calls[0][0][0][1]


def test_the_client_can_override_the_modality(tmp_path, sample_data, service, registry):
    loop, vlm = make_loop(tmp_path, service, registry, ["ok"])
    loop.run_turn(ct_request(sample_data, modality="mri"))
    assert "This is a MRI image.\n" in vlm.calls[0][0][0][1]


def test_bad_requests_name_the_problem_and_change_nothing(tmp_path, sample_data, service, registry):
    loop, vlm = make_loop(tmp_path, service, registry, ["ok"])
    with pytest.raises(StudyError, match="slice_index 64 is out of range for the axial axis: 0 to 63"):
        loop.run_turn(ct_request(sample_data, slice_index=64))
    with pytest.raises(StudyError, match="axis 'oblique'"):
        loop.run_turn(ct_request(sample_data, axis="oblique"))
    with pytest.raises(StudyError, match="modality 'PET'"):
        loop.run_turn(ct_request(sample_data, modality="PET"))
    with pytest.raises(StudyError, match="missing: flair"):
        loop.run_turn(TurnRequest("x", "q", {s: str(sample_data / "studies" / f"brain_mri_{s}.nii.gz")
                                              for s in ("t1c", "t1", "t2")}))
    with pytest.raises(ChatIdError):
        loop.run_turn(ct_request(sample_data, chat_id="../escape"))
    assert vlm.calls == [] and loop.store.chat_ids() == []


def test_a_cached_expert_result_is_encoded_once_and_copied_into_later_chats(tmp_path, sample_data, service,
                                                                           registry, monkeypatch):
    import vila_m3.imaging.io as io_module  # save_labelmap encodes through write_labelmap

    writes = []
    real_write = io_module.write_labelmap
    monkeypatch.setattr(io_module, "write_labelmap", lambda *a, **k: writes.append(a[2]) or real_write(*a, **k))
    loop, _ = make_loop(tmp_path, service, registry, [TRIGGER, "Yes.", TRIGGER, "Yes."])
    first = loop.run_turn(ct_request(sample_data, chat_id="first"))
    encoded = len(writes)  # 0 when an earlier test of this module already encoded the shared cached result
    second = loop.run_turn(ct_request(sample_data, chat_id="second"))
    assert second.experts[0].cached and encoded <= 1 and len(writes) == encoded
    first_file = loop.store.folder("first") / first.chat.labels
    second_file = loop.store.folder("second") / second.chat.labels
    assert second_file.read_bytes() == first_file.read_bytes()


def test_each_turn_takes_the_modality_of_its_own_image(tmp_path, sample_data, service, registry):
    loop, vlm = make_loop(tmp_path, service, registry, ["ok"])
    loop.run_turn(ct_request(sample_data, chat_id="switch"))
    second = loop.run_turn(TurnRequest("switch", "And this X-ray?", {"image": str(sample_data / "studies/cxr_chest.png")}))
    assert second.chat.modality == "CXR"
    assert vlm.calls[1][0][-1] == ("user", "<image>This is a CXR image.\nAnd this X-ray?")


def test_the_modality_is_detected_once_per_volume_and_again_when_the_file_changes(tmp_path, service, registry,
                                                                                   monkeypatch):
    import gc
    import os
    import weakref

    import SimpleITK as sitk

    import vila_m3.chat.study as study_module
    from vila_m3.chat.study import detect_modality
    from vila_m3.imaging import Geometry, Volume

    scans = []
    real = study_module._lowest
    monkeypatch.setattr(study_module, "_lowest", lambda array: scans.append(array.shape) or real(array))
    path = tmp_path / "study.nii.gz"

    def write(values: np.ndarray, stamp_s: int) -> None:
        sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
        os.utime(path, ns=(stamp_s * 10**9, stamp_s * 10**9))  # a later modification time, as an edit gives

    ct = np.full((8, 16, 16), -1000, dtype=np.int16)
    ct[:, 4:12, 4:12] = 40
    write(ct, 1_700_000_000)
    loop, vlm = make_loop(tmp_path, service, registry, ["ok", "ok", "ok"])
    request = TurnRequest("changing", "What is this?", {"image": str(path)}, slice_index=4)
    assert loop.run_turn(request).chat.modality == "CT"
    assert loop.run_turn(request).chat.modality == "CT"
    assert len(scans) == 1  # the second turn did not scan the volume again

    write(np.full((8, 16, 16), 300, dtype=np.int16), 1_700_000_100)  # now an MRI-like volume, same size
    changed = loop.run_turn(request)
    assert changed.chat.modality == "MRI" and len(scans) == 2
    assert "This is a MRI image.\n" in vlm.calls[2][0][-1][1]

    # what is remembered lives on the volume: nothing global keeps a volume (or its statistics) alive
    volume = Volume(ct.copy(), Geometry.identity((16, 16, 8)))
    assert detect_modality(volume) == "CT"
    gone = weakref.ref(volume)
    del volume
    gc.collect()
    assert gone() is None


def test_stored_pictures_read_back_as_exactly_what_the_model_saw(tmp_path, sample_data, service, registry):
    from PIL import Image

    loop, vlm = make_loop(tmp_path, service, registry, [TRIGGER, "Yes."])
    loop.run_turn(ct_request(sample_data, chat_id="pictures", slice_index=20))
    slice_shown, overlay_shown = vlm.calls[1][2]
    folder = loop.store.folder("pictures")
    with Image.open(folder / "turn001_slice0.png") as stored:
        assert stored.mode == "L"  # a grey slice is stored as a grey PNG (a third of the pixels to encode)
    with Image.open(folder / "expert001_vista3d.png") as stored:
        assert stored.mode == "RGB"
    fresh = ChatStore(tmp_path / "chats")  # nothing remembered: read from the files
    for name, shown in (("turn001_slice0.png", slice_shown), ("expert001_vista3d.png", overlay_shown)):
        again = fresh.image("pictures", name)
        assert again.mode == "RGB" and np.array_equal(np.asarray(again), np.asarray(shown))
