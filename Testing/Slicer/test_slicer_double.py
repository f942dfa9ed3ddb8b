"""The Slicer double itself: the behaviours its docstring says it models (each read from Slicer's sources) hold,
so the module's tests cannot pass on a double that is kinder than Slicer."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from pathlib import Path
from typing import Annotated

import pytest

import double_imports
import double_qt
import double_ui
import slicer_double as double
from double_wrapper import Choice, parameterNodeWrapper

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "Med3DSlicer" / "Resources" / "UI" / "Med3D.ui"


@pytest.fixture()
def installed(request):
    slicer = double.install(getattr(request, "param", "5.10"))
    yield slicer
    double.uninstall()


class TaskParameters:
    task: Annotated[str, Choice(["a", "b", "c"])] = "a"


def wrapper_class(slicer):
    return parameterNodeWrapper(type("Parameters", (TaskParameters,), {"__annotations__": {}}))


def bound(slicer, Parameters):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "p")
    combo = double_qt.QComboBox("combo")
    combo.setProperty("SlicerParameterName", "task")
    ui = double_ui.UiVariables()
    ui.combo = combo
    return Parameters(node), combo, ui


@pytest.mark.parametrize("installed, tag", [("5.8", None), ("5.10", 0)], indirect=["installed"])
def test_connect_gui_returns_none_in_5_8_and_a_tag_in_5_10(installed, tag) -> None:
    slicer = installed
    parameters, combo, ui = bound(slicer, wrapper_class(slicer))
    assert parameters.connectGui(ui) == tag
    assert parameters.connectParametersToGui({"task": combo}) == 1  # the tag, in every version
    assert combo.items == [("a", None), ("b", None), ("c", None)]  # the connector refilled the box


@pytest.mark.parametrize("installed", ["5.8"], indirect=True)
def test_a_5_8_binding_cannot_be_undone_and_its_stale_link_writes_old_values(installed) -> None:
    """What made the task jump back in Slicer 5.8: the first binding stays, and binding again (on enter())
    refills the box, which the stale link reads as the last choice, then the first."""
    slicer = installed
    Parameters = wrapper_class(slicer)
    first, combo, ui = bound(slicer, Parameters)
    first.task = "b"
    first.disconnectGui(first.connectGui(ui))  # disconnectGui(None): nothing happens
    assert len(combo.currentIndexChanged.slots) == 1
    second = Parameters(first.parameterNode)
    writes = []
    first.parameterNode.AddObserver(double.vtk.vtkCommand.ModifiedEvent,
                                    lambda caller, event: writes.append(second.task))
    second.connectGui(ui)
    assert writes[:2] == ["c", "a"]  # the stale link wrote choices[-1], then choices[0]
    assert second.task == "a" and combo.currentText == "a"  # the user's "b" is lost


def test_missing_packages_fail_to_import_and_installs_bring_them_back() -> None:
    import nibabel

    double.install("5.8", missing=double.FRESH_SLICER_MISSING)
    try:
        with pytest.raises(ModuleNotFoundError, match="No module named 'nibabel'"):
            importlib.import_module("nibabel")
        with pytest.raises(ModuleNotFoundError):  # Slicer's find_spec returns None; both mean "missing"
            importlib.util.find_spec("torch")
        with pytest.raises(ModuleNotFoundError, match="nibabel"):
            importlib.import_module("med3dcore.volume_files")  # the engine's reader needs it
        for shipped in ("numpy", "scipy", "PIL", "SimpleITK"):  # Slicer 5.8 ships these
            importlib.import_module(shipped)
        sys.modules["slicer"].util.pip_install(["nibabel>=4.0"])
        assert importlib.import_module("nibabel") is nibabel  # the same module object comes back
    finally:
        double.uninstall()
    assert sys.modules["nibabel"] is nibabel and importlib.import_module("med3dcore.volume_files")


def test_a_broken_package_is_found_but_does_not_import() -> None:
    double.install("5.10", broken={"torch": OSError("[WinError 126] fbgemm.dll not found")})
    try:
        assert importlib.util.find_spec("torch") is not None
        with pytest.raises(OSError, match="fbgemm"):
            importlib.import_module("torch")
    finally:
        double.uninstall()
    assert importlib.import_module("torch").__version__


def test_load_ui_builds_the_real_panel(installed) -> None:
    slicer = installed
    top = slicer.util.loadUI(str(UI))
    ui = slicer.util.childWidgetVariables(top)
    assert ui.taskComboBox.className() == "QComboBox" and ui.taskComboBox.property("SlicerParameterName") == "task"
    assert [text for text, _ in ui.taskComboBox.items][0] == "Lung segmentation"
    assert (ui.epochsSpinBox.minimum, ui.epochsSpinBox.maximum, ui.epochsSpinBox.value) == (1, 10000, 10)
    with pytest.raises(AttributeError):
        ui.noSuchWidget  # noqa: B018 - childWidgetVariables has only the .ui's widgets
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    ui.inputVolumeSelector.setCurrentNode(volume)
    assert ui.inputVolumeSelector.currentNode() is None  # no scene yet: only requested
    top.setMRMLScene(slicer.mrmlScene)  # forwarded by the .ui's connections
    assert ui.inputVolumeSelector.currentNode() is volume
    selectors = [w for w in vars(ui).values() if isinstance(w, double_qt.qMRMLNodeComboBox)]
    assert len(selectors) == 5 and all(w.mrmlScene() is slicer.mrmlScene for w in selectors)  # all connected


def test_process_events_runs_timers_once_due(installed) -> None:
    slicer = installed
    ticks = []
    timer = double_qt.QTimer()
    timer.setInterval(100)
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    timer.start()
    slicer.app.processEvents()
    assert ticks == []  # not due yet
    time.sleep(0.12)
    slicer.app.processEvents()
    assert len(ticks) == 1
    timer.stop()
    time.sleep(0.12)
    slicer.app.processEvents()
    assert len(ticks) == 1


def test_closing_the_scene_sends_events_and_keeps_singletons_reset(installed) -> None:
    slicer = installed
    events = []
    for event in (slicer.mrmlScene.StartCloseEvent, slicer.mrmlScene.EndCloseEvent):
        slicer.mrmlScene.AddObserver(event, lambda caller, e: events.append((e, caller.GetNumberOfNodes())))
    logic = double.ScriptedLoadableModuleLogic()
    logic.moduleName = "Med3D"
    parameterNode = logic.getParameterNode()
    parameterNode.SetParameter("task", "x")
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    slicer.mrmlScene.Clear(0)
    assert events == [(slicer.mrmlScene.StartCloseEvent, 2), (slicer.mrmlScene.EndCloseEvent, 1)]
    assert logic.getParameterNode() is parameterNode and parameterNode.GetParameter("task") is None


def test_path_line_edit_opens_a_file_dialog_unless_filtered_to_folders(installed) -> None:
    edit = double_qt.ctkPathLineEdit("e")
    edit.browse()
    edit.filters = double_qt.PATH_FILTERS["Dirs"] | double_qt.PATH_FILTERS["Readable"]
    edit.browse()
    assert double_qt.QFileDialog.opened == ["open file", "directory"]


def test_a_widget_without_parent_runs_setup(installed) -> None:
    calls = []

    class DemoWidget(double.ScriptedLoadableModuleWidget):
        def setup(self) -> None:
            calls.append(self.layout)

    DemoWidget()
    assert len(calls) == 1 and calls[0] is not None
    DemoWidget(double_qt.qMRMLWidget())  # with a parent, Slicer's representation calls setup()
    assert len(calls) == 1


def test_uninstall_restores_every_hidden_module() -> None:
    import med3dcore.volume

    before = dict(sys.modules)
    double.install("5.8", missing=double.FRESH_SLICER_MISSING)
    double.uninstall()
    assert sys.modules["med3dcore.volume"] is med3dcore.volume
    assert all(sys.modules.get(name) is module for name, module in before.items()
               if name.split(".")[0] not in ("slicer", "qt", "ctk", "PyTorchUtils", "SampleData", "Med3D"))
    assert double_imports.HOOK is None
