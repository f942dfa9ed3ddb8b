"""Med3DWidget's slots against the Slicer double, with stand-ins for the widgets of Med3D.ui: model lists and
explanations, Apply turning into Cancel, results in the panel and a table, the fine-tuning timer, and the
panel's state across re-binding (enter, scene close and load) and in-process runs (only Cancel enabled, a
scene close cancels)."""
from __future__ import annotations

import math
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from bundles import LUNG_LABELS, NODULE_LABELS, constant_output_bundle
from med3dcore.errors import Med3DError
from med3dcore.volume import Volume

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "Med3DSlicer" / "Resources" / "UI" / "Med3D.ui"


@pytest.fixture(scope="module")
def nodule_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("widget-models")
    constant_output_bundle(folder / "nodule.pt", {"type": "classifier", "num_classes": 2}, [0.0, math.log(3.0)],
                           {"type": "classification", "name": "nodule"}, NODULE_LABELS, preprocessing={},
                           extra={"nodule_input": {"cube": 16, "spacing_mm": 2.0}})
    return folder


@pytest.fixture()
def widget(slicer_double, nodule_model, monkeypatch):
    """Med3DWidget as ``setup()`` leaves it, with widget stand-ins built from Med3D.ui."""
    import slicer_double as double

    monkeypatch.setenv("MED3D_MODELS", str(nodule_model))
    slicer, med3d = slicer_double
    panel = med3d.Med3DWidget(None)
    panel.ui = double.widgets_from_ui(str(UI))
    panel.logic = med3d.Med3DLogic()
    panel.logic.progressCallback = panel.onProgress
    panel.fillDeviceList()
    panel.initializeParameterNode()
    panel.updateModelList()
    return slicer, med3d, panel


def test_model_list_follows_the_task_and_explains_an_empty_list(widget) -> None:
    slicer, _, panel = widget
    assert panel.ui.taskComboBox.currentText == "Lung segmentation"
    assert panel.ui.modelComboBox.items == []
    assert "No lung segmentation model is in" in panel.ui.modelInfoLabel.text
    assert "Add model file" in panel.ui.modelInfoLabel.text
    assert not panel.ui.roiSelector.enabled and not panel.ui.trainingROIsSelector.visible
    panel.ui.taskComboBox.setCurrentText("Nodule classification")
    panel.updateModelList()
    assert [text for text, _ in panel.ui.modelComboBox.items] == ["nodule"]
    assert panel.ui.modelInfoLabel.text == ""
    assert panel._parameterNode.modelPath.endswith("nodule.pt")
    assert panel.ui.roiSelector.enabled and panel.ui.trainingROIsSelector.visible
    assert [text for text, _ in panel.ui.startModelComboBox.items] == ["(from scratch)", "nodule"]


def test_binding_the_parameter_node_keeps_the_panel_consistent(widget) -> None:
    """Binding refills the task list (its index passes through -1, which reaches the connected slot) and sets
    the spin boxes' ranges from the parameters' validators, as Slicer's GUI connectors do."""
    _, _, panel = widget
    panel.ui.taskComboBox.connect("currentIndexChanged(int)", panel.updateModelList)  # as setup() does
    panel._parameterNode.task = "Nodule classification"
    panel.setParameterNode(panel.logic.getParameterNode())  # e.g. after a scene close
    assert panel.ui.taskComboBox.currentText == "Nodule classification"
    assert [text for text, _ in panel.ui.modelComboBox.items] == ["nodule"]
    assert (panel.ui.epochsSpinBox.minimum, panel.ui.epochsSpinBox.maximum) == (1, 10000)
    assert panel.ui.learningRateSpinBox.minimum > 0 and panel.ui.learningRateSpinBox.maximum == 1.0


def test_device_list_says_why_there_is_no_gpu(widget) -> None:
    _, _, panel = widget
    labels = [text for text, _ in panel.ui.deviceComboBox.items]
    if torch.cuda.is_available():
        assert labels[2].startswith("GPU (")
    else:
        assert labels == ["auto", "CPU"]
        assert "CPU-only build" in panel.ui.deviceInfoLabel.text or "No GPU visible" in panel.ui.deviceInfoLabel.text
    panel.onDeviceChosen(1)
    assert panel._parameterNode.device == "cpu"


def _classify_in_panel(slicer, panel, value: int, name: str) -> None:
    """Apply nodule classification to a constant volume (``value`` HU) with a 10 mm ROI in it."""
    from Med3DLib import geometry

    volume = Volume(np.full((20, 30, 30), value, np.int16), spacing=(1.0, 1.0, 2.0))
    array, matrix = geometry.node_data_from_volume(volume)
    node = slicer.util.addVolumeFromArray(array, matrix, name)
    roi_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "n")
    roi_node.SetCenter(-15.0, -15.0, 20.0)
    roi_node.SetSize(10, 10, 10)
    panel.ui.taskComboBox.setCurrentText("Nodule classification")
    panel.updateModelList()
    parameters = panel._parameterNode
    parameters.inputVolume, parameters.roi, parameters.device = node, roi_node, "cpu"
    panel.onApply()


def test_apply_classifies_and_shows_the_result(widget) -> None:
    slicer, med3d, panel = widget
    _classify_in_panel(slicer, panel, -700, "ct")
    assert panel.ui.resultsLabel.text == "benign: 0.25  malignant: 0.75  ->  malignant"
    assert slicer.app.applicationLogic().GetSelectionNode().activeTableID == panel.logic.lastResultTable.GetID()
    assert panel.ui.applyButton.text == "Apply" and not panel.ui.progressBar.visible and not panel._busy


def test_apply_failure_is_shown_and_the_panel_reset(widget) -> None:
    slicer, _, panel = widget
    panel._parameterNode.inputVolume = None
    with pytest.raises(Med3DError, match="no input volume"):
        panel.onApply()
    assert slicer.util.errors == ["Med3D failed. no input volume is selected; choose a CT volume in 'Input volume'"]
    assert panel.ui.applyButton.text == "Apply" and not panel.ui.progressBar.visible


def test_apply_while_busy_is_cancel(widget) -> None:
    _, _, panel = widget
    panel._busy = True
    panel.onApply()
    assert panel.logic.cancelRequested


FAKE_ENGINE = """
import json, sys
for step in (1, 2):
    print(json.dumps({"kind": "progress", "stage": "finetune", "step": step, "total": 2,
                      "metrics": {"loss": 1.0 / step}}), flush=True)
"""


def test_fine_tuning_timer_updates_the_panel_until_done(widget, tmp_path) -> None:
    """The timer slot with a background run of a FAKE engine script (same JSON-lines protocol)."""
    slicer, med3d, panel = widget
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    panel._run = med3d.FinetuneRun([sys.executable, str(script)], str(tmp_path / "new.pt"), str(tmp_path)).start()
    panel._timer.start()
    for _ in range(400):
        panel.onTimer()
        if not panel._timer.active:
            break
        time.sleep(0.05)
    assert not panel._timer.active
    assert panel.ui.finetuneStatusLabel.text == f"Saved the new model as {tmp_path / 'new.pt'}"
    assert panel.ui.finetuneButton.text == "Start fine-tuning" and not panel.ui.resumeButton.enabled
    assert slicer.modules.plots.logic().shown == [panel._run.plotChartNode]  # shown once, not on every tick


def test_cancel_then_resume_is_offered(widget, tmp_path) -> None:
    slicer, med3d, panel = widget
    script = tmp_path / "slow_engine.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    panel._run = med3d.FinetuneRun([sys.executable, str(script)], str(tmp_path / "new.pt"), str(tmp_path)).start()
    panel._timer.start()
    panel.onFinetune()  # the button reads "Cancel" while the run goes on
    for _ in range(100):
        panel.onTimer()
        if not panel._timer.active:
            break
        time.sleep(0.05)
    assert panel._run.process.cancelled and not panel._run.process.running
    assert panel.ui.finetuneStatusLabel.text.startswith("Cancelled.")
    assert panel.ui.resumeButton.enabled and slicer.util.errors == []


def test_engine_warnings_reach_the_panel(widget, monkeypatch) -> None:
    """An MR volume given to a CT model: the engine's warning is shown under the result."""
    slicer, med3d, panel = widget
    _classify_in_panel(slicer, panel, 300, "mr")  # no air: not CT-like
    lines = panel.ui.resultsLabel.text.splitlines()
    assert lines[0].endswith("->  malignant")
    assert len(lines) >= 2 and lines[1].startswith("Warning: ")


# ---------------------------------------------------------------------- panel state across binding and runs

INPUT_WIDGETS = ("inputVolumeSelector", "taskComboBox", "modelComboBox", "addModelButton", "roiSelector",
                 "createRoiButton", "deviceComboBox", "finetuneCollapsibleButton")


def connect_as_setup(panel) -> None:
    """The combo-box connections ``setup()`` makes (the fixture builds the panel without ``setup()``)."""
    panel.ui.taskComboBox.connect("currentIndexChanged(int)", panel.updateModelList)
    panel.ui.modelComboBox.connect("currentIndexChanged(int)", panel.onModelChosen)
    panel.ui.deviceComboBox.connect("currentIndexChanged(int)", panel.onDeviceChosen)


def close_scene(slicer, panel) -> None:
    """What Slicer does on File > Close Scene while the module is shown: the close events around the clear."""
    panel.onSceneStartClose(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent)
    slicer.mrmlScene.Clear()
    panel.onSceneEndClose(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent)


@pytest.fixture(scope="module")
def lung_and_two_nodule_models(nodule_model, tmp_path_factory) -> Path:
    from med3dcore.preprocess import PreprocessSpec

    folder = tmp_path_factory.mktemp("state-models")
    for name in ("nodule-a.pt", "nodule-b.pt"):
        shutil.copyfile(nodule_model / "nodule.pt", folder / name)
    constant_output_bundle(folder / "lung.pt", {"type": "lung_decoder", "num_classes": 2, "channels": [8, 8, 8]},
                           [-5.0, 5.0], {"type": "segmentation", "name": "lung"}, LUNG_LABELS,
                           preprocessing=PreprocessSpec(spacing=(6.0, 6.0, 6.0), window=(-1000.0, 400.0),
                                                        modality="CT"))
    return folder


@pytest.fixture()
def state_widget(widget, lung_and_two_nodule_models, monkeypatch):
    """The panel wired as ``setup()`` wires it (its slots before the binding's), shown, with a lung and two
    nodule models."""
    slicer, med3d, panel = widget
    monkeypatch.setenv("MED3D_MODELS", str(lung_and_two_nodule_models))
    panel.setParameterNode(None)
    connect_as_setup(panel)
    panel.parent = types.SimpleNamespace(isEntered=True)
    panel.initializeParameterNode()
    return slicer, med3d, panel


def test_model_choice_survives_leaving_and_entering_the_module(state_widget, lung_and_two_nodule_models) -> None:
    """Binding on enter() empties and refills the task list, which refills the model list: the user's model
    (kept in the parameter node) must be chosen again afterwards, not the task's first model."""
    _, _, panel = state_widget
    panel.ui.taskComboBox.setCurrentText("Nodule classification")
    assert [text for text, _ in panel.ui.modelComboBox.items] == ["nodule-a", "nodule-b"]
    panel.ui.modelComboBox.setCurrentIndex(1)  # the user picks the second model
    chosen = str(lung_and_two_nodule_models / "nodule-b.pt")
    assert panel._parameterNode.modelPath == chosen
    panel.exit()
    panel.enter()
    assert panel.ui.taskComboBox.currentText == "Nodule classification"
    assert panel.ui.modelComboBox.currentText == "nodule-b" and panel._parameterNode.modelPath == chosen
    panel.updateModelList()  # e.g. after a fine-tuning run or 'Add model file...'
    assert panel.ui.modelComboBox.currentText == "nodule-b" and panel._parameterNode.modelPath == chosen
    panel.ui.taskComboBox.setCurrentText("Lung segmentation")  # another task: its first model
    assert panel._parameterNode.modelPath == str(lung_and_two_nodule_models / "lung.pt")


def test_choosing_another_task_sticks(state_widget) -> None:
    """In Slicer the panel's task slot runs before the binding's, which writes the task parameter: a model
    written first modifies the node, and the binding would then show the parameter's old task again."""
    _, _, panel = state_widget
    assert panel._parameterNode.task == "Lung segmentation" and panel._parameterNode.modelPath.endswith("lung.pt")
    panel.ui.taskComboBox.setCurrentText("Nodule classification")
    assert panel.ui.taskComboBox.currentText == panel._parameterNode.task == "Nodule classification"
    assert [text for text, _ in panel.ui.modelComboBox.items] == ["nodule-a", "nodule-b"]
    assert panel._parameterNode.modelPath.endswith("nodule-a.pt")


def test_device_choice_is_restored_from_the_parameter_node(state_widget) -> None:
    slicer, _, panel = state_widget
    panel.ui.deviceComboBox.setCurrentIndex(1)  # CPU
    assert panel._parameterNode.device == "cpu"
    close_scene(slicer, panel)  # a new scene: its parameter node says "auto", and so must the panel
    assert panel._parameterNode.device == "auto" and panel.ui.deviceComboBox.currentData == "auto"
    panel._parameterNode.device = "cpu"  # a loaded scene (.mrb) saved with CPU chosen
    panel.onSceneEndImport(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent)
    assert panel.ui.deviceComboBox.currentData == "cpu"
    panel.exit()
    panel._parameterNode.device = "auto"
    panel.enter()
    assert panel.ui.deviceComboBox.currentData == "auto"
    panel._parameterNode.device = "cuda:7"  # saved on a machine with a GPU this one lacks: auto, shown and used
    panel.enter()
    assert panel.ui.deviceComboBox.currentData == "auto" and panel._parameterNode.device == "auto"


def enabled_states(panel) -> dict:
    return {name: getattr(panel.ui, name).enabled for name in INPUT_WIDGETS + ("applyButton",)}


def start_lung_run(slicer, panel):
    volume = Volume(np.full((24, 40, 40), -700, np.int16), spacing=(2.0, 2.0, 3.0))
    from Med3DLib import geometry

    array, matrix = geometry.node_data_from_volume(volume)
    parameters = panel._parameterNode
    parameters.inputVolume = slicer.util.addVolumeFromArray(array, matrix, "ct")
    parameters.device = "cpu"


def test_only_cancel_is_enabled_while_inference_runs(state_widget, monkeypatch) -> None:
    """onProgress lets Qt process events (for Cancel): no other input may be used meanwhile, and the panel
    comes back as it was afterwards, after a failure too."""
    slicer, _, panel = state_widget
    start_lung_run(slicer, panel)
    before = enabled_states(panel)
    assert all(before[name] for name in before if name not in ("roiSelector", "createRoiButton"))
    during = []
    monkeypatch.setattr(slicer.app, "processEvents",
                        lambda: during.append((enabled_states(panel), panel.ui.applyButton.text)))
    panel.onApply()
    assert panel.ui.resultsLabel.text == "Created 'ct lung'"
    assert during and all(text == "Cancel" for _, text in during)
    assert all(states == dict.fromkeys(INPUT_WIDGETS, False) | {"applyButton": True} for states, _ in during)
    assert enabled_states(panel) == before and panel.ui.applyButton.text == "Apply"

    def fail() -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(slicer.app, "processEvents", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        panel.onApply()
    assert enabled_states(panel) == before and panel.ui.applyButton.text == "Apply" and not panel._busy
    panel.ui.taskComboBox.setCurrentText("Nodule classification")  # the ROI inputs follow the task again
    assert panel.ui.roiSelector.enabled and panel.ui.createRoiButton.enabled


def test_closing_the_scene_during_inference_cancels_it_cleanly(state_widget, monkeypatch) -> None:
    """In Slicer the close runs inside processEvents() during the run: the run must stop without a result in
    the new scene or an error message, and the panel be bound to the new scene's parameter node."""
    slicer, _, panel = state_widget
    start_lung_run(slicer, panel)
    before = enabled_states(panel)
    closes = []

    def process_events() -> None:
        if not closes:
            closes.append(True)
            close_scene(slicer, panel)

    monkeypatch.setattr(slicer.app, "processEvents", process_events)
    panel.onApply()
    assert closes and slicer.util.errors == []
    assert slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode") == []
    assert panel.ui.statusLabel.text == "Cancelled." and panel.ui.resultsLabel.text == ""
    assert enabled_states(panel) == before and panel.ui.applyButton.text == "Apply"
    assert not panel._busy and not panel.logic.cancelRequested and not panel.ui.progressBar.visible
    assert panel._parameterNode is not None and panel._parameterNode.parameterNode.scene is slicer.mrmlScene


def test_cancel_button_stops_the_run_without_an_error_message(state_widget, monkeypatch) -> None:
    slicer, _, panel = state_widget
    start_lung_run(slicer, panel)
    monkeypatch.setattr(slicer.app, "processEvents", panel.onApply)  # Apply, now Cancel, clicked during the run
    panel.onApply()
    assert slicer.util.errors == [] and panel.ui.statusLabel.text == "Cancelled."
    assert slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode") == []
    assert panel.ui.applyButton.text == "Apply" and not panel._busy and not panel.logic.cancelRequested
