"""Teach the tiny VISTA3D stand-in bundle the structures of the synthetic phantom CTs.

A random stand-in (:func:`vila_m3.models.tiny_bundles.make_tiny_vista3d_bundle`) returns noise. For
the demo, its network is trained here on phantom CTs of several seeds, with their ground truth, so
that a question about the sample CT comes back with a labelmap that outlines its organs (with the
recipe of ``configs/demo_experts.yaml``: liver, spleen and kidneys; the small, low-contrast hepatic
tumours are prompted but not learnt yet). Everything goes through the bundle as the runner uses it:

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

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.transforms import Compose, RandSpatialCropd, ResampleToMatch, SpatialPadd
from torch.nn.functional import binary_cross_entropy_with_logits

from vila_m3.experts.bundle import METADATA_CONFIG, STAND_IN_FIELD, MonaiBundle, image_from_arrays
from vila_m3.imaging import Geometry, Volume

__all__ = ["TRAINING_RECORD", "Vista3DStandInRecipe", "Vista3DStandInReport", "phantom_ct",
           "train_vista3d_stand_in"]

#: Written into the bundle's ``docs/`` folder: the recipe, the loss curve and the held-out Dice.
TRAINING_RECORD = "docs/training_record.json"
#: Classes no phantom has, checked to come back empty: the ``pancreatic tumor`` group (pancreas, tumour).
_ABSENT_CHECK = (4, 24)


@dataclass(frozen=True)
class Vista3DStandInRecipe:
    """How the stand-in is trained (``vista3d`` of ``configs/demo_experts.yaml``).

    Attributes:
        study_seeds: phantom seeds of the training CTs.
        evaluation_seed: phantom seed of the CT the result is measured on (0: the shipped sample CT).
        steps: optimizer steps (one CT and all its class prompts per step).
        learning_rate: AdamW learning rate (cosine decay to 0).
        seed: seed of the draws (CT order, crops).
    """

    study_seeds: tuple[int, ...] = (1, 2, 3, 4)
    evaluation_seed: int = 0
    steps: int = 200
    learning_rate: float = 1e-2
    seed: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Vista3DStandInRecipe:
        """From a mapping of the attribute names (unknown keys are an error naming them)."""
        unknown = sorted(set(config) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown VISTA3D stand-in training keys: {', '.join(unknown)}")
        values = dict(config)
        if "study_seeds" in values:
            values["study_seeds"] = tuple(int(s) for s in values["study_seeds"])
        recipe = cls(**values)
        if not recipe.study_seeds or recipe.steps < 1 or recipe.learning_rate <= 0:
            raise ValueError("VISTA3D stand-in training needs study_seeds, steps >= 1 and learning_rate > 0")
        if recipe.evaluation_seed in recipe.study_seeds:
            raise ValueError(f"the evaluation phantom (seed {recipe.evaluation_seed}) must not be a training one")
        return recipe


@dataclass
class Vista3DStandInReport:
    """What training did: the classes learnt, the loss per step and the held-out Dice per class."""

    learned: dict[int, str]
    losses: list[float]
    dice: dict[int, float]
    absent_voxels: dict[int, int]
    seconds: float
    recipe: Vista3DStandInRecipe
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (ids as strings)."""
        return {
            "learned": {str(k): v for k, v in self.learned.items()},
            "heldout_dice": {str(k): round(v, 4) for k, v in self.dice.items()},
            "heldout_absent_voxels": {str(k): v for k, v in self.absent_voxels.items()},
            "loss_first": round(float(np.mean(self.losses[:10])), 4),
            "loss_last": round(float(np.mean(self.losses[-10:])), 4),
            "losses": [round(v, 4) for v in self.losses],
            "seconds": round(self.seconds, 1),
            "recipe": {**self.recipe.__dict__, "study_seeds": list(self.recipe.study_seeds)},
        }

    def summary(self) -> str:
        """One line per learnt class with its held-out Dice."""
        dice = ", ".join(f"{self.learned[i]} {self.dice.get(i, float('nan')):.2f}" for i in sorted(self.learned))
        return (f"VISTA3D stand-in: {len(self.losses)} steps in {self.seconds:.0f} s, loss "
                f"{self.as_dict()['loss_first']} -> {self.as_dict()['loss_last']}; Dice on the held-out phantom "
                f"(seed {self.recipe.evaluation_seed}): {dice}")


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
    preprocessing = Compose(bundle.transforms("preprocessing"))
    data = preprocessing({"image": image_from_arrays([ct.array], ct.geometry), "label_prompt": [1]})
    image = data["image"]
    label = image_from_arrays([labels.array], labels.geometry).unsqueeze(0)
    label = ResampleToMatch(mode="nearest", padding_mode="zeros")(label, img_dst=image)
    return SpatialPadd(keys=("image", "label"), spatial_size=roi, mode="constant")(
        {"image": image.as_tensor().float(), "label": label.as_tensor().round().long()})


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
        log: where progress lines go (every 25 steps and at the end).
        note: the new ``vila_m3_stand_in`` text (what every result of the bundle says it is).

    Returns:
        The report; it is also written to ``docs/training_record.json`` in the bundle.

    Raises:
        ValueError: the bundle holds real weights.
    """
    from vila_m3.experts.vista3d import UNSUPPORTED_LABEL_IDS, Vista3DRunner
    from vila_m3.samples.ct_phantom import LABEL_NAMES

    started = time.perf_counter()
    bundle = MonaiBundle(bundle_dir)
    if not bundle.info.is_stand_in:
        raise ValueError(f"{bundle.root} holds real VISTA3D weights; only a stand-in is trained here")
    subclass = {str(k): [int(v) for v in vs] for k, vs in (bundle.get("subclass") or {}).items()}
    last_supported = int(bundle.raw("network_def#point_head").get("last_supported", 132))
    learned = _learnable(LABEL_NAMES, subclass)
    absent = _absent_ids(LABEL_NAMES, subclass, last_supported, UNSUPPORTED_LABEL_IDS)
    inside = _unlabelled_subclasses(LABEL_NAMES, subclass, UNSUPPORTED_LABEL_IDS)
    ids = [*learned, *absent, *inside]
    prompts = torch.as_tensor(ids).reshape(-1, 1)
    roi = [int(v) for v in bundle.get("patch_size") or bundle.get("inferer#roi_size")]

    items = [_training_item(bundle, *phantom_ct(seed), roi) for seed in recipe.study_seeds]
    crop = RandSpatialCropd(keys=("image", "label"), roi_size=roi, random_size=False)
    rng = np.random.default_rng(recipe.seed)
    crop.set_random_state(seed=recipe.seed)

    network = bundle.load_network(device="cpu").train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.steps)
    dice_loss = DiceLoss(sigmoid=True)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        for step in range(1, recipe.steps + 1):
            item = crop(items[int(rng.integers(len(items)))])
            label = item["label"]
            target = torch.stack([(label == i).float() for i in ids])  # (B, 1, X, Y, Z)
            # a subclass (a vertebra) is taught only where its undivided phantom class (bone) is not
            weight = torch.stack([(label != inside[i]).float() if i in inside else torch.ones_like(target[0])
                                  for i in ids])
            logits = network(item["image"].unsqueeze(0), class_vector=prompts).float()
            # cross-entropy on every prompt (absent ones learn "nothing here"); Dice on the learnt ones,
            # where it balances a small tumour against a large liver
            present = torch.as_tensor([i in learned for i in ids]) & (target.flatten(1).amax(1) > 0)
            loss = binary_cross_entropy_with_logits(logits, target, weight=weight)
            if bool(present.any()):
                loss = loss + dice_loss(logits[present], target[present])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if step % 25 == 0 or step == recipe.steps:
                log(f"VISTA3D stand-in step {step}/{recipe.steps}: loss {np.mean(losses[-25:]):.4f}")

    model_path = bundle.root / "models" / "model.pt"
    torch.save({k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}, model_path)

    ct, truth = phantom_ct(recipe.evaluation_seed)
    runner = Vista3DRunner(bundle.root, device="cpu")
    result = runner.run(ct, list(learned))
    predicted = np.asarray(result.labels.array)
    dice = {i: _dice(predicted == i, np.asarray(truth.array) == i) for i in learned}
    empty = runner.run(ct, list(_ABSENT_CHECK)).labels.array
    absent_voxels = {i: int(np.count_nonzero(empty == i)) for i in _ABSENT_CHECK}
    runner.release()
    _relabel(bundle.root, learned, dice, recipe, note)

    report = Vista3DStandInReport(learned=learned, losses=losses, dice=dice, absent_voxels=absent_voxels,
                                  seconds=time.perf_counter() - started, recipe=recipe)
    (bundle.root / TRAINING_RECORD).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    log(report.summary())
    return report


def _dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(predicted, truth).sum()) / total


def _relabel(root: Path, learned: Mapping[int, str], dice: Mapping[int, float], recipe: Vista3DStandInRecipe,
             note: str | None) -> None:
    """Metadata and README of a trained stand-in: what it was trained for, how well that went on the
    held-out phantom (every result of the bundle shows this note), and that it is no medical model."""
    names = ", ".join(learned.values())
    scores = ", ".join(f"{name} {dice[i]:.2f}" for i, name in learned.items())
    note = note or (f"tiny VISTA3D trained on synthetic phantom CTs by vila-m3's own pipeline (Dice on the sample "
                    f"CT: {scores}; other classes untrained); not a medical model")
    path = root / METADATA_CONFIG
    metadata = json.loads(path.read_text(encoding="utf-8"))
    metadata[STAND_IN_FIELD] = note
    metadata["description"] = "VISTA3D bundle (VILA-M3 demo stand-in: tiny network trained on synthetic phantoms)"
    metadata["data_source"] = f"synthetic phantom CTs of vila-m3's sample generator, seeds {list(recipe.study_seeds)}"
    path.write_text(json.dumps(metadata, indent=4) + "\n", encoding="utf-8")
    readme = root / "docs" / "README.md"
    readme.write_text(
        "# VISTA3D — VILA-M3 demo stand-in bundle\n\n"
        f"**Not a medical model.** The {note}.\n\n"
        "This folder has the on-disk layout of the MONAI model-zoo bundle `vista3d`. Its tiny network was "
        f"trained ({recipe.steps} steps) on synthetic phantom CTs (seeds {list(recipe.study_seeds)}) to segment "
        f"{names}, and to return nothing for classes the phantoms do not have. `training_record.json` beside "
        "this file has the loss curve and the Dice on a phantom it never saw. Replace this folder with the real "
        "bundle to get real results: `vila-m3 models pull vista3d`.\n",
        encoding="utf-8",
    )
