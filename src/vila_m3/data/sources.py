"""Where the annotations come from: a MONAI Label datastore, as a local folder or a running server.

These are the offline CLI's readers (``vila-m3 datagen``). Inside the app, the data engine reads the
``Datastore`` object MONAI Label hands the app, a studies folder and a PACS alike, through the app's adapter
behind the same :class:`DatastoreSource` protocol (``apps/vila_m3/lib/datastore_source.py``); this module
never imports MONAI Label.

The layout is MONAI Label's local datastore: images in the studies folder (``<studies>/<id><ext>``),
the annotator's corrected labels in ``<studies>/labels/final/<id><ext>`` (same file name as the
image, possibly another extension), and ``datastore_v2.json`` (``images_dir``, ``labels_dir`` and
``objects: {id: {"image": {"ext", "info"}, "labels": {tag: {"ext", "info"}}}}``) when a server has
run on it. Files present but not in ``datastore_v2.json`` are found by scanning, as the server's
reconciliation does; sub-folders holding a DICOM series are images too (id = folder name).

A server is read through its REST API: ``GET /datastore/?output=all`` (the same model as
``datastore_v2.json``), ``GET /datastore/image?image=ID`` and ``GET /datastore/label?label=ID&tag=final``;
files are downloaded once into a cache folder, keeping their datastore file names.

A chest X-ray's final label is its confirmed findings, a JSON file ``labels/final/<id>.json`` =
``{"findings": {"<TorchXRayVision pathology>": true | false, ...}}`` (upload it with
``PUT /datastore/label?image=<id>&tag=final``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import requests

from vila_m3.data.privacy import is_dicom_file
from vila_m3.security.paths import scrub_paths

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".png", ".jpg", ".jpeg", ".dcm")
LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".json")
DATASTORE_FILE = "datastore_v2.json"
_SAFE_NAME = re.compile(r"^[^/\\\x00]+$")


class SourceError(RuntimeError):
    """The datastore cannot be read at all (missing folder, server down); the message says why."""


@dataclass(frozen=True)
class DatastoreImage:
    """One image of the datastore and its final label.

    Attributes:
        image_id: the datastore id (the file name without extension).
        file_name: the image file (or DICOM series folder) name in the studies folder.
        label_name: the final label's file name, or None.
        label_time: when the final label was saved, seconds since the epoch (file time or the
            datastore's ``ts``), or None.
    """

    image_id: str
    file_name: str
    label_name: str | None = None
    label_time: float | None = None


@dataclass(frozen=True)
class Skip:
    """Something left out of the export, and why.

    ``source`` is the raw datastore id, label file or chat id: shown to the admin, never written to the
    export (the summary lists hashed sources).
    """

    source: str
    kind: str
    reason: str

    def __post_init__(self) -> None:
        # a reason often carries an exception's text: it names files, never the server's folders
        object.__setattr__(self, "reason", scrub_paths(self.reason))


class DatastoreSource(Protocol):
    """What the data engine needs of a datastore."""

    location: str

    def images(self) -> list[DatastoreImage]: ...

    def orphan_labels(self) -> list[str]: ...

    def image_path(self, image: DatastoreImage) -> Path: ...

    def label_path(self, image: DatastoreImage) -> Path: ...


def split_name(name: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> tuple[str, str]:
    """``ct_abdomen.nii.gz`` → (``ct_abdomen``, ``.nii.gz``): the longest known suffix, else the last one."""
    lower = name.lower()
    for suffix in sorted(suffixes, key=len, reverse=True):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    stem, dot, ext = name.rpartition(".")
    return (stem, dot + ext) if stem else (name, "")


class LocalDatastore:
    """A MONAI Label studies folder on this machine (read only)."""

    def __init__(self, folder: str | os.PathLike[str], tag: str = "final"):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise SourceError(f"the datastore folder {self.folder} does not exist")
        self.location = str(self.folder)
        self.tag = tag
        model = _read_model(self.folder / DATASTORE_FILE)
        self.images_dir = self.folder / str(model.get("images_dir") or ".")
        self.labels_dir = self.folder / str(model.get("labels_dir") or "labels") / tag
        self._images, self._orphans = self._scan(model.get("objects") or {})

    def _scan(self, objects: dict[str, Any]) -> tuple[list[DatastoreImage], list[str]]:
        files: dict[str, str] = {}
        for image_id, entry in objects.items():
            name = f"{image_id}{(entry.get('image') or {}).get('ext', '')}"
            if (self.images_dir / name).exists():
                files[image_id] = name
        labels_root = self.labels_dir.parent.resolve()
        for path in sorted(self.images_dir.iterdir()) if self.images_dir.is_dir() else []:
            if path.name.startswith("."):
                continue
            if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES):
                files.setdefault(split_name(path.name)[0], path.name)
            elif path.is_dir() and path.resolve() != labels_root and _holds_dicom(path):
                files.setdefault(path.name, path.name)
        labels: dict[str, list[str]] = {}
        for path in sorted(self.labels_dir.iterdir()) if self.labels_dir.is_dir() else []:
            if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(LABEL_SUFFIXES):
                labels.setdefault(split_name(path.name, LABEL_SUFFIXES)[0], []).append(path.name)
        images = []
        for image_id in sorted(files):
            names = sorted(labels.get(image_id, []), key=_label_rank)
            label = names[0] if names else None
            when = (self.labels_dir / label).stat().st_mtime if label else None
            images.append(DatastoreImage(image_id, files[image_id], label, when))
        orphans = sorted(name for image_id, names in labels.items() if image_id not in files for name in names)
        return images, orphans

    def images(self) -> list[DatastoreImage]:
        """Every image, sorted by id, with its final label if there is one."""
        return list(self._images)

    def orphan_labels(self) -> list[str]:
        """Final label files whose image is not in the datastore."""
        return list(self._orphans)

    def image_path(self, image: DatastoreImage) -> Path:
        return self.images_dir / image.file_name

    def label_path(self, image: DatastoreImage) -> Path:
        if image.label_name is None:
            raise FileNotFoundError(f"image {image.image_id} has no {self.tag} label")
        return self.labels_dir / image.label_name


class HttpDatastore:
    """The datastore of a running MONAI Label server, downloaded on demand into ``cache_dir``."""

    def __init__(self, url: str, cache_dir: str | os.PathLike[str], tag: str = "final", token: str | None = None,
                 timeout_s: float = 120.0):
        self.url = url.rstrip("/")
        self.location = self.url
        self.tag = tag
        self.cache = Path(cache_dir)
        self.timeout_s = timeout_s
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        try:
            response = self.session.get(f"{self.url}/datastore/", params={"output": "all"}, timeout=timeout_s)
        except requests.RequestException as err:
            raise SourceError(f"the MONAI Label server at {self.url} cannot be reached: {err}") from None
        if response.status_code != 200:
            raise SourceError(f"{self.url}/datastore/?output=all answered HTTP {response.status_code}: "
                              f"{response.text[:200]}")
        try:
            model = response.json()
        except ValueError:
            raise SourceError(f"{self.url}/datastore/?output=all did not return JSON") from None
        self._images = []
        for image_id, entry in sorted((model.get("objects") or {}).items()):
            label = (entry.get("labels") or {}).get(tag)
            label_name = f"{image_id}{label.get('ext', '')}" if label else None
            when = (label.get("info") or {}).get("ts") if label else None
            self._images.append(DatastoreImage(image_id, f"{image_id}{(entry.get('image') or {}).get('ext', '')}",
                                               label_name, float(when) if isinstance(when, int | float) else None))

    def images(self) -> list[DatastoreImage]:
        return list(self._images)

    def orphan_labels(self) -> list[str]:
        """A server does not list labels without images."""
        return []

    def image_path(self, image: DatastoreImage) -> Path:
        return self._download("datastore/image", {"image": image.image_id}, self.cache / "images", image.file_name)

    def label_path(self, image: DatastoreImage) -> Path:
        if image.label_name is None:
            raise FileNotFoundError(f"image {image.image_id} has no {self.tag} label")
        return self._download("datastore/label", {"label": image.image_id, "tag": self.tag},
                              self.cache / "labels" / self.tag, image.label_name)

    def _download(self, route: str, params: dict[str, str], folder: Path, name: str) -> Path:
        if not _SAFE_NAME.match(name) or name in (".", ".."):
            raise FileNotFoundError(f"datastore file name {name!r} is not a plain file name")
        target = folder / name
        if target.is_file():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        query = "&".join(f"{key}={quote(value, safe='')}" for key, value in params.items())
        try:
            with self.session.get(f"{self.url}/{route}?{query}", stream=True, timeout=self.timeout_s) as response:
                if response.status_code != 200:
                    raise FileNotFoundError(f"download failed: HTTP {response.status_code} from /{route}")
                partial = target.with_name(f".{name}.partial")
                with partial.open("wb") as out:
                    for chunk in response.iter_content(chunk_size=1 << 20):
                        out.write(chunk)
                partial.replace(target)
        except requests.RequestException as err:
            raise FileNotFoundError(f"download failed: {type(err).__name__}") from None
        return target

    def close(self) -> None:
        self.session.close()


def open_datastore(location: str | os.PathLike[str], cache_dir: str | os.PathLike[str], tag: str = "final",
                   token: str | None = None) -> LocalDatastore | HttpDatastore:
    """A local folder, or an ``http(s)://`` MONAI Label server (files cached in ``cache_dir``)."""
    text = str(location)
    if text.startswith(("http://", "https://")):
        return HttpDatastore(text, cache_dir, tag=tag, token=token)
    return LocalDatastore(text, tag=tag)


def _read_model(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        model = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return model if isinstance(model, dict) else {}


def _holds_dicom(folder: Path) -> bool:
    return any(is_dicom_file(path) for path in sorted(folder.iterdir())[:50] if path.is_file())


def _label_rank(name: str) -> tuple[int, str]:
    lower = name.lower()
    return next((i for i, suffix in enumerate(LABEL_SUFFIXES) if lower.endswith(suffix)), len(LABEL_SUFFIXES)), name
