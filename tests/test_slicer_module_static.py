"""The 3D Slicer module checked without Slicer: it compiles, imports only what Slicer has, leaves HTTP
and JSON to its library, matches its Qt Designer file and the extension's CMake lists; its
worker-thread steps (which touch no scene) run against a recording client with Slicer's modules
replaced by empty stand-ins."""

from __future__ import annotations

import ast
import importlib
import py_compile
import re
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXTENSION = REPO / "slicer_extension"
MODULE_DIR = EXTENSION / "VILAM3Chat"
MODULE_FILE = MODULE_DIR / "VILAM3Chat.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "VILAM3Chat.ui"
SLICER_MODULES = {"slicer", "vtk", "qt", "ctk", "slicer.ScriptedLoadableModule", "slicer.util", "numpy", "vtk.util"}  # numpy ships with Slicer


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), str(MODULE_FILE))


def test_the_module_file_compiles(tmp_path):
    py_compile.compile(str(MODULE_FILE), cfile=str(tmp_path / "VILAM3Chat.pyc"), doraise=True)


def test_imports_are_slicer_the_standard_library_and_its_own_library(tree):
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            assert all(alias.name != "*" for alias in node.names), f"star import from {node.module}"
            imported.append(node.module or "")
    assert imported
    for name in imported:
        ok = (name in SLICER_MODULES or name.split(".")[0] in sys.stdlib_module_names
              or name == "VILAM3ChatLib" or name.startswith("VILAM3ChatLib."))
        assert ok, f"VILAM3Chat.py imports {name}"


def test_http_and_json_stay_in_the_library(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            assert node.id not in {"requests", "urllib", "json", "http"}, f"uses {node.id} (line {node.lineno})"
        if isinstance(node, ast.Attribute):
            assert node.attr not in {"loads", "urlopen"}, f"uses .{node.attr} (line {node.lineno})"


def test_module_widget_logic_and_test_classes_follow_slicers_pattern(tree):
    bases = {node.name: [ast.unparse(base) for base in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert bases["VILAM3Chat"] == ["ScriptedLoadableModule"]
    assert bases["VILAM3ChatWidget"] == ["ScriptedLoadableModuleWidget"]
    assert bases["VILAM3ChatLogic"] == ["ScriptedLoadableModuleLogic", "ChatSceneLogic"]  # shared with web/
    assert bases["VILAM3ChatTest"] == ["ScriptedLoadableModuleTest"]
    text = MODULE_FILE.read_text(encoding="utf-8")
    assert '"VILAM3Chat/serverUrl"' in text and '"MONAILabel/serverUrl"' in text
    assert "VILAM3_TEST_SERVER" in text and "SkipTest" not in text, "the self-test fails, never skips, without a server"


def test_every_slot_shows_errors_as_one_status_line(tree):
    """Slots (methods the widgets call) catch errors and show them; none opens an error dialog."""
    widget = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "VILAM3ChatWidget")
    slots = {"onSend", "onSaveCorrection", "onNewChat", "onServerReady", "onTurnDone"}
    for method in (node for node in widget.body if isinstance(node, ast.FunctionDef) and node.name in slots):
        handlers = [n for n in ast.walk(method) if isinstance(n, ast.ExceptHandler)]
        assert handlers, f"{method.name} catches nothing"
        assert any("showError" in ast.unparse(h) for h in handlers), method.name
    assert "errorDisplay" not in ast.unparse(widget)


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.findtext("class") == "VILAM3Chat"
    return {element.get("name"): element for element in root.iter("widget")}


def text_of(element: ET.Element, prop: str) -> str | None:
    for child in element.findall("property"):
        if child.get("name") == prop:
            return child.findtext("string")
    return None


def test_the_ui_file_has_the_widgets_the_panel_uses(tree):
    widgets = ui_widgets()
    classes = {name: element.get("class") for name, element in widgets.items()}
    expected = {
        "serverUrlLineEdit": "QLineEdit", "volumeSelector": "qMRMLNodeComboBox", "t1cSelector": "qMRMLNodeComboBox",
        "t1Selector": "qMRMLNodeComboBox", "t2Selector": "qMRMLNodeComboBox", "flairSelector": "qMRMLNodeComboBox",
        "transcriptBrowser": "QTextBrowser", "questionLineEdit": "QLineEdit", "sendButton": "QPushButton",
        "stopButton": "QPushButton", "saveCorrectionButton": "QPushButton", "statusLabel": "QLabel",
        "segmentationSelector": "qMRMLNodeComboBox",
    }
    for name, cls in expected.items():
        assert classes.get(name) == cls, name
    assert text_of(widgets["saveCorrectionButton"], "text") == "Save correction as final label"
    brats = next(element for element in widgets.values() if text_of(element, "title") == "BRATS sequences")
    assert brats.get("class") in {"ctkCollapsibleGroupBox", "ctkCollapsibleButton"}
    assert {w.get("name") for w in brats.iter("widget")} >= {"t1cSelector", "t1Selector", "t2Selector", "flairSelector"}

    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}
    used |= {f"{key}Selector" for key in ("t1c", "t1", "t2", "flair")}  # reached with getattr
    assert used - set(widgets) == set(), "the module uses widgets the .ui file does not have"

    root = ET.parse(UI_FILE).getroot()
    scene_receivers = {c.findtext("receiver") for c in root.iter("connection")
                       if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert scene_receivers == {name for name, cls in classes.items() if cls == "qMRMLNodeComboBox"}
    assert 'resourcePath("UI/VILAM3Chat.ui")' in MODULE_FILE.read_text(encoding="utf-8")


def test_the_icon_is_a_128_pixel_png():
    with Image.open(MODULE_DIR / "Resources" / "Icons" / "VILAM3Chat.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


def cmake_set(text: str, name: str) -> str | None:
    match = re.search(rf"set\({name}\s+(\"[^\"]*\"|\S+)\)", text)
    return match.group(1).strip('"') if match else None


def test_the_extension_cmake_lists_the_module_and_its_files():
    top = (EXTENSION / "CMakeLists.txt").read_text(encoding="utf-8")
    assert cmake_set(top, "EXTENSION_NAME") == "VILAM3"
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "DEPENDS"):
        assert cmake_set(top, f"EXTENSION_{field}"), field
    assert "EXTENSION_SCREENSHOTURLS" in top
    assert re.search(r"add_subdirectory\(VILAM3Chat\)", top) and "find_package(Slicer REQUIRED)" in top

    module = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert cmake_set(module, "MODULE_NAME") == "VILAM3Chat" and "slicerMacroBuildScriptedModule(" in module
    listed = set()
    for block in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        body = re.search(rf"set\({block}\s+(.*?)\)", module, re.DOTALL)
        assert body, block
        listed |= {entry.replace("${MODULE_NAME}", "VILAM3Chat") for entry in body.group(1).split()}
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    scripts = {"VILAM3Chat.py"} | {f"VILAM3ChatLib/{p.name}" for p in (MODULE_DIR / "VILAM3ChatLib").glob("*.py")}
    resources = {"Resources/Icons/VILAM3Chat.png", "Resources/UI/VILAM3Chat.ui", "VILAM3ChatLib/terminology.json"}
    assert listed == scripts | resources
    assert all((MODULE_DIR / path).is_file() for path in listed)


# --- the worker-thread steps, with Slicer's modules stood in for ---------------------------------------


@pytest.fixture
def module(monkeypatch):
    """VILAM3Chat.py imported with empty stand-ins for slicer, qt and vtk (enough to define its classes)."""
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, *args: None}))
    slicer = types.ModuleType("slicer")
    slicer.ScriptedLoadableModule = scripted
    for name, stub in {"slicer": slicer, "slicer.ScriptedLoadableModule": scripted,
                       "qt": types.ModuleType("qt"), "vtk": types.ModuleType("vtk")}.items():
        monkeypatch.setitem(sys.modules, name, stub)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    monkeypatch.delitem(sys.modules, "VILAM3Chat", raising=False)
    return importlib.import_module("VILAM3Chat")


class RecordingClient:
    """What the worker steps ask of the client, recorded; answers are canned."""

    server_url = "http://127.0.0.1:1"

    def __init__(self, reject_stream: str | None = None):
        self.calls: list[tuple] = []
        self.reject_stream = reject_stream

    def create_session(self, paths):
        self.calls.append(("create_session", tuple(Path(p).name for p in paths)))
        return f"session-{len(self.calls)}"

    def session_info(self, session_id):
        return {"image": f"/server/sessions/{session_id}/volume.nrrd"}

    def stream(self, study, params, on_event=None, abort=None):
        self.calls.append(("stream", study, params))
        if self.reject_stream:
            from VILAM3ChatLib.client import RequestRejected

            raise RequestRejected(self.reject_stream, 422)
        on_event("token", {"text": "ok", "round": 0})
        return "answer"

    def datastore_images(self):
        return ["ct_abdomen"]

    def upload_image(self, path, image_id):
        self.calls.append(("upload_image", Path(path).name, image_id))
        return image_id

    def save_final_label(self, image_id, label_path, chat_id, extra=None):
        self.calls.append(("save_final_label", image_id, Path(label_path).name, chat_id, extra))
        return {"image": image_id}


def test_a_turn_uploads_what_the_server_lacks_then_streams_with_the_brats_sequences(module, tmp_path):
    from VILAM3ChatLib.client import StudyRef
    from VILAM3ChatLib.worker import BackgroundJobs, Job

    uploads = {}
    for key in ("t1", "flair"):
        uploads[key] = str(tmp_path / f"{key}.nrrd")
        Path(uploads[key]).write_bytes(b"volume")
    studies = {"t1c": StudyRef.image("brain_t1c"), "t1": None, "t2": StudyRef.image("brain_t2"), "flair": None}
    client, events, sessions = RecordingClient(), [], []
    answer = module.VILAM3ChatLogic.runTurn(
        Job(BackgroundJobs(), "turn"), client, studies, uploads, {"prompt": "q", "chat_id": "c"},
        onEvent=lambda *event: events.append(event), onSession=lambda *s: sessions.append(s),
        onSessionsExpired=lambda: None)

    assert answer == "answer" and events == [("token", {"text": "ok", "round": 0})]
    assert [call[0] for call in client.calls] == ["create_session", "create_session", "stream"]
    assert sessions == [("t1", "session-1"), ("flair", "session-2")]
    _, primary, params = client.calls[-1]
    assert primary == StudyRef.image("brain_t1c")
    assert params["sequences"] == {"t1c": "brain_t1c", "t1": "session-1", "t2": "brain_t2", "flair": "session-2"}
    assert not any(Path(path).exists() for path in uploads.values()), "exported volumes are deleted after upload"


def test_an_expired_session_is_forgotten_and_explained(module):
    from VILAM3ChatLib.client import RequestRejected, StudyRef
    from VILAM3ChatLib.worker import BackgroundJobs, Job

    expired = []
    client = RecordingClient(reject_stream="asking VILA-M3: session 'abc' not found (expired?)")
    with pytest.raises(RequestRejected, match="session expired\\); press Send to send it again"):
        module.VILAM3ChatLogic.runTurn(Job(BackgroundJobs(), "turn"), client, {"image": StudyRef.session("abc")}, {},
                                       {"prompt": "q", "chat_id": "c"}, onEvent=None, onSession=None,
                                       onSessionsExpired=lambda: expired.append(True))
    assert expired == [True]


def test_saving_a_correction_adds_a_missing_image_under_a_new_id_and_links_the_chat(module, tmp_path):
    volume, label = tmp_path / "upload.nrrd", tmp_path / "correction.nii.gz"
    volume.write_bytes(b"v")
    label.write_bytes(b"l")
    client = RecordingClient()
    image_id, saved = module.VILAM3ChatLogic.saveCorrection(client, None, "ct_abdomen", str(volume), str(label),
                                                            "chat-7", ["liver", "hepatic tumor"])
    assert image_id.startswith("ct_abdomen-slicer-"), "an upload never replaces the server's own ct_abdomen"
    assert client.calls == [("upload_image", "upload.nrrd", image_id),
                            ("save_final_label", image_id, "correction.nii.gz", "chat-7",
                             {"segments": ["liver", "hepatic tumor"]})]
    assert saved == {"image": image_id} and not volume.exists() and not label.exists()
