# ruff: noqa: F811  (pytest fixtures imported from bundle_fixtures are test arguments of the same name)
"""The VISTA3D runner on a stand-in bundle in the real bundle's layout: geometry, labels, input checks,
loading once, bundle errors, and agreement with MONAI's own bundle runner."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from bundle_fixtures import (  # noqa: F401  (pytest fixtures)
    block_phantom,
    ct_volume,
    dice,
    make_probe_bundle,
    run_with_monai_bundle,
    tiny_brats_bundle,
    tiny_vista3d_bundle,
)

from vila_m3.configs import load_config
from vila_m3.experts import ExpertRegistry
from vila_m3.experts.bundle import BundleError, MonaiBundle
from vila_m3.experts.result import ExpertInputError
from vila_m3.experts.vista3d import Vista3DRunner
from vila_m3.imaging import Geometry, Volume, read_volume

CLASSES = {int(k): v for k, v in load_config("vista3d_classes.json")["classes"].items()}
SPEC = ExpertRegistry.from_config().configured_spec("VISTA3D")
HEPATIC = SPEC.resolve_argument("hepatic tumor")


@pytest.fixture(scope="module")
def runner(tiny_vista3d_bundle: Path) -> Vista3DRunner:
    return Vista3DRunner(tiny_vista3d_bundle, device="cpu")


@pytest.fixture(scope="module")
def nifti_result(runner: Vista3DRunner, ct_volume: Volume):
    return runner.run(ct_volume, list(HEPATIC.label_ids), HEPATIC.group)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


# ---------------------------------------------------------------------------------- results


def test_sample_ct_labelmap_is_on_the_input_grid(nifti_result, ct_volume: Volume) -> None:
    labels = nifti_result.labels
    assert labels.array.shape == ct_volume.array.shape
    assert labels.geometry.allclose(ct_volume.geometry, atol=1e-4)
    assert labels.array.dtype == np.uint8
    assert set(np.unique(labels.array).tolist()) <= {0, *HEPATIC.label_ids}
    assert nifti_result.present_ids, "the stand-in network labels something on the sample CT"
    assert nifti_result.expert == "VISTA3D" and nifti_result.argument == "hepatic tumor"
    assert nifti_result.stand_in is True and nifti_result.bundle_version == "0.5.4"
    assert {"load", "preprocess", "inference", "postprocess", "total"} <= set(nifti_result.timings)


def test_label_names_come_from_the_configs(nifti_result) -> None:
    assert nifti_result.label_names == {1: "liver", 26: "hepatic tumor"}
    assert all(CLASSES[i] == name for i, name in nifti_result.label_names.items())


@pytest.mark.parametrize("source", ["nrrd/ct_abdomen.nrrd", "dicom/ct_abdomen"])
def test_nrrd_and_dicom_give_the_nifti_result(runner, nifti_result, sample_data: Path, source: str) -> None:
    volume = read_volume(sample_data / source)
    result = runner.run(volume, list(HEPATIC.label_ids), HEPATIC.group)
    assert result.labels.geometry.allclose(volume.geometry, atol=1e-4)
    assert set(np.unique(result.labels.array).tolist()) <= {0, 1, 26}
    agreement = float(np.mean(result.labels.array == nifti_result.labels.array))
    assert agreement > 0.999, f"{source}: only {agreement:.4%} of voxels agree with the NIfTI result"
    assert runner.load_count == 1, "one runner, many volumes: the network is loaded once"


def test_subclass_prompts_are_expanded_as_the_bundle_does(runner: Vista3DRunner, ct_volume: Volume) -> None:
    lung = SPEC.resolve_argument("lung tumor")  # contains 20 'lung', which VISTA3D splits into 5 lobes
    assert runner.prompt_ids([2]) == [14, 5]
    assert runner.prompt_ids(lung.label_ids) == [28, 29, 30, 31, 32, 23]  # table order, lung → lobes
    result = runner.run(ct_volume, list(lung.label_ids), lung.group)
    assert result.label_names == {i: CLASSES[i] for i in (23, 28, 29, 30, 31, 32)}
    assert set(result.present_ids) <= set(result.label_names)


def test_labels_land_where_the_input_is_bright(tmp_path: Path) -> None:
    """A probe network labels what is brighter than 500 HU; on an oblique, axis-permuted grid the
    labelmap must cover the bright block (any flip, transposition or shift would miss it)."""
    volume, block = block_phantom()
    runner = Vista3DRunner(make_probe_bundle(tmp_path / "probe", threshold_hu=500.0), device="cpu")
    result = runner.run(volume, [3, 1], "test")
    assert result.labels.geometry.allclose(volume.geometry, atol=1e-4)
    assert set(np.unique(result.labels.array).tolist()) == {0, 3}  # ties go to the first prompted class
    overlap = dice(result.labels.array > 0, block)
    assert overlap > 0.75, f"labelmap and bright block overlap by Dice {overlap:.2f}"
    flipped = [dice(result.labels.array > 0, np.flip(block, axis)) for axis in range(3)]
    assert max(flipped) < 0.6, f"the check must be able to see a flipped axis (Dice {flipped})"


def test_same_result_as_monai_bundle_run(runner, nifti_result, tiny_vista3d_bundle: Path, sample_data: Path,
                                         tmp_path: Path) -> None:
    """MONAI's own runner on the same bundle (its LoadImaged, scripts/ inferer and evaluator, Invertd,
    SaveImaged) writes the same labelmap, voxel for voxel."""
    bundle = _copy(tiny_vista3d_bundle, tmp_path)
    image = sample_data / "studies" / "ct_abdomen.nii.gz"
    run_with_monai_bundle(
        bundle,
        input_dict={"image": str(image), "label_prompt": list(HEPATIC.label_ids)},
        output_dir=str(tmp_path / "out"),
    )
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "ct_abdomen" / "ct_abdomen_trans.nii.gz")))
    np.testing.assert_array_equal(written.astype(np.uint8), nifti_result.labels.array)


# ------------------------------------------------------------------------------------ input


def test_2d_image_is_rejected(runner: Vista3DRunner, sample_data: Path) -> None:
    xray = read_volume(sample_data / "studies" / "cxr_chest.png")
    with pytest.raises(ExpertInputError, match="2D"):
        runner.run(xray, [1], None)


def test_mr_and_dx_are_rejected(runner: Vista3DRunner, sample_data: Path) -> None:
    mri = read_volume(sample_data / "studies" / "brain_mri_t1.nii.gz")
    mri.modality = "MR"
    with pytest.raises(ExpertInputError, match="MR, not CT"):
        runner.run(mri, [1], None)
    dx = read_volume(sample_data / "dicom" / "cxr_chest.dcm")
    with pytest.raises(ExpertInputError, match="DX"):
        runner.run(dx, [1], None)


def test_volume_without_body_is_rejected(runner: Vista3DRunner) -> None:
    air = Volume(array=np.full((12, 30, 30), -1000, np.int16), geometry=Geometry.identity((30, 30, 12)))
    with pytest.raises(ExpertInputError, match="no voxel above 0 HU"):
        runner.run(air, [1], None)


def test_unsupported_or_empty_prompts_are_rejected(runner: Vista3DRunner, ct_volume: Volume) -> None:
    with pytest.raises(ExpertInputError, match="16"):
        runner.run(ct_volume, [1, 16], None)
    with pytest.raises(ExpertInputError, match="133"):
        runner.prompt_ids([133])
    with pytest.raises(ExpertInputError, match="at least one"):
        runner.prompt_ids([])


# ----------------------------------------------------------------------------- loading


def test_network_is_loaded_once_and_released(tmp_path: Path) -> None:
    """Two runs load the bundle's network once; after release() the next run loads it again.
    (The probe bundle goes through the same loading code as any bundle, and runs in milliseconds.)"""
    volume, _ = block_phantom()
    runner = Vista3DRunner(make_probe_bundle(tmp_path / "probe", threshold_hu=500.0), device="cpu")
    assert runner.load_count == 0 and not runner.loaded  # lazy: nothing loaded before the first run
    first = runner.run(volume, [1], None)
    second = runner.run(volume, [1], None)
    assert runner.load_count == 1 and runner.loaded
    np.testing.assert_array_equal(first.labels.array, second.labels.array)
    runner.release()
    assert not runner.loaded
    runner.run(volume, [1], None)
    assert runner.load_count == 2


@pytest.mark.parametrize("missing", ["configs/inference.json", "configs/metadata.json", "models/model.pt"])
def test_missing_bundle_file_is_named(tiny_vista3d_bundle: Path, tmp_path: Path, missing: str) -> None:
    bundle = _copy(tiny_vista3d_bundle, tmp_path)
    (bundle / missing).unlink()
    with pytest.raises(BundleError, match=missing.replace(".", r"\.")):
        Vista3DRunner(bundle, device="cpu")


def test_missing_bundle_folder(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle folder"):
        MonaiBundle(tmp_path / "nowhere")


def test_invalid_json_is_named(tiny_vista3d_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(tiny_vista3d_bundle, tmp_path)
    (bundle / "configs" / "metadata.json").write_text("{ not json")
    with pytest.raises(BundleError, match=r"metadata\.json: not a readable JSON"):
        MonaiBundle(bundle)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_is_named(tiny_vista3d_bundle: Path, tmp_path: Path, damage: str) -> None:
    bundle = _copy(tiny_vista3d_bundle, tmp_path)
    checkpoint = bundle / "models" / "model.pt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(b"\x00not a checkpoint" * 64 if damage == "garbage" else data[: len(data) // 2])
    runner = Vista3DRunner(bundle, device="cpu")  # the folder is complete; the weights are read on first use
    volume, _ = block_phantom()
    with pytest.raises(BundleError, match=r"models/model\.pt"):
        runner.run(volume, [1], None)
    assert runner.load_count == 0


def test_weights_of_another_network_are_refused(tiny_vista3d_bundle, tiny_brats_bundle, tmp_path: Path) -> None:
    bundle = _copy(tiny_vista3d_bundle, tmp_path)
    shutil.copy(tiny_brats_bundle / "models" / "model.pt", bundle / "models" / "model.pt")
    with pytest.raises(BundleError, match=r"model\.pt: the weights do not fit the network_def"):
        MonaiBundle(bundle).load_network("cpu")


def test_pickled_objects_need_a_trusted_checksum(tiny_vista3d_bundle: Path, tmp_path: Path) -> None:
    """A checkpoint with Python objects besides tensors is refused by weights_only=True, and read with
    weights_only=False only when the caller vouches for its SHA-256."""
    bundle = _copy(tiny_vista3d_bundle, tmp_path)
    checkpoint = bundle / "models" / "model.pt"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4)}, checkpoint)
    with pytest.raises(BundleError, match="weights_only=True refused"):
        MonaiBundle(bundle).load_network("cpu")
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    network = MonaiBundle(bundle).load_network("cpu", trusted_sha256=[digest])
    assert torch.equal(network.state_dict()["class_head.class_embeddings.weight"],
                       state["class_head.class_embeddings.weight"])


def test_stand_in_bundle_layout(tiny_vista3d_bundle: Path) -> None:
    """The stand-in has the real bundle's files and keys, says what it is, and carries the real labels."""
    for name in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "docs/README.md",
                 "scripts/__init__.py", "scripts/inferer.py", "scripts/evaluator.py"):
        assert (tiny_vista3d_bundle / name).is_file(), name
    metadata = json.loads((tiny_vista3d_bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["version"] == "0.5.4"
    assert metadata["vila_m3_stand_in"] == "tiny random weights for tests; not a medical model"
    channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert {int(k): v for k, v in channel_def.items()} == CLASSES
    inference = json.loads((tiny_vista3d_bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    for key in ("network_def", "preprocessing_transforms", "inferer", "postprocessing", "evaluator",
                "checkpointloader", "subclass", "everything_labels", "resample_spacing", "patch_size"):
        assert key in inference, key
    bundle = MonaiBundle(tiny_vista3d_bundle)
    assert bundle.info.is_stand_in and bundle.info.version == "0.5.4"
    assert sorted(bundle.get("everything_labels")) == sorted(load_config("vista3d_classes.json")["everything_label_ids"])
