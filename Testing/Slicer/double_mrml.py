"""The MRML part of the Slicer double (see ``slicer_double.py`` for what each piece models and from which source):
nodes, a scene with observers and events, segmentations, ROIs, tables, plots and the subject hierarchy."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
import vtk

MODIFIED_EVENT = vtk.vtkCommand.ModifiedEvent


def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_to_matrix(array: Any) -> vtk.vtkMatrix4x4:
    if isinstance(array, vtk.vtkMatrix4x4):
        return array
    matrix = vtk.vtkMatrix4x4()
    values = np.asarray(array, dtype=float).reshape(4, 4)
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, values[r, c])
    return matrix


class Observable:
    """``AddObserver(event, callback, priority)`` -> tag; ``InvokeEvent`` calls callbacks (caller, event)."""

    def __init__(self) -> None:
        self._observers: Dict[int, tuple] = {}
        self._nextTag = 1

    def AddObserver(self, event: Any, callback: Callable, priority: float = 0.0) -> int:
        tag, self._nextTag = self._nextTag, self._nextTag + 1
        self._observers[tag] = (event, callback)
        return tag

    def RemoveObserver(self, tag: int) -> None:
        self._observers.pop(tag, None)

    def observerCount(self, event: Any) -> int:
        return sum(1 for e, _ in self._observers.values() if e == event)

    def InvokeEvent(self, event: Any, data: Any = None) -> None:
        for tag in sorted(self._observers):
            if tag in self._observers and self._observers[tag][0] == event:
                self._observers[tag][1](self, event)


# --------------------------------------------------------------------------------------------------- nodes

class Node(Observable):
    className = "vtkMRMLNode"

    def __init__(self) -> None:
        super().__init__()
        self._id: Optional[str] = None
        self._name = ""
        self._attributes: Dict[str, str] = {}
        self._references: Dict[str, str] = {}
        self.scene: Any = None  # the double_scene.Scene holding the node
        self.modifiedCount = 0
        self._display: Optional[Node] = None
        self._disableModified = 0
        self._pendingModified = False
        self.singletonTag: Optional[str] = None

    def GetID(self) -> Optional[str]:
        return self._id

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = name

    def GetClassName(self) -> str:
        return self.className

    def IsA(self, name: str) -> bool:
        return name == "vtkMRMLNode" or any(getattr(k, "className", None) == name for k in type(self).__mro__)

    def SetAttribute(self, key: str, value: str) -> None:
        self._attributes[key] = value

    def GetAttribute(self, key: str) -> Optional[str]:
        return self._attributes.get(key)

    def SetSingletonTag(self, tag: str) -> None:
        self.singletonTag = tag

    def SetNodeReferenceID(self, role: str, nodeId: Optional[str]) -> None:
        if nodeId:
            self._references[role] = nodeId
        else:
            self._references.pop(role, None)

    def GetNodeReference(self, role: str) -> Optional["Node"]:
        nodeId = self._references.get(role)
        return self.scene.GetNodeByID(nodeId) if nodeId and self.scene else None

    def GetNodeReferenceID(self, role: str) -> Optional[str]:
        return self._references.get(role)

    def StartModify(self) -> int:
        self._disableModified += 1
        return 0

    def EndModify(self, previous: int = 0) -> None:
        self._disableModified = max(0, self._disableModified - 1)
        if self._disableModified == 0 and self._pendingModified:
            self._pendingModified = False
            self.Modified()

    def Modified(self) -> None:
        if self._disableModified:
            self._pendingModified = True
            return
        self.modifiedCount += 1
        self.InvokeEvent(MODIFIED_EVENT)

    def CreateDefaultDisplayNodes(self) -> None:
        if self._display is None:
            self._display = DisplayNode()

    def GetDisplayNode(self) -> Optional["Node"]:
        return self._display

    def Reset(self) -> None:
        """What a scene close does to a kept singleton: back to a new node's content."""
        self._attributes.clear()
        self._references.clear()


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
        self._ijkToRAS = matrix_to_array(matrix)

    def GetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        matrix.DeepCopy(array_to_matrix(self._ijkToRAS))

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

    def SetName(self, name: str) -> None:
        self._name = name  # the segment keeps the ID it was added under, as in Slicer

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
        return next((sid for sid, s in self._segments.items() if s.GetName() == name), "")

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
        values = matrix_to_array(matrix)
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
    """A parameter node: string parameters; a changed value modifies the node (as ``SetParameter``)."""

    className = "vtkMRMLScriptedModuleNode"

    def __init__(self) -> None:
        super().__init__()
        self.parameters: Dict[str, Any] = {}

    def SetParameter(self, name: str, value: Any) -> None:
        if self.parameters.get(name, object()) != value:
            self.parameters[name] = value
            self.Modified()

    def GetParameter(self, name: str) -> Any:
        return self.parameters.get(name)

    def Reset(self) -> None:
        super().Reset()
        self.parameters.clear()


NODE_CLASSES = {cls.className: cls for cls in (
    ScalarVolumeNode, LabelMapVolumeNode, LinearTransformNode, ColorTableNode, SegmentationNode, MarkupsROINode,
    TableNode, PlotSeriesNode, PlotChartNode, CrosshairNode, ScriptedModuleNode)}
# Nodes the subject hierarchy shows (data nodes); colour tables, parameter nodes and the crosshair are not.
DATA_NODE_CLASSES = ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLMarkupsROINode",
                     "vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode",
                     "vtkMRMLLinearTransformNode")
