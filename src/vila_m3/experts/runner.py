"""The one interface every expert implements (:class:`ExpertRunner`), and how a runner class is found.

An expert is a runner class plus an entry of ``configs/experts.yaml`` (or of an extra experts file, see
:mod:`vila_m3.experts.registry`) whose ``runner`` names the class as ``module:Class``, in the spirit of
MONAI's ``_target_``. The expert service builds one runner per expert, the chat loop and the MONAI
Label infer task talk to it only through this interface:

- construction from ``(spec, models_dir, device)`` (or a ``load(spec, models_dir, device)`` classmethod):
  reads configuration only; weights load on the first run and are freed by :meth:`ExpertRunner.release`;
- :meth:`ExpertRunner.check` — is this study something the expert runs on (modality, sequences); raises
  :class:`~vila_m3.experts.result.ExpertInputError` with a message a user can act on;
- :meth:`ExpertRunner.run` — the result on the whole study for a resolved argument. A runner may split it
  into ``prepare(study, argument)`` / ``infer(prepared)`` / ``finish(prepared, output)``: the service then
  queues only ``infer`` (the network's work) on the device;
- :meth:`ExpertRunner.feedback` — the result as the text for the model (EXPERT_PROTOCOL.md §3);
- :meth:`ExpertRunner.answer` — the result as the JSON of ``/infer/<expert>`` (a segmentation's labelmap
  travels as a file beside it);
- :meth:`ExpertRunner.request_argument` — the argument of an ``/infer`` request's params.

:class:`BaseExpertRunner` gives the usual behaviour of each; a new expert overrides what differs.
Importing this module loads no model (no torch).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, runtime_checkable

from vila_m3.experts.feedback import expert_feedback
from vila_m3.experts.registry import ConfigError, ExpertSpec, ResolvedArgument
from vila_m3.experts.result import ExpertInputError
from vila_m3.imaging import Volume

__all__ = [
    "REQUIRED_METHODS",
    "BaseExpertRunner",
    "ExpertRunner",
    "NetworkExpertRunner",
    "ExpertStudy",
    "StudyView",
    "build_runner",
    "explicit_labels",
    "load_runner_class",
    "study_from_paths",
]

#: Methods a runner class must have (callables); ``prepare``/``infer``/``finish`` are optional.
REQUIRED_METHODS = ("check", "run", "feedback", "answer", "request_argument", "release")
#: The study modality each ``input_modality`` of experts.yaml runs on (``cell`` has none of the chat's).
_STUDY_MODALITY = {"CT": "CT", "MRI": "MRI", "CXR": "CXR"}
#: DICOM Modality → study modality.
_DICOM_MODALITY = {"CT": "CT", "MR": "MRI", "MRI": "MRI", "CR": "CXR", "DX": "CXR", "CXR": "CXR"}


class StudyView(Protocol):
    """What a runner reads of a study (the chat's ``Study`` and :class:`ExpertStudy` both fit).

    Attributes:
        paths: ``{name: file or DICOM folder}``: ``image`` for one volume, ``t1c``/``t1``/``t2``/``flair``
            for four MRI sequences.
        volumes: the loaded volumes, same keys.
        keys: content keys of the volumes (path, sizes, mtimes), same keys: the result cache's key.
        modality: ``CT``, ``MRI`` or ``CXR``.
    """

    paths: dict[str, str]
    volumes: dict[str, Volume]
    keys: dict[str, str]
    modality: str


@dataclass
class ExpertStudy:
    """A study an expert runs on, built from files (:func:`study_from_paths`); fields as :class:`StudyView`."""

    paths: dict[str, str]
    volumes: dict[str, Volume]
    keys: dict[str, str]
    modality: str

    @property
    def primary(self) -> Volume:
        """The volume results are drawn on: ``image``, else the T1c, else the first."""
        return primary_volume(self)


def primary_volume(study: StudyView) -> Volume:
    """``study``'s main volume: ``image``, else ``t1c``, else the first one."""
    for name in ("image", "t1c"):
        if name in study.volumes:
            return study.volumes[name]
    return next(iter(study.volumes.values()))


def study_from_paths(paths: Mapping[str, str | Path], load: Callable[[str | Path], tuple[str, Volume]],
                     modality: str | None = None) -> ExpertStudy:
    """Read a study's files with ``load`` (a cached reader returning ``(key, volume)``).

    The modality is the primary volume's DICOM Modality when it says one; otherwise ``modality`` (a
    caller that named the expert, e.g. ``/infer/<expert>``, passes the expert's input modality), else
    ``MRI`` for several sequences and ``CT`` for one volume.
    """
    loaded = {str(name): load(path) for name, path in paths.items()}
    study = ExpertStudy({str(k): str(v) for k, v in paths.items()}, {n: v for n, (_, v) in loaded.items()},
                        {n: k for n, (k, _) in loaded.items()}, "")
    said = _DICOM_MODALITY.get((study.primary.modality or "").strip().upper())
    study.modality = said or modality or ("MRI" if len(paths) > 1 else "CT")
    return study


def explicit_labels(spec: ExpertSpec, label_ids: Sequence[int]) -> ResolvedArgument:
    """A resolved argument for explicit label ids (sorted, repeats removed), not one of the card's arguments."""
    ids = tuple(sorted({int(i) for i in label_ids}))
    return ResolvedArgument(group=None, label_ids=ids,
                            labels=MappingProxyType({spec.labels.get(i, f"label {i}"): i for i in ids}))


@runtime_checkable
class ExpertRunner(Protocol):
    """One expert, as the service, the chat and the infer tasks use it.

    Attributes:
        spec: the expert's registry entry.
        inputs: the study images it needs, by name: ``("image",)``, or the four MRI sequences.
    """

    spec: ExpertSpec
    inputs: ClassVar[tuple[str, ...]]

    def check(self, study: StudyView) -> None:
        """Raise ExpertInputError when ``study`` is not something this expert runs on (nothing is run)."""

    def run(self, study: StudyView, argument: ResolvedArgument) -> Any:
        """The result on the whole study (a SegmentationResult, or the expert's own result type)."""

    def feedback(self, result: Any, question: str | None, present_ids: Sequence[int] | None = None) -> str:
        """The result as text for the model; ``present_ids``: label ids on the rendered slice (segmentations)."""

    def answer(self, result: Any) -> dict[str, Any]:
        """The result as the JSON of ``/infer/<expert>``."""

    def request_argument(self, params: Mapping[str, Any]) -> ResolvedArgument:
        """The argument an ``/infer`` request's params ask for (ExpertInputError / UnknownArgument if invalid)."""

    def release(self) -> None:
        """Free the weights (GPU memory); the next run loads them again."""


class BaseExpertRunner:
    """The usual behaviour of each :class:`ExpertRunner` method; subclasses implement :meth:`run`.

    Args:
        spec: the expert's registry entry.
        models_dir: where weights are staged (``configs/models.yaml`` locations are relative to it).
        device: torch device name; None: CUDA when available, else CPU.
    """

    inputs: ClassVar[tuple[str, ...]] = ("image",)

    def __init__(self, spec: ExpertSpec, models_dir: str | Path, device: str | None = None) -> None:
        self.spec = spec
        self.models_dir = Path(models_dir)
        self.device_name = device

    def weights_path(self, index: int = 0) -> Path:
        """Where the expert's ``index``-th weights (of its ``weights`` list) are staged."""
        from vila_m3.models.manifest import ModelManifest

        if index >= len(self.spec.weights):
            raise ConfigError(f"expert {self.spec.name} lists {len(self.spec.weights)} weights, not {index + 1}")
        return ModelManifest.load()[self.spec.weights[index]].location(self.models_dir)

    def check(self, study: StudyView) -> None:
        """The study's modality must be the expert's ``input_modality``; a single image unless it needs several."""
        wanted = _STUDY_MODALITY.get(self.spec.input_modality)
        if wanted is not None and study.modality != wanted:
            raise ExpertInputError(f"{self.spec.name} runs on {self.spec.input_modality} images; "
                                   f"this study is {study.modality}")
        missing = [name for name in self.inputs if name not in study.volumes]
        if missing:
            raise ExpertInputError(f"{self.spec.name} needs the images {', '.join(self.inputs)}; "
                                   f"missing: {', '.join(missing)}")

    def run(self, study: StudyView, argument: ResolvedArgument) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement run")

    def feedback(self, result: Any, question: str | None, present_ids: Sequence[int] | None = None) -> str:
        """The text of the expert's ``feedback`` kind in experts.yaml (``feedback.expert_feedback``)."""
        predictions = getattr(result, "probabilities", None)
        return expert_feedback(self.spec, question, present_ids=present_ids, predictions=predictions)

    def answer(self, result: Any) -> dict[str, Any]:
        """A segmentation's ``label_names`` (``{name: id}``) and ``argument``; else the result's ``as_dict()``."""
        if hasattr(result, "labels") and hasattr(result, "ids_by_name"):
            return {"label_names": result.ids_by_name, "argument": result.argument}
        as_dict = getattr(result, "as_dict", None)
        return dict(as_dict()) if callable(as_dict) else {}

    def request_argument(self, params: Mapping[str, Any]) -> ResolvedArgument:
        """``params["argument"]`` (one of the card's arguments, or none) resolved by the registry entry."""
        argument = params.get("argument")
        if argument is not None and not isinstance(argument, str):
            raise ExpertInputError(f"argument must be text; valid arguments are {self.spec.valid_args_text()}")
        return self.spec.resolve_argument(argument)

    def release(self) -> None:
        """Nothing to free by default."""


class NetworkExpertRunner(BaseExpertRunner):
    """A runner around a network object, ``self.network``, that loads its weights at first use:
    ``loaded``, ``load_count`` and ``release`` are the network's."""

    network: Any

    @property
    def loaded(self) -> bool:
        """Whether the network is in memory now."""
        return self.network.loaded

    @property
    def load_count(self) -> int:
        """How many times the network has been loaded."""
        return self.network.load_count

    def release(self) -> None:
        """Free the network's weights (GPU memory); the next run loads them again."""
        self.network.release()


def load_runner_class(spec: ExpertSpec) -> type:
    """The class ``spec.runner`` names (``package.module:Class``), with the entry's ``python_path`` folders
    importable first.

    Raises:
        ConfigError: the expert has no runner, the module or class cannot be imported, or the class lacks a
            method of :data:`REQUIRED_METHODS` (the message names the expert and the class).
    """
    if not spec.runner:
        raise ConfigError(f"expert {spec.name} has no runner in this product")
    module_name, _, class_name = spec.runner.partition(":")
    where = f"expert {spec.name}: runner '{spec.runner}'"
    if not module_name or not class_name:
        raise ConfigError(f"{where} must be written as package.module:Class")
    for folder in spec.python_path:
        if folder not in sys.path:
            sys.path.append(folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the plug-in's own import error, named
        raise ConfigError(f"{where} cannot be imported: {type(err).__name__}: {err}") from err
    runner_class = getattr(module, class_name, None)
    if not isinstance(runner_class, type):
        raise ConfigError(f"{where}: module {module_name} has no class {class_name}")
    lacking = [name for name in REQUIRED_METHODS if not callable(getattr(runner_class, name, None))]
    if lacking:
        raise ConfigError(f"{where} is not an expert runner: it has no {', '.join(lacking)} "
                          "(see vila_m3.experts.runner.ExpertRunner)")
    if not isinstance(getattr(runner_class, "inputs", ("image",)), tuple):
        raise ConfigError(f"{where}: 'inputs' must be a tuple of image names")
    return runner_class


def build_runner(spec: ExpertSpec, models_dir: str | Path, device: str | None = None) -> ExpertRunner:
    """A runner of ``spec``: ``Class.load(spec, models_dir, device)`` when the class has it, else
    ``Class(spec, models_dir, device)``. ConfigError as :func:`load_runner_class`."""
    runner_class = load_runner_class(spec)
    if isinstance(inspect.getattr_static(runner_class, "load", None), classmethod):
        return runner_class.load(spec, models_dir, device)
    return runner_class(spec, models_dir, device)
