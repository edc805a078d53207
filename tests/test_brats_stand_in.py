"""Training the demo's BRATS stand-in on phantom brain MRIs (:mod:`vila_m3.training.brats_stand_in`): the
loss falls, the bundle then says what it learnt and how well, and real weights are never touched."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vila_m3.experts.bundle import METADATA_CONFIG, STAND_IN_FIELD, MonaiBundle
from vila_m3.standins.tiny_bundles import make_tiny_brats_bundle
from vila_m3.training.brats_stand_in import (
    REGIONS,
    TRAINING_RECORD,
    BratsStandInRecipe,
    phantom_mri,
    region_targets,
    train_brats_stand_in,
    training_item,
)


def _loss_on_the_tumour(bundle_dir) -> float:
    """The training loss (cross-entropy + Dice of the regions) of the bundle's network on a 48-voxel cube
    centred on phantom 1's tumour: one fixed input, so the number compares networks, not crops."""
    import torch
    from monai.losses import DiceLoss
    from torch.nn.functional import binary_cross_entropy_with_logits

    bundle = MonaiBundle(bundle_dir)
    item = training_item(bundle, *phantom_mri(1))
    centre = [int(v) for v in torch.nonzero(item["label"][0] > 0).float().mean(0)]
    window = tuple(slice(max(0, c - 24), max(0, c - 24) + 48) for c in centre)
    image, target = item["image"][(slice(None), *window)], region_targets(item["label"])[(slice(None), *window)]
    with torch.no_grad():
        logits = bundle.load_network(device="cpu").eval()(image.unsqueeze(0)).float()[0]
    dice = DiceLoss(sigmoid=True)(logits.unsqueeze(1), target.unsqueeze(1))
    return float(binary_cross_entropy_with_logits(logits, target) + dice)


def test_training_lowers_the_loss_and_relabels_the_bundle(tmp_path):
    bundle = make_tiny_brats_bundle(tmp_path / "brats")
    before = (bundle / "models" / "model.pt").read_bytes()
    untrained = _loss_on_the_tumour(bundle)
    recipe = BratsStandInRecipe(study_seeds=(1,), steps=12, learning_rate=3e-3, crop=(48, 48, 48))
    lines: list[str] = []
    report = train_brats_stand_in(bundle, recipe, log=lines.append)

    assert len(report.losses) == 12 and all(np.isfinite(report.losses))
    assert _loss_on_the_tumour(bundle) < untrained
    assert (bundle / "models" / "model.pt").read_bytes() != before
    assert list(report.learned.values()) == ["tumor core", "whole tumor", "enhancing tumor"]
    assert set(report.dice) == {0, 1, 2} and all(0.0 <= v <= 1.0 for v in report.dice.values())
    assert "Dice on the held-out phantom (seed 0)" in lines[-1]
    assert "Training the demo's BRATS on synthetic phantom brain MRIs: 12 steps to go" in lines
    assert any(line.startswith("Training the demo's BRATS on synthetic phantom brain MRIs: 12/12 steps, ")
               and " elapsed, done, loss " in line for line in lines)

    metadata = json.loads((bundle / METADATA_CONFIG).read_text(encoding="utf-8"))
    note = metadata[STAND_IN_FIELD]
    assert "trained on synthetic phantom brain MRIs" in note and "not a medical model" in note
    assert f"whole tumor {report.dice[1]:.2f}" in note  # every result shows the Dice
    record = json.loads((bundle / TRAINING_RECORD).read_text(encoding="utf-8"))
    assert record["recipe"]["steps"] == 12 and record["recipe"]["crop"] == [48, 48, 48]
    assert len(record["losses"]) == 12
    assert "Not a medical model" in (bundle / "docs" / "README.md").read_text(encoding="utf-8")


def test_targets_are_the_bundles_three_regions():
    """Channel 0 tumour core (1, 4), 1 whole tumour (1, 2, 4), 2 enhancing (4): the runner's reading."""
    import torch

    label = torch.as_tensor([0, 1, 2, 4]).reshape(1, 4, 1, 1)
    assert region_targets(label)[:, :, 0, 0].tolist() == [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    assert list(REGIONS) == ["tumor core", "whole tumor", "enhancing tumor"]


@pytest.mark.parametrize(("config", "problem"), [
    ({"study_seeds": [0, 1]}, "evaluation phantom"),
    ({"steps": 0}, "steps >= 1"),
    ({"epochs": 3}, "unknown BRATS stand-in training keys: epochs"),
    ({"crop": [64, 64]}, "crop must be three voxel counts"),
    ({"crop": [8, 64, 64]}, "crop must be three voxel counts >= 16"),
])
def test_a_bad_recipe_is_named(config, problem):
    with pytest.raises(ValueError, match=problem):
        BratsStandInRecipe.from_config(config)


def test_the_evaluation_phantom_is_the_shipped_sample_mri(sample_data):
    from vila_m3.imaging.io import read_volume

    sequences, labels = phantom_mri(0)
    for name, volume in sequences.items():
        sample = read_volume(sample_data / "studies" / f"brain_mri_{name}.nii.gz")
        assert np.array_equal(np.asarray(sample.array), np.asarray(volume.array))
        assert sample.geometry.allclose(volume.geometry, atol=1e-4)
    truth = read_volume(sample_data / "ground_truth" / "brain_mri.nii.gz")
    assert np.array_equal(np.asarray(truth.array), np.asarray(labels.array))
