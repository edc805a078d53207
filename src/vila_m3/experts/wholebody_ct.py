"""The WholeBodyCT expert: 104 TotalSegmentator structures on a CT with MONAI's ``wholeBody_ct_segmentation`` bundle.

Enabled by its own experts file, ``configs/experts_wholebody_ct.yaml`` (runner, model-card line, labels, colours,
and the bundle's entry of the models manifest); nothing else in the product names it.

Pipeline (as the bundle's ``configs/inference.json`` defines it; the bundle folder is the source of every number):

1. the bundle's preprocessing, instantiated from its config without the file loader (the volume is already in
   memory): ``EnsureTyped``, channel first, ``Orientationd`` RAS, ``Spacingd`` to ``pixdim``,
   ``NormalizeIntensityd`` (non-zero voxels), ``ScaleIntensityd`` to -1 … 1;
2. ``network_def`` (a SegResNet with 105 output channels) over sliding windows of the bundle inferer's
   ``roi_size``, ``overlap``, ``mode`` and ``padding_mode``; autocast on CUDA (the bundle's evaluator runs with amp);
3. the arg-max class (the bundle takes the soft-max first, which does not change the arg-max), then ``Invertd``
   (nearest neighbour) through the whole preprocessing back to the CT's grid.

Which model: the bundle ships a 1.5 mm model (``models/model.pt``) and a 3.0 mm one (``models/model_lowres.pt``),
chosen by its ``displayable_configs#highres`` flag, which also sets ``pixdim``. The runner sets that flag as
``monai.bundle run --displayable_configs#highres ...`` would: the 3.0 mm model on a CPU (≈ 2 GB and seconds per CT
in the bundle's benchmark), the 1.5 mm model on a GPU (≈ 29 GB for a 512 × 512 × 397 CT). ``highres`` overrides it.

The argument: none. The network segments all 104 structures in one pass; the result is the whole labelmap.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Invertd

from vila_m3.experts.bundle import (
    CHECKPOINT_FILE,
    BundleError,
    BundleRunner,
    MonaiBundle,
    default_device,
    image_from_arrays,
    ras_affine,
)
from vila_m3.experts.registry import ExpertSpec, ResolvedArgument
from vila_m3.experts.result import ExpertInputError, ExpertRunError, SegmentationResult
from vila_m3.experts.runner import NetworkExpertRunner, StudyView, primary_volume
from vila_m3.imaging import Volume, labelmap_like

__all__ = ["EXPERT_NAME", "HIGHRES_ID", "PreparedWholeBody", "WholeBodyCTExpert", "WholeBodyCTRunner"]

EXPERT_NAME = "WholeBodyCT"
#: The bundle's switch between the 1.5 mm (true) and the 3.0 mm (false) model.
HIGHRES_ID = "displayable_configs#highres"
#: The bundle's weights file name under ``models/`` (an expression of ``highres``).
MODELNAME_ID = "modelname"
#: Where metadata.json names the output channels.
CHANNELS_ID = ("network_data_format", "outputs", "pred", "channel_def")
#: Tolerance (mm, and direction cosines) for the labelmap to count as on the CT's grid.
_GEOMETRY_ATOL = 1e-3


@dataclass
class PreparedWholeBody:
    """A request after :meth:`WholeBodyCTRunner.prepare`.

    Attributes:
        volume: the input CT.
        data: the bundle's preprocessed dictionary (``image``: (1, X', Y', Z') on the model's grid).
        timings: seconds per step so far.
    """

    volume: Volume
    data: dict
    timings: dict[str, float] = field(default_factory=dict)


def read_bundle(bundle_dir: str | Path, highres: bool) -> MonaiBundle:
    """The bundle with its ``highres`` flag set and the weights file that flag names (``models/model.pt`` when
    the bundle has no such flag).

    Raises:
        BundleError: incomplete bundle, or the weights file the flag names is missing.
    """
    bundle = MonaiBundle(bundle_dir)
    if bundle.raw(HIGHRES_ID) is None:
        return bundle
    overrides = {HIGHRES_ID: bool(highres)}
    modelname = MonaiBundle(bundle_dir, overrides).get(MODELNAME_ID)
    checkpoint = f"models/{modelname}" if isinstance(modelname, str) and modelname else CHECKPOINT_FILE
    return MonaiBundle(bundle_dir, overrides, checkpoint=checkpoint)


class WholeBodyCTRunner(BundleRunner):
    """Runs the bundle on a whole CT; the network is loaded once (on the first run) and kept.

    Args:
        bundle_dir: the ``wholeBody_ct_segmentation`` bundle folder (real, or the stand-in of
            :func:`vila_m3.standins.wholebody_ct.make_stand_in_wholebody_ct_bundle`).
        device: torch device; None: CUDA if available, else CPU.
        spec: the expert's registry entry (its card name); None reads it from the registry.
        highres: the 1.5 mm model (True) or the 3.0 mm one (False); None: 1.5 mm on CUDA, 3.0 mm on a CPU.
        trusted_sha256: SHA-256 sums of the weights file the caller vouches for.

    Raises:
        BundleError: the folder is not a complete bundle (the message names the missing file).
    """

    EXPERT_NAME = EXPERT_NAME

    def __init__(self, bundle_dir: str | Path, device: str | torch.device | None = None, spec: ExpertSpec | None = None,
                 highres: bool | None = None, trusted_sha256: Iterable[str] = ()) -> None:
        device = default_device(device)
        self.highres = device.type == "cuda" if highres is None else bool(highres)
        super().__init__(read_bundle(bundle_dir, self.highres), device, spec, trusted_sha256)
        self.mode = str(self.bundle.get("inferer#mode", "constant"))
        self.padding_mode = str(self.bundle.get("inferer#padding_mode", "constant"))
        self.label_names = self._label_names()

    @property
    def checkpoint(self) -> str:
        """The weights file in use, relative to the bundle (``models/model_lowres.pt`` for the 3.0 mm model)."""
        return self.bundle.checkpoint

    def _label_names(self) -> dict[int, str]:
        """``{id: name}`` of the output channels (background left out), from metadata.json's channel_def."""
        channels: Any = self.bundle.metadata
        for key in CHANNELS_ID:
            channels = channels.get(key) if isinstance(channels, dict) else None
        if not isinstance(channels, dict) or not channels:
            raise BundleError(f"{self.bundle.root / 'configs/metadata.json'}: has no output channel_def")
        try:
            names = {int(k): str(v) for k, v in channels.items()}
        except ValueError as err:
            raise BundleError(f"{self.bundle.root / 'configs/metadata.json'}: channel_def ids are not integers") from err
        names.pop(0, None)
        return dict(sorted(names.items()))

    # ------------------------------------------------------------------------------------ run

    def check_input(self, volume: Volume) -> None:
        """Raise :class:`ExpertInputError` when ``volume`` is not a 3D CT (a known non-CT modality, or one slice)."""
        modality = (volume.modality or "").strip().upper()
        if modality and modality != "CT":
            raise ExpertInputError(f"{EXPERT_NAME} segments CT volumes; this image's DICOM modality is {modality}")
        if volume.is_2d or min(volume.array.shape) < 2:
            raise ExpertInputError(f"{EXPERT_NAME} needs a 3D CT volume; this one is {volume.geometry.shape} voxels")

    def run(self, volume: Volume) -> SegmentationResult:
        """The 104 structures of a CT: :meth:`prepare`, :meth:`infer`, :meth:`finish` in turn.

        Args:
            volume: a 3D CT, array (z, y, x) in HU, any geometry.

        Returns:
            A :class:`SegmentationResult` whose labelmap has exactly ``volume``'s grid, values in 0..104, and
            ``label_names`` the bundle's 104 channel names.

        Raises:
            ExpertInputError: not a 3D CT. ExpertRunError: the network failed (e.g. out of memory).
        """
        prepared = self.prepare(volume)
        return self.finish(prepared, self.infer(prepared))

    def prepare(self, volume: Volume) -> PreparedWholeBody:
        """Check the input and run the bundle's preprocessing (no network; thread-safe)."""
        self.check_input(volume)
        start = time.perf_counter()
        try:
            data = self._preprocessing()({"image": image_from_arrays([volume.array], volume.geometry)})
        except Exception as err:
            raise ExpertRunError(f"{EXPERT_NAME} preprocessing failed: {type(err).__name__}: {err}") from err
        return PreparedWholeBody(volume, data, {"preprocess": time.perf_counter() - start})

    def infer(self, prepared: PreparedWholeBody) -> torch.Tensor:
        """The arg-max class ids (1, X', Y', Z') on the model's grid, on the CPU; one run at a time."""
        with self._run_lock:
            start = time.perf_counter()
            network = self._network.get()
            prepared.timings["load"] = time.perf_counter() - start
            step = time.perf_counter()
            image = prepared.data["image"]
            inferer = SlidingWindowInferer(roi_size=self.roi_size, sw_batch_size=self.sw_batch_size,
                                           overlap=self.overlap, mode=self.mode, padding_mode=self.padding_mode)
            try:
                with torch.no_grad(), self._autocast(), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Using a non-tuple sequence")  # inside MONAI's windows
                    logits = inferer(image.unsqueeze(0).to(self.device), network)
                    labels = torch.argmax(logits[0], dim=0, keepdim=True)
            except torch.OutOfMemoryError as err:
                raise ExpertRunError(
                    f"{EXPERT_NAME} ran out of memory on {self.device} for a {tuple(image.shape[1:])} grid; free the "
                    "GPU or run the 3.0 mm model"
                ) from err
            except Exception as err:
                raise ExpertRunError(f"{EXPERT_NAME} inference failed: {type(err).__name__}: {err}") from err
            del logits
            prepared.timings["inference"] = time.perf_counter() - step
        return labels.to("cpu", torch.float32)

    def finish(self, prepared: PreparedWholeBody, labels: torch.Tensor) -> SegmentationResult:
        """Class ids → labels on the CT's grid (``Invertd``, nearest neighbour; no network; thread-safe).

        Raises:
            ExpertRunError: the inversion failed, or the labels did not land on the CT's grid.
        """
        step = time.perf_counter()
        volume = prepared.volume
        image = prepared.data["image"]
        invert = Invertd(keys="pred", transform=self._preprocessing(), orig_keys="image", nearest_interp=True,
                         to_tensor=True)
        try:
            with torch.no_grad():
                out = invert({"image": image, "pred": MetaTensor(labels, meta=dict(image.meta))})["pred"]
        except Exception as err:
            raise ExpertRunError(f"{EXPERT_NAME} post-processing failed: {type(err).__name__}: {err}") from err
        spatial = tuple(out.shape[1:])
        affine = np.asarray(out.affine, dtype=float)
        if spatial != tuple(volume.geometry.shape) or not np.allclose(affine, ras_affine(volume.geometry),
                                                                      atol=_GEOMETRY_ATOL):
            raise ExpertRunError(f"{EXPERT_NAME} output did not return to the CT's grid "
                                 f"(got {spatial}, expected {volume.geometry.shape})")
        ids = torch.nan_to_num(out[0].float(), nan=0.0).round().to(torch.uint8)
        array = np.ascontiguousarray(ids.permute(2, 1, 0).numpy())
        timings = dict(prepared.timings)
        timings["postprocess"] = time.perf_counter() - step
        timings["total"] = sum(timings.values())
        return SegmentationResult(
            labels=labelmap_like(volume, array),
            label_names=dict(self.label_names),
            expert=self.spec.name,
            argument=None,
            timings=timings,
            stand_in=self.stand_in,
            stand_in_note=self.bundle.info.stand_in,
            bundle_version=self.bundle.info.version,
        )


class WholeBodyCTExpert(NetworkExpertRunner):
    """WholeBodyCT as an :class:`~vila_m3.experts.runner.ExpertRunner`: the study's CT, no argument; the run is split
    into ``prepare`` / ``infer`` / ``finish`` so a work queue holds only the network's step. The bundle is the
    location of the expert's first weights (its experts file's ``models:`` entry).

    Raises:
        BundleError: the bundle folder is not complete (the message names the missing file).
    """

    def __init__(self, spec: ExpertSpec, models_dir: str | Path, device: str | None = None) -> None:
        super().__init__(spec, models_dir, device)
        self.network = WholeBodyCTRunner(self.weights_path(), device=device, spec=spec)

    def run(self, study: StudyView, argument: ResolvedArgument) -> SegmentationResult:
        """The 104 structures on the study's CT grid (:meth:`WholeBodyCTRunner.run`)."""
        return self.network.run(primary_volume(study))

    def prepare(self, study: StudyView, argument: ResolvedArgument) -> PreparedWholeBody:
        """Input checks and preprocessing (:meth:`WholeBodyCTRunner.prepare`)."""
        return self.network.prepare(primary_volume(study))

    def infer(self, prepared: PreparedWholeBody) -> torch.Tensor:
        """The class ids on the model's grid (:meth:`WholeBodyCTRunner.infer`)."""
        return self.network.infer(prepared)

    def finish(self, prepared: PreparedWholeBody, labels: torch.Tensor) -> SegmentationResult:
        """Labels on the CT's grid (:meth:`WholeBodyCTRunner.finish`)."""
        return self.network.finish(prepared, labels)
