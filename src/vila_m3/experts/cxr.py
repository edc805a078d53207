"""The CXR expert: the TorchXRayVision ensemble of eight chest X-ray classifiers (EXPERT_PROTOCOL.md §6).

:class:`CxrRunner` loads the eight models named by the CXR expert of ``configs/experts.yaml`` once
(on first use; :meth:`CxrRunner.release` frees them) from ``<models_dir>/torchxrayvision/``, which is
given to torchxrayvision as its ``cache_dir``. It never downloads: the presence of every weight file is
checked, at the exact path xrv would read, before any xrv model is built, and a missing file raises
:class:`CxrUnavailable` naming it (xrv itself would start a download from GitHub).

Pre-processing (one image, every model):

1. grey ``[row, column]`` pixels from a :class:`~vila_m3.imaging.Volume` of shape (1, H, W) (PNG, JPEG
   and DICOM are read by :func:`vila_m3.imaging.read_volume`, which turns RGB into luminance);
2. 8-bit scale: integer pixels already within 0..255 are used as they are; anything else (16-bit or
   12-bit DICOM, signed or float pixels) is stretched linearly from its own minimum..maximum to 0..255
   (a constant image becomes 0), because the protocol normalises with ``maxval`` 255;
3. ``xrv.datasets.normalize(img, 255)`` → values in [-1024, 1024];
4. ``XRayCenterCrop``: the centred square of side min(H, W);
5. resize to each model's own input resolution (224 for the DenseNets, 512 for the ResNet) with
   ``XRayResizer`` (skimage, anti-aliased), so xrv never has to resize on its own.

Outputs: xrv applies its operating-point calibration (``op_threshs``) when a model is built by weights
name, so every output is a probability in [0, 1] with the model's operating point at 0.5. A class a
model was not trained on ('' in its targets) or has no threshold for (NaN) comes out as exactly 0.5;
such outputs are not predictions and never vote. Per class, the probability is the mean over the
class's voters (the expert's ``classification.voting``) that predict it; ``>= threshold`` is "yes".

Security: xrv reads DenseNet files with ``torch.load(weights_only=False)`` (whole pickled modules), so
the models directory must be trusted like code.
Limitations: MONOCHROME1 DICOM (bright air) is not inverted here (the volume does not carry the
photometric interpretation); the models expect MONOCHROME2.
"""

from __future__ import annotations

import gc
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from vila_m3.experts.feedback import classification_feedback
from vila_m3.experts.registry import (
    ClassificationSpec,
    ConfigError,
    ExpertRegistry,
    ExpertSpec,
    ResolvedArgument,
)
from vila_m3.experts.result import ExpertInputError, ExpertRunError
from vila_m3.experts.runner import NetworkExpertRunner, StudyView, primary_volume
from vila_m3.imaging import Volume, read_volume
from vila_m3.models.manifest import STAND_IN_MARKER, XRV_FOLDER, ModelManifest

__all__ = [
    "MAXVAL",
    "RUNNER_KEY",
    "ClassificationResult",
    "CxrExpert",
    "CxrInputError",
    "CxrRunner",
    "CxrUnavailable",
    "default_pathologies",
    "ensemble_vote",
    "prepare_cxr",
    "resize_cxr",
]

RUNNER_KEY = "vila_m3.experts.cxr:CxrExpert"
"""The ``runner`` value of the CXR expert in ``configs/experts.yaml``."""
MAXVAL = 255
"""The pixel maximum given to ``xrv.datasets.normalize`` (8-bit grey)."""
_RESOLUTION_IN_NAME = re.compile(r"res(\d+)")


class CxrInputError(ExpertInputError):
    """The image cannot be classified as a chest X-ray (3D volume, empty, non-finite pixels); a ValueError."""


class CxrUnavailable(ExpertRunError):
    """The ensemble cannot be loaded: weight files are missing or unreadable (a RuntimeError).

    Attributes:
        missing: the weight files that are not there (empty when a file is there but unreadable).
    """

    def __init__(self, message: str, missing: tuple[Path, ...] = ()):
        super().__init__(message)
        self.missing = missing


def _import_xrv() -> Any:
    """Import torchxrayvision, keeping the process's warning filters.

    ``torchxrayvision.models`` calls ``warnings.filterwarnings("ignore")`` when imported, which would
    silence every warning of the server; the filters are restored afterwards.
    """
    with warnings.catch_warnings():
        import torchxrayvision as xrv
    return xrv


def default_pathologies() -> tuple[str, ...]:
    """``xrv.datasets.default_pathologies``: the 18 classes, in the models' output order."""
    return tuple(_import_xrv().datasets.default_pathologies)


@dataclass(frozen=True)
class ClassificationResult:
    """What the CXR ensemble says about one image.

    Attributes:
        probabilities: ``{pathology: probability in [0, 1]}`` for the 18 pathologies in
            ``xrv.datasets.default_pathologies`` order (NaN if none of its voters predicts it).
        answers: ``{pathology: probability >= threshold}``, same order.
        per_model: ``{model id: {pathology: probability}}`` holding only the classes each model predicts
            (models in the expert's ``weights`` order).
        timings: seconds: ``read``, ``preprocess``, ``load`` (0 when already loaded), ``inference``,
            ``total``, and ``model:<id>`` per model.
        stand_in: True when the weights are the random stand-ins (marker file present), not a medical model.
        threshold: the probability at or above which a class is "yes".
    """

    probabilities: dict[str, float]
    answers: dict[str, bool]
    per_model: dict[str, dict[str, float]]
    timings: dict[str, float]
    stand_in: bool
    threshold: float = 0.5

    def feedback_text(self, question: str | None) -> str:
        """The result text sent back to the model (``The resulting predictions are:\\n...``, protocol §3)."""
        return classification_feedback(self.answers, question, self.threshold)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (NaN probabilities become None)."""

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {
            "probabilities": {name: clean(p) for name, p in self.probabilities.items()},
            "answers": dict(self.answers),
            "per_model": {m: {name: clean(p) for name, p in probs.items()} for m, probs in self.per_model.items()},
            "timings": dict(self.timings),
            "stand_in": self.stand_in,
            "threshold": self.threshold,
        }


def ensemble_vote(
    per_model: Mapping[str, Mapping[str, float]], classification: ClassificationSpec
) -> dict[str, float]:
    """Per-class probability: the mean over the class's voters that predict it (protocol §6).

    Args:
        per_model: ``{model id: {pathology: probability}}`` with only the classes each model predicts.
        classification: the classes (output order) and their voters.

    Returns:
        ``{pathology: mean probability}`` in ``classification.pathologies`` order; NaN where no voter
        predicts the class (or a voter's value is NaN for every voter).
    """
    result: dict[str, float] = {}
    for pathology in classification.pathologies:
        votes = [
            float(per_model[model_id][pathology])
            for model_id in classification.voters(pathology)
            if model_id in per_model and pathology in per_model[model_id]
        ]
        votes = [v for v in votes if not math.isnan(v)]
        result[pathology] = float(np.mean(votes)) if votes else math.nan
    return result


def _grey_pixels(volume: Volume) -> np.ndarray:
    """The image as float32 ``[row, column]`` grey values in 0..255 (step 2 of the module docstring)."""
    if not volume.is_2d:
        depth, height, width = volume.array.shape
        raise CxrInputError(
            f"the CXR expert classifies one 2D chest X-ray, but got a 3D volume of {depth} slices "
            f"(z, y, x = {depth}, {height}, {width}); send a radiograph (PNG, JPEG or a single DICOM image)"
        )
    pixels = volume.array[0]
    if pixels.size == 0:
        raise CxrInputError(f"the chest X-ray is empty (shape {pixels.shape})")
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8)
    if not np.issubdtype(pixels.dtype, np.number) or np.iscomplexobj(pixels):
        raise CxrInputError(f"the chest X-ray has non-numeric pixels (dtype {pixels.dtype})")
    if np.issubdtype(pixels.dtype, np.floating) and not np.all(np.isfinite(pixels)):
        raise CxrInputError("the chest X-ray has NaN or infinite pixel values")
    lo, hi = pixels.min(), pixels.max()
    if np.issubdtype(pixels.dtype, np.integer) and lo >= 0 and hi <= MAXVAL:
        return pixels.astype(np.float32)
    if hi == lo:
        return np.zeros(pixels.shape, dtype=np.float32)
    scaled = (pixels.astype(np.float64) - float(lo)) * (MAXVAL / (float(hi) - float(lo)))
    return np.clip(scaled, 0.0, MAXVAL).astype(np.float32)


def prepare_cxr(volume: Volume) -> np.ndarray:
    """Normalise and centre-crop a radiograph (steps 1–4 of the module docstring).

    Args:
        volume: a 2D image, array shape (1, H, W), any numeric pixel type.

    Returns:
        float32 array of shape (1, S, S), S = min(H, W), values in [-1024, 1024].

    Raises:
        CxrInputError: a 3D volume, an empty image, non-numeric or non-finite pixels.
    """
    xrv = _import_xrv()
    grey = _grey_pixels(volume)
    normalised = xrv.datasets.normalize(grey, MAXVAL).astype(np.float32)
    return np.ascontiguousarray(xrv.datasets.XRayCenterCrop()(normalised[np.newaxis]))


def resize_cxr(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a (1, S, S) image to (1, size, size) with xrv's ``XRayResizer`` (no-op at the same size)."""
    if image.shape[1:] == (size, size):
        return image
    return _import_xrv().datasets.XRayResizer(size)(image)


@dataclass(frozen=True)
class _Weights:
    """One ensemble member as configured: model id, xrv weights name, weight file."""

    model_id: str
    xrv_name: str
    path: Path


@dataclass(frozen=True)
class _Loaded:
    """One loaded ensemble member: the xrv module, its input side in pixels, the classes it predicts."""

    module: nn.Module
    resolution: int
    predicts: frozenset[str]


def _cxr_spec(registry: ExpertRegistry) -> ExpertSpec:
    """The configured expert whose runner is :class:`CxrExpert` (usable or not)."""
    for spec in registry.configured:
        if spec.runner == RUNNER_KEY:
            return spec
    raise ConfigError(f"no expert with runner '{RUNNER_KEY}' is configured")


class CxrRunner:
    """The CXR ensemble: eight TorchXRayVision models, loaded once, run on one radiograph at a time.

    Args:
        models_dir: the models directory; weights are read from ``<models_dir>/torchxrayvision/``.
        device: torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``...); None: CUDA if available, else CPU.
        spec: the CXR expert (its ``weights`` and ``classification``); None: the expert with runner
            ``cxr`` in ``configs/experts.yaml``.
        manifest: the model manifest; None: ``configs/models.yaml``.

    Construction only reads configs; models load on the first :meth:`run` (or :meth:`load`).
    Thread-safe: concurrent runs share the loaded models; loading happens once.

    Raises:
        ConfigError: the expert has no classification spec, or a weight id has no xrv name in the manifest.
    """

    def __init__(
        self,
        models_dir: str | os.PathLike[str],
        device: str | torch.device | None = None,
        spec: ExpertSpec | None = None,
        manifest: ModelManifest | None = None,
    ):
        self.models_dir = Path(models_dir).expanduser().resolve()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.spec = spec if spec is not None else _cxr_spec(ExpertRegistry.from_config())
        if self.spec.classification is None:
            raise ConfigError(f"expert {self.spec.name} has no 'classification' section")
        self.classification: ClassificationSpec = self.spec.classification
        manifest = manifest if manifest is not None else ModelManifest.load()
        weights = []
        for model_id in self.spec.weights:
            entry = manifest[model_id]
            xrv_name = entry.source.get("xrv_name")
            if not xrv_name:
                raise ConfigError(f"model {model_id} in the manifest has no source.xrv_name")
            weights.append(_Weights(model_id, str(xrv_name), entry.location(self.models_dir)))
        if not weights:
            raise ConfigError(f"expert {self.spec.name} lists no weights")
        self._weights: tuple[_Weights, ...] = tuple(weights)
        self._models: Mapping[str, _Loaded] | None = None
        self._stand_in = False
        self._lock = threading.Lock()

    @property
    def weights_folder(self) -> Path:
        """``<models_dir>/torchxrayvision``: xrv's ``cache_dir``."""
        return self.models_dir / XRV_FOLDER

    @property
    def model_ids(self) -> tuple[str, ...]:
        """The ensemble's model ids, in the expert's ``weights`` order."""
        return tuple(w.model_id for w in self._weights)

    @property
    def loaded(self) -> bool:
        """Whether the models are in memory."""
        return self._models is not None

    @property
    def stand_in(self) -> bool:
        """Whether the weights are the random stand-ins: as loaded, or (not loaded) as on disk now."""
        if self._models is not None:
            return self._stand_in
        return (self.weights_folder / STAND_IN_MARKER).is_file()

    def missing_files(self) -> list[Path]:
        """Weight files that are not present (empty: the ensemble can load)."""
        return [w.path for w in self._weights if not w.path.is_file()]

    def load(self) -> Mapping[str, nn.Module]:
        """Load the eight models (once) and return ``{model id: xrv module}``.

        Raises:
            CxrUnavailable: weight files are missing (checked before xrv is asked to build anything,
                so xrv never starts a download) or cannot be loaded.
            ConfigError: the manifest's file name is not the one xrv reads for that model, or the
                expert's classes are not xrv's default pathologies.
        """
        return MappingProxyType({model_id: m.module for model_id, m in self._ensure_loaded().items()})

    def release(self) -> None:
        """Drop the models and free their memory (a later run loads them again)."""
        with self._lock:
            self._models = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self, image: Volume | str | os.PathLike[str]) -> ClassificationResult:
        """Classify one chest X-ray.

        Args:
            image: a 2D :class:`Volume` (array (1, H, W)) or the path of a PNG, JPEG or DICOM file.

        Returns:
            The ensemble's :class:`ClassificationResult`.

        Raises:
            CxrInputError: the image is a 3D volume, empty or has non-finite pixels (checked before loading).
            VolumeReadError: the file cannot be read.
            CxrUnavailable: weights are missing or unreadable.
        """
        start = time.perf_counter()
        volume = image if isinstance(image, Volume) else read_volume(image)
        timings = {"read": time.perf_counter() - start}
        tick = time.perf_counter()
        prepared = prepare_cxr(volume)
        timings["preprocess"] = time.perf_counter() - tick
        tick = time.perf_counter()
        was_loaded = self.loaded
        models = self._ensure_loaded()
        stand_in = self._stand_in
        timings["load"] = 0.0 if was_loaded else time.perf_counter() - tick

        pathologies = self.classification.pathologies
        inputs: dict[int, torch.Tensor] = {}
        per_model: dict[str, dict[str, float]] = {}
        inference_start = time.perf_counter()
        with torch.inference_mode():
            for model_id, member in models.items():
                tick = time.perf_counter()
                if member.resolution not in inputs:
                    resized = resize_cxr(prepared, member.resolution)
                    inputs[member.resolution] = torch.from_numpy(resized)[None].to(self.device)
                output = member.module(inputs[member.resolution])[0].float().cpu().numpy()
                per_model[model_id] = {
                    name: float(output[index])
                    for index, name in enumerate(pathologies)
                    if name in member.predicts
                }
                timings[f"model:{model_id}"] = time.perf_counter() - tick
        timings["inference"] = time.perf_counter() - inference_start

        probabilities = ensemble_vote(per_model, self.classification)
        threshold = float(self.classification.threshold)
        answers = {name: (not math.isnan(p)) and p >= threshold for name, p in probabilities.items()}
        timings["total"] = time.perf_counter() - start
        return ClassificationResult(
            probabilities=probabilities,
            answers=answers,
            per_model=per_model,
            timings=timings,
            stand_in=stand_in,
            threshold=threshold,
        )

    def _ensure_loaded(self) -> Mapping[str, _Loaded]:
        """The loaded models, loading them under the lock on first use."""
        models = self._models
        if models is not None:
            return models
        with self._lock:
            if self._models is None:
                stand_in = (self.weights_folder / STAND_IN_MARKER).is_file()
                self._models = self._load_all()
                self._stand_in = stand_in
            return self._models

    def _load_all(self) -> Mapping[str, _Loaded]:
        """Check every file, then build each xrv model from it on ``self.device``."""
        missing = self.missing_files()
        if missing:
            names = ", ".join(str(p) for p in missing)
            raise CxrUnavailable(
                f"CXR weights missing ({len(missing)} of {len(self._weights)}): {names}; stage them in "
                f"{self.weights_folder} (see configs/models.yaml); nothing is downloaded",
                missing=tuple(missing),
            )
        xrv = _import_xrv()
        defaults = tuple(xrv.datasets.default_pathologies)
        if tuple(self.classification.pathologies) != defaults:
            raise ConfigError(
                f"expert {self.spec.name}: classification.pathologies must be xrv.datasets.default_pathologies "
                f"in that order: {list(defaults)}"
            )
        cache_dir = str(self.weights_folder)
        for w in self._weights:
            info = xrv.models.model_urls.get(w.xrv_name)
            if info is None:
                raise ConfigError(f"model {w.model_id}: torchxrayvision has no weights named {w.xrv_name!r}")
            # Exactly where xrv's get_weights looks; a file there means xrv does not download.
            expected = Path(os.path.expanduser(os.path.join(cache_dir, os.path.basename(info["weights_url"]))))
            if expected != w.path:
                raise ConfigError(
                    f"model {w.model_id}: the manifest path {w.path} is not where torchxrayvision reads "
                    f"{w.xrv_name!r} ({expected})"
                )
            if not expected.is_file():
                raise CxrUnavailable(f"CXR weights missing: {expected}", missing=(expected,))

        loaded: dict[str, _Loaded] = {}
        for w in self._weights:
            loaded[w.model_id] = self._load_one(xrv, w, cache_dir, defaults)
        return MappingProxyType(loaded)

    def _load_one(self, xrv: Any, w: _Weights, cache_dir: str, defaults: tuple[str, ...]) -> _Loaded:
        """Build one xrv model by weights name from ``cache_dir`` and describe what it predicts."""
        if w.xrv_name.startswith("densenet"):
            factory = xrv.models.DenseNet
        elif w.xrv_name.startswith("resnet"):
            factory = xrv.models.ResNet
        else:
            raise ConfigError(f"model {w.model_id}: unsupported torchxrayvision architecture {w.xrv_name!r}")
        try:
            module = factory(weights=w.xrv_name, cache_dir=cache_dir)
        except Exception as err:
            raise CxrUnavailable(
                f"CXR weights {w.path} ({w.model_id}) could not be loaded: {type(err).__name__}: {err}"
            ) from err
        module = module.to(self.device).eval()
        targets = list(module.targets)
        if len(targets) != len(defaults) or any(t not in ("", d) for t, d in zip(targets, defaults, strict=True)):
            raise ConfigError(f"model {w.model_id}: outputs {targets} are not aligned to xrv's default pathologies")
        op_threshs = getattr(module, "op_threshs", None)
        thresholds = (
            op_threshs.detach().float().cpu().numpy() if op_threshs is not None else np.zeros(len(defaults))
        )
        predicts = frozenset(
            name for name, target, thr in zip(defaults, targets, thresholds, strict=True)
            if target and not math.isnan(float(thr))
        )
        resolution = getattr(module, "input_resolution", None)
        if resolution is None:
            match = _RESOLUTION_IN_NAME.search(w.xrv_name)
            if match is None:
                raise ConfigError(f"model {w.model_id}: input resolution of {w.xrv_name!r} unknown")
            resolution = int(match.group(1))
        return _Loaded(module=module, resolution=int(resolution), predicts=predicts)


class CxrExpert(NetworkExpertRunner):
    """The CXR ensemble as an :class:`~vila_m3.experts.runner.ExpertRunner`: the study's radiograph, no
    argument; weights under ``<models_dir>/torchxrayvision/`` as the manifest says."""

    def __init__(self, spec: ExpertSpec, models_dir: str | Path, device: str | None = None) -> None:
        super().__init__(spec, models_dir, device)
        self.network = CxrRunner(models_dir, device=device, spec=spec)


    def check(self, study: StudyView) -> None:
        """The study must be a chest X-ray (the image itself is checked by :meth:`CxrRunner.run`)."""
        if study.modality != "CXR":
            raise ExpertInputError(f"{self.spec.name} runs on chest X-rays; this study is {study.modality}")

    def run(self, study: StudyView, argument: ResolvedArgument) -> ClassificationResult:
        """The ensemble's probabilities for the study's image; ``argument`` is always none."""
        return self.network.run(primary_volume(study))

    def feedback(self, result: ClassificationResult, question: str | None,
                 present_ids: Sequence[int] | None = None) -> str:
        """``The resulting predictions are:\n...`` (protocol §3)."""
        return result.feedback_text(question)

    def answer(self, result: ClassificationResult) -> dict[str, Any]:
        """Per finding: ``probabilities`` (0..1) and ``answers`` (yes / no); ``feedback``: the text without a question."""
        return {
            "probabilities": {name: float(p) for name, p in result.probabilities.items()},
            "answers": {name: "yes" if yes else "no" for name, yes in result.answers.items()},
            "feedback": result.feedback_text(None),
        }

