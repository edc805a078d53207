"""The Slicer panel's module on 3D Slicer's own core: a real MRML scene, no Slicer application.

``slicer-core`` (Kitware's wheel of Slicer's MRML library and module logics, no Qt) gives
``vtkMRMLScene``, the volumes, segmentations, colours, terminologies and slice logics and
``slicer.util``. What it lacks is what only the application has: ``qt``/``ctk``, ``slicer.app`` and the
``ScriptedLoadableModule`` base classes. The ``slicer_core`` fixture stands those in (a few lines,
below) and imports ``VILAM3Chat.py`` unchanged on a fresh scene with the Red, Yellow and Green slice
views Slicer creates. Without slicer-core the tests are skipped with a message that names it.
"""

from __future__ import annotations

import importlib
import sys
import types
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "slicer_extension" / "VILAM3Chat"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "VILAM3Chat.ui"
#: Slicer's slice views: name → (normal, in-plane x, in-plane y) in RAS, as Slicer's presets
VIEWS = {
    "Red": ((0, 0, 1), (-1, 0, 0), (0, 1, 0)),  # axial
    "Yellow": ((1, 0, 0), (0, -1, 0), (0, 0, 1)),  # sagittal
    "Green": ((0, 1, 0), (-1, 0, 0), (0, 0, 1)),  # coronal
}


class StandInWidget:
    """A Qt widget of the .ui file as the panel uses it: text, enabled, a current node, HTML, a style sheet."""

    def __init__(self) -> None:
        self.text, self.enabled, self.node, self.html, self.style = "", True, None, "", ""
        self.echoMode = 0

    def connect(self, signal: str, slot) -> None:
        pass

    def currentNode(self):
        return self.node

    def setCurrentNode(self, node) -> None:
        self.node = node

    def setHtml(self, html: str) -> None:
        self.html = html

    def setStyleSheet(self, style: str) -> None:
        self.style = style

    def verticalScrollBar(self):
        return types.SimpleNamespace(maximum=0, setValue=lambda value: None)


def _stand_ins() -> dict[str, types.ModuleType]:
    """qt, ctk and slicer.ScriptedLoadableModule as far as the module, its Logic and Widget need."""

    class Base:
        def __init__(self, *args, **kwargs) -> None:
            self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

        def setup(self) -> None:
            pass

        def resourcePath(self, path: str) -> str:
            return str(MODULE_DIR / "Resources" / path)

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = scripted.ScriptedLoadableModuleWidget = Base
    scripted.ScriptedLoadableModuleLogic = scripted.ScriptedLoadableModuleTest = Base
    settings: dict[str, str] = {}
    qt = types.ModuleType("qt")
    qt.QSettings = lambda: types.SimpleNamespace(value=lambda key, default="": settings.get(key, default),
                                                 setValue=settings.__setitem__)
    qt.QLineEdit = types.SimpleNamespace(Password=2)
    qt.QTimer = lambda: types.SimpleNamespace(setInterval=lambda ms: None, connect=lambda signal, slot: None,
                                              start=lambda: None, stop=lambda: None)
    return {"qt": qt, "ctk": types.ModuleType("ctk"), "slicer.ScriptedLoadableModule": scripted}


@dataclass
class SlicerCore:
    """A fresh scene with Slicer's slice views, the module imported on it, and its Logic."""

    slicer: types.ModuleType
    scene: object
    module: types.ModuleType
    logic: object
    volumes: object  # vtkSlicerVolumesLogic

    def load_volume(self, path: Path | str, name: str, labelmap: bool = False):
        """A volume read the way Slicer's Add Data does (right-handed grid, display and storage nodes)."""
        node = self.volumes.AddArchetypeVolume(str(path), name, 1 if labelmap else 0)
        assert node is not None, f"Slicer could not load {path}"
        display = node.GetDisplayNode()
        if display is not None and hasattr(display, "SetInterpolate"):
            display.SetInterpolate(0)  # nearest voxel on screen
        return node

    def add_transform(self, to_parent: np.ndarray):
        node = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        node.SetMatrixTransformToParent(vtk_matrix(to_parent))
        return node

    def set_view(self, view: str, slice_to_ras: np.ndarray, volume=None, size: int = 96, fov_mm: float = 200.0):
        """Point a slice view: its slice-to-RAS matrix, field of view, and background volume."""
        node = self.scene.GetNodeByID(f"vtkMRMLSliceNode{view}")
        node.SetDimensions(size, size, 1)
        node.SetFieldOfView(fov_mm, fov_mm, 1.0)
        node.GetSliceToRAS().DeepCopy(vtk_matrix(slice_to_ras))
        node.UpdateMatrices()
        if volume is not None:
            self.scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{view}").SetBackgroundVolumeID(volume.GetID())
        return node

    def screen(self, view: str) -> np.ndarray:
        """The background layer of a view as Slicer reslices it for the screen ((rows, columns), raw values)."""
        from vtk.util import numpy_support

        logic = self.slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(self.scene)
        logic.SetSliceNode(self.scene.GetNodeByID(f"vtkMRMLSliceNode{view}"))
        layer = logic.GetBackgroundLayer()
        layer.UpdateTransforms()
        reslice = layer.GetReslice()
        reslice.Update()
        image = reslice.GetOutput()
        columns, rows, _ = image.GetDimensions()
        values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        return values.reshape(rows, columns)

    def node_ids(self) -> list[str]:
        return sorted(self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes()))


def vtk_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row][column]))
    return matrix


def rows(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.fixture
def slicer_core(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[SlicerCore]:
    pytest.importorskip("slicer_core", reason="the Slicer scene tests need the slicer-core package, which is "
                        "missing or does not load here (pip install 'slicer-core==5.11.*'; part of the test extra)")
    slicer = importlib.import_module("slicer")
    for name, module in _stand_ins().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", sys.modules["slicer.ScriptedLoadableModule"], raising=False)
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(layoutManager=lambda: None), raising=False)
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(  # for slicer.util's segment helpers
        segmentations=types.SimpleNamespace(logic=lambda: segmentations)), raising=False)
    for view, (normal, x, y) in VIEWS.items():  # the slice views and their composite nodes, as Slicer names them
        node = slicer.vtkMRMLSliceNode()
        node.SetName(view)
        node.SetLayoutName(view)
        node.SetSingletonTag(view)
        scene.AddNode(node)
        matrix = np.eye(4)
        matrix[:3, 0], matrix[:3, 1], matrix[:3, 2] = x, y, normal
        node.GetSliceToRAS().DeepCopy(vtk_matrix(matrix))
        node.UpdateMatrices()
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(view)
        composite.SetSingletonTag(view)
        scene.AddNode(composite)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    widgets = {element.get("name"): StandInWidget() for element in ET.parse(UI_FILE).getroot().iter("widget")}
    for name, stand_in in {  # slicer.util's helpers that need Qt or the application
            "loadUI": lambda path: types.SimpleNamespace(setMRMLScene=lambda scene: None),
            "childWidgetVariables": lambda widget: types.SimpleNamespace(**widgets),
            "tempDirectory": lambda name: str(tmp_path / name),
            "confirmYesNoDisplay": lambda text, **kwargs: False}.items():
        monkeypatch.setattr(slicer.util, name, stand_in)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    # the module and its library are imported afresh on this scene; afterwards every one of them (those this
    # import added included) is put back as it was, so that no later test mixes old and new library classes
    earlier = {name: loaded for name, loaded in sys.modules.items() if _is_panel_module(name)}
    for name in earlier:
        del sys.modules[name]
    try:
        module = importlib.import_module("VILAM3Chat")
        logic = module.VILAM3ChatLogic(scene, tempDir=str(tmp_path / "VILAM3Chat"))
        yield SlicerCore(slicer, scene, module, logic, volumes)
    finally:
        for name in [name for name in sys.modules if _is_panel_module(name)]:
            del sys.modules[name]
        sys.modules.update(earlier)


def _is_panel_module(name: str) -> bool:
    """The Slicer module ``VILAM3Chat`` and its library ``VILAM3ChatLib``'s modules."""
    return name == "VILAM3Chat" or name == "VILAM3ChatLib" or name.startswith("VILAM3ChatLib.")
