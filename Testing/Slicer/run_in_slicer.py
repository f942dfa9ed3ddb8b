"""Med3D's checks in a real 3D Slicer (5.8 or newer); exits non-zero on any failure.

    Slicer --no-splash --no-main-window --additional-module-paths Med3DSlicer \
        --python-script Testing/Slicer/run_in_slicer.py

(Under Linux CI wrap it in ``xvfb-run -a``. No ``--testing``: it implies ``--disable-settings``, so Slicer would
start with temporary settings, which may not know the installed PyTorch extension; the script answers the one
dialog itself and no other dialog appears without a main window.) Slicer loads the module from the source tree at start-up (Med3DLib
puts ``../Med3DCore`` on the path). The checks start from a Slicer where nothing Med3D needs is installed but
the PyTorch extension, and use the panel as a user would:

1. the module's self-test, before anything is installed;
2. the panel, built by Slicer, offers the classical lung method (no model is present); Apply on the CTChest
   sample asks to install PyTorch, nibabel and scikit-image (answered here, and checked that it was asked),
   installs them, segments the lungs in a background PythonSlicer while the event loop runs, and loads named,
   coloured segments whose terminology Slicer's own Terminologies logic accepts;
3. one nodule classification from the panel, with a tiny constant-output model made here, into a table,
   and the model's learnt outline shown as a segmentation (classifying again updates both);
4. one tiny fine-tuning run from the panel on two small cases in the scene; the new model is then listed.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def run_events(until, timeout: float, what: str) -> None:
    """Let Slicer's event loop run (timers, the panel's polling) until ``until()`` holds."""
    import slicer

    end = time.monotonic() + timeout
    while not until():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not finish within {timeout:.0f} s")
        slicer.app.processEvents()
        time.sleep(0.05)


def make_nodule_model(folder: Path) -> None:
    """A real ResNet-10 classifier whose last layer outputs logits (0, log 3): P(malignant) = 0.75 exactly, with a
    learnt nodule outline that marks the whole box shown (Testing/Slicer/bundles.py)."""
    import importlib.util

    # The module's tests' own bundle maker, loaded from its file: the engine is found by the module itself.
    spec = importlib.util.spec_from_file_location("med3d_test_bundles", Path(__file__).resolve().parent / "bundles.py")
    bundles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundles)
    bundles.constant_output_bundle(folder / "nodule-test.pt", {"type": "classifier", "num_classes": 2},
                                   [0.0, math.log(3.0)], {"type": "classification", "name": "nodule"},
                                   bundles.NODULE_LABELS, preprocessing={},
                                   extra=bundles.outline_extra({"cube": 16, "spacing_mm": 2.0}))


def choose(combo, text: str) -> None:
    index = combo.findText(text)
    check(index >= 0, f"'{text}' is not in the list {[combo.itemText(i) for i in range(combo.count)]}")
    combo.currentIndex = index


def run_checks() -> None:
    work = Path(tempfile.mkdtemp(prefix="Med3D-slicer-test-"))
    try:
        _run_checks(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_checks(work: Path) -> None:
    import numpy as np
    import qt
    import slicer
    import vtk

    import Med3D

    os.environ["MED3D_MODELS"] = str(work / "models")
    (work / "models").mkdir()

    Med3D.Med3DTest().runTest()
    print("Med3D: module self-test passed")

    widget = slicer.util.getModuleWidget("Med3D")  # built by Slicer: setup() from Med3D.ui
    ui, parameters = widget.ui, widget._parameterNode
    check(ui.modelComboBox.itemData(ui.modelComboBox.currentIndex) == "classical",
          "without a lung model the panel must offer the classical method")
    import SampleData

    volume = SampleData.downloadSample("CTChest")
    parameters.inputVolume, parameters.device = volume, "cpu"
    questions = []
    confirm = slicer.util.confirmOkCancelDisplay

    def answer(text, *args, **kwargs):  # the dialog, answered as a user would: OK
        questions.append(text)
        return True

    from Med3DLib import dependencies

    needed = not dependencies.plan_install().nothing_to_do
    slicer.util.confirmOkCancelDisplay = answer
    try:
        ui.applyButton.click()
    finally:
        slicer.util.confirmOkCancelDisplay = confirm
    check(len(questions) == int(needed), f"asked {len(questions)} time(s) to install; something was missing: {needed}")
    check(ui.applyButton.text == "Cancel", f"Apply did not start a background run: {ui.statusLabel.text}")
    run_events(lambda: widget._job is None, 900, "lung segmentation")
    check(ui.statusLabel.text == "Done.", f"lung segmentation: {ui.statusLabel.text}")
    (segmentation,) = slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode")
    segments = segmentation.GetSegmentation()
    names = [segments.GetSegment(segments.GetNthSegmentID(i)).GetName() for i in range(segments.GetNumberOfSegments())]
    check(names == ["right lung", "left lung"], f"unexpected segments {names}")
    for index in range(segments.GetNumberOfSegments()):
        segment = segments.GetSegment(segments.GetNthSegmentID(index))
        tag = vtk.reference("")
        check(segment.GetTag(segment.GetTerminologyEntryTagName(), tag), f"{segment.GetName()} has no terminology")
        entry = slicer.vtkSlicerTerminologyEntry()
        check(slicer.modules.terminologies.logic().DeserializeTerminologyEntry(str(tag), entry),
              f"Slicer rejects the terminology string {tag}")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segments.GetNthSegmentID(0), volume)
    check(mask.shape == slicer.util.arrayFromVolume(volume).shape and mask.any(), "the right lung is empty")
    print(f"Med3D: lung segmentation passed (packages installed after asking: {needed})")

    make_nodule_model(work / "models")
    choose(ui.taskComboBox, "Nodule classification")
    check(ui.modelComboBox.currentText == "nodule-test", "the new nodule model is not listed")
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Nodule 1 malignant")
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    roi.SetCenter([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])
    roi.SetSize(30, 30, 30)
    parameters.roi = roi
    ui.applyButton.click()
    run_events(lambda: widget._job is None, 600, "nodule classification")
    check(ui.resultsLabel.text.startswith("benign: 0.25  malignant: 0.75"), f"classification: {ui.resultsLabel.text}")
    (table,) = slicer.mrmlScene.GetNodesByClass("vtkMRMLTableNode")
    check(table.GetTable().GetNumberOfRows() >= 5, "the result table is incomplete")
    outline = slicer.util.getNode("Nodule 1 malignant outline (estimated)")  # the learnt outline, to check by eye
    parts = outline.GetSegmentation()
    check(parts.GetNumberOfSegments() == 1, f"the outline has {parts.GetNumberOfSegments()} segments")
    check(slicer.util.arrayFromSegmentBinaryLabelmap(outline, parts.GetNthSegmentID(0), volume).any(),
          "the learnt outline is empty")
    ui.applyButton.click()  # the same ROI again: its table and outline are updated, not added again
    run_events(lambda: widget._job is None, 600, "nodule classification again")
    check(list(slicer.mrmlScene.GetNodesByClass("vtkMRMLTableNode")) == [table], "a second result table was added")
    outlines = [n for n in slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode")
                if n.GetName().startswith("Nodule 1 malignant outline")]
    check(outlines == [outline], f"{len(outlines)} outlines after classifying the ROI twice")
    print("Med3D: nodule classification passed")

    # Two small cases (a downsampled copy of the sample with a stand-in lung mask) checked in the panel.
    choose(ui.taskComboBox, "Lung segmentation")
    array = slicer.util.arrayFromVolume(volume)[::4, ::8, ::8].copy()
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    small = slicer.util.arrayFromVTKMatrix(matrix) @ np.diag([8.0, 8.0, 4.0, 1.0])
    for index in range(2):
        node = slicer.util.addVolumeFromArray(array, small, f"small {index}")
        labels = widget.logic.volumeFromNode(node).with_array((array < -400).astype(np.uint8))
        case = widget.logic.segmentationFromLabels(labels, [{"value": 1, "name": "lung"}], node, f"small lung {index}")
        ui.trainingSegmentationsSelector.setCheckState(case, qt.Qt.Checked)
    parameters.epochs, parameters.newModelName = 1, "slicer-ci"
    ui.finetuneButton.click()
    check(ui.finetuneButton.text == "Cancel", f"fine-tuning did not start: {ui.finetuneStatusLabel.text}")
    run_events(lambda: widget._run is None, 1200, "fine-tuning")
    check(ui.finetuneStatusLabel.text.startswith("Saved the new model as"), f"fine-tuning: {ui.finetuneStatusLabel.text}")
    check((work / "models" / "slicer-ci.pt").is_file(), "the fine-tuned model was not saved")
    check("slicer-ci" in [ui.modelComboBox.itemText(i) for i in range(ui.modelComboBox.count)],
          "the new model is not listed")
    print("Med3D: fine-tuning passed")


def main() -> int:
    try:
        run_checks()
    except Exception:
        traceback.print_exc()
        return 1
    print("Med3D: all checks passed in Slicer")
    return 0


if __name__ == "__main__":
    code = main()
    import slicer

    slicer.util.exit(code)
