"""MONAI Label's ``Datastore`` behind the data engine's ``DatastoreSource`` protocol: one code path for a
studies folder and a PACS.

The data engine (``vila_m3.data``) reads studies and final labels through ``DatastoreSource``. In the app,
``MonaiDatastoreSource`` reads them through the ``Datastore`` object MONAI Label hands the app, with its
standard methods only: ``list_images``, ``get_image_info`` (``name``), ``get_image_uri``,
``get_labels_by_image_id``, ``get_label_uri`` and ``get_label_info`` (``name``, ``ts``). What differs between
a folder and a PACS lives in the datastore classes behind those methods:

- ``ContainedDatastore`` (lib/datastore.py): files of the studies folder, DICOM series folders as images,
  findings labels (``labels/final/<id>.json``) of chest X-rays;
- ``PacsDatastore`` (lib/pacs_datastore.py): series downloaded and converted at first use, a final label is the
  newest DICOM SEG in the PACS referencing the series, read back as a labelmap on the image's grid.

Two optional hooks, looked up by name: ``series_folder(image_id)`` (the DICOM instances of an image whose file
is a converted copy: the engine reads them as it reads a folder's DICOM series, identifiers in the headers
included, so a series gives the same volume, draws and records from a PACS as from a folder) and
``orphan_labels(tag)`` (label files without an image). The offline CLI keeps reading folders and running servers (``vila_m3.data.sources``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vila_m3.data.sources import DatastoreImage, DatastoreSource

FINAL_TAG = "final"


class MonaiDatastoreSource:
    """A ``DatastoreSource`` over MONAI Label's ``Datastore`` (a local folder or a PACS, the same code).

    Args:
        datastore: the app's datastore (``app_instance().datastore()``).
        tag: the label tag exported (MONAI Label's ``final``).
    """

    def __init__(self, datastore: Any, tag: str = FINAL_TAG):
        self.datastore = datastore
        self.tag = tag
        self.location = str(getattr(datastore, "location", "") or datastore.name())
        self._label_ids: dict[str, str] = {}
        self._images = [self._image(image_id) for image_id in sorted(datastore.list_images())]

    def _image(self, image_id: str) -> DatastoreImage:
        info = self.datastore.get_image_info(image_id) or {}
        file_name = str(info.get("name") or os.path.basename(self.datastore.get_image_uri(image_id)) or image_id)
        label_id = (self.datastore.get_labels_by_image_id(image_id) or {}).get(self.tag)
        if not label_id:
            return DatastoreImage(image_id, file_name)
        self._label_ids[image_id] = label_id
        label = self.datastore.get_label_info(label_id, self.tag) or {}
        name = str(label.get("name") or os.path.basename(self.datastore.get_label_uri(label_id, self.tag)))
        when = label.get("ts")
        return DatastoreImage(image_id, file_name, name or None,
                              float(when) if isinstance(when, int | float) and not isinstance(when, bool) else None)

    def images(self) -> list[DatastoreImage]:
        """Every image, sorted by id, with its final label's file name and time if it has one."""
        return list(self._images)

    def orphan_labels(self) -> list[str]:
        """Label files without their image (a PACS has none: a SEG of no listed series is no final label)."""
        hook = getattr(self.datastore, "orphan_labels", None)
        return list(hook(self.tag)) if hook is not None else []

    def image_path(self, image: DatastoreImage) -> Path:
        """The image's file or DICOM series folder. Where the datastore keeps converted copies of DICOM series (a
        PACS), the series' own instances: read as a folder's series is, their headers checked for identifiers."""
        hook = getattr(self.datastore, "series_folder", None)
        if hook is not None:
            folder = hook(image.image_id)
            if folder is None:
                raise FileNotFoundError(f"image {image.image_id} could not be read from the datastore")
            return Path(folder)
        uri = self.datastore.get_image_uri(image.image_id)
        if not uri:
            raise FileNotFoundError(f"image {image.image_id} could not be read from the datastore")
        return Path(uri)

    def label_path(self, image: DatastoreImage) -> Path:
        label_id = self._label_ids.get(image.image_id)
        uri = self.datastore.get_label_uri(label_id, self.tag) if label_id else ""
        if not uri:
            raise FileNotFoundError(f"the {self.tag} label of image {image.image_id} could not be read")
        return Path(uri)


def app_source(datastore: Any) -> DatastoreSource:
    """What the data engine reads in the app: the app's MONAI Label datastore, folder or PACS alike."""
    return MonaiDatastoreSource(datastore)
