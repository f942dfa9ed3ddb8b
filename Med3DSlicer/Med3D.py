"""Med3D: lung and liver segmentation, nodule classification and fine-tuning with Med3D-pretrained 3D-ResNets.

The module is thin: the maths lives in ``Med3DLib`` (tested without Slicer) and the engine in ``med3dcore``
(carried into Slicer by the extension's build). The engine, and with it torch, is imported on first use only.
Console use::

    logic = slicer.modules.med3d.widgetRepresentation().self().logic   # or Med3D.Med3DLogic()
    segmentationNode = logic.segment(volumeNode, task="lung")
    probabilities = logic.classifyNodule(volumeNode, roiNode)
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from typing import Annotated, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from Med3DLib import dependencies, finetune_job, geometry, models, progress_reader, roi, runner, segments
from med3dcore.errors import Med3DError

TASK_CHOICES = list(models.TASK_TITLES.values())
# Disabled while in-process inference runs (Qt events are processed then, so that Cancel can be clicked).
INPUT_WIDGETS = ("inputVolumeSelector", "taskComboBox", "modelComboBox", "addModelButton", "roiSelector",
                 "createRoiButton", "deviceComboBox", "finetuneCollapsibleButton")


class Med3D(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Med3D"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["Med3D developers"]
        self.parent.helpText = (
            "Lung and liver segmentation and pulmonary-nodule classification with 3D-ResNets pretrained the "
            "Med3D way (Chen et al. 2019), and fine-tuning on your own cases in a background process.")
        self.parent.acknowledgementText = (
            "Method: Chen, Ma, Zheng, 'Med3D: Transfer Learning for 3D Medical Image Analysis', 2019. "
            "Checkpoint format compatible with Tencent's MedicalNet release.")


@parameterNodeWrapper
class Med3DParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    task: Annotated[str, Choice(TASK_CHOICES)] = TASK_CHOICES[0]
    roi: vtkMRMLMarkupsROINode
    modelPath: str = ""
    device: str = "auto"
    # Binding a spin box sets its range from these validators (without them: the whole int/float range).
    epochs: Annotated[int, WithinRange(1, 10000)] = 10
    learningRate: Annotated[float, WithinRange(0.00001, 1.0)] = 0.001
    newModelName: str = "my-model"


# ------------------------------------------------------------------------------------------------------- logic

class Med3DLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, callable from the Python console without the panel."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.cancelRequested = False
        self.lastWarnings: List[str] = []
        # Called with (fraction or None, text) during in-process work; the widget updates its progress bar.
        self.progressCallback: Optional[Callable[[Optional[float], str], None]] = None

    def getParameterNode(self) -> Med3DParameterNode:
        return Med3DParameterNode(super().getParameterNode())

    # -------------------------------------------------------------------------------------------- dependencies

    def ensureDependencies(self, ask: bool = True) -> None:
        """Install what is missing, after asking; raises :class:`Med3DError` when it cannot go on."""
        plan = dependencies.plan_install()
        if plan.nothing_to_do:
            return
        if plan.protected_missing:
            raise Med3DError(f"Slicer's own {', '.join(plan.protected_missing)} cannot be imported; this Slicer "
                             "installation is damaged: reinstall Slicer (Med3D never replaces these packages)")
        if plan.torch and not plan.pytorch_extension:
            raise Med3DError("PyTorch is not installed: install the 'PyTorch' extension from the Extensions "
                             "Manager, restart Slicer, and try again (it picks the right build for your GPU)")
        if ask and not slicer.util.confirmOkCancelDisplay(plan.question(), "Med3D: install packages"):
            raise Med3DError("Med3D needs these packages to run: " + ", ".join(
                (["torch"] if plan.torch else []) + plan.pip) + "; install them (Apply again and confirm)")
        if plan.torch:
            import PyTorchUtils

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                           torchVersionRequirement=">=1.13") is None:
                raise Med3DError("the PyTorch extension could not install torch; see its module for details, "
                                 "then try again")
        if plan.pip:
            # One pip call, constrained to the installed numpy/SimpleITK/VTK versions so none is replaced.
            slicer.util.pip_install(dependencies.pip_arguments(plan.pip, tempfile.mkdtemp(prefix="Med3D-pip-")))
        message = dependencies.after_install_message()
        if message:
            raise Med3DError(message)

    # ------------------------------------------------------------------------------------------------- models

    def modelsFolder(self) -> str:
        from med3dcore import weights

        return str(weights.models_dir())

    def availableModels(self, task: Optional[str] = None) -> List[Any]:
        """Known models on disk (``weights.list_models``), optionally only those of one task."""
        from med3dcore import weights

        found = list(weights.list_models())
        return found if task is None else models.models_for_task(found, task)

    def addModelFile(self, path: str) -> str:
        """Copy a bundle into the user's model folder (never replacing one) after checking it loads."""
        self.ensureDependencies()
        from med3dcore import weights

        weights.load_bundle(path)  # a broken or foreign file fails here, with the engine's message
        folder = self.modelsFolder()
        os.makedirs(folder, exist_ok=True)
        target = os.path.join(folder, os.path.basename(path))
        if os.path.abspath(target) == os.path.abspath(path):
            return target
        if os.path.exists(target):
            raise Med3DError(f"a model file named {os.path.basename(path)} is already in {folder}; rename the "
                             "new file first")
        shutil.copyfile(path, target)
        return target

    def resolveModel(self, task: str, model: Optional[str]) -> str:
        from med3dcore import weights

        return models.pick_model(weights.list_models(), task, model, self.modelsFolder())

    # ----------------------------------------------------------------------------------------------- geometry

    def volumeFromNode(self, volumeNode: Any) -> Any:
        """The node's voxels and geometry as an engine ``Volume`` (a copy; the node is not touched)."""
        if volumeNode is None:
            raise Med3DError("no input volume is selected; choose a CT volume in 'Input volume'")
        transform = volumeNode.GetParentTransformNode()
        if transform is not None:
            raise geometry.parent_transform_error(volumeNode.GetName(), transform.GetName())
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return geometry.volume_from_node_data(slicer.util.arrayFromVolume(volumeNode),
                                              slicer.util.arrayFromVTKMatrix(matrix))

    def roiFromNode(self, roiNode: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
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

    # ---------------------------------------------------------------------------------------------- progress

    def _reporter(self, event: Dict[str, Any]) -> None:
        # Called by the engine between steps: report (the callback lets Qt process the Cancel click), then stop
        # here when the user pressed Cancel.
        if self.progressCallback is not None:
            step, total = event.get("step"), event.get("total")
            fraction = step / total if step is not None and total else None
            self.progressCallback(fraction, str(event.get("message") or event.get("stage", "")))
        if self.cancelRequested:
            raise Med3DError("cancelled by the user")

    # ------------------------------------------------------------------------------------------ segmentation

    def segment(self, volumeNode: Any, task: str = "lung", model: Optional[str] = None, device: str = "auto",
                segmentationNode: Any = None) -> Any:
        """Segment ``volumeNode``; returns a segmentation node with named, coloured segments.

        ``model``: a bundle path or a known model's name; None takes the first known model of the task.
        ``segmentationNode``: reuse this node (its segments are replaced); None creates a new one.
        """
        if task not in ("lung", "liver"):
            raise Med3DError(f"task '{task}' is not a segmentation task; use 'lung' or 'liver' (or "
                             "classifyNodule for nodules)")
        volume = self.volumeFromNode(volumeNode)
        self.ensureDependencies()
        modelPath = self.resolveModel(task, model)
        from med3dcore import infer

        self.cancelRequested = False
        result = infer.segment(volume, modelPath, task=task, device=device, reporter=self._reporter)
        self.lastWarnings = list(result.warnings)  # e.g. an MR given to a CT model; the panel shows them
        for warning in result.warnings:
            logging.warning(f"Med3D: {warning}")
        name = f"{volumeNode.GetName()} {task}"
        return self.segmentationFromLabels(result.labels, result.label_info, volumeNode, name, segmentationNode)

    def segmentationFromLabels(self, labels: Any, labelInfo: Sequence[Dict[str, Any]], referenceNode: Any,
                               name: str, segmentationNode: Any = None) -> Any:
        """Import an engine label ``Volume`` as segments named, coloured and coded from ``labelInfo``."""
        from med3dcore.volume import as_label_map

        labels = as_label_map(labels)
        array, ijkToRAS = geometry.node_data_from_volume(labels)
        specs = segments.segment_specs(labelInfo, segments.labels_present(array))
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        else:
            segmentationNode.GetSegmentation().RemoveAllSegments()
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceNode)
        if not specs:
            logging.warning(f"Med3D: the model found nothing in {referenceNode.GetName()}; the segmentation is "
                            "empty")
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
        # The import adds one segment per label value, in increasing order. Names are set here rather than left
        # to the import: Slicer names a lone label's segment after the label map node in some versions.
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

    # ----------------------------------------------------------------------------------------- classification

    def classifyNodule(self, volumeNode: Any, roiNode: Any, model: Optional[str] = None, device: str = "auto",
                       tableNode: Any = None) -> Dict[str, float]:
        """Classify the nodule inside ``roiNode``; returns {class name: probability} and fills a table node."""
        volume = self.volumeFromNode(volumeNode)
        center, size, axes = self.roiFromNode(roiNode)
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        # Refuses an empty ROI or one outside the volume before the model is even loaded.
        roi.roi_to_voxel_box(center, size, axes, slicer.util.arrayFromVTKMatrix(matrix), volume.shape)
        centerLPS, sizeMM = roi.roi_to_lps(center, size, axes)
        self.ensureDependencies()
        modelPath = self.resolveModel("nodule", model)
        from med3dcore import infer

        result = infer.classify(volume, modelPath, roi=(centerLPS, sizeMM), device=device)
        self.lastWarnings = list(getattr(result, "warnings", []))
        probabilities = {str(k): float(v) for k, v in result.probabilities.items()}
        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", f"{roiNode.GetName()} Med3D")
        self.fillResultTable(tableNode, probabilities, str(result.predicted), centerLPS, sizeMM)
        self.lastResultTable = tableNode
        return probabilities

    @staticmethod
    def fillResultTable(tableNode: Any, probabilities: Dict[str, float], predicted: str,
                        centerLPS: Sequence[float], sizeMM: Sequence[float]) -> None:
        """Two columns (property, value): one row per class probability, then class, ROI centre and size.

        The centre is shown in RAS, as everywhere else in Slicer."""
        centerRAS = geometry.LPS_TO_RAS @ np.asarray(centerLPS, dtype=float)
        rows = [(f"P({name})", f"{p:.4f}") for name, p in probabilities.items()]
        rows += [("class", predicted),
                 ("ROI centre RAS (mm)", ", ".join(f"{v:.1f}" for v in centerRAS)),
                 ("ROI size (mm)", ", ".join(f"{v:.1f}" for v in sizeMM))]
        table = tableNode.GetTable()
        table.Initialize()
        for title, index in (("property", 0), ("value", 1)):
            column = vtk.vtkStringArray()
            column.SetName(title)
            for row in rows:
                column.InsertNextValue(row[index])
            table.AddColumn(column)
        tableNode.Modified()

    def createRoiAtCursor(self, sizeMM: float = 30.0) -> Any:
        """A cube ROI centred on the crosshair (Shift+move sets it) for marking a nodule."""
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        position = [0.0, 0.0, 0.0]
        if crosshair is not None:
            crosshair.GetCrosshairRAS(position)
        roiNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Nodule")
        roiNode.SetCenter(position)
        roiNode.SetSize(sizeMM, sizeMM, sizeMM)
        return roiNode

    # ---------------------------------------------------------------------------------------------- finetune

    def exportTrainingCases(self, task: str, pairs: Sequence[Tuple[Any, Any]], folder: str) -> str:
        """Write the chosen scene cases to ``folder``; returns the table the engine reads.

        ``pairs``: (volume node, segmentation node) for lung/liver, (volume node, ROI node) for nodules (the
        class is read from the ROI's name). Only copies are written; the nodes stay as they are.
        """
        if task == "nodule":
            cases, images = [], {}
            for volumeNode, roiNode in pairs:
                image = images.setdefault(volumeNode.GetID(), self.volumeFromNode(volumeNode))
                center, size, axes = self.roiFromNode(roiNode)
                centerLPS, sizeMM = roi.roi_to_lps(center, size, axes)
                cases.append(finetune_job.NoduleCase(image, centerLPS, sizeMM,
                                                     finetune_job.class_from_name(roiNode.GetName()),
                                                     volumeNode.GetName()))
            return finetune_job.export_nodule_cases(cases, folder)
        cases = []
        for volumeNode, segmentationNode in pairs:
            image = self.volumeFromNode(volumeNode)
            cases.append(finetune_job.SegmentationCase(image, self.labelsFromSegmentation(segmentationNode,
                                                                                          volumeNode, image),
                                                       volumeNode.GetName()))
        return finetune_job.export_segmentation_cases(cases, folder)

    def labelsFromSegmentation(self, segmentationNode: Any, volumeNode: Any, image: Any) -> Any:
        """One label map on the volume's grid: segment n (in segment order) becomes label n."""
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

    def finetune(self, task: str, pairs: Sequence[Tuple[Any, Any]] = (), folder: Optional[str] = None,
                 startModel: Optional[str] = None, epochs: int = 10, learningRate: float = 0.001,
                 newModelName: str = "my-model", device: str = "auto", resume: bool = False,
                 extraArgs: Sequence[str] = ()) -> "FinetuneRun":
        """Start a background fine-tuning run; returns a :class:`FinetuneRun` whose ``poll()`` the caller
        drives (the panel with a timer; the console with ``run.wait()``).

        Training data: ``pairs`` from the scene (see :meth:`exportTrainingCases`) or ``folder`` (a table or
        dataset folder the engine reads). The new model is ``<models folder>/<newModelName>.pt``; ``resume``
        continues an interrupted run of that name.
        """
        if task not in models.TASKS:
            raise Med3DError(f"unknown task '{task}'; choose one of: {', '.join(models.TASKS)}")
        self.ensureDependencies()
        outDir = self.modelsFolder()
        name = finetune_job.model_name(outDir, newModelName, resume)
        workFolder = tempfile.mkdtemp(prefix="Med3D-finetune-")
        if pairs:
            data = self.exportTrainingCases(task, pairs, workFolder)
        elif folder:
            data = folder
        else:
            raise Med3DError("no training data: choose cases in the scene or a folder of training cases")
        steps = finetune_job.steps_for_epochs(epochs, finetune_job.count_cases(data), task)
        init = self.resolveStartModel(startModel)
        os.makedirs(outDir, exist_ok=True)
        python = shutil.which("PythonSlicer") or sys.executable
        command = finetune_job.finetune_command(python, task, data, outDir, name, init=init, steps=steps,
                                                lr=learningRate, device=device, resume=resume,
                                                extra=list(extraArgs))
        return FinetuneRun(command, os.path.join(outDir, name + ".pt"), workFolder).start()

    def resolveStartModel(self, startModel: Optional[str]) -> Optional[str]:
        """None (train from scratch), a file (Med3D bundle or MedicalNet .pth) or a known model's name."""
        if not startModel:
            return None
        if os.path.isfile(startModel):
            return startModel
        from med3dcore import weights

        for info in weights.list_models():
            if info.name == startModel and not info.error:
                return str(info.path)
        raise Med3DError(f"starting model '{startModel}' is neither a file nor a model in {self.modelsFolder()}")


class FinetuneRun:
    """One background ``med3d finetune`` process and what it reported; also draws the loss plot."""

    def __init__(self, command: List[str], output: str, workFolder: str) -> None:
        self.command = command
        self.output = output
        self.workFolder = workFolder
        self.process = runner.BackgroundProcess(command, env=runner.engine_environment(), cwd=workFolder)
        self.state = progress_reader.ProgressState()
        self.plotChartNode: Any = None
        self._lossTable: Any = None

    def start(self) -> "FinetuneRun":
        self.process.start()
        return self

    def poll(self) -> bool:
        """Drain new progress lines (main thread); returns True while the run goes on."""
        lines = self.process.lines()
        for line in lines:
            self.state.feed(line)
        if lines and self.state.losses:
            self.updateLossPlot()
        finished = self.process.finished()
        if finished:  # lines written just before the exit
            for line in self.process.lines():
                self.state.feed(line)
        return not finished

    def wait(self, timeout: Optional[float] = None) -> int:
        code = self.process.wait(timeout)
        self.poll()
        return code

    def cancel(self) -> None:
        self.process.cancel()

    def failure(self) -> Optional[str]:
        """None on success or cancel; else the engine's error event or the end of its stderr."""
        if self.state.error and not self.process.cancelled:
            return self.state.error
        return self.process.failure_message("fine-tuning")

    def updateLossPlot(self) -> None:
        if self._lossTable is None:
            scene = slicer.mrmlScene
            self._lossTable = scene.AddNewNodeByClass("vtkMRMLTableNode", "Med3D training loss")
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "loss")
            series.SetAndObserveTableNodeID(self._lossTable.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName("loss")
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            self.plotChartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "Med3D training")
            self.plotChartNode.AddAndObservePlotSeriesNodeID(series.GetID())
            self.plotChartNode.SetXAxisTitle("step")
            self.plotChartNode.SetYAxisTitle("loss")
        steps = vtk.vtkDoubleArray()
        steps.SetName("step")
        losses = vtk.vtkDoubleArray()
        losses.SetName("loss")
        for step, loss in self.state.losses:
            steps.InsertNextValue(step)
            losses.InsertNextValue(loss)
        table = self._lossTable.GetTable()
        table.Initialize()
        table.AddColumn(steps)
        table.AddColumn(losses)
        self._lossTable.Modified()


# ------------------------------------------------------------------------------------------------------ widget

class Med3DWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds widgets to the parameter node and forwards actions to :class:`Med3DLogic`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[Med3DLogic] = None
        self._parameterNode: Optional[Med3DParameterNode] = None
        self._parameterNodeGuiTag = None
        self._binding = False
        self._busy = False
        self._run: Optional[FinetuneRun] = None
        self._lastRunCommand: Optional[Dict[str, Any]] = None
        self._chartShown = False
        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.timeout.connect(self.onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/Med3D.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = Med3DLogic()
        self.logic.progressCallback = self.onProgress

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.createRoiButton.connect("clicked(bool)", self.onCreateRoi)
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.updateModelList)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChosen)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.progressBar.hide()
        self.ui.finetuneProgressBar.hide()
        self.ui.resumeButton.enabled = False
        self.fillDeviceList()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._run is not None and self._run.process.running:
            self._run.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        if self._busy:  # closed during in-process inference: stop it at its next step (nothing is added)
            self.logic.cancelRequested = True
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        if self.parent.isEntered:  # a loaded scene brings its own parameters: show its model and device too
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if volume:
                self._parameterNode.inputVolume = volume

    def setParameterNode(self, parameterNode: Optional[Med3DParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # Binding empties and refills the task list, passing through other tasks: the model list follows
            # only once it is done, to show the parameter node's model (and device) rather than a first one.
            self._binding = True
            try:
                self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            finally:
                self._binding = False
            self.updateModelList()
            self.showDevice()

    def task(self) -> str:
        return models.task_from_title(self.ui.taskComboBox.currentText)

    # -------------------------------------------------------------------------------------- lists in the panel

    def fillDeviceList(self) -> None:
        self.ui.deviceComboBox.clear()
        self.ui.deviceComboBox.addItem("auto", "auto")
        self.ui.deviceComboBox.addItem("CPU", "cpu")
        text = "GPU: status unknown until PyTorch is installed (Apply installs it)"
        if dependencies.is_installed("torch"):
            import torch

            if torch.cuda.is_available():
                self.ui.deviceComboBox.addItem(f"GPU ({torch.cuda.get_device_name(0)})", "cuda")
                text = f"GPU: {torch.cuda.get_device_name(0)}"
            elif torch.version.cuda is None:
                text = "No GPU use possible: this PyTorch is a CPU-only build (reinstall it from the PyTorch module)"
            else:
                text = "No GPU visible to PyTorch (no NVIDIA GPU, or the driver is missing or too old)"
        self.ui.deviceInfoLabel.text = text

    def onDeviceChosen(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    def showDevice(self) -> None:
        """Show the parameter node's device; one this computer lacks (a scene saved elsewhere) becomes auto."""
        combo = self.ui.deviceComboBox
        combo.setCurrentIndex(max(combo.findData(self._parameterNode.device), 0))
        self.onDeviceChosen(combo.currentIndex)

    def updateModelList(self, *unused) -> None:
        if self._binding or self.ui.taskComboBox.currentIndex < 0:
            return  # binding the parameter node empties and refills the task list; called again once bound
        if self._parameterNode:
            # What the task's GUI connector writes, but written first: in Slicer this slot runs before the
            # connector's, and the model written below would make the binding show the old task again.
            self._parameterNode.task = self.ui.taskComboBox.currentText
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        task = self.task()
        found: List[Any] = []
        allModels: List[Any] = []
        folder = "the Med3D model folder"
        if dependencies.is_installed("torch"):
            try:
                folder = self.logic.modelsFolder()
                allModels = [info for info in self.logic.availableModels() if not info.error]
                found = models.models_for_task(allModels, task)
            except Med3DError as error:
                logging.warning(f"Med3D: {error}")
        for info in found:
            combo.addItem(str(info.name), str(info.path))
        if found and self._parameterNode:  # keep the user's model, kept in the parameter node, if listed
            combo.setCurrentIndex(max(combo.findData(self._parameterNode.modelPath), 0))
        if not dependencies.is_installed("torch"):
            self.ui.modelInfoLabel.text = ("PyTorch is not installed yet: Apply installs it (after asking), then "
                                           "the models on disk are listed here.")
        else:
            self.ui.modelInfoLabel.text = "" if found else models.no_model_text(task, folder)
        combo.blockSignals(False)
        self.ui.startModelComboBox.clear()
        self.ui.startModelComboBox.addItem("(from scratch)", "")
        for info in allModels:  # any bundle's encoder (or a MedicalNet file) can start a fine-tuning run
            self.ui.startModelComboBox.addItem(str(info.name), str(info.path))
        self.onModelChosen(combo.currentIndex)
        self.updateInputsEnabled()
        isNodule = task == "nodule"
        self.ui.trainingSegmentationsSelector.visible = not isNodule
        self.ui.trainingROIsSelector.visible = isNodule

    def updateInputsEnabled(self) -> None:
        """All inputs are disabled while in-process inference runs; the ROI inputs are for nodules only."""
        for name in INPUT_WIDGETS:
            getattr(self.ui, name).enabled = not self._busy
        isNodule = self.ui.taskComboBox.currentText == models.TASK_TITLES["nodule"]
        self.ui.roiSelector.enabled = self.ui.createRoiButton.enabled = isNodule and not self._busy

    def onModelChosen(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.modelPath = self.ui.modelComboBox.itemData(index) or "" if index >= 0 else ""

    def onAddModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Add a Med3D model", "",
                                              "Med3D model (*.pt *.pth)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not add the model.", waitCursor=True):
            self.logic.addModelFile(path)
            self.updateModelList()

    def onCreateRoi(self) -> None:
        self._parameterNode.roi = self.logic.createRoiAtCursor()

    # ---------------------------------------------------------------------------------------------- actions

    def onProgress(self, fraction: Optional[float], text: str) -> None:
        if fraction is not None:
            self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = text
        slicer.app.processEvents()  # keeps Cancel clickable during in-process inference

    def onApply(self) -> None:
        if self._busy:  # the button reads "Cancel" while working
            self.logic.cancelRequested = True
            return
        self.setBusy(True)
        try:
            with slicer.util.tryWithErrorDisplay("Med3D failed.", waitCursor=True):
                try:
                    self.applyTask(self._parameterNode)
                except Exception:
                    if not self.logic.cancelRequested:  # Cancel, or a scene close, is not a failure
                        raise
                    self.ui.statusLabel.text = "Cancelled."
        finally:
            self.logic.cancelRequested = False
            self.setBusy(False)

    def setBusy(self, busy: bool) -> None:
        """During in-process inference only Apply, which reads Cancel then, stays enabled."""
        self._busy = busy
        self.ui.applyButton.text = "Cancel" if busy else "Apply"
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = busy
        if busy:
            self.ui.statusLabel.text = self.ui.resultsLabel.text = ""
        self.updateInputsEnabled()

    def applyTask(self, parameters: Med3DParameterNode) -> None:
        task = self.task()
        model = parameters.modelPath or None
        if task == "nodule":
            probabilities = self.logic.classifyNodule(parameters.inputVolume, parameters.roi, model,
                                                      parameters.device)
            best = max(probabilities, key=probabilities.get)
            self.ui.resultsLabel.text = "  ".join(f"{k}: {v:.2f}" for k, v in probabilities.items()) + \
                f"  ->  {best}"
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(self.logic.lastResultTable.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()
        else:
            node = self.logic.segment(parameters.inputVolume, task, model, parameters.device)
            self.ui.resultsLabel.text = f"Created '{node.GetName()}'"
        if self.logic.lastWarnings:
            self.ui.resultsLabel.text += "\nWarning: " + "\nWarning: ".join(self.logic.lastWarnings)

    def _trainingPairs(self) -> List[Tuple[Any, Any]]:
        volume = self._parameterNode.inputVolume
        if self.task() == "nodule":
            return [(volume, node) for node in self.ui.trainingROIsSelector.checkedNodes()]
        pairs = []
        for node in self.ui.trainingSegmentationsSelector.checkedNodes():
            reference = node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) or volume
            pairs.append((reference, node))
        return pairs

    def onFinetune(self) -> None:
        if self._run is not None and self._run.process.running:
            self._run.cancel()  # the button reads "Cancel" while a run goes on
            return
        p = self._parameterNode
        arguments = dict(task=self.task(), pairs=self._trainingPairs(),
                         folder=self.ui.trainingFolderEdit.currentPath or None,
                         startModel=self.ui.startModelComboBox.currentData or None, epochs=p.epochs,
                         learningRate=p.learningRate, newModelName=p.newModelName, device=p.device)
        self._startRun(arguments)

    def onResume(self) -> None:
        if self._lastRunCommand is None:
            return
        arguments = dict(self._lastRunCommand)
        arguments["resume"] = True  # same name: the engine continues from the run's last checkpoint
        self._startRun(arguments)

    def _startRun(self, arguments: Dict[str, Any]) -> None:
        with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
            self._run = self.logic.finetune(**arguments)
            self._lastRunCommand = arguments
            self._chartShown = False
            self.ui.finetuneButton.text = "Cancel"
            self.ui.resumeButton.enabled = False
            self.ui.finetuneProgressBar.value = 0
            self.ui.finetuneProgressBar.show()
            self._timer.start()

    def onTimer(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        going = run.poll()
        if run.state.fraction is not None:
            self.ui.finetuneProgressBar.value = int(round(100 * run.state.fraction))
        self.ui.finetuneStatusLabel.text = run.state.status_text()
        if run.plotChartNode is not None and not self._chartShown:
            slicer.modules.plots.logic().ShowChartInLayout(run.plotChartNode)  # once: the user may change layout
            self._chartShown = True
        if going:
            return
        self._timer.stop()
        self.ui.finetuneButton.text = "Start fine-tuning"
        self.ui.finetuneProgressBar.hide()
        self.ui.resumeButton.enabled = run.process.cancelled or run.failure() is not None
        failure = run.failure()
        if run.process.cancelled:
            self.ui.finetuneStatusLabel.text = "Cancelled. 'Resume' continues from the last checkpoint."
        elif failure:
            slicer.util.errorDisplay(failure, windowTitle="Med3D fine-tuning")
        else:
            self.ui.finetuneStatusLabel.text = f"Saved the new model as {run.output}"
            self.updateModelList()


# -------------------------------------------------------------------------------------------------------- test

class Med3DTest(ScriptedLoadableModuleTest):
    """Runs in a real Slicer (see Testing/Slicer/run_in_slicer.py); the same checks run under pytest against
    the Slicer double."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_geometry_round_trip()

    def test_geometry_round_trip(self) -> None:
        ijkToRAS = np.array([[0, 0, -2.0, 10], [-0.5, 0, 0, 20], [0, 3.0, 0, -5], [0, 0, 0, 1]])
        node = slicer.util.addVolumeFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4), ijkToRAS, "g")
        volume = Med3DLogic().volumeFromNode(node)
        back = geometry.ijk_to_ras_matrix(volume.spacing, volume.origin, volume.direction)
        np.testing.assert_allclose(back, ijkToRAS, atol=1e-9)
        self.delayDisplay("geometry round trip passed")
