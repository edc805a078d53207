"""A PACS reached over DICOMweb as the app's datastore (``--studies http://pacs/dicom-web``).

MONAI Label's ``DICOMWebDatastore`` lists series by QIDO-RS, downloads a series by WADO-RS into a cache
folder (``<cache>/<md5 of the URL>/``) and converts it to NIfTI there, which is the file the tasks read.
``PacsDatastore`` keeps that and adds what a hospital's PACS needs:

- image ids are plain ids (``vila_m3.security.paths``) of series the PACS lists; anything else is no image
  (``get_image_uri`` answers "") and never becomes a path into the cache folder;
- only image series are images (``IMAGE_MODALITIES``): structured reports, PDFs, presentation states
  and segmentations in the same PACS are skipped with one log line each, not offered to the tasks;
- a series that cannot be downloaded or read as a volume is refused for that request ("" and a log
  line naming the series), the rest of the datastore keeps working;
- nothing is downloaded at start (MONAI Label fetches the dcmqi tools from GitHub there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from cachetools import TTLCache, cached
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import dicom_to_nifti
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

import vila_m3
from vila_m3.imaging import read_labelmap, read_volume, write_labelmap
from vila_m3.imaging.dicom_seg import SegAlgorithm, SegError, labelmap_to_seg, read_series, seg_to_labelmap
from vila_m3.imaging.dicom_series import series_problem
from vila_m3.imaging.sequences import SEQUENCE_ALIASES, SEQUENCE_ORDER
from vila_m3.security.paths import is_valid_id, is_within, scrub_paths

logger = logging.getLogger(__name__)

IMAGE_MODALITIES = frozenset({"CT", "MR", "DX", "CR", "PT"})
"""Series modalities offered as images; every other series (SR, DOC, SEG, PR, ...) is skipped."""
LIST_CACHE_S = 30.0
"""Seconds a series listing is reused before the PACS is asked again."""


def _value(item: dict[str, Any], tag: str) -> str:
    """The first value of DICOM JSON attribute ``tag`` (``"0008 0060"`` without the space), or ""."""
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


class PacsDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore limited to the PACS's image series, addressed by plain ids."""

    def __init__(self, client: DICOMwebClient, search_filter: dict[str, Any], cache_path: str | None = None,
                 fetch_by_frame: bool = False):
        filters = {key: value for key, value in (search_filter or {}).items() if key != "Modality"}
        modality = (search_filter or {}).get("Modality")
        # MONAI Label's default filter lists CT only; we list every image modality unless told otherwise
        self._modalities = IMAGE_MODALITIES if modality in (None, "", "CT") else frozenset({str(modality)})
        super().__init__(client, filters, cache_path=cache_path, fetch_by_frame=fetch_by_frame,
                         convert_to_nifti=True)
        self._problems: dict[str, str] = {}  # series id -> why it was refused
        self._segs_cache: tuple[float | None, dict[str, tuple[str, float | None]] | None] = (None, None)

    @property
    def location(self) -> str:
        """The DICOMweb URL (an export's manifest names its host only)."""
        return self.name()

    @property
    def cache_root(self) -> str:
        """The folder holding the downloaded series and their NIfTI copies (symbolic links resolved)."""
        return os.path.realpath(self._datastore_path)

    @cached(cache=TTLCache(maxsize=16, ttl=LIST_CACHE_S))
    def list_images(self) -> list[str]:
        """SeriesInstanceUIDs of the PACS's image series (``IMAGE_MODALITIES``), in the PACS's order."""
        images = []
        for item in self._client.search_for_series(search_filters=self._search_filter):
            uid, modality = _value(item, "0020000E"), _value(item, "00080060")
            if modality in self._modalities and is_valid_id(uid):
                images.append(uid)
            else:
                logger.info("PACS series %s skipped: modality %r is not an image series", uid[:64],
                            modality or "unknown")
        return images

    def _is_image_series(self, image_id: str) -> bool:
        """Whether ``image_id`` is an image series of the PACS: listed, or (stored since the listing was made)
        found by its UID with an image modality; a non-image series is remembered with its reason."""
        try:
            if image_id in self.list_images():
                return True
            found = self._client.search_for_series(search_filters={"SeriesInstanceUID": image_id})
        except Exception:  # the PACS's lookup failed: no such image for this request
            logger.warning("PACS lookup of series %s failed", image_id, exc_info=True)
            return False
        if not found:
            return False
        modality = _value(found[0], "00080060")
        if modality not in self._modalities:
            self._problems[image_id] = f"series {image_id} is a {modality or 'non-image'} series, not an image"
            return False
        return True

    def image_problem(self, image_id: str) -> str | None:
        """Why series ``image_id`` was refused (a sentence for the client, no paths), or None."""
        return self._problems.get(image_id) if is_valid_id(image_id) else None

    def get_image_uri(self, image_id: str) -> str:
        """The image's NIfTI in the cache, downloaded and converted at first use; "" for an id that is not
        an image series of the PACS, or a series that is not one readable volume (``image_problem`` says why;
        the rest of the datastore keeps working)."""
        if not is_valid_id(image_id) or not self._is_image_series(image_id):
            return ""
        image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        nifti = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        if not (image_dir.startswith(self.cache_root + os.sep) and nifti.startswith(self.cache_root + os.sep)):
            return ""
        if os.path.isfile(nifti) and image_id in self._datastore.objects:
            return nifti
        try:
            if not os.path.isdir(image_dir) or not os.listdir(image_dir):
                dicom_web_download_series(None, image_id, image_dir, self._client, self._fetch_by_frame)
            problem = series_problem(image_dir)
            if problem is None:
                converted = dicom_to_nifti(image_dir)
                try:
                    LocalDatastore.add_image(self, image_id, converted, self._dicom_info(image_id))
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(converted)
        except Exception as err:  # the download or the conversion failed
            logger.warning("PACS series %s could not be read as an image: %s", image_id, str(err)[:200])
            problem = "it could not be read as a volume"
        if problem is not None:
            logger.warning("PACS series %s refused: %s", image_id, problem)
            self._problems[image_id] = f"series {image_id} cannot be used: {problem}"
            return ""
        self._problems.pop(image_id, None)
        return nifti if os.path.isfile(nifti) else ""

    def series_folder(self, image_id: str) -> Path | None:
        """The folder of the series' downloaded DICOM instances in the cache (downloaded if needed), or None."""
        if not self.get_image_uri(image_id):
            return None
        folder = Path(os.path.realpath(os.path.join(self._datastore.image_path(), image_id)))
        return folder if folder.is_dir() and folder.is_relative_to(self.cache_root) else None

    def _final_label(self, label_id: str, image_id: str = "") -> tuple[str, str] | None:
        """(image series, SEG series) of a final label named by its SEG series UID (MONAI Label's label id on a
        DICOMweb datastore) or by its image series UID (the label id of a folder datastore); None if there is none."""
        segs = self._final_segs()
        if image_id:
            return (image_id, label_id) if segs.get(image_id) == label_id else None
        if label_id in segs:
            return label_id, segs[label_id]
        return next(((image, seg) for image, seg in segs.items() if seg == label_id), None)

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        """{tag: label id}: ``final`` is the newest SEG series in the PACS referencing the series (its UID); other
        tags are those kept in the cache."""
        if not is_valid_id(image_id):
            return {}
        labels = {tag: label for tag, label in super().get_labels_by_image_id(image_id).items()
                  if tag != DefaultLabelTag.FINAL}
        seg = self._final_segs().get(image_id)
        if seg:
            labels[DefaultLabelTag.FINAL] = seg
        return labels

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A final label (``label_id``: its SEG series, or the image series) is the SEG read back as a NIfTI
        labelmap on the image's grid (:meth:`final_label_file`); other tags are files in the cache."""
        if not (is_valid_id(label_id) and is_valid_id(label_tag)) or (image_id and not is_valid_id(image_id)):
            return ""
        if label_tag != DefaultLabelTag.FINAL:
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        found = self._final_label(label_id, image_id)
        return self.final_label_file(*found) if found else ""

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        """A final label's SEG series, its time (``ts``, seconds since the epoch: the SEG's series date and time, else
        its content date and time) and ``name`` (the labelmap's file name), with what a save on this server recorded
        (``chat_id``, ``label_names``); other tags as MONAI Label keeps them."""
        if not (is_valid_id(label_id) and is_valid_id(label_tag)):
            return {}
        if label_tag != DefaultLabelTag.FINAL:
            return super().get_label_info(label_id, label_tag)
        found = self._final_label(label_id)
        if found is None:
            return {}
        image, seg = found
        kept = LocalDatastore.get_label_info(self, image, DefaultLabelTag.FINAL)  # what a save here recorded
        info: dict[str, Any] = {**(kept if kept.get("SeriesInstanceUID") == seg else {}),
                                "SeriesInstanceUID": seg, "name": f"{image}.nii.gz"}
        stamp = self._final_seg_times().get(image)
        if stamp is not None:
            info["ts"] = stamp
        return info

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """MONAI Label's image info without the cache path; ``name`` is the series UID (the image is the series,
        its NIfTI copy in the cache is no file of the PACS)."""
        info = super().get_image_info(image_id) if is_valid_id(image_id) else {}
        info.pop("path", None)
        if info or (is_valid_id(image_id) and image_id in self.list_images()):
            info["name"] = image_id
        return info

    def json(self) -> dict[str, Any]:
        """The datastore listing (``GET /datastore/?output=all``): every image series of the PACS, those not
        yet downloaded with empty info."""
        listing = super().json()
        objects = listing.setdefault("objects", {})
        for uid in self.list_images():
            objects.setdefault(uid, {"image": {"ext": "", "info": {}}, "labels": {}})
        for entry in objects.values():
            (entry.get("image") or {}).get("info", {}).pop("path", None)
        return listing

    # --- final labels: DICOM Segmentations in the PACS ------------------------------------------------

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        """A final label is stored in the PACS (STOW-RS) as a DICOM Segmentation of the image's series, with
        named, coded segments (``vila_m3.imaging.dicom_seg``), and kept in the cache; other tags stay in the
        cache only. Label names: ``label_names`` ({name: value}) of the params, else the expert label names
        among ``segments``, else ``label <value>``."""
        if not is_valid_id(image_id) or image_id not in self.list_images():
            _drop(label_filename)
            raise HTTPException(404, f"image '{image_id[:80]}' is not an image series of the PACS")
        if not is_valid_id(label_tag):
            _drop(label_filename)
            raise HTTPException(422, "tag: use a plain label tag such as 'final'")
        if label_tag != DefaultLabelTag.FINAL:
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        series = self.series_folder(image_id)
        if series is None:
            _drop(label_filename)
            raise HTTPException(422, f"image '{image_id}' could not be read from the PACS")
        try:
            labels = read_labelmap(label_filename)
            names = final_label_names(labels.array, label_info)
            geometry = labels.geometry
            colors = {name: _display_color(name) for name in names}
            algorithm = SegAlgorithm("VILA-M3 annotation", f"vila-m3 {vila_m3.__version__}")
            seg = labelmap_to_seg(labels.array, (geometry.spacing, geometry.origin, geometry.direction),
                                  read_series(series), names, colors, algorithm, series_number=901)
        except (SegError, OSError, ValueError) as err:
            _drop(label_filename)
            raise HTTPException(422, f"final label: {scrub_paths(str(err))}") from None
        seg.SeriesDescription = "VILA-M3 final label"
        self._client.store_instances([seg])
        self._segs_cache = (None, None)  # the next listing asks the PACS (the new SEG is the newest)
        logger.info("final label of series %s stored in the PACS as SEG series %s", image_id, seg.SeriesInstanceUID)
        info = {**label_info, "SeriesInstanceUID": str(seg.SeriesInstanceUID), "label_names": names}
        return LocalDatastore.save_label(self, image_id, label_filename, label_tag, info)

    def _final_segs(self) -> dict[str, str]:
        """Image series -> the newest SEG series in the PACS that references it (image series of this datastore);
        the PACS is asked again after ``LIST_CACHE_S`` or a final label saved here."""
        now = time.monotonic()
        cached_at, found = self._segs_cache
        if found is None or cached_at is None or now - cached_at > LIST_CACHE_S:
            found = self._search_final_segs()
            self._segs_cache = (now, found)
        return {image: seg for image, (seg, _) in found.items()}

    def _final_seg_times(self) -> dict[str, float]:
        """Image series -> when its final label's SEG series was made (seconds since the epoch), where it says."""
        self._final_segs()
        return {image: stamp for image, (_, stamp) in self._segs_cache[1].items() if stamp is not None}

    def _search_final_segs(self) -> dict[str, tuple[str, float | None]]:
        """Image series -> (the newest SEG series referencing it, when it was made in seconds since the epoch: its
        series date and time, else its content date and time)."""
        images = set(self.list_images())
        newest: dict[str, tuple[str, str]] = {}
        for item in self._client.search_for_series(search_filters={"Modality": "SEG"}):
            study, seg_uid = _value(item, "0020000D"), _value(item, "0020000E")
            try:
                meta = Dataset.from_json(self._client.retrieve_series_metadata(study, seg_uid)[0])
                referenced = str(meta.ReferencedSeriesSequence[0].SeriesInstanceUID)
            except Exception:  # not a SEG of a series (or unreadable): not a final label
                logger.info("PACS SEG series %s skipped: it references no series", seg_uid[:64])
                continue
            stamp = (f"{meta.get('SeriesDate', '')}{meta.get('SeriesTime', '')}" if meta.get("SeriesDate") else
                     f"{meta.get('ContentDate', '')}{meta.get('ContentTime', '')}")
            if referenced in images and (referenced not in newest or stamp >= newest[referenced][0]):
                newest[referenced] = (stamp, seg_uid)
        return {image: (seg_uid, _epoch(stamp)) for image, (stamp, seg_uid) in newest.items()}

    def final_label_file(self, image_id: str, seg_uid: str) -> str:
        """The final label of ``image_id`` read from PACS SEG series ``seg_uid`` as a NIfTI labelmap on the
        image's grid (expert label values for known names), cached in ``labels/final/``; "" if unreadable."""
        folder = Path(self._datastore.label_path(DefaultLabelTag.FINAL))
        target = folder / f"{image_id}.nii.gz"
        marker = folder / f".{image_id}.seg"
        if target.is_file() and marker.is_file() and marker.read_text(encoding="utf-8") == seg_uid:
            return str(target)
        image = self.get_image_uri(image_id)
        series = self.series_folder(image_id)
        if not image or series is None:
            return ""
        try:
            study = str(self.series_info(seg_uid).StudyInstanceUID)
            seg = self._client.retrieve_series(study, seg_uid)[0]
            volume = read_volume(image)
            geometry = volume.geometry
            labels, names = seg_to_labelmap(seg, (geometry.spacing, geometry.origin, geometry.direction),
                                            volume.array.shape, read_series(series))
        except Exception as err:
            logger.warning("final label SEG %s of series %s unreadable: %s", seg_uid, image_id, str(err)[:200])
            return ""
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{image_id}.partial.nii.gz"
        write_labelmap(labels, geometry, partial)
        kept = LocalDatastore.get_label_info(self, image_id, DefaultLabelTag.FINAL)  # saved here: chat_id, segments
        kept = kept if kept.get("SeriesInstanceUID") == seg_uid else {}
        try:
            LocalDatastore.save_label(self, image_id, str(partial), DefaultLabelTag.FINAL,
                                      {**kept, "SeriesInstanceUID": seg_uid, "label_names": names})
        finally:
            partial.unlink(missing_ok=True)
        marker.write_text(seg_uid, encoding="utf-8")
        return str(target) if target.is_file() else ""

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """Training pairs of the PACS: each image series with a SEG referencing it (the newest), both as NIfTI
        files in the cache."""
        pairs = []
        for image_id, seg_uid in sorted(self._final_segs().items()):
            label = self.final_label_file(image_id, seg_uid)
            image = self.get_image_uri(image_id)
            if label and image:
                pairs.append({"image": image, "label": label})
        return pairs

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return sorted(self._final_segs())

    def study_sequences(self, image_id: str) -> dict[str, str]:
        """The four BRATS sequences of the MRI study that series ``image_id`` belongs to, found by the sequence
        name in each MR series' description (``... T1C``, ``T1``, ``T2``, ``FLAIR``; aliases as for file names):
        ``{t1c|t1|t2|flair: NIfTI in the cache}``, or {} unless all four are there, one each, ``image_id`` among them."""
        if not is_valid_id(image_id) or not self._is_image_series(image_id):
            return {}
        try:
            study = str(self.series_info(image_id).StudyInstanceUID)
            found = self._client.search_for_series(search_filters={"StudyInstanceUID": study})
        except Exception:
            logger.warning("PACS lookup of the study of series %s failed", image_id, exc_info=True)
            return {}
        series: dict[str, list[str]] = {}
        for item in found:
            if _value(item, "00080060") != "MR":
                continue
            words = re.split(r"[^a-z0-9]+", _value(item, "0008103E").lower())
            name = next((SEQUENCE_ALIASES[w] for w in reversed(words) if w in SEQUENCE_ALIASES), None)
            if name:
                series.setdefault(name, []).append(_value(item, "0020000E"))
        if set(series) != set(SEQUENCE_ORDER) or any(len(uids) != 1 for uids in series.values()):
            return {}
        if image_id not in {uids[0] for uids in series.values()}:
            return {}
        paths = {name: self.get_image_uri(uids[0]) for name, uids in series.items()}
        return paths if all(paths.values()) else {}

    def series_info(self, series_uid: str) -> Dataset:
        """The PACS's QIDO-RS attributes of series ``series_uid``."""
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        return Dataset.from_json(found[0])


def _epoch(stamp: str) -> float | None:
    """``YYYYMMDDHHMMSS[.ffffff]`` (a DICOM date and time, in this server's time zone as the SEGs it writes) as
    seconds since the epoch, or None."""
    try:
        return datetime.strptime(stamp[:14], "%Y%m%d%H%M%S").timestamp()
    except ValueError:
        return None


def _drop(filename: str) -> None:
    """Remove a refused upload's temporary file (MONAI Label's route removes it only after a success)."""
    with contextlib.suppress(OSError):
        if filename and is_within(filename, [tempfile.gettempdir()]) and os.path.isfile(filename):
            os.unlink(filename)


def _display_color(name: str) -> tuple[int, int, int]:
    """The Slicer display colour (RGB 0-255) an expert gives ``name``, or grey."""
    from vila_m3.experts.registry import ExpertRegistry

    key = " ".join(name.lower().split())
    for spec in ExpertRegistry.from_config().configured:
        for value, label in spec.labels.items():
            if " ".join(str(label).lower().split()) == key:
                return tuple(int(c) for c in spec.label_color(int(value)))  # type: ignore[return-value]
    return (128, 128, 128)


def final_label_names(labels: Any, label_info: dict[str, Any]) -> dict[str, int]:
    """{name: value} of a final label's values: the params' ``label_names``, else the expert label names among
    its ``segments`` (the Slicer panel sends the segment names), else ``label <value>``."""
    import numpy as np

    from vila_m3.imaging.dicom_seg import expert_label_values

    present = sorted(int(v) for v in np.unique(labels) if int(v) != 0)
    given = label_info.get("label_names")
    names: dict[str, int] = {}
    if isinstance(given, dict):
        names = {str(k): int(v) for k, v in given.items() if isinstance(v, int) and v in present}
    known = expert_label_values()
    segments = label_info.get("segments") if isinstance(label_info.get("segments"), list) else []
    for segment in segments:
        value = known.get(" ".join(str(segment).lower().split()))
        if value in present and value not in names.values():
            names[str(segment)] = value
    for value in present:
        if value not in names.values():
            names[f"label {value}"] = value
    return names


def open_pacs_datastore(url: str) -> PacsDatastore:
    """The datastore of DICOMweb ``url`` with MONAI Label's DICOMweb settings (login, prefixes, cache path,
    search filter), as MONAI Label builds it but without downloading tools at start."""
    session = None
    username = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
    password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
    if username and password:
        session = create_session_from_user_pass(username, password)
    client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                             wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                             stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or "").strip()
    return PacsDatastore(client, dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER), cache_path=cache_path or None,
                         fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME)
