"""What the panel shows: the model, start-model and device lists, and the state of a background segmentation,
classification or fine-tuning run (progress, Cancel, results, errors). Functions of the panel's ``ui`` (the
widgets of Med3D.ui); Slicer is imported inside functions."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import device_probe, jobs, models, scene


def fill_combo(combo: Any, choices: Sequence[Tuple[str, Any]], keep: Any) -> None:
    """Refill ``combo`` without emitting signals; ``keep`` stays chosen when still listed, else the first item."""
    blocked = combo.blockSignals(True)
    combo.clear()
    for title, data in choices:
        combo.addItem(title, data)
    combo.setCurrentIndex(max(combo.findData(keep), 0) if choices else -1)
    combo.blockSignals(blocked)


def fill_model_lists(ui: Any, entries: List[Any], task: str, modelPath: str, folder: str) -> None:
    """The task's models (lung: then the classical method), the starting models, the note under the list, and
    the inputs that belong to the task."""
    fill_combo(ui.modelComboBox, models.model_choices(entries, task), modelPath)
    fill_combo(ui.startModelComboBox, models.start_model_choices(entries),
               ui.startModelComboBox.itemData(ui.startModelComboBox.currentIndex))
    combo = ui.modelComboBox
    if combo.count == 1 and combo.itemData(0) == models.CLASSICAL:
        ui.modelInfoLabel.text = (f"No trained lung model in {folder}: the classical method (thresholds, no "
                                  "weights) is used. Add or fine-tune a model for better results.")
    else:
        ui.modelInfoLabel.text = "" if combo.count else models.no_model_text(task, folder)
    isNodule = task == "nodule"
    for name in ("roiSelector", "createRoiButton", "noduleMaskSelector"):
        getattr(ui, name).enabled = isNodule
    ui.trainingSegmentationsSelector.visible = not isNodule
    ui.trainingROIsSelector.visible = isNodule


def fill_device_list(ui: Any, found: Dict[str, Any], wanted: str) -> Optional[str]:
    """The devices a probe found; returns the device to store when ``wanted`` is not there (e.g. a scene
    saved on a computer with another GPU): then auto, once the probe has answered."""
    items, text = device_probe.device_choices(found)
    fill_combo(ui.deviceComboBox, items, wanted)
    ui.deviceInfoLabel.text = text
    listed = ui.deviceComboBox.findData(wanted) >= 0
    return None if listed or found.get("pending") else "auto"


def finetune_arguments(ui: Any, parameters: Any, task: str) -> Dict[str, Any]:
    """The arguments of ``Med3DLogic.finetune`` from the panel: checked scene cases (or a folder or table), the
    starting model, epochs, learning rate, the new model's name and the device."""
    from . import training_export

    selector = ui.trainingROIsSelector if task == "nodule" else ui.trainingSegmentationsSelector
    start = ui.startModelComboBox
    return dict(task=task, pairs=training_export.training_pairs(task, selector.checkedNodes(), parameters.inputVolume),
                folder=training_source(ui), startModel=start.itemData(start.currentIndex) or None,
                epochs=parameters.epochs, learningRate=parameters.learningRate,
                newModelName=parameters.newModelName, device=parameters.device)


def training_source(ui: Any) -> Optional[str]:
    """The table (file) or the folder chosen for training; a table wins."""
    return ui.trainingTableEdit.currentPath or ui.trainingFolderEdit.currentPath or None


# --------------------------------------------------------------------------------------- inference runs

def inference_started(ui: Any) -> None:
    ui.applyButton.text = "Cancel"
    ui.progressBar.value = 0
    ui.progressBar.show()
    ui.statusLabel.text = "Starting (loading PyTorch and the model)..."
    ui.resultsLabel.text = ""


def show_progress(bar: Any, label: Any, job: jobs.Job) -> None:
    if job.state.fraction is not None:
        bar.value = int(round(100 * job.state.fraction))
    if job.state.stage:
        label.text = job.state.status_text()


def inference_ended(ui: Any, job: jobs.InferenceJob) -> Any:
    """Load the result (main thread) and show it; an error is shown and logged, the panel stays usable.
    Returns the result (None when cancelled or failed)."""
    import slicer

    ui.applyButton.text = "Apply"
    ui.progressBar.hide()
    try:
        with slicer.util.tryWithErrorDisplay("Med3D failed.", waitCursor=True):
            result = job.finish()
    except Exception as error:
        logging.error(f"Med3D: {error}")
        ui.statusLabel.text = f"Failed: {error}"
        return None
    if result is None:
        ui.statusLabel.text = "Cancelled."
        return None
    ui.statusLabel.text = "Done."
    if job.table is not None:
        ui.resultsLabel.text = scene.probabilities_text(job.state.result)
        scene.show_table(job.table)
    else:
        ui.resultsLabel.text = f"Created '{result.GetName()}'"
    for warning in job.warnings:
        ui.resultsLabel.text += f"\nWarning: {warning}"
    return result


# --------------------------------------------------------------------------------------- fine-tuning runs

def finetune_started(ui: Any) -> None:
    ui.finetuneButton.text = "Cancel"
    ui.resumeButton.enabled = False
    ui.finetuneProgressBar.value = 0
    ui.finetuneProgressBar.show()


def finetune_progress(ui: Any, run: jobs.FinetuneJob, chartShown: bool) -> bool:
    """Progress and loss plot; returns whether the chart is shown (once: the user may change the layout)."""
    import slicer

    show_progress(ui.finetuneProgressBar, ui.finetuneStatusLabel, run)
    if run.lossPlot is not None and run.lossPlot.chartNode is not None and not chartShown:
        slicer.modules.plots.logic().ShowChartInLayout(run.lossPlot.chartNode)
        return True
    return chartShown


def finetune_ended(ui: Any, run: jobs.FinetuneJob) -> bool:
    """Shows how the run ended; True when a new model was saved."""
    import slicer

    ui.finetuneButton.text = "Start fine-tuning"
    ui.finetuneProgressBar.hide()
    failure = run.failure()
    ui.resumeButton.enabled = run.cancelled or failure is not None
    if run.cancelled:
        ui.finetuneStatusLabel.text = "Cancelled. 'Resume' continues from the last checkpoint."
        return False
    if failure:
        ui.finetuneStatusLabel.text = f"Failed: {failure}"
        slicer.util.errorDisplay(failure, windowTitle="Med3D fine-tuning")
        return False
    ui.finetuneStatusLabel.text = f"Saved the new model as {run.output}"
    return True
