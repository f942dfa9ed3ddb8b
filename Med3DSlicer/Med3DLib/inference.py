"""Starting the engine's work from the scene: inputs checked and exported to a work folder, the ``med3d``
command started in the background (see :mod:`jobs`), and the loader that puts the result into the scene
when the job ends. Slicer is imported inside functions; callers check dependencies before exporting
(``med3dcore.volume_files`` needs nibabel, which a fresh Slicer lacks)."""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, Optional, Sequence, Tuple

from med3dcore.errors import Med3DError

from . import finetune_job, jobs, roi, runner, scene, training_export

SEGMENTATION_TASKS = ("lung", "liver")
# The learnt outline's one segment (SNOMED CT 27925004 "nodule"): yellow, apart from the lung presets' colours.
OUTLINE_LABEL = {"value": 1, "name": "nodule outline (estimated)", "color": [230, 200, 40],
                 "terminology": "SCT^27925004^Nodule"}
# An ROI or mask remembers its last result table and learnt outline under these node-reference roles, so that
# classifying it again updates them instead of adding another table and outline each time.
RESULT_TABLE_ROLE, OUTLINE_ROLE = "Med3DResultTable", "Med3DOutline"


def export_input(kind: str, volumeNode: Any) -> Tuple[str, str]:
    """A new work folder holding a copy of the volume (NRRD: exact geometry); removed again if this fails."""
    from med3dcore.volume_files import write_volume

    folder = jobs.work_folder(kind)
    try:
        image = os.path.join(folder, "input.nrrd")
        write_volume(scene.volume_from_node(volumeNode), image, compress=False)  # temporary: speed over size
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, image


def still_there(nodeId: str, name: str) -> Any:
    """The input node, unless it was deleted while the job ran (then nothing is added to the scene)."""
    import slicer

    node = slicer.mrmlScene.GetNodeByID(nodeId)
    if node is None:
        raise Med3DError(f"the input volume '{name}' was removed from the scene during the run; nothing was added")
    return node


def check_segment_inputs(volumeNode: Any, task: str) -> None:
    if task not in SEGMENTATION_TASKS:
        raise Med3DError(f"task '{task}' is not a segmentation task; use 'lung' or 'liver' (or classifyNodule for "
                         "nodules)")
    scene.check_volume_node(volumeNode)


def start_segment(volumeNode: Any, task: str, model: str, device: str = "auto",
                  segmentationNode: Any = None) -> jobs.InferenceJob:
    """``med3d segment`` in the background; the result becomes a segmentation beside the volume."""
    folder, image = export_input("segment", volumeNode)
    output = os.path.join(folder, "labels.nrrd")
    nodeId, volumeName = volumeNode.GetID(), volumeNode.GetName()

    def load(job: jobs.InferenceJob) -> Any:
        from med3dcore.volume_files import read_volume

        reference = still_there(nodeId, volumeName)
        result = scene.segmentation_from_labels(read_volume(output), job.state.result.get("labels") or [],
                                                reference, f"{volumeName} {task}", segmentationNode)
        scene.place_with(result, reference)
        return result

    command = jobs.segment_command(runner.python_executable(), image, output, task, model, device)
    return jobs.InferenceJob(command, folder, "segmentation", load).start()


def check_classify_inputs(volumeNode: Any, roiNode: Any, maskNode: Any) -> Optional[Tuple[float, ...]]:
    """The ROI as LPS centre and size (None when a mask marks the nodule); an empty ROI or one outside the
    volume is refused here, before anything is installed or exported."""
    import slicer

    scene.check_volume_node(volumeNode)
    if maskNode is not None:
        return None
    center, size, axes = scene.roi_from_node(roiNode)
    shape = slicer.util.arrayFromVolume(volumeNode).shape
    roi.roi_to_voxel_box(center, size, axes, scene.ijk_to_ras(volumeNode), shape)
    centerLPS, sizeMM = roi.roi_to_lps(center, size, axes)
    return tuple(centerLPS) + tuple(sizeMM)


def start_classify(volumeNode: Any, roiNode: Any, model: str, device: str = "auto", tableNode: Any = None,
                   maskNode: Any = None) -> jobs.InferenceJob:
    """``med3d classify`` in the background; the result fills a table node beside the volume (``job.result``
    is {class: probability}, ``job.table`` the table): ``tableNode``, else the one this ROI or mask was last
    classified into, else a new one. A learnt outline replaces the marker's earlier one (``job.outline``)."""
    import slicer

    roiLPS = check_classify_inputs(volumeNode, roiNode, maskNode)
    folder, image = export_input("classify", volumeNode)
    mask = None
    try:
        if maskNode is not None:
            from med3dcore.volume_files import write_volume

            labels = training_export.labels_from_segmentation(maskNode, volumeNode, scene.volume_from_node(volumeNode))
            mask = write_volume(labels, os.path.join(folder, "mask.nrrd"), compress=False)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    marker = maskNode if maskNode is not None else roiNode
    nodeId, volumeName, tableName = volumeNode.GetID(), volumeNode.GetName(), f"{marker.GetName()} Med3D"
    outline = os.path.join(folder, "outline.nrrd") if maskNode is None else None  # written if the model has one

    def load(job: jobs.InferenceJob) -> Dict[str, float]:
        from med3dcore.volume_files import read_volume

        reference = still_there(nodeId, volumeName)
        table = (tableNode or marker.GetNodeReference(RESULT_TABLE_ROLE)
                 or slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", tableName))
        scene.fill_result_table(table, job.state.result)
        scene.place_with(table, reference)
        marker.SetNodeReferenceID(RESULT_TABLE_ROLE, table.GetID())
        previous = marker.GetNodeReference(OUTLINE_ROLE)
        if job.state.result.get("outline"):  # the outline the size and probability came from, to check by eye
            job.outline = scene.segmentation_from_labels(read_volume(outline), [OUTLINE_LABEL], reference,
                                                         f"{marker.GetName()} outline (estimated)", previous)
            scene.place_with(job.outline, reference)
            marker.SetNodeReferenceID(OUTLINE_ROLE, job.outline.GetID())
        elif previous is not None:  # an earlier answer's outline would now show what this answer did not use
            slicer.mrmlScene.RemoveNode(previous)
            marker.SetNodeReferenceID(OUTLINE_ROLE, None)
        if roiNode is not None:
            scene.remember_volume(roiNode, reference)
        job.table = table
        return {str(k): float(v) for k, v in dict(job.state.result.get("probabilities") or {}).items()}

    command = jobs.classify_command(runner.python_executable(), image, model, device, roiLPS,
                                    str(mask) if mask else None, outline)
    return jobs.InferenceJob(command, folder, "nodule classification", load).start()


def start_finetune(task: str, pairs: Sequence[Tuple[Any, Any]], folder: Optional[str], outDir: str, name: str,
                   init: Optional[str], epochs: int, learningRate: float, device: str, resume: bool,
                   extraArgs: Sequence[str] = ()) -> jobs.FinetuneJob:
    """``med3d finetune`` in the background on ``pairs`` exported from the scene, or on ``folder``."""
    if not pairs and not folder:
        raise Med3DError("no training data: choose cases in the scene or a folder of training cases")
    work = jobs.work_folder("finetune") if pairs else None
    try:
        data = training_export.export_training_cases(task, pairs, work) if pairs else str(folder)
        steps = finetune_job.steps_for_epochs(epochs, finetune_job.count_cases(data), task)
        os.makedirs(outDir, exist_ok=True)
        command = finetune_job.finetune_command(runner.python_executable(), task, data, outDir, name, init=init,
                                                steps=steps, lr=learningRate, device=device, resume=resume,
                                                extra=list(extraArgs))
    except BaseException:
        if work:
            shutil.rmtree(work, ignore_errors=True)
        raise
    job = jobs.FinetuneJob(command, os.path.join(outDir, name + ".pt"), work)
    job.lossPlot = training_export.LossPlot()
    job.on_progress = lambda running: running.lossPlot.update(running.state.losses)
    return job.start()
