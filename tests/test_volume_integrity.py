"""Truncated or corrupt NIfTI files are refused, never read with silent zeros in place of the missing voxels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vila_m3.imaging import Geometry, VolumeReadError, read_volume, write_labelmap

pytestmark = pytest.mark.security


@pytest.fixture
def volume_file(tmp_path: Path):
    """A 40 x 48 x 32 labelmap-like volume with no zero voxel, written as ``name``."""
    array = (np.arange(40 * 48 * 32).reshape(32, 48, 40) % 200 + 1).astype(np.uint8)

    def write(name: str) -> tuple[Path, np.ndarray]:
        path = tmp_path / name
        write_labelmap(array, Geometry.identity((40, 48, 32)), path)
        return path, array

    return write


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
def test_a_whole_file_reads_back_exactly(volume_file, name):
    path, array = volume_file(name)
    assert np.array_equal(read_volume(path).array, array)


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
@pytest.mark.parametrize("kept", [0.34, 0.9, 0.999])
def test_a_truncated_file_is_refused(volume_file, name, kept):
    path, _ = volume_file(name)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(VolumeReadError, match="truncated"):
        read_volume(path)


def test_corrupt_compressed_data_is_refused(volume_file):
    path, _ = volume_file("ct.nii.gz")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # zeroed deflate data: the stream breaks or its CRC fails
    path.write_bytes(bytes(data))
    with pytest.raises(VolumeReadError):
        read_volume(path)


def test_a_compressed_file_of_several_gzip_members_is_read_whole(volume_file):
    import gzip

    path, array = volume_file("ct.nii.gz")
    raw = gzip.decompress(path.read_bytes())
    half = len(raw) // 2
    path.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))  # the trailer's size is the last member's
    assert np.array_equal(read_volume(path).array, array)
