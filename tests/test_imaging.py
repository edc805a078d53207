"""Tests of vila_m3.imaging: geometry, reading / writing, slice orientation, windows, overlays."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from vila_m3.imaging import (
    Geometry,
    Volume,
    VolumeReadError,
    assign_colors,
    extract_slice,
    labelmap_like,
    list_dicom_series,
    minmax_uint8,
    overlay_labels,
    present_labels,
    ras_view,
    read_labelmap,
    read_volume,
    render_label_slice,
    render_overlay,
    render_slice,
    slice_index_at,
    slice_index_count,
    to_rgb,
    window_ct,
    write_labelmap,
)

# ---------------------------------------------------------------------------------------------
# helpers

#: index axis i runs towards the patient's inferior, j towards the left, k towards anterior
#: (columns of the LPS direction matrix); a proper rotation, so DICOM can hold it too.
PERMUTED = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from three angles in degrees (x, then y, then z)."""
    cx, sx = np.cos(np.radians(ax)), np.sin(np.radians(ax))
    cy, sy = np.cos(np.radians(ay)), np.sin(np.radians(ay))
    cz, sz = np.cos(np.radians(az)), np.sin(np.radians(az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


#: an oblique, permuted direction: a real-world tilted acquisition
OBLIQUE = _rotation(12.0, -7.0, 20.0) @ PERMUTED

SPACING = (0.7, 1.3, 2.5)
ORIGIN = (-120.5, 35.25, 410.0)


def _sitk_image(array_zyx: np.ndarray, direction: np.ndarray = OBLIQUE,
                spacing=SPACING, origin=ORIGIN) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    return image


def _ct_array(shape_zyx=(5, 6, 7), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 2000, size=shape_zyx, dtype=np.int16)


def _write_dicom_series(folder: Path, image: sitk.Image, series_uid: str, description: str = "CT TEST") -> None:
    """Write ``image`` (3D, int16) as one DICOM file per slice, as a scanner would store it."""
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|103e": description,
            "0008|0070": "ACME Imaging",
            "0010|0010": "Doe^Jane",
            "0010|0020": "PAT-0042",
            "0008|0020": "20240101",
            "0020|000d": "1.2.826.0.1.3680043.8.498.1",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0018|0050": str(image.GetSpacing()[2]),
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(plane)


def _marker_volume(direction: np.ndarray = PERMUTED) -> tuple[Volume, tuple[int, int, int]]:
    """A (x, y, z) = (9, 7, 6) CT volume, -1000 HU everywhere but one 1000 HU marker voxel.

    With ``PERMUTED``: RAS sizes are S = 9 (from i, reversed), R = 7 (from j, reversed),
    A = 6 (from k). The marker sits 3 voxels below the superior edge (i = 3), 1 voxel from
    the patient's right edge (j = 1) and 4 voxels behind the anterior edge (k = 1): distinct,
    off-centre offsets, so any wrong flip or transpose moves it.
    """
    array = np.full((6, 7, 9), -1000, dtype=np.int16)
    array[1, 1, 3] = 1000
    geometry = Geometry(spacing=SPACING, origin=ORIGIN, direction=direction, shape=(9, 7, 6))
    return Volume(array=array, geometry=geometry, modality="CT"), (3, 1, 1)


def _marker_pixel(plane: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(plane == plane.max())
    assert len(rows) == 1, "exactly one marker pixel expected"
    return int(rows[0]), int(cols[0])


# ---------------------------------------------------------------------------------------------
# Geometry and Volume


def test_geometry_normalises_and_is_frozen():
    g = Geometry(spacing=np.array(SPACING), origin=list(ORIGIN), direction=OBLIQUE.ravel(), shape=(7, 6, 5))
    assert g.spacing == SPACING and g.origin == ORIGIN and g.shape == (7, 6, 5)
    assert np.allclose(g.direction_matrix, OBLIQUE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.spacing = (1.0, 1.0, 1.0)  # type: ignore[misc]
    hash(g)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spacing": (1.0, 0.0, 1.0)},
        {"spacing": (1.0, 1.0)},
        {"direction": np.zeros((3, 3))},
        {"shape": (4, 0, 4)},
        {"origin": (0.0, float("nan"), 0.0)},
    ],
)
def test_geometry_rejects_bad_values(kwargs):
    base = {"spacing": SPACING, "origin": ORIGIN, "direction": np.eye(3), "shape": (4, 4, 4)}
    with pytest.raises(ValueError):
        Geometry(**{**base, **kwargs})


def test_geometry_allclose_tolerance():
    g = Geometry(spacing=SPACING, origin=ORIGIN, direction=OBLIQUE, shape=(7, 6, 5))
    near = dataclasses.replace(g, origin=tuple(np.add(ORIGIN, 5e-5)))
    far = dataclasses.replace(g, origin=tuple(np.add(ORIGIN, (0.0, 1e-3, 0.0))))
    other_shape = dataclasses.replace(g, shape=(7, 6, 6))
    tilted = dataclasses.replace(g, direction=_rotation(0.1, 0, 0) @ OBLIQUE)
    assert g.allclose(near)
    assert not g.allclose(far)
    assert not g.allclose(other_shape)
    assert not g.allclose(tilted)


def test_geometry_sitk_round_trip_and_physical_points():
    image = _sitk_image(_ct_array())
    g = Geometry.from_sitk(image)
    assert g.shape == (7, 6, 5)
    assert np.allclose(g.spacing, SPACING) and np.allclose(g.origin, ORIGIN)
    for index in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        expected = image.TransformIndexToPhysicalPoint(index)
        assert np.allclose(g.index_to_physical(index), expected, atol=1e-9)
        assert np.allclose(g.physical_to_index(expected), index, atol=1e-9)
    blank = sitk.Image(7, 6, 5, sitk.sitkUInt8)
    assert Geometry.from_sitk(g.to_sitk(blank)).allclose(g, atol=1e-12)
    with pytest.raises(ValueError, match="does not match"):
        g.to_sitk(sitk.Image(5, 6, 7, sitk.sitkUInt8))


def test_geometry_from_2d_image():
    image = sitk.Image(30, 20, sitk.sitkUInt8)
    image.SetSpacing((0.2, 0.3))
    image.SetOrigin((5.0, -4.0))
    g = Geometry.from_sitk(image)
    assert g.shape == (30, 20, 1) and g.spacing == (0.2, 0.3, 1.0) and g.origin == (5.0, -4.0, 0.0)
    assert np.allclose(g.direction_matrix, np.eye(3))


def test_volume_validates_shape_and_metadata():
    g = Geometry.identity((7, 6, 5))
    v = Volume(np.zeros((5, 6, 7), np.int16), g)
    assert not v.is_2d and v.modality is None and v.metadata == {}
    with pytest.raises(ValueError, match="does not match"):
        Volume(np.zeros((7, 6, 5), np.int16), g)
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((6, 7), np.int16), g)
    with pytest.raises(ValueError, match="metadata"):
        Volume(np.zeros((5, 6, 7), np.int16), g, metadata={"PatientName": "Doe^Jane"})
    assert Volume(np.zeros((1, 6, 7), np.uint8), Geometry.identity((7, 6, 1))).is_2d


# ---------------------------------------------------------------------------------------------
# reading and writing


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.nhdr"])
def test_volume_file_round_trip(tmp_path, name):
    array = _ct_array()
    image = _sitk_image(array)
    sitk.WriteImage(image, str(tmp_path / name))
    volume = read_volume(tmp_path / name)
    assert volume.array.shape == (5, 6, 7)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, array)
    assert volume.geometry.allclose(Geometry.from_sitk(image), atol=1e-4)
    assert volume.modality is None and volume.metadata == {}


@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.nrrd", "sub/dir/seg.seg.nrrd", "seg.nhdr"])
def test_labelmap_round_trip_uint8(tmp_path, name):
    geometry = Geometry(spacing=SPACING, origin=ORIGIN, direction=OBLIQUE, shape=(7, 6, 5))
    labels = np.random.default_rng(1).integers(0, 133, size=(5, 6, 7)).astype(np.int64)
    written = write_labelmap(labels, geometry, tmp_path / name)
    assert written.exists()
    back = read_labelmap(written)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, labels)
    assert back.geometry.allclose(geometry, atol=1e-4)
    # the file on disk is uint8 too, and no temporary file is left behind
    assert sitk.ReadImage(str(written)).GetPixelID() == sitk.sitkUInt8
    assert not [p for p in written.parent.iterdir() if ".tmp" in p.name]


def test_labelmap_round_trip_uint16(tmp_path):
    geometry = Geometry(spacing=SPACING, origin=ORIGIN, direction=OBLIQUE, shape=(7, 6, 5))
    labels = np.zeros((5, 6, 7), dtype=np.int32)
    labels[1, 2, 3] = 300
    labels[4, 5, 6] = 7
    path = write_labelmap(labels, geometry, tmp_path / "big.nii.gz")
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkUInt16
    back = read_labelmap(path)
    assert back.array.dtype == np.uint16
    np.testing.assert_array_equal(back.array, labels)
    assert back.geometry.allclose(geometry)


def test_labelmap_like_keeps_geometry_and_avoids_copies(tmp_path):
    volume = Volume(_ct_array(), Geometry(spacing=SPACING, origin=ORIGIN, direction=OBLIQUE, shape=(7, 6, 5)))
    labels = (volume.array > 500).astype(np.uint8)
    seg = labelmap_like(volume, labels)
    assert seg.geometry == volume.geometry
    assert np.shares_memory(seg.array, labels)
    assert labelmap_like(volume, volume.array > 500).array.dtype == np.uint8
    with pytest.raises(ValueError, match="does not match"):
        labelmap_like(volume, labels[:-1])


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.full((5, 6, 7), -1), ">= 0"),
        (np.full((5, 6, 7), 0.5), "integer"),
        (np.full((5, 6, 7), 70000), "65535"),
        (np.zeros((7, 6, 5), np.uint8), "does not match"),
    ],
)
def test_write_labelmap_rejects_bad_labels(tmp_path, labels, match):
    geometry = Geometry.identity((7, 6, 5))
    with pytest.raises(ValueError, match=match):
        write_labelmap(labels, geometry, tmp_path / "seg.nii.gz")
    assert not any(tmp_path.iterdir())


def test_write_labelmap_rejects_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="nii"):
        write_labelmap(np.zeros((5, 6, 7), np.uint8), Geometry.identity((7, 6, 5)), tmp_path / "seg.png")


def test_read_labelmap_accepts_integral_floats_and_rejects_fractions(tmp_path):
    image = _sitk_image(np.array([[[0.0, 1.0], [2.0, 255.0]]], dtype=np.float32))
    sitk.WriteImage(image, str(tmp_path / "float_seg.nii.gz"))
    back = read_labelmap(tmp_path / "float_seg.nii.gz")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, [[[0, 1], [2, 255]]])
    sitk.WriteImage(_sitk_image(np.full((1, 2, 2), 0.25, np.float32)), str(tmp_path / "prob.nii.gz"))
    with pytest.raises(VolumeReadError, match="not a labelmap"):
        read_labelmap(tmp_path / "prob.nii.gz")


def test_dicom_series_round_trip(tmp_path):
    array = _ct_array((5, 6, 7), seed=3)
    image = _sitk_image(array)
    _write_dicom_series(tmp_path / "series", image, "1.2.826.0.1.3680043.8.498.101")
    volume = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(volume.array, array)
    assert volume.geometry.allclose(Geometry.from_sitk(image), atol=1e-4)
    assert volume.modality == "CT"
    assert volume.metadata == {"Modality": "CT", "SeriesDescription": "CT TEST", "Manufacturer": "ACME Imaging"}
    assert "Doe^Jane" not in repr(volume.metadata) and "PAT-0042" not in repr(volume.metadata)


def test_dicom_folder_with_two_series(tmp_path):
    big_uid, small_uid = "1.2.826.0.1.3680043.8.498.201", "1.2.826.0.1.3680043.8.498.202"
    big = _sitk_image(_ct_array((5, 6, 7), seed=4))
    small = _sitk_image(_ct_array((2, 6, 7), seed=5), direction=np.eye(3))
    _write_dicom_series(tmp_path, big, big_uid, description="BIG")
    _write_dicom_series(tmp_path, small, small_uid, description="SMALL")
    assert list_dicom_series(tmp_path) == {big_uid: 5, small_uid: 2}
    default = read_volume(tmp_path)
    assert default.array.shape == (5, 6, 7) and default.metadata["SeriesDescription"] == "BIG"
    chosen = read_volume(tmp_path, series_id=small_uid)
    assert chosen.array.shape == (2, 6, 7) and chosen.metadata["SeriesDescription"] == "SMALL"
    assert chosen.geometry.allclose(Geometry.from_sitk(small))
    with pytest.raises(VolumeReadError, match="no DICOM series with id"):
        read_volume(tmp_path, series_id="1.2.3")


def test_single_dicom_file_is_one_slice(tmp_path):
    array = _ct_array((3, 6, 7), seed=6)
    image = _sitk_image(array)
    _write_dicom_series(tmp_path, image, "1.2.826.0.1.3680043.8.498.301")
    one = sorted(tmp_path.glob("*.dcm"))[1]
    volume = read_volume(one)
    assert volume.is_2d and volume.modality == "CT"
    np.testing.assert_array_equal(volume.array[0], array[1])
    assert np.allclose(volume.geometry.origin, image.TransformIndexToPhysicalPoint((0, 0, 1)), atol=1e-4)
    # a DICOM file without extension is recognised by its preamble
    bare = tmp_path / "IM0001"
    bare.write_bytes(one.read_bytes())
    np.testing.assert_array_equal(read_volume(bare).array, volume.array)


def test_reads_a_real_dicom_file_without_identifying_tags():
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = dcmread(path)
    volume = read_volume(path)
    assert volume.modality == "CT"
    assert volume.array.shape == (1, ds.Rows, ds.Columns)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(volume.array[0], expected)
    assert set(volume.metadata) <= {"Modality", "SeriesDescription", "Manufacturer"}
    assert str(ds.PatientName) not in " ".join(volume.metadata.values())


def test_reads_grey_and_rgb_pictures(tmp_path):
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(grey).save(tmp_path / "cxr.png")
    volume = read_volume(tmp_path / "cxr.png")
    assert volume.is_2d and volume.array.shape == (1, 12, 10) and volume.array.dtype == np.uint8
    np.testing.assert_array_equal(volume.array[0], grey)
    assert volume.geometry.shape == (10, 12, 1) and volume.modality is None

    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    rgb[0, 0] = (90, 90, 90)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    as_grey = read_volume(tmp_path / "photo.png").array
    assert as_grey.shape == (1, 4, 5) and as_grey.dtype == np.uint8
    assert as_grey[0, 0, 0] == 90 and as_grey[0, 1, 1] == 76  # round(0.299 * 255)

    Image.fromarray(grey).save(tmp_path / "cxr.jpg", quality=95)
    jpeg = read_volume(tmp_path / "cxr.jpg")
    assert jpeg.array.shape == (1, 12, 10)
    assert np.abs(jpeg.array[0].astype(int) - grey).max() < 12

    deep = (np.arange(6 * 4, dtype=np.uint16).reshape(6, 4) * 2000)
    Image.fromarray(deep).save(tmp_path / "cxr16.png")
    np.testing.assert_array_equal(read_volume(tmp_path / "cxr16.png").array[0], deep)


def _assert_clean_error(excinfo, path: Path, *words: str) -> None:
    message = str(excinfo.value)
    assert str(path) in message
    for word in words:
        assert word in message, message
    for noise in ("ITK ERROR", "itk::", ".hxx", "Exception thrown"):
        assert noise not in message, message
    assert isinstance(excinfo.value, ValueError)


def test_read_errors_are_clear(tmp_path):
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(VolumeReadError) as excinfo:
        read_volume(missing)
    _assert_clean_error(excinfo, missing, "no such file")

    fake = tmp_path / "notes.nii.gz"
    fake.write_text("this is not an image\n")
    with pytest.raises(VolumeReadError) as excinfo:
        read_volume(fake)
    _assert_clean_error(excinfo, fake, "NIfTI", "corrupt")

    fake_nrrd = tmp_path / "notes.nrrd"
    fake_nrrd.write_text("NRRD0004\ngarbage\n")
    with pytest.raises(VolumeReadError) as excinfo:
        read_volume(fake_nrrd)
    _assert_clean_error(excinfo, fake_nrrd, "NRRD")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeReadError) as excinfo:
        read_volume(empty)
    _assert_clean_error(excinfo, empty, "empty")

    not_dicom = tmp_path / "not_dicom"
    not_dicom.mkdir()
    (not_dicom / "readme.txt").write_text("hello")
    with pytest.raises(VolumeReadError) as excinfo:
        read_volume(not_dicom)
    _assert_clean_error(excinfo, not_dicom, "no DICOM series")

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(VolumeReadError) as excinfo:
        read_volume(text)
    _assert_clean_error(excinfo, text, "unknown file type")

    zero = tmp_path / "zero.nrrd"
    zero.touch()
    with pytest.raises(VolumeReadError) as excinfo:
        read_volume(zero)
    _assert_clean_error(excinfo, zero, "empty")

    broken_png = tmp_path / "broken.png"
    broken_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(VolumeReadError) as excinfo:
        read_volume(broken_png)
    _assert_clean_error(excinfo, broken_png, "PNG")


def test_rgb_volume_becomes_grey_and_single_frame_4d_becomes_3d(tmp_path):
    rgb = np.zeros((2, 3, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 200  # pure green: luminance 0.587 * 200 = 117.4
    image = sitk.GetImageFromArray(rgb, isVector=True)
    image.SetSpacing(SPACING)
    image.SetDirection(tuple(OBLIQUE.ravel()))
    sitk.WriteImage(image, str(tmp_path / "rgb.nrrd"))
    volume = read_volume(tmp_path / "rgb.nrrd")
    assert volume.array.shape == (2, 3, 4) and volume.array.dtype == np.uint8
    assert (volume.array == 117).all()
    assert np.allclose(volume.geometry.direction_matrix, OBLIQUE, atol=1e-6)

    single = sitk.JoinSeries([_sitk_image(_ct_array(seed=2), direction=np.eye(3))])
    sitk.WriteImage(single, str(tmp_path / "one_frame.nii.gz"))
    np.testing.assert_array_equal(read_volume(tmp_path / "one_frame.nii.gz").array, _ct_array(seed=2))


def test_four_dimensional_nifti_is_refused(tmp_path):
    frames = [_sitk_image(_ct_array(seed=s), direction=np.eye(3)) for s in range(3)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp_path / "fmri.nii.gz"))
    with pytest.raises(VolumeReadError, match="4D"):
        read_volume(tmp_path / "fmri.nii.gz")


# ---------------------------------------------------------------------------------------------
# orientation


@pytest.mark.parametrize(
    "direction",
    [np.eye(3), PERMUTED, np.diag([-1.0, -1.0, 1.0]), np.diag([1.0, -1.0, -1.0]), OBLIQUE,
     _rotation(0, 25, -10) @ np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])],
)
def test_ras_view_matches_sitk_dicom_orient(direction):
    array = _ct_array((5, 6, 7), seed=7)
    image = _sitk_image(array, direction=direction)
    oriented = sitk.DICOMOrient(image, "RAS")
    # DICOMOrient names the direction each index axis increases towards; check that reading
    d = np.asarray(oriented.GetDirection()).reshape(3, 3)
    assert d[0, 0] < 0 and d[1, 1] < 0 and d[2, 2] > 0
    expected = sitk.GetArrayViewFromImage(oriented)  # (z, y, x) of the RAS image = (S, A, R)
    view = ras_view(array, Geometry.from_sitk(image))
    np.testing.assert_array_equal(view, expected)
    assert np.shares_memory(view, array)  # a view, not a copy


def test_marker_lands_where_a_radiologist_expects_it():
    volume, (mi, mj, mk) = _marker_volume()
    assert volume.array[mk, mj, mi] == 1000
    # RAS sizes: S 9, A 6, R 7
    assert [slice_index_count(volume, a) for a in ("axial", "coronal", "sagittal")] == [9, 6, 7]
    expectations = {
        # axis: (index, image shape (rows, cols), marker (row, col))
        "axial": (9 - 1 - 3, (6, 7), (4, 1)),  # anterior at top, patient's right on the left
        "coronal": (6 - 1 - 4, (9, 7), (3, 1)),  # superior at top, patient's right on the left
        "sagittal": (7 - 1 - 1, (9, 6), (3, 4)),  # superior at top, anterior on the left
    }
    marker_lps = volume.geometry.index_to_physical((mi, mj, mk))
    for axis, (index, shape, pixel) in expectations.items():
        plane = extract_slice(volume, axis, index)
        assert plane.shape == shape, axis
        assert _marker_pixel(plane) == pixel, axis
        assert extract_slice(volume, axis, index - 1).max() == -1000, axis
        assert slice_index_at(volume, axis, tuple(marker_lps)) == index, axis
        picture = render_slice(volume, axis, index, "CT")
        assert picture.mode == "RGB" and picture.size == (shape[1], shape[0])
        rgb = np.asarray(picture)
        assert tuple(rgb[pixel]) == (255, 255, 255)
        assert rgb.sum() == 3 * 255, axis  # everything else is black (-1000 HU)


def test_orientation_does_not_depend_on_storage_order():
    """The same anatomy stored with two different directions renders identically."""
    volume, _ = _marker_volume()
    # resample the marker volume onto an LPS-identity grid covering the same voxels
    image = volume.to_sitk()
    lps = sitk.DICOMOrient(image, "LPS")
    assert np.allclose(lps.GetDirection(), np.eye(3).ravel())
    other = Volume(sitk.GetArrayFromImage(lps), Geometry.from_sitk(lps), modality="CT")
    for axis in ("axial", "coronal", "sagittal"):
        for index in range(slice_index_count(volume, axis)):
            np.testing.assert_array_equal(extract_slice(volume, axis, index), extract_slice(other, axis, index))


def test_identity_direction_axial_is_the_stored_dicom_plane():
    """An LPS-identity slice displayed as stored is already radiological (DICOM convention)."""
    array = _ct_array((4, 6, 7), seed=8)
    volume = Volume(array, Geometry.identity((7, 6, 4)))
    for k in range(4):
        np.testing.assert_array_equal(extract_slice(volume, "axial", k), array[k])


def test_axial_matches_the_protocol_reference_pipeline(tmp_path):
    """§7: orient to RAS, take the axial slice, transpose, rotate 180° — computed with nibabel."""
    data = np.random.default_rng(9).integers(-500, 500, size=(7, 6, 5)).astype(np.int16)  # (i, j, k)
    affine = np.array([[0.0, -1.3, 0.0, 40.0], [0.0, 0.0, 2.5, -12.0], [-0.7, 0.0, 0.0, 90.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ref.nii.gz")
    canonical = np.asarray(nib.as_closest_canonical(nib.load(tmp_path / "ref.nii.gz")).dataobj)
    volume = read_volume(tmp_path / "ref.nii.gz")
    assert slice_index_count(volume, "axial") == canonical.shape[2]
    for k in range(canonical.shape[2]):
        reference = np.rot90(canonical[:, :, k].T, 2)
        np.testing.assert_array_equal(extract_slice(volume, "axial", k), reference)


def test_slice_index_errors():
    volume, _ = _marker_volume()
    with pytest.raises(ValueError, match=r"0\.\.8"):
        extract_slice(volume, "axial", 9)
    with pytest.raises(ValueError, match=r"0\.\.5"):
        extract_slice(volume, "coronal", -1)
    with pytest.raises(ValueError, match="axial, coronal, sagittal"):
        extract_slice(volume, "transverse", 0)
    with pytest.raises(ValueError, match="integer"):
        extract_slice(volume, "axial", 2.0)  # type: ignore[arg-type]


def test_2d_images_render_as_stored():
    array = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    xray = Volume(array, Geometry.identity((4, 3, 1)), modality="DX")
    assert slice_index_count(xray, "axial") == 1 and slice_index_count(xray, "sagittal") == 1
    np.testing.assert_array_equal(np.asarray(render_slice(xray, "axial", 0))[..., 0], array[0])
    np.testing.assert_array_equal(extract_slice(xray, "coronal", 0), array[0])
    with pytest.raises(ValueError, match=r"0\.\.0"):
        extract_slice(xray, "axial", 1)


# ---------------------------------------------------------------------------------------------
# windows and rendering


def test_window_ct_exact_values():
    hu = np.array([[-3000, -150, -149, 50], [249, 250, 251, 3000]], dtype=np.int16)
    out = window_ct(hu)
    assert out.dtype == np.uint8 and out.shape == hu.shape
    np.testing.assert_array_equal(out, [[0, 0, 0, 127], [254, 255, 255, 255]])  # truncated like the reference
    np.testing.assert_array_equal(window_ct(np.array([0.0, 100.0]), center=50, width=100), [0, 255])
    with pytest.raises(ValueError):
        window_ct(hu, width=0)


def test_minmax_uint8():
    np.testing.assert_array_equal(minmax_uint8(np.array([[3.0, 8.0, 13.0]])), [[0, 127, 255]])
    constant = minmax_uint8(np.full((4, 4), 7.5))
    assert constant.dtype == np.uint8 and not constant.any()
    np.testing.assert_array_equal(minmax_uint8(np.array([np.nan, 1.0, 2.0])), [0, 0, 255])
    assert not minmax_uint8(np.full((2, 2), np.nan)).any()


def test_to_rgb():
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    rgb = to_rgb(gray)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)
    with pytest.raises(ValueError):
        to_rgb(gray.astype(np.int16))


def test_render_by_modality():
    array = np.zeros((3, 2, 2), dtype=np.int16)
    array[1] = [[-150, 50], [250, 1000]]
    volume = Volume(array, Geometry.identity((2, 2, 3)), modality="CT")
    ct = np.asarray(render_slice(volume, "axial", 1))  # modality taken from the volume
    np.testing.assert_array_equal(ct[..., 0], [[0, 127], [255, 255]])
    mri = np.asarray(render_slice(volume, "axial", 1, "MR"))
    np.testing.assert_array_equal(mri[..., 1], [[0, 44], [88, 255]])  # (x + 150) / 1150 * 255, truncated
    deep = Volume(np.array([[[0, 1000], [2000, 4000]]], dtype=np.uint16), Geometry.identity((2, 2, 1)))
    np.testing.assert_array_equal(np.asarray(render_slice(deep, "axial", 0, "CXR"))[..., 2], [[0, 63], [127, 255]])
    flat = Volume(np.array([[[3, 5], [7, 9]]], dtype=np.uint8), Geometry.identity((2, 2, 1)))
    np.testing.assert_array_equal(np.asarray(render_slice(flat, "axial", 0, "CXR"))[..., 0], [[3, 5], [7, 9]])
    with pytest.raises(ValueError, match="modality"):
        render_slice(Volume(array, Geometry.identity((2, 2, 3))), "axial", 1)
    with pytest.raises(ValueError, match="modality"):
        render_slice(volume, "axial", 1, "PET")


def test_label_slices_align_with_image_slices(tmp_path):
    array = _ct_array((5, 6, 7), seed=10)
    volume = Volume(array, Geometry(spacing=SPACING, origin=ORIGIN, direction=OBLIQUE, shape=(7, 6, 5)), "CT")
    labels = labelmap_like(volume, (array > 900).astype(np.uint8) + (array > 1500).astype(np.uint8) * 25)
    write_labelmap(labels.array, labels.geometry, tmp_path / "seg.nii.gz")
    reread = read_labelmap(tmp_path / "seg.nii.gz")
    for axis in ("axial", "coronal", "sagittal"):
        for index in range(slice_index_count(volume, axis)):
            image_plane = extract_slice(volume, axis, index)
            expected = (image_plane > 900).astype(np.uint8) + (image_plane > 1500).astype(np.uint8) * 25
            np.testing.assert_array_equal(render_label_slice(labels, axis, index), expected)
            np.testing.assert_array_equal(render_label_slice(reread, axis, index), expected)
    with pytest.raises(ValueError, match="integer"):
        render_label_slice(volume.__class__(array.astype(np.float32), volume.geometry), "axial", 0)


# ---------------------------------------------------------------------------------------------
# overlays

RED, BLUE, YELLOW = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0)


def test_present_labels_and_assign_colors():
    plane = np.array([[0, 26, 26], [1, 0, 5]])
    assert present_labels(plane) == [1, 5, 26]
    assert present_labels(np.zeros((2, 2), int)) == []
    assert assign_colors(plane, [RED, BLUE]) == [(1, RED), (5, BLUE), (26, RED)]


def test_overlay_colours_follow_present_labels_in_ascending_order():
    gray = np.full((4, 4), 100, dtype=np.uint8)
    plane = np.zeros((4, 4), dtype=np.int32)
    plane[0, 0] = 26
    plane[3, 3] = 1
    out = overlay_labels(gray, plane, [RED, BLUE, YELLOW])
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    one, twenty_six = out[3, 3].astype(int), out[0, 0].astype(int)
    assert one[0] > one[2] + 50, f"label 1 should be red-ish, got {one}"
    assert twenty_six[2] > twenty_six[0] + 50, f"label 26 should be blue-ish, got {twenty_six}"
    # alpha 0.3 blend over grey 100: 0.3 * colour + 0.7 * 100 / 255, in 0..255
    np.testing.assert_allclose(one, [0.3 * 255 + 70, 70, 70], atol=1)
    # background: the slice blended with label2rgb's black bg colour, as in the training overlays
    np.testing.assert_allclose(out[1, 1].astype(int), [70, 70, 70], atol=1)
    # an absent id does not use up a colour: {2, 3} → red, blue
    plane2 = np.array([[2, 3], [0, 0]])
    out2 = overlay_labels(np.full((2, 2), 100, np.uint8), plane2, [RED, BLUE])
    assert out2[0, 0, 0] > out2[0, 0, 2] and out2[0, 1, 2] > out2[0, 1, 0]


def test_overlay_cycles_colours_and_accepts_rgb_and_names():
    plane = np.arange(18).reshape(3, 6)  # 17 labels + background
    colors = [RED] + [(0.0, 1.0, 0.0)] * 15  # a 16-colour cycle
    out = overlay_labels(to_rgb(np.zeros((3, 6), np.uint8)), plane, colors)
    assert out[0, 1, 0] > 0 and out[0, 1, 1] == 0  # label 1 → colour 0 (red)
    assert out[2, 5, 0] > 0 and out[2, 5, 1] == 0  # label 17 → colour 16 % 16 = 0 (red)
    assert out[1, 0, 1] > 0 and out[1, 0, 0] == 0  # label 6 → green
    named = overlay_labels(np.zeros((3, 6), np.uint8), plane, ["red", "green"])
    np.testing.assert_array_equal(named[0, 1], out[0, 1])


def test_overlay_without_labels_and_bad_inputs():
    gray = np.arange(4, dtype=np.uint8).reshape(2, 2)
    no_labels = overlay_labels(gray * 50, np.zeros((2, 2), int), [RED])
    np.testing.assert_allclose(no_labels.astype(int), to_rgb(gray * 50).astype(int) * 0.7, atol=1)
    with pytest.raises(ValueError, match="does not match"):
        overlay_labels(gray, np.zeros((3, 2), int), [RED])
    with pytest.raises(ValueError, match="uint8"):
        overlay_labels(gray.astype(float), np.zeros((2, 2), int), [RED])
    with pytest.raises(ValueError, match="empty"):
        overlay_labels(gray, np.ones((2, 2), int), [])


def test_render_overlay_aligns_with_volume():
    volume, (mi, mj, mk) = _marker_volume(OBLIQUE)
    labels_array = np.zeros(volume.array.shape, dtype=np.uint8)
    labels_array[mk, mj, mi] = 26
    labels = labelmap_like(volume, labels_array)
    marker = volume.geometry.index_to_physical((mi, mj, mk))
    for axis in ("axial", "coronal", "sagittal"):
        index = slice_index_at(volume, axis, tuple(marker))
        picture, drawn = render_overlay(volume, labels, axis, index, [BLUE, RED])
        assert drawn == [(26, BLUE)]
        rgb = np.asarray(picture).astype(int)
        coloured = np.argwhere(rgb[..., 2] != rgb[..., 0])
        assert [tuple(p) for p in coloured] == [_marker_pixel(extract_slice(volume, axis, index))], axis
    shifted = Volume(labels.array, dataclasses.replace(volume.geometry, origin=(0.0, 0.0, 0.0)))
    with pytest.raises(ValueError, match="geometry"):
        render_overlay(volume, shifted, "axial", 0, [RED])


def test_mri_slices_are_scaled_by_the_whole_volume_range():
    """Like the reference (ScaleIntensity over the volume), a dim slice of an MRI stays dim."""
    array = np.zeros((4, 8, 8), dtype=np.float32)
    array[0] = 10.0   # a dim slice
    array[3] = 100.0  # the brightest voxels of the volume
    array[0, 0, 0] = 0.0
    volume = Volume(array, Geometry.identity((8, 8, 4), (1.0, 1.0, 1.0)), modality="MR")
    dim = np.asarray(render_slice(volume, "axial", 0))[..., 0]
    assert dim.max() == 25  # 10 / 100 * 255, truncated; a per-slice min-max would give 255


# ---------------------------------------------------------------------------------------------
# the fast paths give exactly the plain computation's result


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16])
def test_window_ct_table_equals_the_formula_for_every_value(dtype):
    info = np.iinfo(dtype)
    every = np.arange(info.min, info.max + 1).astype(dtype)
    for center, width in ((50.0, 400.0), (40, 80), (-600.0, 1500.0)):
        low = center - width / 2.0
        expected = np.clip((every.astype(np.float64) - low) * 255.0 / width, 0.0, 255.0).astype(np.uint8)
        np.testing.assert_array_equal(window_ct(every, center, width), expected)
        block = every.reshape(-1, 64)[::-1, ::3]  # any shape and strides
        np.testing.assert_array_equal(window_ct(block, center, width), expected.reshape(-1, 64)[::-1, ::3])


@pytest.mark.parametrize("kind", ["uint8", "uint16-large", "int32-negative", "bool", "int64-no-background"])
def test_overlay_equals_label2rgb_pixel_for_pixel(kind):
    from skimage.color import label2rgb

    from vila_m3.experts.colors import overlay_colors_float

    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (37, 53)).astype(np.uint8)
    labels = {
        "uint8": rng.integers(0, 40, (37, 53)).astype(np.uint8),
        "uint16-large": (rng.integers(0, 3, (37, 53)) * 30000).astype(np.uint16),
        "int32-negative": rng.integers(-3, 20, (37, 53)).astype(np.int32),
        "bool": rng.random((37, 53)) > 0.5,
        "int64-no-background": rng.integers(1, 130, (37, 53)).astype(np.int64),
    }[kind]

    def reference(gray, labels, colors, alpha):
        rgb = label2rgb(labels, image=gray, colors=list(colors), alpha=alpha, bg_label=0, kind="overlay")
        return (np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)

    for colors, alpha in ((overlay_colors_float(), 0.3), (["red", (0.1, 0.2, 0.3)], 0.55)):
        np.testing.assert_array_equal(overlay_labels(gray, labels, colors, alpha=alpha),
                                      reference(gray, labels, colors, alpha))
        strided = gray[::-1, ::2], labels[::-1, ::2]
        np.testing.assert_array_equal(overlay_labels(*strided, colors, alpha=alpha), reference(*strided, colors, alpha))


def test_whole_volume_statistics_are_scanned_once_per_volume_and_only_where_used(monkeypatch):
    import vila_m3.imaging.slices as slices

    scans = []
    real = slices.finite_range
    monkeypatch.setattr(slices, "finite_range", lambda values: scans.append(values.shape) or real(values))
    geometry = Geometry.identity((8, 8, 4))
    array = np.zeros((4, 8, 8), dtype=np.float32)
    array[3] = 100.0
    mri = Volume(array, geometry, modality="MR")
    labels = labelmap_like(mri, (array > 50).astype(np.uint8))
    first = np.asarray(render_slice(mri, "axial", 3))
    render_slice(mri, "coronal", 2)
    render_overlay(mri, labels, "axial", 3, [RED])
    assert scans == [(4, 8, 8)]  # the MRI's range: one scan for all its slices and overlays
    np.testing.assert_array_equal(np.asarray(render_slice(mri, "axial", 3)), first)

    ct = Volume(np.full((4, 8, 8), -1000, dtype=np.int16), geometry, modality="CT")
    render_slice(ct, "axial", 1)
    render_overlay(ct, labelmap_like(ct, np.zeros((4, 8, 8), np.uint8)), "axial", 1, [RED])
    assert scans == [(4, 8, 8)]  # a CT window needs only the slice

    # the remembered value belongs to the volume and its array: a new array is scanned again
    counted = []
    assert mri.derived("lowest", lambda values: counted.append(1) or float(values.min())) == 0.0
    assert mri.derived("lowest", lambda values: counted.append(1) or float(values.min())) == 0.0
    mri.array = array + 5.0
    assert mri.derived("lowest", lambda values: counted.append(1) or float(values.min())) == 5.0
    assert len(counted) == 2
    assert "_derived" not in repr(mri)
    assert Volume(array, geometry, modality="MR").derived("lowest", lambda values: float(values.min())) == 0.0
