"""Teach the tiny BRATS stand-in bundle the tumour sub-regions of the synthetic phantom brain MRIs.

A random stand-in (:func:`vila_m3.standins.tiny_bundles.make_tiny_brats_bundle`) returns noise. For the
demo, its network is trained here on phantom MRIs of several seeds (the four sequences T1c, T1, T2,
FLAIR with their BRATS labels), so that a question about the sample MRI comes back with a labelmap
that outlines its tumour. Everything goes through the bundle as :class:`~vila_m3.experts.brats.BratsRunner`
uses it:

- the sequences, in the bundle's channel order, go through its own ``preprocessing`` transforms
  (intensity normalised over the non-zero voxels, per channel);
- the targets are the bundle's three sigmoid channels: tumour core (labels 1 and 4), whole tumour
  (1, 2 and 4) and enhancing tumour (4); cross-entropy, plus the Dice of the regions a crop holds,
  on crops of ``crop`` voxels, half of them centred in the tumour;
- the weights are saved back into ``models/model.pt``; ``configs/metadata.json`` and
  ``docs/README.md`` then say what the network learnt and from what;
- the result is measured through the runner on the phantom of a seed it was not trained on: the Dice
  of the three regions, as BraTS reports them.

The phantoms share one anatomy and one tumour and differ in their noise: what is learnt is these
phantoms, not brain MRI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.transforms import RandCropByPosNegLabeld
from torch.nn.functional import binary_cross_entropy_with_logits

from vila_m3.experts.bundle import MonaiBundle
from vila_m3.imaging import Geometry, Volume
from vila_m3.progress import progress
from vila_m3.training.stand_in_training import (
    TRAINING_RECORD,
    PhantomRecipe,
    StandInReport,
    dice,
    open_stand_in,
    preprocessed_pair,
    relabel_bundle,
    train_network,
)

__all__ = ["REGIONS", "TRAINING_RECORD", "BratsStandInRecipe", "phantom_mri", "region_targets", "train_brats_stand_in",
           "training_item"]

#: The bundle's output channels: region name -> the BRATS labels it covers (EXPERT_PROTOCOL.md §5).
REGIONS: dict[str, tuple[int, ...]] = {
    "tumor core": (1, 4),
    "whole tumor": (1, 2, 4),
    "enhancing tumor": (4,),
}


@dataclass(frozen=True)
class BratsStandInRecipe(PhantomRecipe):
    """How the BRATS stand-in is trained (``brats`` of ``configs/demo_experts.yaml``): the fields of
    :class:`~vila_m3.training.stand_in_training.PhantomRecipe` (one crop of one study per step), and

    Attributes:
        crop: the training crop, voxels along (x, y, z).
    """

    crop: tuple[int, int, int] = (64, 64, 64)

    expert = "BRATS"
    trained_on = "synthetic phantom brain MRIs"

    @classmethod
    def _checked(cls, values: dict[str, Any]) -> dict[str, Any]:
        if "crop" in values:
            crop = values["crop"]
            if (not isinstance(crop, (list, tuple)) or len(crop) != 3
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in crop)):
                raise ValueError(f"crop must be three voxel counts >= 16 (x, y, z); got {crop!r}")
            values["crop"] = tuple(crop)
        return values

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "crop": list(self.crop)}


def phantom_mri(seed: int) -> tuple[dict[str, Volume], Volume]:
    """The phantom brain MRI of ``seed`` (``{t1c, t1, t2, flair: Volume}``) and its BRATS labelmap, as the
    sample generator makes them."""
    from vila_m3.samples.generate import MRI_ID, study_rng
    from vila_m3.samples.mri_phantom import make_mri_phantom

    phantom = make_mri_phantom(study_rng(seed, MRI_ID))
    geometry = Geometry(spacing=phantom.spacing, origin=phantom.origin, direction=phantom.direction,
                        shape=tuple(int(n) for n in phantom.labels.shape[::-1]))
    sequences = {name: Volume(array=array, geometry=geometry, modality="MR")
                 for name, array in phantom.sequences.items()}
    return sequences, Volume(array=phantom.labels, geometry=geometry)


def training_item(bundle: MonaiBundle, sequences: Mapping[str, Volume], labels: Volume) -> dict[str, torch.Tensor]:
    """One study through the bundle's preprocessing (channels T1c, T1, T2, FLAIR), labels on its grid."""
    from vila_m3.experts.brats import SEQUENCES

    reference = sequences["t1c"].geometry
    arrays = [np.asarray(sequences[name].array, dtype=np.float32) for name in SEQUENCES]
    return preprocessed_pair(bundle, arrays, reference, np.asarray(labels.array))


def region_targets(label: torch.Tensor) -> torch.Tensor:
    """(1, X, Y, Z) BRATS labels -> (3, X, Y, Z) float region masks in the bundle's channel order."""
    return torch.cat([torch.isin(label, torch.as_tensor(ids)).float() for ids in REGIONS.values()])


def train_brats_stand_in(
    bundle_dir: str | Path,
    recipe: BratsStandInRecipe,
    log: Callable[[str], None] = print,
) -> StandInReport:
    """Train the BRATS stand-in bundle in ``bundle_dir`` in place and measure it on a held-out phantom.

    Args:
        bundle_dir: a BRATS stand-in bundle (its metadata carries ``vila_m3_stand_in``); real weights
            are refused.
        recipe: the training recipe.
        log: where progress lines go off a terminal (every 10 % or 30 s, and at the end; on a terminal
            a bar shows the progress) and the final summary.

    Returns:
        The report (``learned`` and ``dice`` keyed by channel: 0 tumour core, 1 whole tumour, 2 enhancing);
        it is also written to ``docs/training_record.json`` in the bundle.

    Raises:
        ValueError: the bundle holds real weights.
    """
    from vila_m3.experts.brats import BratsRunner

    started = time.perf_counter()
    bundle = open_stand_in(bundle_dir, "BRATS")
    items = [training_item(bundle, *phantom_mri(seed))
             for seed in progress(recipe.study_seeds, "Making the phantom brain MRIs the demo's BRATS learns from",
                                  "MRIs", log=log)]
    crop = RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=recipe.crop,
                                  pos=1.0, neg=1.0, num_samples=1, allow_smaller=True)
    crop.set_random_state(seed=recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    dice_loss = DiceLoss(sigmoid=True, reduction="none")

    def step_loss(network: torch.nn.Module) -> torch.Tensor:
        item = crop(items[int(rng.integers(len(items)))])[0]
        logits = network(item["image"].unsqueeze(0)).float()[0]
        target = region_targets(item["label"])
        # cross-entropy everywhere; Dice on the regions the crop holds (on an empty one it only adds noise)
        loss = binary_cross_entropy_with_logits(logits, target)
        present = target.flatten(1).amax(1) > 0
        if bool(present.any()):
            loss = loss + dice_loss(logits[present].unsqueeze(1), target[present].unsqueeze(1)).mean()
        return loss

    losses = train_network(bundle, recipe, step_loss, log)

    log(f"Measuring the trained BRATS on the held-out phantom brain MRI (seed {recipe.evaluation_seed})")
    sequences, truth = phantom_mri(recipe.evaluation_seed)
    runner = BratsRunner(bundle.root, device="cpu")
    predicted = np.asarray(runner.run(sequences).labels.array)
    runner.release()
    expected = np.asarray(truth.array)
    learned = dict(enumerate(REGIONS))
    scores = {channel: dice(np.isin(predicted, ids), np.isin(expected, ids))
              for channel, ids in enumerate(REGIONS.values())}
    _relabel(bundle.root, scores, recipe)

    report = StandInReport(learned=learned, losses=losses, dice=scores, seconds=time.perf_counter() - started,
                           recipe=recipe)
    report.write(bundle.root)
    log(report.summary())
    return report


def _relabel(root: Path, scores: Mapping[int, float], recipe: BratsStandInRecipe) -> None:
    """Metadata and README of the trained stand-in: what it learnt, how well on the held-out phantom."""
    measured = ", ".join(f"{name} {scores[channel]:.2f}" for channel, name in enumerate(REGIONS))
    relabel_bundle(
        root, "BRATS",
        note=(f"tiny BRATS trained on synthetic phantom brain MRIs by vila-m3's own pipeline (Dice on the sample "
              f"MRI: {measured}); not a medical model"),
        description="BRATS bundle (VILA-M3 demo stand-in: tiny network trained on synthetic phantoms)",
        data_source=f"synthetic phantom brain MRIs of vila-m3's sample generator, seeds {list(recipe.study_seeds)}",
        readme=("This folder has the on-disk layout of the MONAI model-zoo bundle `brats_mri_segmentation`. Its "
                f"tiny network was trained ({recipe.steps} steps) on synthetic phantom brain MRIs (seeds "
                f"{list(recipe.study_seeds)}) to segment the tumour core, the whole tumour and the enhancing "
                "tumour. `training_record.json` beside this file has the loss curve and the Dice on a phantom it "
                "never saw. Replace this folder with the real bundle to get real results: "
                "`vila-m3 models pull brats_mri_segmentation`."),
    )
