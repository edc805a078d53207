"""The chat panel's scene logic on 3D Slicer's MRML core, shared by the Slicer module and the web viewer.

Needs ``slicer`` (3D Slicer itself, or the ``slicer-core`` wheel that trame-slicer runs on) and
``vtk``; no Qt. :class:`ChatSceneLogic` reads returned labelmaps into named, coloured segments,
exports corrections on the server's grid, maps a slice view to the slice the server renders, and
runs a chat turn or saves a final label with a :class:`~VILAM3ChatLib.client.VilaM3Client`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import slicer
import vtk

from .chat_state import ChatState
from .client import (
    RequestRejected,
    StreamAborted,
    StudyRef,
    TurnAnswer,
    VilaM3Client,
    new_chat_id,
    unique_image_id,
)
from .segments import (
    assign_label_values,
    decode_label_values,
    encode_label_values,
    segment_specs,
    unnamed_segment_spec,
)
from .slice_mapping import (
    SlicePosition,
    decode_grid,
    encode_grid,
    grid_axes_map,
    grids_match,
    slice_position,
)
from .worker import Job

SLICE_VIEW = "Red"

#: node attributes and references the chat sets
ATTR_SERVER = "VILAM3Chat.Server"
ATTR_IMAGE_ID = "VILAM3Chat.ImageId"
ATTR_CHAT_ID = "VILAM3Chat.ChatId"
ATTR_EXPERT = "VILAM3Chat.Expert"
ATTR_LABEL_VALUES = "VILAM3Chat.LabelValues"
ATTR_SERVER_GRID = "VILAM3Chat.ServerGrid"  # the server's voxel grid of the image, as stored (JSON)
REF_VOLUME = "VILAM3ChatVolume"


class ChatSceneLogic:
    """Scene-side work of the chat panel: volumes in and labelmaps out, and which study a volume is.

    Shared by the 3D Slicer module (``VILAM3ChatLogic``) and the web viewer (``web/``, on
    trame-slicer). Everything here works on the MRML scene it is given (``slicer.mrmlScene`` in
    Slicer; a trame-slicer ``SlicerApp`` scene; a bare ``vtkMRMLScene`` in the tests) with Slicer's
    MRML and module logics; it needs no widget, no layout manager and no Qt. Methods named
    ``run…``/``save…`` run in worker threads and touch no MRML node; all others run on the thread
    that owns the scene.
    """

    def __init__(self, scene, tempDir: str | None = None):
        self.scene = scene
        self._client: VilaM3Client | None = None
        self._clientKey: tuple | None = None
        self.sessions: dict[str, tuple[str, str]] = {}  # volume node ID -> (server URL, session id)
        self.chatIds: dict[str, str] = {}  # volume node ID -> chat id
        self.geometryWarning = ""
        self.tempDir = tempDir or tempfile.mkdtemp(prefix="VILAM3Chat-")
        os.makedirs(self.tempDir, exist_ok=True)

    def cleanup(self):
        shutil.rmtree(self.tempDir, ignore_errors=True)

    # --- settings and server ----------------------------------------------------------------------

    def client(self, serverUrl: str, username: str = "", password: str = "") -> VilaM3Client:
        key = (serverUrl, username, password)
        if self._client is None or self._clientKey != key:
            self._client = VilaM3Client(serverUrl, username=username or None, password=password or None,
                                        download_dir=self.tempDir)
            self._clientKey = key
        return self._client

    @staticmethod
    def serverImages(client: VilaM3Client) -> set:
        """(worker) Check that the server offers the chat; the datastore's image ids."""
        client.require_chat_task()
        return set(client.datastore_images())

    # --- which study a volume is ------------------------------------------------------------------

    def knownStudy(self, volumeNode, serverUrl: str) -> StudyRef | None:
        if volumeNode.GetAttribute(ATTR_SERVER) == serverUrl and volumeNode.GetAttribute(ATTR_IMAGE_ID):
            return StudyRef.image(volumeNode.GetAttribute(ATTR_IMAGE_ID))
        server, sessionId = self.sessions.get(volumeNode.GetID(), ("", ""))
        if server == serverUrl and sessionId:
            return StudyRef.session(sessionId)
        return None

    def rememberImage(self, volumeNode, serverUrl: str, imageId: str) -> StudyRef:
        volumeNode.SetAttribute(ATTR_SERVER, serverUrl)
        volumeNode.SetAttribute(ATTR_IMAGE_ID, imageId)
        self.sessions.pop(volumeNode.GetID(), None)
        return StudyRef.image(imageId)

    def rememberSession(self, volumeNode, serverUrl: str, sessionId: str):
        self.sessions[volumeNode.GetID()] = (serverUrl, sessionId)

    def forgetSessions(self, volumeNodes):
        for node in volumeNodes:
            self.sessions.pop(node.GetID(), None)

    def chatId(self, volumeNode) -> str:
        """The chat of a volume (one per volume until "New chat"); kept on the node, so a saved scene
        opened after a restart continues it."""
        if volumeNode.GetID() not in self.chatIds:
            self.chatIds[volumeNode.GetID()] = volumeNode.GetAttribute(ATTR_CHAT_ID) or new_chat_id()
            volumeNode.SetAttribute(ATTR_CHAT_ID, self.chatIds[volumeNode.GetID()])
        return self.chatIds[volumeNode.GetID()]

    def newChat(self, volumeNode) -> str:
        self.chatIds[volumeNode.GetID()] = new_chat_id()
        volumeNode.SetAttribute(ATTR_CHAT_ID, self.chatIds[volumeNode.GetID()])
        return self.chatIds[volumeNode.GetID()]

    def storedChatId(self, volumeNode) -> str | None:
        """The chat a volume had before this session (a scene saved with it), if any."""
        return volumeNode.GetAttribute(ATTR_CHAT_ID) or None

    @staticmethod
    def fetchChat(client: VilaM3Client, chatId: str) -> tuple:
        """(worker) A stored chat, its last labelmap (a temporary file, or None when it has none) and
        the datastore's image ids."""
        chat = client.get_chat(chatId)
        try:
            labelsPath = client.get_labels(chatId) if chat.get("labels") else None
        except RequestRejected:
            labelsPath = None
        return chat, labelsPath, set(client.datastore_images())

    def restoreChat(self, chat: dict, labelsPath: str | None, volumeNode, serverUrl: str,
                    datastoreImages: set | None = None) -> tuple:
        """Put a stored chat back into the panel: its transcript (a ChatState), the link between the
        volume and the chat's image when that is a datastore image (a session is gone after a
        restart), and its last segmentation as a new segmentation node (segments named by the
        node's stored label values where the scene kept them, else by the server's ``label_names``
        of the chat). Returns ``(state, segmentationNode
        or None)``; the labelmap file is deleted."""
        chatId = str(chat.get("chat_id") or "")
        state = ChatState()
        state.load_transcript(chat.get("messages") or [], chatId)
        self.chatIds[volumeNode.GetID()] = chatId
        volumeNode.SetAttribute(ATTR_CHAT_ID, chatId)
        study = chat.get("study") or {}
        imageId = study.get("image") if isinstance(study, dict) else None
        if imageId in (datastoreImages or set()) and not volumeNode.GetAttribute(ATTR_IMAGE_ID):
            self.rememberImage(volumeNode, serverUrl, imageId)
        node = None
        try:
            if labelsPath:
                names = dict(chat.get("label_names") or {})  # the server's names of the expert's labels
                for each in self.scene.GetNodesByClass("vtkMRMLSegmentationNode"):
                    if each.GetAttribute(ATTR_CHAT_ID) == chatId:
                        names = decode_label_values(each.GetAttribute(ATTR_LABEL_VALUES)) or names
                expert = next((str(message.get("expert")) for message in reversed(chat.get("messages") or [])
                               if message.get("role") == "expert" and message.get("expert")), "labels")
                node = self.importLabelmap(labelsPath, names, None, volumeNode, chatId, expert)
        finally:
            self.removeFiles([labelsPath] if labelsPath else [])
        return state, node

    # --- the scene --------------------------------------------------------------------------------

    def sliceNode(self, viewName: str):
        """The view's slice node (Slicer names it ``vtkMRMLSliceNode<view>``), or None."""
        return self.scene.GetNodeByID(f"vtkMRMLSliceNode{viewName}")

    def viewBackgroundVolume(self, viewName: str):
        """The volume shown in the view's background layer, or None."""
        composite = self.scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{viewName}")
        volumeId = composite.GetBackgroundVolumeID() if composite is not None else None
        return self.scene.GetNodeByID(volumeId) if volumeId else None

    def slicePosition(self, volumeNode, viewName: str = SLICE_VIEW) -> SlicePosition:
        """The slice of ``volumeNode`` at the centre of the view, as the server counts slices: in the
        image's own frame (a parent transform moves the image on screen, not on the server), with
        how oblique the view is to that slice (see ``SlicePosition.note``)."""
        sliceNode = self.sliceNode(viewName)
        if sliceNode is None:
            raise ValueError(f"There is no {viewName} slice view.")
        if volumeNode.GetImageData() is None:
            raise ValueError(f"The volume '{volumeNode.GetName()}' has no image data.")
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        toWorldRows = None
        parent = volumeNode.GetParentTransformNode()
        if parent is not None:
            if not parent.IsTransformToWorldLinear():
                raise ValueError(f"'{volumeNode.GetName()}' is under a non-linear transform; harden it first.")
            toWorld = vtk.vtkMatrix4x4()
            parent.GetMatrixTransformToWorld(toWorld)
            toWorldRows = _rows(toWorld)
        return slice_position(_rows(sliceNode.GetSliceToRAS()), _rows(ijkToRas),
                              volumeNode.GetImageData().GetDimensions(), to_world=toWorldRows)

    @staticmethod
    def dicomModality(volumeNode) -> str | None:
        """The DICOM Modality of a volume loaded from DICOM, else None."""
        uids = volumeNode.GetAttribute("DICOM.instanceUIDs")
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return None
        fileName = database.fileForInstance(uids.split()[0])
        if not fileName:
            return None
        return database.fileValue(fileName, "0008,0060") or None

    def exportVolume(self, volumeNode) -> str:
        """Write the volume (its own geometry, no transform) to a temporary NRRD file; the node is untouched."""
        path = os.path.join(self.tempDir, f"upload-{time.strftime('%H%M%S')}-{volumeNode.GetID()}.nrrd")
        self._write(volumeNode, path)
        return path

    @staticmethod
    def _write(node, path: str):
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(path)
        storage.UseCompressionOn()
        if not storage.WriteData(node):
            raise OSError(f"could not write '{node.GetName()}' to {path}")

    @staticmethod
    def removeFiles(paths):
        for path in paths:
            if path and os.path.exists(path):
                os.remove(path)

    # --- labelmaps in -----------------------------------------------------------------------------

    def loadLabelmap(self, answer: TurnAnswer, volumeNode, chatId: str):
        """A NEW segmentation node "VILA-M3 <chat id> <expert>" from the answer's labelmap (see
        :meth:`importLabelmap`)."""
        return self.importLabelmap(answer.labelmap_path, answer.label_names, answer.label_colors, volumeNode,
                                   chatId, answer.labelmap_expert or "labels")

    def importLabelmap(self, path: str, labelNames: dict, labelColors: dict | None, volumeNode, chatId: str,
                       expert: str = "labels"):
        """A NEW segmentation node from a labelmap file, referencing ``volumeNode`` (under its parent
        transform), segments named, coloured and with terminology by label value; a value the server
        did not name gets a segment "label <value>". Existing nodes are not changed and nothing else
        is left in the scene. The labelmap's grid as the server stores it is kept on both nodes, so a
        correction can be saved on it (:meth:`exportCorrection`)."""
        specs = segment_specs(labelNames, labelColors)
        serverGrid = _gridText(self._readNative(path, "vtkMRMLLabelMapVolumeNode"))
        labelmapNode = self._readNative(path, "vtkMRMLLabelMapVolumeNode", rightHanded=True)  # not in the scene
        with _NewNodesRemoved(self.scene) as scratch:
            name = self.scene.GenerateUniqueName(f"VILA-M3 {chatId} {expert}")
            segmentationNode = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            segmentationNode.CreateDefaultDisplayNodes()
            scratch.keep(segmentationNode, segmentationNode.GetDisplayNode())
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            segmentationNode.SetNodeReferenceID(REF_VOLUME, volumeNode.GetID())
            # both in the image's frame: import first, then place under the volume's transform
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmapNode,
                                                                                           segmentationNode):
                self.scene.RemoveNode(segmentationNode.GetDisplayNode())
                self.scene.RemoveNode(segmentationNode)
                raise RuntimeError("Slicer could not import the returned labelmap")
            segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            specs = self._describeSegments(segmentationNode, specs)
            segmentationNode.SetAttribute(ATTR_CHAT_ID, chatId)
            segmentationNode.SetAttribute(ATTR_EXPERT, expert)
            segmentationNode.SetAttribute(ATTR_LABEL_VALUES, encode_label_values(specs))
            self.geometryWarning = self._geometryWarning(labelmapNode, volumeNode)
            if not self.geometryWarning:
                segmentationNode.SetAttribute(ATTR_SERVER_GRID, serverGrid)
                volumeNode.SetAttribute(ATTR_SERVER_GRID, serverGrid)
        return segmentationNode

    @staticmethod
    def _readNative(path: str, nodeClass: str, rightHanded: bool = False):
        """A volume node OUTSIDE the scene read from ``path``: on the file's own grid, or on the
        right-handed grid Slicer makes of it when it loads a file (``rightHanded``)."""
        node = getattr(slicer, nodeClass)()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(path)
        storage.SetForceRightHandedIJKCoordinateSystem(rightHanded)
        if not storage.ReadData(node) or node.GetImageData() is None:
            raise OSError(f"Slicer could not read the labelmap {os.path.basename(path)}")
        return node

    @staticmethod
    def _describeSegments(segmentationNode, specs) -> list:
        """Names, colours and terminology of the imported segments, found by their label value; a
        value without a spec gets one ("label <value>"). Returns the specs of all segments."""
        segmentation = segmentationNode.GetSegmentation()
        byValue = {spec.label_value: spec for spec in specs}
        described = list(specs)
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            spec = byValue.get(segment.GetLabelValue())
            if spec is None:  # a value the server did not name
                spec = unnamed_segment_spec(segment.GetLabelValue(), [each.name for each in described])
                described.append(spec)
            segment.SetName(spec.name)
            segment.SetColor(*spec.color)
            segment.SetTag(segment.GetTerminologyEntryTagName(), spec.terminology_entry)
        return sorted(described, key=lambda spec: spec.label_value)

    @staticmethod
    def _geometryWarning(labelmapNode, volumeNode) -> str:
        labelmapMatrix, volumeMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        labelmapNode.GetIJKToRASMatrix(labelmapMatrix)
        volumeNode.GetIJKToRASMatrix(volumeMatrix)
        if grids_match(_rows(labelmapMatrix), labelmapNode.GetImageData().GetDimensions(),
                       _rows(volumeMatrix), volumeNode.GetImageData().GetDimensions(), tolerance_mm=1e-2):
            return ""
        return ("Note: the server's image does not have this volume's voxel grid; the segmentation is placed "
                "by its own geometry.")

    # --- corrections out --------------------------------------------------------------------------

    @staticmethod
    def referenceVolume(segmentationNode):
        return segmentationNode.GetNodeReference(REF_VOLUME)

    @staticmethod
    def segmentNames(segmentationNode) -> list:
        segmentation = segmentationNode.GetSegmentation()
        return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]

    def serverGrid(self, segmentationNode, volumeNode) -> tuple | None:
        """The grid the server stores the volume's image on: the one its labelmap came on, else the
        grid of the file the volume was loaded from (Slicer reverses k of a left-handed file); None
        when neither is known."""
        for text in (segmentationNode.GetAttribute(ATTR_SERVER_GRID), volumeNode.GetAttribute(ATTR_SERVER_GRID)):
            grid = decode_grid(text)
            if grid is not None:
                return grid
        storage = volumeNode.GetStorageNode()
        fileName = storage.GetFileName() if storage is not None else None
        if fileName and os.path.isfile(fileName):
            try:
                return decode_grid(_gridText(self._readNative(fileName, volumeNode.GetClassName())))
            except OSError:
                return None
        return None

    def exportCorrection(self, segmentationNode, volumeNode, onUploadedCopy: bool = False) -> str:
        """The segmentation as a labelmap (NIfTI) on the grid the server stores the volume's image on
        (its datastore image's geometry, left-handed included), segments keeping the server's label
        values; nothing is left in the scene. ``onUploadedCopy``: the image goes to the server now,
        as :meth:`exportVolume` writes it (Slicer's grid of the volume), so the label is on that grid."""
        names = self.segmentNames(segmentationNode)
        if not names:
            raise ValueError(f"'{segmentationNode.GetName()}' has no segments to save.")
        values = assign_label_values(names, decode_label_values(segmentationNode.GetAttribute(ATTR_LABEL_VALUES)))
        with _NewNodesRemoved(self.scene):
            colorNode = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode")
            labelmapNode = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            colorNode.SetTypeToUser()
            colorNode.SetNumberOfColors(max(values.values()) + 1)
            colorNode.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
            segmentation = segmentationNode.GetSegmentation()
            segmentIds = vtk.vtkStringArray()
            for index in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(index)
                colorNode.SetColor(values[segment.GetName()], segment.GetName(), *segment.GetColor(), 1.0)
                segmentIds.InsertNextValue(segmentation.GetNthSegmentID(index))
            exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelmapNode, volumeNode,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colorNode)
            if not exported:
                raise RuntimeError("Slicer could not export the segmentation to a labelmap")
            grid = None if onUploadedCopy else self.serverGrid(segmentationNode, volumeNode)
            out = self._onServerGrid(labelmapNode, grid)
            path = os.path.join(self.tempDir, f"correction-{time.strftime('%H%M%S')}.nii.gz")
            self._write(out, path)
        return path

    @staticmethod
    def _onServerGrid(labelmapNode, grid):
        """``labelmapNode`` (on Slicer's grid of the volume), or a copy outside the scene with the same
        voxels on the server's grid when that grid orders the same voxel centres differently."""
        if grid is None:
            return labelmapNode
        matrix = vtk.vtkMatrix4x4()
        labelmapNode.GetIJKToRASMatrix(matrix)
        dims = labelmapNode.GetImageData().GetDimensions()
        mapping = grid_axes_map(grid[0], grid[1], _rows(matrix), dims)
        if mapping is None or mapping == ((0, 1, 2), (False, False, False)):
            return labelmapNode
        import numpy
        from vtk.util import numpy_support

        axes, flips = mapping
        source = numpy_support.vtk_to_numpy(labelmapNode.GetImageData().GetPointData().GetScalars())
        ijk = source.reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0)  # [i, j, k]
        target = ijk.transpose(axes)[tuple(slice(None, None, -1) if flip else slice(None) for flip in flips)]
        voxels = numpy.ascontiguousarray(target.transpose(2, 1, 0))  # [k, j, i] of the server's grid
        image = vtk.vtkImageData()
        image.SetDimensions(*[int(n) for n in grid[1]])
        scalars = numpy_support.numpy_to_vtk(voxels.ravel(), deep=True)
        image.GetPointData().SetScalars(scalars)
        copy = slicer.vtkMRMLLabelMapVolumeNode()
        copy.SetAndObserveImageData(image)
        copy.SetIJKToRASMatrix(_matrix(grid[0]))
        return copy

    # --- worker-thread work (no MRML) -------------------------------------------------------------

    @staticmethod
    def runTurn(job: Job, client: VilaM3Client, studies: dict, uploads: dict, params: dict,
                onEvent, onSession, onSessionsExpired) -> TurnAnswer:
        """(worker) Send the volumes that need it as sessions, then stream the turn."""
        try:
            for key, path in uploads.items():
                if job.abort.is_set():
                    raise StreamAborted("stopped before the volume was sent")
                sessionId = client.create_session([path])
                studies[key] = StudyRef.session(sessionId)
                onSession(key, sessionId)
        finally:
            ChatSceneLogic.removeFiles(uploads.values())
        try:
            params = dict(params)
            if "t1c" in studies:
                params["sequences"] = {
                    key: study.image_id or study.session_id  # the server takes ids only, never its paths
                    for key, study in studies.items()
                }
                primary = studies["t1c"]
            else:
                primary = studies["image"]
            return client.stream(primary, params, on_event=onEvent, abort=job.abort)
        except RequestRejected as err:
            text = str(err).lower()
            if "session" in text and "not found" in text:
                onSessionsExpired()
                raise RequestRejected("the server no longer has this volume (its session expired); "
                                      "press Send to send it again", err.status) from None
            raise

    @staticmethod
    def saveCorrection(client: VilaM3Client, imageId: str | None, volumeName: str, upload: str | None,
                       labelPath: str, chatId: str | None, segmentNames: list, source: str | None = None) -> tuple:
        """(worker) Add the volume to the datastore if needed, then save the label as final."""
        try:
            if imageId is None:
                imageId = client.upload_image(upload, unique_image_id(volumeName, client.datastore_images()))
            extra = {"segments": list(segmentNames), **({"source": source} if source else {})}
            saved = client.save_final_label(imageId, labelPath, chatId, extra=extra)
            return imageId, saved
        finally:
            ChatSceneLogic.removeFiles([path for path in (upload, labelPath) if path])


def _rows(matrix) -> list:
    """A vtkMatrix4x4 as a list of 4 rows."""
    return [[matrix.GetElement(row, column) for column in range(4)] for row in range(4)]


def _matrix(rows) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(rows[row][column]))
    return matrix


def _gridText(volumeNode) -> str:
    """A volume node's voxel grid as text, to keep in an attribute."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return encode_grid(_rows(matrix), volumeNode.GetImageData().GetDimensions())


class _NewNodesRemoved:
    """Removes, on exit, the nodes added to the scene inside the ``with`` block (display, storage and
    colour nodes a reader or exporter creates), except those passed to :meth:`keep` and singletons."""

    def __init__(self, scene):
        self.scene = scene
        self.kept: set = set()

    def keep(self, *nodes):
        self.kept.update(node.GetID() for node in nodes if node is not None)

    def __enter__(self):
        self.before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        return self

    def __exit__(self, *excInfo):
        added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in self.before and node.GetID() not in self.kept and not node.GetSingletonTag():
                self.scene.RemoveNode(node)
        return False
