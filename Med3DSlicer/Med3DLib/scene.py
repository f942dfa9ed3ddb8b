"""Slicer scene <-> engine: volumes and ROIs read from nodes (copies; nodes are never changed), results put
into nodes (named, coloured, coded segments; a result table), and results placed next to their input in the
subject hierarchy (the input's study when it came from DICOM). Slicer is imported inside functions."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from med3dcore.errors import Med3DError

from . import geometry, segments

# A ROI remembers the scan it was made or used on under this node-reference role.
ROI_VOLUME_ROLE = "Med3DVolume"


def ijk_to_ras(volumeNode: Any) -> np.ndarray:
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def check_volume_node(volumeNode: Any) -> None:
    """Refuse what Med3D cannot compute on, before anything is exported or installed."""
    if volumeNode is None:
        raise Med3DError("no input volume is selected; choose a CT volume in 'Input volume'")
    transform = volumeNode.GetParentTransformNode()
    if transform is not None:
        raise geometry.parent_transform_error(volumeNode.GetName(), transform.GetName())


def volume_from_node(volumeNode: Any) -> Any:
    """The node's voxels and geometry as an engine ``Volume`` (a copy; the node is not touched)."""
    import slicer

    check_volume_node(volumeNode)
    return geometry.volume_from_node_data(slicer.util.arrayFromVolume(volumeNode), ijk_to_ras(volumeNode))


def roi_from_node(roiNode: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre (RAS), size (mm) and axes (columns, RAS) of a ROI node, in world coordinates."""
    if roiNode is None:
        raise Med3DError("no ROI is selected; choose a ROI around the nodule, or 'Create ROI at the cursor'")
    center, size = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    roiNode.GetCenterWorld(center)
    roiNode.GetSizeWorld(size)
    axes = np.zeros((3, 3))
    for index in range(3):
        axis = [0.0, 0.0, 0.0]
        roiNode.GetAxisWorld(index, axis)
        axes[:, index] = axis
    return np.array(center), np.array(size), axes


def _contains(volumeNode: Any, point_ras: Sequence[float]) -> bool:
    import slicer

    ijk = geometry.ras_to_ijk(ijk_to_ras(volumeNode), [point_ras])[0]
    shape = np.asarray(slicer.util.arrayFromVolume(volumeNode).shape[::-1], dtype=float)
    return bool(np.all(ijk >= -0.5) and np.all(ijk <= shape - 0.5))


def remember_volume(roiNode: Any, volumeNode: Any) -> None:
    roiNode.SetNodeReferenceID(ROI_VOLUME_ROLE, volumeNode.GetID())


def volume_for_roi(roiNode: Any) -> Any:
    """The scan a ROI marks: the one it was made or classified on, else the only volume that contains its
    centre; several candidates are an error (Med3D will not guess)."""
    import slicer

    remembered = roiNode.GetNodeReference(ROI_VOLUME_ROLE)
    if remembered is not None:
        return remembered
    center, _, _ = roi_from_node(roiNode)
    candidates = [v for v in slicer.mrmlScene.GetNodesByClass("vtkMRMLScalarVolumeNode")
                  if not v.IsA("vtkMRMLLabelMapVolumeNode") and _contains(v, center)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise Med3DError(f"ROI '{roiNode.GetName()}' lies outside every volume in the scene; move it onto its "
                         "nodule")
    raise Med3DError(f"ROI '{roiNode.GetName()}' lies inside several volumes "
                     f"({', '.join(v.GetName() for v in candidates)}); Med3D cannot tell which scan it marks: "
                     "select its scan as 'Input volume' and classify the ROI once (Med3D then remembers the "
                     "scan), or draw it with 'Create ROI at the cursor' while its scan is selected")


def create_roi_at_cursor(volumeNode: Any = None, sizeMM: float = 30.0) -> Any:
    """A cube ROI centred on the crosshair (Shift+move sets it) for marking a nodule in ``volumeNode``."""
    import slicer

    crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
    position = [0.0, 0.0, 0.0]
    if crosshair is not None:
        crosshair.GetCrosshairRAS(position)
    roiNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Nodule")
    roiNode.SetCenter(position)
    roiNode.SetSize(sizeMM, sizeMM, sizeMM)
    if volumeNode is not None:
        remember_volume(roiNode, volumeNode)
        place_with(roiNode, volumeNode)
    return roiNode


def place_with(node: Any, reference: Any) -> None:
    """Put ``node`` beside ``reference`` in the subject hierarchy (in its study, when it has one)."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    item, referenceItem = hierarchy.GetItemByDataNode(node), hierarchy.GetItemByDataNode(reference)
    if item and referenceItem:
        hierarchy.SetItemParent(item, hierarchy.GetItemParent(referenceItem))


def segmentation_from_labels(labels: Any, labelInfo: Sequence[Mapping[str, Any]], referenceNode: Any, name: str,
                             segmentationNode: Any = None) -> Any:
    """Import an engine label ``Volume`` as segments named, coloured and coded from ``labelInfo``."""
    import slicer

    from med3dcore.volume import as_label_map

    array, ijkToRAS = geometry.node_data_from_volume(as_label_map(labels))
    specs = segments.segment_specs(labelInfo, segments.labels_present(array))
    if segmentationNode is None:
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    else:
        segmentationNode.GetSegmentation().RemoveAllSegments()
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceNode)
    if not specs:
        logging.warning(f"Med3D: nothing was found in {referenceNode.GetName()}; the segmentation is empty")
        return segmentationNode
    # A temporary label map with a colour table names and colours the segments during the import.
    colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", name + " colors")
    colorNode.SetTypeToUser()
    colorNode.SetNumberOfColors(int(array.max()) + 1)
    for spec in specs:
        colorNode.SetColor(spec.value, spec.name, spec.color[0], spec.color[1], spec.color[2], 1.0)
    labelNode = slicer.util.addVolumeFromArray(array, ijkToRAS, name + " labels", "vtkMRMLLabelMapVolumeNode")
    try:
        labelNode.CreateDefaultDisplayNodes()
        labelNode.GetDisplayNode().SetAndObserveColorNodeID(colorNode.GetID())
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segmentationNode)
    finally:
        slicer.mrmlScene.RemoveNode(labelNode)
        slicer.mrmlScene.RemoveNode(colorNode)
    # One segment per label value, in increasing order; named here, as Slicer may name a lone label's segment
    # after the label map node.
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetNumberOfSegments() != len(specs):
        raise Med3DError(f"importing the result gave {segmentation.GetNumberOfSegments()} segments instead of "
                         f"{len(specs)}; please report this with the Python console's output")
    for index, spec in enumerate(specs):
        segment = segmentation.GetSegment(segmentation.GetNthSegmentID(index))
        segment.SetName(spec.name)
        segment.SetColor(*spec.color)
        segment.SetTag(segment.GetTerminologyEntryTagName(), spec.terminology)
    segmentationNode.CreateClosedSurfaceRepresentation()  # shows it in 3D
    return segmentationNode


# Result-event fields shown by their own rows (or not at all); any other number the engine reports (e.g. a
# nodule's diameter and volume when a mask is given) gets a row of its own.
_SHOWN_FIELDS = {"kind", "stage", "step", "total", "message", "metrics", "probabilities", "predicted",
                 "roi_center_lps", "roi_size_mm", "warnings", "basis", "image_probabilities", "size_from"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _title(key: str) -> str:
    for suffix, unit in (("_mm", " (mm)"), ("_ml", " (mL)"), ("_hu", " (HU)"), ("_lps", " LPS")):
        if key.lower().endswith(suffix):
            return key[: -len(suffix)].replace("_", " ") + unit
    return key.replace("_", " ")


def result_rows(result: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """(property, value) rows of a classification result event: class probabilities, the class, what the
    probabilities come from (and the image's own when a mask's measures took part), the box used (centre in RAS,
    as Slicer shows positions), then every other numeric field of the event."""
    rows = [(f"P({name})", f"{float(p):.4f}") for name, p in dict(result.get("probabilities") or {}).items()]
    rows.append(("class", str(result.get("predicted", ""))))
    if result.get("basis"):  # with a mask, the probability may also use the mask's measures (nodule_measures.py)
        rows.append(("probability from", str(result["basis"])))
        if result["basis"] != "image":
            rows += [(f"P({name}), image alone", f"{float(p):.4f}")
                     for name, p in dict(result.get("image_probabilities") or {}).items()]
    if result.get("size_from"):  # a learnt outline's size is an estimate; a mask's is measured
        rows.append(("size from", "learnt outline (an estimate)" if result["size_from"] == "learnt outline"
                     else str(result["size_from"])))
    if result.get("roi_center_lps") is not None:
        center = geometry.LPS_TO_RAS @ np.asarray(result["roi_center_lps"], dtype=float)
        rows.append(("ROI centre RAS (mm)", ", ".join(f"{v:.1f}" for v in center)))
    if result.get("roi_size_mm") is not None:
        rows.append(("ROI size (mm)", ", ".join(f"{float(v):.1f}" for v in result["roi_size_mm"])))
    for key, value in result.items():
        if key in _SHOWN_FIELDS:
            continue
        if _number(value):
            rows.append((_title(key), f"{float(value):.6g}"))
        elif isinstance(value, (list, tuple)) and value and all(_number(v) for v in value):
            rows.append((_title(key), ", ".join(f"{float(v):.6g}" for v in value)))
    return rows


def fill_result_table(tableNode: Any, result: Mapping[str, Any]) -> None:
    """Two string columns (property, value), one row per :func:`result_rows` entry."""
    import vtk

    rows = result_rows(result)
    table = tableNode.GetTable()
    table.Initialize()
    for title, index in (("property", 0), ("value", 1)):
        column = vtk.vtkStringArray()
        column.SetName(title)
        for row in rows:
            column.InsertNextValue(row[index])
        table.AddColumn(column)
    tableNode.Modified()


def show_table(tableNode: Any) -> None:
    import slicer

    logic = slicer.app.applicationLogic()
    logic.GetSelectionNode().SetActiveTableID(tableNode.GetID())
    logic.PropagateTableSelection()


def probabilities_text(result: Mapping[str, Any]) -> str:
    """The panel's one line: each class's probability, the class, and whether a mask's measures took part."""
    probabilities: Dict[str, float] = {str(k): float(v) for k, v in dict(result.get("probabilities") or {}).items()}
    text = "  ".join(f"{name}: {p:.2f}" for name, p in probabilities.items())
    measured = result.get("basis") not in (None, "image")  # the image alone is the usual case: not repeated
    return f"{text}  ->  {result.get('predicted', '')}" + (f"  (from the {result['basis']})" if measured else "")
