"""The page: a study from the server's datastore in three slice views, and the VILA-M3 chat beside them.

Rendering happens here, on the viewer's process, with trame-slicer (3D Slicer's MRML core, VTK,
offscreen); the browser gets images and sends clicks. The chat runs exactly as in the Slicer panel:
:class:`VILAM3ChatLib.scene.ChatSceneLogic` maps the Red (axial) view to the slice the server
renders, streams the turn, imports the returned labelmap as named, coloured segments and exports a
correction on the server's grid; :class:`VILAM3ChatLib.chat_state.ChatState` renders the transcript.
Network work runs in worker threads (:class:`VILAM3ChatLib.worker.BackgroundJobs`, polled on the
page's event loop), so the page never waits on the server and MRML is only touched on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile

from trame.app import TrameApp
from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_server.utils.asynchronous import create_task
from trame_slicer import module as trame_slicer_module
from trame_slicer.core import LayoutManager, SlicerApp, VolumeWindowLevel
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from VILAM3ChatLib.chat_state import ChatState
from VILAM3ChatLib.client import (
    ChatTaskUnavailable,
    StreamAborted,
    StudyRef,
    TurnAnswer,
    VilaM3Client,
    turn_params,
)
from VILAM3ChatLib.scene import ATTR_CHAT_ID, SLICE_VIEW, ChatSceneLogic
from VILAM3ChatLib.slice_mapping import slice_centre
from VILAM3ChatLib.worker import BackgroundJobs, Job

from .brats import SequenceStudy
from .chat_list import ServerChats
from .editor import SegmentEditing
from .login import TabLogin
from .settings import ViewerSettings, load_settings
from .study_upload import StudyUpload

logger = logging.getLogger(__name__)

#: the three slice views, by Slicer's names (Red axial, Green coronal, Yellow sagittal)
VIEWS = ("Red", "Green", "Yellow")
LAYOUT_ID = "three slices"
SOURCE = "VILA-M3 Chat (web viewer)"


def _hex(color) -> str:
    return "#" + "".join(f"{max(0, min(255, round(c * 255))):02x}" for c in color[:3])


class ChatViewer(TrameApp):
    """The web viewer of one VILA-M3 server.

    Args:
        server_url: the MONAI Label server, e.g. ``http://127.0.0.1:8000``.
        username, password, token: its login, used only when the server has auth on.
        settings: presets and defaults (``configs/web_viewer.yaml``).
        server: a trame server (default: trame's own).
        encoder: how views travel to the browser (``jpeg``, ``turbo-jpeg``, ``png``, ``webp``, ``avif``;
            default trame-slicer's); ``png`` is lossless (the browser tests compare pixels).
    """

    def __init__(self, server_url: str, username: str = "", password: str = "", token: str = "",
                 settings: ViewerSettings | None = None, server=None, encoder: str | None = None):
        super().__init__(server)
        self.settings = settings or load_settings()
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server, rca_encoder=encoder)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout(LAYOUT_ID, Layout(LayoutDirection.Horizontal, [
            ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
            ViewLayoutDefinition.sagittal_view()]))
        self.temp_dir = tempfile.mkdtemp(prefix="vila_m3_viewer-")
        self.logic = ChatSceneLogic(self.slicer_app.scene, tempDir=self.temp_dir)
        self.client = VilaM3Client(server_url, username=username or None, password=password or None,
                                   token=token or None, download_dir=self.temp_dir)
        self.jobs = BackgroundJobs()
        self.volume = None  # the study's volume node
        self.segmentation = None  # the segmentation shown in the list
        self.chat_states: dict[str, ChatState] = {}
        self.turn: dict | None = None
        self._init_state()
        self.uploads = StudyUpload(self)  # a study from the user's disk, as a session (study_upload.py)
        self.chats = ServerChats(self)  # the reopen list, from the server (chat_list.py)
        self.login = TabLogin(self, kiosk=bool(username or token))  # the page's login form (login.py)
        self.editing = SegmentEditing(self.slicer_app, self.state, self._set_status)
        self.brats = SequenceStudy(self)
        self._build_ui()
        self.layout_manager.set_layout(LAYOUT_ID)
        self.server.controller.on_server_ready.add(self._on_ready)

    # --- state ------------------------------------------------------------------------------------

    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "VILA-M3 viewer"
        s.server_url = self.client.server_url
        s.server_error = ""
        s.stand_in_notice = ""
        s.studies = []
        s.study = ""
        s.loading = False
        s.presets = [p.name for p in self.settings.window_level_presets]
        s.preset = "auto"
        s.slice_index = 0
        s.slice_count = 0
        s.slice_axis = "axial"
        s.slice_note = ""
        s.question = ""
        s.busy = False
        s.status = "Connecting to the server…"
        s.status_error = False
        s.transcript_html = ""
        s.chat_id = ""
        s.old_chats = []
        s.old_chat = ""
        s.segmentation_name = ""
        s.segments = []
        s.opacity = self.settings.segment_opacity
        s.change("study")(self._on_study)
        s.change("preset")(self._on_preset)
        s.change("slice_index")(self._on_slice_index)
        s.change("opacity")(self._on_opacity)

    def _set_status(self, text: str, error: bool = False) -> None:
        with self.state:
            self.state.status = text
            self.state.status_error = error

    def _show_error(self, err: BaseException) -> None:
        if self.login.needs_login(err):  # auth on and no (more) valid token: the login form instead
            return
        logger.info("viewer error: %s", err)
        self._set_status(str(err) or type(err).__name__, error=True)

    # --- start-up: the server, its studies, its stand-ins -------------------------------------------

    def _on_ready(self, **_kwargs) -> None:
        self._poll_task = create_task(self._poll_jobs())  # cancelled when the tab closes (sessions.release)
        self.refresh_server()

    async def _poll_jobs(self) -> None:
        """Deliver the workers' results on the page's loop; while the server cannot be reached, try
        again every ``reconnect_s`` seconds (``make run`` starts the viewer before the server answers)."""
        last_try = asyncio.get_running_loop().time()
        while True:
            try:
                if self.jobs.poll():
                    self.state.flush()
                now = asyncio.get_running_loop().time()
                if self.state.server_error and now - last_try >= self.settings.reconnect_s:
                    last_try = now
                    self.refresh_server()
            except Exception:  # a callback's own error is shown by it; keep polling
                logger.exception("viewer callback failed")
            await asyncio.sleep(self.settings.poll_interval_s)

    def refresh_server(self) -> None:
        """Ask the server for its tasks and studies (in a worker)."""
        if self.jobs.running("connect"):
            return

        def work(job: Job):
            info, images = self.client.info(refresh=True), self.client.datastore_images()
            try:
                self.client.require_chat_task()
            except ChatTaskUnavailable as err:
                return info, images, str(err)
            return info, images, ""

        def done(result) -> None:
            info, images, no_chat = result
            self.chats.refresh()  # the user's chats, to reopen
            with self.state:
                self.state.server_error = ""
                self.state.studies = images
                self.state.stand_in_notice = self._stand_in_text(info)
                self.state.status = (f"Connected to {self.client.server_url}: {len(images)} studies."
                                     if images else f"The server at {self.client.server_url} has no studies.")
                if no_chat:  # the studies can still be viewed
                    self.state.status = f"{self.state.status} No chat: {no_chat}"
                self.state.status_error = bool(no_chat)

        def failed(err: BaseException) -> None:
            if self.login.needs_login(err):
                return
            with self.state:
                self.state.server_error = (f"The VILA-M3 server at {self.client.server_url} cannot be reached: "
                                           f"{err}. Start it (make run) or check the address; the page tries "
                                           "again every few seconds (or press Retry).")
                self.state.status = str(err)
                self.state.status_error = True

        self.jobs.start("connect", work, done, failed)

    @staticmethod
    def _stand_in_text(info: dict) -> str:
        """A line naming the tasks the server says run on stand-in weights (``stand_in`` or a
        description that says so); empty when it names none (answers then say it per turn)."""
        names = [name for name, model in (info.get("models") or {}).items()
                 if isinstance(model, dict) and (model.get("stand_in") or "stand-in" in
                                                 str(model.get("description") or "").lower())]
        if not names:
            return ""
        return (f"Stand-in weights: {', '.join(sorted(names))} run on stand-in models; their answers and "
                "segmentations are not a medical model's.")

    # --- the study and its views --------------------------------------------------------------------

    def _on_study(self, study: str = "", **_kwargs) -> None:
        if not study or self.brats.load(study):  # a four-sequence MRI study loads all four
            return
        if self.uploads.load(study):  # an uploaded session
            return
        self.state.loading = True
        self._set_status(f"Loading {study} from the server…")
        self.jobs.start(f"load-{study}", lambda job: self.client.download_image(study),
                        lambda path: self._show_study(study, path), self._on_load_failed)

    def _on_load_failed(self, err: BaseException) -> None:
        with self.state:
            self.state.loading = False
        self._show_error(err)

    def _show_study(self, study: str, path: str) -> None:
        try:
            if study != self.state.study:
                return  # another study was picked meanwhile
            self._clear_scene()
            nodes = self.slicer_app.io_manager.load_volumes(path)
            if not nodes:
                raise ValueError(f"the viewer could not read the image '{study}'")
            volume = nodes[0]
            volume.SetName(study)
            self.logic.rememberImage(volume, self.client.server_url, study)
            self.volume = volume
            self.slicer_app.display_manager.show_volume_in_slice_background(volume)
            self.slicer_app.display_manager.show_volume_in_slice_foreground(None)
            for name in VIEWS:  # views along the image's own slices: the Red view is one server slice
                node = self.logic.sliceNode(name)
                if node is not None:
                    node.RotateToVolumePlane(volume)
            for view in self.slicer_app.view_manager.get_slice_views():
                view.fit_view_to_content()
            red = self.slicer_app.view_manager.get_view(SLICE_VIEW)
            if red is not None:
                red.modified.connect(lambda *_: self._on_red_moved())
            self._on_preset(self.state.preset)
            position = self.logic.slicePosition(volume, SLICE_VIEW)
            with self.state:
                self.state.slice_axis = position.axis
                self.state.slice_count = position.count
                self.state.chat_id = self.logic.chatId(volume)
                self.state.loading = False
            self._go_to_slice(position.count // 2)
            self._render_chat()
            self._set_status(f"{study}: {position.count} {position.axis} slices. Ask about the slice on screen.")
            self.chats.study_shown(study)  # a chat waiting for this study is reopened now
        except Exception as err:
            self._on_load_failed(err)
        finally:
            self.logic.removeFiles([path])

    def _clear_scene(self) -> None:
        for node in list(self.slicer_app.scene.GetNodesByClass("vtkMRMLSegmentationNode")):
            self.slicer_app.scene.RemoveNode(node)
        if self.volume is not None:
            self.slicer_app.scene.RemoveNode(self.volume)
        self.brats.clear()
        self.volume = self.segmentation = None
        self._show_segments(None)

    def _on_preset(self, preset: str = "auto", **_kwargs) -> None:
        if self.volume is None:
            return
        chosen = self.settings.preset(preset)
        display = self.volume.GetDisplayNode()
        if chosen.window is None or chosen.level is None:
            display.AutoWindowLevelOn()
        else:
            VolumeWindowLevel.set_volume_node_window_level(self.volume, chosen.window, chosen.level)

    def _go_to_slice(self, index: int) -> None:
        """Centre the Red view on the server's slice ``index`` of the study (the view stays parallel)."""
        volume = self.volume
        if volume is None:
            return
        import vtk

        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        rows = [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]
        dims = volume.GetImageData().GetDimensions()
        ras = slice_centre(rows, dims, self.state.slice_axis, index)
        self.logic.sliceNode(SLICE_VIEW).JumpSliceByCentering(*ras)
        self._on_red_moved()

    def _on_slice_index(self, slice_index=0, **_kwargs) -> None:
        try:
            index = int(float(slice_index))
        except (TypeError, ValueError):
            return
        if self.volume is None or not 0 <= index < self.state.slice_count:
            return
        if self.logic.slicePosition(self.volume, SLICE_VIEW).index != index:
            self._go_to_slice(index)

    def _on_red_moved(self) -> None:
        """The Red view moved (its slider, the page's slice field): the slice the chat will ask about."""
        if self.volume is None:
            return
        position = self.logic.slicePosition(self.volume, SLICE_VIEW)
        with self.state:
            self.state.slice_index = position.index
            self.state.slice_note = position.note(SLICE_VIEW)

    # --- the chat -------------------------------------------------------------------------------------

    def _chat_state(self, chat_id: str) -> ChatState:
        return self.chat_states.setdefault(chat_id, ChatState())

    def _render_chat(self) -> None:
        chat_id = self.state.chat_id
        with self.state:
            self.state.transcript_html = self._chat_state(chat_id).to_html() if chat_id else ""

    def send(self, question: str | None = None) -> None:
        """Ask ``question`` (the page sends what its field holds; default the state's) about the slice
        on screen; the answer streams in."""
        try:
            if self.turn is not None:
                raise ValueError("A question is being answered; wait for it or press Stop.")
            if self.volume is None:
                raise ValueError("Pick a study first.")
            question = str(self.state.question if question is None else question).strip()
            position = self.logic.slicePosition(self.volume, SLICE_VIEW)
            chat_id = self.logic.chatId(self.volume)
            params = turn_params(question, chat_id, position.axis, position.index)
        except Exception as err:
            self._show_error(err)
            return
        state = self._chat_state(chat_id)
        state.start_turn(question, chat_id)
        self.chats.note_asked(chat_id, question)
        self.turn = {"chat_id": chat_id, "volume": self.volume}
        with self.state:
            self.state.question = ""
            self.state.busy = True
            self.state.chat_id = chat_id
        self._render_chat()
        note = position.note(SLICE_VIEW)
        self._set_status(f"Asking about {position.axis} slice {position.index} of {position.count}…"
                         + (f" {note}" if note else ""))
        studies = self.brats.studies(self.volume) or {"image": StudyRef.image(self.volume.GetName())}
        studies = self.uploads.studies(self.volume) or studies  # an uploaded session

        def turn(job: Job, studies: dict, expired) -> TurnAnswer:
            return self.logic.runTurn(job, self.client, studies, {}, params,
                                      onEvent=lambda name, data: job.post(self._on_stream_event, chat_id, name, data),
                                      onSession=lambda *_: None, onSessionsExpired=expired)

        work, done = self.uploads.resending(turn, studies, self._on_turn_done)  # an expired upload: sent again
        self.jobs.start("turn", work, done, self._on_turn_error)

    def _on_stream_event(self, chat_id: str, name: str, data: dict) -> None:
        state = self._chat_state(chat_id)
        state.on_event(name, data)
        if name == "queued":
            self._set_status(f"VILA-M3 is {state.waiting}…")
        elif name == "expert_started":
            self._set_status(f"Running {data.get('expert')}({data.get('argument') or ''}) on the whole volume…")
        elif name == "expert_finished":
            self._set_status(f"{data.get('expert')} finished; VILA-M3 is answering with its result…")
        if chat_id == self.state.chat_id:
            self._render_chat()

    def _on_turn_done(self, answer: TurnAnswer) -> None:
        turn, self.turn = self.turn or {}, None
        chat_id = turn.get("chat_id") or answer.chat_id
        self.chats.refresh()
        self._chat_state(chat_id).finish_turn(answer.raw)
        self._render_chat()
        try:
            message = "Stopped." if answer.cancelled else "Answered."
            if answer.slice.get("axis") is not None and answer.slice.get("index") is not None:
                message = message[:-1] + f" about {answer.slice['axis']} slice {answer.slice['index']}."
            if answer.labelmap_path and turn.get("volume") is self.volume and self.volume is not None:
                node = self.logic.loadLabelmap(answer, self.volume, chat_id)
                self._show_segments(node)
                count = node.GetSegmentation().GetNumberOfSegments()
                message += f" {answer.labelmap_expert or 'The expert'} returned {count} segments."
                if self.logic.geometryWarning:
                    message += " " + self.logic.geometryWarning
            if answer.stand_in:
                message += " The server runs stand-in weights: the answer is not a medical model's."
                with self.state:
                    self.state.stand_in_notice = self.state.stand_in_notice or (
                        "Stand-in weights: the server's chat model is a stand-in; its answers are not a "
                        "medical model's.")
            for notice in answer.raw.get("notices") or []:
                if "stand-in" in str(notice) and not self.state.stand_in_notice:
                    with self.state:
                        self.state.stand_in_notice = f"Stand-in weights: {notice}"
            self._set_status(message)
        except Exception as err:
            self._show_error(err)
        finally:
            self.logic.removeFiles([answer.labelmap_path] if answer.labelmap_path else [])
            with self.state:
                self.state.busy = False

    def _on_turn_error(self, err: BaseException) -> None:
        turn, self.turn = self.turn or {}, None
        self.chats.refresh()
        if turn.get("chat_id"):
            self._chat_state(turn["chat_id"]).fail(str(err))
            self._render_chat()
        with self.state:
            self.state.busy = False
        if isinstance(err, StreamAborted):
            self._set_status("Stopped waiting for the answer.")
        else:
            self._show_error(err)

    def stop(self) -> None:
        if self.turn is None:
            return
        chat_id = self.turn["chat_id"]
        self._set_status("Stopping…")

        def stopped(cancelled: bool) -> None:
            if not cancelled:
                self.jobs.abort("turn")

        def failed(err: BaseException) -> None:
            self.jobs.abort("turn")
            self._show_error(err)

        if not self.jobs.running("cancel"):
            self.jobs.start("cancel", lambda job: self.client.cancel(chat_id), stopped, failed)

    def new_chat(self) -> None:
        if self.volume is None:
            self._show_error(ValueError("Pick a study first."))
            return
        if self.turn is not None:
            self._show_error(ValueError("A question is being answered; wait for it or press Stop."))
            return
        chat_id = self.logic.newChat(self.volume)
        with self.state:  # the id and the (empty) transcript reach the page together
            self.state.chat_id = chat_id
            self.state.transcript_html = self._chat_state(chat_id).to_html()
            self.state.status = f"New chat {chat_id}."
            self.state.status_error = False

    def reopen_chat(self) -> None:
        """Reopen ``old_chat`` (a chat id): its transcript and its last segmentation, from the server."""
        chat_id = str(self.state.old_chat or "").strip()
        if self.chats.open_study_first(chat_id):  # its study is not on the page: loaded first (chat_list.py)
            return
        volume = self.volume
        if not chat_id or volume is None or self.turn is not None:
            self._show_error(ValueError("Pick a study and a chat to reopen (and wait for a running answer)."))
            return
        self._set_status(f"Reopening chat {chat_id}…")

        def restored(result) -> None:
            chat, labels_path, images = result
            if volume is not self.volume:
                self.logic.removeFiles([labels_path] if labels_path else [])
                return
            state, node = self.logic.restoreChat(chat, labels_path, volume, self.client.server_url, images)
            self.chat_states[chat_id] = state
            with self.state:
                self.state.chat_id = chat_id
                self.state.transcript_html = state.to_html()
            if node is not None:
                self._show_segments(node)
            self._set_status(f"Chat {chat_id} reopened.")

        self.jobs.start("reopen", lambda job: self.logic.fetchChat(self.client, chat_id), restored, self._show_error)

    # --- segments -------------------------------------------------------------------------------------

    def _show_segments(self, node) -> None:
        """List ``node``'s segments (name, colour, shown) and hide every other chat segmentation."""
        for other in self.slicer_app.scene.GetNodesByClass("vtkMRMLSegmentationNode"):
            if other is not node and other.GetDisplayNode() is not None:
                other.GetDisplayNode().SetVisibility(False)
        self.segmentation = node
        if node is not None:
            display = node.GetDisplayNode()
            display.SetVisibility(True)
            display.SetOpacity2DFill(float(self.state.opacity))
            display.SetOpacity2DOutline(1.0)
        self.editing.attach(node, self.volume)
        self._list_segments()

    def _list_segments(self) -> None:
        node, rows = self.segmentation, []
        if node is not None:
            segmentation, display = node.GetSegmentation(), node.GetDisplayNode()
            for index in range(segmentation.GetNumberOfSegments()):
                segment_id = segmentation.GetNthSegmentID(index)
                segment = segmentation.GetSegment(segment_id)
                rows.append({"id": segment_id, "name": segment.GetName(), "color": _hex(segment.GetColor()),
                             "value": segment.GetLabelValue(),
                             "visible": bool(display.GetSegmentVisibility(segment_id))})
        with self.state:
            self.state.segments = rows
            self.state.segmentation_name = node.GetName() if node is not None else ""

    def toggle_segment(self, segment_id: str) -> None:
        if self.segmentation is None:
            return
        display = self.segmentation.GetDisplayNode()
        display.SetSegmentVisibility(segment_id, not display.GetSegmentVisibility(segment_id))
        self._list_segments()

    def remove_segment(self, segment_id: str) -> None:
        """Remove a segment from the correction (the server's labelmap is not changed until saved)."""
        if self.segmentation is None:
            return
        name = self.segmentation.GetSegmentation().GetSegment(segment_id)
        self.segmentation.GetSegmentation().RemoveSegment(segment_id)
        self._list_segments()
        self._set_status(f"Removed '{name.GetName() if name else segment_id}' from the correction.")

    def _on_opacity(self, opacity=0.5, **_kwargs) -> None:
        if self.segmentation is not None and self.segmentation.GetDisplayNode() is not None:
            self.segmentation.GetDisplayNode().SetOpacity2DFill(float(opacity))

    def save_correction(self) -> None:
        """Save the listed segments (the ones kept) as the study's final label on the server."""
        try:
            node, volume = self.segmentation, self.volume
            if node is None or volume is None:
                raise ValueError("There is no segmentation to save: ask a question that runs an expert first.")
            chat_id = node.GetAttribute(ATTR_CHAT_ID) or self.logic.chatIds.get(volume.GetID())
            study = self.logic.knownStudy(volume, self.client.server_url)
            image_id = study.image_id if study is not None else None
            if image_id is None:
                raise ValueError("The study is not the server's datastore image; the viewer saves labels only there.")
            label_path = self.logic.exportCorrection(node, volume)
            names = self.logic.segmentNames(node)
        except Exception as err:
            self._show_error(err)
            return
        self._set_status("Saving the correction…")

        def saved(result) -> None:
            self._set_status(f"Saved {len(names)} segments ({', '.join(names)}) as the final label of "
                             f"image '{result[0]}' on the server.")

        self.jobs.start("save", lambda job: self.logic.saveCorrection(
            self.client, image_id, volume.GetName(), None, label_path, chat_id, names, source=SOURCE),
            saved, self._show_error)

    # --- the page ---------------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        with VAppLayout(self.server, full_height=True) as self.ui:
            self.ui.root.theme = "dark"
            html.Style(_CSS)
            with v3.VAppBar(density="compact", color="grey-darken-4"):
                v3.VToolbarTitle("VILA-M3 viewer")
                html.Span("{{ server_url }}", classes="text-caption mr-4", id="server-url")
            with v3.VNavigationDrawer(location="right", width=440, permanent=True, id="chat-panel"), \
                    html.Div(classes="pa-3 d-flex flex-column ga-2"):
                self.login.ui()
                with html.Div(v_if=("!login_needed",), classes="d-flex flex-column ga-2", id="chat-controls"):
                    self._server_ui()
                    self._study_ui()
                    self._chat_ui()
                    self._segments_ui()
            with v3.VMain(style="height: 100vh;"), html.Div(style="position: relative; height: 100%; width: 100%;",
                                                            id="views"):
                self.layout_manager.initialize_layout_grid(self.ui)

    def _server_ui(self) -> None:
        with v3.VAlert(v_if=("server_error",), type="error", density="compact", id="server-error"):
            html.Div("{{ server_error }}")
            v3.VBtn("Retry", size="small", variant="outlined", click=self.refresh_server, id="retry")
        v3.VAlert(v_if=("stand_in_notice",), text=("stand_in_notice",), type="warning", density="compact",
                  id="stand-in-notice")

    def _study_ui(self) -> None:
        with html.Div(classes="d-flex align-center ga-2"):
            html.Label("Study", for_="study-select", classes="text-body-2")
            with html.Select(v_model=("study",), id="study-select", classes="field", disabled=("loading",)):
                html.Option("Pick a study…", value="", disabled=True)
                html.Option("{{ s }}", v_for="s in studies", key="s", value=("s",))
                html.Option("{{ u.text }}", v_for="u in uploaded_studies", key="u.value", value=("u.value",))
        self.uploads.build_ui()
        with html.Div(classes="d-flex align-center ga-1 flex-wrap", id="presets"):
            html.Span("Window", classes="text-body-2 mr-1")
            v3.VBtn("{{ p }}", v_for="p in presets", key="p", size="x-small",
                    variant=("preset === p ? 'flat' : 'outlined'",), click="preset = p")
        with html.Div(classes="d-flex align-center ga-2", v_if=("slice_count",)):
            html.Label("{{ slice_axis }} slice", for_="slice-index", classes="text-body-2 text-no-wrap")
            v3.VSlider(v_model=("slice_index",), min=0, max=("slice_count - 1",), step=1, hide_details=True,
                       density="compact", id="slice-slider")
            html.Input(type="number", v_model_number=("slice_index",), min=0, max=("slice_count - 1",),
                       id="slice-index", classes="field", style="width: 5em")
            html.Span("of {{ slice_count }}", classes="text-body-2 text-no-wrap")
        self.brats.build_ui()
        html.Div("{{ slice_note }}", v_if=("slice_note",), classes="text-caption text-warning", id="slice-note")

    def _chat_ui(self) -> None:
        html.Div(v_html=("transcript_html",), id="transcript", classes="transcript")
        v3.VProgressLinear(v_if=("busy",), indeterminate=True, color="primary", id="busy")
        html.Div("{{ status }}", id="status", classes=("status_error ? 'text-error' : 'text-medium-emphasis'",),
                 role="status")
        with html.Div(classes="d-flex ga-2"):
            v3.VTextField(v_model=("question",), label="Ask about the slice on screen", density="compact",
                          hide_details=True, id="question", keydown_enter=(self.send, "[question]"), disabled=("busy",))
            v3.VBtn("Send", click=(self.send, "[question]"), disabled=("busy || !study",), color="primary", id="send")
        with html.Div(classes="d-flex ga-2 align-center flex-wrap"):
            v3.VBtn("Stop", click=self.stop, disabled=("!busy",), size="small", id="stop")
            v3.VBtn("New chat", click=self.new_chat, disabled=("busy || !study",), size="small", id="new-chat")
            with html.Select(v_model=("old_chat",), id="old-chat", classes="field", style="max-width: 18em"):
                html.Option("Earlier chat…", value="", disabled=True)
                html.Option("{{ c.text }}", v_for="c in old_chats", key="c.value", value=("c.value",))
            v3.VBtn("Reopen", click=self.reopen_chat, disabled=("busy || !old_chat",), size="small", id="reopen")
        html.Div("chat {{ chat_id }}", v_if=("chat_id",), classes="text-caption", id="chat-id")

    def _segments_ui(self) -> None:
        with html.Div(v_if=("segments.length",), id="segments"):
            html.Div("{{ segmentation_name }}", classes="text-subtitle-2")
            with html.Div(v_for="seg in segments", key="seg.id", classes="d-flex align-center ga-2 segment",
                          raw_attrs=[':data-segment="seg.name"']):
                html.Input(type="checkbox", checked=("seg.visible",), click=(self.toggle_segment, "[seg.id]"),
                           raw_attrs=[':aria-label="\'show \' + seg.name"'])
                html.Span(classes="swatch", style=("{ background: seg.color }",))
                html.Span("{{ seg.name }}", classes="segment-name flex-grow-1")
                html.Span("{{ seg.value }}", classes="text-caption")
                v3.VBtn(icon="mdi-delete", size="x-small", variant="text", click=(self.remove_segment, "[seg.id]"),
                        raw_attrs=[':aria-label="\'remove \' + seg.name"'], classes="remove-segment")
            with html.Div(classes="d-flex align-center ga-2"):
                html.Label("Opacity", classes="text-body-2")
                v3.VSlider(v_model=("opacity",), min=0, max=1, step=0.05, hide_details=True, density="compact",
                           id="opacity")
            self.editing.build_ui()
            v3.VBtn("Save correction as final label", click=self.save_correction, disabled=("busy",),
                    color="secondary", size="small", id="save-correction", block=True)


_CSS = """
.field { background: rgba(255,255,255,0.08); color: inherit; border: 1px solid #777; border-radius: 4px;
         padding: 2px 6px; }
.field option { color: black; }
.transcript { max-height: 40vh; overflow-y: auto; font-size: 0.85rem; border: 1px solid #555;
              border-radius: 4px; padding: 6px; min-height: 6em; }
.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px; border: 1px solid #222; }
"""


def default_view_env() -> None:
    """Offscreen rendering with EGL (Mesa on a CPU-only machine, the GPU's driver elsewhere) unless
    the environment says otherwise."""
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
