"""Teach the tiny VISTA3D stand-in bundle the structures of the synthetic phantom CTs.

A random stand-in (:func:`vila_m3.standins.tiny_bundles.make_tiny_vista3d_bundle`) returns noise. For
the demo, its network is trained here on phantom CTs of several seeds, with their ground truth, so
that a question about the sample CT comes back with a labelmap that outlines its organs and its
hepatic tumours (the recipe's ``class_weights`` give the small, low-contrast tumours more of the loss
than their size would). Everything goes through the bundle as the runner uses it:

- each CT goes through the bundle's own ``preprocessing`` transforms (4 mm spacing, foreground crop,
  intensity window, RAS); its labelmap is resampled onto the result (nearest neighbour) and both
  are padded to the inferer's window as the sliding-window inferer pads them;
- the network gets class prompts: every class of the phantoms it can learn, plus every class the
  phantoms do not have (they learn "absent": e.g. a pancreas, which no phantom has, comes back empty);
- the weights are saved back into ``models/model.pt``; ``configs/metadata.json`` and
  ``docs/README.md`` then say what the network learnt and from what;
- the result is measured through :class:`vila_m3.experts.vista3d.Vista3DRunner` on a phantom of a
  seed it was not trained on (Dice per class against the ground truth).

Classes with subclasses in the bundle (``bone`` = the individual vertebrae, ribs ...) are not learnt:
the phantom has one undivided "bone" label. Those subclass ids only learn that nothing of theirs lies
outside the phantom's bone; inside it they stay untrained, and the metadata says which classes were
learnt. The phantoms share one anatomy and differ in their noise: what is learnt is these phantoms,
not CT anatomy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.transforms import RandSpatialCropd, SpatialPadd
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

__all__ = ["TRAINING_RECORD", "Vista3DStandInRecipe", "Vista3DStandInReport", "phantom_ct",
           "train_vista3d_stand_in"]
#: Classes no phantom has, checked to come back empty: the ``pancreatic tumor`` group (pancreas, tumour).
_ABSENT_CHECK = {4: "pancreas", 24: "pancreatic tumor"}


@dataclass(frozen=True)
class Vista3DStandInRecipe(PhantomRecipe):
    """How the VISTA3D stand-in is trained (``vista3d`` of ``configs/demo_experts.yaml``): the fields of
    :class:`~vila_m3.training.stand_in_training.PhantomRecipe` (one CT and all its class prompts per step),
    and

    Attributes:
        class_weights: ``{class name: weight}`` for classes that need more of the loss than their size
            gives them (the small, low-contrast hepatic tumours): their voxels count that many times in
            the cross-entropy, and their Dice that many times among the classes'.
    """

    class_weights: Mapping[str, float] = field(default_factory=dict)

    expert = "VISTA3D"
    trained_on = "synthetic phantom CTs"

    @classmethod
    def _checked(cls, values: dict[str, Any]) -> dict[str, Any]:
        if "class_weights" in values:
            weights = values["class_weights"] or {}
            if not isinstance(weights, Mapping) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in weights.values()):
                raise ValueError("class_weights must map class names to weights > 0")
            values["class_weights"] = {str(k): float(v) for k, v in weights.items()}
            from vila_m3.samples.ct_phantom import LABEL_NAMES

            unknown = sorted(set(values["class_weights"]) - set(LABEL_NAMES.values()))
            if unknown:
                raise ValueError(f"class_weights names classes the phantoms do not have: {', '.join(unknown)} "
                                 f"(they have {', '.join(sorted(LABEL_NAMES.values()))})")
        return values

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "class_weights": dict(self.class_weights)}


@dataclass
class Vista3DStandInReport(StandInReport):
    """:class:`~vila_m3.training.stand_in_training.StandInReport`, and ``absent_voxels``: voxels the trained
    network gives classes no phantom has, on the held-out CT (0 when it learnt "absent")."""

    absent_voxels: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "heldout_absent_voxels": {str(k): v for k, v in self.absent_voxels.items()}}

    def absent_text(self) -> str:
        """``pancreas 475, pancreatic tumor 0``: voxels given to classes no phantom has, on the held-out CT."""
        return ", ".join(f"{_ABSENT_CHECK.get(i, f'class {i}')} {n}" for i, n in sorted(self.absent_voxels.items()))

    def summary(self) -> str:
        return f"{super().summary()}; voxels it gives classes no phantom has: {self.absent_text()}"


def phantom_ct(seed: int) -> tuple[Volume, Volume]:
    """The phantom CT of ``seed`` (HU) and its labelmap (VISTA3D ids), as the sample generator makes them."""
    from vila_m3.samples.ct_phantom import make_ct_phantom
    from vila_m3.samples.generate import CT_ID, study_rng

    phantom = make_ct_phantom(study_rng(seed, CT_ID))
    geometry = Geometry(spacing=phantom.spacing, origin=phantom.origin, direction=phantom.direction,
                        shape=tuple(int(n) for n in phantom.hu.shape[::-1]))
    return Volume(array=phantom.hu, geometry=geometry, modality="CT"), Volume(array=phantom.labels, geometry=geometry)


def _learnable(labels: Mapping[int, str], subclass: Mapping[str, Sequence[int]]) -> dict[int, str]:
    """The phantom classes the network can learn as they are: not a class the bundle splits into subclasses."""
    return {i: name for i, name in sorted(labels.items()) if str(i) not in subclass}


def _unlabelled_subclasses(labels: Mapping[int, str], subclass: Mapping[str, Sequence[int]],
                           unsupported: frozenset[int]) -> dict[int, int]:
    """Subclass id -> the phantom class that holds it undivided (a vertebra -> the phantom's "bone")."""
    return {int(v): i for i in labels for v in subclass.get(str(i), ()) if int(v) not in unsupported}


def _absent_ids(labels: Mapping[int, str], subclass: Mapping[str, Sequence[int]], last_supported: int,
                unsupported: frozenset[int]) -> list[int]:
    """Class ids to teach as absent: prompt-able ids the phantoms do not have (neither as a class nor
    inside one), and not a class the bundle splits into subclasses (those are prompted as their parts)."""
    inside = _unlabelled_subclasses(labels, subclass, unsupported)
    return [i for i in range(1, last_supported + 1)
            if i not in labels and i not in inside and i not in unsupported and str(i) not in subclass]


def _training_item(bundle: MonaiBundle, ct: Volume, labels: Volume, roi: Sequence[int]) -> dict[str, torch.Tensor]:
    """One CT through the bundle's preprocessing, its labels on the same grid, both padded to ``roi``."""
    pair = preprocessed_pair(bundle, [np.asarray(ct.array)], ct.geometry, np.asarray(labels.array),
                             extra={"label_prompt": [1]})
    return SpatialPadd(keys=("image", "label"), spatial_size=roi, mode="constant")(pair)


def train_vista3d_stand_in(
    bundle_dir: str | Path,
    recipe: Vista3DStandInRecipe,
    log: Callable[[str], None] = print,
    note: str | None = None,
) -> Vista3DStandInReport:
    """Train the VISTA3D stand-in bundle in ``bundle_dir`` in place and measure it on a held-out phantom.

    Args:
        bundle_dir: a VISTA3D stand-in bundle (its metadata carries ``vila_m3_stand_in``); real weights
            are refused.
        recipe: the training recipe.
        log: where progress lines go off a terminal (every 10 % or 30 s, and at the end; on a terminal
            a bar shows the progress) and the final summary.
        note: the new ``vila_m3_stand_in`` text (what every result of the bundle says it is).

    Returns:
        The report; it is also written to ``docs/training_record.json`` in the bundle.

    Raises:
        ValueError: the bundle holds real weights.
    """
    from vila_m3.experts.vista3d import UNSUPPORTED_LABEL_IDS, Vista3DRunner
    from vila_m3.samples.ct_phantom import LABEL_NAMES

    started = time.perf_counter()
    bundle = open_stand_in(bundle_dir, "VISTA3D")
    subclass = {str(k): [int(v) for v in vs] for k, vs in (bundle.get("subclass") or {}).items()}
    last_supported = int(bundle.raw("network_def#point_head").get("last_supported", 132))
    learned = _learnable(LABEL_NAMES, subclass)
    absent = _absent_ids(LABEL_NAMES, subclass, last_supported, UNSUPPORTED_LABEL_IDS)
    inside = _unlabelled_subclasses(LABEL_NAMES, subclass, UNSUPPORTED_LABEL_IDS)
    ids = [*learned, *absent, *inside]
    prompts = torch.as_tensor(ids).reshape(-1, 1)
    class_weight = torch.as_tensor([recipe.class_weights.get(learned.get(i, ""), 1.0) for i in ids])
    roi = [int(v) for v in bundle.get("patch_size") or bundle.get("inferer#roi_size")]

    items = [_training_item(bundle, *phantom_ct(seed), roi)
             for seed in progress(recipe.study_seeds, "Making the phantom CTs the demo's VISTA3D learns from", "CTs",
                                  log=log)]
    crop = RandSpatialCropd(keys=("image", "label"), roi_size=roi, random_size=False)
    rng = np.random.default_rng(recipe.seed)
    crop.set_random_state(seed=recipe.seed)

    dice_loss = DiceLoss(sigmoid=True, reduction="none")
    is_learned = torch.as_tensor([i in learned for i in ids])

    def step_loss(network: torch.nn.Module) -> torch.Tensor:
        item = crop(items[int(rng.integers(len(items)))])
        label = item["label"]
        target = torch.stack([(label == i).float() for i in ids])  # (B, 1, X, Y, Z)
        # a subclass (a vertebra) is taught only where its undivided phantom class (bone) is not
        weight = torch.stack([(label != inside[i]).float() if i in inside else torch.ones_like(target[0])
                              for i in ids])
        # a weighted class's own voxels count class_weight times
        weight = weight * (1.0 + (class_weight - 1.0).reshape(-1, 1, 1, 1, 1) * target)
        logits = network(item["image"].unsqueeze(0), class_vector=prompts).float()
        # cross-entropy on every prompt (absent ones learn "nothing here"); Dice on the learnt ones,
        # where it balances a small tumour against a large liver (a weighted mean over the classes)
        present = is_learned & (target.flatten(1).amax(1) > 0)
        loss = binary_cross_entropy_with_logits(logits, target, weight=weight)
        if bool(present.any()):
            per_class = dice_loss(logits[present], target[present]).flatten()
            loss = loss + (per_class * class_weight[present]).sum() / class_weight[present].sum()
        return loss

    losses = train_network(bundle, recipe, step_loss, log)

    log(f"Measuring the trained VISTA3D on the held-out phantom CT (seed {recipe.evaluation_seed})")
    ct, truth = phantom_ct(recipe.evaluation_seed)
    runner = Vista3DRunner(bundle.root, device="cpu")
    result = runner.run(ct, list(learned))
    predicted = np.asarray(result.labels.array)
    scores = {i: dice(predicted == i, np.asarray(truth.array) == i) for i in learned}
    empty = runner.run(ct, list(_ABSENT_CHECK)).labels.array
    absent_voxels = {i: int(np.count_nonzero(empty == i)) for i in _ABSENT_CHECK}
    runner.release()
    _relabel(bundle.root, learned, scores, recipe, note)

    report = Vista3DStandInReport(learned=learned, losses=losses, dice=scores, absent_voxels=absent_voxels,
                                  seconds=time.perf_counter() - started, recipe=recipe)
    report.write(bundle.root)
    log(report.summary())
    return report


def _relabel(root: Path, learned: Mapping[int, str], scores: Mapping[int, float], recipe: Vista3DStandInRecipe,
             note: str | None) -> None:
    """Metadata and README of a trained stand-in: what it was trained for, how well that went on the
    held-out phantom (every result of the bundle shows this note), and that it is no medical model."""
    names = ", ".join(learned.values())
    measured = ", ".join(f"{name} {scores[i]:.2f}" for i, name in learned.items())
    note = note or (f"tiny VISTA3D trained on synthetic phantom CTs by vila-m3's own pipeline (Dice on the sample "
                    f"CT: {measured}; other classes untrained); not a medical model")
    relabel_bundle(
        root, "VISTA3D", note,
        description="VISTA3D bundle (VILA-M3 demo stand-in: tiny network trained on synthetic phantoms)",
        data_source=f"synthetic phantom CTs of vila-m3's sample generator, seeds {list(recipe.study_seeds)}",
        readme=("This folder has the on-disk layout of the MONAI model-zoo bundle `vista3d`. Its tiny network was "
                f"trained ({recipe.steps} steps) on synthetic phantom CTs (seeds {list(recipe.study_seeds)}) to "
                f"segment {names}, and to return nothing for classes the phantoms do not have. "
                "`training_record.json` beside this file has the loss curve and the Dice on a phantom it never "
                "saw. Replace this folder with the real bundle to get real results: `vila-m3 models pull vista3d`."),
    )
