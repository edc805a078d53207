"""A study from the user's own disk: the page's file picker sends it to the server as a session.

The browser hands the file to the viewer (trame sends a picked ``File`` over the page's websocket); the
viewer checks it before anything is sent: a NIfTI volume (``.nii``, ``.nii.gz``) must read as an image,
a ``.zip`` must hold a DICOM series (the one with the most files is taken, from whichever folder of the
archive holds it). It then goes to the server with ``PUT /session/`` as MONAI Label defines it (the
NIfTI file as it is; the series as a flat ``.zip`` the server unpacks, ``uncompress=true``), and the page
shows it and chats about it as it does a datastore study (``StudyRef.session``). A bad file is an error
in words and nothing on the page changes.

A session is not the datastore: the server removes it once it has been unused for its expiry (MONAI
Label's session expiry, an hour by default); the page says so. What the page shows of an upload (the
NIfTI, or the series written as NIfTI) is kept by the viewer process until the session expires, so
its chats can be reopened from another tab; after that a NIfTI session is downloaded from the server.

The tab keeps the file it sent (in its temp folder, removed with the tab) for the page's life: a turn
on an upload whose session has expired on the server sends that file again as a new session, shows the
study under the new session id and asks the question once more (:meth:`StudyUpload.resending`); when
the tab no longer holds the file (a chat reopened from another tab), the page says to upload it again.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trame.app.file_upload import ClientFile
from trame.widgets import html
from VILAM3ChatLib.client import RequestRejected, StudyRef
from VILAM3ChatLib.scene import ATTR_IMAGE_ID
from VILAM3ChatLib.worker import Job

from vila_m3.imaging import VolumeReadError, read_volume
from vila_m3.imaging.io import list_dicom_series

if TYPE_CHECKING:
    from .app import ChatViewer

logger = logging.getLogger(__name__)

#: how the page names a session in its study list (a datastore id never holds ':')
SESSION_PREFIX = "session:"
MAX_ARCHIVE_MEMBERS = 20000  # as the server's session route
_NIFTI = (".nii.gz", ".nii")


#: the status line's words after a turn whose upload was sent again
SENT_AGAIN = "The upload had expired on the server; sent it again."
GONE = ("This uploaded study is no longer on the server (its session expired) and this page no longer holds "
        "its file; upload the file again to ask about it.")


class UploadError(ValueError):
    """A picked file the page will not send; the message says why, in words."""


@dataclass
class KeptUpload:
    """What the tab sent for one session, kept to send again if the session expires.

    Attributes:
        folder: this upload's folder in the tab's temp folder (removed with the tab).
        upload: the file sent (the NIfTI, or the flat .zip of the series).
        uncompress: whether the server unpacks it.
        display: the NIfTI the page shows of it.
    """

    folder: Path
    upload: Path
    uncompress: bool
    display: Path


@dataclass
class PreparedUpload:
    """A checked file, ready to be sent.

    Attributes:
        name: the file's name as the user picked it.
        upload: the file to send (the NIfTI, or a flat .zip of the series).
        uncompress: whether the server unpacks it (a DICOM series).
        display: a NIfTI file of the same voxels and geometry, for the page's views.
        description: what it is, e.g. ``NIfTI, 512×512×90`` or ``DICOM series of 90 files``.
    """

    name: str
    upload: Path
    uncompress: bool
    display: Path
    description: str


def session_key(session_id: str) -> str:
    """The page's study key of a session."""
    return f"{SESSION_PREFIX}{session_id}"


def session_of(study: str) -> str | None:
    """The session id of a page study key, or None for a datastore image."""
    return study[len(SESSION_PREFIX):] if isinstance(study, str) and study.startswith(SESSION_PREFIX) else None


def megabytes(size: float) -> str:
    return f"{size / 2**20:.1f} MB"


def check_size(name: str, size: int, max_bytes: int) -> None:
    """UploadError when a file of ``size`` bytes is over ``max_bytes``."""
    if size > max_bytes:
        raise UploadError(f"'{name}' is {megabytes(size)}: too large to upload (the largest is "
                          f"{megabytes(max_bytes)}). Nothing was sent.")


def prepare_upload(name: str, content: bytes, folder: Path, max_bytes: int) -> PreparedUpload:
    """Check a picked file and make what is sent and what is shown; UploadError says what is wrong.

    Args:
        name: the file's name in the browser (only its suffix is used for files on this machine).
        content: its bytes.
        folder: a new, empty folder for this upload's files.
        max_bytes: the largest file (and, for a zip, the largest unpacked series) accepted.
    """
    shown_name = os.path.basename(str(name or "")) or "the file"
    check_size(shown_name, len(content), max_bytes)
    lower = shown_name.lower()
    folder.mkdir(parents=True, exist_ok=True)
    if lower.endswith(_NIFTI):
        suffix = next(suffix for suffix in _NIFTI if lower.endswith(suffix))
        path = folder / f"{_stem(shown_name, suffix)}{suffix}"
        path.write_bytes(content)
        volume = _read(path, f"'{shown_name}' is not a NIfTI image the viewer can read (damaged, or not NIfTI "
                             "although it is named so). Nothing was sent.")
        size = "×".join(str(n) for n in volume.geometry.shape)
        return PreparedUpload(shown_name, path, False, path, f"NIfTI, {size} voxels")
    if lower.endswith(".zip"):
        return _prepare_series(shown_name, content, folder, max_bytes)
    raise UploadError(f"'{shown_name}' is neither a NIfTI image (.nii, .nii.gz) nor a .zip of a DICOM series. "
                      "Nothing was sent.")


def _stem(name: str, suffix: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name[: len(name) - len(suffix)]).strip("_") or "study"


def _read(path: Path, problem: str, series_id: str | None = None):
    try:
        volume = read_volume(path, series_id)
    except (VolumeReadError, ValueError, RuntimeError, OSError) as err:
        logger.info("upload refused: %s", err)
        raise UploadError(problem) from None
    if volume.array.size == 0:
        raise UploadError(problem)
    return volume


def _prepare_series(name: str, content: bytes, folder: Path, max_bytes: int) -> PreparedUpload:
    archive = folder / "picked.zip"
    archive.write_bytes(content)
    if not zipfile.is_zipfile(archive):
        raise UploadError(f"'{name}' is not a readable .zip archive. Nothing was sent.")
    unpacked = folder / "unpacked"
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [info for info in bundle.infolist() if not info.is_dir()]
            if not members:
                raise UploadError(f"'{name}' holds no files. Nothing was sent.")
            if len(members) > MAX_ARCHIVE_MEMBERS:
                raise UploadError(f"'{name}' holds more than {MAX_ARCHIVE_MEMBERS} files. Nothing was sent.")
            check_size(f"{name}, unpacked,", sum(info.file_size for info in members), max_bytes)
            bundle.extractall(unpacked)  # zipfile drops absolute paths and '..' from member names
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError):
        raise UploadError(f"'{name}' is not a readable .zip archive. Nothing was sent.") from None
    found = _largest_series(unpacked)
    if found is None:
        raise UploadError(f"'{name}' holds no DICOM series (a .zip of one series' .dcm files is expected). "
                          "Nothing was sent.")
    series_folder, series_id, files = found
    volume = _read(series_folder, f"the DICOM series in '{name}' cannot be read as one volume (missing slices or "
                                  "mixed image sizes). Nothing was sent.", series_id)
    display = folder / "display.nii.gz"
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(display), useCompression=True)
    flat = folder / f"{_stem(name, '.zip')}.zip"
    with zipfile.ZipFile(flat, "w", compression=zipfile.ZIP_STORED) as out:
        for number, file in enumerate(files):
            out.write(file, arcname=f"{number:05d}.dcm")
    archive.unlink()
    shutil.rmtree(unpacked, ignore_errors=True)
    return PreparedUpload(name, flat, True, display, f"DICOM series of {len(files)} files")


def _largest_series(root: Path) -> tuple[Path, str, list[str]] | None:
    """(folder, series UID, its files) of the DICOM series with the most files under ``root``, or None."""
    best: tuple[Path, str, list[str]] | None = None
    for here, _, names in os.walk(root):
        if not names:
            continue
        for series_id in list_dicom_series(here):
            import SimpleITK as sitk

            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(here, series_id))
            if best is None or len(files) > len(best[2]):
                best = (Path(here), series_id, files)
    return best


class DisplayCopies:
    """What the page shows of each uploaded session, kept by the viewer process (every tab) until the
    session would expire: ``{session id: (NIfTI file, expires at (monotonic s))}``."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="vila_m3_viewer-uploads-"))
        self._files: dict[str, tuple[Path, float]] = {}
        self._lock = threading.Lock()

    def keep(self, session_id: str, display: Path, expiry_s: float) -> None:
        target = self.folder / f"{session_id}{''.join(display.suffixes[-2:]) or '.nii.gz'}"
        shutil.copyfile(display, target)
        with self._lock:
            self._files[session_id] = (target, time.monotonic() + max(expiry_s, 60.0))

    def copy_of(self, session_id: str, folder: str) -> str | None:
        """A copy (in ``folder``, the caller's to delete) of the session's display file, None when not kept."""
        now = time.monotonic()
        with self._lock:
            for gone in [key for key, (_, until) in self._files.items() if until < now]:
                path, _ = self._files.pop(gone)
                path.unlink(missing_ok=True)
            kept = self._files.get(session_id)
        if kept is None or not kept[0].is_file():
            return None
        handle, copy = tempfile.mkstemp(prefix="vila_m3-upload-", suffix="".join(kept[0].suffixes[-2:]), dir=folder)
        os.close(handle)
        shutil.copyfile(kept[0], copy)
        return copy

    def touch(self, session_id: str, expiry_s: float) -> None:
        """The session was used (a turn): it lives ``expiry_s`` more seconds."""
        with self._lock:
            if session_id in self._files:
                path, _ = self._files[session_id]
                self._files[session_id] = (path, time.monotonic() + max(expiry_s, 60.0))


DISPLAY_COPIES = DisplayCopies()


class StudyUpload:
    """The page's file picker and the sessions it made (see the module docstring).

    Args:
        viewer: the page (its state, client, jobs, scene logic and study loading are used).
    """

    def __init__(self, viewer: ChatViewer):
        self.viewer = viewer
        self.expiry_s: dict[str, float] = {}  # session id -> the server's expiry of it (s)
        self.names: dict[str, str] = {}  # session id -> the file's name
        self.kept: dict[str, KeptUpload] = {}  # session id -> what this tab sent for it
        self._in_place: dict[str, Any] = {}  # page study key -> the volume already shown for it (a renewal)
        state = viewer.state
        state.uploaded_studies = []  # [{"value": "session:<id>", "text": "ct.nii.gz (upload)"}]
        state.upload_file = None
        state.upload_max_bytes = int(viewer.settings.max_upload_mb * 2**20)
        state.uploading = False
        state.upload_note = ("An uploaded study is a session: the server keeps it only while it is used (it "
                             "expires after a while unused) and never adds it to its datastore.")
        state.change("upload_file")(self._on_file)

    # --- picking and sending ---------------------------------------------------------------------

    def _on_file(self, upload_file: Any = None, **_kwargs) -> None:
        if not upload_file:
            return
        self.viewer.state.upload_file = None  # the bytes are not kept in the page's state
        picked = ClientFile(upload_file)
        max_bytes = int(self.viewer.state.upload_max_bytes)
        try:
            if self.viewer.turn is not None:
                raise UploadError("A question is being answered; wait for it (or press Stop) before uploading.")
            if isinstance(upload_file, dict) and upload_file.get("too_large"):  # the page sent only its size
                check_size(str(picked.name or "the file"), int(picked.size or 0), max_bytes)
            if picked.is_empty:
                raise UploadError(f"'{picked.name}' could not be read by the browser. Nothing was sent.")
        except UploadError as err:
            self.viewer._show_error(err)
            return
        name, content = str(picked.name or ""), bytes(picked.content)
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.viewer.temp_dir))
        with self.viewer.state:
            self.viewer.state.uploading = True
        self.viewer._set_status(f"Checking '{os.path.basename(name)}'…")

        def work(job: Job) -> tuple[PreparedUpload, str, float]:
            prepared = prepare_upload(name, content, folder, max_bytes)
            job.post(self.viewer._set_status, f"Sending '{prepared.name}' ({prepared.description}) to the server…")
            session_id = self.viewer.client.create_session([str(prepared.upload)], uncompress=prepared.uncompress)
            info = self.viewer.client.session_info(session_id)
            expiry = float(info.get("expiry") or 0)
            DISPLAY_COPIES.keep(session_id, prepared.display, expiry)
            return prepared, session_id, expiry

        def done(result: tuple[PreparedUpload, str, float]) -> None:
            prepared, session_id, expiry = result
            self.kept[session_id] = KeptUpload(folder, prepared.upload, prepared.uncompress, prepared.display)
            self.remember(session_id, prepared.name, expiry)
            with self.viewer.state:
                self.viewer.state.uploading = False
                self.viewer.state.study = session_key(session_id)  # the page loads it (ChatViewer._on_study)

        def failed(err: BaseException) -> None:
            shutil.rmtree(folder, ignore_errors=True)
            with self.viewer.state:
                self.viewer.state.uploading = False
            self.viewer._show_error(err)

        self.viewer.jobs.start("upload", work, done, failed)

    def remember(self, session_id: str, name: str, expiry_s: float | None = None) -> None:
        """List a session among the page's studies (a new upload, or one a reopened chat is about)."""
        self.names[session_id] = name
        if expiry_s is not None:
            self.expiry_s[session_id] = expiry_s
        key = session_key(session_id)
        listed = [item for item in self.viewer.state.uploaded_studies or [] if item["value"] != key]
        with self.viewer.state:
            self.viewer.state.uploaded_studies = [{"value": key, "text": f"{name} (upload)"}, *listed]

    # --- showing a session ---------------------------------------------------------------------------

    def load(self, study: str) -> bool:
        """Load the session ``study`` names (True), or leave a datastore image to the page (False)."""
        session_id = session_of(study)
        if session_id is None:
            return False
        viewer = self.viewer
        if viewer.volume is not None and self._in_place.pop(study, None) is viewer.volume:
            return True  # the study shown was sent again under this id: nothing to load
        with viewer.state:
            viewer.state.loading = True
        viewer._set_status(f"Loading the uploaded study {self.names.get(session_id, session_id)}…")

        def work(job: Job) -> str:
            copy = DISPLAY_COPIES.copy_of(session_id, viewer.temp_dir)
            return copy if copy is not None else viewer.client.download_session_image(session_id)

        def failed(err: BaseException) -> None:
            status = getattr(err, "status", None)
            if status == 404:
                err = UploadError("This uploaded study is no longer on the server: its session expired (the server "
                                  "removes an upload once unused for a while). Upload the file again to look at it; "
                                  "its chats can still be read on the server.")
            elif status == 422:  # a DICOM series: the server keeps a folder, the viewer no longer its copy
                err = UploadError("This uploaded study is a DICOM series the viewer no longer holds (it was "
                                  "restarted since); upload the .zip again to look at it.")
            viewer._on_load_failed(err)

        viewer.jobs.start(f"load-{study}", work, lambda path: self._show(study, session_id, path), failed)
        return True

    def _show(self, study: str, session_id: str, path: str) -> None:
        viewer = self.viewer
        viewer._show_study(study, path)
        volume = viewer.volume
        if volume is None or viewer.state.study != study:
            return
        name = self.names.get(session_id, session_id)
        volume.SetName(name)
        volume.RemoveAttribute(ATTR_IMAGE_ID)  # not a datastore image: the turns name the session
        viewer.logic.rememberSession(volume, viewer.client.server_url, session_id)
        expiry = self.expiry_s.get(session_id)
        lasts = f" after {expiry / 60:g} minutes unused" if expiry else " after a while unused"
        viewer._set_status(f"{name} (uploaded): {viewer.state.slice_count} {viewer.state.slice_axis} slices. "
                           f"Ask about the slice on screen. The server keeps this upload as a session: it "
                           f"expires{lasts}.")

    def studies(self, volume) -> dict[str, StudyRef] | None:
        """The turn's study when ``volume`` is an uploaded session, else None."""
        study = self.viewer.logic.knownStudy(volume, self.viewer.client.server_url)
        if study is None or study.session_id is None:
            return None
        DISPLAY_COPIES.touch(study.session_id, self.expiry_s.get(study.session_id, 0.0))
        return {"image": study}

    # --- a turn on an expired upload -------------------------------------------------------------------

    def resending(self, turn: Callable[..., Any], studies: dict[str, StudyRef],
                  done: Callable[[Any], None]) -> tuple[Callable[[Job], Any], Callable[[Any], None]]:
        """The page's turn job and its done callback, sending an expired upload again once.

        Args:
            turn: ``turn(job, studies, on_expired)`` runs the turn (``ChatSceneLogic.runTurn``), calling
                ``on_expired()`` before it raises RequestRejected because a session is gone.
            studies: the turn's studies; only ``{"image": <a session>}`` (an upload) is sent again.
            done: the page's callback for the answer.

        Returns:
            ``(work, finished)``: the job (on a worker thread) and the callback (on the page's loop), which
            adds :data:`SENT_AGAIN` to the status line when the upload was sent again.
        """
        study = studies.get("image")
        session_id = study.session_id if isinstance(study, StudyRef) and len(studies) == 1 else None
        if session_id is None:
            return (lambda job: turn(job, studies, lambda: None)), done
        viewer, volume, resent = self.viewer, self.viewer.volume, []

        def work(job: Job) -> Any:
            expired: list[bool] = []
            try:
                return turn(job, studies, lambda: expired.append(True))
            except RequestRejected:
                if not expired or job.abort.is_set():
                    raise
            job.post(viewer._set_status, "The upload had expired on the server; sending it again…")
            new_id, expiry = self._send_again(session_id)
            job.post(self._renewed, session_id, new_id, expiry, volume)
            resent.append(new_id)
            return turn(job, {"image": StudyRef.session(new_id)}, lambda: None)

        def finished(answer: Any) -> None:
            done(answer)
            if resent and not viewer.state.status_error:
                viewer._set_status(f"{viewer.state.status} {SENT_AGAIN}".strip())

        return work, finished

    def _send_again(self, session_id: str) -> tuple[str, float]:
        """(worker) Send the kept file of ``session_id`` as a new session: (its id, its expiry (s));
        UploadError when this tab no longer holds the file."""
        kept = self.kept.get(session_id)
        if kept is None or not kept.upload.is_file():
            raise UploadError(GONE)
        client = self.viewer.client
        new_id = client.create_session([str(kept.upload)], uncompress=kept.uncompress)
        expiry = float(client.session_info(new_id).get("expiry") or 0)
        if kept.display.is_file():
            DISPLAY_COPIES.keep(new_id, kept.display, expiry)
        return new_id, expiry

    def _renewed(self, old_id: str, new_id: str, expiry_s: float, volume: Any) -> None:
        """The upload of ``old_id`` is now session ``new_id``: the page's study and its volume name it."""
        viewer = self.viewer
        if old_id in self.kept:
            self.kept[new_id] = self.kept.pop(old_id)
        name = self.names.pop(old_id, new_id)
        self.expiry_s.pop(old_id, None)
        old_key, new_key = session_key(old_id), session_key(new_id)
        listed = [item for item in viewer.state.uploaded_studies or [] if item["value"] != old_key]
        with viewer.state:
            viewer.state.uploaded_studies = listed
        self.remember(new_id, name, expiry_s)
        if volume is not None:
            viewer.logic.rememberSession(volume, viewer.client.server_url, new_id)
        if viewer.state.study == old_key and volume is not None and volume is viewer.volume:
            self._in_place[new_key] = volume
            with viewer.state:
                viewer.state.study = new_key

    def build_ui(self) -> None:
        """The file picker and the note on sessions."""
        # a file over the limit is not sent over the websocket: only its name and size
        pick = ("upload_file = $event.target.files[0] && $event.target.files[0].size > upload_max_bytes "
                "? {name: $event.target.files[0].name, size: $event.target.files[0].size, too_large: true} "
                ": $event.target.files[0]; $event.target.value = ''")
        with html.Div(classes="d-flex align-center ga-2"):
            html.Label("Upload", for_="upload-file", classes="text-body-2")
            html.Input(type="file", id="upload-file", accept=".nii,.nii.gz,.zip", change=pick, classes="field",
                       disabled=("uploading || busy",), style="max-width: 16em")
        html.Div("{{ upload_note }} NIfTI (.nii, .nii.gz) or a .zip of one DICOM series.",
                 classes="text-caption text-medium-emphasis", id="upload-note")
