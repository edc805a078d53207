"""The VISTA3D expert: class-prompted segmentation of a CT volume with the ``vista3d`` MONAI bundle.

Pipeline (as the bundle's ``configs/inference.json`` defines it; the bundle folder is the source of
every number):

1. the bundle's preprocessing transforms, instantiated from its config, without the file loader
   (the volume is already in memory): channel first, ``Spacingd`` to ``resample_spacing`` (1.5 mm),
   ``CropForegroundd`` (margin 10), ``VistaPreTransformd`` (expands kidney / lung / bone prompts
   into their subclasses), ``ScaleIntensityRanged`` (-963.8 … 1053.7 HU → 0 … 1, clipped),
   ``Orientationd`` RAS, float32;
2. sliding windows of ``patch_size`` (128³) with the bundle inferer's ``overlap`` (0.3) and
   ``sw_batch_size``, patch coordinates passed to the network (``SlidingWindowInfererAdapt``, as the
   bundle's ``Vista3dInferer`` does for class prompts); autocast on CUDA (the bundle runs with amp);
3. ``VistaPostTransformd``: negative logits are background, otherwise the arg-max class, mapped to
   the prompted label ids; then ``Invertd`` (nearest neighbour) back through the preprocessing to the
   input grid. Voxels the inversion leaves undefined (NaN; the bundle writes 255) become background.

A run is three steps, :meth:`Vista3DRunner.prepare` (input checks, preprocessing), :meth:`~Vista3DRunner.infer`
(the network: the only step a GPU work queue needs to hold) and :meth:`~Vista3DRunner.finish` (back to the
input grid). The work outside the network is kept to a few passes over the full volume: the CT is
resampled onto the model's grid straight from its int16 pixels, reading only the voxels the trilinear
interpolation touches (:func:`~vila_m3.experts.bundle.preprocess_from_pixels`; otherwise it goes to the
preprocessing transposed and converted in one cache-friendly pass), and the way back undoes only the steps after the resampling with
``Invertd`` on the model's small grid, then puts the labels on the input grid with per-axis
nearest-neighbour indices computed by MONAI's own arithmetic (:mod:`vila_m3.imaging.resample`), not a
float64 sampling grid of the whole input. The labelmap equals the bundle's own transforms' voxel for voxel;
preprocessing that is not of that shape is inverted by ``Invertd`` as a whole.

Differences from running the bundle with ``monai.bundle run``: the bundle's own ``scripts`` package
is not imported (the inferer above is built from MONAI classes with the bundle's parameters), and
the configured overlap (0.3) is used for class prompts too, where the bundle's inferer leaves
``SlidingWindowInfererAdapt`` at its default (0.25).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.apps.vista3d.transforms import VistaPostTransformd
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInfererAdapt
from monai.transforms import Compose, Invertd

from vila_m3.experts.bundle import (
    BundleRunner,
    image_from_arrays,
    last_resample,
    pending_resample,
    preprocess_from_pixels,
    ras_affine,
    resample_input_dtype,
)
from vila_m3.experts.feedback import segmentation_feedback
from vila_m3.experts.registry import ExpertSpec, ResolvedArgument
from vila_m3.experts.result import ExpertInputError, ExpertRunError, SegmentationResult
from vila_m3.experts.runner import NetworkExpertRunner, StudyView, explicit_labels, primary_volume
from vila_m3.imaging import Volume, labelmap_like
from vila_m3.imaging.resample import axis_aligned, nearest_to_grid_zyx

__all__ = ["EXPERT_NAME", "UNSUPPORTED_LABEL_IDS", "PreparedCT", "Vista3DExpert", "Vista3DRunner"]

EXPERT_NAME = "VISTA3D"

#: Class ids the VISTA3D 0.5.x network has no trained class embedding for (the bundle's evaluator
#: refuses them as label prompts: "Undefined label prompt detected"); ids above the point head's
#: ``last_supported`` (132) are refused too.
UNSUPPORTED_LABEL_IDS: frozenset[int] = frozenset({16, 18, 129, 130, 131})

#: Modalities VISTA3D accepts when the input says (DICOM Modality); None (NIfTI / NRRD) is accepted.
_CT_MODALITIES = frozenset({"CT"})
#: Tolerance (mm, and direction cosines) for the inverted labelmap to count as on the input grid.
_GEOMETRY_ATOL = 1e-3


@dataclass
class PreparedCT:
    """A request after :meth:`Vista3DRunner.prepare`: what :meth:`~Vista3DRunner.infer` and
    :meth:`~Vista3DRunner.finish` need.

    Attributes:
        volume: the input CT.
        prompt: the class ids given to the network (subclasses expanded).
        argument: the trigger argument, recorded in the result.
        data: the bundle's preprocessed dictionary (``image`` on the model's grid, ``label_prompt``).
        timings: seconds per step so far (``preprocess``; ``load`` and ``inference`` after ``infer``).
    """

    volume: Volume
    prompt: list[int]
    argument: str | None
    data: dict
    timings: dict[str, float] = field(default_factory=dict)


class Vista3DRunner(BundleRunner):
    """Runs VISTA3D from a bundle folder; the network is loaded once (on the first run) and kept.

    Args:
        bundle_dir: the ``vista3d`` bundle folder (real, or a stand-in from
            :func:`vila_m3.standins.tiny_bundles.make_tiny_vista3d_bundle`).
        device: torch device; None: CUDA if available, else CPU.
        spec: the VISTA3D expert of the registry (label names and subclasses); None reads it from
            ``configs/experts.yaml``.
        trusted_sha256: SHA-256 sums of ``models/model.pt`` the caller vouches for (see
            :meth:`vila_m3.experts.bundle.MonaiBundle.read_state_dict`).

    Raises:
        BundleError: the folder is not a complete bundle (the message names the missing file).
    """

    EXPERT_NAME = EXPERT_NAME

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | torch.device | None = None,
        spec: ExpertSpec | None = None,
        trusted_sha256: Iterable[str] = (),
    ) -> None:
        super().__init__(bundle_dir, device, spec, trusted_sha256)
        self.resample_spacing = self._setting("resample_spacing")

    # ---------------------------------------------------------------------------------- input

    def check_input(self, volume: Volume) -> None:
        """Raise :class:`ExpertInputError` when ``volume`` is not a 3D CT (a known non-CT modality,
        or a single-slice image)."""
        modality = (volume.modality or "").strip().upper()
        if modality and modality not in _CT_MODALITIES:
            raise ExpertInputError(
                f"VISTA3D segments CT volumes; this image's DICOM modality is {modality}, not CT"
            )
        if volume.is_2d:
            raise ExpertInputError(
                f"VISTA3D needs a 3D CT volume; this is a single 2D image ({volume.array.shape[2]} x "
                f"{volume.array.shape[1]} pixels)"
            )
        if min(volume.array.shape) < 2:
            raise ExpertInputError(f"VISTA3D needs a 3D volume; this one is {volume.geometry.shape} voxels")

    def prompt_ids(self, label_ids: Sequence[int]) -> list[int]:
        """The class prompt given to the network for ``label_ids``: ids with subclasses (kidney, lung,
        bone) replaced by them as the bundle's ``subclass`` table says, repeats removed, order kept.

        Raises:
            ExpertInputError: no ids, or an id the network cannot segment (the message lists them).
        """
        ids = [int(i) for i in label_ids]
        if not ids:
            raise ExpertInputError("VISTA3D needs at least one label id to segment")
        subclass = {int(k): [int(v) for v in vs] for k, vs in (self.bundle.get("subclass") or {}).items()}
        expanded: list[int] = []
        for label_id in ids:
            expanded.extend(subclass.get(label_id, [label_id]))
        last = self._last_supported()
        bad = sorted({i for i in expanded if i < 1 or i > last or i in UNSUPPORTED_LABEL_IDS})
        if bad:
            raise ExpertInputError(
                f"VISTA3D cannot segment label id(s) {', '.join(map(str, bad))} "
                f"(supported: 1..{last} except {', '.join(map(str, sorted(UNSUPPORTED_LABEL_IDS)))})"
            )
        return list(dict.fromkeys(expanded))

    def _last_supported(self) -> int:
        point_head = self.bundle.raw("network_def#point_head")
        if isinstance(point_head, dict) and isinstance(point_head.get("last_supported"), int):
            return int(point_head["last_supported"])
        return 132  # vista3d132: the class embeddings trained in the released weights

    # ------------------------------------------------------------------------------------ run

    def run(self, volume: Volume, label_ids: Sequence[int], argument: str | None = None) -> SegmentationResult:
        """Segment ``label_ids`` in a CT ``volume``: :meth:`prepare`, :meth:`infer`, :meth:`finish` in turn.

        Args:
            volume: a 3D CT, array (z, y, x) in HU, any geometry.
            label_ids: VISTA3D class ids to prompt (e.g. a group's ids from
                ``spec.resolve_argument(arg).label_ids``); subclass ids are expanded as the bundle does.
            argument: the trigger argument these ids came from, recorded in the result.

        Returns:
            A :class:`SegmentationResult` whose labelmap has exactly ``volume``'s grid, values ⊆ the
            prompted ids ∪ {0}; ``label_names`` names every prompted id.

        Raises:
            ExpertInputError: not a 3D CT, or an id VISTA3D cannot segment.
            ExpertRunError: the network failed (e.g. out of memory); BundleError: the bundle is broken.
        """
        prepared = self.prepare(volume, label_ids, argument)
        return self.finish(prepared, self.infer(prepared))

    # The three steps of a run. Only :meth:`infer` uses the network (and the GPU): a work queue may
    # hold just that step, while preparing the next request and finishing the last run beside it.

    def prepare(self, volume: Volume, label_ids: Sequence[int], argument: str | None = None) -> PreparedCT:
        """Check the input and run the bundle's preprocessing (no network; thread-safe).

        Raises:
            ExpertInputError: not a 3D CT, an id VISTA3D cannot segment, or no body in the volume.
            ExpertRunError: the preprocessing failed.
        """
        self.check_input(volume)
        prompt = self.prompt_ids(label_ids)
        start = time.perf_counter()
        preprocessing = self._preprocessing()
        try:
            data = None
            if self.device.type == "cpu":  # on a GPU, the bundle's transforms resample on the device
                data = preprocess_from_pixels(preprocessing.transforms, {"label_prompt": list(prompt)},
                                              volume.array, volume.geometry)
            if data is None:  # not a preprocessing the direct resampling handles: the bundle's way
                dtype = resample_input_dtype(preprocessing.transforms, volume.array.dtype)
                data = preprocessing({
                    "image": image_from_arrays([volume.array], volume.geometry, dtype=dtype),
                    "label_prompt": list(prompt),
                })
        except Exception as err:
            raise ExpertRunError(f"VISTA3D preprocessing failed: {type(err).__name__}: {err}") from err
        if min(data["image"].shape[1:]) == 0:  # CropForegroundd found nothing above 0 HU
            raise ExpertInputError("VISTA3D found no body in this volume (no voxel above 0 HU); is it a CT?")
        return PreparedCT(volume, prompt, argument, data, {"preprocess": time.perf_counter() - start})

    def infer(self, prepared: PreparedCT) -> torch.Tensor:
        """The network's logits (classes, X', Y', Z') on the preprocessed grid; one run at a time.

        Raises:
            ExpertRunError: the network failed (e.g. out of memory).
        """
        with self._run_lock:
            start = time.perf_counter()
            network = self._network.get()
            prepared.timings["load"] = time.perf_counter() - start
            step = time.perf_counter()
            image = prepared.data["image"]
            class_vector = torch.as_tensor(prepared.data["label_prompt"], device=self.device).reshape(-1, 1)
            inferer = SlidingWindowInfererAdapt(
                roi_size=self.roi_size, sw_batch_size=self.sw_batch_size, overlap=self.overlap, with_coord=True
            )
            try:
                with torch.no_grad(), self._autocast(), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Using a non-tuple sequence")  # inside MONAI's windows
                    logits = inferer(
                        image.unsqueeze(0).to(self.device),
                        network,
                        transpose=True,
                        class_vector=class_vector,
                        prompt_class=class_vector,
                    )
            except torch.OutOfMemoryError as err:
                raise ExpertRunError(
                    f"VISTA3D ran out of memory on {self.device} for a {tuple(image.shape[1:])} grid and "
                    f"{len(prepared.prompt)} classes; try fewer classes or free the GPU"
                ) from err
            except Exception as err:
                raise ExpertRunError(f"VISTA3D inference failed: {type(err).__name__}: {err}") from err
            prepared.timings["inference"] = time.perf_counter() - step
        return logits[0].float()

    def finish(self, prepared: PreparedCT, logits: torch.Tensor) -> SegmentationResult:
        """Logits → labels on the input grid (post-processing and inversion; no network; thread-safe).

        Raises:
            ExpertRunError: the post-processing failed, or the labels did not land on the input grid.
        """
        step = time.perf_counter()
        labels = self._postprocess(prepared.data, logits, prepared.volume)
        timings = dict(prepared.timings)
        timings["postprocess"] = time.perf_counter() - step
        timings["total"] = sum(timings.values())
        names = dict(self.spec.labels)
        label_names = {i: names.get(i, f"label {i}") for i in sorted(prepared.prompt)}
        return SegmentationResult(
            labels=labelmap_like(prepared.volume, labels),
            label_names=label_names,
            expert=EXPERT_NAME,
            argument=prepared.argument,
            timings=timings,
            stand_in=self.stand_in,
            stand_in_note=self.bundle.info.stand_in,
            bundle_version=self.bundle.info.version,
        )

    def _postprocess(self, data: dict, logits: torch.Tensor, volume: Volume) -> np.ndarray:
        """(B, X', Y', Z') logits on the preprocessed grid → (z, y, x) label ids on ``volume``'s grid.

        ``VistaPostTransformd`` on the model's grid, then back to the input grid. Fast path: MONAI's
        ``Invertd`` undoes only the cheap steps after the resampling (orientation, crop) on the small
        grid; the resampling is undone by :func:`~vila_m3.imaging.resample.nearest_to_grid_zyx` straight
        into the labelmap's (z, y, x) array (MONAI's nearest-neighbour rule; see that module for ties).
        When the preprocessing is not of that shape, ``Invertd`` undoes all of it, as the bundle does.
        """
        transforms = list(self._preprocessing().transforms)
        resample_at = last_resample(transforms)
        if resample_at is not None:
            out = self._invert(data, logits, transforms[resample_at + 1:])
            pending = pending_resample(out)
            if pending is not None and tuple(pending.target_shape) == tuple(volume.geometry.shape) and np.allclose(
                pending.target_affine, ras_affine(volume.geometry), atol=_GEOMETRY_ATOL
            ):
                xform = pending.index_map(np.asarray(torch.as_tensor(out.affine).detach().cpu(), dtype=np.float64))
                if axis_aligned(xform):
                    labels = nearest_to_grid_zyx(_label_ids(out[0]), xform, volume.geometry.shape,
                                                 padding=pending.padding, dtype=pending.dtype)
                    return _label_array(labels)
        out = self._invert(data, logits, transforms)
        affine = np.asarray(out.affine, dtype=float) if hasattr(out, "affine") else None
        spatial = tuple(out.shape[1:])
        if spatial != tuple(volume.geometry.shape) or (
            affine is not None and not np.allclose(affine, ras_affine(volume.geometry), atol=_GEOMETRY_ATOL)
        ):
            raise ExpertRunError(
                f"VISTA3D output did not return to the input grid (got {spatial}, expected {volume.geometry.shape})"
            )
        return _label_array(_label_ids(out[0]).permute(2, 1, 0))

    def _invert(self, data: dict, logits: torch.Tensor, transforms: list) -> MetaTensor:
        """``VistaPostTransformd`` and ``Invertd`` through ``transforms`` (the last ones applied, or all)."""
        image = data["image"]
        logits = logits.to(image.device)
        invert = Invertd(keys="pred", transform=Compose(transforms), orig_keys="image", nearest_interp=True,
                         to_tensor=True)
        try:
            with torch.no_grad():
                class_vector = torch.as_tensor(data["label_prompt"], device=self.device).reshape(-1, 1)
                labels = _prompted_labels(logits, class_vector.reshape(-1))
                if labels is None:  # NaN logits: MONAI's own rule for them
                    post = Compose([VistaPostTransformd(keys="pred"), invert])
                    pred = MetaTensor(logits, meta=dict(image.meta))
                else:
                    post, pred = invert, MetaTensor(labels, meta=dict(image.meta))
                return post({"image": image, "pred": pred, "label_prompt": class_vector})["pred"]
        except Exception as err:
            raise ExpertRunError(f"VISTA3D post-processing failed: {type(err).__name__}: {err}") from err


def _prompted_labels(logits: torch.Tensor, label_prompt: torch.Tensor) -> torch.Tensor | None:
    """``VistaPostTransformd``'s labels for class prompts, (1, X', Y', Z') float32: background where no
    class has a positive logit, else the prompted id of the first class with the largest logit; None
    when a logit is NaN (the caller runs ``VistaPostTransformd`` itself).

    The same numbers as MONAI's transform (clamping the negatives to 0 changes no arg-max above 0), in a
    few element-wise passes: ``argmax`` over the class axis of a CPU tensor takes 0.15 s for two classes
    on a 110 × 110 × 90 grid, a running comparison 0.01 s.
    """
    if logits.ndim != 4 or len(label_prompt) != logits.shape[0] or bool(torch.isnan(logits).any()):
        return None
    prompt = label_prompt.to(logits.device, torch.float32)
    best = logits[0]
    labels = torch.full(best.shape, float(prompt[0]), dtype=torch.float32, device=logits.device)
    for channel in range(1, logits.shape[0]):
        higher = logits[channel] > best  # strict: the first of equal maxima wins, as argmax
        best = torch.where(higher, logits[channel], best)
        labels[higher] = prompt[channel]
    labels[best <= 0] = 0.0
    return labels[None]


def _label_ids(values: torch.Tensor) -> torch.Tensor:
    """Label ids as floats (NaN where the inversion left a voxel undefined) → uint8 (int32 above 255)
    ids, NaN as background."""
    ids = torch.nan_to_num(values.float(), nan=0.0).round()
    return ids.to(torch.uint8 if ids.numel() == 0 or float(ids.max()) <= 255 else torch.int32)


def _label_array(labels: torch.Tensor) -> np.ndarray:
    """(z, y, x) label ids on any device → a C-contiguous uint8 / uint16 numpy array."""
    array = np.ascontiguousarray(labels.cpu().numpy())
    return array if array.dtype == np.uint8 else array.astype(np.uint16)


class Vista3DExpert(NetworkExpertRunner):
    """VISTA3D as an :class:`~vila_m3.experts.runner.ExpertRunner`: the study's CT, the argument's label
    ids as the class prompt; the run is split into ``prepare`` / ``infer`` / ``finish`` so a work queue holds
    only the network's step. The bundle is ``configs/models.yaml``'s location of the expert's first weights.

    Raises:
        BundleError: the bundle folder is not complete (the message names the missing file).
    """

    def __init__(self, spec: ExpertSpec, models_dir: str | Path, device: str | None = None) -> None:
        super().__init__(spec, models_dir, device)
        self.network = Vista3DRunner(self.weights_path(), device=device, spec=spec)



    def check(self, study: StudyView) -> None:
        """The study must be a CT (the chat's detected or the client's modality); the volume itself is
        checked by :meth:`Vista3DRunner.check_input` when it runs."""
        if study.modality != "CT":
            raise ExpertInputError(f"{self.spec.name} segments CT volumes; this study is {study.modality}")

    def request_argument(self, params: Mapping[str, Any]) -> ResolvedArgument:
        """``{"group": "hepatic tumor"}`` (one of the card's arguments, or an alias) or ``{"label_prompt": [1, 26]}``
        (``label_ids`` also accepted): VISTA3D class ids of the expert's label table."""
        group = params.get("group", params.get("argument"))
        if group is not None and (not isinstance(group, str) or not group.strip()):
            raise ExpertInputError(f"group must be one group name as text, e.g. 'hepatic tumor'; "
                                   f"valid groups are {self.spec.valid_args_text()}")
        label_ids = params.get("label_prompt") or params.get("label_ids")
        if label_ids is None:
            return self.spec.resolve_argument(group)
        if not isinstance(label_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                      for i in label_ids):
            raise ExpertInputError("label_prompt must be a list of integer label ids, e.g. [1, 26]")
        unknown = sorted(set(label_ids) - set(self.spec.labels))
        if unknown:
            raise ExpertInputError(f"unknown label ids {unknown}; valid ids are "
                                   f"{min(self.spec.labels)}-{max(self.spec.labels)}")
        return explicit_labels(self.spec, label_ids)

    def run(self, study: StudyView, argument: ResolvedArgument) -> SegmentationResult:
        """The labelmap of ``argument``'s label ids on the study's CT grid (:meth:`Vista3DRunner.run`)."""
        return self.network.run(primary_volume(study), list(argument.label_ids), argument.group)

    def prepare(self, study: StudyView, argument: ResolvedArgument) -> PreparedCT:
        """Input checks and preprocessing (:meth:`Vista3DRunner.prepare`)."""
        return self.network.prepare(primary_volume(study), list(argument.label_ids), argument.group)

    def infer(self, prepared: PreparedCT) -> torch.Tensor:
        """The network's logits (:meth:`Vista3DRunner.infer`)."""
        return self.network.infer(prepared)

    def finish(self, prepared: PreparedCT, logits: torch.Tensor) -> SegmentationResult:
        """Labels on the input grid (:meth:`Vista3DRunner.finish`)."""
        return self.network.finish(prepared, logits)

    def feedback(self, result: SegmentationResult, question: str | None,
                 present_ids: Sequence[int] | None = None) -> str:
        """``The results are <image>. The colors in this image describe red: liver, ...`` (protocol §3)."""
        return segmentation_feedback(present_ids or (), result.label_names, question)

