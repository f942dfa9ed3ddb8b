"""A double of the parts of the Slicer Python API that Med3D uses, for testing ``Med3D.py`` under pytest.

What it models, following DESIGN.md's "Facts about Slicer" (checked against Slicer 5.8-5.12 sources):
- Scalar and label-map volume nodes that hold a (K, J, I) numpy array and an IJK-to-RAS matrix (real
  ``vtk.vtkMatrix4x4``); ``slicer.util.arrayFromVolume`` returns a *view*, ``updateVolumeFromArray`` and
  ``addVolumeFromArray`` deep-copy and reject int64; ``GetSpacing``/``GetOrigin`` are (I, J, K) and RAS;
  ``GetIJKToRASDirections`` has columns I, J, K; ``loadVolume`` reads a file with SimpleITK and converts its LPS
  geometry to RAS (negating the first two rows), as Slicer's reader does. Parent transforms are recorded but,
  as in Slicer, not included in the arrays or the IJK-to-RAS matrix.
- Segmentation nodes: ``ImportLabelmapToSegmentationNode`` makes one segment per label value present in the
  label map, named and coloured from the label map's colour table (values missing from the table get
  ``Label_<value>``), ordered by value; segments carry tags (``SetTag``/``GetTag`` with ``vtk.reference``),
  ``GetTerminologyEntryTagName()`` is ``"TerminologyEntry"``; ``arrayFromSegmentBinaryLabelmap`` returns the
  mask on a reference volume's grid.
- Markups ROI nodes (centre, size, orientation, world = node coordinates), table nodes holding a real
  ``vtk.vtkTable``, plot series/chart nodes, colour table nodes, the crosshair, a scene with node IDs.
- ``@parameterNodeWrapper`` resolves annotations with ``typing.get_type_hints`` (as Slicer does, so string
  annotations from ``from __future__ import annotations`` must resolve) and stores typed values with defaults.
- ``slicer.util.confirmOkCancelDisplay``/``pip_install`` record their calls; the answer is settable.
- The Terminologies logic's parsing rules for serialised entries (not its code tables), and ``SampleData``
  with local files standing in for the named samples.
- Qt, minimally: ``qt.QTimer`` (start/stop, no event loop: tests call the slot) and plain stand-ins for the
  widgets of Med3D.ui (:func:`widgets_from_ui` builds one per widget of the .ui file, by class) with the
  properties and calls the module uses; ``tryWithErrorDisplay`` records the message and re-raises, as Slicer's.

What it does not model: real Qt (layouts, signals, painting, dialogs), the parameter node's GUI binding
(``connectGui`` only returns a tag), rendering, closed-surface generation (only a flag),
resampling of segments onto a different grid (raises ``NotImplementedError``), transforms other than the
parent-transform reference, MRML events/observers, storage nodes and scene saving.
"""
from __future__ import annotations

import contextlib
import sys
import types
import typing
from typing import Any, Dict, List, Optional

import numpy as np
import vtk

REAL_INSTALL = {}  # module name -> module that the double replaced (restored by uninstall)


def _matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _array_to_matrix(array: Any) -> vtk.vtkMatrix4x4:
    if isinstance(array, vtk.vtkMatrix4x4):
        return array
    matrix = vtk.vtkMatrix4x4()
    values = np.asarray(array, dtype=float).reshape(4, 4)
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, values[r, c])
    return matrix


# --------------------------------------------------------------------------------------------------- nodes

class Node:
    className = "vtkMRMLNode"

    def __init__(self) -> None:
        self._id: Optional[str] = None
        self._name = ""
        self._attributes: Dict[str, str] = {}
        self._references: Dict[str, str] = {}
        self.scene: Optional["Scene"] = None
        self.modifiedCount = 0
        self._display: Optional[Node] = None

    def GetID(self) -> Optional[str]:
        return self._id

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = name

    def GetClassName(self) -> str:
        return self.className

    def IsA(self, name: str) -> bool:
        return any(getattr(k, "className", None) == name for k in type(self).__mro__)

    def SetAttribute(self, key: str, value: str) -> None:
        self._attributes[key] = value

    def GetAttribute(self, key: str) -> Optional[str]:
        return self._attributes.get(key)

    def SetNodeReferenceID(self, role: str, nodeId: str) -> None:
        self._references[role] = nodeId

    def GetNodeReference(self, role: str) -> Optional["Node"]:
        nodeId = self._references.get(role)
        return self.scene.GetNodeByID(nodeId) if nodeId and self.scene else None

    def Modified(self) -> None:
        self.modifiedCount += 1

    def CreateDefaultDisplayNodes(self) -> None:
        if self._display is None:
            self._display = DisplayNode()

    def GetDisplayNode(self) -> Optional["Node"]:
        return self._display


class DisplayNode(Node):
    className = "vtkMRMLDisplayNode"

    def __init__(self) -> None:
        super().__init__()
        self.colorNodeID: Optional[str] = None

    def SetAndObserveColorNodeID(self, nodeId: str) -> None:
        self.colorNodeID = nodeId


class TransformableNode(Node):
    def __init__(self) -> None:
        super().__init__()
        self._transformID: Optional[str] = None

    def SetAndObserveTransformNodeID(self, nodeId: Optional[str]) -> None:
        self._transformID = nodeId

    def GetParentTransformNode(self) -> Optional[Node]:
        return self.scene.GetNodeByID(self._transformID) if self._transformID and self.scene else None


class LinearTransformNode(TransformableNode):
    className = "vtkMRMLLinearTransformNode"


class ScalarVolumeNode(TransformableNode):
    className = "vtkMRMLScalarVolumeNode"

    def __init__(self) -> None:
        super().__init__()
        self.array: Optional[np.ndarray] = None
        self._ijkToRAS = np.eye(4)

    def GetImageData(self) -> Optional[np.ndarray]:
        return self.array

    def SetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        self._ijkToRAS = _matrix_to_array(matrix)

    def GetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        matrix.DeepCopy(_array_to_matrix(self._ijkToRAS))

    def GetSpacing(self) -> tuple:
        return tuple(float(v) for v in np.linalg.norm(self._ijkToRAS[:3, :3], axis=0))

    def GetOrigin(self) -> tuple:
        return tuple(float(v) for v in self._ijkToRAS[:3, 3])

    def GetRASBounds(self, bounds: List[float]) -> None:
        """Bounds of the voxel corners in RAS (xmin, xmax, ymin, ymax, zmin, zmax)."""
        k, j, i = self.array.shape
        corners = np.array([[x, y, z, 1.0] for x in (-0.5, i - 0.5) for y in (-0.5, j - 0.5) for z in (-0.5, k - 0.5)])
        ras = (self._ijkToRAS @ corners.T).T[:, :3]
        bounds[:] = [float(v) for pair in zip(ras.min(axis=0), ras.max(axis=0)) for v in pair]

    def GetIJKToRASDirections(self, directions: List[List[float]]) -> None:
        unit = self._ijkToRAS[:3, :3] / np.linalg.norm(self._ijkToRAS[:3, :3], axis=0)
        for r in range(3):
            for c in range(3):
                directions[r][c] = float(unit[r, c])


class LabelMapVolumeNode(ScalarVolumeNode):
    className = "vtkMRMLLabelMapVolumeNode"


class ColorTableNode(Node):
    className = "vtkMRMLColorTableNode"

    def __init__(self) -> None:
        super().__init__()
        self.names: Dict[int, str] = {}
        self.colors: Dict[int, tuple] = {}
        self.numberOfColors = 0

    def SetTypeToUser(self) -> None:
        pass

    def SetNumberOfColors(self, count: int) -> None:
        self.numberOfColors = int(count)

    def SetColor(self, index: int, name: str, r: float, g: float, b: float, a: float = 1.0) -> bool:
        if not 0 <= index < self.numberOfColors:
            return False  # as Slicer: an index beyond SetNumberOfColors is refused
        self.names[int(index)] = name
        self.colors[int(index)] = (r, g, b, a)
        return True

    def GetColorName(self, index: int) -> str:
        return self.names.get(int(index), "")


class Segment:
    def __init__(self, name: str, color: tuple, mask: np.ndarray, ijkToRAS: np.ndarray) -> None:
        self._name = name
        self._color = tuple(color)
        self._tags: Dict[str, str] = {}
        self.mask = mask
        self.ijkToRAS = ijkToRAS

    @staticmethod
    def GetTerminologyEntryTagName() -> str:
        return "TerminologyEntry"

    def GetName(self) -> str:
        return self._name

    def SetColor(self, r: float, g: float, b: float) -> None:
        self._color = (r, g, b)

    def GetColor(self) -> tuple:
        return self._color

    def SetTag(self, key: str, value: str) -> None:
        self._tags[key] = str(value)

    def GetTag(self, key: str, value: Any) -> bool:
        if key not in self._tags:
            return False
        value.set(self._tags[key])
        return True


class Segmentation:
    def __init__(self) -> None:
        self._segments: Dict[str, Segment] = {}

    def AddSegment(self, segment: Segment) -> str:
        segmentId = segment.GetName()
        suffix = 1
        while segmentId in self._segments:  # Slicer generates a unique ID from the name
            suffix += 1
            segmentId = f"{segment.GetName()}_{suffix}"
        self._segments[segmentId] = segment
        return segmentId

    def GetNumberOfSegments(self) -> int:
        return len(self._segments)

    def GetNthSegmentID(self, index: int) -> str:
        return list(self._segments)[index]

    def GetSegment(self, segmentId: str) -> Optional[Segment]:
        return self._segments.get(segmentId)

    def GetSegmentIdBySegmentName(self, name: str) -> str:
        for segmentId, segment in self._segments.items():
            if segment.GetName() == name:
                return segmentId
        return ""

    def RemoveAllSegments(self) -> None:
        self._segments.clear()


class SegmentationNode(Node):
    className = "vtkMRMLSegmentationNode"

    def __init__(self) -> None:
        super().__init__()
        self._segmentation = Segmentation()
        self.referenceGeometry: Optional[np.ndarray] = None
        self.hasClosedSurface = False

    @staticmethod
    def GetReferenceImageGeometryReferenceRole() -> str:
        return "referenceImageGeometryRef"

    def GetSegmentation(self) -> Segmentation:
        return self._segmentation

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode: ScalarVolumeNode) -> None:
        self.referenceGeometry = volumeNode._ijkToRAS.copy()
        self.SetNodeReferenceID(self.GetReferenceImageGeometryReferenceRole(), volumeNode.GetID())

    def CreateClosedSurfaceRepresentation(self) -> bool:
        self.hasClosedSurface = True
        return True


class MarkupsROINode(TransformableNode):
    className = "vtkMRMLMarkupsROINode"

    def __init__(self) -> None:
        super().__init__()
        self._center = np.zeros(3)
        self._size = np.zeros(3)
        self._axes = np.eye(3)

    def SetCenter(self, *center: Any) -> None:
        self._center = np.asarray(center[0] if len(center) == 1 else center, dtype=float).reshape(3)

    def SetSize(self, *size: Any) -> None:
        self._size = np.asarray(size[0] if len(size) == 1 else size, dtype=float).reshape(3)

    def SetAndObserveObjectToNodeMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        values = _matrix_to_array(matrix)
        self._axes = values[:3, :3]
        self._center = values[:3, 3]

    def GetCenterWorld(self, out: List[float]) -> None:
        out[:] = [float(v) for v in self._center]

    def GetSizeWorld(self, out: List[float]) -> None:
        out[:] = [float(v) for v in self._size]

    def GetAxisWorld(self, index: int, out: List[float]) -> None:
        out[:] = [float(v) for v in self._axes[:, index]]


class TableNode(Node):
    className = "vtkMRMLTableNode"

    def __init__(self) -> None:
        super().__init__()
        self._table = vtk.vtkTable()

    def GetTable(self) -> vtk.vtkTable:
        return self._table


class PlotSeriesNode(Node):
    className = "vtkMRMLPlotSeriesNode"
    PlotTypeLine, PlotTypeBar, PlotTypeScatter = 0, 1, 2

    def __init__(self) -> None:
        super().__init__()
        self.tableNodeID = self.xColumn = self.yColumn = None
        self.plotType = None

    def SetAndObserveTableNodeID(self, nodeId: str) -> None:
        self.tableNodeID = nodeId

    def SetXColumnName(self, name: str) -> None:
        self.xColumn = name

    def SetYColumnName(self, name: str) -> None:
        self.yColumn = name

    def SetPlotType(self, plotType: int) -> None:
        self.plotType = plotType


class PlotChartNode(Node):
    className = "vtkMRMLPlotChartNode"

    def __init__(self) -> None:
        super().__init__()
        self.seriesIDs: List[str] = []
        self.axisTitles = ["", ""]

    def AddAndObservePlotSeriesNodeID(self, nodeId: str) -> None:
        self.seriesIDs.append(nodeId)

    def SetXAxisTitle(self, title: str) -> None:
        self.axisTitles[0] = title

    def SetYAxisTitle(self, title: str) -> None:
        self.axisTitles[1] = title


class CrosshairNode(Node):
    className = "vtkMRMLCrosshairNode"

    def __init__(self) -> None:
        super().__init__()
        self.position = [0.0, 0.0, 0.0]

    def GetCrosshairRAS(self, out: List[float]) -> None:
        out[:] = list(self.position)


class ScriptedModuleNode(Node):
    className = "vtkMRMLScriptedModuleNode"


NODE_CLASSES = {cls.className: cls for cls in (
    ScalarVolumeNode, LabelMapVolumeNode, LinearTransformNode, ColorTableNode, SegmentationNode, MarkupsROINode,
    TableNode, PlotSeriesNode, PlotChartNode, CrosshairNode, ScriptedModuleNode)}


class Scene:
    StartCloseEvent, EndCloseEvent = 1, 2

    def __init__(self) -> None:
        self._nodes: Dict[str, Node] = {}
        self._counter: Dict[str, int] = {}

    def AddNode(self, node: Node) -> Node:
        count = self._counter.get(node.className, 0) + 1
        self._counter[node.className] = count
        node._id = f"{node.className}{count}"
        node.scene = self
        self._nodes[node._id] = node
        return node

    def AddNewNodeByClass(self, className: str, name: str = "") -> Node:
        if className not in NODE_CLASSES:
            raise NotImplementedError(f"the Slicer double does not model {className}")
        node = NODE_CLASSES[className]()
        node.SetName(name or className.replace("vtkMRML", "").replace("Node", ""))
        return self.AddNode(node)

    def GetNodeByID(self, nodeId: str) -> Optional[Node]:
        return self._nodes.get(nodeId)

    def RemoveNode(self, node: Node) -> None:
        self._nodes.pop(node.GetID(), None)

    def GetFirstNodeByClass(self, className: str) -> Optional[Node]:
        return next((n for n in self._nodes.values() if n.IsA(className)), None)

    def GetNodesByClass(self, className: str) -> List[Node]:
        return [n for n in self._nodes.values() if n.IsA(className)]

    def GetNumberOfNodes(self) -> int:
        return len(self._nodes)

    def Clear(self, removeSingletons: int = 0) -> None:
        self._nodes.clear()


# ------------------------------------------------------------------------------------------------- util

class Util(types.ModuleType):
    """``slicer.util``; also records confirmations and pip installs."""

    def __init__(self, slicer_module: types.ModuleType) -> None:
        super().__init__("slicer.util")
        self._slicer = slicer_module
        self.confirmAnswer = False
        self.confirmations: List[str] = []
        self.pipInstalls: List[str] = []
        self.errors: List[str] = []

    def arrayFromVolume(self, node: ScalarVolumeNode) -> np.ndarray:
        return node.array  # a view, as in Slicer

    def updateVolumeFromArray(self, node: ScalarVolumeNode, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.dtype == np.int64:
            raise RuntimeError("Unsupported numpy array type: long long")
        if array.ndim != 3:
            raise RuntimeError(f"Unsupported numpy array shape: {array.shape}")
        node.array = np.array(array, copy=True)
        node.Modified()

    def addVolumeFromArray(self, array: np.ndarray, ijkToRAS: Any = None, name: Optional[str] = None,
                           nodeClassName: Optional[str] = None) -> ScalarVolumeNode:
        node = self._slicer.mrmlScene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
        if ijkToRAS is not None:
            node.SetIJKToRASMatrix(_array_to_matrix(ijkToRAS))
        self.updateVolumeFromArray(node, array)
        return node

    @staticmethod
    def arrayFromVTKMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
        return _matrix_to_array(matrix)

    @staticmethod
    def vtkMatrixFromArray(array: Any) -> vtk.vtkMatrix4x4:
        return _array_to_matrix(array)

    def loadVolume(self, path: str, properties: Optional[dict] = None) -> ScalarVolumeNode:
        import SimpleITK as sitk

        image = sitk.ReadImage(str(path))
        direction = np.array(image.GetDirection()).reshape(3, 3)
        lpsToRAS = np.diag([-1.0, -1.0, 1.0])
        ijkToRAS = np.eye(4)
        ijkToRAS[:3, :3] = lpsToRAS @ direction @ np.diag(image.GetSpacing())
        ijkToRAS[:3, 3] = lpsToRAS @ np.array(image.GetOrigin())
        className = "vtkMRMLLabelMapVolumeNode" if (properties or {}).get("labelmap") else "vtkMRMLScalarVolumeNode"
        array = sitk.GetArrayFromImage(image)
        if array.dtype == np.int64:
            array = array.astype(np.int32)
        name = str(path).replace("\\", "/").split("/")[-1].split(".")[0]
        return self.addVolumeFromArray(array, ijkToRAS, name, className)

    def arrayFromSegmentBinaryLabelmap(self, segmentationNode: SegmentationNode, segmentId: str,
                                       referenceVolumeNode: ScalarVolumeNode) -> np.ndarray:
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise ValueError(f"no segment {segmentId}")
        if not np.allclose(segment.ijkToRAS, referenceVolumeNode._ijkToRAS) or \
                segment.mask.shape != referenceVolumeNode.array.shape:
            raise NotImplementedError("the Slicer double does not resample segments onto another grid")
        return segment.mask.copy()

    def confirmOkCancelDisplay(self, text: str, windowTitle: Optional[str] = None, **kwargs: Any) -> bool:
        self.confirmations.append(text)
        return self.confirmAnswer

    def pip_install(self, requirements: str) -> None:
        self.pipInstalls.append(requirements)

    def getNode(self, pattern: str) -> Node:
        for node in self._slicer.mrmlScene._nodes.values():
            if node.GetName() == pattern or node.GetID() == pattern:
                return node
        raise RuntimeError(f"could not find node {pattern}")

    @contextlib.contextmanager
    def tryWithErrorDisplay(self, message: Optional[str] = None, show: bool = True, waitCursor: bool = False):
        try:
            yield
        except Exception as error:
            self.errors.append(f"{message} {error}")
            raise

    def errorDisplay(self, text: str, windowTitle: Optional[str] = None, **kwargs: Any) -> None:
        self.errors.append(text)

    class VTKObservationMixin:
        def __init__(self) -> None:
            self.observations: List[tuple] = []

        def addObserver(self, obj: Any, event: Any, method: Any) -> None:
            self.observations.append((obj, event, method))

        def removeObservers(self) -> None:
            self.observations = []


class SegmentationsLogic:
    def __init__(self, slicer_module: types.ModuleType) -> None:
        self._slicer = slicer_module

    def ImportLabelmapToSegmentationNode(self, labelmapNode: LabelMapVolumeNode,
                                         segmentationNode: SegmentationNode, baseSegmentName: str = "") -> bool:
        colorNode = None
        display = labelmapNode.GetDisplayNode()
        if display is not None and display.colorNodeID:
            colorNode = self._slicer.mrmlScene.GetNodeByID(display.colorNodeID)
        array = labelmapNode.array
        for value in np.unique(array):
            if value == 0:
                continue
            name = colorNode.GetColorName(value) if colorNode else ""
            color = colorNode.colors.get(int(value), (0.5, 0.5, 0.5, 1.0)) if colorNode else (0.5, 0.5, 0.5, 1.0)
            segment = Segment(name or f"Label_{int(value)}", color[:3], (array == value).astype(np.uint8),
                              labelmapNode._ijkToRAS.copy())
            segmentationNode.GetSegmentation().AddSegment(segment)
        return True


class TerminologyCode:
    def __init__(self) -> None:
        self.code = ("", "", "")

    def GetCodingSchemeDesignator(self) -> str:
        return self.code[0]

    def GetCodeValue(self) -> str:
        return self.code[1]

    def GetCodeMeaning(self) -> str:
        return self.code[2]


class TerminologyEntry:
    def __init__(self) -> None:
        self.context = ""
        self.category, self.type = TerminologyCode(), TerminologyCode()

    def GetTerminologyContextName(self) -> str:
        return self.context

    def GetCategoryObject(self) -> TerminologyCode:
        return self.category

    def GetTypeObject(self) -> TerminologyCode:
        return self.type


class TerminologiesLogic:
    """Slicer's parsing rules for a serialised entry: 7 '~' parts, a context name, a non-empty category and
    category/type of 3 '^' parts each. (Slicer also looks the codes up in its loaded terminologies; the double
    does not have them.)"""

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


def sample_data_module(slicer_module: types.ModuleType, samples: Dict[str, str]) -> types.ModuleType:
    """``SampleData.downloadSample(name)`` loading a local file in place of each named sample."""
    module = types.ModuleType("SampleData")

    def downloadSample(name: str) -> ScalarVolumeNode:
        if name not in samples:
            raise NotImplementedError(f"the Slicer double has no stand-in for sample {name}")
        node = slicer_module.util.loadVolume(samples[name])
        node.SetName(name)
        return node

    module.downloadSample = downloadSample  # type: ignore[attr-defined]
    return module


# -------------------------------------------------------------------------------------- parameterNodeWrapper

class Choice:
    def __init__(self, choices: List[Any]) -> None:
        self.choices = list(choices)


def parameterNodeWrapper(cls: type) -> type:
    """Typed attributes with defaults over a parameter node; annotations resolved like Slicer does."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {}
    for name, hint in hints.items():
        choices = [a for a in getattr(hint, "__metadata__", ()) if isinstance(a, Choice)]
        default = cls.__dict__.get(name, None)
        if choices and default not in choices[0].choices:
            raise ValueError(f"default {default!r} of {name} is not one of {choices[0].choices}")
        defaults[name] = default

    def __init__(self: Any, parameterNode: Any) -> None:
        self.parameterNode = parameterNode
        store = parameterNode.__dict__.setdefault("_values", {})
        for key, value in defaults.items():
            store.setdefault(key, value)

    def make_property(key: str) -> property:
        def getter(self: Any) -> Any:
            return self.parameterNode._values[key]

        def setter(self: Any, value: Any) -> None:
            self.parameterNode._values[key] = value

        return property(getter, setter)

    for name in hints:
        setattr(cls, name, make_property(name))
    cls.__init__ = __init__  # type: ignore[misc]
    cls.connectGui = lambda self, gui: 1  # type: ignore[attr-defined]
    cls.disconnectGui = lambda self, tag: None  # type: ignore[attr-defined]
    cls.allParameters = dict(hints)  # type: ignore[attr-defined]
    return cls


# -------------------------------------------------------------------------------- ScriptedLoadableModule

class ScriptedLoadableModule:
    def __init__(self, parent: Any) -> None:
        self.parent = parent


class ScriptedLoadableModuleLogic:
    def __init__(self, parent: Any = None) -> None:
        self.moduleName = type(self).__name__.replace("Logic", "")

    def getParameterNode(self) -> ScriptedModuleNode:
        slicer = sys.modules["slicer"]
        for node in slicer.mrmlScene.GetNodesByClass("vtkMRMLScriptedModuleNode"):
            if node.GetAttribute("ModuleName") == self.moduleName:
                return node
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)
        return node


class ScriptedLoadableModuleWidget:
    def __init__(self, parent: Any = None) -> None:
        self.parent = parent


class ScriptedLoadableModuleTest:
    def delayDisplay(self, message: str, msec: int = 0) -> None:
        pass


# ------------------------------------------------------------------------------------------ Qt stand-ins

class Signal:
    def __init__(self) -> None:
        self.slots: List[Any] = []

    def connect(self, slot: Any) -> None:
        self.slots.append(slot)


class QTimer:
    def __init__(self) -> None:
        self.timeout = Signal()
        self.active = False
        self.interval = 0

    def setInterval(self, msec: int) -> None:
        self.interval = msec

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


class Widget:
    """A widget of the .ui file: the properties Med3D.py sets and reads."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.text = ""
        self.enabled = True
        self.visible = True
        self.value = 0
        self.connections: Dict[str, Any] = {}

    def connect(self, signal: str, slot: Any) -> None:
        self.connections[signal] = slot

    def hide(self) -> None:
        self.visible = False

    def show(self) -> None:
        self.visible = True

    def blockSignals(self, block: bool) -> bool:
        return False


class ComboBox(Widget):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.items: List[tuple] = []
        self.currentIndex = -1

    def clear(self) -> None:
        self.items, self.currentIndex = [], -1

    def addItem(self, text: str, data: Any = None) -> None:
        self.items.append((text, data))
        if self.currentIndex < 0:
            self.currentIndex = 0

    def itemData(self, index: int) -> Any:
        return self.items[index][1] if 0 <= index < len(self.items) else None

    def setCurrentText(self, text: str) -> None:
        self.currentIndex = [t for t, _ in self.items].index(text)

    @property
    def currentText(self) -> str:
        return self.items[self.currentIndex][0] if self.currentIndex >= 0 else ""

    @property
    def currentData(self) -> Any:
        return self.itemData(self.currentIndex)


class CheckableNodeComboBox(Widget):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.checked: List[Node] = []

    def checkedNodes(self) -> List[Node]:
        return list(self.checked)


class PathLineEdit(Widget):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.currentPath = ""


WIDGET_CLASSES = {"QComboBox": ComboBox, "qMRMLCheckableNodeComboBox": CheckableNodeComboBox,
                  "ctkPathLineEdit": PathLineEdit}


def widgets_from_ui(path: str) -> types.SimpleNamespace:
    """One stand-in per named widget of a .ui file (what ``slicer.util.childWidgetVariables`` gives); combo
    boxes get the items the .ui file lists."""
    import xml.etree.ElementTree as ET

    ui = types.SimpleNamespace()
    for element in ET.parse(path).iter("widget"):
        widget = WIDGET_CLASSES.get(element.get("class"), Widget)(element.get("name"))
        for item in element.findall("item"):
            widget.addItem(item.find("property/string").text)
        setattr(ui, element.get("name"), widget)
    return ui


class SelectionNode:
    def __init__(self) -> None:
        self.activeTableID: Optional[str] = None

    def SetActiveTableID(self, nodeId: str) -> None:
        self.activeTableID = nodeId


class ApplicationLogic:
    def __init__(self) -> None:
        self.selection = SelectionNode()
        self.tablePropagations = 0

    def GetSelectionNode(self) -> SelectionNode:
        return self.selection

    def PropagateTableSelection(self) -> None:
        self.tablePropagations += 1


class PlotsLogic:
    def __init__(self) -> None:
        self.shown: List[Node] = []

    def ShowChartInLayout(self, chartNode: Node) -> None:
        self.shown.append(chartNode)


# ------------------------------------------------------------------------------------------------ install

def install(samples: Optional[Dict[str, str]] = None) -> types.ModuleType:
    """Put ``slicer``, its submodules, ``qt``, ``ctk``, ``PyTorchUtils`` and ``SampleData`` (``samples``: sample
    name -> local file standing in for it) into ``sys.modules``; a fresh scene."""
    slicer = types.ModuleType("slicer")
    slicer.__doc__ = "Slicer double (Testing/Slicer/slicer_double.py)"
    slicer.mrmlScene = Scene()
    slicer.util = Util(slicer)
    for cls in NODE_CLASSES.values():
        setattr(slicer, cls.className, cls)
    slicer.vtkSegment = Segment
    slicer.vtkSlicerTerminologyEntry = TerminologyEntry
    plots = PlotsLogic()
    slicer.modules = types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: SegmentationsLogic(slicer)),
        terminologies=types.SimpleNamespace(logic=lambda: TerminologiesLogic()),
        plots=types.SimpleNamespace(logic=lambda: plots))
    application = ApplicationLogic()
    slicer.app = types.SimpleNamespace(processEvents=lambda: None, applicationLogic=lambda: application)

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = parameterNodeWrapper
    wrapper.Choice = Choice
    slicer.parameterNodeWrapper = wrapper

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)
    slicer.ScriptedLoadableModule = scripted

    pytorch_utils = types.ModuleType("PyTorchUtils")
    pytorch_utils.installs = []  # type: ignore[attr-defined]

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation: bool = False, forceComputationBackend: Any = None,
                         torchVersionRequirement: Any = None, torchvisionVersionRequirement: Any = None) -> Any:
            pytorch_utils.installs.append(torchVersionRequirement)  # type: ignore[attr-defined]
            import torch
            return torch

    pytorch_utils.PyTorchUtilsLogic = PyTorchUtilsLogic  # type: ignore[attr-defined]

    qt = types.ModuleType("qt")
    qt.QTimer = QTimer  # type: ignore[attr-defined]
    modules = {"slicer": slicer, "slicer.util": slicer.util, "slicer.parameterNodeWrapper": wrapper,
               "slicer.ScriptedLoadableModule": scripted, "qt": qt,
               "ctk": types.ModuleType("ctk"), "PyTorchUtils": pytorch_utils,
               "SampleData": sample_data_module(slicer, samples or {})}
    for name, module in modules.items():
        if name not in REAL_INSTALL:
            REAL_INSTALL[name] = sys.modules.get(name)
        sys.modules[name] = module
    return slicer


def uninstall() -> None:
    """Restore whatever ``install`` replaced (normally nothing), and forget ``Med3D``."""
    for name, module in REAL_INSTALL.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
    REAL_INSTALL.clear()
    sys.modules.pop("Med3D", None)
