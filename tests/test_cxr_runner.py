"""The CXR expert on stand-in TorchXRayVision weights: loading, pre-processing, voting, feedback.

The eight stand-in weight files are written once for the module; one runner classifies the sample
chest X-ray as PNG and as DICOM, and most tests check those two results. Nothing is downloaded.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from vila_m3.configs import load_config
from vila_m3.experts.cxr import (
    ClassificationResult,
    CxrInputError,
    CxrRunner,
    CxrUnavailable,
    prepare_cxr,
)
from vila_m3.experts.result import ExpertInputError, ExpertRunError
from vila_m3.imaging import Geometry, Volume, read_volume
from vila_m3.models.manifest import ModelManifest
from vila_m3.standins.stand_in_xrv import (
    STAND_IN_MARKER,
    STAND_IN_NOTE,
    XRV_FOLDER,
    make_stand_in_xrv_weights,
    xrv_entries,
)

RESNET = "xrv_resnet50_res512_all"
DENSE = "xrv_densenet121_res224_"
QUESTION = "Is the heart enlarged?"


def _xrv():
    import warnings

    with warnings.catch_warnings():
        import torchxrayvision as xrv
    return xrv


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding the eight stand-in xrv weight files and the marker."""
    models_dir = tmp_path_factory.mktemp("models")
    written = make_stand_in_xrv_weights(models_dir, seed=0)
    assert len(written) == 8
    return models_dir


@pytest.fixture(scope="module")
def expert_config() -> dict:
    """The CXR entry of configs/experts.yaml, read directly (independently of the registry)."""
    return next(e for e in load_config("experts.yaml")["experts"] if e.get("name") == "CXR")


class Recorded:
    """What the hooks saw: per model, the input shapes and the raw outputs of every forward."""

    def __init__(self) -> None:
        self.inputs: dict[str, list[tuple[tuple[int, ...], torch.dtype]]] = {}
        self.outputs: dict[str, list[np.ndarray]] = {}
        self.torch_loads: dict[str, int] = {}
        self.module_refs: dict[str, weakref.ref] = {}


@contextmanager
def counting_torch_load(record: Recorded, key: str) -> Iterator[None]:
    """Count the ``torch.load`` calls made inside the block under ``record.torch_loads[key]``."""
    real_load = torch.load
    record.torch_loads[key] = 0

    def counting_load(*args, **kwargs):
        record.torch_loads[key] += 1
        return real_load(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", counting_load)
        yield


@pytest.fixture(scope="module")
def runner_and_record(weights_dir: Path) -> Iterator[tuple[CxrRunner, Recorded]]:
    """One CPU runner for the module, loaded once (``torch.load`` calls counted) and its models hooked."""
    record = Recorded()
    runner = CxrRunner(weights_dir, device="cpu")
    assert not runner.loaded
    with counting_torch_load(record, "load"):
        models = runner.load()
    for model_id, module in models.items():
        record.inputs[model_id] = []
        record.outputs[model_id] = []
        record.module_refs[model_id] = weakref.ref(module)

        def pre_hook(mod, args, model_id=model_id):
            record.inputs[model_id].append((tuple(args[0].shape), args[0].dtype))

        def post_hook(mod, args, output, model_id=model_id):
            record.outputs[model_id].append(output.detach().cpu().numpy()[0].copy())

        module.register_forward_pre_hook(pre_hook)
        module.register_forward_hook(post_hook)
    del models, module
    yield runner, record
    runner.release()


@pytest.fixture(scope="module")
def png_result(runner_and_record, sample_data: Path) -> ClassificationResult:
    runner, record = runner_and_record
    with counting_torch_load(record, "png run"):
        return runner.run(sample_data / "studies" / "cxr_chest.png")


@pytest.fixture(scope="module")
def dicom_result(runner_and_record, sample_data: Path, png_result: ClassificationResult) -> ClassificationResult:
    runner, record = runner_and_record
    with counting_torch_load(record, "dicom run"):
        return runner.run(sample_data / "dicom" / "cxr_chest.dcm")


def _predicted_classes(xrv_name: str) -> set[str]:
    """Classes an xrv model really predicts: a non-empty label with a finite operating threshold."""
    info = _xrv().models.model_urls[xrv_name]
    return {
        label
        for label, thr in zip(info["labels"], info["op_threshs"], strict=True)
        if label and not math.isnan(float(thr))
    }


def _linked_models_dir(source: Path, target: Path, leave_out: str | None, marker: bool) -> Path:
    """A models directory whose xrv files are symlinks to ``source``'s, minus ``leave_out``."""
    folder = target / XRV_FOLDER
    folder.mkdir(parents=True)
    for path in (source / XRV_FOLDER).iterdir():
        if path.name == STAND_IN_MARKER and not marker:
            continue
        if leave_out is not None and path.name == leave_out:
            continue
        os.symlink(path, folder / path.name)
    return target


# --- stand-in files -------------------------------------------------------------------------------


def test_stand_in_files_have_xrv_names_and_formats(weights_dir: Path) -> None:
    xrv = _xrv()
    folder = weights_dir / XRV_FOLDER
    entries = xrv_entries()
    assert len(entries) == 8
    for entry in entries:
        url = xrv.models.model_urls[entry.source["xrv_name"]]["weights_url"]
        assert (folder / os.path.basename(url)).is_file(), entry.model_id
    assert STAND_IN_NOTE in (folder / STAND_IN_MARKER).read_text(encoding="utf-8")

    dense = torch.load(folder / os.path.basename(xrv.models.model_urls["densenet121-res224-nih"]["weights_url"]),
                       map_location="cpu", weights_only=False)
    assert isinstance(dense, xrv.models.DenseNet)  # a whole pickled module, as xrv's DenseNet files
    assert "op_threshs" not in dense.state_dict()
    assert dense.state_dict()["classifier.weight"].shape == (18, 1024)

    state = torch.load(folder / os.path.basename(xrv.models.model_urls["resnet50-res512-all"]["weights_url"]),
                       map_location="cpu", weights_only=True)
    assert isinstance(state, dict)  # a state dict, as xrv's ResNet file
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    assert state["fc.weight"].shape == (18, 2048)


def test_stand_in_refuses_to_overwrite_unmarked_weights(tmp_path: Path) -> None:
    entry = xrv_entries()[0]
    existing = entry.location(tmp_path)
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"real weights")
    with pytest.raises(FileExistsError, match="not overwriting"):
        make_stand_in_xrv_weights(tmp_path)
    assert existing.read_bytes() == b"real weights"
    assert sorted(p.name for p in existing.parent.iterdir()) == [existing.name]


# --- pre-processing (no model) --------------------------------------------------------------------


def test_eight_bit_image_is_normalised_without_stretching(sample_data: Path) -> None:
    volume = read_volume(sample_data / "studies" / "cxr_chest.png")
    prepared = prepare_cxr(volume)
    expected = (2.0 * volume.array.astype(np.float32) / 255.0 - 1.0) * 1024.0
    assert prepared.shape == (1, 512, 512) and prepared.dtype == np.float32
    np.testing.assert_allclose(prepared, expected, rtol=0, atol=1e-3)


def test_sixteen_bit_image_is_stretched_to_eight_bit_range(sample_data: Path) -> None:
    pixels = read_volume(sample_data / "studies" / "cxr_chest.png").array.astype(np.uint16) * 257 + 300
    volume = Volume(array=pixels, geometry=Geometry.identity((512, 512, 1)))
    prepared = prepare_cxr(volume)
    lo, hi = float(pixels.min()), float(pixels.max())
    grey = (pixels.astype(np.float64) - lo) / (hi - lo) * 255.0
    np.testing.assert_allclose(prepared, (2.0 * grey / 255.0 - 1.0) * 1024.0, rtol=0, atol=1e-2)
    assert prepared.min() == pytest.approx(-1024.0) and prepared.max() == pytest.approx(1024.0)


def test_non_square_image_is_centre_cropped() -> None:
    pixels = np.tile((np.arange(400) % 200).astype(np.uint8)[None, None, :], (1, 300, 1))
    prepared = prepare_cxr(Volume(array=pixels, geometry=Geometry.identity((400, 300, 1))))
    assert prepared.shape == (1, 300, 300)
    expected_columns = (2.0 * (np.arange(50, 350) % 200) / 255.0 - 1.0) * 1024.0
    np.testing.assert_allclose(prepared[0, 0], expected_columns, atol=1e-3)


def test_3d_volume_is_rejected_before_loading(tmp_path: Path) -> None:
    runner = CxrRunner(tmp_path / "no_models", device="cpu")  # no weights: loading would fail differently
    volume = Volume(array=np.zeros((3, 16, 16), dtype=np.uint8), geometry=Geometry.identity((16, 16, 3)))
    with pytest.raises(CxrInputError, match="3D volume of 3 slices") as info:
        runner.run(volume)
    assert isinstance(info.value, ExpertInputError) and isinstance(info.value, ValueError)
    assert not runner.loaded


# --- missing weights ------------------------------------------------------------------------------


def test_missing_weight_file_is_named_and_nothing_is_downloaded(
    weights_dir: Path, tmp_path: Path, sample_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xrv = _xrv()
    missing_name = os.path.basename(xrv.models.model_urls["densenet121-res224-chex"]["weights_url"])
    models_dir = _linked_models_dir(weights_dir, tmp_path / "models", leave_out=missing_name, marker=True)
    before = sorted(p.name for p in (models_dir / XRV_FOLDER).iterdir())

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    calls: list[str] = []
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(xrv.utils, "download", lambda *a, **k: calls.append("download"))
    monkeypatch.setattr(xrv.models, "get_weights", lambda *a, **k: calls.append("get_weights"))

    runner = CxrRunner(models_dir, device="cpu")
    assert [p.name for p in runner.missing_files()] == [missing_name]
    with pytest.raises(CxrUnavailable) as info:
        runner.run(sample_data / "studies" / "cxr_chest.png")
    assert missing_name in str(info.value)
    assert [p.name for p in info.value.missing] == [missing_name]
    assert isinstance(info.value, ExpertRunError)
    assert calls == []
    assert not runner.loaded
    assert sorted(p.name for p in (models_dir / XRV_FOLDER).iterdir()) == before


def test_empty_models_dir_names_all_eight_files(tmp_path: Path) -> None:
    runner = CxrRunner(tmp_path, device="cpu")
    with pytest.raises(CxrUnavailable, match=r"missing \(8 of 8\)") as info:
        runner.load()
    assert len(info.value.missing) == 8
    assert not (tmp_path / XRV_FOLDER).exists()


def test_stand_in_is_detected_from_the_marker(weights_dir: Path, tmp_path: Path) -> None:
    assert CxrRunner(weights_dir, device="cpu").stand_in
    unmarked = _linked_models_dir(weights_dir, tmp_path / "models", leave_out=None, marker=False)
    runner = CxrRunner(unmarked, device="cpu")
    assert runner.missing_files() == []
    assert not runner.stand_in


# --- a real run on the ensemble -------------------------------------------------------------------


def test_png_and_dicom_give_identical_predictions(
    png_result: ClassificationResult, dicom_result: ClassificationResult
) -> None:
    assert png_result.probabilities == dicom_result.probabilities
    assert png_result.per_model == dicom_result.per_model
    assert png_result.answers == dicom_result.answers
    assert png_result.stand_in and dicom_result.stand_in


def test_eighteen_pathologies_in_xrv_order(png_result: ClassificationResult) -> None:
    assert list(png_result.probabilities) == list(_xrv().datasets.default_pathologies)
    assert len(png_result.probabilities) == 18
    assert all(0.0 <= p <= 1.0 for p in png_result.probabilities.values())
    assert list(png_result.answers) == list(png_result.probabilities)


def test_answers_follow_the_threshold(png_result: ClassificationResult, expert_config: dict) -> None:
    threshold = expert_config["classification"]["threshold"]
    assert png_result.threshold == threshold == 0.5
    for name, probability in png_result.probabilities.items():
        assert png_result.answers[name] is (probability >= threshold), name
    assert any(png_result.answers.values()) and not all(png_result.answers.values())


def test_each_model_predicts_only_its_own_classes(
    png_result: ClassificationResult, runner_and_record, expert_config: dict
) -> None:
    _, record = runner_and_record
    manifest = ModelManifest.load()
    pathologies = list(_xrv().datasets.default_pathologies)
    assert list(png_result.per_model) == expert_config["weights"]
    for model_id, probabilities in png_result.per_model.items():
        predicted = _predicted_classes(manifest[model_id].source["xrv_name"])
        assert set(probabilities) == predicted, model_id
        raw = record.outputs[model_id][0]
        for index, name in enumerate(pathologies):
            if name not in predicted:  # xrv reports a class it does not predict as exactly 0.5
                assert raw[index] == 0.5, (model_id, name)
            else:
                assert probabilities[name] == pytest.approx(float(raw[index]), abs=0), (model_id, name)


def test_voting_matches_an_independent_computation(png_result: ClassificationResult, expert_config: dict) -> None:
    per_model = png_result.per_model
    voting = expert_config["classification"]["voting"]
    for name, probability in png_result.probabilities.items():
        voters = voting.get(name, expert_config["weights"])
        votes = [per_model[m][name] for m in voters if name in per_model[m]]
        assert votes, name
        assert probability == pytest.approx(sum(votes) / len(votes), abs=1e-12), name

    assert png_result.probabilities["Pneumothorax"] == per_model[RESNET]["Pneumothorax"]
    fracture = [per_model[DENSE + "all"]["Fracture"], per_model[DENSE + "chex"]["Fracture"],
                per_model[RESNET]["Fracture"]]  # nih is a Fracture voter but has no Fracture output
    assert png_result.probabilities["Fracture"] == pytest.approx(np.mean(fracture), abs=1e-12)
    assert png_result.probabilities["Fracture"] != pytest.approx(np.mean([*fracture, 0.5]), abs=1e-9)
    assert "Fracture" in per_model[DENSE + "pc"]  # pc predicts Fracture but does not vote on it
    lesion = [per_model[DENSE + m]["Lung Lesion"] for m in ("all", "chex", "mimic_ch", "mimic_nb")]
    assert png_result.probabilities["Lung Lesion"] == pytest.approx(np.mean(lesion), abs=1e-12)


def test_each_model_gets_its_own_resolution(runner_and_record, dicom_result: ClassificationResult) -> None:
    _, record = runner_and_record
    assert len(record.inputs) == 8
    for model_id, calls in record.inputs.items():
        size = 512 if model_id == RESNET else 224
        assert calls == [((1, 1, size, size), torch.float32)] * 2, model_id


def test_models_load_once_across_runs(
    runner_and_record, png_result: ClassificationResult, dicom_result: ClassificationResult
) -> None:
    runner, record = runner_and_record
    assert record.torch_loads == {"load": 8, "png run": 0, "dicom run": 0}
    assert png_result.timings["load"] == 0.0 and dicom_result.timings["load"] == 0.0  # loaded by the fixture
    assert all(len(calls) == 2 for calls in record.inputs.values())  # the hooked modules ran both times
    models = runner.load()
    assert set(models) == set(record.module_refs)
    assert all(models[m] is ref() for m, ref in record.module_refs.items())
    del models
    for key in ("read", "preprocess", "inference", "total"):
        assert dicom_result.timings[key] >= 0.0
    assert dicom_result.timings["total"] >= dicom_result.timings["inference"] > 0.0


def test_feedback_text(png_result: ClassificationResult) -> None:
    text = png_result.feedback_text(QUESTION)
    assert text.startswith("The resulting predictions are:\n")
    lines = text.split("\n")
    expected = sorted(
        f"{name.lower().replace('_', ' ')}: {'yes' if answer else 'no'}" for name, answer in png_result.answers.items()
    )
    assert lines[1:19] == expected
    assert lines[19] == ". Analyze the image and take these predictions into account when responding to this prompt:"
    assert lines[20] == QUESTION and len(lines) == 21


def test_release_frees_the_models(
    runner_and_record, png_result: ClassificationResult, dicom_result: ClassificationResult
) -> None:
    runner, record = runner_and_record
    assert runner.loaded
    runner.release()
    gc.collect()
    assert not runner.loaded
    assert all(ref() is None for ref in record.module_refs.values())
