"""Med3D's checks in a real 3D Slicer (5.8 or newer); exits non-zero on any failure.

    Slicer --no-splash --no-main-window --testing --additional-module-paths Med3DSlicer \
        --python-script Testing/Slicer/run_in_slicer.py

(Under Linux CI wrap it in ``xvfb-run -a``.) It uses the module from the source tree when the extension is not
installed, loads the ``CTChest`` sample, and runs: the module's self-test, one lung segmentation (named, coloured
segments whose terminology Slicer's own Terminologies logic accepts), one nodule classification into a table,
and one tiny fine-tuning run in a background PythonSlicer process. The models are small constant-output
ResNet-10 bundles made here, so no weights are downloaded; the checks are about the Slicer plumbing.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def prepare_paths() -> None:
    """Use the source tree's module and engine when the extension is not installed."""
    for folder in (ROOT / "Med3DSlicer", ROOT / "Med3DCore"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def make_models(folder: Path) -> None:
    import torch

    from med3dcore.nets import build_model
    from med3dcore.preprocess import PreprocessSpec
    from med3dcore.weights import save_bundle

    def bundle(name, head, bias, task, labels, **kwargs):
        torch.manual_seed(0)
        architecture = {"backbone": {"depth": 10, "shortcut_type": "B", "preact": False}, "head": head}
        net = build_model(architecture)
        last = [m for m in net.head.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear))][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor(bias))
        save_bundle(folder / name, net, architecture=architecture, task=task, labels=labels,
                    provenance={"data": "constant-output test bundle"}, **kwargs)

    bundle("lung-test.pt", {"type": "lung_decoder", "num_classes": 2, "channels": [8, 8, 8]}, [-5.0, 5.0],
           {"type": "segmentation", "name": "lung"},
           [{"value": 1, "name": "lung", "color": [197, 165, 145], "terminology": "SCT^39607008^Lung"}],
           preprocessing=PreprocessSpec(spacing=(8.0, 8.0, 8.0), window=(-1000.0, 400.0), modality="CT"))
    bundle("nodule-test.pt", {"type": "classifier", "num_classes": 2}, [0.0, math.log(3.0)],
           {"type": "classification", "name": "nodule"},
           [{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}], preprocessing={},
           extra={"nodule_input": {"cube": 16, "spacing_mm": 2.0}})


def run_checks() -> None:
    import numpy as np
    import slicer
    import SampleData
    import vtk

    import Med3D

    work = Path(tempfile.mkdtemp(prefix="Med3D-slicer-test-"))
    os.environ["MED3D_MODELS"] = str(work / "models")
    (work / "models").mkdir()
    logic = Med3D.Med3DLogic()
    logic.ensureDependencies(ask=False)  # CI installs the packages beforehand; this must find them all
    make_models(work / "models")

    Med3D.Med3DTest().runTest()
    print("Med3D: module self-test passed")

    volume = SampleData.downloadSample("CTChest")
    segmentation = logic.segment(volume, task="lung", device="cpu")
    segments = segmentation.GetSegmentation()
    check(segments.GetNumberOfSegments() == 1, "expected one lung segment")
    segment = segments.GetSegment(segments.GetSegmentIdBySegmentName("lung"))
    check(segment is not None, "no segment named 'lung'")
    tag = vtk.reference("")
    check(segment.GetTag(segment.GetTerminologyEntryTagName(), tag), "the lung segment has no terminology")
    entry = slicer.vtkSlicerTerminologyEntry()
    check(slicer.modules.terminologies.logic().DeserializeTerminologyEntry(str(tag), entry),
          f"Slicer rejects the terminology string {tag}")
    check(entry.GetTypeObject().GetCodeValue() == "39607008", "the lung terminology code was lost")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segments.GetSegmentIdBySegmentName("lung"),
                                                      volume)
    check(mask.shape == slicer.util.arrayFromVolume(volume).shape and mask.all(),
          "the constant lung model must cover the whole volume, on the volume's grid")
    print("Med3D: lung segmentation passed")

    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Nodule 1 malignant")
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    roi.SetCenter([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])
    roi.SetSize(30, 30, 30)
    probabilities = logic.classifyNodule(volume, roi, device="cpu")
    check(abs(probabilities["malignant"] - 0.75) < 1e-4, f"unexpected probabilities {probabilities}")
    check(logic.lastResultTable.GetTable().GetNumberOfRows() == 5, "the result table is incomplete")
    print("Med3D: nodule classification passed")

    # A tiny fine-tuning run on a downsampled crop of the sample, exported from the scene by the module.
    array = slicer.util.arrayFromVolume(volume)[::4, ::8, ::8].copy()
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    small = slicer.util.arrayFromVTKMatrix(matrix) @ np.diag([8.0, 8.0, 4.0, 1.0])
    pairs = []
    for index in range(2):
        node = slicer.util.addVolumeFromArray(array, small, f"small {index}")
        labels = (array < -400).astype(np.uint8)  # air and lung: a stand-in lung mask
        engine_labels = logic.volumeFromNode(node).with_array(labels)
        pairs.append((node, logic.segmentationFromLabels(engine_labels, [{"value": 1, "name": "lung"}], node,
                                                         f"small lung {index}")))
    run = logic.finetune("lung", pairs=pairs, epochs=1, newModelName="slicer-ci", device="cpu",
                         extraArgs=["--patch", "16,32,32", "--spacing", "6,6,6"])
    code = run.wait(900)
    check(code == 0 and run.failure() is None, f"fine-tuning failed: {run.failure()}")
    check(Path(run.output).is_file(), "the fine-tuned model was not saved")
    check(any(m.name == "slicer-ci" for m in logic.availableModels("lung")), "the new model is not listed")
    check(run.state.losses, "no loss was reported")
    print("Med3D: fine-tuning passed")


def main() -> int:
    prepare_paths()
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
