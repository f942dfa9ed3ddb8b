"""Med3D: lung and liver segmentation, nodule classification and fine-tuning with Med3D-pretrained 3D-ResNets.

This file holds the module, the panel's wiring and the logic's console API; the work is in ``Med3DLib`` (tested
without Slicer) and the engine ``med3dcore``, which always runs in a background ``PythonSlicer`` process:
Slicer's own process never imports torch, stays responsive, and holds no GPU memory. Console use::

    logic = Med3D.Med3DLogic()
    segmentationNode = logic.segment(volumeNode, task="lung")     # blocks until the result is in the scene
    probabilities = logic.classifyNodule(volumeNode, roiNode)
    job = logic.startSegment(volumeNode, task="lung")             # or run in the background: job.poll() ...
"""
from __future__ import annotations

from typing import Annotated, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from Med3DLib import (binding, catalog_download, device_probe, finetune_job, geometry, inference, installer, jobs,
                      model_catalog, models, panel, scene, training_export)
from med3dcore.errors import Med3DError

TASK_CHOICES = list(models.TASK_TITLES.values())


class Med3D(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Med3D"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["Med3D developers"]
        self.parent.helpText = (
            "Lung and liver segmentation and pulmonary-nodule classification with 3D-ResNets pretrained the "
            "Med3D way (Chen et al. 2019), and fine-tuning on your own cases, all in a background process.")
        self.parent.acknowledgementText = (
            "Method: Chen, Ma, Zheng, 'Med3D: Transfer Learning for 3D Medical Image Analysis', 2019. "
            "Checkpoint format compatible with Tencent's MedicalNet release.")


@parameterNodeWrapper
class Med3DParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    task: Annotated[str, Choice(TASK_CHOICES)] = TASK_CHOICES[0]
    roi: vtkMRMLMarkupsROINode
    noduleMask: vtkMRMLSegmentationNode
    modelPath: str = ""
    device: str = "auto"
    # Binding a spin box sets its range from these validators (without them: the whole int/float range).
    epochs: Annotated[int, WithinRange(1, 10000)] = 10
    learningRate: Annotated[float, WithinRange(0.00001, 1.0)] = 0.001
    newModelName: str = "my-model"


class Med3DLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, callable from the Python console. ``start*`` methods return a background
    job (its ``poll()`` runs on the main thread, its ``finish()`` loads the result); ``segment`` and
    ``classifyNodule`` wait for it and return the result, for scripts."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.catalog = model_catalog.ModelCatalog()
        self.lastWarnings: List[str] = []
        self.lastResultTable = self.lastOutline = None  # the last classification's table and learnt outline
        self.progressCallback: Optional[Callable[[Optional[float], str], None]] = None  # blocking calls only
        self.onPackagesInstalled: Optional[Callable[[], None]] = None

    def getParameterNode(self) -> Med3DParameterNode:
        return Med3DParameterNode(super().getParameterNode())

    def ensureDependencies(self, ask: bool = True) -> None:
        """Install what is missing, after asking; raises :class:`Med3DError` when it cannot go on."""
        if installer.ensure_dependencies(ask) and self.onPackagesInstalled is not None:
            self.onPackagesInstalled()

    def modelsFolder(self) -> str:
        return model_catalog.models_folder()

    def availableModels(self, task: Optional[str] = None) -> List[Any]:
        """Files of the models folder (headers only, cached); with ``task`` only that task's usable models."""
        found = self.catalog.entries(self.modelsFolder())
        return found if task is None else models.models_for_task(found, task)

    def addModelFile(self, path: str) -> str:
        """Copy a Med3D model into the models folder (never replacing one); returns the new path."""
        return model_catalog.add_model_file(path, self.modelsFolder())

    def downloadModel(self, name: str, ask: bool = True) -> Optional[catalog_download.DownloadJob]:
        """Download a published encoder into the models folder in the background, after asking (None: declined)."""
        return catalog_download.start_download(name, self.modelsFolder(), ask)

    def resolveModel(self, task: str, model: Optional[str]) -> str:
        return models.pick_model(self.availableModels(), task, model, self.modelsFolder())

    def volumeFromNode(self, volumeNode: Any) -> Any:
        return scene.volume_from_node(volumeNode)

    def segmentationFromLabels(self, labels: Any, labelInfo: Sequence[Dict[str, Any]], referenceNode: Any,
                               name: str, segmentationNode: Any = None) -> Any:
        return scene.segmentation_from_labels(labels, labelInfo, referenceNode, name, segmentationNode)

    def createRoiAtCursor(self, sizeMM: float = 30.0, volumeNode: Any = None) -> Any:
        return scene.create_roi_at_cursor(volumeNode, sizeMM)

    def startSegment(self, volumeNode: Any, task: str = "lung", model: Optional[str] = None, device: str = "auto",
                     segmentationNode: Any = None) -> jobs.InferenceJob:
        """Segment in the background. ``model``: a bundle path, a known model's name or ``"classical"`` (lung);
        None takes the task's first model (lung without one: the classical method)."""
        inference.check_segment_inputs(volumeNode, task)
        self.ensureDependencies()  # first: exporting the volume needs the engine's packages
        return inference.start_segment(volumeNode, task, self.resolveModel(task, model), device, segmentationNode)

    def startClassify(self, volumeNode: Any, roiNode: Any = None, model: Optional[str] = None, device: str = "auto",
                      tableNode: Any = None, maskNode: Any = None) -> jobs.InferenceJob:
        """Classify the nodule in ``roiNode`` (or ``maskNode``, a segmentation) in the background."""
        inference.check_classify_inputs(volumeNode, roiNode, maskNode)
        self.ensureDependencies()
        return inference.start_classify(volumeNode, roiNode, self.resolveModel("nodule", model), device, tableNode,
                                        maskNode)

    def runToEnd(self, job: jobs.InferenceJob) -> Any:
        """Wait for a background job (reporting to ``progressCallback``) and load its result."""
        if self.progressCallback is not None:
            job.on_progress = lambda running: self.progressCallback(running.state.fraction, running.state.status_text())
        job.wait()
        result = job.finish()
        self.lastWarnings, self.lastResultTable = job.warnings, job.table or self.lastResultTable
        self.lastOutline = job.outline  # a classification's learnt nodule outline (segmentation node) or None
        return result

    def segment(self, volumeNode: Any, task: str = "lung", model: Optional[str] = None, device: str = "auto",
                segmentationNode: Any = None) -> Any:
        """Segment and wait; returns the segmentation node (named, coloured, coded segments)."""
        return self.runToEnd(self.startSegment(volumeNode, task, model, device, segmentationNode))

    def classifyNodule(self, volumeNode: Any, roiNode: Any = None, model: Optional[str] = None,
                       device: str = "auto", tableNode: Any = None, maskNode: Any = None) -> Dict[str, float]:
        """Classify and wait; returns {class: probability}, fills ``lastResultTable`` and sets ``lastOutline``."""
        return self.runToEnd(self.startClassify(volumeNode, roiNode, model, device, tableNode, maskNode))

    def finetune(self, task: str, pairs: Sequence[Tuple[Any, Any]] = (), folder: Optional[str] = None,
                 startModel: Optional[str] = None, epochs: int = 10, learningRate: float = 0.001,
                 newModelName: str = "my-model", device: str = "auto", resume: bool = False,
                 extraArgs: Sequence[str] = ()) -> jobs.FinetuneJob:
        """Start a background fine-tuning run on ``pairs`` (see ``training_export.training_pairs``) or a
        ``folder``/table; the new model is ``<models folder>/<newModelName>.pt``; ``resume`` continues an
        interrupted run of that name. Poll the returned job, or ``job.wait()``."""
        if task not in models.TASKS:
            raise Med3DError(f"unknown task '{task}'; choose one of: {', '.join(models.TASKS)}")
        self.ensureDependencies()
        outDir = self.modelsFolder()
        name = finetune_job.model_name(outDir, newModelName, resume)
        init = models.pick_start_model(self.availableModels(), startModel, outDir) if startModel else None
        return inference.start_finetune(task, pairs, folder, outDir, name, init, epochs, learningRate, device,
                                        resume, extraArgs)


class Med3DWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds widgets to the parameter node once per node; a timer polls the background runs."""

    def __init__(self, parent=None) -> None:
        VTKObservationMixin.__init__(self)
        self.logic: Optional[Med3DLogic] = None
        self._parameterNode: Optional[Med3DParameterNode] = None
        self._guiTag: Any = None
        self._listedTask: Optional[str] = None
        self._job: Optional[jobs.InferenceJob] = None
        self._run: Optional[jobs.FinetuneJob] = None
        self._lastRunArguments: Optional[Dict[str, Any]] = None
        self._chartShown = False
        self._probe: Optional[device_probe.DeviceProbe] = None
        self._devices: Dict[str, Any] = device_probe.NOT_PROBED
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self.onTimer)
        ScriptedLoadableModuleWidget.__init__(self, parent)  # last: without a parent it calls setup()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/Med3D.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = Med3DLogic()
        self._downloads = catalog_download.DownloadControl(self.ui, self.logic.downloadModel, self.updateModelList,
                                                            self._timer.start)  # Download of starting models
        self.logic.onPackagesInstalled = self.startDeviceProbe  # a new GPU build shows without a restart
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        for button, slot in (("applyButton", self.onApply), ("addModelButton", self.onAddModel),
                             ("createRoiButton", self.onCreateRoi), ("finetuneButton", self.onFinetune),
                             ("resumeButton", self.onResume)):
            getattr(self.ui, button).connect("clicked(bool)", slot)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChosen)
        self.ui.progressBar.hide()
        self.ui.finetuneProgressBar.hide()
        self.ui.resumeButton.enabled = False
        self.startDeviceProbe()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module reload or Slicer exit: stop the timer and every background process, drop all links."""
        self._timer.stop()
        for job in (self._job, self._run, self._probe, self._downloads):
            if job is not None:
                job.cancel()
        self._job = self._run = self._probe = None
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        if not self._devices.get("torch") and self._probe is None:
            self.startDeviceProbe()  # PyTorch may have been installed meanwhile

    def exit(self) -> None:
        pass  # the binding stays: re-binding on every enter() is what piled up links in Slicer 5.8

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:  # nothing may land in the next scene
            self._job.cancel()
            self.pollInference()
        if self._run is not None:  # the plot's nodes go with the scene: draw it anew in the next one
            self._run.lossPlot, self._chartShown = training_export.LossPlot(), False
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        if self.parent.isEntered:  # a loaded scene's parameters: show its task, model and device
            self.setParameterNode(None)
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode: Optional[Med3DParameterNode]) -> None:
        current = self._parameterNode
        if parameterNode is not None and current is not None and parameterNode.parameterNode is current.parameterNode:
            return  # bound already: one binding per parameter node
        if current is not None:
            current.disconnectGui(self._guiTag)
            self.removeObserver(current, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode, self._guiTag, self._listedTask = parameterNode, None, None
        if parameterNode is not None:
            self._guiTag = binding.bind(parameterNode, self.ui)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()
            self.fillDeviceList()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is not None and self.task() != self._listedTask:
            self.updateModelList()

    def task(self) -> str:
        return models.task_from_title(self._parameterNode.task)

    def updateModelList(self) -> None:
        self._listedTask = self.task()
        panel.fill_model_lists(self.ui, self.logic.availableModels(), self._listedTask,
                               self._parameterNode.modelPath, self.logic.modelsFolder())
        self._downloads.update_button()
        self.onModelChosen(self.ui.modelComboBox.currentIndex)

    def onModelChosen(self, index: int) -> None:
        if self._parameterNode is not None:
            self._parameterNode.modelPath = (self.ui.modelComboBox.itemData(index) or "") if index >= 0 else ""

    def startDeviceProbe(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        self._probe, self._devices = device_probe.start_probe()
        self.fillDeviceList()
        self._timer.start()

    def fillDeviceList(self) -> None:
        if self._parameterNode is not None:
            replacement = panel.fill_device_list(self.ui, self._devices, self._parameterNode.device)
            if replacement is not None:
                self._parameterNode.device = replacement

    def onDeviceChosen(self, index: int) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    def onAddModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Add a Med3D model", "",
                                              "Med3D model (*.pt *.pth)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not add the model.", waitCursor=True):
                self.logic.addModelFile(path)
                self.updateModelList()

    def onCreateRoi(self) -> None:
        self._parameterNode.roi = self.logic.createRoiAtCursor(volumeNode=self._parameterNode.inputVolume)

    def onTimer(self) -> None:
        """Polls the device check and the background runs on the main thread; stops once nothing runs."""
        going = False
        if self._probe is not None:
            found = self._probe.poll()
            going = found is None
            if found is not None:
                self._devices, self._probe = found, None
                self.fillDeviceList()
        going = self.pollInference() or going
        going = self.pollFinetune() or going
        going = self._downloads.poll() or going
        if not going:
            self._timer.stop()

    def onApply(self) -> None:
        if self._job is not None:  # the button reads "Cancel" while a job runs
            self._job.cancel()
            self.pollInference()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Med3D could not start.", waitCursor=True):
            if self.task() == "nodule":
                self._job = self.logic.startClassify(p.inputVolume, p.roi, p.modelPath or None, p.device,
                                                     maskNode=p.noduleMask)
            else:
                self._job = self.logic.startSegment(p.inputVolume, self.task(), p.modelPath or None, p.device)
        panel.inference_started(self.ui)
        self._timer.start()

    def pollInference(self) -> bool:
        job = self._job
        if job is None:
            return False
        going = job.poll()
        panel.show_progress(self.ui.progressBar, self.ui.statusLabel, job)
        if not going:
            self._job = None
            panel.inference_ended(self.ui, job)
        return going

    def onFinetune(self) -> None:
        if self._run is not None and self._run.running:
            self._run.cancel()  # the button reads "Cancel" while a run goes on
            return
        with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
            self._startRun(panel.finetune_arguments(self.ui, self._parameterNode, self.task()))

    def onResume(self) -> None:
        if self._lastRunArguments is not None:
            with slicer.util.tryWithErrorDisplay("Could not resume fine-tuning.", waitCursor=True):
                self._startRun(dict(self._lastRunArguments, resume=True))  # from the run's last checkpoint

    def _startRun(self, arguments: Dict[str, Any]) -> None:
        self._run = self.logic.finetune(**arguments)
        self._lastRunArguments, self._chartShown = arguments, False
        panel.finetune_started(self.ui)
        self._timer.start()

    def pollFinetune(self) -> bool:
        run = self._run
        if run is None:
            return False
        going = run.poll()
        self._chartShown = panel.finetune_progress(self.ui, run, self._chartShown)
        if not going:
            self._run = None
            if panel.finetune_ended(self.ui, run):
                self.updateModelList()
        return going


class Med3DTest(ScriptedLoadableModuleTest):
    """Runs in Slicer ("Reload and Test", CTest ``py_Med3D``) with nothing installed yet: it needs neither torch
    nor nibabel. Testing/Slicer/run_in_slicer.py runs the full checks."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_geometry_round_trip()

    def test_geometry_round_trip(self) -> None:
        ijkToRAS = np.array([[0, 0, -2.0, 10], [-0.5, 0, 0, 20], [0, 3.0, 0, -5], [0, 0, 0, 1]])
        node = slicer.util.addVolumeFromArray(np.arange(24, dtype=np.int16).reshape(2, 3, 4), ijkToRAS, "g")
        back = geometry.ijk_to_ras_matrix(*geometry.lps_geometry(scene.ijk_to_ras(node)))
        np.testing.assert_allclose(back, ijkToRAS, atol=1e-9)
        self.delayDisplay("geometry round trip passed")
