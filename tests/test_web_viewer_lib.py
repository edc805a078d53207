"""The web viewer's pieces that need no browser: going to a slice (the inverse of the panel's slice
mapping, checked against the server's own slicing), its settings, and the image download it uses."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from vila_m3.imaging import Geometry, Volume
from vila_m3.imaging.slices import slice_index_at, slice_index_count

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "slicer_extension" / "VILAM3Chat"), str(REPO / "web")]

from vila_m3_viewer.settings import load_settings  # noqa: E402
from VILAM3ChatLib.slice_mapping import slice_centre, slice_position  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation(degrees: float, axis: int) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    m = np.eye(3)
    a, b = [i for i in range(3) if i != axis]
    m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    return m


GRIDS = {  # direction (LPS, columns = i, j, k axes) of grids the server may store
    "identity": np.eye(3),
    "sample CT (oblique about S)": rotation(10.0, 2),
    "k reversed": np.diag([1.0, 1.0, -1.0]),
    "permuted and flipped": np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]),
    "oblique about R": rotation(25.0, 0) @ np.diag([1.0, -1.0, 1.0]),
}


def ijk_to_ras(geometry: Geometry) -> list[list[float]]:
    """Slicer's IJK-to-RAS of a grid given in LPS (what the server's Geometry holds)."""
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ geometry.direction_matrix @ np.diag(geometry.spacing)
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(geometry.origin)
    return matrix.tolist()


@pytest.mark.parametrize("grid", list(GRIDS))
def test_going_to_a_slice_centres_the_view_on_the_slice_the_server_renders(grid: str):
    shape_zyx = (7, 11, 13)
    geometry = Geometry(spacing=(0.8, 1.1, 2.5), origin=(12.0, -30.0, 5.0),
                        direction=tuple(GRIDS[grid].ravel()), shape=shape_zyx[::-1])
    volume = Volume(np.zeros(shape_zyx, dtype=np.int16), geometry)
    matrix = ijk_to_ras(geometry)
    dims = (shape_zyx[2], shape_zyx[1], shape_zyx[0])
    for axis in ("axial", "coronal", "sagittal"):
        count = slice_index_count(volume, axis)
        for index in range(count):
            ras = slice_centre(matrix, dims, axis, index)
            lps = (LPS_TO_RAS @ np.asarray(ras)).tolist()
            assert slice_index_at(volume, axis, tuple(lps)) == index, (axis, index)  # the server's counting
            view = np.eye(4)
            normal = {"axial": 2, "coronal": 1, "sagittal": 0}[axis]
            others = [i for i in range(3) if i != normal]
            view[:3, 0], view[:3, 1], view[:3, 2] = np.eye(3)[others[0]], np.eye(3)[others[1]], np.eye(3)[normal]
            view[:3, 3] = ras
            position = slice_position(view.tolist(), matrix, dims)  # the panel's mapping of that view
            assert (position.axis, position.index, position.count) == (axis, index, count)
            assert position.offset_voxels < 1e-6


def test_a_slice_outside_the_volume_or_an_unknown_axis_is_refused():
    matrix = np.eye(4).tolist()
    with pytest.raises(ValueError, match="axial slice 5 is outside the volume's 5 slices"):
        slice_centre(matrix, (3, 4, 5), "axial", 5)
    with pytest.raises(ValueError, match="axis must be one of"):
        slice_centre(matrix, (3, 4, 5), "oblique", 0)


def test_the_shipped_settings_load_and_bad_ones_are_named(tmp_path):
    settings = load_settings()
    names = [preset.name for preset in settings.window_level_presets]
    assert names[0] == "auto" and {"abdomen", "lung", "bone", "brain"} <= set(names)
    assert settings.preset("abdomen").window == 400 and settings.preset("abdomen").level == 40
    assert settings.preset("auto").window is None
    with pytest.raises(ValueError, match="no window/level preset named 'soft'"):
        settings.preset("soft")
    bad = tmp_path / "viewer.yaml"
    bad.write_text(yaml.safe_dump({"window_level_presets": [{"name": "x", "window": -5, "level": 0}]}))
    with pytest.raises(ValidationError, match="window"):
        load_settings(bad)


@pytest.mark.parametrize("combo", list(itertools.islice(itertools.product((0, 1), repeat=2), 4)))
def test_slice_centre_is_the_middle_of_the_other_axes(combo):
    """The point lies on the voxel centre line of the other two axes (so the view's centre is inside)."""
    di, dj = combo
    dims = (4 + di, 6 + dj, 9)
    ras = slice_centre(np.eye(4).tolist(), dims, "axial", 3)
    assert ras == [(dims[0] - 1) / 2, (dims[1] - 1) / 2, 3.0]
