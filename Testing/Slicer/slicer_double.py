"""A double of the parts of the Slicer Python API that Med3D uses, for testing ``Med3D.py`` under pytest.

What it models, following DESIGN.md's "Facts about Slicer" (checked against Slicer 5.8-5.12 sources):
- Scalar and label-map volume nodes that hold a (K, J, I) numpy array and an IJK-to-RAS matrix (real
  ``vtk.vtkMatrix4x4``); ``slicer.util.arrayFromVolume`` returns a *view*, ``updateVolumeFromArray`` and
  ``addVolumeFromArray`` deep-copy and reject int64 (Slicer does where numpy's int64 is VTK's long long, as on
  Windows; on Linux it maps to long and passes: code must avoid it everywhere); ``addVolumeFromArray`` creates
  the display nodes; ``GetSpacing``/``GetOrigin`` are (I, J, K) and RAS; ``GetIJKToRASDirections`` has columns
  I, J, K; ``loadVolume`` reads a file with SimpleITK and converts its LPS
  geometry to RAS (negating the first two rows), as Slicer's reader does. Parent transforms are recorded but,
  as in Slicer, not included in the arrays or the IJK-to-RAS matrix.
- Segmentation nodes: ``ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode)`` appends one segment
  per label value present in the label map, in increasing order, coloured from the label map's colour table
  and named from it; a value the table does not name is ``Label_<value>``, unless it is the only label: then
  the segment takes the label-map node's name (Slicer 5.8's rule; Slicer 4.11-5.6 did that for a lone label
  even when the table named it). Segments carry tags (``SetTag``/``GetTag`` with ``vtk.reference``),
  ``GetTerminologyEntryTagName()`` is ``"TerminologyEntry"``; ``arrayFromSegmentBinaryLabelmap`` returns the
  mask on a reference volume's grid.
- Markups ROI nodes (centre, size, orientation, world = node coordinates), table nodes holding a real
  ``vtk.vtkTable``, plot series/chart nodes, colour table nodes, the crosshair, a scene with node IDs.
- ``@parameterNodeWrapper`` resolves annotations with ``typing.get_type_hints`` (as Slicer does, so string
  annotations from ``from __future__ import annotations`` must resolve) and stores typed values with defaults;
  the ``Choice`` and ``WithinRange`` validators raise ``ValueError`` on a bad write (defaults included).
  ``connectGui(ui)`` does what Slicer's GUI connectors do when binding, for the widgets whose .ui property
  ``SlicerParameterName`` names a parameter: first all are configured (a QComboBox is emptied and refilled
  with the ``Choice`` values, an error without one; a QSpinBox/QDoubleSpinBox gets its range from
  ``WithinRange``, else the whole int range / -inf..inf, replacing the .ui file's; a qMRMLNodeComboBox its
  node type), then each shows the parameter's value and, for a QComboBox, gets the connector's slot on
  ``currentIndexChanged(int)`` (after any slot connected before binding, as Qt calls slots in connection
  order) that writes the chosen value to the parameter unless the GUI is being updated from the node.
  A write that changes a value modifies the node (as ``SetParameter``), which makes every bound widget
  show its parameter again (Slicer's ``_updateGUIFromParameterNode``, not re-entered); ``disconnectGui``
  removes the combo boxes' slots. Other widgets' signals are not modelled.
- ``slicer.util.confirmOkCancelDisplay``/``pip_install`` record their calls; the answer is settable.
- The Terminologies logic's parsing rules for serialised entries (not its code tables), and ``SampleData``
  with local files standing in for the named samples.
- Qt, minimally: ``qt.QTimer`` (start/stop, no event loop: tests call the slot) and plain stand-ins for the
  widgets of Med3D.ui (:func:`widgets_from_ui` builds one per widget of the .ui file, by class) with the
  properties and calls the module uses; a combo box calls the slot connected to ``currentIndexChanged(int)``
  when its current index changes, as Qt does; ``tryWithErrorDisplay`` records the message and re-raises, as
  Slicer's.

What it does not model: real Qt (layouts, other signals, painting, dialogs), testing mode
(``slicer.app.testingEnabled()``: Slicer's confirmation dialogs then answer yes by themselves), rendering,
closed-surface generation (only a flag), resampling of segments onto a different grid (raises
``NotImplementedError``), transforms other than the parent-transform reference, MRML events/observers,
storage nodes and scene saving.
"""
from __future__ import annotations

import contextlib
import sys
import types
import typing
import unittest
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
    StartCloseEvent, EndCloseEvent, EndImportEvent = 1, 2, 3  # event ids only: no events are sent

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
        if array.ndim == 4:
            raise NotImplementedError("the Slicer double has no vector volumes")
        if array.ndim > 4:
            raise RuntimeError(f"Unsupported numpy array shape: {array.shape}")
        node.array = np.array(array, copy=True).reshape((1,) * (3 - array.ndim) + array.shape)  # 1-2D: one slice
        node.Modified()

    def addVolumeFromArray(self, array: np.ndarray, ijkToRAS: Any = None, name: Optional[str] = None,
                           nodeClassName: Optional[str] = None) -> ScalarVolumeNode:
        node = self._slicer.mrmlScene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode", name or "")
        if ijkToRAS is not None:
            node.SetIJKToRASMatrix(_array_to_matrix(ijkToRAS))
        self.updateVolumeFromArray(node, array)
        node.CreateDefaultDisplayNodes()
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

    def confirmOkCancelDisplay(self, text: str, windowTitle: Optional[str] = None, **kwargs: Any) -> bool:
        self.confirmations.append(text)
        return self.confirmAnswer

    def pip_install(self, requirements: Any) -> None:
        if not isinstance(requirements, (str, list)):  # as Slicer: a string (split like a shell) or a list
            raise ValueError("pip_install requirement input must be string or list")
        self.pipInstalls.append(requirements)

    class MRMLNodeNotFoundException(Exception):
        pass

    def getNode(self, pattern: str) -> Node:
        for node in self._slicer.mrmlScene._nodes.values():
            if node.GetName() == pattern or node.GetID() == pattern:
                return node
        raise self.MRMLNodeNotFoundException(f"could not find nodes in the scene by name or id '{pattern}'")

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

        def addObserver(self, obj: Any, event: Any, method: Any, group: str = "none", priority: float = 0.0) -> None:
            self.observations.append((obj, event, method))

        def removeObservers(self) -> None:
            self.observations = []


class SegmentationsLogic:
    def __init__(self, slicer_module: types.ModuleType) -> None:
        self._slicer = slicer_module

    def ImportLabelmapToSegmentationNode(self, labelmapNode: LabelMapVolumeNode,
                                         segmentationNode: SegmentationNode, insertBeforeSegmentId: str = "") -> bool:
        if insertBeforeSegmentId:
            raise NotImplementedError("the Slicer double only appends imported segments")
        colorNode = None
        display = labelmapNode.GetDisplayNode()
        if display is not None and display.colorNodeID:
            colorNode = self._slicer.mrmlScene.GetNodeByID(display.colorNodeID)
        array = labelmapNode.array
        values = [int(v) for v in np.unique(array) if v != 0]  # increasing, as Slicer's GetAllLabelValues
        for value in values:
            name = colorNode.GetColorName(value) if colorNode else ""
            if not name and len(values) == 1:
                name = labelmapNode.GetName()  # a lone label the colour table does not name
            color = colorNode.colors.get(value, (0.5, 0.5, 0.5, 1.0)) if colorNode else (0.5, 0.5, 0.5, 1.0)
            segment = Segment(name or f"Label_{value}", color[:3], (array == value).astype(np.uint8),
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
    """Validator: the value must be one of ``choices``."""

    def __init__(self, choices: Any) -> None:
        self.choices = choices

    def validate(self, value: Any) -> None:
        if value not in self.choices:
            raise ValueError(f"Value is {value}, but must be in one of the following: {self.choices}")


class WithinRange:
    """Validator: ``minimum <= value <= maximum``."""

    def __init__(self, minimum: Any, maximum: Any) -> None:
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value: Any) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value must be within range [{self.minimum}, {self.maximum}], is {value}")


def _validators(hint: Any) -> List[Any]:
    return [a for a in getattr(hint, "__metadata__", ()) if hasattr(a, "validate")]


def _configure_widget(widget: "Widget", hint: Any) -> None:
    """What creating Slicer's GUI connector does to the widget (before any value is shown)."""
    base = typing.get_args(hint)[0] if hasattr(hint, "__metadata__") else hint  # Annotated[base, ...]
    validators = _validators(hint)
    if widget.className == "QComboBox" and base in (int, float, str, bool):
        choice = next((v for v in validators if isinstance(v, Choice)), None)
        if choice is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        widget.clear()  # the connector replaces the items with the choices
        for item in choice.choices:
            widget.addItem(str(item))
    elif (widget.className, base) in (("QSpinBox", int), ("QDoubleSpinBox", float)):
        bounds = next((v for v in validators if isinstance(v, WithinRange)), None)
        unbounded = (-2 ** 31, 2 ** 31 - 1) if base is int else (float("-inf"), float("inf"))
        widget.minimum, widget.maximum = (bounds.minimum, bounds.maximum) if bounds else unbounded
    elif widget.className == "QLineEdit" and base is str:
        pass
    elif widget.className == "qMRMLNodeComboBox" and isinstance(base, type) and issubclass(base, Node):
        widget.nodeTypes = [base.className]
    else:
        raise RuntimeError(f"Unable to create GUI connector from datatype '{hint}' to widget type "
                           f"'{widget.className}'")


def _show_value(widget: "Widget", hint: Any, value: Any) -> None:
    """The connector's ``write``: the widget shows ``value``."""
    if widget.className == "QComboBox":
        choices = list(next(v for v in _validators(hint) if isinstance(v, Choice)).choices)
        if value not in choices:
            raise ValueError(f"Unable to find value {value} in choices {choices}")
        widget.setCurrentIndex(choices.index(value))
    elif widget.className in ("QSpinBox", "QDoubleSpinBox"):
        widget.value = value
    elif widget.className == "QLineEdit":
        widget.text = value
    else:
        widget.currentNode = value


def parameterNodeWrapper(cls: type) -> type:
    """Typed attributes with defaults over a parameter node; annotations resolved like Slicer does."""
    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: cls.__dict__.get(name, None) for name in hints}

    def validate(key: str, value: Any) -> None:
        for validator in _validators(hints[key]):
            validator.validate(value)

    def __init__(self: Any, parameterNode: Any) -> None:
        self.parameterNode = parameterNode
        self._guis: Dict[int, List[tuple]] = {}  # tag -> (widget, parameter name, connector slot or None)
        self._nextGuiTag = 0  # as Slicer: the first tag is 0
        self._updatingGui = False
        parameterNode.__dict__.setdefault("_observers", [])  # called when a write changes a value (Modified)
        store = parameterNode.__dict__.setdefault("_values", {})
        for key, value in defaults.items():
            if key not in store:
                validate(key, value)  # Slicer writes (and so validates) a missing value's default here
                store[key] = value

    def make_property(key: str) -> property:
        def getter(self: Any) -> Any:
            return self.parameterNode._values[key]

        def setter(self: Any, value: Any) -> None:
            validate(key, value)
            store = self.parameterNode._values
            if key in store and store[key] == value:
                return  # as SetParameter: an unchanged value does not modify the node
            store[key] = value
            for observer in list(self.parameterNode._observers):
                observer()

        return property(getter, setter)

    def update_gui(self: Any) -> None:
        if self._updatingGui:
            return
        self._updatingGui = True
        try:
            for bound in list(self._guis.values()):
                for widget, name, _ in bound:
                    _show_value(widget, hints[name], self.parameterNode._values[name])
        finally:
            self._updatingGui = False

    def connector_slot(self: Any, widget: Any, name: str) -> Any:
        choices = list(next(v for v in _validators(hints[name]) if isinstance(v, Choice)).choices)

        def slot(index: int) -> None:
            if not self._updatingGui:
                setattr(self, name, choices[widget.currentIndex])

        return slot

    def connectGui(self: Any, gui: Any) -> int:
        # A non-widget ``gui`` (what childWidgetVariables gives): its attributes with a SlicerParameterName.
        widgets = [w for w in vars(gui).values() if getattr(w, "parameterName", None)]
        for widget in widgets:
            _configure_widget(widget, hints[widget.parameterName])
        bound = []
        for widget in widgets:
            name = widget.parameterName
            _show_value(widget, hints[name], self.parameterNode._values[name])
            slot = connector_slot(self, widget, name) if widget.className == "QComboBox" else None
            if slot is not None:
                widget.connect("currentIndexChanged(int)", slot)
            bound.append((widget, name, slot))
        tag, self._nextGuiTag = self._nextGuiTag, self._nextGuiTag + 1
        self._guis[tag] = bound
        self.parameterNode._observers.append(lambda: update_gui(self))  # never removed, as in Slicer
        return tag

    def disconnectGui(self: Any, tag: Any) -> None:
        for widget, _, slot in self._guis.pop(tag, []):
            if slot is not None:
                widget.disconnect("currentIndexChanged(int)", slot)

    for name in hints:
        setattr(cls, name, make_property(name))
    cls.__init__ = __init__  # type: ignore[misc]
    cls.connectGui = connectGui  # type: ignore[attr-defined]
    cls.disconnectGui = disconnectGui  # type: ignore[attr-defined]
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


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, requestedDelay: Optional[int] = None, msec: Optional[int] = None) -> None:
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
    """A widget of the .ui file: the properties Med3D.py sets and reads, its class and its SlicerParameterName."""

    def __init__(self, name: str, className: str = "QWidget") -> None:
        self.name = name
        self.className = className
        self.parameterName: Optional[str] = None
        self.text = ""
        self.enabled = True
        self.visible = True
        self.value = 0
        self.connections: Dict[str, List[Any]] = {}  # signal -> slots, in connection order

    def connect(self, signal: str, slot: Any) -> None:
        self.connections.setdefault(signal, []).append(slot)

    def disconnect(self, signal: str, slot: Any) -> None:
        self.connections[signal].remove(slot)

    def hide(self) -> None:
        self.visible = False

    def show(self) -> None:
        self.visible = True

    def blockSignals(self, block: bool) -> bool:
        return False


class ComboBox(Widget):
    """QComboBox: emits ``currentIndexChanged(int)`` to its connected slot whenever the current index changes
    (``clear`` makes it -1, the first ``addItem`` 0), unless signals are blocked."""

    def __init__(self, name: str, className: str = "QComboBox") -> None:
        super().__init__(name, className)
        self.items: List[tuple] = []
        self.currentIndex = -1
        self._blocked = False

    def blockSignals(self, block: bool) -> bool:
        previous, self._blocked = self._blocked, bool(block)
        return previous

    def setCurrentIndex(self, index: int) -> None:
        if index != self.currentIndex:
            self.currentIndex = index
            if not self._blocked:
                for slot in list(self.connections.get("currentIndexChanged(int)", [])):
                    slot(index)

    def clear(self) -> None:
        self.items = []
        self.setCurrentIndex(-1)

    def addItem(self, text: str, data: Any = None) -> None:
        self.items.append((text, data))
        if self.currentIndex < 0:
            self.setCurrentIndex(0)

    def itemData(self, index: int) -> Any:
        return self.items[index][1] if 0 <= index < len(self.items) else None

    def findData(self, data: Any) -> int:
        """The first index whose item data equals ``data``, else -1 (as Qt, with its default exact match)."""
        return next((index for index, (_, itemData) in enumerate(self.items) if itemData == data), -1)

    def setCurrentText(self, text: str) -> None:
        self.setCurrentIndex([t for t, _ in self.items].index(text))

    @property
    def currentText(self) -> str:
        return self.items[self.currentIndex][0] if self.currentIndex >= 0 else ""

    @property
    def currentData(self) -> Any:
        return self.itemData(self.currentIndex)


class CheckableNodeComboBox(Widget):
    def __init__(self, name: str, className: str = "qMRMLCheckableNodeComboBox") -> None:
        super().__init__(name, className)
        self.checked: List[Node] = []

    def checkedNodes(self) -> List[Node]:
        return list(self.checked)


class PathLineEdit(Widget):
    def __init__(self, name: str, className: str = "ctkPathLineEdit") -> None:
        super().__init__(name, className)
        self.currentPath = ""


WIDGET_CLASSES = {"QComboBox": ComboBox, "qMRMLCheckableNodeComboBox": CheckableNodeComboBox,
                  "ctkPathLineEdit": PathLineEdit}


def widgets_from_ui(path: str) -> types.SimpleNamespace:
    """One stand-in per named widget of a .ui file (what ``slicer.util.childWidgetVariables`` gives); combo
    boxes get the items the .ui file lists, spin boxes its minimum, maximum and value."""
    import xml.etree.ElementTree as ET

    ui = types.SimpleNamespace()
    for element in ET.parse(path).iter("widget"):
        className = element.get("class")
        widget = WIDGET_CLASSES.get(className, Widget)(element.get("name"), className)
        for item in element.findall("item"):
            widget.addItem(item.find("property/string").text)
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                widget.parameterName = prop.find("string").text
            elif prop.get("name") in ("minimum", "maximum", "value"):
                for tag, kind in (("number", int), ("double", float)):
                    if prop.find(tag) is not None:
                        setattr(widget, prop.get("name"), kind(prop.find(tag).text))
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
    wrapper.WithinRange = WithinRange
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
