"""Training the demo's VISTA3D stand-in on phantom CTs (:mod:`vila_m3.training.vista3d_stand_in`): the
loss falls, the bundle then says what it learnt, and real weights are never touched."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from vila_m3.experts.bundle import METADATA_CONFIG, STAND_IN_FIELD
from vila_m3.standins.tiny_bundles import make_tiny_vista3d_bundle
from vila_m3.training.vista3d_stand_in import (
    TRAINING_RECORD,
    Vista3DStandInRecipe,
    phantom_ct,
    train_vista3d_stand_in,
)


def test_training_lowers_the_loss_and_relabels_the_bundle(tmp_path):
    bundle = make_tiny_vista3d_bundle(tmp_path / "vista3d")
    before = (bundle / "models" / "model.pt").read_bytes()
    recipe = Vista3DStandInRecipe(study_seeds=(1,), steps=12)
    lines: list[str] = []
    report = train_vista3d_stand_in(bundle, recipe, log=lines.append)

    assert len(report.losses) == 12 and all(np.isfinite(report.losses))
    assert np.mean(report.losses[-4:]) < np.mean(report.losses[:4])
    assert (bundle / "models" / "model.pt").read_bytes() != before
    assert set(report.dice) == set(report.learned) == {1, 3, 5, 14, 26}
    assert all(0.0 <= value <= 1.0 for value in report.dice.values())
    assert "Dice on the held-out phantom (seed 0)" in lines[-1]
    # off a terminal, progress is plain lines naming the step, with the time and the loss
    assert "Training the demo's VISTA3D on synthetic phantom CTs: 12 steps to go" in lines
    done = [line for line in lines if line.startswith("Training the demo's VISTA3D on synthetic phantom CTs: 12/12 steps")]
    assert len(done) == 1 and " elapsed, done, loss " in done[0]
    assert any(re.fullmatch(r"Training the demo's VISTA3D on synthetic phantom CTs: \d+/12 steps, .+ elapsed, "
                            r"~.+ left, loss \d+\.\d{4}", line) for line in lines)
    # what it gives classes no phantom has is measured and said, not assumed to be nothing
    assert set(report.absent_voxels) == {4, 24}
    assert (f"classes no phantom has: pancreas {report.absent_voxels[4]}, "
            f"pancreatic tumor {report.absent_voxels[24]}") in lines[-1]

    metadata = json.loads((bundle / METADATA_CONFIG).read_text(encoding="utf-8"))
    assert "trained on synthetic phantom CTs" in metadata[STAND_IN_FIELD]
    assert f"hepatic tumor {report.dice[26]:.2f}" in metadata[STAND_IN_FIELD]  # every result shows the Dice
    assert "not a medical model" in metadata[STAND_IN_FIELD]
    record = json.loads((bundle / TRAINING_RECORD).read_text(encoding="utf-8"))
    assert record["recipe"]["steps"] == 12 and len(record["losses"]) == 12
    assert "Not a medical model" in (bundle / "docs" / "README.md").read_text(encoding="utf-8")


def test_a_class_weight_gives_its_class_more_of_the_loss(tmp_path):
    """The same first step (same network, CT and prompts) costs more when the tumour's voxels count eight
    times in the cross-entropy, and its Dice eight times among the classes'."""
    first = {}
    for name, weights in (("plain", {}), ("weighted", {"hepatic tumor": 8.0})):
        bundle = make_tiny_vista3d_bundle(tmp_path / name)
        recipe = Vista3DStandInRecipe.from_config({"study_seeds": [1], "steps": 1, "class_weights": weights})
        first[name] = train_vista3d_stand_in(bundle, recipe, log=lambda text: None).losses[0]
        record = json.loads((bundle / TRAINING_RECORD).read_text(encoding="utf-8"))
        assert record["recipe"]["class_weights"] == weights
    assert first["weighted"] > first["plain"]


def test_training_gives_the_same_network_whatever_the_thread_count(tmp_path):
    """Training runs on one thread, so a machine's core count does not change what is learnt; the
    caller's thread setting is restored."""
    import torch

    threads = torch.get_num_threads()
    weights = []
    try:
        for count in (2, 1):
            torch.set_num_threads(count)
            bundle = make_tiny_vista3d_bundle(tmp_path / f"threads{count}")
            train_vista3d_stand_in(bundle, Vista3DStandInRecipe(study_seeds=(1,), steps=3), log=lambda text: None)
            assert torch.get_num_threads() == count
            weights.append(torch.load(bundle / "models" / "model.pt", weights_only=True))
    finally:
        torch.set_num_threads(threads)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


@pytest.mark.parametrize(("config", "problem"), [
    ({"study_seeds": [0, 1]}, "evaluation phantom"),
    ({"steps": 0}, "steps >= 1"),
    ({"epochs": 3}, "unknown VISTA3D stand-in training keys: epochs"),
    ({"class_weights": {"pancreas": 2}}, "class_weights names classes the phantoms do not have: pancreas"),
    ({"class_weights": {"hepatic tumor": 0}}, "weights > 0"),
    ({"class_weights": ["hepatic tumor"]}, "class_weights must map"),
])
def test_a_bad_recipe_is_named(config, problem):
    with pytest.raises(ValueError, match=problem):
        Vista3DStandInRecipe.from_config(config)


def test_the_evaluation_phantom_is_the_shipped_sample_ct(sample_data):
    from vila_m3.imaging.io import read_volume

    ct, labels = phantom_ct(0)
    sample = read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")
    assert ct.geometry.allclose(sample.geometry, atol=1e-4) and np.array_equal(ct.array, sample.array)
    assert labels.geometry == ct.geometry and set(np.unique(labels.array)) == {0, 1, 3, 5, 14, 21, 26}
