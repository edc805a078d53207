"""Fixtures and helpers of the VISTA3D / BRATS runner tests: tiny stand-in bundles, the sample
studies as volumes, a probe network that makes geometry errors visible, and MONAI's own bundle runner.

Imported by the runner test modules (``from bundle_fixtures import ...``); everything is written under
pytest's temporary directories.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import monai.bundle
import numpy as np
import pytest
import torch

from vila_m3.imaging import Geometry, Volume, read_volume
from vila_m3.standins.tiny_bundles import make_tiny_brats_bundle, make_tiny_vista3d_bundle

MRI_SEQUENCES = ("t1c", "t1", "t2", "flair")


@pytest.fixture(scope="session")
def tiny_vista3d_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VISTA3D stand-in bundle (seed 0); tests must not modify it (copy it first)."""
    return make_tiny_vista3d_bundle(tmp_path_factory.mktemp("bundles") / "vista3d", seed=0)


@pytest.fixture(scope="session")
def tiny_brats_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BRATS stand-in bundle (seed 0); tests must not modify it (copy it first)."""
    return make_tiny_brats_bundle(tmp_path_factory.mktemp("bundles") / "brats_mri_segmentation", seed=0)


@pytest.fixture(scope="session")
def ct_volume(sample_data: Path) -> Volume:
    """The sample abdominal CT read from NIfTI (256 × 256 × 64 voxels, oblique in-plane direction)."""
    return read_volume(sample_data / "studies" / "ct_abdomen.nii.gz")


@pytest.fixture(scope="session")
def mri_sequences(sample_data: Path) -> dict[str, Volume]:
    """The four sample brain MRI sequences, keyed t1c, t1, t2, flair (128 × 128 × 96 voxels, 1.5 mm)."""
    return {s: read_volume(sample_data / "studies" / f"brain_mri_{s}.nii.gz") for s in MRI_SEQUENCES}


# ------------------------------------------------------------------------------ probe network


class IntensityProbe(torch.nn.Module):
    """A stand-in for the VISTA3D network whose logits are ``image - threshold`` for every prompted class.

    After the bundle's preprocessing (intensity scaled to 0..1) the runner therefore labels the voxels
    brighter than ``threshold`` with the first prompted id; comparing that labelmap with a threshold of
    the input itself shows whether the inversion put every voxel back in its place.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("threshold", torch.tensor(float(threshold)))

    def forward(self, input_images: torch.Tensor, patch_coords: Any = None, class_vector: torch.Tensor | None = None,
                transpose: bool = False, **_: Any) -> torch.Tensor:
        classes = 1 if class_vector is None else class_vector.shape[0]
        logits = (input_images - self.threshold).repeat(classes, 1, 1, 1, 1)  # (B, 1, H, W, D)
        return logits.transpose(0, 1) if transpose else logits


def scaled_hu(hu: float) -> float:
    """A HU value after the VISTA3D bundle's ScaleIntensityRanged (-963.82…1053.68 → 0…1)."""
    a_min, a_max = -963.8247715525971, 1053.678477684517
    return (hu - a_min) / (a_max - a_min)


def make_probe_bundle(out_dir: Path, threshold_hu: float) -> Path:
    """A VISTA3D stand-in whose ``network_def`` is :class:`IntensityProbe` at ``threshold_hu``."""
    root = make_tiny_vista3d_bundle(out_dir, seed=0)
    config_path = root / "configs" / "inference.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["network_def"] = {"_target_": "bundle_fixtures.IntensityProbe", "threshold": scaled_hu(threshold_hu)}
    config_path.write_text(json.dumps(config, indent=4))
    torch.save(IntensityProbe(scaled_hu(threshold_hu)).state_dict(), root / "models" / "model.pt")
    return root


def rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """(3, 3) rotation about ``axis`` by ``degrees`` (Rodrigues)."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


def block_phantom() -> tuple[Volume, np.ndarray]:
    """A small CT on an oblique, axis-permuted grid: air, a 40 HU body, and a 900 HU block off-centre.

    Returns the volume (int16 HU, (z, y, x) = (24, 50, 60), spacing 1.1 × 0.9 × 2.5 mm) and the
    block's boolean mask on the same grid.
    """
    # index axes point roughly along S, L, P: a sagittal-like acquisition, tilted and rotated
    permute = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    direction = rotation((1.0, 0.4, 0.2), 20.0) @ permute
    geometry = Geometry(spacing=(1.1, 0.9, 2.5), origin=(-30.0, 12.5, 40.0), direction=direction, shape=(60, 50, 24))
    hu = np.full((24, 50, 60), -1000, dtype=np.int16)
    hu[2:22, 4:46, 4:56] = 40
    block = np.zeros(hu.shape, dtype=bool)
    block[3:15, 25:46, 5:31] = True
    hu[block] = 900
    return Volume(array=hu, geometry=geometry), block


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0


# ------------------------------------------------------------------------- MONAI's bundle runner


@contextmanager
def _bundle_on_path(bundle_dir: Path):
    """Make the bundle's ``scripts`` package importable, as ``python -m monai.bundle run`` from the
    bundle folder does; forget it afterwards."""
    sys.path.insert(0, str(bundle_dir))
    try:
        yield
    finally:
        sys.path.remove(str(bundle_dir))
        for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
            del sys.modules[name]


def run_with_monai_bundle(bundle_dir: Path, **override: Any) -> None:
    """Run the bundle's ``configs/inference.json`` with ``monai.bundle.run`` (MONAI's own runner)."""
    with _bundle_on_path(bundle_dir):
        monai.bundle.run(
            config_file=str(bundle_dir / "configs" / "inference.json"),
            meta_file=str(bundle_dir / "configs" / "metadata.json"),
            bundle_root=str(bundle_dir),
            **override,
        )
