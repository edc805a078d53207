"""Write the synthetic sample studies, their ground truth and a manifest; the ``samples`` command.

Layout under the output folder (paths in the manifest are relative to it)::

    studies/ct_abdomen.nii.gz, studies/brain_mri_{t1c,t1,t2,flair}.nii.gz, studies/cxr_chest.png
    ground_truth/ct_abdomen.nii.gz, ground_truth/brain_mri.nii.gz, ground_truth/cxr_chest.json
    dicom/ct_abdomen/CT0001.dcm ..., dicom/cxr_chest.dcm
    dicom/brain_mri/{t1c,t1,t2,flair}/MR0001.dcm ... (one series per sequence; manifest key ``dicom_series``)
    nrrd/ct_abdomen.nrrd
    manifest.json

Each study draws from its own random stream, derived from the seed, so the studies do not depend on
one another. The same seed and generator version give byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from PIL import Image

from vila_m3.progress import progress as show_progress
from vila_m3.samples import ct_phantom, cxr_phantom, mri_phantom
from vila_m3.samples.dicom_writer import write_ct_series, write_dx_image, write_mr_series

GENERATOR_VERSION = 2
"""Bumped whenever the phantoms or the layout change; a manifest from another version is rewritten."""

CT_ID = "ct_abdomen"
MRI_ID = "brain_mri"
MRI_SEQUENCES: tuple[str, ...] = mri_phantom.SEQUENCES
CXR_ID = "cxr_chest"
MANIFEST_NAME = "manifest.json"

_CT_FILES = {
    "image": f"studies/{CT_ID}.nii.gz",
    "label": f"ground_truth/{CT_ID}.nii.gz",
    "dicom": f"dicom/{CT_ID}",
    "nrrd": f"nrrd/{CT_ID}.nrrd",
}
_MRI_FILES = {
    **{sequence: f"studies/{MRI_ID}_{sequence}.nii.gz" for sequence in MRI_SEQUENCES},
    "label": f"ground_truth/{MRI_ID}.nii.gz",
}
_MRI_DICOM = {sequence: f"dicom/{MRI_ID}/{sequence}" for sequence in MRI_SEQUENCES}
"""One DICOM series folder per sequence (the manifest's ``dicom_series``; ``files`` keeps the volumes)."""
_CXR_FILES = {
    "image": f"studies/{CXR_ID}.png",
    "dicom": f"dicom/{CXR_ID}.dcm",
    "findings": f"ground_truth/{CXR_ID}.json",
}
_STREAMS = {CT_ID: 0, MRI_ID: 1, CXR_ID: 2}


def study_rng(seed: int, study_id: str) -> np.random.Generator:
    """The random stream of one study: independent of the other studies, fixed by ``seed``."""
    return np.random.default_rng([seed, _STREAMS[study_id]])


def _image(
    array: np.ndarray, spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]
) -> sitk.Image:
    """A SimpleITK image from a ``[z, y, x]`` array and its (x, y, z) geometry (LPS, mm)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(x) for x in spacing))
    image.SetOrigin(tuple(float(x) for x in origin))
    image.SetDirection(tuple(float(x) for x in direction))
    return image


def _write_nifti(image: sitk.Image, path: Path) -> None:
    """Write ``image`` as ``.nii.gz``: uncompressed NIfTI from SimpleITK, then gzipped with no file name
    and a zero time stamp (so the bytes depend on the content only) at the fastest level (noisy
    volumes hardly compress better at higher levels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The uncompressed copy goes elsewhere, so a datastore watching the studies folder never sees it.
    with tempfile.TemporaryDirectory(prefix="vila-m3-samples-") as scratch:
        plain = Path(scratch) / "image.nii"
        sitk.WriteImage(image, str(plain), useCompression=False)
        with (
            plain.open("rb") as source,
            path.open("wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as target,
        ):
            shutil.copyfileobj(source, target, length=1 << 20)


def _geometry_entry(modality: str, files: dict[str, str], image: sitk.Image) -> dict[str, Any]:
    """Manifest entry of a volume: modality, files and (x, y, z) geometry in LPS mm."""
    return {
        "modality": modality,
        "files": dict(files),
        "shape": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def _write_ct(out_dir: Path, seed: int) -> dict[str, Any]:
    """Write the abdominal CT (NIfTI, DICOM series, NRRD) and its labelmap; return its manifest entry."""
    phantom = ct_phantom.make_ct_phantom(study_rng(seed, CT_ID))
    geometry = (phantom.spacing, phantom.origin, phantom.direction)
    image = _image(phantom.hu, *geometry)
    _write_nifti(image, out_dir / _CT_FILES["image"])
    _write_nifti(_image(phantom.labels, *geometry), out_dir / _CT_FILES["label"])
    series_dir = out_dir / _CT_FILES["dicom"]
    for stale in series_dir.glob("CT*.dcm"):
        stale.unlink()
    write_ct_series(phantom.hu, *geometry, series_dir, seed, key=CT_ID)
    nrrd_path = out_dir / _CT_FILES["nrrd"]
    nrrd_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(nrrd_path), useCompression=True)
    entry = _geometry_entry("CT", _CT_FILES, image)
    entry["labels"] = {str(k): v for k, v in ct_phantom.LABEL_NAMES.items()}
    return entry


def _write_mri(out_dir: Path, seed: int) -> dict[str, Any]:
    """Write the four MRI sequences and the BRATS labelmap; return the manifest entry."""
    phantom = mri_phantom.make_mri_phantom(study_rng(seed, MRI_ID))
    geometry = (phantom.spacing, phantom.origin, phantom.direction)
    for sequence in MRI_SEQUENCES:
        _write_nifti(_image(phantom.sequences[sequence], *geometry), out_dir / _MRI_FILES[sequence])
    for number, sequence in enumerate(MRI_SEQUENCES, start=1):
        series_dir = out_dir / _MRI_DICOM[sequence]
        for stale in series_dir.glob("MR*.dcm"):
            stale.unlink()
        write_mr_series(phantom.sequences[sequence], *geometry, series_dir, seed, sequence, number, key=MRI_ID)
    label_image = _image(phantom.labels, *geometry)
    _write_nifti(label_image, out_dir / _MRI_FILES["label"])
    entry = _geometry_entry("MR", _MRI_FILES, label_image)
    entry["dicom_series"] = dict(_MRI_DICOM)
    entry["sequences"] = list(MRI_SEQUENCES)
    entry["labels"] = {str(k): v for k, v in mri_phantom.LABEL_NAMES.items()}
    return entry


def _write_cxr(out_dir: Path, seed: int) -> dict[str, Any]:
    """Write the chest X-ray (PNG and DX DICOM) and its findings; return the manifest entry."""
    phantom = cxr_phantom.make_cxr_phantom(study_rng(seed, CXR_ID))
    png_path = out_dir / _CXR_FILES["image"]
    png_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(phantom.pixels, mode="L").save(png_path, format="PNG")
    write_dx_image(phantom.pixels, phantom.pixel_spacing, out_dir / _CXR_FILES["dicom"], seed, key=CXR_ID)
    truth = {
        "findings": dict(phantom.findings),
        "cardiothoracic_ratio": round(phantom.cardiothoracic_ratio, 3),
        "view": "PA",
    }
    _write_json(out_dir / _CXR_FILES["findings"], truth)
    n_rows, n_cols = phantom.pixels.shape
    row_spacing, col_spacing = phantom.pixel_spacing
    return {
        "modality": "DX",
        "files": dict(_CXR_FILES),
        "shape": [n_cols, n_rows],
        "spacing": [col_spacing, row_spacing],
        "origin": [0.0, 0.0],
        "direction": [1.0, 0.0, 0.0, 1.0],
        "findings": dict(phantom.findings),
    }


def _write_json(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as indented JSON with a final newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _files_present(out_dir: Path, manifest: dict[str, Any]) -> bool:
    """Whether every file the manifest lists exists (the CT series with one file per slice)."""
    for study in manifest.get("studies", {}).values():
        for key, relative in study.get("files", {}).items():
            path = out_dir / relative
            if key == "dicom" and not relative.endswith(".dcm"):
                if len(list(path.glob("*.dcm"))) != study["shape"][2]:
                    return False
            elif not path.is_file():
                return False
        for relative in study.get("dicom_series", {}).values():
            if len(list((out_dir / relative).glob("*.dcm"))) != study["shape"][2]:
                return False
    return True


def load_current_manifest(out_dir: Path | str, seed: int = 0) -> dict[str, Any] | None:
    """The manifest under ``out_dir`` if it was written for ``seed`` by this generator version and all
    its files are there; otherwise None."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if manifest.get("seed") != seed or manifest.get("generator_version") != GENERATOR_VERSION:
        return None
    if set(manifest.get("studies", {})) != {CT_ID, MRI_ID, CXR_ID} or not _files_present(out_dir, manifest):
        return None
    return manifest


def ct_tumour_slice(samples_dir: Path | str) -> int:
    """The axial slice through most of the sample CT's hepatic tumours, from its ground truth in
    ``samples_dir/ground_truth``: an index as the chat's ``slice_index`` counts (``vila_m3.imaging.slices``,
    0 = inferior), the slice an annotator scrolls to. ValueError when the ground truth holds no tumour."""
    from vila_m3.imaging import read_labelmap
    from vila_m3.imaging.slices import ras_view

    truth = read_labelmap(Path(samples_dir) / _CT_FILES["label"])
    per_slice = (ras_view(np.asarray(truth.array), truth.geometry) == ct_phantom.HEPATIC_TUMOR).sum(axis=(1, 2))
    if not per_slice.any():
        raise ValueError(f"the sample CT's ground truth in {samples_dir} holds no hepatic tumour")
    return int(per_slice.argmax())


def generate_samples(out_dir: Path, seed: int = 0, force: bool = False, progress: bool = False) -> dict:
    """Write the sample studies under ``out_dir`` and return the manifest (also ``manifest.json``).

    If a manifest for the same seed and generator version is there with all its files, it is returned
    as it is, unless ``force``. The manifest is written last, so an interrupted run is redone.
    ``progress``: show the progress of the writing (stderr: a bar on a terminal, else plain lines).
    """
    out_dir = Path(out_dir)
    if not force:
        current = load_current_manifest(out_dir, seed)
        if current is not None:
            return current
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    writers = ((CT_ID, _write_ct), (MRI_ID, _write_mri), (CXR_ID, _write_cxr))
    manifest = {
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "studies": {study_id: write(out_dir, seed)
                    for study_id, write in show_progress(writers, "Writing the synthetic sample studies", "studies",
                                                         disable=not progress)},
    }
    _write_json(out_dir / MANIFEST_NAME, manifest)
    return json.loads(json.dumps(manifest))


def main(argv: Sequence[str] | None = None) -> int:
    """``samples --out DIR --seed N [--force]``: write the sample studies, one line per study."""
    parser = argparse.ArgumentParser(
        prog="vila-m3 samples", description="Write the synthetic sample studies."
    )
    parser.add_argument(
        "--out", type=Path, default=Path("sample_data"), help="output folder (default: sample_data)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the noise (default: 0)")
    parser.add_argument("--force", action="store_true", help="rewrite even if the samples are up to date")
    args = parser.parse_args(argv)

    up_to_date = not args.force and load_current_manifest(args.out, args.seed) is not None
    manifest = generate_samples(args.out, seed=args.seed, force=args.force, progress=True)
    state = "up to date" if up_to_date else "written"
    for study_id, study in manifest["studies"].items():
        shape = "x".join(str(n) for n in study["shape"])
        files = ", ".join(os.path.join(str(args.out), p) for p in study["files"].values())
        print(f"{study_id}: {study['modality']} {shape} {state}: {files}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
