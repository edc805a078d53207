"""Paint and erase a correction on the slice views, with trame-slicer's segment editor.

The page's segmentation (the expert's labelmap imported by
:class:`VILAM3ChatLib.scene.ChatSceneLogic`) becomes the active segmentation of the
:class:`trame_slicer.core.SegmentationEditor` that ``SlicerApp`` owns; its Paint and Erase effects
then draw with the mouse on every slice view (a round brush of ``brush_mm`` millimetres, in the
view's plane). Each stroke is one step of an undo stack. Only the active segment changes: paint adds
the brush's voxels to it (overwriting other segments there, as Slicer's default), erase removes them
from it. "Save correction as final label" then exports the edited segmentation exactly as before
(``ChatSceneLogic.exportCorrection``: the server's grid and label values).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer.segmentation import (
    SegmentationEffectErase,
    SegmentationEffectNoTool,
    SegmentationEffectPaint,
)
from trame_slicer.segmentation.paint_effect_parameters import BrushDiameterMode
from undo_stack import UndoStack

logger = logging.getLogger(__name__)

#: the page's tools and the editor's effects behind them
TOOLS = {"view": SegmentationEffectNoTool, "paint": SegmentationEffectPaint, "erase": SegmentationEffectErase}
#: brush diameter range on the page (mm)
BRUSH_MM_MIN, BRUSH_MM_MAX, BRUSH_MM_DEFAULT = 1.0, 50.0, 8.0
#: how many strokes can be undone
UNDO_LIMIT = 20


class SegmentEditing:
    """The page's paint/erase tools on one trame-slicer ``SlicerApp``.

    Args:
        slicer_app: the viewer's ``SlicerApp`` (its ``segmentation_editor`` does the work).
        state: the trame state (keys ``edit_tool``, ``edit_segment``, ``brush_mm``, ``can_undo``, ``strokes``).
        on_status: shows a line in the page's status (text, error).
    """

    def __init__(self, slicer_app, state, on_status: Callable[[str, bool], None]):
        self.editor = slicer_app.segmentation_editor
        self.state = state
        self.on_status = on_status
        self.undo_stack = UndoStack(undo_limit=UNDO_LIMIT)
        self.editor.set_undo_stack(self.undo_stack)
        self.undo_stack.index_changed.connect(self._on_undo_changed)
        self.segmentation_node = None
        state.edit_tool = "view"
        state.edit_segment = ""
        state.brush_mm = BRUSH_MM_DEFAULT
        state.can_undo = False
        state.strokes = 0  # the strokes applied and not undone
        state.change("edit_tool")(self._on_tool)
        state.change("edit_segment")(self._on_segment)
        state.change("brush_mm")(self._on_brush)
        state.change("segments")(self._on_segments_listed)

    # --- the segmentation being edited --------------------------------------------------------------

    def attach(self, segmentation_node, volume_node) -> None:
        """Edit ``segmentation_node`` (on ``volume_node``'s grid); None stops editing. The undo
        history starts over; the tool goes back to viewing."""
        self.editor.deactivate_effect()
        self.undo_stack.clear()
        self.segmentation_node = segmentation_node
        with self.state:
            self.state.edit_tool = "view"
            self.state.can_undo = False
            self.state.strokes = 0
        if segmentation_node is None or volume_node is None:
            with self.state:
                self.state.edit_segment = ""
            return
        self.editor.set_active_segmentation(segmentation_node, volume_node)
        first = segmentation_node.GetSegmentation().GetNthSegmentID(0) or ""
        with self.state:
            self.state.edit_segment = first
        self.editor.set_active_segment_id(first)

    def _segment_ids(self) -> list[str]:
        node = self.segmentation_node
        if node is None:
            return []
        segmentation = node.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    # --- the page's controls ------------------------------------------------------------------------

    def _on_tool(self, edit_tool: str = "view", **_kwargs) -> None:
        effect_type = TOOLS.get(str(edit_tool))
        if effect_type is None:
            return
        if effect_type is not SegmentationEffectNoTool and not self._ready():
            with self.state:
                self.state.edit_tool = "view"
            return
        effect = self.editor.set_active_effect_type(effect_type)
        if effect_type is not SegmentationEffectNoTool:
            self._apply_brush(effect)
            name = self._segment_name(self.state.edit_segment)
            self.on_status(f"{str(edit_tool).capitalize()}: draw on a slice view with the left mouse button "
                           f"('{name}', brush {float(self.state.brush_mm):g} mm).", False)

    def _ready(self) -> bool:
        """True when a segment of the page's segmentation is picked (the editor needs one)."""
        if self.segmentation_node is None or self.editor.active_segmentation_node is not self.segmentation_node:
            self.on_status("There is no segmentation to edit: ask a question that runs an expert first.", True)
            return False
        if self.state.edit_segment not in self._segment_ids():
            self.on_status("Pick the segment to paint or erase first.", True)
            return False
        return True

    def _on_segment(self, edit_segment: str = "", **_kwargs) -> None:
        if edit_segment and edit_segment in self._segment_ids():
            self.editor.set_active_segment_id(edit_segment)
            if self.state.edit_tool != "view":  # the editor drops the tool when the segment changes
                self._on_tool(self.state.edit_tool)

    def _on_brush(self, brush_mm=BRUSH_MM_DEFAULT, **_kwargs) -> None:
        effect = self.editor.active_effect
        if isinstance(effect, (SegmentationEffectPaint, SegmentationEffectErase)):
            self._apply_brush(effect)

    def _apply_brush(self, effect) -> None:
        try:
            diameter = float(self.state.brush_mm)
        except (TypeError, ValueError):
            diameter = BRUSH_MM_DEFAULT
        diameter = min(max(diameter, BRUSH_MM_MIN), BRUSH_MM_MAX)
        effect.set_brush_diameter(diameter, BrushDiameterMode.Absolute)

    def _on_segments_listed(self, segments=None, **_kwargs) -> None:
        """The page's list changed (a segment removed, a new segmentation): keep a valid pick."""
        ids = [row.get("id") for row in segments or []]
        if self.state.edit_segment not in ids:
            removed = bool(self.state.edit_segment)
            with self.state:
                self.state.edit_segment = ids[0] if ids else ""
                if not ids:
                    self.state.edit_tool = "view"
            if removed:  # the strokes of a removed segment cannot be undone
                self.undo_stack.clear()

    def undo(self) -> None:
        """Take back the last stroke."""
        if not self.undo_stack.can_undo():
            self.on_status("Nothing to undo.", True)
            return
        self.undo_stack.undo()
        self.on_status("Undid the last stroke.", False)

    def _on_undo_changed(self, *_args) -> None:
        with self.state:
            self.state.can_undo = self.undo_stack.can_undo()
            self.state.strokes = self.undo_stack.index()

    def _segment_name(self, segment_id: str) -> str:
        node = self.segmentation_node
        segment = node.GetSegmentation().GetSegment(segment_id) if node is not None and segment_id else None
        return segment.GetName() if segment is not None else segment_id

    # --- the page -------------------------------------------------------------------------------------

    def build_ui(self) -> None:
        """The editing controls (inside the page's segment list)."""
        with html.Div(classes="d-flex flex-column ga-1 mt-1", id="edit-tools"):
            with html.Div(classes="d-flex align-center ga-2"):
                html.Label("Edit", for_="edit-segment", classes="text-body-2")
                with html.Select(v_model=("edit_segment",), id="edit-segment", classes="field flex-grow-1"):
                    html.Option("{{ seg.name }}", v_for="seg in segments", key="seg.id", value=("seg.id",))
            with html.Div(classes="d-flex align-center ga-2"):
                for tool, label in (("view", "View"), ("paint", "Paint"), ("erase", "Erase")):
                    v3.VBtn(label, size="x-small", id=f"tool-{tool}", click=f"edit_tool = '{tool}'",
                            variant=(f"edit_tool === '{tool}' ? 'flat' : 'outlined'",),
                            color=(f"edit_tool === '{tool}' ? 'primary' : undefined",),
                            raw_attrs=[f':aria-pressed="edit_tool === \'{tool}\'"'])
                html.Label("brush", for_="brush-mm", classes="text-body-2 ml-2")
                html.Input(type="number", v_model_number=("brush_mm",), min=BRUSH_MM_MIN, max=BRUSH_MM_MAX,
                           step=0.5, id="brush-mm", classes="field", style="width: 4.5em")
                html.Span("mm", classes="text-body-2")
                v3.VBtn("Undo", size="x-small", click=self.undo, disabled=("!can_undo",), id="undo-stroke",
                        prepend_icon="mdi-undo", raw_attrs=[':data-strokes="strokes"'])
