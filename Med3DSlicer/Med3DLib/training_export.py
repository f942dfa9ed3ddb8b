"""Fine-tuning from the scene: the checked cases written to a work folder as the engine reads them, and the loss
plot of a running fine-tuning. Only copies are written; the nodes stay as they are. Slicer is imported inside
functions."""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np

from med3dcore.errors import Med3DError

from . import finetune_job, roi, scene


def training_pairs(task: str, nodes: Sequence[Any], inputVolume: Any = None) -> List[Tuple[Any, Any]]:
    """(volume node, case node) per checked case: a segmentation with its reference volume (else the input
    volume); a nodule ROI with the scan it marks (see :func:`scene.volume_for_roi`), whatever the input is."""
    pairs = []
    for node in nodes:
        if task == "nodule":
            pairs.append((scene.volume_for_roi(node), node))
        else:
            reference = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) or inputVolume
            if reference is None:
                raise Med3DError(f"segmentation '{node.GetName()}' has no reference volume; select its volume as "
                                 "'Input volume'")
            pairs.append((reference, node))
    return pairs


def labels_from_segmentation(segmentationNode: Any, volumeNode: Any, image: Any) -> Any:
    """One label map on the volume's grid: segment n (in segment order) becomes label n."""
    import slicer

    segmentation = segmentationNode.GetSegmentation()
    labels = np.zeros(image.shape, dtype=np.uint8)
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        labels[np.asarray(mask) > 0] = index + 1
    if not labels.any():
        raise Med3DError(f"segmentation '{segmentationNode.GetName()}' is empty inside volume "
                         f"'{volumeNode.GetName()}'; paint the structure first")
    return image.with_array(labels)


def export_training_cases(task: str, pairs: Sequence[Tuple[Any, Any]], folder: str) -> str:
    """Write the cases to ``folder``; returns the table the engine reads. ``pairs``: (volume node,
    segmentation node) for lung/liver, (volume node, ROI node) for nodules (class read from the ROI's name)."""
    images = {}
    if task == "nodule":
        nodules = []
        for volumeNode, roiNode in pairs:
            image = images.setdefault(volumeNode.GetID(), scene.volume_from_node(volumeNode))
            center, size, axes = scene.roi_from_node(roiNode)
            centerLPS, sizeMM = roi.roi_to_lps(center, size, axes)
            nodules.append(finetune_job.NoduleCase(image, centerLPS, sizeMM,
                                                   finetune_job.class_from_name(roiNode.GetName()),
                                                   volumeNode.GetName()))
        return finetune_job.export_nodule_cases(nodules, folder)
    cases = []
    for volumeNode, segmentationNode in pairs:
        image = scene.volume_from_node(volumeNode)
        cases.append(finetune_job.SegmentationCase(image, labels_from_segmentation(segmentationNode, volumeNode, image),
                                                   volumeNode.GetName()))
    return finetune_job.export_segmentation_cases(cases, folder)


class LossPlot:
    """A table and a chart of the training loss, updated as progress arrives."""

    def __init__(self) -> None:
        self.tableNode: Any = None
        self.chartNode: Any = None

    def update(self, losses: Sequence[Tuple[int, float]]) -> None:
        import slicer
        import vtk

        if not losses:
            return
        if self.tableNode is None:
            sceneNodes = slicer.mrmlScene
            self.tableNode = sceneNodes.AddNewNodeByClass("vtkMRMLTableNode", "Med3D training loss")
            series = sceneNodes.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "loss")
            series.SetAndObserveTableNodeID(self.tableNode.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName("loss")
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            self.chartNode = sceneNodes.AddNewNodeByClass("vtkMRMLPlotChartNode", "Med3D training")
            self.chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
            self.chartNode.SetXAxisTitle("step")
            self.chartNode.SetYAxisTitle("loss")
        steps, values = vtk.vtkDoubleArray(), vtk.vtkDoubleArray()
        steps.SetName("step")
        values.SetName("loss")
        for step, loss in losses:
            steps.InsertNextValue(step)
            values.InsertNextValue(loss)
        table = self.tableNode.GetTable()
        table.Initialize()
        table.AddColumn(steps)
        table.AddColumn(values)
        self.tableNode.Modified()
