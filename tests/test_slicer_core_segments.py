"""Labelmaps in and corrections out, on a real MRML scene with Slicer's segmentations logic.

A returned labelmap becomes one new segmentation with named, coloured segments carrying the label
values and the terminology Slicer itself serialises; a value the server did not name gets a name;
nothing else stays in the scene. A correction is written on the grid of the server's image (a
left-handed one included: Slicer keeps such an image on a k-reversed grid) and passes the data
engine's geometry check (``vila_m3.data.cases``), voxel for voxel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from slicer_core_fixture import SlicerCore, slicer_core  # noqa: F401

from vila_m3.data import cases
from vila_m3.imaging import read_labelmap, read_volume, write_labelmap

GRIDS = {
    "right-handed": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    "left-handed": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "left-handed permuted": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
    "flipped oblique": (-0.9396926, 0.0, 0.3420201, 0.0, 1.0, 0.0, -0.3420201, 0.0, -0.9396926),
}
NAMES = {"liver": 1, "hepatic tumor": 26, "spleen": 3}
COLORS = {"liver": [221, 130, 101], "hepatic tumor": [144, 238, 144], "spleen": [157, 108, 162]}


def write_image_and_label(folder: Path, grid: str) -> tuple[Path, Path, np.ndarray]:
    """An image on ``grid`` (NIfTI) and a labelmap on its grid with values 1, 3, 26 and two the
    server does not name (7, 9), each in its own asymmetric block."""
    shape_zyx = (10, 12, 14)
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-200, 300, shape_zyx).astype(np.int16))
    image.SetSpacing((1.2, 0.8, 2.5))
    image.SetOrigin((20.0, -15.0, 33.0))
    image.SetDirection(GRIDS[grid])
    image_path = folder / "image.nii.gz"
    sitk.WriteImage(image, str(image_path))
    labels = np.zeros(shape_zyx, dtype=np.uint8)
    labels[1:4, 2:7, 3:9] = 1
    labels[2:3, 3:5, 4:6] = 26
    labels[6:9, 1:3, 10:13] = 3
    labels[0, 0, 0:3] = 7
    labels[9, 11, 12:14] = 9
    label_path = write_labelmap(labels, read_volume(image_path).geometry, folder / "labels.nii.gz")
    return image_path, label_path, labels


@pytest.mark.parametrize("grid", list(GRIDS))
def test_a_returned_labelmap_becomes_named_coloured_segments_and_nothing_else(slicer_core: SlicerCore,  # noqa: F811
                                                                              tmp_path: Path, grid: str):
    image_path, label_path, labels = write_image_and_label(tmp_path, grid)
    volume = slicer_core.load_volume(image_path, "ct")
    before = slicer_core.node_ids()

    node = slicer_core.logic.importLabelmap(str(label_path), NAMES, COLORS, volume, "chat-1", "VISTA3D")

    added = sorted(set(slicer_core.node_ids()) - set(before))
    assert added == sorted([node.GetID(), node.GetDisplayNode().GetID()]), "no leftover labelmap, colour or storage nodes"
    assert set(before) <= set(slicer_core.node_ids()), "existing nodes are kept"
    assert node.GetName() == "VILA-M3 chat-1 VISTA3D" and slicer_core.logic.geometryWarning == ""
    assert node.GetNodeReference("VILAM3ChatVolume") is volume
    segmentation = node.GetSegmentation()
    segments = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i)
                for i in range(segmentation.GetNumberOfSegments())}
    assert sorted(segments) == sorted(["liver", "hepatic tumor", "spleen", "label 7", "label 9"])
    assert {name: segment.GetLabelValue() for name, segment in segments.items()} == {
        **NAMES, "label 7": 7, "label 9": 9}
    for name, rgb in COLORS.items():
        assert segments[name].GetColor() == pytest.approx([v / 255 for v in rgb], abs=1e-6)
    terminology = slicer_core.slicer.vtkSegment.GetTerminologyEntryTagName()
    entry = slicer_core.slicer.vtkSlicerTerminologyEntry()
    logic = slicer_core.slicer.vtkSlicerTerminologiesModuleLogic()
    for name, segment in segments.items():
        tag = segment.GetTerminology()
        assert segment.HasTag(terminology)
        assert logic.DeserializeTerminologyEntry(tag, entry), f"Slicer reads the terminology of '{name}'"
        if name == "liver":
            assert (entry.GetTypeObject().GetCodingSchemeDesignator(), entry.GetTypeObject().GetCodeMeaning()) == (
                "SCT", "Liver")
        if name.startswith("label "):
            assert entry.GetTypeObject().GetCodeMeaning() == name
    # voxel by voxel, on Slicer's grid of the image (k reversed for a left-handed one)
    server = read_volume(image_path)
    flip_k = np.linalg.det(np.array(GRIDS[grid]).reshape(3, 3)) < 0
    for name, value in {**NAMES, "label 7": 7, "label 9": 9}.items():
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        mask = slicer_core.slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume)
        expected = labels == value
        assert np.array_equal(mask.astype(bool), expected[::-1] if flip_k else expected), name
    assert server.geometry.shape == volume.GetImageData().GetDimensions()


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("source", ["server labelmap", "volume file"])
def test_a_correction_is_saved_on_the_datastore_images_grid(slicer_core: SlicerCore, tmp_path: Path,  # noqa: F811
                                                            grid: str, source: str):
    image_path, label_path, labels = write_image_and_label(tmp_path, grid)
    volume = slicer_core.load_volume(image_path, "ct")
    node = slicer_core.logic.importLabelmap(str(label_path), NAMES, COLORS, volume, "chat-1", "VISTA3D")
    if source == "volume file":  # a segmentation the panel did not receive: the grid comes from the volume's file
        node.RemoveAttribute("VILAM3Chat.ServerGrid")
        volume.RemoveAttribute("VILAM3Chat.ServerGrid")
    before = slicer_core.node_ids()

    path = slicer_core.logic.exportCorrection(node, volume)

    assert slicer_core.node_ids() == before, "no labelmap, display or colour table node left behind"
    saved = read_labelmap(path)
    image = read_volume(image_path)
    cases._check_geometry(saved, image)  # the data engine's check: raises CaseError on another grid
    assert saved.geometry.allclose(image.geometry)
    assert np.array_equal(saved.array, labels), "every voxel keeps its label value"


def test_segments_that_share_a_name_are_refused_with_their_name(slicer_core: SlicerCore, tmp_path: Path):  # noqa: F811
    image_path, label_path, _ = write_image_and_label(tmp_path, "right-handed")
    volume = slicer_core.load_volume(image_path, "ct")
    node = slicer_core.logic.importLabelmap(str(label_path), NAMES, COLORS, volume, "chat-1")
    segmentation = node.GetSegmentation()
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("spleen")).SetName("liver")
    before = slicer_core.node_ids()
    with pytest.raises(ValueError, match="share a name.*liver"):
        slicer_core.logic.exportCorrection(node, volume)
    assert slicer_core.node_ids() == before


def test_the_self_test_fails_without_a_server_and_says_how_to_start_one(slicer_core: SlicerCore,  # noqa: F811
                                                                        monkeypatch: pytest.MonkeyPatch):
    """Slicer counts a test that returns as passed: with no server it must raise, not skip or return."""
    monkeypatch.setenv("VILAM3_TEST_SERVER", "http://127.0.0.1:1")
    with pytest.raises(AssertionError, match=r"No VILA-M3 server answers at http://127\.0\.0\.1:1 .*`make run`"):
        slicer_core.module.VILAM3ChatTest().test_ask_about_the_sample_ct()


@pytest.mark.parametrize("grid", ["left-handed", "left-handed permuted"])
def test_a_correction_for_a_volume_uploaded_with_it_is_on_the_uploaded_copys_grid(slicer_core: SlicerCore,  # noqa: F811
                                                                                  tmp_path: Path, grid: str):
    """A volume the server does not have goes up as Slicer writes it (its right-handed grid): the label
    must match that copy, not the local file it was loaded from."""
    image_path, label_path, labels = write_image_and_label(tmp_path, grid)
    volume = slicer_core.load_volume(image_path, "local")
    node = slicer_core.logic.importLabelmap(str(label_path), NAMES, COLORS, volume, "chat-1")
    for each in (node, volume):
        each.RemoveAttribute("VILAM3Chat.ServerGrid")
    uploaded = read_volume(slicer_core.logic.exportVolume(volume))
    saved = read_labelmap(slicer_core.logic.exportCorrection(node, volume, onUploadedCopy=True))
    cases._check_geometry(saved, uploaded)
    assert not saved.geometry.allclose(read_volume(image_path).geometry), "Slicer's grid is not the file's here"
    image = read_volume(image_path).geometry
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in saved.geometry.shape], indexing="ij"), -1).reshape(-1, 3)
    original = np.rint(image.physical_to_index(saved.geometry.index_to_physical(ijk))).astype(int)
    assert np.array_equal(saved.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]], labels[original[:, 2], original[:, 1], original[:, 0]]), \
        "every voxel keeps its label at its place in the patient"
