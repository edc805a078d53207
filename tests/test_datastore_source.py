"""One code path for a studies folder and a PACS: the data engine reads the app's MONAI Label ``Datastore``
through ``MonaiDatastoreSource`` (apps/vila_m3/lib/datastore_source.py).

- On a studies folder (``ContainedDatastore``, as the app builds it) the adapter gives byte for byte the export the
  offline CLI makes from the same folder: NIfTI and DICOM-series images, a BRATS study, a chest X-ray's findings
  (JSON) label and a label without its image.
- On a real Orthanc (``PacsDatastore``) the same adapter gives the same conversations for the same CT series and
  final label, split by the same hashed patient, with no identifier of the DICOM headers in the export. What
  differs is the id scheme only: a PACS image is its SeriesInstanceUID, a folder image its file name, so the
  hashed record and image ids differ.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "vila_m3"))

from lib.datastore import ContainedDatastore  # noqa: E402
from lib.datastore_source import MonaiDatastoreSource, app_source  # noqa: E402

from vila_m3.data import export_dataset, scan_export  # noqa: E402
from vila_m3.data.privacy import dicom_identifiers, find_dicom_files, hashed_id  # noqa: E402
from vila_m3.imaging.sequences import SEQUENCE_ORDER  # noqa: E402

EXTENSIONS = ["*.nii.gz", "*.nii", "*.nrrd", "*.jpg", "*.png"]
PATIENT_ID = "PHANTOM-CT-ABD"  # PatientID of the sample CT series
PATIENT_NAME = "Phantom^Abdomen"
CT_LABELS = {"liver": 1, "spleen": 3, "right kidney": 5, "left kidney": 14, "bone": 21, "hepatic tumor": 26}


def folder_studies(root: Path, sample_data: Path, nifti: bool = True) -> Path:
    """A studies folder: the CT as a DICOM series folder (and as NIfTI), the BRATS study, the chest X-ray, their
    final labels, and a label whose image is not there."""
    studies = root / "studies"
    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    shutil.copytree(sample_data / "dicom" / "ct_abdomen", studies / "ct_series")
    shutil.copy(sample_data / "ground_truth" / "ct_abdomen.nii.gz", final / "ct_series.nii.gz")
    if nifti:
        shutil.copy(sample_data / "studies" / "ct_abdomen.nii.gz", studies)
        shutil.copy(sample_data / "ground_truth" / "ct_abdomen.nii.gz", final)
        for sequence in SEQUENCE_ORDER:
            shutil.copy(sample_data / "studies" / f"brain_mri_{sequence}.nii.gz", studies)
        shutil.copy(sample_data / "ground_truth" / "brain_mri.nii.gz", final / "brain_mri_t1c.nii.gz")
        shutil.copy(sample_data / "studies" / "cxr_chest.png", studies)
        shutil.copy(sample_data / "ground_truth" / "cxr_chest.json", final / "cxr_chest.json")
        shutil.copy(sample_data / "ground_truth" / "ct_abdomen.nii.gz", final / "ghost.nii.gz")
    return studies


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_the_folder_datastore_lists_series_folders_findings_labels_and_orphans(tmp_path, sample_data):
    studies = folder_studies(tmp_path, sample_data)
    source = MonaiDatastoreSource(ContainedDatastore(str(studies), extensions=EXTENSIONS))
    images = {image.image_id: image for image in source.images()}
    assert set(images) == {"ct_abdomen", "ct_series", "cxr_chest", *(f"brain_mri_{s}" for s in SEQUENCE_ORDER)}
    assert images["ct_series"].file_name == "ct_series" and images["ct_series"].label_name == "ct_series.nii.gz"
    assert source.image_path(images["ct_series"]) == studies.resolve() / "ct_series"  # the series folder
    assert images["cxr_chest"].label_name == "cxr_chest.json"
    assert source.label_path(images["cxr_chest"]) == (studies / "labels" / "final" / "cxr_chest.json").resolve()
    assert images["brain_mri_t1"].label_name is None and images["brain_mri_t1c"].label_time is not None
    assert source.orphan_labels() == ["ghost.nii.gz"]
    assert source.location == str(studies.resolve())
    with pytest.raises(FileNotFoundError):
        source.label_path(images["brain_mri_t1"])


def test_the_apps_datastore_gives_the_export_the_cli_makes_from_the_same_folder(tmp_path, sample_data):
    studies = folder_studies(tmp_path, sample_data)
    source = app_source(ContainedDatastore(str(studies), extensions=EXTENSIONS))
    assert isinstance(source, MonaiDatastoreSource)
    through_app = export_dataset(source, tmp_path / "app", seed=0, progress=False)
    by_folder = export_dataset(studies, tmp_path / "cli", seed=0, progress=False)
    assert through_app.privacy_passed and by_folder.privacy_passed
    app_files, cli_files = files_of(through_app.out_dir), files_of(by_folder.out_dir)
    assert set(app_files) == set(cli_files)
    assert {name for name in app_files if app_files[name] != cli_files[name]} == set()
    assert {(s.source, s.reason) for s in through_app.skips} == {(s.source, s.reason) for s in by_folder.skips}
    assert ("ghost.nii.gz", "label without its image") in {(s.source, s.reason) for s in through_app.skips}
    manifest = json.loads(app_files["manifest.json"])
    assert {entry["category"] for entry in manifest["records"]} >= {"vista3d", "brats", "cxr"}
    # the DICOM series is split by its hashed patient and its header identifiers never reach the export
    units = {entry["unit"] for entry in manifest["records"] if entry["source"] == hashed_id(0, "source", "ct_series")}
    assert units == {hashed_id(0, "unit", f"patient:{PATIENT_ID}")}
    assert b"phantom" not in b"".join(app_files.values()).lower()


# ------------------------------------------------------------------------------------------------ a PACS


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Iterator:
    """Orthanc on a free port of 127.0.0.1 holding the sample CT series only."""
    from pacs_harness import load_samples, missing_reason, start_orthanc

    reason = missing_reason()
    if reason:
        pytest.skip(f"no PACS to test against: {reason}")
    pacs = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        load_samples(pacs, sample_data, ["ct_abdomen"])
        yield pacs
    finally:
        pacs.stop()


def pacs_datastore(url: str, cache: Path):
    from dicomweb_client import DICOMwebClient
    from lib.pacs_datastore import PacsDatastore

    client = DICOMwebClient(url=url)
    client.set_http_retry_params(retry=False)
    return PacsDatastore(client, {}, cache_path=str(cache))


def conversations(out: Path) -> list[tuple[str, list[str], list[bytes]]]:
    """Each unique record as (unit, its turns' texts, its images' bytes), sorted: what the id scheme leaves alone."""
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    units = {entry["id"]: entry["unit"] for entry in manifest["records"]}
    records = [record for part in ("train", "val") for record in
               json.loads((out / f"{part}.json").read_text(encoding="utf-8"))]
    found = {}
    for record in records:
        if record["id"] not in units:  # a repeat of a training record
            continue
        images = [record["image"]] if "image" in record else record.get("images", [])
        found[record["id"]] = (units[record["id"]], [turn["value"] for turn in record["conversations"]],
                               [np.asarray(Image.open(out / name)).tobytes() for name in images])
    return sorted(found.values())


@pytest.mark.pacs
def test_a_folder_and_a_pacs_give_the_same_conversations_through_the_same_adapter(tmp_path, orthanc, sample_data):
    series = orthanc.series["ct_abdomen"]
    store = pacs_datastore(orthanc.dicomweb_url, tmp_path / "cache")
    assert store.get_labels_by_image_id(series) == {}
    label = tmp_path / "upload" / "label.nii.gz"
    label.parent.mkdir()
    shutil.copy(sample_data / "ground_truth" / "ct_abdomen.nii.gz", label)
    store.save_label(series, str(label), "final", {"segments": list(CT_LABELS)})  # as the Slicer panel names them
    seg = store.get_labels_by_image_id(series)["final"]
    assert seg != series and store.get_label_info(seg, "final")["SeriesInstanceUID"] == seg

    pacs = app_source(store)
    assert isinstance(pacs, MonaiDatastoreSource)
    [image] = pacs.images()
    assert (image.image_id, image.file_name, image.label_name) == (series, series, f"{series}.nii.gz")
    assert image.label_time is not None and pacs.orphan_labels() == []
    assert pacs.image_path(image).is_dir()  # the downloaded instances: read as a folder's series, headers included
    from_pacs = export_dataset(pacs, tmp_path / "pacs", seed=0, progress=False)

    studies = folder_studies(tmp_path / "site", sample_data, nifti=False)
    folder = app_source(ContainedDatastore(str(studies), extensions=EXTENSIONS))
    from_folder = export_dataset(folder, tmp_path / "folder", seed=0, progress=False)

    assert from_pacs.privacy_passed and from_folder.privacy_passed
    pacs_records, folder_records = conversations(from_pacs.out_dir), conversations(from_folder.out_dir)
    assert pacs_records and len(pacs_records) == len(folder_records)
    # the same conversations on the same slices, split by the same hashed patient
    assert [texts for _, texts, _ in pacs_records] == [texts for _, texts, _ in folder_records]
    assert [pixels for _, _, pixels in pacs_records] == [pixels for _, _, pixels in folder_records]
    assert {unit for unit, _, _ in pacs_records} == {hashed_id(0, "unit", f"patient:{PATIENT_ID}")}

    # privacy across the boundary: the headers' identifiers were searched for and are nowhere in the export
    identifiers = dicom_identifiers(find_dicom_files(sample_data / "dicom" / "ct_abdomen"))
    assert {PATIENT_NAME, PATIENT_ID} <= identifiers
    manifest = json.loads((from_pacs.out_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["privacy"]["identifiers_searched"] >= len(identifiers)
    assert scan_export(from_pacs.out_dir, identifiers) == []
    blob = b"".join(files_of(from_pacs.out_dir).values())
    assert b"PHANTOM" not in blob.upper() and series.encode() not in blob and str(tmp_path).encode() not in blob


def test_a_series_folder_linked_in_from_outside_the_studies_folder_is_no_image(tmp_path, sample_data):
    studies = folder_studies(tmp_path, sample_data, nifti=False)
    shutil.copytree(sample_data / "dicom" / "ct_abdomen", tmp_path / "elsewhere")
    (studies / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (studies / "notes").mkdir()  # a folder without DICOM files is no image either
    (studies / "notes" / "readme.txt").write_text("not an image", encoding="utf-8")
    store = ContainedDatastore(str(studies), extensions=EXTENSIONS)
    assert store.list_images() == ["ct_series"]
    assert store.get_image_uri("linked") == ""
