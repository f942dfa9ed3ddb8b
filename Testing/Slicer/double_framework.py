"""Slicer's module framework and application-level logics, for the Slicer double (see ``slicer_double.py`` for
what each part models and from which Slicer source): ScriptedLoadableModule classes, the module widget
representation (setup, enter/exit, reload), the application object and event loop, the Segmentations,
Terminologies and Plots logics, PyTorchUtils and SampleData."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
import unittest
from typing import Any, Dict, List, Optional

import numpy as np

import double_imports
import double_qt
from double_mrml import LabelMapVolumeNode, Node, ScalarVolumeNode, Segment, SegmentationNode


def _slicer() -> Any:
    import slicer  # the double, installed in sys.modules

    return slicer


# ------------------------------------------------------------------------------------------ module framework

class ScriptedLoadableModule:
    def __init__(self, parent: Any) -> None:
        self.parent = parent
        self.moduleName = type(self).__name__


class ScriptedLoadableModuleLogic:
    def __init__(self, parent: Any = None) -> None:
        self.moduleName = type(self).__name__[:-5] if type(self).__name__.endswith("Logic") else type(self).__name__
        self.isSingletonParameterNode = True

    def getParameterNode(self) -> Node:
        scene = _slicer().mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is not None:
            if node.GetAttribute("ModuleName") != self.moduleName:
                node.SetAttribute("ModuleName", self.moduleName)  # removed by a scene close
            return node
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetName(scene.GenerateUniqueName(self.moduleName))
        return scene.AddNode(node)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent: Any = None) -> None:
        self.moduleName = type(self).__name__[:-6] if type(self).__name__.endswith("Widget") else type(self).__name__
        self.developerMode = False
        if not parent:
            self.parent = double_qt.qMRMLWidget()
            self.parent.setLayout(double_qt.QVBoxLayout())
            self.parent.setMRMLScene(_slicer().mrmlScene)
        else:
            self.parent = parent
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
            self.parent.show()

    def resourcePath(self, filename: str) -> str:
        return os.path.join(os.path.dirname(_slicer().util.modulePath(self.moduleName)), "Resources", filename)

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, requestedDelay: Optional[int] = None, msec: Optional[int] = None) -> None:
        pass


class ModuleWidgetRepresentation(double_qt.qMRMLWidget):
    """qSlicerScriptedLoadableModuleWidget: holds the Python widget; ``enter``/``exit`` set ``isEntered``
    before calling the Python methods."""

    def __init__(self, widgetClass: type) -> None:
        super().__init__("", "qSlicerScriptedLoadableModuleWidget")
        self.isEntered = False
        self.setLayout(double_qt.QVBoxLayout())
        self.setMRMLScene(_slicer().mrmlScene)
        self.reload(widgetClass)

    def reload(self, widgetClass: type) -> None:
        self._self = widgetClass(self)
        self._self.setup()

    def self(self) -> Any:
        return self._self

    def enter(self) -> None:
        self.isEntered = True
        self._self.enter()

    def exit(self) -> None:
        self.isEntered = False
        self._self.exit()


class LoadedModule:
    """``slicer.modules.<name>``: the module's path and its lazily created widget representation."""

    def __init__(self, name: str) -> None:
        python_module = importlib.import_module(name)
        self.name = name
        self.path = python_module.__file__
        self.instance = getattr(python_module, name)(types.SimpleNamespace())
        self._representation: Optional[ModuleWidgetRepresentation] = None

    def widgetRepresentation(self) -> ModuleWidgetRepresentation:
        if self._representation is None:
            self._representation = ModuleWidgetRepresentation(
                getattr(sys.modules[self.name], self.name + "Widget"))
        return self._representation


def load_module(name: str = "Med3D") -> LoadedModule:
    """What Slicer does at start-up for a scripted module found on its module paths."""
    module = LoadedModule(name)
    setattr(_slicer().modules, name.lower(), module)
    return module


# ------------------------------------------------------------------------------------------- other logics

class SegmentationsLogic:
    def ImportLabelmapToSegmentationNode(self, labelmapNode: LabelMapVolumeNode,
                                         segmentationNode: SegmentationNode, insertBeforeSegmentId: str = "") -> bool:
        if insertBeforeSegmentId:
            raise NotImplementedError("the Slicer double only appends imported segments")
        colorNode = None
        display = labelmapNode.GetDisplayNode()
        if display is not None and display.colorNodeID:
            colorNode = _slicer().mrmlScene.GetNodeByID(display.colorNodeID)
        array = labelmapNode.array
        values = [int(v) for v in np.unique(array) if v != 0]
        for value in values:
            name = colorNode.GetColorName(value) if colorNode else ""
            if not name and len(values) == 1:
                name = labelmapNode.GetName()
            color = colorNode.colors.get(value, (0.5, 0.5, 0.5, 1.0)) if colorNode else (0.5, 0.5, 0.5, 1.0)
            segmentationNode.GetSegmentation().AddSegment(Segment(
                name or f"Label_{value}", color[:3], (array == value).astype(np.uint8), labelmapNode._ijkToRAS.copy()))
        return True


class TerminologyCode:
    def __init__(self) -> None:
        self.code = ("", "", "")

    def GetCodeValue(self) -> str:
        return self.code[1]


class TerminologyEntry:
    def __init__(self) -> None:
        self.context = ""
        self.category, self.type = TerminologyCode(), TerminologyCode()

    def GetTypeObject(self) -> TerminologyCode:
        return self.type


class TerminologiesLogic:
    """Slicer's parsing rules for a serialised entry (7 '~' parts, context, category and type of 3 '^' parts);
    the double has no code tables."""

    def DeserializeTerminologyEntry(self, serialised: str, entry: TerminologyEntry) -> bool:
        parts = str(serialised).split("~")
        if len(parts) != 7 or not parts[0] or parts[1] == "^^":
            return False
        category, kind = parts[1].split("^"), parts[2].split("^")
        if len(category) != 3 or len(kind) != 3:
            return False
        entry.context = parts[0]
        entry.category.code, entry.type.code = tuple(category), tuple(kind)
        return True


class ApplicationLogic:
    def __init__(self) -> None:
        self.selection = types.SimpleNamespace(activeTableID=None)
        self.selection.SetActiveTableID = lambda nodeId: setattr(self.selection, "activeTableID", nodeId)
        self.tablePropagations = 0

    def GetSelectionNode(self) -> Any:
        return self.selection

    def PropagateTableSelection(self) -> None:
        self.tablePropagations += 1


class PlotsLogic:
    def __init__(self) -> None:
        self.shown: List[Node] = []

    def ShowChartInLayout(self, chartNode: Node) -> None:
        self.shown.append(chartNode)


class App:
    def __init__(self, testing: bool) -> None:
        self._testing = testing
        self._logic = ApplicationLogic()
        self._manager = types.SimpleNamespace(current=None, connect=lambda *a: True, disconnect=lambda *a: True)

    def processEvents(self) -> None:
        double_qt.process_events()

    def testingEnabled(self) -> bool:
        return self._testing

    def commandOptions(self) -> Any:
        return types.SimpleNamespace(testingEnabled=self._testing)

    def applicationLogic(self) -> ApplicationLogic:
        return self._logic

    def moduleManager(self) -> Any:
        return self._manager


def pytorch_utils_module(slicer: types.ModuleType) -> types.ModuleType:
    module = types.ModuleType("PyTorchUtils")
    module.installs = []  # type: ignore[attr-defined]
    module.fails = False  # type: ignore[attr-defined]

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation: bool = False, forceComputationBackend: Any = None,
                         torchVersionRequirement: Any = None, torchvisionVersionRequirement: Any = None) -> Any:
            args = ["install", "torch" + (torchVersionRequirement or ""),
                    "torchvision" + (torchvisionVersionRequirement or "")]
            if askConfirmation and not slicer.app.commandOptions().testingEnabled:
                if not slicer.util.confirmOkCancelDisplay("PyTorch will be downloaded and installed using "
                                                          f"light-the-torch (ltt {' '.join(args)})."):
                    return None
            module.installs.append(args)  # type: ignore[attr-defined]
            if module.fails:  # type: ignore[attr-defined]
                raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "light_the_torch", *args])
            double_imports.make_installed("torch")
            double_imports.make_installed("torchvision")
            import torch
            return torch

    module.PyTorchUtilsLogic = PyTorchUtilsLogic  # type: ignore[attr-defined]
    return module


def sample_data_module(slicer: types.ModuleType, samples: Dict[str, str]) -> types.ModuleType:
    module = types.ModuleType("SampleData")

    def downloadSample(name: str) -> ScalarVolumeNode:
        if name not in samples:
            raise NotImplementedError(f"the Slicer double has no stand-in for sample {name}")
        node = slicer.util.loadVolume(samples[name])
        node.SetName(name)
        return node

    module.downloadSample = downloadSample  # type: ignore[attr-defined]
    return module
