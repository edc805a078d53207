"""What training an expert stand-in bundle on synthetic phantoms needs, whichever the expert.

The demo's expert stand-ins (``configs/demo_experts.yaml``) are tiny networks in their real bundles'
on-disk format, trained on the sample generator's phantoms of several seeds and measured on the seed
the shipped sample study has, which they never saw. The pieces here are shared by
:mod:`vila_m3.training.vista3d_stand_in` and :mod:`vila_m3.training.brats_stand_in`: the recipe's common
fields, the report, a study and its labels through the bundle's own preprocessing, the Dice, and the
bundle's relabelling (its metadata and README then say what it learnt and how well).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, ResampleToMatch

from vila_m3.experts.bundle import METADATA_CONFIG, STAND_IN_FIELD, MonaiBundle, image_from_arrays
from vila_m3.imaging import Geometry
from vila_m3.progress import progress
from vila_m3.training.reproducible import fixed_cpu_threads

__all__ = ["TRAINING_RECORD", "TRAINING_REVISION", "PhantomRecipe", "StandInReport", "dice", "open_stand_in",
           "preprocessed_pair", "relabel_bundle", "train_network"]

#: Written into the bundle's ``docs/`` folder: the recipe, the loss curve and the held-out Dice.
TRAINING_RECORD = "docs/training_record.json"

#: Revision of the training code, part of a demo build's fingerprint: raise it when a change here or in
#: a trainer changes what an unchanged recipe learns (2: training pinned to one CPU thread).
TRAINING_REVISION = 2


@dataclass(frozen=True)
class PhantomRecipe:
    """How a stand-in is trained (one expert's section of ``configs/demo_experts.yaml``).

    Attributes:
        study_seeds: phantom seeds of the training studies.
        evaluation_seed: phantom seed of the study the result is measured on (0: the shipped sample).
        steps: optimizer steps (one study per step).
        learning_rate: AdamW learning rate (cosine decay to 0).
        seed: seed of the draws (study order, crops).
    """

    study_seeds: tuple[int, ...] = (1, 2, 3, 4)
    evaluation_seed: int = 0
    steps: int = 200
    learning_rate: float = 1e-2
    seed: int = 0

    #: The expert's name in messages.
    expert = "stand-in"
    #: What it is trained on, in progress messages ("Training the demo's <expert> on <trained_on>").
    trained_on = "synthetic phantoms"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]):
        """From a mapping of the attribute names (unknown keys and bad values are errors naming them)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"unknown {cls.expert} stand-in training keys: {', '.join(unknown)}")
        values = cls._checked(dict(config))
        if "study_seeds" in values:
            values["study_seeds"] = tuple(int(s) for s in values["study_seeds"])
        recipe = cls(**values)
        if not recipe.study_seeds or recipe.steps < 1 or recipe.learning_rate <= 0:
            raise ValueError(f"{cls.expert} stand-in training needs study_seeds, steps >= 1 and learning_rate > 0")
        if recipe.evaluation_seed in recipe.study_seeds:
            raise ValueError(f"the evaluation phantom (seed {recipe.evaluation_seed}) must not be a training one")
        return recipe

    @classmethod
    def _checked(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The expert's own fields checked and normalised (a ValueError naming the problem otherwise)."""
        return values

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**self.__dict__, "study_seeds": list(self.study_seeds)}

    @property
    def description(self) -> str:
        """The training in words, for progress: ``Training the demo's VISTA3D on synthetic phantom CTs``."""
        return f"Training the demo's {self.expert} on {self.trained_on}"


@dataclass
class StandInReport:
    """What training did: the classes learnt, the loss per step and the held-out Dice per class."""

    learned: dict[int, str]
    losses: list[float]
    dice: dict[int, float]
    seconds: float
    recipe: PhantomRecipe

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (ids as strings)."""
        return {
            "learned": {str(k): v for k, v in self.learned.items()},
            "heldout_dice": {str(k): round(v, 4) for k, v in self.dice.items()},
            "loss_first": round(float(np.mean(self.losses[:10])), 4),
            "loss_last": round(float(np.mean(self.losses[-10:])), 4),
            "losses": [round(v, 4) for v in self.losses],
            "seconds": round(self.seconds, 1),
            "recipe": self.recipe.as_dict(),
        }

    def dice_text(self) -> str:
        """``liver 0.94, spleen 0.91, ...`` in class order."""
        return ", ".join(f"{self.learned[i]} {self.dice.get(i, float('nan')):.2f}" for i in sorted(self.learned))

    def summary(self) -> str:
        """One line: steps, time, loss and the held-out Dice of every learnt class."""
        record = self.as_dict()
        return (f"{self.recipe.expert} stand-in: {len(self.losses)} steps in {self.seconds:.0f} s, loss "
                f"{record['loss_first']} -> {record['loss_last']}; Dice on the held-out phantom "
                f"(seed {self.recipe.evaluation_seed}): {self.dice_text()}")

    def write(self, bundle_root: Path) -> None:
        """The record into the bundle's ``docs/training_record.json``."""
        (bundle_root / TRAINING_RECORD).write_text(json.dumps(self.as_dict(), indent=2) + "\n", encoding="utf-8")


def open_stand_in(bundle_dir: str | Path, expert: str) -> MonaiBundle:
    """The stand-in bundle in ``bundle_dir``; ValueError when it holds real weights (never trained here)."""
    bundle = MonaiBundle(bundle_dir)
    if not bundle.info.is_stand_in:
        raise ValueError(f"{bundle.root} holds real {expert} weights; only a stand-in is trained here")
    return bundle


def train_network(bundle: MonaiBundle, recipe: PhantomRecipe, step_loss: Callable[[torch.nn.Module], torch.Tensor],
                  log: Callable[[str], None]) -> list[float]:
    """Train the bundle's network on CPU and save it back into ``models/model.pt``.

    AdamW (no weight decay) with the recipe's learning rate, cosine decay over ``recipe.steps``, torch's
    random state seeded by ``recipe.seed`` (and restored afterwards). ``step_loss(network)`` draws one
    training item and returns its loss. Progress (steps, elapsed and remaining time, the mean loss of the
    last 25 steps) is a bar on a terminal, else lines to ``log`` every 10 % or 30 s
    (:func:`vila_m3.progress.progress`).

    Training runs on one CPU thread (:func:`vila_m3.training.reproducible.fixed_cpu_threads`): these
    tiny networks gain little from more, and on another thread count which small class is learnt
    changes from machine to machine.

    Returns:
        The loss of every step.
    """
    network = bundle.load_network(device="cpu").train()
    with fixed_cpu_threads(1):
        losses = _optimise(network, recipe, step_loss, log)
    torch.save({k: v.detach().clone().contiguous() for k, v in network.state_dict().items()},
               bundle.root / "models" / "model.pt")
    return losses


def _optimise(network: torch.nn.Module, recipe: PhantomRecipe, step_loss: Callable[[torch.nn.Module], torch.Tensor],
              log: Callable[[str], None]) -> list[float]:
    """The optimisation loop of :func:`train_network`; returns the loss of every step."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.steps)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]), progress(recipe.steps, recipe.description, "steps", log=log) as shown:
        torch.manual_seed(recipe.seed)
        for _ in range(recipe.steps):
            loss = step_loss(network)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            shown.set_postfix(f"loss {np.mean(losses[-25:]):.4f}")
            shown.update()
    return losses


def preprocessed_pair(bundle: MonaiBundle, images: Sequence[np.ndarray], geometry: Geometry, labels: np.ndarray,
                      extra: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """A study through the bundle's own preprocessing (as its runner feeds the network) and its labels
    resampled onto the result (nearest neighbour).

    Args:
        bundle: the stand-in bundle.
        images: the channels, float (z, y, x) arrays on ``geometry``.
        geometry: their grid.
        labels: the (z, y, x) labelmap on the same grid.
        extra: more input keys the preprocessing expects (VISTA3D's ``label_prompt``).

    Returns:
        ``{"image": (C, X, Y, Z) float32, "label": (1, X, Y, Z) int64}``.
    """
    data = Compose(bundle.transforms("preprocessing"))({"image": image_from_arrays(list(images), geometry),
                                                         **(extra or {})})
    image = data["image"]
    label = image_from_arrays([labels], geometry).unsqueeze(0)
    label = ResampleToMatch(mode="nearest", padding_mode="zeros")(label, img_dst=image)
    return {"image": image.as_tensor().float(), "label": label.as_tensor().round().long()}


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(predicted, truth).sum()) / total


def relabel_bundle(root: Path, title: str, note: str, description: str, data_source: str, readme: str) -> None:
    """A trained stand-in's metadata and README: ``note`` is what every result of the bundle says it is
    (``vila_m3_stand_in``); ``readme`` follows the README's ``title`` and the note."""
    path = root / METADATA_CONFIG
    metadata = json.loads(path.read_text(encoding="utf-8"))
    metadata[STAND_IN_FIELD] = note
    metadata["description"] = description
    metadata["data_source"] = data_source
    path.write_text(json.dumps(metadata, indent=4) + "\n", encoding="utf-8")
    (root / "docs" / "README.md").write_text(
        f"# {title} — VILA-M3 demo stand-in bundle\n\n**Not a medical model.** The {note}.\n\n{readme}\n",
        encoding="utf-8")
