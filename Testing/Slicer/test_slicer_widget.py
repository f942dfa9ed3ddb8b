"""The Med3D panel as Slicer builds it (``setup()`` from Med3D.ui) in the double's 5.8 and 5.10 modes: model and
device lists, the binding across module switches and scene changes, and segmentation, classification and
fine-tuning running in background processes while the event loop keeps going."""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from bundles import LUNG_LABELS, NODULE_LABELS, constant_output_bundle
from conftest import run_events
from med3dcore.volume import Volume


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> Path:
    from med3dcore.preprocess import PreprocessSpec

    folder = tmp_path_factory.mktemp("panel-models")
    constant_output_bundle(folder / "nodule-a.pt", {"type": "classifier", "num_classes": 2}, [0.0, math.log(3.0)],
                           {"type": "classification", "name": "nodule"}, NODULE_LABELS, preprocessing={},
                           extra={"nodule_input": {"cube": 16, "spacing_mm": 2.0}})
    shutil.copyfile(folder / "nodule-a.pt", folder / "nodule-b.pt")
    constant_output_bundle(folder / "lung.pt", {"type": "lung_decoder", "num_classes": 2, "channels": [8, 8, 8]},
                           [-5.0, 5.0], {"type": "segmentation", "name": "lung"}, LUNG_LABELS,
                           preprocessing=PreprocessSpec(spacing=(6.0, 6.0, 6.0), window=(-1000.0, 400.0),
                                                        modality="CT"))
    return folder


@pytest.fixture()
def with_models(panel, model_files, models_dir):
    slicer, med3d, widget = panel
    for path in model_files.iterdir():
        shutil.copyfile(path, models_dir / path.name)
    widget.updateModelList()
    return slicer, med3d, widget


def choose_task(widget, title: str) -> None:
    widget.ui.taskComboBox.currentIndex = widget.ui.taskComboBox.findText(title)  # as a user's click


def add_ct(slicer, value: int = -700, shape=(20, 30, 30), name: str = "ct"):
    from Med3DLib import geometry

    array, matrix = geometry.node_data_from_volume(Volume(np.full(shape, value, np.int16), spacing=(1.0, 1.0, 2.0)))
    return slicer.util.addVolumeFromArray(array, matrix, name)


def med3d_folders() -> set:
    """Work folders in the temp folder; tests assert that a run leaves none of its own behind (a subset check,
    so another process's folder appearing or going meanwhile cannot fail them)."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("Med3D-*")}


# ------------------------------------------------------------------------------------------------ lists

def test_setup_builds_the_panel_and_offers_the_classical_lung_method(panel) -> None:
    slicer, _, widget = panel
    assert widget.ui.taskComboBox.currentText == "Lung segmentation"
    assert widget.ui.modelComboBox.items == [("Classical lung method (threshold, no weights)", "classical")]
    assert widget._parameterNode.modelPath == "classical"
    assert "the classical method" in widget.ui.modelInfoLabel.text
    assert not widget.ui.roiSelector.enabled and not widget.ui.trainingROIsSelector.visible
    assert [data for _, data in widget.ui.deviceComboBox.items][:2] == ["auto", "cpu"]
    assert widget.ui.deviceInfoLabel.text and "Looking" not in widget.ui.deviceInfoLabel.text
    choose_task(widget, "Liver segmentation")
    assert widget.ui.modelComboBox.items == [] and "No liver segmentation model is in" in widget.ui.modelInfoLabel.text


def test_task_and_model_survive_leaving_and_entering_the_module(with_models, models_dir) -> None:
    """Item 2: in Slicer 5.8 every enter() left the previous binding connected (connectGui returned None), and
    the stale link reset the task to lung and the model to the first one."""
    slicer, _, widget = with_models
    choose_task(widget, "Nodule classification")
    assert [text for text, _ in widget.ui.modelComboBox.items] == ["nodule-a", "nodule-b"]
    widget.ui.modelComboBox.currentIndex = 1  # the user picks the second model
    chosen = str(models_dir / "nodule-b.pt")
    for _ in range(3):
        slicer.util.selectModule("Data")
        slicer.util.selectModule("Med3D")
    assert widget.ui.taskComboBox.currentText == widget._parameterNode.task == "Nodule classification"
    assert widget.ui.modelComboBox.currentText == "nodule-b" and widget._parameterNode.modelPath == chosen
    assert len(widget.ui.taskComboBox.currentIndexChanged.slots) == 1  # one live link, not one per enter()
    choose_task(widget, "Lung segmentation")  # and the task still follows the user
    assert widget._parameterNode.task == "Lung segmentation"
    assert [text for text, _ in widget.ui.modelComboBox.items] == ["lung", "Classical lung method (threshold, no weights)"]
    assert widget._parameterNode.modelPath == str(models_dir / "lung.pt")


def test_a_new_scene_rebinds_once_and_shows_its_parameters(with_models) -> None:
    slicer, _, widget = with_models
    choose_task(widget, "Nodule classification")
    widget.ui.deviceComboBox.currentIndex = 1  # CPU
    slicer.mrmlScene.Clear(0)  # File > Close Scene: a reset parameter node
    assert widget._parameterNode.task == "Lung segmentation" and widget.ui.taskComboBox.currentText == "Lung segmentation"
    assert widget.ui.deviceComboBox.itemData(widget.ui.deviceComboBox.currentIndex) == "auto"
    assert len(widget.ui.taskComboBox.currentIndexChanged.slots) == 1
    choose_task(widget, "Nodule classification")
    assert widget._parameterNode.task == "Nodule classification"


def test_switching_tasks_reads_no_model_file_again(with_models, models_dir) -> None:
    """Item 4: the model list used to load every checkpoint on every task switch; headers are cached."""
    _, _, widget = with_models
    reads = widget.logic.catalog.reads
    for title in ("Nodule classification", "Liver segmentation", "Lung segmentation", "Nodule classification"):
        choose_task(widget, title)
    assert widget.logic.catalog.reads == reads
    path = models_dir / "nodule-b.pt"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10 ** 9))  # the file changed
    choose_task(widget, "Lung segmentation")
    assert widget.logic.catalog.reads == reads + 1


def test_a_device_this_computer_lacks_becomes_auto(panel) -> None:
    slicer, _, widget = panel
    widget.ui.deviceComboBox.currentIndex = 1
    assert widget._parameterNode.device == "cpu"
    widget._parameterNode.device = "cuda:7"  # a scene saved on another computer
    widget.fillDeviceList()
    assert widget._parameterNode.device == "auto"


def test_training_folder_browses_folders_and_the_table_files(panel, tmp_path) -> None:
    """Item 7: the folder field opened a file dialog (ctkPathLineEdit's default filters include files)."""
    import double_qt

    slicer, _, widget = panel
    widget.ui.trainingFolderEdit.browse()
    widget.ui.trainingTableEdit.browse()
    assert double_qt.QFileDialog.opened == ["directory", "open file"]
    assert widget.ui.trainingTableEdit.nameFilters == ["Training table (*.csv *.json)"]
    from Med3DLib import panel as panel_lib

    widget.ui.trainingFolderEdit.currentPath = str(tmp_path)
    assert panel_lib.training_source(widget.ui) == str(tmp_path)
    widget.ui.trainingTableEdit.currentPath = str(tmp_path / "cases.csv")
    assert panel_lib.training_source(widget.ui) == str(tmp_path / "cases.csv")


# ---------------------------------------------------------------------------------- background inference

def test_segmentation_runs_in_the_background_and_lands_in_the_inputs_study(panel, data_dir) -> None:
    """Item 5: Apply starts a process and returns; the event loop keeps running (timers fire, the task can be
    changed) while progress arrives; the result goes into the input's study; the work folder goes."""
    slicer, _, widget = panel
    node = slicer.util.loadVolume(str(data_dir / "ct" / "abdomen_ct_small.nii.gz"))
    hierarchy = slicer.mrmlScene.subjectHierarchy
    study = hierarchy.CreateStudyItem(hierarchy.CreatePatientItem(hierarchy.GetSceneItemID(), "patient"), "study")
    hierarchy.SetItemParent(hierarchy.GetItemByDataNode(node), study)
    widget._parameterNode.inputVolume, widget._parameterNode.device = node, "cpu"
    folders = med3d_folders()
    widget.ui.applyButton.click()
    assert widget._job is not None and widget._job.running  # Apply returned while the engine still runs
    assert widget.ui.applyButton.text == "Cancel" and widget.ui.progressBar.visible
    ticks = []
    import double_qt

    double_qt.QTimer.singleShot(0, lambda: ticks.append("gui"))  # other GUI work while the job runs
    choose_task(widget, "Liver segmentation")  # the panel stays usable; the run keeps its inputs
    texts = set()
    run_events(slicer, lambda: texts.add(widget.ui.statusLabel.text) or widget._job is None)
    assert ticks == ["gui"] and len(texts) > 2  # progress was shown while it ran
    assert widget.ui.statusLabel.text == "Done." and widget.ui.resultsLabel.text == "Created 'abdomen_ct_small lung'"
    (result,) = slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode")
    segmentation = result.GetSegmentation()
    assert [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName() for i in range(2)] == \
        ["right lung", "left lung"]
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(result)) == study
    assert not med3d_folders() - folders and widget.ui.applyButton.text == "Apply"


FAKE_ENGINE = """
import json, os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(os.path.join(os.environ["FAKE_PIDS"], "pids"), "w").write(f"{os.getpid()} {child.pid}")
print(json.dumps({"kind": "progress", "stage": "segment", "step": 1, "total": 10}), flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def wait_until_dead(pids, timeout: float = 10.0) -> bool:
    """The signals are sent before cancel returns, but the kernel ends a signalled process asynchronously."""
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(alive(pid) for pid in pids)


@pytest.fixture()
def slow_engine(tmp_path, monkeypatch):
    """A FAKE engine (named so): prints one progress line, starts a grandchild, then sleeps; writes the pids."""
    from Med3DLib import jobs

    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    monkeypatch.setenv("FAKE_PIDS", str(tmp_path))
    monkeypatch.setattr(jobs, "engine_command", lambda python, command: [sys.executable, str(script)])
    return tmp_path / "pids"


@pytest.mark.skipif(sys.platform == "win32", reason="reads /proc")
def test_cancel_kills_the_process_tree_and_adds_nothing(panel, slow_engine) -> None:
    slicer, _, widget = panel
    widget._parameterNode.inputVolume = add_ct(slicer)
    folders, nodes = med3d_folders(), slicer.mrmlScene.GetNumberOfNodes()
    widget.ui.applyButton.click()
    run_events(slicer, lambda: slow_engine.exists() and widget.ui.progressBar.value == 10, 30)
    pids = [int(p) for p in slow_engine.read_text().split()]
    widget.ui.applyButton.click()  # Cancel
    assert widget._job is None and widget.ui.statusLabel.text == "Cancelled." and slicer.util.errors == []
    assert wait_until_dead(pids)
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes and not med3d_folders() - folders


def test_closing_the_scene_during_a_run_cancels_it(panel, slow_engine) -> None:
    slicer, _, widget = panel
    widget._parameterNode.inputVolume = add_ct(slicer)
    folders = med3d_folders()
    widget.ui.applyButton.click()
    run_events(slicer, slow_engine.exists, 30)
    slicer.mrmlScene.Clear(0)
    assert widget._job is None and widget.ui.statusLabel.text == "Cancelled." and not med3d_folders() - folders
    assert slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode") == [] and slicer.util.errors == []
    assert widget._parameterNode is not None and widget.ui.applyButton.text == "Apply"


def test_reloading_the_module_during_a_run_stops_it_and_its_timer(panel, slow_engine) -> None:
    """Items 5 and 11: cleanup() (module reload, Slicer exit) ends the run and stops the timer, so nothing
    calls into the old panel afterwards."""
    slicer, _, widget = panel
    widget._parameterNode.inputVolume = add_ct(slicer)
    widget.ui.applyButton.click()
    run_events(slicer, slow_engine.exists, 30)
    pids = [int(p) for p in slow_engine.read_text().split()]
    calls = []
    widget.onTimer = lambda: calls.append("old panel")
    slicer.util.reloadScriptedModule("Med3D")
    assert not widget._timer.isActive()
    assert wait_until_dead(pids)
    time.sleep(0.3)
    slicer.app.processEvents()
    assert calls == []
    new = slicer.util.getModuleWidget("Med3D")
    assert new is not widget and new.ui.applyButton.text == "Apply"


def test_cleanup_stops_the_timer(panel) -> None:
    """Item 11: cleanup() (module reload, Slicer exit) left the run timer going, calling into a dead panel."""
    slicer, _, widget = panel
    widget._timer.start()
    widget.cleanup()
    assert not widget._timer.isActive()


def test_deleting_the_input_during_a_run_adds_nothing_and_says_so(panel, data_dir) -> None:
    slicer, _, widget = panel
    node = slicer.util.loadVolume(str(data_dir / "ct" / "abdomen_ct_small.nii.gz"))
    widget._parameterNode.inputVolume, widget._parameterNode.device = node, "cpu"
    widget.ui.applyButton.click()
    slicer.mrmlScene.RemoveNode(node)
    run_events(slicer, lambda: widget._job is None)
    assert widget.ui.statusLabel.text == ("Failed: the input volume 'abdomen_ct_small' was removed from the scene "
                                          "during the run; nothing was added")
    assert slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode") == [] and len(slicer.util.errors) == 1


def classify_in_panel(slicer, widget, value: int):
    node = add_ct(slicer, value)
    roi_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "n")
    roi_node.SetCenter(-15.0, -15.0, 20.0)
    roi_node.SetSize(10, 10, 10)
    choose_task(widget, "Nodule classification")
    widget._parameterNode.inputVolume, widget._parameterNode.roi, widget._parameterNode.device = node, roi_node, "cpu"
    widget.ui.applyButton.click()
    run_events(slicer, lambda: widget._job is None)
    return node, roi_node


def test_classification_fills_a_table_beside_the_volume(with_models) -> None:
    slicer, _, widget = with_models
    node, roi_node = classify_in_panel(slicer, widget, -700)
    assert widget.ui.resultsLabel.text == "benign: 0.25  malignant: 0.75  ->  malignant"
    (table,) = slicer.mrmlScene.GetNodesByClass("vtkMRMLTableNode")
    assert slicer.app.applicationLogic().GetSelectionNode().activeTableID == table.GetID()
    rows = {table.GetTable().GetValue(r, 0).ToString(): table.GetTable().GetValue(r, 1).ToString()
            for r in range(table.GetTable().GetNumberOfRows())}
    assert rows["P(malignant)"] == "0.7500" and rows["ROI centre RAS (mm)"] == "-15.0, -15.0, 20.0"
    hierarchy = slicer.mrmlScene.subjectHierarchy
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(table)) == \
        hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node))
    assert roi_node.GetNodeReference("Med3DVolume") is node  # the ROI now knows its scan (fine-tuning uses it)


def test_engine_warnings_reach_the_panel(with_models) -> None:
    """An MR-like volume given to a CT model: the engine's warning is shown under the result."""
    slicer, _, widget = with_models
    classify_in_panel(slicer, widget, 300)
    lines = widget.ui.resultsLabel.text.splitlines()
    assert lines[0].endswith("->  malignant") and lines[1].startswith("Warning: ")


# ------------------------------------------------------------------------------------------- fine-tuning

FAKE_FINETUNE = """
import json, sys, time
for step in (1, 2):
    print(json.dumps({"kind": "progress", "stage": "finetune", "step": step, "total": 2,
                      "metrics": {"loss": 1.0 / step}}), flush=True)
    time.sleep(0.05)
"""


def test_fine_tuning_reports_plots_once_and_lists_the_new_model(panel, tmp_path) -> None:
    """The panel's side of a run, with a FAKE engine script (same JSON-lines protocol) in place of
    ``med3d finetune``; its work folder is deleted at the end (item 8)."""
    from Med3DLib import jobs, training_export

    slicer, _, widget = panel
    script = tmp_path / "fake_finetune.py"
    script.write_text(FAKE_FINETUNE)
    work = Path(jobs.work_folder("finetune"))
    (work / "images").mkdir()
    run = jobs.FinetuneJob([sys.executable, str(script)], str(tmp_path / "new.pt"), str(work))
    run.lossPlot = training_export.LossPlot()
    run.on_progress = lambda running: running.lossPlot.update(running.state.losses)
    widget._run = run.start()
    widget._timer.start()
    run_events(slicer, lambda: widget._run is None, 60)
    assert widget.ui.finetuneStatusLabel.text == f"Saved the new model as {tmp_path / 'new.pt'}"
    assert slicer.modules.plots.logic().shown == [run.lossPlot.chartNode]
    assert not work.exists() and not widget.ui.resumeButton.enabled


def test_cancelled_fine_tuning_offers_resume(panel, tmp_path) -> None:
    from Med3DLib import jobs, training_export

    slicer, _, widget = panel
    script = tmp_path / "slow.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    widget._run = jobs.FinetuneJob([sys.executable, str(script)], str(tmp_path / "new.pt"), None).start()
    widget._run.lossPlot = training_export.LossPlot()
    widget._timer.start()
    widget.ui.finetuneButton.click()  # reads "Cancel" while the run goes on
    run_events(slicer, lambda: widget._run is None, 30)
    assert widget.ui.finetuneStatusLabel.text.startswith("Cancelled.") and widget.ui.resumeButton.enabled
    assert slicer.util.errors == []
