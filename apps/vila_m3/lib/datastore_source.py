"""MONAI Label's datastore of a PACS behind the data engine's ``DatastoreSource`` protocol.

The data engine (``vila_m3.data``) reads studies and final labels through ``DatastoreSource``: a studies
folder is read by the core itself (``vila_m3.data.sources.LocalDatastore``, the same files MONAI Label's local
datastore keeps), and a DICOMweb datastore through ``PacsSource`` here, built on the ``PacsDatastore`` the app
was given: image series listed by QIDO-RS, each downloaded and converted into the datastore's cache at first
use, final labels the newest DICOM SEG in the PACS referencing the series, read back on the image's grid with
the experts' label values. ``app_source`` picks the one for the running app; the offline CLI is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lib.pacs_datastore import PacsDatastore
from vila_m3.data.sources import DatastoreImage, DatastoreSource


class PacsSource:
    """A ``DatastoreSource`` of a PACS: ids are SeriesInstanceUIDs; files live in the datastore's cache."""

    def __init__(self, datastore: PacsDatastore):
        self.datastore = datastore
        self.location = datastore.name()  # the DICOMweb URL (the export names its host only)
        finals = datastore._final_segs()
        self._segs = finals
        # the file name has no image suffix: the engine then reads identifiers from the DICOM headers
        self._images = [DatastoreImage(uid, uid, f"{uid}.nii.gz" if uid in finals else None, None)
                        for uid in sorted(datastore.list_images())]

    def images(self) -> list[DatastoreImage]:
        return list(self._images)

    def orphan_labels(self) -> list[str]:
        """A SEG whose series is not an image of the PACS is not listed as a final label at all."""
        return []

    def image_path(self, image: DatastoreImage) -> Path:
        uri = self.datastore.get_image_uri(image.image_id)
        if not uri:
            raise FileNotFoundError(f"series {image.image_id} could not be read from the PACS")
        return Path(uri)

    def dicom_path(self, image: DatastoreImage) -> Path:
        """The folder of the series' DICOM instances (for the identifiers their headers hold)."""
        folder = self.datastore.series_folder(image.image_id)
        if folder is None:
            raise FileNotFoundError(f"series {image.image_id} could not be read from the PACS")
        return folder

    def label_path(self, image: DatastoreImage) -> Path:
        seg = self._segs.get(image.image_id)
        label = self.datastore.final_label_file(image.image_id, seg) if seg else ""
        if not label:
            raise FileNotFoundError(f"the final label (DICOM SEG) of series {image.image_id} could not be read")
        return Path(label)


def app_source(datastore: Any, studies: str) -> str | DatastoreSource:
    """What the data engine reads for this app: a ``PacsSource`` on a DICOMweb datastore, else the studies folder."""
    if isinstance(datastore, PacsDatastore):
        return PacsSource(datastore)
    return studies
