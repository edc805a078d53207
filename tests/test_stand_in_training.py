"""What every phantom-trained stand-in shares (:mod:`vila_m3.training.stand_in_training`): real weights are
never trained over, whichever the expert."""

from __future__ import annotations

import json

import pytest

from vila_m3.experts.bundle import METADATA_CONFIG, STAND_IN_FIELD
from vila_m3.standins.tiny_bundles import make_tiny_brats_bundle, make_tiny_vista3d_bundle
from vila_m3.training.brats_stand_in import BratsStandInRecipe, train_brats_stand_in
from vila_m3.training.vista3d_stand_in import Vista3DStandInRecipe, train_vista3d_stand_in


@pytest.mark.parametrize(("expert", "make_bundle", "train", "recipe"), [
    ("VISTA3D", make_tiny_vista3d_bundle, train_vista3d_stand_in, Vista3DStandInRecipe(study_seeds=(1,), steps=1)),
    ("BRATS", make_tiny_brats_bundle, train_brats_stand_in, BratsStandInRecipe(study_seeds=(1,), steps=1)),
])
def test_real_weights_are_refused_and_left_alone(tmp_path, expert, make_bundle, train, recipe):
    bundle = make_bundle(tmp_path / expert)
    path = bundle / METADATA_CONFIG
    metadata = json.loads(path.read_text(encoding="utf-8"))
    del metadata[STAND_IN_FIELD]
    path.write_text(json.dumps(metadata), encoding="utf-8")
    weights = (bundle / "models" / "model.pt").read_bytes()
    with pytest.raises(ValueError, match=f"holds real {expert} weights"):
        train(bundle, recipe, log=lambda text: None)
    assert (bundle / "models" / "model.pt").read_bytes() == weights
    assert path.read_text(encoding="utf-8") == json.dumps(metadata)
