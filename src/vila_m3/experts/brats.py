"""The BRATS expert: brain-tumour sub-regions from four MRI sequences with the
``brats_mri_segmentation`` MONAI bundle.

Input: the four sequences T1c, T1, T2 and FLAIR, in any order and under common spellings
(:data:`SEQUENCE_ALIASES`). The network's channels are always built in the bundle's order
T1c, T1, T2, FLAIR (``metadata.json`` ``network_data_format.inputs.image.channel_def``).

Grids: the output is on the T1c's grid. A sequence on another grid is resampled onto it (SimpleITK,
linear, 0 outside its field of view) when both describe the same part of the patient, and refused
otherwise. The rule (:func:`check_same_space`), on the axis-aligned LPS boxes spanned by the two
fields of view:

- their intersection must cover at least :data:`MIN_FOV_OVERLAP` (50 %) of the T1c's box, and
- neither box may be more than :data:`MAX_FOV_VOLUME_RATIO` (4) times the volume of the other.

Geometry cannot prove that two volumes come from the same subject; this rule catches the usual
mix-ups (another study's sequence, another body part, a mislabelled slab).

Pipeline (the bundle's ``configs/inference.json``): the bundle's preprocessing transforms without the
file loader (``NormalizeIntensityd`` nonzero, channel-wise; orientation or spacing transforms, if a
bundle had them, are inverted afterwards), sliding windows of the inferer's ``roi_size``
(240 × 240 × 160; smaller images are padded) with its ``overlap`` (0.5), autocast on CUDA; then
sigmoid, ``Invertd``, threshold 0.5, and channels 0 = tumour core, 1 = whole tumour, 2 = enhancing
tumour collapsed to one labelmap: 4 where enhancing, else 1 where tumour core, else 2 where whole
tumour (edema), else 0.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, InvertibleTransform

from vila_m3.experts.bundle import BundleRunner, image_from_arrays, ras_affine
from vila_m3.experts.feedback import brats_feedback
from vila_m3.experts.registry import ExpertSpec, ResolvedArgument
from vila_m3.experts.result import ExpertInputError, ExpertRunError, SegmentationResult
from vila_m3.experts.runner import NetworkExpertRunner, StudyView
from vila_m3.imaging import Geometry, Volume

__all__ = [
    "EXPERT_NAME",
    "MAX_FOV_VOLUME_RATIO",
    "MIN_FOV_OVERLAP",
    "SEQUENCES",
    "SEQUENCE_ALIASES",
    "BratsExpert",
    "BratsRunner",
    "canonical_sequences",
    "check_same_space",
]

EXPERT_NAME = "BRATS"

#: The network's input channels, in order.
SEQUENCES: tuple[str, ...] = ("t1c", "t1", "t2", "flair")
_DISPLAY = {"t1c": "T1c", "t1": "T1", "t2": "T2", "flair": "FLAIR"}

#: Accepted sequence names → canonical name. Keys are matched case-insensitively, ignoring spaces,
#: ``-`` and ``_`` (``"T1-contrast"``, ``"t1_ce"`` and ``"T1CE"`` are all ``t1ce``).
SEQUENCE_ALIASES: Mapping[str, str] = {
    "t1c": "t1c",
    "t1ce": "t1c",
    "t1gd": "t1c",
    "t1contrast": "t1c",
    "t1post": "t1c",
    "t1": "t1",
    "t1w": "t1",
    "t2": "t2",
    "t2w": "t2",
    "flair": "flair",
    "t2flair": "flair",
}

#: Share of the T1c's field-of-view box another sequence's box must cover.
MIN_FOV_OVERLAP = 0.5
#: Largest ratio between the two field-of-view box volumes.
MAX_FOV_VOLUME_RATIO = 4.0
#: Grids closer than this (mm, direction cosines) are the same grid: no resampling.
_SAME_GRID_ATOL = 1e-4
_GEOMETRY_ATOL = 1e-3

#: Output label ids: (tumour core, edema = whole tumour only, enhancing tumour).
TUMOR_CORE, EDEMA, ENHANCING = 1, 2, 4


def _sequence_key(name: str) -> str:
    return "".join(ch for ch in str(name).casefold() if ch not in " -_")


def canonical_sequences(sequences: Mapping[str, Volume]) -> dict[str, Volume]:
    """``sequences`` keyed by canonical name, in channel order T1c, T1, T2, FLAIR.

    Raises:
        ExpertInputError: an unknown name, a sequence given twice (under two aliases), a missing
            sequence (the message names it), or a value that is not a Volume.
    """
    found: dict[str, tuple[str, Volume]] = {}
    for name, volume in sequences.items():
        canonical = SEQUENCE_ALIASES.get(_sequence_key(name))
        if canonical is None:
            valid = ", ".join(_DISPLAY[s] for s in SEQUENCES)
            raise ExpertInputError(
                f"BRATS does not know the MRI sequence {name!r}; it needs exactly {valid} "
                "(also accepted: T1ce, T1Gd, T1-contrast, T1w, T2w)"
            )
        if canonical in found:
            raise ExpertInputError(
                f"BRATS got the {_DISPLAY[canonical]} sequence twice ({found[canonical][0]!r} and {name!r})"
            )
        if not isinstance(volume, Volume):
            raise ExpertInputError(f"BRATS: the {_DISPLAY[canonical]} sequence is not a volume ({type(volume).__name__})")
        found[canonical] = (name, volume)
    missing = [_DISPLAY[s] for s in SEQUENCES if s not in found]
    if missing:
        raise ExpertInputError(
            f"BRATS needs four MRI sequences (T1c, T1, T2, FLAIR); missing: {', '.join(missing)}"
        )
    return {s: found[s][1] for s in SEQUENCES}


def _fov_box(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS box (min, max corners, mm) spanned by the outer faces of the grid's voxels."""
    corners = np.array(
        [[i, j, k] for i in (-0.5, geometry.shape[0] - 0.5) for j in (-0.5, geometry.shape[1] - 0.5)
         for k in (-0.5, geometry.shape[2] - 0.5)]
    )
    points = geometry.index_to_physical(corners)
    return points.min(axis=0), points.max(axis=0)


def check_same_space(reference: Geometry, other: Geometry, name: str = "sequence") -> None:
    """Raise :class:`ExpertInputError` when ``other`` does not describe the same part of the patient as
    ``reference`` (rule in the module docstring); ``name`` is used in the message."""
    lo_a, hi_a = _fov_box(reference)
    lo_b, hi_b = _fov_box(other)
    vol_a = float(np.prod(hi_a - lo_a))
    vol_b = float(np.prod(hi_b - lo_b))
    overlap = float(np.prod(np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0.0, None)))
    coverage = overlap / vol_a
    if coverage < MIN_FOV_OVERLAP:
        raise ExpertInputError(
            f"BRATS: the {name} and the T1c do not cover the same part of the patient (their fields of "
            f"view overlap on {coverage:.0%} of the T1c's; at least {MIN_FOV_OVERLAP:.0%} is needed). "
            "Are they from the same study?"
        )
    ratio = max(vol_a, vol_b) / min(vol_a, vol_b)
    if ratio > MAX_FOV_VOLUME_RATIO:
        raise ExpertInputError(
            f"BRATS: the {name}'s field of view is {ratio:.1f} times {'larger' if vol_b > vol_a else 'smaller'} "
            f"than the T1c's (at most {MAX_FOV_VOLUME_RATIO:g} allowed). Are they from the same study?"
        )


def _resample_onto(volume: Volume, reference: Geometry) -> np.ndarray:
    """``volume`` resampled onto ``reference`` (SimpleITK linear, 0 outside), float32 (z, y, x)."""
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    grid = reference.to_sitk(sitk.Image(list(reference.shape), sitk.sitkFloat32))
    resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


class BratsRunner(BundleRunner):
    """Runs BRATS from a bundle folder; the network is loaded once (on the first run) and kept.

    Args:
        bundle_dir: the ``brats_mri_segmentation`` bundle folder (real, or a stand-in from
            :func:`vila_m3.standins.tiny_bundles.make_tiny_brats_bundle`).
        device: torch device; None: CUDA if available, else CPU.
        spec: the BRATS expert of the registry (label names); None reads it from ``configs/experts.yaml``.
        trusted_sha256: SHA-256 sums of ``models/model.pt`` the caller vouches for.

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
        self.mode = str(self.bundle.get("inferer#mode", "constant"))

    # ---------------------------------------------------------------------------------- input

    def prepare(self, sequences: Mapping[str, Volume]) -> tuple[list[np.ndarray], Geometry, list[str]]:
        """Check the sequences and bring them onto the T1c grid.

        Returns:
            (four float32 (z, y, x) arrays in channel order T1c, T1, T2, FLAIR; the T1c geometry;
            names of the sequences that were resampled).

        Raises:
            ExpertInputError: see :func:`canonical_sequences` and :func:`check_same_space`; a CT or
                other non-MR modality; a 2D image.
        """
        ordered = canonical_sequences(sequences)
        for name, volume in ordered.items():
            modality = (volume.modality or "").strip().upper()
            if modality and modality != "MR":
                raise ExpertInputError(
                    f"BRATS segments brain MRI; the {_DISPLAY[name]} image's DICOM modality is {modality}, not MR"
                )
            if volume.is_2d or min(volume.array.shape) < 2:
                raise ExpertInputError(
                    f"BRATS needs 3D MRI volumes; the {_DISPLAY[name]} is a single 2D image "
                    f"({volume.geometry.shape[0]} x {volume.geometry.shape[1]} pixels)"
                )
        reference = ordered["t1c"].geometry
        arrays: list[np.ndarray] = []
        resampled: list[str] = []
        for name, volume in ordered.items():
            if volume.geometry.allclose(reference, atol=_SAME_GRID_ATOL):
                arrays.append(np.asarray(volume.array, dtype=np.float32))
                continue
            check_same_space(reference, volume.geometry, _DISPLAY[name])
            arrays.append(_resample_onto(volume, reference))
            resampled.append(_DISPLAY[name])
        return arrays, reference, resampled

    # ------------------------------------------------------------------------------------ run

    def run(self, sequences: Mapping[str, Volume]) -> SegmentationResult:
        """Segment the tumour sub-regions.

        Args:
            sequences: ``{sequence name: volume}`` with exactly T1c, T1, T2 and FLAIR (any order, any
                accepted alias), each a 3D MRI.

        Returns:
            A :class:`SegmentationResult` on the T1c's exact grid, values ⊆ {0, 1, 2, 4}
            (1 tumour core, 2 edema, 4 enhancing tumour); ``timings`` has ``resample`` too.

        Raises:
            ExpertInputError: bad input (the message says what); ExpertRunError: the network failed.
        """
        start = time.perf_counter()
        arrays, reference, resampled = self.prepare(sequences)
        resample_time = time.perf_counter() - start
        with self._run_lock:
            result = self._run(arrays, reference)
        result.notes.extend(f"The {name} was resampled onto the T1c's grid (linear)." for name in resampled)
        result.timings["resample"] = resample_time
        result.timings["total"] = time.perf_counter() - start
        return result

    def _run(self, arrays: list[np.ndarray], reference: Geometry) -> SegmentationResult:
        timings: dict[str, float] = {}
        step = time.perf_counter()
        network = self._network.get()
        timings["load"] = time.perf_counter() - step

        step = time.perf_counter()
        preprocessing = Compose(self.bundle.transforms("preprocessing"))
        try:
            data = preprocessing({"image": image_from_arrays(arrays, reference)})
        except Exception as err:
            raise ExpertRunError(f"BRATS preprocessing failed: {type(err).__name__}: {err}") from err
        image = data["image"]
        timings["preprocess"] = time.perf_counter() - step

        step = time.perf_counter()
        inferer = SlidingWindowInferer(
            roi_size=self.roi_size, sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode=self.mode
        )
        try:
            with torch.no_grad(), self._autocast(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Using a non-tuple sequence")  # inside MONAI's windows
                logits = inferer(image.unsqueeze(0).to(self.device), network)
        except torch.OutOfMemoryError as err:
            raise ExpertRunError(
                f"BRATS ran out of memory on {self.device} for a {tuple(image.shape[1:])} grid; free the GPU"
            ) from err
        except Exception as err:
            raise ExpertRunError(f"BRATS inference failed: {type(err).__name__}: {err}") from err
        timings["inference"] = time.perf_counter() - step

        step = time.perf_counter()
        labels = self._postprocess(image, logits[0].float(), preprocessing, reference)
        timings["postprocess"] = time.perf_counter() - step

        names = dict(self.spec.labels)
        return SegmentationResult(
            labels=Volume(array=labels, geometry=reference),
            label_names={i: names.get(i, f"label {i}") for i in (TUMOR_CORE, EDEMA, ENHANCING)},
            expert=EXPERT_NAME,
            argument=None,
            timings=timings,
            stand_in=self.stand_in,
            stand_in_note=self.bundle.info.stand_in,
            bundle_version=self.bundle.info.version,
        )

    def _postprocess(
        self, image: MetaTensor, logits: torch.Tensor, preprocessing: Compose, reference: Geometry
    ) -> np.ndarray:
        """(3, X, Y, Z) logits → (z, y, x) uint8 labels {0, 1, 2, 4} on the T1c grid."""
        steps = [Activationsd(keys="pred", sigmoid=True)]
        if any(isinstance(t, InvertibleTransform) for t in preprocessing.transforms):
            steps.append(
                Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True)
            )
        post = Compose([*steps, AsDiscreted(keys="pred", threshold=0.5)])
        pred = MetaTensor(logits.to(image.device), meta=dict(image.meta))
        try:
            with torch.no_grad():
                out = post({"image": image, "pred": pred})["pred"]
        except Exception as err:
            raise ExpertRunError(f"BRATS post-processing failed: {type(err).__name__}: {err}") from err
        spatial = tuple(out.shape[1:])
        affine = np.asarray(out.affine, dtype=float) if hasattr(out, "affine") else None
        if spatial != tuple(reference.shape) or (
            affine is not None and not np.allclose(affine, ras_affine(reference), atol=_GEOMETRY_ATOL)
        ):
            raise ExpertRunError(f"BRATS output did not return to the T1c grid (got {spatial}, expected {reference.shape})")
        tc, wt, et = (out[c] > 0 for c in range(3))
        zero = torch.zeros_like(tc, dtype=torch.uint8)
        labels = torch.where(
            et, ENHANCING, torch.where(tc, TUMOR_CORE, torch.where(wt, EDEMA, zero))
        ).to(torch.uint8)
        return np.ascontiguousarray(labels.cpu().numpy().transpose(2, 1, 0))


class BratsExpert(NetworkExpertRunner):
    """BRATS as an :class:`~vila_m3.experts.runner.ExpertRunner`: the study's four MRI sequences, no
    argument; the whole run is one job. The bundle is ``configs/models.yaml``'s location of the expert's
    first weights.

    Raises:
        BundleError: the bundle folder is not complete (the message names the missing file).
    """

    inputs = SEQUENCES

    def __init__(self, spec: ExpertSpec, models_dir: str | Path, device: str | None = None) -> None:
        super().__init__(spec, models_dir, device)
        self.network = BratsRunner(self.weights_path(), device=device, spec=spec)



    def check(self, study: StudyView) -> None:
        """The study must hold the four sequences (names as :func:`canonical_sequences` accepts them)."""
        if set(study.volumes) == {"image"}:
            raise ExpertInputError(f"{self.spec.name} needs the four MRI sequences (T1c, T1, T2, FLAIR); "
                                   "this study has one image")
        canonical_sequences(study.volumes)

    def run(self, study: StudyView, argument: ResolvedArgument) -> SegmentationResult:
        """Tumour sub-regions on the T1c's grid (:meth:`BratsRunner.run`); ``argument`` is always none."""
        return self.network.run(study.volumes)

    def feedback(self, result: SegmentationResult, question: str | None,
                 present_ids: Sequence[int] | None = None) -> str:
        """``... red and yellow: tumor core, only yellow: enhancing tumor, all colors: whole tumor`` (protocol §3)."""
        return brats_feedback(present_ids or (), question)

