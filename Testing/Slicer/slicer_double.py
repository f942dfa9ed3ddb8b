"""A double of the parts of 3D Slicer's Python API that Med3D uses, for testing ``Med3D.py`` under pytest.

``install(version="5.8" | "5.10", missing=..., ...)`` puts ``slicer``, ``qt``, ``ctk``, ``vtk``-based nodes,
``PyTorchUtils`` and ``SampleData`` into ``sys.modules``. Each part below names the Slicer behaviour it models
and the source it was read from (Slicer tags v5.8.0, v5.8.1 and v5.10.0 of github.com/Slicer/Slicer unless
said otherwise; CTK at its current master; PyTorchUtils from the SlicerPyTorch extension as stored in its
original repository fepegar/SlicerPyTorch, since github.com/Slicer/SlicerPyTorch could not be fetched here):

Versions and parameter nodes (double_wrapper.py)
- ``connectGui(gui)`` returns None in 5.8.0/5.8.1 and the binding's tag in 5.10: ``_connectGui`` in
  Base/Python/slicer/parameterNodeWrapper/wrapper.py ends ``_connectParametersToGui(self, ...)`` without
  ``return`` in v5.8.x, ``return _connectParametersToGui(...)`` in v5.10.0.
- ``connectParametersToGui(mapping)`` returns the tag in every version (same file, ``return tag``).
- ``disconnectGui(tag)`` stops the tag's connectors (``connector.onChanged(None)``); an unknown tag (None)
  does nothing; the ModifiedEvent observer a binding added stays on the node (removed only from v5.12.0).
- Binding first creates every connector, then each writes the parameter's value and connects its callback
  (``_connectParametersToGui``); a node modification writes every bound widget (``_updateGUIFromParameterNode``,
  not re-entered); a widget change writes the parameter unless the GUI is being updated from the node
  (``_makeGuiToParamCallback``).
- Connectors (guiConnectors.py): a QComboBox with ``Choice`` is emptied and refilled with the choices and reads
  ``choices[currentIndex]`` (an emptied box reads the last choice); spin boxes take their range from
  ``WithinRange`` or the whole int range (-inf..inf for floats); ``QLineEdit`` follows ``textChanged``; a
  ``qMRMLNodeComboBox`` (exact class) gets ``nodeTypes`` and follows ``currentNodeChanged``.
- Parameters are validated when written, defaults included; node parameters are node references, so a node
  removed from the scene reads as None (serializers.py / vtkMRMLNode references).

Widgets and the event loop (double_qt.py, double_ui.py)
- ``slicer.util.loadUI`` builds the widget from the real .ui file (Base/Python/slicer/util.py ``loadUI`` uses
  ``QUiLoader``): every named widget with its properties, dynamic properties (``SlicerParameterName``) and
  items, and the file's signal/slot connections; a class the double does not know is an error.
  ``childWidgetVariables`` gives one attribute per named child (util.py), so a widget the .ui lacks is an
  ``AttributeError``.
- Signals call slots in connection order with as many arguments as the slot accepts (PythonQt's calling
  convention); both ``w.connect("sig(int)", f)`` and ``w.sig.connect(f)``.
- ``qMRMLNodeComboBox`` lists only nodes of its scene, which it gets through the .ui's ``mrmlSceneChanged ->
  setMRMLScene`` connections when the panel calls ``setMRMLScene``; a node set before that is only requested
  and chosen once the scene arrives (Libs/MRML/Widgets/qMRMLNodeComboBox.cxx, ``setCurrentNodeID``).
- ``ctkPathLineEdit.browse()`` opens a file dialog when its ``filters`` include ``Files`` and a directory dialog
  otherwise; the default filters are ``AllEntries | NoDotAndDotDot | Readable`` (CTK
  Libs/Widgets/ctkPathLineEdit.cpp, ``browse`` and ``ctkPathLineEditPrivate``'s constructor).
- ``qt.QTimer`` fires only from ``slicer.app.processEvents()`` once its interval has passed, as Qt's event loop
  runs due timers; ``QTimer.singleShot`` likewise.

Module, widget and logic (double_framework.py; Slicer's ScriptedLoadableModule.py, qSlicerScripted*.cxx)
- ``ScriptedLoadableModuleWidget(parent=None)`` makes its own ``qMRMLWidget`` and calls ``setup()`` at once;
  with a parent, Slicer's module representation calls ``setup()`` (Base/Python/slicer/ScriptedLoadableModule.py,
  Base/QTGUI/qSlicerScriptedLoadableModuleWidget.cxx). ``resourcePath`` is relative to the module file.
- ``slicer.util.getModuleWidget`` creates the representation and its widget; ``selectModule`` exits the shown
  module and enters another: ``isEntered`` is set before the Python ``enter()`` runs and cleared before
  ``exit()`` (Base/QTGUI/qSlicerAbstractModuleWidget.cxx). ``reloadScriptedModule`` calls the old widget's
  ``cleanup()``, re-imports the file and builds a new widget on the same representation (util.py).
- ``getParameterNode()`` returns the module's singleton parameter node; a scene close keeps singletons but
  resets them (vtkMRMLScene::Clear: StartCloseEvent, nodes removed, singletons reset, EndCloseEvent).
- The module's folder is on ``sys.path`` (qSlicerScriptedLoadableModuleFactory.cxx appends it); the tests put
  ``Med3DSlicer`` there.

Dialogs and installs (this file and double_framework.py; Slicer's util.py, PyTorchUtils.py)
- ``confirmOkCancelDisplay`` returns True without asking in testing mode (``_messageDisplay``), else the
  test's answer; ``tryWithErrorDisplay`` shows (records) the error unless in testing mode and re-raises.
- ``pip_install`` accepts a string or a list and installs by running pip, raising ``CalledProcessError`` when
  pip fails (``_executePythonModule`` -> ``logProcessOutput``).
- ``PyTorchUtilsLogic().installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement,
  torchvisionVersionRequirement)`` installs torch *and* torchvision through light-the-torch, raises
  ``CalledProcessError`` on failure and returns the imported ``torch``; None only when the user declines its
  own confirmation (SlicerPyTorch PyTorchUtils/PyTorchUtils.py). Without the PyTorch extension the module does
  not import at all.
- Missing packages (double_imports.py): a fresh Slicer 5.8 ships numpy, scipy, Pillow and SimpleITK but not
  nibabel, scikit-image or torch (SuperBuild/External_python-scipy.cmake, External_python-dicom-requirements
  .cmake); ``missing`` packages fail to import with ``ModuleNotFoundError`` and ``find_spec`` raises it (Slicer's
  returns None: code must take both as "missing"); ``broken`` ones are found but raise while importing (a torch
  whose DLLs do not load). ``pip_install`` / ``installTorch`` make them import.
- ``PythonSlicer`` (first on PATH, python_slicer_double.py) has the same packages as the double's Slicer, as
  the real one runs Slicer's own Python with its site-packages; an install shows in every later child.

Scene (double_mrml.py, double_scene.py)
- Volume nodes hold a (K, J, I) array and an IJK-to-RAS matrix; ``arrayFromVolume`` is a view,
  ``updateVolumeFromArray``/``addVolumeFromArray`` deep-copy and reject int64; ``loadVolume`` converts the file's
  LPS geometry to RAS; parent transforms are referenced, not applied.
- ``ImportLabelmapToSegmentationNode`` adds one segment per label value in increasing order, named and
  coloured from the colour table; an unnamed lone label takes the label-map node's name
  (Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.cxx).
- Subject hierarchy: every data node gets an item under the scene item; ``GetItemParent``/``SetItemParent``
  move it (Libs/MRML/Core/vtkMRMLSubjectHierarchyNode.h).
- Observers: ``AddObserver(event, callback)`` -> tag, ``RemoveObserver(tag)``; ``VTKObservationMixin`` as in
  util.py.

Not modelled: layouts and painting, rendering, closed surfaces (a flag), resampling segments to another grid
(an error), transforms beyond the parent reference, storage nodes, undo, Qt's threads (the runner's Python
threads are real), Windows (the PythonSlicer stand-in is a POSIX shell script), real dialogs.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import os
import subprocess
import sys
import types
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import vtk

import double_imports
import double_qt
import double_ui
from double_mrml import (NODE_CLASSES, Node, ScalarVolumeNode, Segment, SegmentationNode, array_to_matrix,
                         matrix_to_array)
from double_scene import Scene
from double_framework import (App, LoadedModule, PlotsLogic, ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                              ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget, SegmentationsLogic,
                              TerminologiesLogic, TerminologyEntry, pytorch_utils_module, sample_data_module)
from double_framework import load_module  # noqa: F401 - the tests call slicer_double.load_module
from double_wrapper import SLICER_VERSION, Choice, WithinRange, parameterNodeWrapper

# What a fresh Slicer 5.8 lacks of what Med3D needs (it ships numpy, scipy, Pillow, SimpleITK).
FRESH_SLICER_MISSING = ("torch", "torchvision", "nibabel", "skimage")
# pip requirement name -> the import name it makes available
PIP_PROVIDES = {"nibabel": "nibabel", "scikit-image": "skimage", "scipy": "scipy", "pillow": "PIL",
                "light-the-torch": "light_the_torch"}

REPLACED: Dict[str, Any] = {}  # sys.modules entries install() replaced, restored by uninstall()
STATE = types.SimpleNamespace(slicer=None)


# ------------------------------------------------------------------------------------------------ util

class Util(types.ModuleType):
    """``slicer.util``; records confirmations, pip installs and shown errors."""

    def __init__(self, slicer_module: types.ModuleType) -> None:
        super().__init__("slicer.util")
        self._slicer = slicer_module
        self.confirmAnswer = False
        self.confirmations: List[str] = []
        self.pipInstalls: List[Any] = []
        self.pipFails = False
        self.errors: List[str] = []
        self.NodeModify = NodeModify
        self.VTKObservationMixin = VTKObservationMixin

    # volumes and matrices
    def arrayFromVolume(self, node: ScalarVolumeNode) -> np.ndarray:
        return node.array

    def updateVolumeFromArray(self, node: ScalarVolumeNode, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.dtype == np.int64:
            raise RuntimeError("Unsupported numpy array type: long long")
        if array.ndim != 3:
            raise NotImplementedError("the Slicer double models 3D scalar volumes only")
        node.array = np.array(array, copy=True)
        node.Modified()

    def addVolumeFromArray(self, array: np.ndarray, ijkToRAS: Any = None, name: Optional[str] = None,
                           nodeClassName: Optional[str] = None) -> ScalarVolumeNode:
        node = self._slicer.mrmlScene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
        if ijkToRAS is not None:
            node.SetIJKToRASMatrix(array_to_matrix(ijkToRAS))
        self.updateVolumeFromArray(node, array)
        node.CreateDefaultDisplayNodes()
        return node

    @staticmethod
    def arrayFromVTKMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
        return matrix_to_array(matrix)

    @staticmethod
    def vtkMatrixFromArray(array: Any) -> vtk.vtkMatrix4x4:
        return array_to_matrix(array)

    def loadVolume(self, path: str, properties: Optional[dict] = None) -> ScalarVolumeNode:
        import SimpleITK as sitk

        image = sitk.ReadImage(str(path))
        lpsToRAS = np.diag([-1.0, -1.0, 1.0])
        ijkToRAS = np.eye(4)
        ijkToRAS[:3, :3] = lpsToRAS @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
        ijkToRAS[:3, 3] = lpsToRAS @ np.array(image.GetOrigin())
        className = "vtkMRMLLabelMapVolumeNode" if (properties or {}).get("labelmap") else "vtkMRMLScalarVolumeNode"
        array = sitk.GetArrayFromImage(image)
        if array.dtype == np.int64:
            array = array.astype(np.int32)
        name = str(path).replace("\\", "/").split("/")[-1].split(".")[0]
        return self.addVolumeFromArray(array, ijkToRAS, name, className)

    def arrayFromSegmentBinaryLabelmap(self, segmentationNode: SegmentationNode, segmentId: str,
                                       referenceVolumeNode: Optional[ScalarVolumeNode] = None) -> np.ndarray:
        if referenceVolumeNode is None:
            referenceVolumeNode = segmentationNode.GetNodeReference(
                segmentationNode.GetReferenceImageGeometryReferenceRole())
            if referenceVolumeNode is None:
                raise RuntimeError("No reference volume is found in the input segmentationNode, therefore a valid "
                                   "referenceVolumeNode input is required.")
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise RuntimeError("Export of segment failed.")
        if not np.allclose(segment.ijkToRAS, referenceVolumeNode._ijkToRAS) or \
                segment.mask.shape != referenceVolumeNode.array.shape:
            raise NotImplementedError("the Slicer double does not resample segments onto another grid")
        return segment.mask.copy()

    def getNode(self, pattern: str) -> Node:
        for node in self._slicer.mrmlScene._nodes.values():
            if node.GetName() == pattern or node.GetID() == pattern:
                return node
        raise self.MRMLNodeNotFoundException(f"could not find nodes in the scene by name or id '{pattern}'")

    class MRMLNodeNotFoundException(Exception):
        pass

    # dialogs
    def confirmOkCancelDisplay(self, text: str, windowTitle: Optional[str] = None, **kwargs: Any) -> bool:
        self.confirmations.append(text)
        return True if self._slicer.app.testingEnabled() else self.confirmAnswer

    @contextlib.contextmanager
    def tryWithErrorDisplay(self, message: Optional[str] = None, show: bool = True, waitCursor: bool = False):
        try:
            yield
        except Exception as error:
            if show and not self._slicer.app.testingEnabled():
                self.errors.append(f"{message}\n\n{error}" if message is not None else str(error))
            raise

    def errorDisplay(self, text: str, windowTitle: Optional[str] = None, **kwargs: Any) -> None:
        self.errors.append(text)

    # installs
    def pip_install(self, requirements: Any) -> None:
        if isinstance(requirements, str):
            import shlex
            arguments = shlex.split(requirements)
        elif isinstance(requirements, list):
            arguments = list(requirements)
        else:
            raise ValueError("pip_install requirement input must be string or list")
        self.pipInstalls.append(requirements)
        if self.pipFails:
            raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *arguments])
        for argument in arguments:
            name = argument.split("=")[0].split(">")[0].split("<")[0].strip().lower()
            if name in PIP_PROVIDES:
                double_imports.make_installed(PIP_PROVIDES[name])

    # module and UI
    def loadUI(self, path: str) -> Any:
        if not os.path.isfile(path):
            raise RuntimeError(f"Could not load UI file: file not found {path}\n\n")
        return double_ui.load_ui(path)

    @staticmethod
    def childWidgetVariables(widget: Any) -> Any:
        return double_ui.child_widget_variables(widget)

    def modulePath(self, moduleName: str) -> str:
        return getattr(self._slicer.modules, moduleName.lower()).path

    def getModuleWidget(self, moduleName: str) -> Any:
        return getattr(self._slicer.modules, moduleName.lower()).widgetRepresentation().self()

    def selectModule(self, moduleName: str) -> None:
        """Show ``moduleName`` (any other name stands for a module Med3D does not know, e.g. "Data")."""
        manager = self._slicer.app.moduleManager()
        if manager.current == moduleName:
            return
        shown = getattr(self._slicer.modules, str(manager.current).lower(), None)
        if isinstance(shown, LoadedModule):
            shown.widgetRepresentation().exit()
        manager.current = moduleName
        module = getattr(self._slicer.modules, moduleName.lower(), None)
        if isinstance(module, LoadedModule):
            module.widgetRepresentation().enter()

    def reloadScriptedModule(self, moduleName: str) -> Any:
        module = getattr(self._slicer.modules, moduleName.lower())
        representation = module.widgetRepresentation()
        old = representation.self()
        old.cleanup()
        sys.modules.pop(moduleName, None)
        reloaded = importlib.import_module(moduleName)
        representation.reload(getattr(reloaded, moduleName + "Widget"))
        return reloaded

    def mainWindow(self) -> Any:
        return None

    def settingsValue(self, key: str, default: Any = None, converter: Any = None) -> Any:
        return default


class NodeModify:
    def __init__(self, node: Any) -> None:
        self.node = node

    def __enter__(self) -> Any:
        self.was = self.node.StartModify()
        return self.node

    def __exit__(self, *exc: Any) -> None:
        self.node.EndModify(self.was)


class VTKObservationMixin:
    """``slicer.util.VTKObservationMixin``: observations through the objects' own ``AddObserver``."""

    def __init__(self) -> None:
        self._observations: List[tuple] = []  # (object, event, method, tag)

    def addObserver(self, obj: Any, event: Any, method: Any, group: str = "none", priority: float = 0.0) -> None:
        if any(o is obj and e == event and m == method for o, e, m, _ in self._observations):
            return  # "already has observer"
        self._observations.append((obj, event, method, obj.AddObserver(event, method, priority)))

    def removeObserver(self, obj: Any, event: Any, method: Any) -> None:
        for item in list(self._observations):
            if item[0] is obj and item[1] == event and item[2] == method:
                obj.RemoveObserver(item[3])
                self._observations.remove(item)

    def removeObservers(self, method: Any = None) -> None:
        for item in list(self._observations):
            if method is None or item[2] == method:
                item[0].RemoveObserver(item[3])
                self._observations.remove(item)

    @property
    def Observations(self) -> List[tuple]:
        return list(self._observations)


# ------------------------------------------------------------------------------------------------ install

def install(version: str = "5.10", missing: Iterable[str] = (), broken: Optional[Dict[str, BaseException]] = None,
            pytorch_extension: bool = True, samples: Optional[Dict[str, str]] = None,
            testing: bool = False) -> types.ModuleType:
    """Install the double as ``slicer`` (a fresh scene and event loop). ``version``: "5.8" or "5.10";
    ``missing``/``broken``: packages that do not import (see double_imports.py); ``testing``: Slicer's
    ``--testing`` mode (confirmations answer yes by themselves)."""
    if version not in ("5.8", "5.10"):
        raise ValueError("the Slicer double models versions 5.8 and 5.10")
    SLICER_VERSION["value"] = version
    double_qt.LOOP = double_qt.EventLoop()
    double_qt.QFileDialog.opened, double_qt.QFileDialog.answer = [], ""
    slicer = types.ModuleType("slicer")
    slicer.__doc__ = f"Slicer {version} double (Testing/Slicer/slicer_double.py)"
    STATE.slicer = slicer
    slicer.mrmlScene = Scene()
    slicer.util = Util(slicer)
    slicer.app = App(testing)
    for cls in NODE_CLASSES.values():
        setattr(slicer, cls.className, cls)
    slicer.vtkMRMLSubjectHierarchyNode = types.SimpleNamespace(
        GetSubjectHierarchyNode=lambda scene: scene.subjectHierarchy)
    slicer.vtkSegment = Segment
    slicer.vtkSlicerTerminologyEntry = TerminologyEntry
    plots = PlotsLogic()
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: SegmentationsLogic()),
        terminologies=types.SimpleNamespace(logic=lambda: TerminologiesLogic()),
        plots=types.SimpleNamespace(logic=lambda: plots))
    slicer.qMRMLWidget = double_qt.qMRMLWidget
    slicer.qMRMLNodeComboBox = double_qt.qMRMLNodeComboBox

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper, wrapper.Choice, wrapper.WithinRange = parameterNodeWrapper, Choice, WithinRange
    slicer.parameterNodeWrapper = wrapper
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)
    slicer.ScriptedLoadableModule = scripted

    qt = types.ModuleType("qt")
    for name in ("QTimer", "QFileDialog", "QWidget", "QVBoxLayout"):
        setattr(qt, name, getattr(double_qt, name))
    qt.Qt = types.SimpleNamespace(Unchecked=0, Checked=2, WaitCursor=3)
    modules = {"slicer": slicer, "slicer.util": slicer.util, "slicer.parameterNodeWrapper": wrapper,
               "slicer.ScriptedLoadableModule": scripted, "qt": qt, "ctk": types.ModuleType("ctk"),
               "SampleData": sample_data_module(slicer, samples or {})}
    if pytorch_extension:
        modules["PyTorchUtils"] = pytorch_utils_module(slicer)
    for name, module in modules.items():
        REPLACED.setdefault(name, sys.modules.get(name))
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # found, as Slicer's modules are
        sys.modules[name] = module
    missing = set(missing) | (set() if pytorch_extension else {"PyTorchUtils"})
    if not pytorch_extension:
        REPLACED.setdefault("PyTorchUtils", sys.modules.get("PyTorchUtils"))
        sys.modules.pop("PyTorchUtils", None)
    double_imports.install(missing, broken)
    _install_python_slicer()
    return slicer


def _install_python_slicer() -> None:
    """Put a ``PythonSlicer`` first on PATH that has the double's packages (python_slicer_double.py)."""
    import atexit
    import shutil
    import stat
    import tempfile

    if getattr(STATE, "folder", None):  # installed twice without uninstall
        shutil.rmtree(STATE.folder, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix="slicer-double-")
    atexit.register(shutil.rmtree, folder, True)  # also when a test process never uninstalls
    if not getattr(STATE, "folder", None):
        STATE.path = os.environ.get("PATH", "")
    STATE.folder = folder
    STATE.state_file = os.path.join(folder, "state.json")
    launcher = os.path.join(folder, "PythonSlicer")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python_slicer_double.py")
    with open(launcher, "w") as handle:
        handle.write(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    os.chmod(launcher, os.stat(launcher).st_mode | stat.S_IEXEC)
    os.environ["PATH"] = folder + os.pathsep + STATE.path
    os.environ["MED3D_DOUBLE_STATE"] = STATE.state_file
    write_python_slicer_state()


def write_python_slicer_state() -> None:
    import json

    hook = double_imports.HOOK
    state = {"missing": sorted(hook.missing) if hook else [],
             "broken": {k: str(v) for k, v in (hook.broken if hook else {}).items()}}
    with open(STATE.state_file, "w") as handle:
        json.dump(state, handle)


def uninstall() -> None:
    """Restore whatever ``install`` replaced, and forget ``Med3D``."""
    import shutil

    double_imports.remove()
    if getattr(STATE, "folder", None):
        os.environ["PATH"] = STATE.path
        os.environ.pop("MED3D_DOUBLE_STATE", None)
        shutil.rmtree(STATE.folder, ignore_errors=True)
        STATE.folder = None
    for name, module in REPLACED.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
    REPLACED.clear()
    sys.modules.pop("Med3D", None)
    SLICER_VERSION["value"] = "5.10"
