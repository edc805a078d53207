# ruff: noqa: F811  (pytest fixtures imported from bundle_fixtures are test arguments of the same name)
"""The BRATS runner on a stand-in bundle in the real bundle's layout: channel order, sequence names,
grids of the four sequences, input checks, and the labelmap it returns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from bundle_fixtures import mri_sequences, tiny_brats_bundle  # noqa: F401  (pytest fixtures)
from monai.inferers import SlidingWindowInferer
from monai.transforms import NormalizeIntensity

from vila_m3.experts.brats import BratsRunner, canonical_sequences
from vila_m3.experts.bundle import MonaiBundle
from vila_m3.experts.result import ExpertInputError
from vila_m3.imaging import Geometry, Volume, read_volume

ORDER = ("t1c", "t1", "t2", "flair")


@pytest.fixture(scope="module")
def runner(tiny_brats_bundle: Path) -> BratsRunner:
    return BratsRunner(tiny_brats_bundle, device="cpu")


@pytest.fixture(scope="module")
def canonical_result(runner: BratsRunner, mri_sequences: dict[str, Volume]):
    return runner.run({s: mri_sequences[s] for s in ORDER})


def direct_labels(bundle_dir: Path, volumes: list[Volume]) -> np.ndarray:
    """The bundle's network fed directly with ``volumes`` as channels 0..3 (no runner): normalise
    (nonzero, channel-wise), sliding window with the bundle's roi / overlap, sigmoid > 0.5, collapse."""
    bundle = MonaiBundle(bundle_dir)
    network = bundle.load_network("cpu")
    image = torch.from_numpy(np.stack([v.array.transpose(2, 1, 0).astype(np.float32) for v in volumes]))
    image = NormalizeIntensity(nonzero=True, channel_wise=True)(image)
    inferer = SlidingWindowInferer(roi_size=bundle.get("inferer#roi_size"), sw_batch_size=1,
                                   overlap=bundle.get("inferer#overlap"))
    with torch.no_grad():
        prob = torch.sigmoid(inferer(torch.as_tensor(image)[None], network))[0] > 0.5
    tc, wt, et = prob.numpy()
    labels = np.where(et, 4, np.where(tc, 1, np.where(wt, 2, 0))).astype(np.uint8)
    return labels.transpose(2, 1, 0)


def shifted_copy(volume: Volume, shift_mm: tuple[float, float, float], spacing: tuple[float, float, float],
                 size: tuple[int, int, int]) -> Volume:
    """``volume`` resampled (linear) onto another grid: origin moved by ``shift_mm``, new spacing and size."""
    g = volume.geometry
    target = Geometry(spacing=spacing, origin=tuple(np.add(g.origin, shift_mm)), direction=g.direction, shape=size)
    grid = target.to_sitk(sitk.Image(list(size), sitk.sitkFloat32))
    image = sitk.Resample(sitk.Cast(volume.to_sitk(), sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    return Volume.from_sitk(image)


# ---------------------------------------------------------------------------------- results


def test_labelmap_is_on_the_t1c_grid(canonical_result, mri_sequences) -> None:
    labels = canonical_result.labels
    assert labels.geometry == mri_sequences["t1c"].geometry
    assert labels.array.dtype == np.uint8
    values = set(np.unique(labels.array).tolist())
    assert values <= {0, 1, 2, 4} and values - {0}, f"values {values}"
    assert canonical_result.label_names == {1: "tumor core", 2: "edema", 4: "enhancing tumor"}
    assert canonical_result.expert == "BRATS" and canonical_result.argument is None
    assert canonical_result.stand_in is True and canonical_result.bundle_version == "0.5.2"
    assert canonical_result.notes == []


def test_channel_order_is_canonical_whatever_the_input_order(runner, canonical_result, mri_sequences,
                                                               tiny_brats_bundle: Path) -> None:
    """Sequences given in another order and under aliases give the result of feeding the network
    T1c, T1, T2, FLAIR directly (and the network's output changes with the channel order)."""
    shuffled = {"FLAIR": mri_sequences["flair"], "T2w": mri_sequences["t2"],
                "t1ce": mri_sequences["t1c"], "T1": mri_sequences["t1"]}
    result = runner.run(shuffled)
    np.testing.assert_array_equal(result.labels.array, canonical_result.labels.array)
    direct = direct_labels(tiny_brats_bundle, [mri_sequences[s] for s in ORDER])
    agreement = float(np.mean(result.labels.array == direct))  # float rounding may flip a voxel at 0.5
    assert agreement > 0.9999, f"runner and direct T1c, T1, T2, FLAIR feed agree on {agreement:.5%}"
    # the check has teeth: the stand-in network's output depends on the channel order
    network = MonaiBundle(tiny_brats_bundle).load_network("cpu")
    x = torch.randn(1, 4, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        in_order, shuffled_channels = network(x), network(x[:, [3, 2, 0, 1]])
    assert (torch.sigmoid(in_order) > 0.5).ne(torch.sigmoid(shuffled_channels) > 0.5).float().mean() > 0.05


def test_aliases_are_recognised() -> None:
    volume = Volume(array=np.zeros((4, 4, 4), np.int16), geometry=Geometry.identity((4, 4, 4)))
    names = {"T1-contrast": volume, "t1w": volume, "T2": volume, "Flair": volume}
    assert list(canonical_sequences(names)) == list(ORDER)
    assert list(canonical_sequences({"t1_gd": volume, "T1": volume, "t2w": volume, "FLAIR": volume})) == list(ORDER)


# ------------------------------------------------------------------------------------ input


def test_three_sequences_name_the_missing_one(runner, mri_sequences) -> None:
    with pytest.raises(ExpertInputError, match="missing: FLAIR"):
        runner.run({s: mri_sequences[s] for s in ("t1c", "t1", "t2")})


def test_duplicate_and_extra_sequences_are_rejected(runner, mri_sequences) -> None:
    with pytest.raises(ExpertInputError, match="T1c sequence twice"):
        runner.run({**mri_sequences, "T1ce": mri_sequences["t1c"]})
    with pytest.raises(ExpertInputError, match="'pd'"):
        runner.run({**mri_sequences, "pd": mri_sequences["t2"]})


def test_ct_and_2d_images_are_rejected(runner, mri_sequences, sample_data: Path) -> None:
    ct = read_volume(sample_data / "dicom" / "ct_abdomen")
    assert ct.modality == "CT"
    with pytest.raises(ExpertInputError, match="CT, not MR"):
        runner.run({**mri_sequences, "t2": ct})
    flat = read_volume(sample_data / "studies" / "cxr_chest.png")
    with pytest.raises(ExpertInputError, match="2D"):
        runner.run({**mri_sequences, "flair": flat})


def test_shifted_overlapping_grid_is_resampled_onto_the_t1c(runner, mri_sequences) -> None:
    t2 = mri_sequences["t2"]
    moved = shifted_copy(t2, shift_mm=(4.3, -3.1, 2.2), spacing=(1.7, 1.6, 1.9), size=(110, 116, 74))
    arrays, reference, resampled = runner.prepare({**mri_sequences, "t2": moved})
    assert resampled == ["T2"] and reference == mri_sequences["t1c"].geometry
    back = arrays[2]
    assert back.shape == t2.array.shape
    inside = (back != 0) & (t2.array != 0)
    assert inside.mean() > 0.4
    correlation = np.corrcoef(back[inside], t2.array[inside].astype(np.float32))[0, 1]
    assert correlation > 0.9, f"resampled T2 correlates {correlation:.3f} with the original"
    result = runner.run({**mri_sequences, "t2": moved})
    assert result.labels.geometry == mri_sequences["t1c"].geometry
    assert set(np.unique(result.labels.array).tolist()) <= {0, 1, 2, 4}
    assert any("T2" in note and "resampled" in note for note in result.notes)


def test_sequence_of_another_subject_is_refused(runner, mri_sequences) -> None:
    t2 = mri_sequences["t2"]
    elsewhere = Volume(array=t2.array, geometry=Geometry(
        spacing=t2.geometry.spacing, origin=tuple(np.add(t2.geometry.origin, (0.0, 0.0, 400.0))),
        direction=t2.geometry.direction, shape=t2.geometry.shape))
    with pytest.raises(ExpertInputError, match="do not cover the same part"):
        runner.run({**mri_sequences, "t2": elsewhere})
    huge = Volume(array=t2.array, geometry=Geometry(
        spacing=tuple(3 * s for s in t2.geometry.spacing), origin=t2.geometry.origin,
        direction=t2.geometry.direction, shape=t2.geometry.shape))
    with pytest.raises(ExpertInputError, match="times larger"):
        runner.run({**mri_sequences, "t2": huge})


def test_stand_in_bundle_layout(tiny_brats_bundle: Path) -> None:
    for name in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "docs/README.md"):
        assert (tiny_brats_bundle / name).is_file(), name
    metadata = json.loads((tiny_brats_bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["version"] == "0.5.2"
    assert metadata["vila_m3_stand_in"] == "tiny random weights for tests; not a medical model"
    channels = metadata["network_data_format"]["inputs"]["image"]["channel_def"]
    assert list(channels.values()) == ["T1c", "T1", "T2", "FLAIR"]
    network = MonaiBundle(tiny_brats_bundle).load_network("cpu")
    assert type(network).__name__ == "SegResNet"
    assert network.convInit.conv.in_channels == 4 and network.conv_final[-1].conv.out_channels == 3
