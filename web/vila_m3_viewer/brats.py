"""A brain MRI study in four sequences (T1c, T1, T2, FLAIR) on the page, chatted about as BRATS takes it.

The server's datastore holds the sequences as four images named ``<study>_<sequence>`` (the
product's naming, :mod:`vila_m3.imaging.sequences`). Picking any of them loads all four: the T1c is
the study's volume (the chat, the slice the server renders, the BRATS labelmap and a saved correction
are on its grid, as the server answers BRATS on the T1c grid), FLAIR is shown first and a selector
shows another sequence in the views. A chat turn sends the four ids as the Slicer panel does
(:meth:`VILAM3ChatLib.scene.ChatSceneLogic.runTurn` with ``{"t1c": ..., "t1": ..., "t2": ..., "flair": ...}``
becomes the turn's ``sequences``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer.core import VolumeWindowLevel
from VILAM3ChatLib.client import StudyRef
from VILAM3ChatLib.worker import Job

from vila_m3.imaging.sequences import SEQUENCE_ORDER, sequence_of

if TYPE_CHECKING:
    from .app import ChatViewer

logger = logging.getLogger(__name__)

#: the sequence shown first, and how the page names each
SHOWN_FIRST = "flair"
LABELS = {"t1c": "T1c", "t1": "T1", "t2": "T2", "flair": "FLAIR"}


def sequence_groups(image_ids: list[str]) -> dict[str, dict[str, str]]:
    """The complete four-sequence studies among ``image_ids``: ``{study: {"t1c": id, "t1": id, "t2": id,
    "flair": id}}`` (a study missing a sequence is not one)."""
    groups: dict[str, dict[str, str]] = {}
    for image_id in image_ids:
        found = sequence_of(image_id)
        if found is not None:
            groups.setdefault(found[0], {}).setdefault(found[1], image_id)
    return {study: {key: ids[key] for key in SEQUENCE_ORDER}
            for study, ids in groups.items() if all(key in ids for key in SEQUENCE_ORDER)}


class SequenceStudy:
    """The four sequences of the study on the page (none when the study is one volume).

    Args:
        viewer: the page (its scene, client, jobs and study loading are used).
    """

    def __init__(self, viewer: ChatViewer):
        self.viewer = viewer
        self.ids: dict[str, str] = {}  # sequence -> datastore image id, of the study shown
        self.volumes: dict[str, object] = {}  # sequence -> volume node
        state = viewer.state
        state.sequences = []  # [{"key": "t1c", "label": "T1c"}, ...] while a four-sequence study is shown
        state.sequence = ""
        state.change("sequence")(self._on_sequence)
        state.change("preset")(self._on_preset)

    def load(self, study: str) -> bool:
        """Load ``study``'s four sequences when it is one of them (True), else leave it to the page (False)."""
        found = sequence_of(study)
        group = sequence_groups(list(self.viewer.state.studies or [])).get(found[0]) if found else None
        if group is None:
            return False
        viewer = self.viewer
        viewer.state.loading = True
        viewer._set_status(f"Loading the four sequences of {found[0]} from the server…")

        def work(job: Job) -> dict[str, str]:
            paths: dict[str, str] = {}
            try:
                for key in SEQUENCE_ORDER:
                    paths[key] = viewer.client.download_image(group[key])
            except BaseException:
                viewer.logic.removeFiles(paths.values())
                raise
            return paths

        self.viewer.jobs.start(f"load-{study}", work, lambda paths: self._show(study, group, paths),
                               viewer._on_load_failed)
        return True

    def _show(self, study: str, group: dict[str, str], paths: dict[str, str]) -> None:
        viewer = self.viewer
        others = {key: path for key, path in paths.items() if key != "t1c"}
        try:
            if study != viewer.state.study:
                return
            viewer._show_study(study, paths["t1c"])  # the T1c is the study's volume
            volume = viewer.volume
            if volume is None:
                return
            volume.SetName(group["t1c"])
            viewer.logic.rememberImage(volume, viewer.client.server_url, group["t1c"])
            self.ids, self.volumes = dict(group), {"t1c": volume}
            for key, path in others.items():
                nodes = viewer.slicer_app.io_manager.load_volumes(path)
                if not nodes:
                    raise ValueError(f"the viewer could not read the image '{group[key]}'")
                nodes[0].SetName(group[key])
                self.volumes[key] = nodes[0]
            self._on_preset(viewer.state.preset)
            with viewer.state:
                viewer.state.sequences = [{"key": key, "label": LABELS[key]} for key in SEQUENCE_ORDER]
                viewer.state.sequence = SHOWN_FIRST
            self._on_sequence(SHOWN_FIRST)
            viewer._set_status(f"{study}: the four sequences of {sequence_of(study)[0]} (T1c, T1, T2, FLAIR), "
                               f"{viewer.state.slice_count} {viewer.state.slice_axis} slices. Ask about the slice "
                               "on screen; the chat sends all four.")
        except Exception as err:
            viewer._on_load_failed(err)
        finally:
            viewer.logic.removeFiles(others.values())

    def _on_sequence(self, sequence: str = "", **_kwargs) -> None:
        volume = self.volumes.get(str(sequence))
        if volume is not None:
            self.viewer.slicer_app.display_manager.show_volume_in_slice_background(volume)

    def _on_preset(self, preset: str = "auto", **_kwargs) -> None:
        """The page's window/level preset on the other sequences too (the page sets the T1c's)."""
        try:
            chosen = self.viewer.settings.preset(str(preset))
        except ValueError:
            return
        for key, volume in self.volumes.items():
            if key == "t1c" or volume is None or volume.GetDisplayNode() is None:
                continue
            if chosen.window is None or chosen.level is None:
                volume.GetDisplayNode().AutoWindowLevelOn()
            else:
                VolumeWindowLevel.set_volume_node_window_level(volume, chosen.window, chosen.level)

    def studies(self, volume) -> dict[str, StudyRef] | None:
        """The turn's studies when ``volume`` is this study's T1c: the four sequences by id, else None."""
        if not self.ids or self.volumes.get("t1c") is not volume:
            return None
        return {key: StudyRef.image(self.ids[key]) for key in SEQUENCE_ORDER}

    def clear(self) -> None:
        """Remove the sequences other than the study's volume from the scene (the page removes that one)."""
        for key, node in self.volumes.items():
            if key != "t1c" and node is not None and node.GetScene() is not None:
                self.viewer.slicer_app.scene.RemoveNode(node)
        self.ids, self.volumes = {}, {}
        with self.viewer.state:
            self.viewer.state.sequences = []
            self.viewer.state.sequence = ""

    def build_ui(self) -> None:
        """The sequence selector (shown while a four-sequence study is on the page)."""
        with html.Div(v_if=("sequences.length",), classes="d-flex align-center ga-1 flex-wrap", id="sequences"):
            html.Span("Sequence", classes="text-body-2 mr-1")
            v3.VBtn("{{ s.label }}", v_for="s in sequences", key="s.key", size="x-small",
                    variant=("sequence === s.key ? 'flat' : 'outlined'",), click="sequence = s.key",
                    raw_attrs=[':data-sequence="s.key"'])
