"""Labelmaps as DICOM Segmentations (vila_m3.imaging.dicom_seg) on the sample CT series (oblique), read back
with highdicom: voxels, per-frame positions and orientation, references, segment names and codes."""

from __future__ import annotations

import random
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk

from vila_m3.imaging.dicom_seg import (
    SegAlgorithm,
    SegError,
    labelmap_to_seg,
    read_series,
    seg_to_labelmap,
    segment_codes,
)

LABEL_NAMES = {"liver": 1, "spleen": 3, "right kidney": 5, "left kidney": 14, "bone": 21, "hepatic tumor": 26,
               "unlisted thing": 99}


def _truth(sample_data: Path) -> tuple[np.ndarray, tuple]:
    image = sitk.ReadImage(str(sample_data / "ground_truth" / "ct_abdomen.nii.gz"))
    labels = sitk.GetArrayFromImage(image).astype(np.int32)
    labels[0, :4, :4] = 99  # a label the terminology table does not list
    return labels, (image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def test_a_seg_read_back_equals_the_labelmap_on_the_source_slices(sample_data, tmp_path):
    labels, geometry = _truth(sample_data)
    sources = read_series(sample_data / "dicom" / "ct_abdomen")
    random.Random(0).shuffle(sources)  # whatever order the series arrives in
    seg = labelmap_to_seg(labels, geometry, sources, LABEL_NAMES, {"liver": (220, 20, 20)},
                          SegAlgorithm("VISTA3D", "0.5.1", stand_in=True))
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    back = hd.seg.segread(path)

    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    ordered = sorted(sources, key=lambda ds: int(ds.InstanceNumber))  # the writer's slices run with z
    uids = [ds.SOPInstanceUID for ds in ordered]
    pixels = back.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True,
                                                relabel=False)
    numbers = {int(d.SegmentNumber): d.SegmentLabel for d in back.SegmentSequence}
    expected = np.zeros_like(labels)
    for number, name in numbers.items():
        expected[labels == LABEL_NAMES[name]] = number
    np.testing.assert_array_equal(pixels, expected)

    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert back.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    orientation = back.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose([float(v) for v in orientation], [float(v) for v in sources[0].ImageOrientationPatient],
                               atol=1e-6)
    assert len(back.PerFrameFunctionalGroupsSequence) == len(sources) * len(back.SegmentSequence)  # binary: a frame per segment and slice
    for frame in back.PerFrameFunctionalGroupsSequence:
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position],
                                   [float(v) for v in by_uid[source_uid].ImagePositionPatient], atol=1e-4)

    segments = {d.SegmentLabel: d for d in back.SegmentSequence}
    assert list(segments) == ["liver", "spleen", "right kidney", "left kidney", "bone", "hepatic tumor",
                              "unlisted thing"]
    liver = segments["liver"]
    assert (liver.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
            liver.SegmentedPropertyTypeCodeSequence[0].CodeValue) == ("SCT", "10200004")
    assert liver.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert liver.SegmentAlgorithmName == "VISTA3D" and "stand-in" in liver.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion
    assert liver.RecommendedDisplayCIELabValue != segments["bone"].RecommendedDisplayCIELabValue
    other = segments["unlisted thing"].SegmentedPropertyTypeCodeSequence[0]
    assert (other.CodingSchemeDesignator, other.CodeMeaning) == ("99VILAM3", "unlisted thing")
    assert "stand-in" in back.SeriesDescription


def test_codes_come_from_the_slicer_panels_table():
    category, kind, listed = segment_codes("Hepatic Tumor")
    assert listed and category.scheme == kind.scheme == "SCT"
    assert segment_codes("no such organ")[2] is False


def test_a_labelmap_off_the_series_slices_is_refused(sample_data):
    labels, (spacing, origin, direction) = _truth(sample_data)
    sources = read_series(sample_data / "dicom" / "ct_abdomen")
    shifted = (spacing, tuple(np.asarray(origin) + 1.0), direction)
    with pytest.raises(SegError, match="geometry"):
        labelmap_to_seg(labels, shifted, sources, LABEL_NAMES, {}, SegAlgorithm("VISTA3D", "1"))
    with pytest.raises(SegError, match="slices"):
        labelmap_to_seg(labels, (spacing, origin, direction), sources[:-1], LABEL_NAMES, {},
                        SegAlgorithm("VISTA3D", "1"))


def test_a_seg_read_back_onto_the_image_grid_gives_the_expert_label_values(sample_data):
    labels, geometry = _truth(sample_data)
    sources = read_series(sample_data / "dicom" / "ct_abdomen")
    seg = labelmap_to_seg(labels, geometry, sources, LABEL_NAMES, {}, SegAlgorithm("VISTA3D", "1"))
    back, names = seg_to_labelmap(seg, geometry, labels.shape, list(reversed(sources)))
    known = {name: value for name, value in LABEL_NAMES.items() if name != "unlisted thing"}
    assert {name: names[name] for name in known} == known
    expected = labels.copy()
    expected[labels == 99] = names["unlisted thing"]
    np.testing.assert_array_equal(back, expected)
    assert names["unlisted thing"] not in known.values()
