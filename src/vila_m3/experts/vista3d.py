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

Differences from running the bundle with ``monai.bundle run``: the bundle's own ``scripts`` package
is not imported (the inferer above is built from MONAI classes with the bundle's parameters), and
the configured overlap (0.3) is used for class prompts too, where the bundle's inferer leaves
``SlidingWindowInfererAdapt`` at its default (0.25).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.apps.vista3d.transforms import VistaPostTransformd
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInfererAdapt
from monai.transforms import Compose, Invertd

from vila_m3.experts.bundle import BundleRunner, image_from_arrays, ras_affine
from vila_m3.experts.registry import ExpertSpec
from vila_m3.experts.result import ExpertInputError, ExpertRunError, SegmentationResult
from vila_m3.imaging import Volume, labelmap_like

__all__ = ["EXPERT_NAME", "UNSUPPORTED_LABEL_IDS", "Vista3DRunner"]

EXPERT_NAME = "VISTA3D"

#: Class ids the VISTA3D 0.5.x network has no trained class embedding for (the bundle's evaluator
#: refuses them as label prompts: "Undefined label prompt detected"); ids above the point head's
#: ``last_supported`` (132) are refused too.
UNSUPPORTED_LABEL_IDS: frozenset[int] = frozenset({16, 18, 129, 130, 131})

#: Modalities VISTA3D accepts when the input says (DICOM Modality); None (NIfTI / NRRD) is accepted.
_CT_MODALITIES = frozenset({"CT"})
#: Tolerance (mm, and direction cosines) for the inverted labelmap to count as on the input grid.
_GEOMETRY_ATOL = 1e-3


class Vista3DRunner(BundleRunner):
    """Runs VISTA3D from a bundle folder; the network is loaded once (on the first run) and kept.

    Args:
        bundle_dir: the ``vista3d`` bundle folder (real, or a stand-in from
            :func:`vila_m3.models.tiny_bundles.make_tiny_vista3d_bundle`).
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

    # ---------------------------------------------------------------------------------- state

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
        """Segment ``label_ids`` in a CT ``volume``.

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
        self.check_input(volume)
        prompt = self.prompt_ids(label_ids)
        with self._run_lock:
            return self._run(volume, prompt, argument)

    def _run(self, volume: Volume, prompt: list[int], argument: str | None) -> SegmentationResult:
        timings: dict[str, float] = {}
        start = time.perf_counter()
        network = self._network.get()
        timings["load"] = time.perf_counter() - start

        step = time.perf_counter()
        preprocessing = Compose(self.bundle.transforms("preprocessing"))
        data = {
            "image": image_from_arrays([volume.array], volume.geometry),
            "label_prompt": list(prompt),
        }
        try:
            data = preprocessing(data)
        except Exception as err:
            raise ExpertRunError(f"VISTA3D preprocessing failed: {type(err).__name__}: {err}") from err
        image = data["image"]
        if min(image.shape[1:]) == 0:  # CropForegroundd found nothing above 0 HU
            raise ExpertInputError("VISTA3D found no body in this volume (no voxel above 0 HU); is it a CT?")
        timings["preprocess"] = time.perf_counter() - step

        step = time.perf_counter()
        class_vector = torch.as_tensor(data["label_prompt"], device=self.device).reshape(-1, 1)
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
                f"{len(prompt)} classes; try fewer classes or free the GPU"
            ) from err
        except Exception as err:
            raise ExpertRunError(f"VISTA3D inference failed: {type(err).__name__}: {err}") from err
        timings["inference"] = time.perf_counter() - step

        step = time.perf_counter()
        labels = self._postprocess(data, logits[0].float(), class_vector, preprocessing, volume)
        timings["postprocess"] = time.perf_counter() - step
        timings["total"] = time.perf_counter() - start

        names = dict(self.spec.labels)
        label_names = {i: names.get(i, f"label {i}") for i in sorted(prompt)}
        return SegmentationResult(
            labels=labelmap_like(volume, labels),
            label_names=label_names,
            expert=EXPERT_NAME,
            argument=argument,
            timings=timings,
            stand_in=self.stand_in,
            stand_in_note=self.bundle.info.stand_in,
            bundle_version=self.bundle.info.version,
        )

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda")
        return torch.autocast("cpu", enabled=False)

    def _postprocess(
        self,
        data: dict,
        logits: torch.Tensor,
        class_vector: torch.Tensor,
        preprocessing: Compose,
        volume: Volume,
    ) -> np.ndarray:
        """(B, X', Y', Z') logits on the preprocessed grid → (z, y, x) label ids on ``volume``'s grid."""
        image = data["image"]
        pred = MetaTensor(logits.to(image.device), meta=dict(image.meta))
        post = Compose(
            [
                VistaPostTransformd(keys="pred"),
                Invertd(
                    keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True
                ),
            ]
        )
        try:
            with torch.no_grad():
                out = post({"image": image, "pred": pred, "label_prompt": class_vector})["pred"]
        except Exception as err:
            raise ExpertRunError(f"VISTA3D post-processing failed: {type(err).__name__}: {err}") from err
        affine = np.asarray(out.affine, dtype=float) if hasattr(out, "affine") else None
        spatial = tuple(out.shape[1:])
        if spatial != tuple(volume.geometry.shape) or (
            affine is not None and not np.allclose(affine, ras_affine(volume.geometry), atol=_GEOMETRY_ATOL)
        ):
            raise ExpertRunError(
                f"VISTA3D output did not return to the input grid (got {spatial}, expected {volume.geometry.shape})"
            )
        array = torch.nan_to_num(out[0].float(), nan=0.0).round().cpu().numpy()
        return np.ascontiguousarray(array.transpose(2, 1, 0)).astype(np.uint16 if array.max() > 255 else np.uint8)
