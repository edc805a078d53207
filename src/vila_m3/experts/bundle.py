"""MONAI bundles loaded offline from a local folder, with MONAI's own bundle API.

A bundle folder (as the MONAI model zoo ships it, or a tiny stand-in from
:mod:`vila_m3.standins.tiny_bundles`) holds::

    configs/inference.json   network_def, preprocessing transforms, inferer, ... (MONAI bundle syntax)
    configs/metadata.json    version, label dictionaries, and, for a stand-in, ``vila_m3_stand_in``
    models/model.pt          the network's state dict

:class:`MonaiBundle` reads the two configs with :class:`monai.bundle.ConfigParser`, instantiates
``network_def`` and the preprocessing transforms from them, and loads ``models/model.pt``. Nothing
here downloads anything: ``monai.bundle.download`` and MONAI Label's model-zoo lookups are never
called. Every problem with the folder is one :class:`BundleError` whose message names the file.

:class:`LazyNetwork` keeps one loaded network per runner: loaded on first use, freed by ``release()``.

Trust: ``inference.json`` is code (its ``$`` expressions are evaluated by MONAI), exactly as when the
bundle is run with ``python -m monai.bundle run``. Only point this at folders staged by the admin.
Python modules shipped inside a bundle (``scripts/``) are never imported by this module.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import threading
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose

from vila_m3.imaging import Geometry
from vila_m3.models.manifest import STAND_IN_FIELD

__all__ = [
    "CHECKPOINT_FILE",
    "INFERENCE_CONFIG",
    "KNOWN_CHECKPOINT_MD5",
    "LOADER_TRANSFORMS",
    "METADATA_CONFIG",
    "REQUIRED_FILES",
    "STAND_IN_FIELD",
    "BundleError",
    "BundleInfo",
    "LazyNetwork",
    "MonaiBundle",
    "PendingResample",
    "default_device",
    "image_from_arrays",
    "last_resample",
    "pending_resample",
    "preprocess_from_pixels",
    "ras_affine",
    "resample_input_dtype",
    "xyz_array",
]

INFERENCE_CONFIG = "configs/inference.json"
METADATA_CONFIG = "configs/metadata.json"
CHECKPOINT_FILE = "models/model.pt"
REQUIRED_FILES: tuple[str, ...] = (INFERENCE_CONFIG, METADATA_CONFIG, CHECKPOINT_FILE)

#: Published MD5 sums of the official ``models/model.pt`` files (the bundles' ``large_files.yml``).
#: Only a file with one of these sums may be unpickled with ``weights_only=False`` (see
#: :meth:`MonaiBundle.read_state_dict`).
KNOWN_CHECKPOINT_MD5: Mapping[str, str] = {
    "vista3d": "6ce45a8edde4400c5d28d5e74d7b61d5",
    "brats_mri_segmentation": "870e677b782a5184cbc48db1456b78e8",
}

#: ``_target_`` names of preprocessing transforms that read files; the runners hand the bundle an
#: image already in memory (see :func:`image_from_arrays`), so these are skipped.
LOADER_TRANSFORMS: frozenset[str] = frozenset({"LoadImaged", "LoadImage"})

#: Modules the bundles' ``imports`` sections pull in (``$import json`` ...) that their expressions use.
#: ``imports`` itself is never evaluated: it may import the bundle's own ``scripts`` package.
_EXPRESSION_GLOBALS: dict[str, str] = {
    "copy": "copy",
    "glob": "glob",
    "json": "json",
    "os": "os",
    "pathlib": "pathlib",
}

#: LPS (ITK, DICOM) ↔ RAS (MONAI, NIfTI) axis flip.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class BundleError(ValueError):
    """A bundle folder is missing, incomplete or unreadable; the message names the file and the problem."""


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch.device; None means the first CUDA GPU when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _numpy_safe_globals() -> list[Any]:
    """numpy scalar / dtype / array reconstructors that ``weights_only=True`` may unpickle (checkpoints
    often store metrics such as ``best_metric`` as numpy scalars). None of them runs arbitrary code."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray
    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")]
    return [np.dtype, np.ndarray, multiarray.scalar, multiarray._reconstruct, *dtypes]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict):
        raise BundleError(f"{path}: the top level must be a JSON object")
    return data


def _target_name(item: Any) -> str | None:
    """The class name of a component config (``"monai.transforms.Spacingd"`` → ``"Spacingd"``)."""
    if isinstance(item, Mapping) and isinstance(item.get("_target_"), str):
        return item["_target_"].rsplit(".", 1)[-1]
    return None


def _is_disabled(item: Any) -> bool:
    flag = item.get("_disabled_", False) if isinstance(item, Mapping) else False
    return flag is True or (isinstance(flag, str) and flag.strip().lower() == "true")


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle folder says about itself.

    Attributes:
        root: the bundle folder.
        name: ``metadata.json`` ``name`` (``"VISTA3D"``), else the folder name.
        version: ``metadata.json`` ``version`` (``"0.5.4"``).
        stand_in: the ``vila_m3_stand_in`` text of a stand-in bundle, None for a real one.
    """

    root: Path
    name: str
    version: str
    stand_in: str | None

    @property
    def is_stand_in(self) -> bool:
        """True for a stand-in bundle (tiny random weights; not a medical model)."""
        return self.stand_in is not None


class MonaiBundle:
    """One MONAI bundle folder, read with :class:`monai.bundle.ConfigParser`.

    Construction validates the folder (the three required files exist and both configs parse);
    the checkpoint is read only by :meth:`load_network`.

    Args:
        root: the bundle folder (the one holding ``configs/`` and ``models/``).
        overrides: ``{config id: value}`` set after reading inference.json, as ``monai.bundle run --id value``
            does (e.g. ``{"displayable_configs#highres": False}``).
        checkpoint: the weights file, relative to ``root``, for a bundle that ships several
            (default ``models/model.pt``).

    Raises:
        BundleError: missing folder or file, or a config that is not a JSON object.
    """

    def __init__(self, root: str | Path, overrides: Mapping[str, Any] | None = None,
                 checkpoint: str = CHECKPOINT_FILE) -> None:
        self.root = Path(root).expanduser().resolve()
        self.overrides = dict(overrides or {})
        self.checkpoint = checkpoint
        if not self.root.is_dir():
            raise BundleError(f"{self.root}: no such bundle folder")
        for name in dict.fromkeys((*REQUIRED_FILES[:2], checkpoint)):
            path = self.root / name
            if not path.is_file():
                raise BundleError(f"{path}: missing; a MONAI bundle needs {', '.join(REQUIRED_FILES)}")
        self.metadata: dict[str, Any] = _read_json(self.root / METADATA_CONFIG)
        self.inference: dict[str, Any] = _read_json(self.root / INFERENCE_CONFIG)
        if "network_def" not in self.inference:
            raise BundleError(f"{self.root / INFERENCE_CONFIG}: has no 'network_def'")
        version = self.metadata.get("version")
        if not isinstance(version, str) or not version:
            raise BundleError(f"{self.root / METADATA_CONFIG}: has no 'version'")
        stand_in = self.metadata.get(STAND_IN_FIELD)
        self.info = BundleInfo(
            root=self.root,
            name=str(self.metadata.get("name") or self.root.name),
            version=version,
            stand_in=str(stand_in) if stand_in else None,
        )
        self._device = torch.device("cpu")
        self.parser = self._make_parser()

    # ------------------------------------------------------------------------------------ config

    def _make_parser(self) -> ConfigParser:
        parser = ConfigParser(globals=dict(_EXPRESSION_GLOBALS))
        with warnings.catch_warnings():  # older metadata schemas: 'optional_packages_version' is renamed
            warnings.filterwarnings("ignore", message="Detected deprecated name")
            parser.read_meta(copy.deepcopy(self.metadata))
        parser.read_config(copy.deepcopy(self.inference))
        parser["bundle_root"] = str(self.root)
        parser["device"] = self._device
        for config_id, value in self.overrides.items():
            parser[config_id] = copy.deepcopy(value)
        if "metadata" in self.inference:  # VISTA3D re-reads metadata.json through an expression
            parser["metadata"] = copy.deepcopy(self.metadata)
        return parser

    def set_device(self, device: torch.device) -> None:
        """The value of the config's ``@device`` (used by e.g. ``EnsureTyped``); re-parses the config."""
        self._device = torch.device(device)
        self.parser = self._make_parser()

    def get(self, config_id: str, default: Any = None) -> Any:
        """The resolved content of ``config_id`` (``"patch_size"``, ``"inferer#overlap"``, ``"network_def"``).

        Components are instantiated and ``$`` expressions evaluated, as ``monai.bundle`` does.

        Raises:
            BundleError: the id exists but cannot be resolved (the message names inference.json).
        """
        if config_id not in self.parser:
            return default
        try:
            return self.parser.get_parsed_content(config_id)
        except Exception as err:
            raise BundleError(
                f"{self.root / INFERENCE_CONFIG}: cannot resolve '{config_id}' ({type(err).__name__}: {err})"
            ) from err

    def raw(self, config_id: str, default: Any = None) -> Any:
        """The unresolved config content of ``config_id`` (references and expressions as written)."""
        return self.parser.get(config_id, default)

    def _transform_list_id(self, section: str) -> str:
        """Config id of the list of transforms of ``section`` (``preprocessing``): its own ``transforms``
        list, or the list it refers to (VISTA3D: ``"$@preprocessing_transforms "``)."""
        transforms = self.raw(f"{section}#transforms")
        if isinstance(transforms, list):
            return f"{section}#transforms"
        if isinstance(transforms, str):
            ref = transforms.strip().lstrip("$").strip()
            if ref.startswith("@") and isinstance(self.raw(ref[1:]), list):
                return ref[1:]
        raise BundleError(f"{self.root / INFERENCE_CONFIG}: '{section}' is not a Compose of a list of transforms")

    def transforms(self, section: str = "preprocessing", skip: Iterable[str] = LOADER_TRANSFORMS) -> list[Any]:
        """The transforms of ``section``, instantiated from the bundle's config, in its order.

        Args:
            section: a ``Compose`` entry of inference.json.
            skip: ``_target_`` class names to leave out (by default the file loaders).
                Entries marked ``"_disabled_": true`` are left out too.
        """
        list_id = self._transform_list_id(section)
        skipped = set(skip)
        result = []
        with warnings.catch_warnings():
            # MONAI announces changed argument defaults (Orientationd labels) at every instantiation
            warnings.filterwarnings("ignore", message=".*Current default value of argument", category=FutureWarning)
            for index, item in enumerate(self.raw(list_id)):
                if _is_disabled(item) or _target_name(item) in skipped:
                    continue
                result.append(self.get(f"{list_id}#{index}"))
        return result

    def transform_names(self, section: str = "preprocessing") -> list[str]:
        """``_target_`` class names of ``section``'s transforms, in order (disabled ones left out)."""
        items = self.raw(self._transform_list_id(section))
        return [name for item in items if not _is_disabled(item) and (name := _target_name(item))]

    # ----------------------------------------------------------------------------------- weights

    def checkpoint_is_known(self, trusted_sha256: Iterable[str] = ()) -> bool:
        """Whether ``models/model.pt`` is a known-safe file: its MD5 is one of :data:`KNOWN_CHECKPOINT_MD5`
        (the official zoo files) or its SHA-256 is in ``trusted_sha256`` (e.g. recorded by
        ``vila-m3 models pull``)."""
        path = self.root / self.checkpoint
        if _file_md5(path) in set(KNOWN_CHECKPOINT_MD5.values()):
            return True
        trusted = {s.lower() for s in trusted_sha256 if s}
        return bool(trusted) and _file_sha256(path) in trusted

    def read_state_dict(self, trusted_sha256: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The network weights of ``models/model.pt`` as a state dict on the CPU.

        ``torch.load`` runs with ``weights_only=True`` (tensors, containers and numpy scalar / dtype
        metadata only; no code runs while reading). A checkpoint that pickles other Python objects is
        refused, unless it is a known-safe local file (:meth:`checkpoint_is_known`: the official
        zoo file by its published MD5, or a SHA-256 the caller vouches for); only then is it read
        again with ``weights_only=False``, deliberately. The checkpoint may be a bare state dict or
        ``{"model": state_dict, ...}`` as MONAI's CheckpointSaver writes it; a ``module.`` prefix
        (DataParallel) is removed.

        Raises:
            BundleError: unreadable, corrupt or truncated file, refused pickle, or no state dict inside.
        """
        path = self.root / self.checkpoint
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if not self.checkpoint_is_known(trusted_sha256):
                reason = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
                raise BundleError(
                    f"{path}: not a plain checkpoint of tensors (torch.load weights_only=True refused it: "
                    f"{reason}); it is not a known file either, so it is not unpickled"
                ) from err
            try:
                checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # known-safe, see docstring
            except Exception as again:
                raise BundleError(f"{path}: not a readable PyTorch checkpoint ({type(again).__name__})") from again
        except (RuntimeError, KeyError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError) as err:
            raise BundleError(
                f"{path}: not a readable PyTorch checkpoint (corrupt or truncated: {type(err).__name__})"
            ) from err
        state = checkpoint
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
            state = checkpoint["model"]
        if not isinstance(state, Mapping) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise BundleError(f"{path}: holds no state dict of tensors (got {type(checkpoint).__name__})")
        if all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        return dict(state)

    def load_network(
        self, device: str | torch.device | None = None, trusted_sha256: Iterable[str] = ()
    ) -> torch.nn.Module:
        """``network_def`` instantiated from inference.json, with the weights of ``models/model.pt``
        (strict key and shape match), moved to ``device`` and put in eval mode.

        Raises:
            BundleError: the network cannot be built, or the weights do not fit it (the message names
                model.pt and the mismatching keys).
        """
        device = default_device(device)
        try:
            # a parser of its own, dropped afterwards, so that no config cache keeps the network alive
            network = self._make_parser().get_parsed_content("network_def")
        except Exception as err:
            raise BundleError(
                f"{self.root / INFERENCE_CONFIG}: cannot build 'network_def' ({type(err).__name__}: {err})"
            ) from err
        if not isinstance(network, torch.nn.Module):
            raise BundleError(f"{self.root / INFERENCE_CONFIG}: 'network_def' is not a torch module")
        state = self.read_state_dict(trusted_sha256)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as err:
            expected = network.state_dict()
            missing = sorted(set(expected) - set(state))
            unexpected = sorted(set(state) - set(expected))
            shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
            details = "; ".join(
                f"{label} {len(keys)} (e.g. {keys[0]})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                if keys
            )
            raise BundleError(
                f"{self.root / self.checkpoint}: the weights do not fit the network_def of "
                f"{INFERENCE_CONFIG}: {details or err}"
            ) from err
        return network.to(device).eval()


def xyz_array(array: np.ndarray, dtype: Any = None, out: np.ndarray | None = None) -> np.ndarray:
    """A (z, y, x) array as a C-contiguous (x, y, z) array of ``dtype`` (None: its own), in one pass.

    MONAI's resampling wants (X, Y, Z)-contiguous memory (its ``AffineTransform`` calls
    ``.contiguous()``); a plain ``np.ascontiguousarray(array.transpose(2, 1, 0))`` reads the input with a
    stride of a whole slice for every output voxel (1.6 s for a 512 × 512 × 200 CT on two cores). Copying
    one coronal slab at a time (a (z, x) plane, transposed) keeps the reads in cache, and the dtype
    conversion happens in the same pass. ``out``: an (x, y, z) array to fill instead of a new one.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a (z, y, x) array, got shape {array.shape}")
    if out is None:
        out = np.empty(array.shape[::-1], dtype=array.dtype if dtype is None else dtype)
    for y in range(array.shape[1]):
        out[:, y, :] = array[:, y, :].T
    return out


def image_from_arrays(arrays: Sequence[np.ndarray], geometry: Geometry, dtype: Any = np.float32) -> MetaTensor:
    """An image as MONAI's ``LoadImaged`` gives it, from (z, y, x) arrays on one grid.

    One array gives a channel-less (X, Y, Z) MetaTensor (``original_channel_dim`` "no_channel", so the
    bundle's ``EnsureChannelFirstd`` adds the channel); several give a (C, X, Y, Z) stack, as
    ``LoadImaged`` does for a list of files. The affine is ``geometry`` in MONAI's RAS convention.
    Each array is transposed and converted in one cache-friendly pass (:func:`xyz_array`).

    Args:
        arrays: voxel arrays in (z, y, x) order, each of shape ``geometry.shape[::-1]``.
        geometry: their common grid (LPS).
        dtype: numpy dtype of the voxels (float32, as ``LoadImaged`` gives them); None keeps the arrays' own.
    """
    if len(arrays) == 1:
        data = xyz_array(arrays[0], dtype)
    else:
        first = np.asarray(arrays[0])
        data = np.empty((len(arrays), *first.shape[::-1]), dtype=first.dtype if dtype is None else dtype)
        for channel, array in enumerate(arrays):
            xyz_array(array, out=data[channel])
    return _loaded_image(torch.from_numpy(data), geometry, channels=len(arrays))


def _loaded_image(data: torch.Tensor, geometry: Geometry, channels: int) -> MetaTensor:
    """``data`` with the affine and metadata ``LoadImaged`` gives an image on ``geometry``."""
    affine = torch.as_tensor(_LPS_TO_RAS @ geometry.affine_lps, dtype=torch.float64)
    meta = {
        "original_affine": affine.clone(),
        "spatial_shape": np.asarray(geometry.shape),
        "original_channel_dim": "no_channel" if channels == 1 else 0,
        "space": "RAS",
        "filename_or_obj": "",
    }
    return MetaTensor(data, affine=affine, meta=meta)


def ras_affine(geometry: Geometry) -> np.ndarray:
    """``geometry``'s (4, 4) voxel → RAS mm affine, as MONAI stores it."""
    return _LPS_TO_RAS @ geometry.affine_lps


def last_resample(transforms: Sequence[Any]) -> int | None:
    """Index of the last ``Spacingd`` among instantiated preprocessing ``transforms`` (None if none).

    The steps after it work on the model's (small) grid and are cheap to invert with MONAI; undoing the
    resampling itself onto the input's full grid is the costly step (see :func:`pending_resample`).
    """
    from monai.transforms import Spacingd

    found = [i for i, transform in enumerate(transforms) if isinstance(transform, Spacingd)]
    return found[-1] if found else None


#: Integer and float pixel types that float32 (``LoadImaged``'s output) holds exactly.
_EXACT_IN_FLOAT32 = frozenset(np.dtype(t) for t in ("bool", "int8", "uint8", "int16", "uint16", "float32"))


def resample_input_dtype(transforms: Sequence[Any], pixel_dtype: Any) -> np.dtype:
    """The dtype to hand the image to ``transforms`` in: float32, as ``LoadImaged`` gives it, unless the
    steps before the resampling only add a channel or move the data (``EnsureChannelFirstd``,
    ``EnsureTyped`` without a dtype) and the pixels are exact in float32; then the resampling's own
    computation dtype (float64 for ``Spacingd``), whose conversion MONAI would otherwise make as one
    more full-volume pass. The numbers the resampling sees are the same either way."""
    float32 = np.dtype(np.float32)
    at = last_resample(transforms)
    if at is None or np.dtype(pixel_dtype) not in _EXACT_IN_FLOAT32 or not _only_move(transforms[:at]):
        return float32
    dtypes = {np.dtype(torch.empty(0, dtype=d).numpy().dtype) if isinstance(d, torch.dtype) else np.dtype(d)
              for d in transforms[at].dtype}
    return dtypes.pop() if len(dtypes) == 1 else float32


def _only_move(transforms: Sequence[Any]) -> bool:
    """Whether ``transforms`` only add a channel or move the data (``EnsureChannelFirstd``,
    ``EnsureTyped`` without a dtype): the pixel values reach the next step unchanged."""
    from monai.transforms import EnsureChannelFirstd, EnsureTyped

    for transform in transforms:
        if isinstance(transform, EnsureTyped) and getattr(transform.converter, "dtype", None) is None:
            continue
        if not isinstance(transform, EnsureChannelFirstd):
            return False
    return True


def preprocess_from_pixels(transforms: Sequence[Any], data: dict, pixels: np.ndarray, geometry: Geometry,
                           key: str = "image") -> dict | None:
    """``transforms`` (a bundle's preprocessing, loaders left out) run on ``data`` with ``key`` = the
    (z, y, x) ``pixels`` on ``geometry``, the resampling done straight from the pixels; None when the
    preprocessing is not of the shape this handles (the caller then runs it as usual).

    The steps before the last ``Spacingd`` must only add a channel or move the data (CPU), and the
    resampling must be one channel, trilinear, ``align_corners`` off, ``border`` / ``zeros`` padding,
    float64, per-axis (no rotation between the grids). Then ``Spacingd`` runs lazily (MONAI computes
    the output grid and its record for ``Invertd``, no voxels), the voxels come from
    :func:`~vila_m3.imaging.resample.linear_to_grid_zyx` on the touched pixels only (no full-volume
    float copy or transpose), rounded to float32 as ``Spacingd`` returns them, and the record is
    stored as the eager ``Spacingd`` stores it. The steps after it run unchanged.
    """
    from monai.transforms import Compose
    from monai.utils import LazyAttr, TraceKeys

    from vila_m3.imaging.resample import axis_aligned, linear_to_grid_zyx

    at = last_resample(transforms)
    pixels = np.asarray(pixels)
    if at is None or pixels.ndim != 3 or not _only_move(transforms[:at]) or list(transforms[at].keys) != [key]:
        return None
    view = _loaded_image(torch.from_numpy(pixels).permute(2, 1, 0), geometry, channels=1)  # no copy
    data = Compose(transforms[:at])({**data, key: view})
    image = data[key]
    if not isinstance(image, MetaTensor) or image.device.type != "cpu" or image.data_ptr() != view.data_ptr():
        return None
    lazy = transforms[at](data, lazy=True)
    image = lazy[key]
    if len(image.pending_operations) != 1 or tuple(image.shape) != (1, *pixels.shape[::-1]):
        return None
    operation = dict(image.pending_operations[0])
    info = operation.get(TraceKeys.EXTRA_INFO) or {}
    if operation.get(LazyAttr.AFFINE) is None:
        return None
    xform = np.asarray(torch.as_tensor(operation[LazyAttr.AFFINE]).cpu(), dtype=np.float64)
    shape = tuple(int(n) for n in operation.get(LazyAttr.SHAPE) or ())
    if (info.get("mode") != "bilinear" or info.get("padding_mode") not in ("border", "zeros")
            or info.get("align_corners") is not False or info.get("dtype") != "float64" or len(shape) != 3
            or xform.shape != (4, 4) or not axis_aligned(xform)
            or (np.allclose(xform, np.eye(4)) and shape == pixels.shape[::-1])):  # MONAI's no-op case
        return None
    values = linear_to_grid_zyx(pixels, xform, shape, padding=info["padding_mode"])
    voxels = torch.from_numpy(np.ascontiguousarray(values.transpose(2, 1, 0), dtype=np.float32))[None]
    for name in LazyAttr:
        operation.pop(name.value, None)
    operation[TraceKeys.LAZY] = False
    meta = dict(image.meta)
    meta.pop("affine", None)
    resampled = MetaTensor(voxels, affine=image.peek_pending_affine(), meta=meta,
                           applied_operations=[*image.applied_operations, operation])
    return Compose(transforms[at + 1:])({**lazy, key: resampled})


@dataclass(frozen=True)
class PendingResample:
    """A ``Spacingd`` step still to be undone on a prediction (MONAI's record of it).

    Attributes:
        target_affine: (4, 4) voxel → RAS mm affine of the grid before the resampling (the input's).
        target_shape: that grid's (X, Y, Z) voxels.
        padding: the resampling's padding mode (``border`` by default in MONAI).
        dtype: the resampling's computation dtype (``Spacingd``: float64).
    """

    target_affine: np.ndarray
    target_shape: tuple[int, ...]
    padding: str
    dtype: torch.dtype = torch.float64

    def index_map(self, source_affine: np.ndarray) -> np.ndarray:
        """(4, 4) map from a target voxel index to a continuous index of the grid whose affine is
        ``source_affine``, computed as MONAI's ``spatial_resample`` does (``solve(source, target)``)."""
        return np.linalg.solve(np.asarray(source_affine, dtype=np.float64), self.target_affine)


def pending_resample(pred: Any) -> PendingResample | None:
    """The resampling left to undo on ``pred`` (a MetaTensor after ``Invertd`` of the later steps), when
    it is the only operation left and one that nearest-neighbour index maps can undo exactly as MONAI's
    inverse would (no lazy or pending state, ``align_corners`` off, ``border`` or ``zeros`` padding)."""
    operations = list(getattr(pred, "applied_operations", None) or [])
    pending = list(getattr(pred, "pending_operations", None) or [])
    if len(operations) != 1 or pending:
        return None
    operation = operations[0]
    info = operation.get("extra_info") or {}
    if operation.get("class") != "SpatialResample" or operation.get("lazy"):
        return None
    if info.get("align_corners") not in (False, "none", None) or info.get("padding_mode") not in ("border", "zeros"):
        return None
    affine, size = info.get("src_affine"), operation.get("orig_size")
    dtype = getattr(torch, str(info.get("dtype", "float64")), None)
    if affine is None or size is None or len(size) != 3 or not isinstance(dtype, torch.dtype):
        return None
    return PendingResample(np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64),
                           tuple(int(n) for n in size), str(info["padding_mode"]), dtype)


class LazyNetwork:
    """A bundle's network, loaded on first use and kept until :meth:`release`.

    Thread-safe: concurrent first uses load it once. ``load_count`` says how many times it was loaded.

    Args:
        bundle_dir: the bundle folder, validated now (:class:`BundleError` at once if incomplete), or a
            :class:`MonaiBundle` already read (with its overrides and weights file).
        device: where the network runs; None: CUDA if available, else CPU.
        trusted_sha256: SHA-256 sums of ``models/model.pt`` the caller vouches for (see
            :meth:`MonaiBundle.read_state_dict`).
    """

    def __init__(
        self, bundle_dir: str | Path | MonaiBundle, device: str | torch.device | None = None,
        trusted_sha256: Iterable[str] = (),
    ) -> None:
        self.device = default_device(device)
        self.bundle = bundle_dir if isinstance(bundle_dir, MonaiBundle) else MonaiBundle(bundle_dir)
        self.bundle.set_device(self.device)
        self.trusted_sha256 = tuple(trusted_sha256)
        self.load_count = 0
        self._network: torch.nn.Module | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the network is in memory now."""
        return self._network is not None

    def get(self) -> torch.nn.Module:
        """The network in eval mode on ``device`` (loaded now if it is not yet)."""
        with self._lock:
            if self._network is None:
                self._network = self.bundle.load_network(self.device, self.trusted_sha256)
                self.load_count += 1
            return self._network

    def release(self) -> None:
        """Drop the network (GPU memory is returned to the driver's cache and emptied)."""
        with self._lock:
            self._network = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class BundleRunner:
    """What every bundle-backed expert runner shares: the network loaded once on first use and kept
    until :meth:`release`, the bundle's settings, the expert's registry entry, and a run lock.

    Subclasses set ``EXPERT_NAME`` (the registry name) and implement ``run``.

    Args:
        bundle_dir: the bundle folder (real, or a tiny stand-in in the same layout), or a :class:`MonaiBundle`.
        device: torch device; None: CUDA if available, else CPU.
        spec: the expert's registry entry; None reads it from ``configs/experts.yaml``.
        trusted_sha256: SHA-256 sums of ``models/model.pt`` the caller vouches for (see
            :meth:`MonaiBundle.read_state_dict`).

    Raises:
        BundleError: the folder is not a complete bundle (the message names the missing file).
    """

    EXPERT_NAME = ""

    def __init__(self, bundle_dir: str | Path | MonaiBundle, device: str | torch.device | None = None, spec: Any = None,
                 trusted_sha256: Iterable[str] = ()) -> None:
        from vila_m3.experts.registry import ExpertRegistry

        self._network = LazyNetwork(bundle_dir, device, trusted_sha256)
        self.bundle = self._network.bundle
        self.spec = spec if spec is not None else ExpertRegistry.from_config().configured_spec(self.EXPERT_NAME)
        self._run_lock = threading.Lock()
        # The sliding-window settings of the bundle's inferer.
        self.roi_size = tuple(int(v) for v in self._setting("inferer#roi_size"))
        self.overlap = float(self._setting("inferer#overlap"))
        self.sw_batch_size = int(self.bundle.get("inferer#sw_batch_size", 1))
        self._transforms: list | None = None
        self._transforms_lock = threading.Lock()

    def _preprocessing(self) -> Compose:
        """The bundle's preprocessing, instantiated once (MONAI keeps per-call state on the data)."""
        with self._transforms_lock:
            if self._transforms is None:
                self._transforms = self.bundle.transforms("preprocessing")
            return Compose(self._transforms)

    def _autocast(self) -> Any:
        """Mixed precision on CUDA (the bundles' evaluators run with amp); none on a CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda")
        return torch.autocast("cpu", enabled=False)

    def _setting(self, config_id: str) -> Any:
        """A required value of the bundle's ``inference.json``."""
        value = self.bundle.get(config_id)
        if value is None:
            raise BundleError(f"{self.bundle.root / INFERENCE_CONFIG}: has no '{config_id}'")
        return value

    @property
    def device(self) -> torch.device:
        """Where the network runs."""
        return self._network.device

    @property
    def stand_in(self) -> bool:
        """True when the bundle is a stand-in (tiny random weights)."""
        return self.bundle.info.is_stand_in

    @property
    def load_count(self) -> int:
        """How many times the network has been loaded (1 after any number of runs without release)."""
        return self._network.load_count

    @property
    def loaded(self) -> bool:
        """Whether the network is in memory now."""
        return self._network.loaded

    def release(self) -> None:
        """Free the network (and its GPU memory); the next run loads it again."""
        self._network.release()
