"""VILA-M3 Chat: ask the VILA-M3 MONAI Label server about the slice on screen, in 3D Slicer.

The panel sends the question with the Red view's slice (and the volume, after asking, when the
server does not have it), shows the answer as it streams, and loads returned labelmaps as new
segmentations with named, coloured segments. A corrected segmentation can be saved back as the
image's final label. Everything that does not need Slicer lives in ``VILAM3ChatLib`` and is tested
outside Slicer; this file only connects it to the scene and the widgets.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from VILAM3ChatLib.chat_state import ChatState
from VILAM3ChatLib.client import (
    RequestRejected,
    StreamAborted,
    StudyRef,
    TurnAnswer,
    VilaM3Client,
    modality_param,
    new_chat_id,
    normalize_server_url,
    turn_params,
    unique_image_id,
)
from VILAM3ChatLib.segments import (
    assign_label_values,
    decode_label_values,
    encode_label_values,
    segment_specs,
    unnamed_segment_spec,
)
from VILAM3ChatLib.slice_mapping import (
    SlicePosition,
    decode_grid,
    encode_grid,
    grid_axes_map,
    grids_match,
    slice_position,
)
from VILAM3ChatLib.worker import BackgroundJobs, Job

SERVER_URL_SETTING = "VILAM3Chat/serverUrl"
MONAI_LABEL_SERVER_SETTING = "MONAILabel/serverUrl"
USERNAME_SETTING = "VILAM3Chat/username"
TEST_SERVER_SETTING = "VILAM3Chat/testServerUrl"
DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
SLICE_VIEW = "Red"

#: node attributes and references this module sets
ATTR_SERVER = "VILAM3Chat.Server"
ATTR_IMAGE_ID = "VILAM3Chat.ImageId"
ATTR_CHAT_ID = "VILAM3Chat.ChatId"
ATTR_EXPERT = "VILAM3Chat.Expert"
ATTR_LABEL_VALUES = "VILAM3Chat.LabelValues"
ATTR_SERVER_GRID = "VILAM3Chat.ServerGrid"  # the server's voxel grid of the image, as stored (JSON)
REF_VOLUME = "VILAM3ChatVolume"
BRATS_KEYS = ("t1c", "t1", "t2", "flair")


class VILAM3Chat(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VILA-M3 Chat"
        self.parent.categories = ["VILA-M3"]
        self.parent.dependencies = []
        self.parent.contributors = ["VILA-M3 for MONAI Label and 3D Slicer contributors"]
        self.parent.helpText = (
            "Ask VILA-M3 about the slice in the Red view. The model may call expert models (VISTA3D, "
            "BRATS, CXR) on the whole volume; their labelmaps are added as new segmentations. "
            "Needs a VILA-M3 MONAI Label server.")
        self.parent.acknowledgementText = (
            "Uses the VILA-M3 model and MONAI Label. Answers are not a diagnosis; check every result.")


#
# Widget
#


class VILAM3ChatWidget(ScriptedLoadableModuleWidget):
    """The chat panel: reads the widgets, shows the chat, and runs all server work in the background."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic: VILAM3ChatLogic | None = None
        self.jobs = BackgroundJobs()
        self.states: dict[str, ChatState] = {}
        self.restoring: set[str] = set()  # stored chats asked for in this session
        self.turn: dict | None = None
        self.stopRequested = False
        self.lastAnswer: TurnAnswer | None = None
        self.timer: qt.QTimer | None = None
        # Replaced by the self-test, which has nobody to click the dialogs.
        self.confirm = lambda text: slicer.util.confirmYesNoDisplay(text, windowTitle="VILA-M3 Chat")

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VILAM3Chat.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VILAM3ChatLogic(slicer.mrmlScene, tempDir=slicer.util.tempDirectory("VILAM3Chat"))

        self.ui.serverUrlLineEdit.text = self.logic.savedServerUrl()
        self.ui.usernameLineEdit.text = str(qt.QSettings().value(USERNAME_SETTING, "") or "")
        self.ui.passwordLineEdit.echoMode = qt.QLineEdit.Password

        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onServerUrlEdited)
        self.ui.usernameLineEdit.connect("editingFinished()", self.onUsernameEdited)
        self.ui.volumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        for key in BRATS_KEYS:
            self.bratsSelector(key).connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.questionLineEdit.connect("returnPressed()", self.onSend)
        self.ui.sendButton.connect("clicked(bool)", self.onSend)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.newChatButton.connect("clicked(bool)", self.onNewChat)
        self.ui.saveCorrectionButton.connect("clicked(bool)", self.onSaveCorrection)

        self.timer = qt.QTimer()
        self.timer.setInterval(50)
        self.timer.connect("timeout()", self.jobs.poll)
        self.timer.start()
        self.selectDefaultVolume()
        self.restoreStoredChat()
        self.updateButtons()
        self.render()

    def cleanup(self):
        self.jobs.abort_all()
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self):
        self.selectDefaultVolume()

    def onReload(self):
        """Reload the library too, so code changes in VILAM3ChatLib take effect."""
        for name in [name for name in sys.modules if name == "VILAM3ChatLib" or name.startswith("VILAM3ChatLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # --- inputs -----------------------------------------------------------------------------------

    def bratsSelector(self, key: str):
        return getattr(self.ui, f"{key}Selector")

    def selectDefaultVolume(self):
        """The Red view's background volume, when nothing is picked yet."""
        if self.ui.volumeSelector.currentNode() is None:
            node = self.logic.viewBackgroundVolume(SLICE_VIEW)
            if node is not None:
                self.ui.volumeSelector.setCurrentNode(node)

    def selectedVolumes(self) -> dict:
        """``{"image": node}``, or the four BRATS sequences when all four are picked."""
        brats = {key: self.bratsSelector(key).currentNode() for key in BRATS_KEYS}
        picked = [key for key, node in brats.items() if node is not None]
        if picked and len(picked) < len(BRATS_KEYS):
            missing = ", ".join(key.upper() for key in BRATS_KEYS if brats[key] is None)
            raise ValueError(f"Pick all four BRATS sequences or none (missing: {missing}).")
        if picked:
            return brats
        node = self.ui.volumeSelector.currentNode()
        if node is None:
            raise ValueError("Pick a volume first.")
        return {"image": node}

    def currentClient(self) -> VilaM3Client:
        url = normalize_server_url(self.ui.serverUrlLineEdit.text)
        return self.logic.client(url, self.ui.usernameLineEdit.text.strip(), self.ui.passwordLineEdit.text)

    def onServerUrlEdited(self):
        text = self.ui.serverUrlLineEdit.text.strip()
        if text:
            qt.QSettings().setValue(SERVER_URL_SETTING, text)

    def onUsernameEdited(self):
        qt.QSettings().setValue(USERNAME_SETTING, self.ui.usernameLineEdit.text.strip())

    def onVolumeChanged(self, node=None):
        self.restoreStoredChat()
        self.render()
        self.updateButtons()

    def restoreStoredChat(self):
        """A volume whose chat was saved with the scene (Slicer restarted since): fetch the chat and its
        last segmentation from the server, once per session."""
        try:
            primary = self.selectedVolumes()
            primary = primary.get("t1c") or primary["image"]
            chatId = self.logic.storedChatId(primary)
            if not chatId or chatId in self.restoring or self.jobs.running("restore") or self.stateFor(chatId).messages:
                return
            client = self.currentClient()
        except ValueError:
            return
        self.restoring.add(chatId)

        def failed(err: BaseException):
            self.restoring.discard(chatId)  # tried again when the volume is picked again
            self.setStatus(f"Chat {chatId} was not restored: {err}", error=True)

        def restored(result):
            chat, labelsPath, datastoreImages = result
            try:
                state, node = self.logic.restoreChat(chat, labelsPath, primary, client.server_url, datastoreImages)
            except Exception as err:
                self.showError(err)
                return
            self.states[chatId] = state
            message = f"Chat {chatId} restored from the server."
            if node is not None:
                self.ui.segmentationSelector.setCurrentNode(node)
                message += f" Its last segmentation is '{node.GetName()}'."
            self.setStatus(message)
            self.render()

        self.jobs.start("restore", lambda job: self.logic.fetchChat(client, chatId), restored, failed)

    # --- display ----------------------------------------------------------------------------------

    def currentChatId(self) -> str | None:
        try:
            volumes = self.selectedVolumes()
        except ValueError:
            return None
        return self.logic.chatId(volumes.get("t1c") or volumes["image"])

    def stateFor(self, chatId: str) -> ChatState:
        if chatId not in self.states:
            self.states[chatId] = ChatState()
        return self.states[chatId]

    def render(self):
        chatId = self.currentChatId()
        state = self.stateFor(chatId) if chatId else ChatState()
        browser = self.ui.transcriptBrowser
        browser.setHtml(state.to_html())
        browser.verticalScrollBar().setValue(browser.verticalScrollBar().maximum)

    def setStatus(self, text: str, error: bool = False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #a4000f;" if error else "")

    def showError(self, err: BaseException):
        """Every problem becomes one line in the status label (no dialogs with tracebacks)."""
        logging.warning("VILA-M3 Chat: %s", err)
        self.setStatus(str(err) or type(err).__name__, error=True)
        self.updateButtons()

    def busy(self) -> bool:
        return self.jobs.running("prepare") or self.jobs.running("turn")

    def updateButtons(self):
        busy = self.busy()
        self.ui.sendButton.enabled = not busy
        self.ui.stopButton.enabled = busy
        self.ui.newChatButton.enabled = not busy
        self.ui.saveCorrectionButton.enabled = not self.jobs.running("save")

    # --- a chat turn ------------------------------------------------------------------------------

    def onSend(self):
        if self.busy():
            return
        try:
            question = self.ui.questionLineEdit.text.strip()
            if not question:
                raise ValueError("Type a question first.")
            volumes = self.selectedVolumes()
            client = self.currentClient()
            primary = volumes.get("t1c") or volumes["image"]
            position = self.logic.slicePosition(primary, SLICE_VIEW)
        except Exception as err:
            self.showError(err)
            return
        self.stopRequested = False
        self.setStatus(f"Connecting to {client.server_url}…")
        self.jobs.start("prepare", lambda job: self.logic.serverImages(client),
                        lambda images: self.onServerReady(client, question, volumes, position, images),
                        self.showError)
        self.updateButtons()

    def onServerReady(self, client: VilaM3Client, question: str, volumes: dict, position: SlicePosition,
                      serverImages: set):
        """The server offers the chat: decide how each volume reaches it, then run the turn."""
        if self.stopRequested:
            self.setStatus("Stopped before anything was asked.")
            self.updateButtons()
            return
        uploads: dict[str, str] = {}
        try:
            studies: dict[str, StudyRef | None] = {}
            for key, node in volumes.items():
                study = self.resolveStudy(node, client, serverImages)
                if study is None:
                    self.setStatus("Nothing was sent: the volume stays on this computer.")
                    self.logic.removeFiles(uploads.values())
                    self.updateButtons()
                    return
                if isinstance(study, str):  # "upload"
                    uploads[key] = self.logic.exportVolume(node)
                    study = None
                studies[key] = study
            primary = volumes.get("t1c") or volumes["image"]
            chatId = self.logic.chatId(primary)
            modality = None if "t1c" in volumes else modality_param(self.logic.dicomModality(primary))
            params = turn_params(question, chatId, position.axis, position.index, modality=modality)
        except Exception as err:
            self.logic.removeFiles(uploads.values())
            self.showError(err)
            return

        state = self.stateFor(chatId)
        state.start_turn(question, chatId)
        self.ui.questionLineEdit.text = ""
        self.render()
        sending = " (sending the volume first)" if uploads else ""
        note = position.note(SLICE_VIEW)
        self.setStatus(f"Asking about {position.axis} slice {position.index} of {position.count}{sending}…"
                       + (f" {note}" if note else ""))
        self.turn = {"client": client, "chatId": chatId, "primary": primary}

        def work(job: Job) -> TurnAnswer:
            return self.logic.runTurn(
                job, client, studies, uploads, params,
                onEvent=lambda name, data: job.post(self.onStreamEvent, chatId, name, data),
                onSession=lambda key, sessionId: job.post(self.logic.rememberSession, volumes[key],
                                                          client.server_url, sessionId),
                onSessionsExpired=lambda: job.post(self.logic.forgetSessions, list(volumes.values())),
            )

        self.jobs.start("turn", work, self.onTurnDone, self.onTurnError)
        self.updateButtons()

    def resolveStudy(self, node, client: VilaM3Client, serverImages: set):
        """A StudyRef when the server has the volume, ``"upload"`` when the annotator agrees to send
        it, None when they do not."""
        study = self.logic.knownStudy(node, client.server_url)
        if study is not None:
            return study
        name = node.GetName()
        if name in serverImages and self.confirm(
                f"The server's datastore has an image named '{name}'.\n\nIs the volume '{name}' that image?\n\n"
                "Yes: ask about the server's copy (nothing is sent).\nNo: send this volume instead."):
            return self.logic.rememberImage(node, client.server_url, name)
        if self.confirm(
                f"The server at {client.server_url} does not have the volume '{name}'.\n\n"
                "Send this volume to the server for this chat? It is kept there as a temporary session "
                "(MONAI Label deletes sessions after about an hour), not added to its datastore."):
            return "upload"
        return None

    def onStreamEvent(self, chatId: str, name: str, data: dict):
        self.stateFor(chatId).on_event(name, data)
        if name == "queued":  # the server's work queue holds other annotators' requests first
            self.setStatus(f"VILA-M3 is {self.stateFor(chatId).waiting}…")
        elif name == "expert_started":
            self.setStatus(f"Running {data.get('expert')}({data.get('argument') or ''}) on the whole volume…")
        elif name == "token" and data.get("round", 0) > 0:
            self.setStatus("VILA-M3 is answering with the expert's result…")
        if chatId == self.currentChatId():
            self.render()

    def onTurnDone(self, answer: TurnAnswer):
        turn, self.turn = self.turn or {}, None
        self.lastAnswer = answer
        chatId = turn.get("chatId") or answer.chat_id
        self.stateFor(chatId).finish_turn(answer.raw)
        self.render()
        try:
            message = "Stopped." if answer.cancelled else "Answered."
            if answer.labelmap_path:
                node = self.logic.loadLabelmap(answer, turn["primary"], chatId)
                self.ui.segmentationSelector.setCurrentNode(node)
                count = node.GetSegmentation().GetNumberOfSegments()
                message += f" Segmentation '{node.GetName()}' added ({count} segments)."
                if self.logic.geometryWarning:
                    message += " " + self.logic.geometryWarning
            if answer.stand_in:
                message += " The server runs stand-in weights: the answer is not a medical model's."
            self.setStatus(message)
        except Exception as err:
            self.showError(err)
        finally:
            self.logic.removeFiles([answer.labelmap_path] if answer.labelmap_path else [])
            self.updateButtons()

    def onTurnError(self, err: BaseException):
        turn, self.turn = self.turn or {}, None
        if turn.get("chatId"):
            self.stateFor(turn["chatId"]).fail(str(err))
            self.render()
        if isinstance(err, StreamAborted):
            self.setStatus("Stopped waiting for the answer.")
            self.updateButtons()
        else:
            self.showError(err)

    def onStop(self):
        if self.turn is None:
            self.stopRequested = True
            return
        client, chatId = self.turn["client"], self.turn["chatId"]
        self.setStatus("Stopping…")

        def stopped(cancelled: bool):
            if not cancelled:  # nothing runs on the server yet (still sending): stop locally
                self.jobs.abort("turn")

        def failed(err: BaseException):
            self.jobs.abort("turn")
            self.showError(err)

        if not self.jobs.running("cancel"):
            self.jobs.start("cancel", lambda job: client.cancel(chatId), stopped, failed)

    def onNewChat(self):
        try:
            volumes = self.selectedVolumes()
        except ValueError as err:
            self.showError(err)
            return
        chatId = self.logic.newChat(volumes.get("t1c") or volumes["image"])
        self.setStatus(f"New chat {chatId}.")
        self.render()

    # --- corrections ------------------------------------------------------------------------------

    def onSaveCorrection(self):
        uploads: list[str] = []
        try:
            segmentation = self.ui.segmentationSelector.currentNode()
            if segmentation is None:
                raise ValueError("Pick the segmentation to save.")
            volume = self.logic.referenceVolume(segmentation) or self.ui.volumeSelector.currentNode()
            if volume is None:
                raise ValueError("Pick the volume the segmentation belongs to.")
            client = self.currentClient()
            chatId = segmentation.GetAttribute(ATTR_CHAT_ID) or self.logic.chatIds.get(volume.GetID())
            study = self.logic.knownStudy(volume, client.server_url)
            imageId = study.image_id if study is not None else None
            if imageId is None:
                if not self.confirm(
                        f"A final label is kept with its image in the server's datastore, which does not have "
                        f"'{volume.GetName()}'.\n\nAdd this volume to the server's datastore (it stays there, "
                        "for training) and save the label?"):
                    self.setStatus("Not saved.")
                    return
                uploads.append(self.logic.exportVolume(volume))
            labelPath = self.logic.exportCorrection(segmentation, volume, onUploadedCopy=bool(uploads))
            segmentNames = self.logic.segmentNames(segmentation)
        except Exception as err:
            self.logic.removeFiles(uploads)
            self.showError(err)
            return
        self.setStatus("Saving the correction…")

        def work(job: Job):
            return self.logic.saveCorrection(client, imageId, volume.GetName(), uploads[0] if uploads else None,
                                             labelPath, chatId, segmentNames)

        def saved(result):
            savedImageId = result[0]
            self.logic.rememberImage(volume, client.server_url, savedImageId)
            self.setStatus(f"Saved as the final label of image '{savedImageId}' on the server.")
            self.updateButtons()

        self.jobs.start("save", work, saved, self.showError)
        self.updateButtons()

    def turnRunning(self) -> bool:
        """True while a question is being answered (used by the self-test)."""
        return self.busy()


#
# Logic
#


class VILAM3ChatLogic(ScriptedLoadableModuleLogic):
    """Scene-side work of the panel: volumes in and labelmaps out, and which study a volume is.

    Everything here works on the MRML scene it is given (``slicer.mrmlScene`` in Slicer; a bare
    ``vtkMRMLScene`` in the tests) with Slicer's MRML and module logics; it needs no widget, no
    layout manager and no Qt. Methods named ``run…``/``save…`` run in worker threads and touch no
    MRML node; all others run on the GUI thread.
    """

    def __init__(self, scene=None, tempDir: str | None = None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.scene = scene if scene is not None else slicer.mrmlScene
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

    @staticmethod
    def savedServerUrl() -> str:
        """This module's server setting, else MONAI Label module's, else the local default."""
        settings = qt.QSettings()
        for key in (SERVER_URL_SETTING, MONAI_LABEL_SERVER_SETTING):
            value = settings.value(key, "")
            if value:
                return str(value)
        return DEFAULT_SERVER_URL

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
        node's stored label values where the scene kept them). Returns ``(state, segmentationNode
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
                names = {}
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
            VILAM3ChatLogic.removeFiles(uploads.values())
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
                       labelPath: str, chatId: str | None, segmentNames: list) -> tuple:
        """(worker) Add the volume to the datastore if needed, then save the label as final."""
        try:
            if imageId is None:
                imageId = client.upload_image(upload, unique_image_id(volumeName, client.datastore_images()))
            saved = client.save_final_label(imageId, labelPath, chatId, extra={"segments": list(segmentNames)})
            return imageId, saved
        finally:
            VILAM3ChatLogic.removeFiles([path for path in (upload, labelPath) if path])


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


#
# Test
#


class VILAM3ChatTest(ScriptedLoadableModuleTest):
    """Asks a real server about the sample CT through the panel and checks the segmentation it returns.

    The server is ``VILAM3_TEST_SERVER``, the ``VILAM3Chat/testServerUrl`` setting, or the local
    default; the test FAILS when none answers, saying how to start one. The model must call an expert:
    ``make run``'s demo model does; ``make demo``'s random stand-ins never do, and the test fails on
    them with that reason rather than passing without a segmentation. The returned segmentation is
    checked segment by segment, voxel for voxel, against the chat's labelmap on the server. The
    volume is ``VILAM3_TEST_VOLUME`` or the repository's ``sample_data/nrrd/ct_abdomen.nrrd``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ask_about_the_sample_ct()

    def test_ask_about_the_sample_ct(self):
        serverUrl = (os.environ.get("VILAM3_TEST_SERVER") or str(qt.QSettings().value(TEST_SERVER_SETTING, "") or "")
                     or DEFAULT_SERVER_URL)
        try:
            VilaM3Client(serverUrl, timeout_s=10).require_chat_task()
        except Exception as err:
            raise AssertionError(
                f"No VILA-M3 server answers at {serverUrl} ({err}). Start one from the repository with "
                "`make run` (its demo model calls VISTA3D), or set VILAM3_TEST_SERVER to a running server, "
                "then run the test again.") from None
        repository = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        volumePath = os.environ.get("VILAM3_TEST_VOLUME") or os.path.join(
            repository, "sample_data", "nrrd", "ct_abdomen.nrrd")
        self.assertTrue(os.path.isfile(volumePath),
                        f"no sample CT at {volumePath}: run `make samples` or set VILAM3_TEST_VOLUME")

        self.delayDisplay("Loading the sample CT")
        volume = slicer.util.loadVolume(volumePath)
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        slicer.util.selectModule("VILAM3Chat")
        widget = slicer.modules.vilam3chat.widgetRepresentation().self()
        widget.confirm = lambda text: True  # send the volume; nobody is there to click
        widget.ui.serverUrlLineEdit.text = serverUrl
        widget.ui.volumeSelector.setCurrentNode(volume)
        widget.onNewChat()
        before = {node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")}

        self.delayDisplay("Asking VILA-M3")
        widget.ui.questionLineEdit.text = "Is there a liver tumour? Segment the liver and any liver tumour."
        widget.onSend()
        deadline = time.time() + 900
        while widget.turnRunning() and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertFalse(widget.turnRunning(), "no final answer within 15 minutes")
        answer = widget.lastAnswer
        self.assertIsNotNone(answer, f"no answer: {widget.ui.statusLabel.text}")
        self.assertTrue(answer.answer or answer.cancelled)
        self.assertTrue(answer.experts, "the model answered without calling an expert, so there is no segmentation "
                        "to check; random stand-in weights (`make demo`) never call one, `make run`'s demo model does")
        self.assertTrue(answer.labelmap_path, "the expert's answer carried no labelmap")

        added = [node for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode") if node.GetID() not in before]
        self.assertEqual(len(added), 1, "one new segmentation per answer with a labelmap")
        segmentation = added[0]
        self.assertTrue(segmentation.GetName().startswith(f"VILA-M3 {answer.chat_id} "))
        names = VILAM3ChatLogic.segmentNames(segmentation)
        self.assertTrue(names, "the segmentation has no segments")
        self.assertTrue(set(names) <= set(answer.label_names), f"segments {names} vs labels {answer.label_names}")

        self.delayDisplay("Checking the segmentation voxel by voxel")
        labelsPath = widget.logic.client(serverUrl).get_labels(answer.chat_id)
        try:
            server = slicer.util.arrayFromVolume(
                VILAM3ChatLogic._readNative(labelsPath, "vtkMRMLLabelMapVolumeNode", rightHanded=True))
        finally:
            VILAM3ChatLogic.removeFiles([labelsPath])
        for name in names:
            segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            self.assertEqual(mask.shape, server.shape, f"segment '{name}' is not on the volume's grid")
            self.assertTrue(((mask > 0) == (server == answer.label_names[name])).all(),
                            f"segment '{name}' differs from the server's label {answer.label_names[name]}")
        self.delayDisplay(f"Test passed: {len(names)} segments ({', '.join(names)}), voxel for voxel")
