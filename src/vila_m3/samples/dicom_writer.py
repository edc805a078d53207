"""DICOM files for the synthetic studies: a CT series, the four MRI sequences (one series each, one file per
slice) and a DX radiograph.

Everything written is a function of the pixels, the geometry and the seed: UIDs are derived from the
seed, dates are fixed, so the same input gives byte-identical files. Written with the pydicom 2.4 API
(``is_little_endian`` / ``is_implicit_VR`` on the dataset, ``save_as(write_like_original=False)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, PYDICOM_ROOT_UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_RESCALE_INTERCEPT = -1024
"""HU = stored value + intercept (slope 1)."""
STUDY_DATE = "20240115"
STUDY_TIME = "093000"
MANUFACTURER = "VILA-M3 synthetic phantom"


def derive_uid(seed: int, *parts: str) -> str:
    """A UID under pydicom's root that depends only on ``seed`` and ``parts``.

    pydicom 2.4 ignores ``entropy_srcs`` when ``prefix`` is None (it returns a random ``2.25`` UUID),
    so the prefix is given; the sources are joined with a separator so that they cannot run together.
    """
    source = "|".join(["vila-m3-samples", str(seed), *parts])
    return generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=[source])


def _ds(value: float, decimals: int = 6) -> str:
    """Decimal String text of ``value``: fixed point, trailing zeros dropped, at most 16 characters."""
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    text = "0" if text in ("", "-0") else text
    if len(text) > 16:
        raise ValueError(f"{value!r} does not fit a DICOM decimal string with {decimals} decimals")
    return text


def _new_file_dataset(sop_class_uid: str, sop_instance_uid: str) -> FileDataset:
    """An empty little-endian explicit-VR file dataset with its file meta information."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(None, Dataset(), file_meta=meta, preamble=b"\x00" * 128)
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds


def _set_patient_and_study(ds: Dataset, seed: int, key: str, patient_name: str, patient_id: str) -> None:
    """Patient, study and equipment attributes shared by every file of study ``key``."""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = derive_uid(seed, key, "study")
    ds.StudyID = "1"
    ds.AccessionNumber = f"PH{seed:08d}"[:16]
    ds.ReferringPhysicianName = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = STUDY_TIME
    ds.Manufacturer = MANUFACTURER
    ds.SeriesInstanceUID = derive_uid(seed, key, "series")
    ds.SeriesNumber = 1


def write_ct_series(
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    out_dir: Path,
    seed: int,
    key: str = "ct_abdomen",
) -> list[Path]:
    """Write a CT volume as one CT Image Storage file per slice, ``CT0001.dcm`` upwards.

    ``hu``: integer ``[z, y, x]`` in HU (kept within -1024..3071). ``spacing`` (mm) and ``origin``
    (LPS mm) in (x, y, z) order; ``direction``: row-major 3x3 whose columns are the image axes in LPS.
    Slice ``k`` sits at ``origin + k * spacing[2] * direction[:, 2]``. Returns the paths written.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a [z, y, x] volume, got shape {hu.shape}")
    if hu.min() < CT_RESCALE_INTERCEPT or hu.max() > 4095 + CT_RESCALE_INTERCEPT:
        raise ValueError("HU values must lie within -1024..3071 to be stored in 12 bits")
    _, n_rows, n_cols = hu.shape
    axes = np.asarray(direction, dtype=float).reshape(3, 3)
    stored = (hu.astype(np.int32) - CT_RESCALE_INTERCEPT).astype("<u2")

    out_dir.mkdir(parents=True, exist_ok=True)
    ds = _new_file_dataset(CT_IMAGE_STORAGE, derive_uid(seed, key, "image", "0"))
    _set_patient_and_study(ds, seed, key, "Phantom^Abdomen", "PHANTOM-CT-ABD")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.SeriesDescription = "Synthetic abdominal CT phantom"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    ds.KVP = "120"
    ds.XRayTubeCurrent = 200
    ds.ConvolutionKernel = "STANDARD"
    _set_image_plane(ds, axes, spacing, n_rows, n_cols, derive_uid(seed, key, "frame-of-reference"))
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = str(CT_RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "50"
    ds.WindowWidth = "400"

    return _write_slices(ds, stored, axes, spacing, origin, out_dir, "CT",
                         lambda k: derive_uid(seed, key, "image", str(k)))


def write_mr_series(
    signal: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    out_dir: Path,
    seed: int,
    sequence: str,
    series_number: int,
    key: str = "brain_mri",
) -> list[Path]:
    """Write one MRI sequence as an MR Image Storage series, ``MR0001.dcm`` upwards.

    ``signal``: integer ``[z, y, x]`` within 0..65535 (arbitrary units, stored as is). Every sequence of
    study ``key`` shares the study and frame of reference; ``sequence`` names the series (its UID derives
    from it) and ``series_number`` numbers it. Geometry as in :func:`write_ct_series`. Returns the paths.
    """
    signal = np.asarray(signal)
    if signal.ndim != 3:
        raise ValueError(f"expected a [z, y, x] volume, got shape {signal.shape}")
    if signal.min() < 0 or signal.max() > 65535:
        raise ValueError("MR signal must lie within 0..65535 to be stored unsigned in 16 bits")
    _, n_rows, n_cols = signal.shape
    axes = np.asarray(direction, dtype=float).reshape(3, 3)
    stored = signal.astype("<u2")

    out_dir.mkdir(parents=True, exist_ok=True)
    ds = _new_file_dataset(MR_IMAGE_STORAGE, derive_uid(seed, key, sequence, "image", "0"))
    _set_patient_and_study(ds, seed, key, "Phantom^Brain", "PHANTOM-MR-BRAIN")
    ds.SeriesInstanceUID = derive_uid(seed, key, sequence, "series")
    ds.SeriesNumber = series_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "MR"
    ds.SeriesDescription = f"Synthetic brain MRI phantom {sequence.upper()}"
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.MRAcquisitionType = "3D"
    ds.MagneticFieldStrength = "3"
    _set_image_plane(ds, axes, spacing, n_rows, n_cols, derive_uid(seed, key, "frame-of-reference"))
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0

    return _write_slices(ds, stored, axes, spacing, origin, out_dir, "MR",
                         lambda k: derive_uid(seed, key, sequence, "image", str(k)))


def write_dx_image(
    pixels: np.ndarray, pixel_spacing: Sequence[float], path: Path, seed: int, key: str = "cxr_chest"
) -> Path:
    """Write an 8-bit grey radiograph as a DX (for presentation) file.

    ``pixels``: uint8 ``[row, column]``, MONOCHROME2 (dense is bright). ``pixel_spacing``: (row,
    column) in mm. The image is a posteroanterior chest view: rows run to the feet, columns to the
    patient's left.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [row, column] image, got {pixels.dtype} {pixels.shape}")
    ds = _new_file_dataset(DX_IMAGE_STORAGE_FOR_PRESENTATION, derive_uid(seed, key, "image", "0"))
    _set_patient_and_study(ds, seed, key, "Phantom^Chest", "PHANTOM-CXR")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Modality = "DX"
    ds.SeriesDescription = "Synthetic chest X-ray phantom"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.KVP = "120"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.ImagerPixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = "128"
    ds.WindowWidth = "256"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.add_new(0x7FE00010, "OB", np.ascontiguousarray(pixels).tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, write_like_original=False)
    return path


def _set_image_plane(ds: Dataset, axes: np.ndarray, spacing: Sequence[float], n_rows: int, n_cols: int,
                     frame_of_reference_uid: str) -> None:
    """The attributes every slice of a series shares: orientation (``axes`` columns i, j of the 3x3 direction),
    slice and pixel spacing (mm), frame of reference, and a one-sample grey picture of ``n_rows x n_cols``."""
    ds.SliceThickness = _ds(spacing[2])
    ds.SpacingBetweenSlices = _ds(spacing[2])
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [_ds(x, 10) for x in (*axes[:, 0], *axes[:, 1])]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = n_rows
    ds.Columns = n_cols
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]


def _write_slices(ds: Dataset, stored: np.ndarray, axes: np.ndarray, spacing: Sequence[float],
                  origin: Sequence[float], out_dir: Path, prefix: str, sop_uid: Callable[[int], str]) -> list[Path]:
    """Write ``stored[k]`` (``[z, y, x]``, 16-bit) as ``<prefix>0001.dcm`` upwards, slice ``k`` at ``origin + k *
    spacing[2] * axes[:, 2]`` (mm); one dataset serves every slice: only the per-slice attributes change."""
    normal = np.cross(axes[:, 0], axes[:, 1])
    paths = []
    for k in range(stored.shape[0]):
        uid = sop_uid(k)
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SOPInstanceUID = uid
        ds.InstanceNumber = k + 1
        position = np.asarray(origin, dtype=float) + k * float(spacing[2]) * axes[:, 2]
        ds.ImagePositionPatient = [_ds(x) for x in position]
        ds.SliceLocation = _ds(float(position @ normal))
        ds.add_new(0x7FE00010, "OW", stored[k].tobytes())
        path = out_dir / f"{prefix}{k + 1:04d}.dcm"
        ds.save_as(path, write_like_original=False)
        paths.append(path)
    return paths
