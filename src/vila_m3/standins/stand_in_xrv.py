"""Stand-in TorchXRayVision weights with RANDOM values, in exactly the files xrv reads.

They exist so that the CXR expert's real loading path (``xrv.models.DenseNet(weights=..., cache_dir=...)``
and ``xrv.models.ResNet(...)``) can be run and tested without the released weights, which cannot be
downloaded here. They are not a medical model: their predictions are random.

On-disk format, as torchxrayvision 1.5.7 loads it (``torchxrayvision/models.py``):

- DenseNet-121 files (``*-densenet121-d121-...-best.pt``) hold a **whole pickled module**: xrv calls
  ``torch.load(..., weights_only=False)``, walks ``.modules()`` and copies ``.state_dict()`` into a fresh
  ``xrv.models.DenseNet`` (strict). The stand-in pickles an ``xrv.models.DenseNet`` built without weights
  and without ``op_threshs`` (a registered ``op_threshs`` tensor would be an unexpected key).
- The ResNet-50 file (``*-resnet50-test512-e400-state.pt``) holds a **state dict** of a torchvision
  ``resnet50(num_classes=18)`` whose ``conv1`` takes one channel; xrv loads it into that network.
- File names are the basenames of xrv's ``weights_url`` and equal the paths of ``configs/models.yaml``;
  they go to ``<models_dir>/torchxrayvision/``, the folder the runner passes to xrv as ``cache_dir``.

Calibration: xrv attaches the operating-point thresholds (``op_threshs``) and the input resolution from
its own table (``xrv.models.model_urls``) whenever a model is built with ``weights=<name>``, not from the
file. Stand-ins are loaded the same way, so their outputs go through the same ``op_norm`` rescaling as
the real ones (a class with a NaN threshold is reported as exactly 0.5, a class a dataset lacks too).

Values: convolutions He-normal (as xrv's own initialisation), batch norms identity. The networks are not
trained, so their features are large (no batch statistics); the classifier weights are scaled so that
the image moves the logits by about one unit and the biases are drawn around each architecture's
typical operating point (sigmoid ≈ 0.05 for the DenseNets, ≈ 0.51 for the ResNet), which gives a mix
of "yes" and "no" answers instead of all-saturated outputs. To keep writing fast, the seven DenseNet
files share one random backbone and differ in their classifier, drawn from a generator seeded by
``seed`` and the model id, so the ensemble members disagree.

A marker file ``torchxrayvision/VILA_M3_STAND_IN.txt`` says what these are; the runner reports
``stand_in=True`` when it is there. Writing all eight files (≈ 290 MB) takes a few seconds on CPU.
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vila_m3.models.manifest import STAND_IN_MARKER, XRV_FOLDER, ModelEntry, ModelManifest

__all__ = [
    "STAND_IN_MARKER",
    "STAND_IN_NOTE",
    "XRV_FOLDER",
    "make_stand_in_xrv_weights",
    "xrv_entries",
]

STAND_IN_NOTE = "tiny random weights for tests; not a medical model"
XRV_KIND = "xrv_weights"

_NUM_CLASSES = 18  # len(xrv.datasets.default_pathologies): every xrv weight file has 18 outputs
# (weight std, bias mean, bias std) of the last linear layer, per architecture; see the module docstring.
_DENSENET_HEAD = (1e-4, -3.0, 1.5)
_RESNET_HEAD = (3e-8, 0.05, 0.3)


def xrv_entries(manifest: ModelManifest | None = None) -> list[ModelEntry]:
    """The manifest's TorchXRayVision entries (kind ``xrv_weights``), in manifest order."""
    manifest = manifest if manifest is not None else ModelManifest.load()
    return [entry for entry in manifest.entries.values() if entry.kind == XRV_KIND]


def _import_xrv():
    """Import torchxrayvision without letting it silence every warning of the process.

    ``torchxrayvision.models`` calls ``warnings.filterwarnings("ignore")`` at import time; the filters
    are restored afterwards.
    """
    with warnings.catch_warnings():
        import torchxrayvision as xrv
    return xrv


def _model_seed(seed: int, model_id: str) -> int:
    """A per-file generator seed: stable across runs and Python versions (CRC32, not ``hash``)."""
    return (int(seed) * 1_000_003 + zlib.crc32(model_id.encode("utf-8"))) % (2**63 - 1)


@torch.no_grad()
def _randomize_backbone(module: nn.Module, generator: torch.Generator) -> None:
    """Fill the convolutions and batch norms of ``module`` in place.

    Conv weights: normal(0, sqrt(2 / fan_in)) from ``generator``, biases 0; batch norm: weight 1,
    bias 0, running mean 0, running var 1 (identity in eval mode).
    """
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            fan_in = sub.weight[0].numel()
            sub.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
            if sub.bias is not None:
                sub.bias.zero_()
        elif isinstance(sub, nn.BatchNorm2d):
            sub.weight.fill_(1.0)
            sub.bias.zero_()
            sub.running_mean.zero_()
            sub.running_var.fill_(1.0)
            sub.num_batches_tracked.zero_()


@torch.no_grad()
def _randomize_head(module: nn.Module, generator: torch.Generator, head: tuple[float, float, float]) -> None:
    """Fill the linear layers of ``module`` in place: weight normal(0, head[0]), bias normal(head[1], head[2])."""
    weight_std, bias_mean, bias_std = head
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.weight.normal_(0.0, weight_std, generator=generator)
            sub.bias.normal_(bias_mean, bias_std, generator=generator)


def _meta_built(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module without paying for its default initialisation (meta device, then empty CPU storage)."""
    with torch.device("meta"):
        module = factory()
    return module.to_empty(device="cpu")


def _densenet(xrv) -> nn.Module:
    """An ``xrv.models.DenseNet`` (121, one input channel, 18 outputs) with no weights and no op_threshs."""
    return _meta_built(lambda: xrv.models.DenseNet(num_classes=_NUM_CLASSES))


def _resnet50() -> nn.Module:
    """A torchvision ResNet-50 with 18 outputs and a one-channel ``conv1``, as xrv builds it."""
    import torchvision

    def build() -> nn.Module:
        net = torchvision.models.resnet50(num_classes=_NUM_CLASSES, weights=None)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        return net

    return _meta_built(build)


def _save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def make_stand_in_xrv_weights(
    models_dir: Path, seed: int = 0, manifest: ModelManifest | None = None
) -> list[Path]:
    """Write random TorchXRayVision weight files for every xrv entry of the manifest.

    Args:
        models_dir: the models directory; files go to ``<models_dir>/<entry.path>``
            (``torchxrayvision/<xrv file name>``), with the marker ``torchxrayvision/VILA_M3_STAND_IN.txt``.
        seed: seed of the random values; the same seed writes the same tensors.
        manifest: the model manifest; None reads ``configs/models.yaml``.

    Returns:
        The weight files written, in manifest order (eight with the default manifest).

    Raises:
        ValueError: an xrv entry names unknown xrv weights, an architecture other than DenseNet-121 /
            ResNet-50, or a path that is not ``torchxrayvision/<xrv's file name>``.
        FileExistsError: a weight file is already there and the folder has no stand-in marker
            (it may hold the real weights, which are never overwritten).
    """
    xrv = _import_xrv()
    models_dir = Path(models_dir)
    entries = xrv_entries(manifest)
    if not entries:
        raise ValueError(f"the model manifest has no '{XRV_KIND}' entries")
    plans: list[tuple[ModelEntry, Path, str]] = []
    for entry in entries:
        name = entry.source.get("xrv_name", "")
        if name not in xrv.models.model_urls:
            raise ValueError(f"model {entry.model_id}: unknown torchxrayvision weights name {name!r}")
        expected = Path(XRV_FOLDER) / os.path.basename(xrv.models.model_urls[name]["weights_url"])
        if Path(entry.path) != expected:
            raise ValueError(
                f"model {entry.model_id}: path {entry.path!r} is not where torchxrayvision looks for "
                f"{name!r} ({expected.as_posix()!r} under the models directory)"
            )
        if name.startswith("densenet121"):
            arch = "densenet121"
        elif name.startswith("resnet50"):
            arch = "resnet50"
        else:
            raise ValueError(f"model {entry.model_id}: no stand-in for the architecture of {name!r}")
        plans.append((entry, entry.location(models_dir), arch))

    folder = models_dir / XRV_FOLDER
    marker = folder / STAND_IN_MARKER
    if not marker.is_file():
        present = [str(path) for _, path, _ in plans if path.exists()]
        if present:
            raise FileExistsError(
                f"{folder} already holds weight files and no {STAND_IN_MARKER} marker, so they may be the real "
                f"weights; not overwriting: {', '.join(present)}"
            )
    folder.mkdir(parents=True, exist_ok=True)
    # The marker goes first, so an interrupted run still leaves a folder marked as stand-ins.
    marker.write_text(
        f"{STAND_IN_NOTE}\n"
        "Random TorchXRayVision weights written by vila_m3.standins.stand_in_xrv "
        f"(seed {seed}); their predictions mean nothing.\n",
        encoding="utf-8",
    )

    densenet: nn.Module | None = None
    written: list[Path] = []
    for entry, path, arch in plans:
        generator = torch.Generator().manual_seed(_model_seed(seed, entry.model_id))
        path.parent.mkdir(parents=True, exist_ok=True)
        if arch == "densenet121":
            if densenet is None:
                densenet = _densenet(xrv)
                _randomize_backbone(densenet, torch.Generator().manual_seed(_model_seed(seed, arch)))
                densenet.eval()
            _randomize_head(densenet, generator, _DENSENET_HEAD)
            _save_atomic(densenet, path)  # the whole module, as xrv's DenseNet files are
        else:
            resnet = _resnet50()
            _randomize_backbone(resnet, generator)
            _randomize_head(resnet, generator, _RESNET_HEAD)
            _save_atomic(resnet.state_dict(), path)  # a state dict, as xrv's ResNet file is
        written.append(path)
    return written
