"""What a segmentation expert returns, and the two ways it can fail."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vila_m3.imaging import Volume

__all__ = ["ExpertInputError", "ExpertRunError", "SegmentationResult"]


class ExpertInputError(ValueError):
    """The input cannot be given to this expert (wrong modality, 2D image, missing MRI sequence, ...).

    The message names the problem in words a user can act on; nothing was run.
    """


class ExpertRunError(RuntimeError):
    """The expert failed while running on valid input (out of memory, a broken bundle, ...)."""


@dataclass
class SegmentationResult:
    """A labelmap produced by a segmentation expert.

    Attributes:
        labels: uint8 (uint16 when an id exceeds 255) labelmap, array in (z, y, x) order, with exactly
            the geometry of the input volume (for BRATS: of the T1c); 0 is background.
        label_names: ``{label id: name}`` of the labels the expert was asked for (its prompt), which
            covers every id present in ``labels``; background is not listed.
        expert: the expert's name (``"VISTA3D"``, ``"BRATS"``).
        argument: the trigger argument it ran for (``"hepatic tumor"``), None when it takes none.
        timings: seconds per step (``load``, ``preprocess``, ``inference``, ``postprocess``, ``total``).
        stand_in: True when the weights are a stand-in (tiny random or demo network, not a medical model).
        stand_in_note: what the stand-in is, in words for the user (from the bundle), None for real weights.
        bundle_version: version of the bundle that produced it (``metadata.json``), when known.
        notes: what the expert did to the input that the user should know (e.g. a sequence
            resampled onto the T1c grid), one sentence each.
    """

    labels: Volume
    label_names: dict[int, str]
    expert: str
    argument: str | None
    timings: dict[str, float] = field(default_factory=dict)
    stand_in: bool = False
    stand_in_note: str | None = None
    bundle_version: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ids_by_name(self) -> dict[str, int]:
        """``{name: label id}`` in ascending id, the form MONAI Label clients expect as ``label_names``."""
        return {name: int(label_id) for label_id, name in sorted(self.label_names.items())}

    @property
    def present_ids(self) -> list[int]:
        """Label ids that occur in ``labels`` (ascending, background excluded)."""
        return [int(v) for v in np.unique(self.labels.array) if v != 0]
