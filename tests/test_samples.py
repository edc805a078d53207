"""The synthetic sample studies: determinism, geometry, ground truth and the DICOM/NRRD copies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage

from vila_m3.samples import (
    CT_ID,
    CXR_ID,
    GENERATOR_VERSION,
    MRI_ID,
    MRI_SEQUENCES,
    generate_samples,
    main,
)
from vila_m3.samples.cxr_phantom import make_cxr_phantom
from vila_m3.samples.generate import study_rng

CT_LABELS = {"liver": 1, "spleen": 3, "right kidney": 5, "left kidney": 14, "bone": 21, "hepatic tumor": 26}
XRV_PATHOLOGIES = {
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
}  # fmt: skip


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The samples for seed 0, written once for the module: (folder, manifest)."""
    out = tmp_path_factory.mktemp("samples")
    return out, generate_samples(out, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(samples: tuple[Path, dict], study: str, key: str) -> sitk.Image:
    out, manifest = samples
    return sitk.ReadImage(str(out / manifest["studies"][study]["files"][key]))


def _assert_same_geometry(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tol)


def _world_centroid(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """LPS position (mm) of the centroid of a ``[z, y, x]`` mask."""
    z, y, x = np.argwhere(mask).mean(axis=0)
    return np.array(image.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z))))


# ----------------------------------------------------------------------------- determinism, manifest


def test_same_seed_gives_byte_identical_files(samples: tuple[Path, dict], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = samples
    capsys.readouterr()
    generate_samples(tmp_path, seed=0, progress=True)  # showing the progress changes no byte
    shown = capsys.readouterr().err.splitlines()
    assert shown[0] == "Writing the synthetic sample studies: 3 studies to go"  # off a terminal: plain lines
    assert re.fullmatch(r"Writing the synthetic sample studies: 1/3 studies, \d+ s elapsed, ~\d+ s left", shown[1])
    assert re.fullmatch(r"Writing the synthetic sample studies: 3/3 studies, \d+ s elapsed, done", shown[-1])
    first, second = _files(out), _files(tmp_path)
    assert len(first) == 64 + 4 * 96 + 12  # CT slices, MRI slices of four series, the other files
    assert first.keys() == second.keys()
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []


def test_different_seed_changes_noise_not_anatomy(samples: tuple[Path, dict], tmp_path: Path) -> None:
    manifest = generate_samples(tmp_path, seed=1)
    assert manifest["seed"] == 1
    other = (tmp_path, manifest)
    ct0 = sitk.GetArrayFromImage(_read(samples, CT_ID, "image"))
    ct1 = sitk.GetArrayFromImage(_read(other, CT_ID, "image"))
    assert np.mean(ct0 != ct1) > 0.3
    for study in (CT_ID, MRI_ID):
        labels0 = sitk.GetArrayFromImage(_read(samples, study, "label"))
        labels1 = sitk.GetArrayFromImage(_read(other, study, "label"))
        np.testing.assert_array_equal(labels0, labels1)
    uid0 = pydicom.dcmread(samples[0] / "dicom" / CT_ID / "CT0001.dcm").StudyInstanceUID
    uid1 = pydicom.dcmread(tmp_path / "dicom" / CT_ID / "CT0001.dcm").StudyInstanceUID
    assert uid0 != uid1


def test_manifest_content_matches_files(samples: tuple[Path, dict]) -> None:
    out, manifest = samples
    assert json.loads((out / "manifest.json").read_text(encoding="utf-8")) == manifest
    assert manifest["seed"] == 0
    assert manifest["generator_version"] == GENERATOR_VERSION
    assert set(manifest["studies"]) == {CT_ID, MRI_ID, CXR_ID}
    assert set(manifest["studies"][MRI_ID]["files"]) == {*MRI_SEQUENCES, "label"}
    assert MRI_SEQUENCES == ("t1c", "t1", "t2", "flair")
    assert {s["modality"] for s in manifest["studies"].values()} == {"CT", "MR", "DX"}
    for study_id in (CT_ID, MRI_ID):
        study = manifest["studies"][study_id]
        for key, relative in study["files"].items():
            if key == "dicom":
                assert len(list((out / relative).glob("*.dcm"))) == study["shape"][2]
                continue
            image = sitk.ReadImage(str(out / relative))
            assert list(image.GetSize()) == study["shape"]
            np.testing.assert_allclose(image.GetSpacing(), study["spacing"], atol=1e-5)
            np.testing.assert_allclose(image.GetOrigin(), study["origin"], atol=1e-4)
            np.testing.assert_allclose(image.GetDirection(), study["direction"], atol=1e-5)
    cxr = manifest["studies"][CXR_ID]
    assert all((out / p).is_file() for p in cxr["files"].values())
    assert cxr["shape"] == [512, 512]


def test_existing_samples_are_reused_and_incomplete_ones_redone(tmp_path: Path) -> None:
    manifest = generate_samples(tmp_path, seed=3)
    ct_file = tmp_path / manifest["studies"][CT_ID]["files"]["image"]
    stamp = ct_file.stat().st_mtime_ns
    assert generate_samples(tmp_path, seed=3) == manifest
    assert ct_file.stat().st_mtime_ns == stamp

    missing = tmp_path / "dicom" / CT_ID / "CT0010.dcm"
    missing.unlink()
    assert generate_samples(tmp_path, seed=3) == manifest
    assert missing.is_file()
    assert ct_file.stat().st_mtime_ns != stamp

    stale = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    stale["generator_version"] = GENERATOR_VERSION - 1
    (tmp_path / "manifest.json").write_text(json.dumps(stale))
    assert generate_samples(tmp_path, seed=3)["generator_version"] == GENERATOR_VERSION


def test_cli_reports_each_study(samples: tuple[Path, dict], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = samples
    assert main(["--out", str(out), "--seed", "0"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [CT_ID, MRI_ID, CXR_ID]
    assert all("up to date" in line for line in lines)
    assert captured.err == ""  # nothing to write, no progress


# ----------------------------------------------------------------------------- abdominal CT


def test_ct_geometry(samples: tuple[Path, dict]) -> None:
    ct = _read(samples, CT_ID, "image")
    labels = _read(samples, CT_ID, "label")
    assert ct.GetPixelID() == sitk.sitkInt16
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert ct.GetSize() == (256, 256, 64)
    np.testing.assert_allclose(ct.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-6)
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    assert np.abs(direction - np.eye(3)).max() > 0.1
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(np.degrees(np.arctan2(direction[1, 0], direction[0, 0])), 10.0, atol=1e-4)
    _assert_same_geometry(ct, labels, tol=1e-6)


def test_ct_labels_and_intensities(samples: tuple[Path, dict]) -> None:
    hu = sitk.GetArrayFromImage(_read(samples, CT_ID, "image")).astype(float)
    labels = sitk.GetArrayFromImage(_read(samples, CT_ID, "label"))
    assert set(np.unique(labels).tolist()) == {0, *CT_LABELS.values()}
    assert hu[0, 0, 0] == -1000
    median = {name: np.median(hu[labels == i]) for name, i in CT_LABELS.items()}
    assert abs(median["liver"] - 60) <= 5
    assert abs(median["hepatic tumor"] - 20) <= 5
    assert abs(median["bone"] - 700) <= 20
    assert median["hepatic tumor"] < median["liver"] - 25


def test_hepatic_tumours_are_separate_and_inside_the_liver(samples: tuple[Path, dict]) -> None:
    labels = sitk.GetArrayFromImage(_read(samples, CT_ID, "label"))
    components, count = ndimage.label(labels == CT_LABELS["hepatic tumor"])
    assert count >= 2
    sizes = ndimage.sum_labels(np.ones_like(labels), components, index=range(1, count + 1))
    assert len(set(sizes.tolist())) == count
    liver_or_tumour = np.isin(labels, [CT_LABELS["liver"], CT_LABELS["hepatic tumor"]])
    fully_inside = 0
    for index in range(1, count + 1):
        tumour = components == index
        rim = ndimage.binary_dilation(tumour, structure=np.ones((3, 3, 3))) & ~tumour
        assert rim.any()
        assert (labels[rim] == CT_LABELS["liver"]).mean() > 0.5
        fully_inside += bool(liver_or_tumour[rim].all())
    assert fully_inside >= 1


def test_ct_anatomy_is_on_the_correct_side(samples: tuple[Path, dict]) -> None:
    ct = _read(samples, CT_ID, "image")
    hu = sitk.GetArrayFromImage(ct)
    labels = sitk.GetArrayFromImage(_read(samples, CT_ID, "label"))
    body = _world_centroid(ct, hu > -500)
    centre = {name: _world_centroid(ct, labels == i) - body for name, i in CT_LABELS.items()}
    # LPS: +x is the patient's left, +y posterior.
    assert centre["liver"][0] < -20
    assert centre["right kidney"][0] < -20
    assert centre["left kidney"][0] > 20
    assert centre["spleen"][0] > 20
    assert centre["bone"][1] > 20
    assert abs(centre["bone"][0]) < 10


def test_ct_slices_differ_along_z(samples: tuple[Path, dict]) -> None:
    labels = sitk.GetArrayFromImage(_read(samples, CT_ID, "label"))
    per_slice = [frozenset(np.unique(s).tolist()) for s in labels]
    assert len(set(per_slice)) >= 4
    first = {name: int(np.argmax((labels == i).any(axis=(1, 2)))) for name, i in CT_LABELS.items()}
    assert first["right kidney"] < first["left kidney"] < first["liver"]
    assert CT_LABELS["liver"] not in per_slice[0]
    bone_area = (labels == CT_LABELS["bone"]).sum(axis=(1, 2))
    assert bone_area.max() > 1.5 * bone_area.min() > 0


def test_dicom_series_round_trip(samples: tuple[Path, dict]) -> None:
    out, _ = samples
    series_dir = out / "dicom" / CT_ID
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(series_dir))
    assert len(names) == 64
    reader.SetFileNames(names)
    series = reader.Execute()
    nifti = _read(samples, CT_ID, "image")
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(series).astype(np.int32), sitk.GetArrayFromImage(nifti)
    )
    _assert_same_geometry(series, nifti, tol=1e-4)

    files = [pydicom.dcmread(p) for p in sorted(series_dir.glob("*.dcm"))]
    first = files[0]
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert first.Modality == "CT"
    assert str(first.PatientName) == "Phantom^Abdomen"
    assert (first.RescaleIntercept, first.RescaleSlope) == (-1024, 1)
    assert (first.WindowCenter, first.WindowWidth) == (50, 400)
    assert (first.Rows, first.Columns, first.BitsAllocated) == (256, 256, 16)
    assert [f.InstanceNumber for f in files] == list(range(1, 65))
    assert len({f.SOPInstanceUID for f in files}) == 64
    assert len({(f.StudyInstanceUID, f.SeriesInstanceUID, f.FrameOfReferenceUID) for f in files}) == 1
    np.testing.assert_allclose(np.diff([float(f.ImagePositionPatient[2]) for f in files]), 2.5, atol=1e-6)


def test_nrrd_matches_nifti(samples: tuple[Path, dict]) -> None:
    nrrd = _read(samples, CT_ID, "nrrd")
    nifti = _read(samples, CT_ID, "image")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(nrrd), sitk.GetArrayFromImage(nifti))
    _assert_same_geometry(nrrd, nifti, tol=1e-4)


# ----------------------------------------------------------------------------- brain MRI


def test_mri_sequences_share_one_geometry(samples: tuple[Path, dict]) -> None:
    images = [_read(samples, MRI_ID, s) for s in MRI_SEQUENCES]
    labels = _read(samples, MRI_ID, "label")
    for image in images:
        _assert_same_geometry(image, labels, tol=1e-6)
    assert labels.GetSize() == (128, 128, 96)
    np.testing.assert_allclose(labels.GetSpacing(), (1.5, 1.5, 1.5), atol=1e-6)
    assert np.abs(labels.GetOrigin()).min() > 1.0
    arrays = [sitk.GetArrayFromImage(image) for image in images]
    for a, b in zip(arrays, arrays[1:], strict=False):
        assert not np.array_equal(a, b)


def test_mri_sequences_as_four_dicom_series(samples: tuple[Path, dict]) -> None:
    out, manifest = samples
    series = manifest["studies"][MRI_ID]["dicom_series"]
    assert set(series) == set(MRI_SEQUENCES)
    seen = set()
    for number, sequence in enumerate(MRI_SEQUENCES, start=1):
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(out / series[sequence]))
        assert len(names) == 96
        reader.SetFileNames(names)
        volume = reader.Execute()
        nifti = _read(samples, MRI_ID, sequence)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), sitk.GetArrayFromImage(nifti))
        _assert_same_geometry(volume, nifti, tol=1e-4)
        first = pydicom.dcmread(names[0])
        assert (first.Modality, first.SOPClassUID, first.SeriesNumber) == ("MR", "1.2.840.10008.5.1.4.1.1.4", number)
        assert sequence.upper() in first.SeriesDescription
        seen.add((first.StudyInstanceUID, first.FrameOfReferenceUID, first.SeriesInstanceUID))
    assert len({s[:2] for s in seen}) == 1 and len({s[2] for s in seen}) == 4


def test_mri_tumour_labels_and_contrast(samples: tuple[Path, dict]) -> None:
    seq = {s: sitk.GetArrayFromImage(_read(samples, MRI_ID, s)).astype(float) for s in MRI_SEQUENCES}
    labels = sitk.GetArrayFromImage(_read(samples, MRI_ID, "label"))
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 4}
    core, edema, rim = labels == 1, labels == 2, labels == 4
    # The enhancing rim is bright on T1c only; the necrotic core does not enhance.
    assert seq["t1c"][rim].mean() > 1.5 * seq["t1"][rim].mean()
    assert seq["t1c"][core].mean() < 0.5 * seq["t1c"][rim].mean()
    # Oedema is bright on T2 and FLAIR compared with the same region in the other hemisphere.
    mirror = edema[:, :, ::-1]
    assert not (mirror & (labels > 0)).any()
    assert seq["flair"][edema].mean() > 1.3 * seq["flair"][mirror].mean()
    assert seq["t2"][edema].mean() > seq["t2"][mirror].mean()
    # The tumour sits in the patient's right hemisphere (LPS x < 0).
    image = _read(samples, MRI_ID, "label")
    assert _world_centroid(image, labels > 0)[0] < -10


# ----------------------------------------------------------------------------- chest X-ray


def test_cxr_png_and_dicom_hold_the_same_pixels(samples: tuple[Path, dict]) -> None:
    out, manifest = samples
    files = manifest["studies"][CXR_ID]["files"]
    png = Image.open(out / files["image"])
    assert png.mode == "L"
    assert png.size == (512, 512)
    pixels = np.asarray(png)
    ds = pydicom.dcmread(out / files["dicom"])
    assert ds.Modality in ("DX", "CR")
    assert ds.PhotometricInterpretation == "MONOCHROME2"
    assert [float(x) for x in ds.PixelSpacing] == [0.7, 0.7]
    np.testing.assert_array_equal(ds.pixel_array, pixels)
    assert 20 < pixels.mean() < 235
    assert pixels.std() > 30


def test_cxr_shows_cardiomegaly(samples: tuple[Path, dict]) -> None:
    out, manifest = samples
    truth = json.loads((out / manifest["studies"][CXR_ID]["files"]["findings"]).read_text(encoding="utf-8"))
    assert set(truth["findings"]) <= XRV_PATHOLOGIES
    assert truth["findings"]["Cardiomegaly"] is True
    assert truth["findings"]["Effusion"] is False
    assert truth["cardiothoracic_ratio"] > 0.5

    phantom = make_cxr_phantom(study_rng(0, CXR_ID))
    np.testing.assert_array_equal(phantom.pixels, np.asarray(Image.open(out / "studies" / "cxr_chest.png")))
    assert phantom.cardiothoracic_ratio == pytest.approx(truth["cardiothoracic_ratio"], abs=1e-3)
    lungs, heart = phantom.pixels[phantom.lungs].mean(), phantom.pixels[phantom.heart].mean()
    assert heart > lungs + 60
    # The heart extends further towards the patient's left (image right) than to the right.
    columns = np.flatnonzero(phantom.heart.any(axis=0))
    centre = (phantom.pixels.shape[1] - 1) / 2
    assert columns[-1] - centre > centre - columns[0]
