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
import sys
import time

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from VILAM3ChatLib.chat_state import ChatState
from VILAM3ChatLib.client import (
    StreamAborted,
    StudyRef,
    TurnAnswer,
    VilaM3Client,
    modality_param,
    normalize_server_url,
    turn_params,
)
from VILAM3ChatLib.scene import ATTR_CHAT_ID, SLICE_VIEW, ChatSceneLogic
from VILAM3ChatLib.slice_mapping import (
    SlicePosition,
)
from VILAM3ChatLib.worker import BackgroundJobs, Job

SERVER_URL_SETTING = "VILAM3Chat/serverUrl"
MONAI_LABEL_SERVER_SETTING = "MONAILabel/serverUrl"
USERNAME_SETTING = "VILAM3Chat/username"
TEST_SERVER_SETTING = "VILAM3Chat/testServerUrl"
DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
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


class VILAM3ChatLogic(ScriptedLoadableModuleLogic, ChatSceneLogic):
    """The panel's Logic: :class:`VILAM3ChatLib.scene.ChatSceneLogic` (shared with the web viewer) on
    ``slicer.mrmlScene`` unless given a scene, plus this module's saved server setting."""

    def __init__(self, scene=None, tempDir: str | None = None):
        ScriptedLoadableModuleLogic.__init__(self)
        ChatSceneLogic.__init__(self, scene if scene is not None else slicer.mrmlScene, tempDir)

    @staticmethod
    def savedServerUrl() -> str:
        """This module's server setting, else MONAI Label module's, else the local default."""
        settings = qt.QSettings()
        for key in (SERVER_URL_SETTING, MONAI_LABEL_SERVER_SETTING):
            value = settings.value(key, "")
            if value:
                return str(value)
        return DEFAULT_SERVER_URL





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
