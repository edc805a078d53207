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
from pathlib import Path
from typing import Any

from cachetools import TTLCache, cached
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from pydicom.dataset import Dataset

from vila_m3.security.paths import is_valid_id

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

    def get_image_uri(self, image_id: str) -> str:
        """The image's NIfTI in the cache, downloaded and converted at first use; "" for an id that is not
        an image series of the PACS, or a series that cannot be read as a volume (logged)."""
        if not is_valid_id(image_id) or image_id not in self.list_images():
            return ""
        try:
            uri = super().get_image_uri(image_id)
        except Exception as err:  # a corrupt or incomplete series: refused, the rest keeps working
            logger.warning("PACS series %s could not be read as an image: %s", image_id, str(err)[:200])
            return ""
        # At the first download MONAI Label answers its temporary NIfTI (outside the cache) after copying
        # it into the cache: answer the cache's copy, always, and drop the temporary one.
        cached_copy = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        if uri and os.path.realpath(uri) != cached_copy and os.path.isfile(cached_copy):
            with contextlib.suppress(OSError):
                os.unlink(uri)
            return cached_copy
        return uri if uri and os.path.realpath(uri).startswith(self.cache_root + os.sep) else ""

    def series_folder(self, image_id: str) -> Path | None:
        """The folder of the series' downloaded DICOM instances in the cache (downloaded if needed), or None."""
        if not self.get_image_uri(image_id):
            return None
        folder = Path(os.path.realpath(os.path.join(self._datastore.image_path(), image_id)))
        return folder if folder.is_dir() and folder.is_relative_to(self.cache_root) else None

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if not (is_valid_id(label_id) and is_valid_id(label_tag)) or (image_id and not is_valid_id(image_id)):
            return ""
        return super().get_label_uri(label_id, label_tag, image_id)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """MONAI Label's image info without the cache path."""
        info = super().get_image_info(image_id) if is_valid_id(image_id) else {}
        info.pop("path", None)
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

    def series_info(self, series_uid: str) -> Dataset:
        """The PACS's QIDO-RS attributes of series ``series_uid``."""
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
        return Dataset.from_json(found[0])


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
