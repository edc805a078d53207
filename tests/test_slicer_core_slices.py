"""The slice on screen is the slice the server renders: the panel's Logic on a real MRML scene.

Every volume here holds the values 1..N, one per voxel, so a value on screen names its voxel. For
NIfTI, NRRD and DICOM series volumes — plain, flipped, permuted, oblique and left-handed grids —
under no, 90°, 5° and 30° linear parent transforms, in the Red, Yellow and Green views turned to
the image's slices and rotated in-plane, at many random positions: every voxel Slicer reslices
onto the screen lies in ``extract_slice(volume, axis, index)`` of the (axis, index) the Logic
sends, and the index is the server's ``slice_index_at`` of the view's centre. A view tilted off the
image's slices is reported as oblique (with the slice through its centre), never passed off as it.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_core_fixture import VIEWS, SlicerCore, slicer_core  # noqa: F401

from vila_m3.imaging import read_volume
from vila_m3.imaging.slices import extract_slice, slice_index_at
from vila_m3.samples.dicom_writer import write_ct_series

SHAPE = (9, 11, 7)  # x, y, z voxels
SPACING = (1.5, 1.0, 2.5)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    a = math.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


#: direction cosines (columns: the index axes in LPS)
GRIDS = {
    "plain": np.eye(3),
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "permuted": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
    "oblique": rotation((1, 1, 0), 20.0),
    "left-handed": np.diag([1.0, 1.0, -1.0]),
    "left-handed permuted oblique": rotation((0, 1, 1), 15.0) @ np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0],
                                                                          [0.0, 0.0, 1.0]]),
}


def homogeneous(linear: np.ndarray, translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = linear, translation
    return matrix


TRANSFORMS = {
    "none": None,
    "90 degrees": homogeneous(rotation((1, 0, 0), 90.0), (5.0, -3.0, 12.0)),
    "5 degrees": homogeneous(rotation((0, 0, 1), 5.0), (-2.0, 4.0, 1.0)),
    "30 degrees": homogeneous(rotation((1, 2, 3), 30.0), (10.0, 0.0, -7.0)),
}


def voxel_values() -> np.ndarray:
    """1..N, one per voxel, as a [z, y, x] array."""
    return np.arange(1, int(np.prod(SHAPE)) + 1, dtype=np.int16).reshape(SHAPE[::-1])


def write_study(folder: Path, grid: str, kind: str) -> Path:
    """The test volume on ``grid`` as a NIfTI or NRRD file, or a DICOM series folder."""
    direction, origin = GRIDS[grid], (12.0, -30.0, 40.0)
    if kind == "dicom":
        out = folder / f"{grid}-dicom"
        out.mkdir()
        write_ct_series(voxel_values().astype(np.int32), SPACING, origin, direction.reshape(-1), out, seed=1)
        return out
    image = sitk.GetImageFromArray(voxel_values())
    image.SetSpacing(SPACING)
    image.SetOrigin(origin)
    image.SetDirection(tuple(direction.reshape(-1)))
    path = folder / f"{grid}.{'nii.gz' if kind == 'nifti' else 'nrrd'}"
    sitk.WriteImage(image, str(path))
    return path


def aligned_view(ijk_to_ras: np.ndarray, to_world: np.ndarray, index_axis: int, point_world: np.ndarray,
                 spin_degrees: float) -> np.ndarray:
    """A slice-to-RAS matrix parallel to the image's slices along ``index_axis``, turned in-plane."""
    others = [c for c in range(3) if c != index_axis]
    normal = np.cross(ijk_to_ras[:3, others[0]], ijk_to_ras[:3, others[1]])
    normal = to_world[:3, :3] @ normal
    normal /= np.linalg.norm(normal)
    x = np.cross(normal, [0.3, 0.5, 0.8])
    x /= np.linalg.norm(x)
    x = rotation(normal, spin_degrees) @ x
    y = np.cross(normal, x)
    matrix = np.eye(4)
    matrix[:3, 0], matrix[:3, 1], matrix[:3, 2], matrix[:3, 3] = x, y, normal, point_world
    return matrix


def view_index_axis(ijk_to_ras: np.ndarray, to_world: np.ndarray, view: str) -> int:
    """The image's index axis whose slices are closest to the view's own orientation in the world."""
    preset_normal = np.array(VIEWS[view][0], dtype=float)
    world = to_world[:3, :3] @ ijk_to_ras[:3, :3]
    scores = []
    for c in range(3):
        others = [a for a in range(3) if a != c]
        normal = np.cross(world[:, others[0]], world[:, others[1]])
        scores.append(abs(normal @ preset_normal) / np.linalg.norm(normal))
    return int(np.argmax(scores))


STUDIES = [(grid, kind) for grid in GRIDS for kind in ("nifti", "nrrd")] + [
    (grid, "dicom") for grid in ("plain", "permuted", "oblique")]


@pytest.mark.parametrize("grid, kind", STUDIES, ids=[f"{kind}-{grid}" for grid, kind in STUDIES])
def test_every_voxel_on_screen_is_in_the_slice_the_server_renders(slicer_core: SlicerCore, tmp_path: Path,  # noqa: F811
                                                                  grid: str, kind: str):
    path = write_study(tmp_path, grid, kind)
    server = read_volume(path)
    first = path if kind != "dicom" else sorted(path.glob("*.dcm"))[0]
    volume = slicer_core.load_volume(first, f"{grid}-{kind}")
    assert volume.GetImageData().GetDimensions() == server.geometry.shape
    local = np.eye(4)
    local[:3, :] = LPS_TO_RAS @ server.geometry.affine_lps[:3, :]  # the image's own frame, RAS
    rng = np.random.default_rng(zlib.crc32(f"{grid} {kind}".encode()))
    checked = 0
    for transform_name, to_parent in TRANSFORMS.items():
        to_world = np.eye(4) if to_parent is None else to_parent
        volume.SetAndObserveTransformNodeID(
            None if to_parent is None else slicer_core.add_transform(to_parent).GetID())
        for view in VIEWS:
            index_axis = view_index_axis(local, to_world, view)
            for _ in range(4):
                voxel = rng.uniform(0.5, np.array(server.geometry.shape) - 1.5)
                voxel[index_axis] = rng.integers(0, server.geometry.shape[index_axis]) + rng.uniform(-0.4, 0.4)
                point_local = local @ np.append(voxel, 1.0)
                point_world = to_world @ point_local
                slicer_core.set_view(view, aligned_view(local, to_world, index_axis, point_world[:3],
                                                        rng.uniform(0, 360)), volume)
                where = f"{transform_name}, {view} view at voxel {np.round(voxel, 2).tolist()}"

                position = slicer_core.logic.slicePosition(volume, view)

                assert not position.oblique and position.note(view) == "", where
                lps = tuple(np.diag([-1.0, -1.0, 1.0]) @ point_local[:3])
                assert position.index == slice_index_at(server, position.axis, lps), where
                on_screen = set(np.unique(slicer_core.screen(view))) - {0}
                assert len(on_screen) > max(server.geometry.shape), f"{where}: the view shows a plane"
                in_slice = set(np.unique(extract_slice(server, position.axis, position.index)))
                assert on_screen <= in_slice, (f"{where}: {len(on_screen - in_slice)} voxels on screen are not "
                                               f"in {position.axis} slice {position.index}")
                checked += 1
    assert checked == len(TRANSFORMS) * len(VIEWS) * 4


@pytest.mark.parametrize("transform_name", list(TRANSFORMS))
def test_a_view_tilted_off_the_images_slices_is_reported_as_oblique(slicer_core: SlicerCore, tmp_path: Path,  # noqa: F811
                                                                    transform_name: str):
    path = write_study(tmp_path, "permuted", "nifti")
    server = read_volume(path)
    volume = slicer_core.load_volume(path, "permuted")
    to_parent = TRANSFORMS[transform_name]
    to_world = np.eye(4) if to_parent is None else to_parent
    if to_parent is not None:
        volume.SetAndObserveTransformNodeID(slicer_core.add_transform(to_parent).GetID())
    local = np.eye(4)
    local[:3, :] = LPS_TO_RAS @ server.geometry.affine_lps[:3, :]
    rng = np.random.default_rng(7)
    for view in VIEWS:
        index_axis = view_index_axis(local, to_world, view)
        for _ in range(6):
            voxel = rng.uniform(1.0, np.array(server.geometry.shape) - 2.0)
            point_local = local @ np.append(voxel, 1.0)
            matrix = aligned_view(local, to_world, index_axis, (to_world @ point_local)[:3], rng.uniform(0, 360))
            tilt = rng.uniform(3.0, 30.0)
            matrix[:3, :3] = rotation(matrix[:3, 0], tilt) @ matrix[:3, :3]  # tilt about the view's x axis
            slicer_core.set_view(view, matrix, volume)

            position = slicer_core.logic.slicePosition(volume, view)

            assert position.oblique and abs(position.oblique_degrees - tilt) < 0.01, (view, tilt, position)
            note = position.note(view)
            assert f"{view} view is {tilt:.1f}° oblique" in note and f"slice {position.index}" in note
            lps = tuple(np.diag([-1.0, -1.0, 1.0]) @ point_local[:3])
            assert position.index == slice_index_at(server, position.axis, lps)  # the slice through the centre


def test_an_oblique_acquisition_in_the_patient_axis_views_is_reported_as_oblique(slicer_core: SlicerCore,  # noqa: F811
                                                                                 tmp_path: Path):
    path = write_study(tmp_path, "oblique", "nifti")
    volume = slicer_core.load_volume(path, "oblique")
    centre = np.eye(4)
    centre[:3, :3] = np.array([VIEWS["Red"][1], VIEWS["Red"][2], VIEWS["Red"][0]], dtype=float).T
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    centre[:3, 3] = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
    slicer_core.set_view("Red", centre, volume)
    position = slicer_core.logic.slicePosition(volume, "Red")
    assert position.axis == "axial" and position.oblique and 10.0 < position.oblique_degrees < 21.0
    assert "Red view is" in position.note("Red") and "oblique to the volume's axial slices" in position.note("Red")
