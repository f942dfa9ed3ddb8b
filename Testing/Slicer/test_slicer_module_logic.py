"""Med3D.py's logic (the console API) against the Slicer double in its 5.8 and 5.10 modes, with the real engine in
background processes: node <-> Volume, parent transforms, segments from label maps, world alignment of results
on flipped/permuted/oblique nodes, nodule classification into a table, dependency installs, scene export for
fine-tuning (each ROI with its own scan) and the background runs with their work folders."""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import vtk

from Med3DLib import geometry, segments
from bundles import LUNG_LABELS, NODULE_LABELS, constant_output_bundle, outline_extra
from med3dcore.classical_lung import inside_body
from med3dcore.errors import Med3DError
from med3dcore.phantoms import make_ct_phantom, store_as
from med3dcore.preprocess import PreprocessSpec
from med3dcore.volume import Volume
from med3dcore.volume_files import read_volume, write_volume

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    constant_output_bundle(folder / "lung-everywhere.pt",
                           {"type": "lung_decoder", "num_classes": 2, "channels": [8, 8, 8]}, [-5.0, 5.0],
                           {"type": "segmentation", "name": "lung"}, LUNG_LABELS,
                           preprocessing=PreprocessSpec(spacing=(6.0, 6.0, 6.0), window=(-1000.0, 400.0),
                                                        modality="CT"))
    constant_output_bundle(folder / "nodule-3to1.pt", {"type": "classifier", "num_classes": 2},
                           [0.0, math.log(3.0)], {"type": "classification", "name": "nodule"},
                           NODULE_LABELS, preprocessing={}, extra={"nodule_input": {"cube": 16, "spacing_mm": 2.0}})
    constant_output_bundle(folder / "nodule-outline.pt", {"type": "classifier", "num_classes": 2},
                           [0.0, math.log(3.0)], {"type": "classification", "name": "nodule"},
                           NODULE_LABELS, preprocessing={}, extra=outline_extra({"cube": 16, "spacing_mm": 2.0}))
    return folder


@pytest.fixture()
def env(slicer_double, model_folder, monkeypatch):
    monkeypatch.setenv("MED3D_MODELS", str(model_folder))
    slicer, med3d = slicer_double
    return slicer, med3d, med3d.Med3DLogic()


def add_volume(slicer, volume: Volume, name: str = "ct"):
    array, matrix = geometry.node_data_from_volume(volume)
    return slicer.util.addVolumeFromArray(array, matrix, name)


def scene_matrix(node) -> np.ndarray:
    from Med3DLib import scene

    return scene.ijk_to_ras(node)


def segment_world_mask(slicer, segmentation_node, segment_name: str, reference_node) -> np.ndarray:
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
    assert segment_id, f"no segment named {segment_name}"
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference_node)


# ------------------------------------------------------------------------------------------------ basics

def test_importing_the_module_does_not_import_torch() -> None:
    """Dependencies on first use, never at import: a fresh interpreter imports Med3D without torch."""
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(ROOT / 'Med3DSlicer')!r}, {str(ROOT / 'Testing' / 'Slicer')!r}]
        import slicer_double
        slicer_double.install()
        import Med3D
        assert Med3D.Med3DLogic is not None
        print("torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_parameter_node_defaults_and_persistence(env) -> None:
    slicer, med3d, logic = env
    parameters = logic.getParameterNode()
    assert parameters.task == "Lung segmentation" and parameters.device == "auto"
    assert parameters.epochs == 10 and parameters.learningRate == pytest.approx(0.001)
    parameters.epochs = 3
    assert med3d.Med3DLogic().getParameterNode().epochs == 3  # stored in the scene, not the widget
    for name, value in (("epochs", 0), ("learningRate", 2.0), ("task", "Brain segmentation")):
        with pytest.raises(ValueError):  # Slicer's validators refuse it
            setattr(parameters, name, value)


def test_volume_from_node_equals_the_engine_reader(env, data_dir) -> None:
    slicer, _, logic = env
    for relative in ("mr/brain_mr_1.nrrd", "ct/abdomen_ct_small.nii.gz"):
        node = slicer.util.loadVolume(str(data_dir / relative))
        volume = logic.volumeFromNode(node)
        expected = read_volume(data_dir / relative)
        assert volume.same_geometry(expected)
        np.testing.assert_array_equal(volume.array, expected.array)
        assert volume.array is not slicer.util.arrayFromVolume(node)


def test_a_parent_transform_is_refused_and_the_scene_left_alone(env) -> None:
    slicer, _, logic = env
    node = add_volume(slicer, Volume(np.zeros((4, 5, 6), np.int16)))
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    before = slicer.mrmlScene.GetNumberOfNodes()
    with pytest.raises(Med3DError, match="under the transform 'Registration'.*Harden"):
        logic.segment(node, "lung")
    assert slicer.mrmlScene.GetNumberOfNodes() == before
    assert node.GetParentTransformNode() is transform
    with pytest.raises(Med3DError, match="no input volume"):
        logic.segment(None, "lung")
    with pytest.raises(Med3DError, match="not a segmentation task"):
        logic.segment(node, "nodule")


# ----------------------------------------------------------------------------------------------- segments

def test_segmentation_from_labels_names_colours_codes_and_cleans_up(env) -> None:
    slicer, _, logic = env
    image = Volume(np.zeros((6, 7, 8), np.int16), spacing=(1.5, 1.5, 3.0), origin=(5.0, -3.0, 10.0))
    reference = add_volume(slicer, image)
    labels = np.zeros(image.shape, np.int32)
    labels[1:3, 2:4, 2:5] = 1
    labels[4, 5, 6] = 2
    info = [{"value": 1, "name": "liver", "color": [221, 130, 101], "terminology": "SCT^10200004^Liver"},
            {"value": 2, "name": "liver tumour", "color": [144, 238, 144],
             "terminology": "SCT^108369006^Neoplasm"},
            {"value": 3, "name": "absent"}]
    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    node = logic.segmentationFromLabels(image.with_array(labels), info, reference, "ct liver")
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes_before + 1  # temporary label map and colours removed
    segmentation = node.GetSegmentation()
    assert [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName() for i in range(2)] == \
        ["liver", "liver tumour"]
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    np.testing.assert_allclose(liver.GetColor(), np.array([221, 130, 101]) / 255)
    tag = vtk.reference("")
    assert liver.GetTag(liver.GetTerminologyEntryTagName(), tag)
    assert segments.parse_terminology(str(tag))["type"] == ("SCT", "10200004", "Liver")
    tumour = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver tumour"))
    tumour.GetTag("TerminologyEntry", tag)
    assert "Morphologically Altered Structure" in str(tag)
    np.testing.assert_array_equal(segment_world_mask(slicer, node, "liver", reference), labels == 1)
    assert node.hasClosedSurface and node.GetNodeReference("referenceImageGeometryRef") is reference
    # Reusing the node replaces its segments.
    logic.segmentationFromLabels(image.with_array((labels == 2).astype(np.uint8)), info, reference, "x", node)
    assert segmentation.GetNumberOfSegments() == 1


def test_segments_are_named_by_label_order_whatever_the_import_calls_them(env, monkeypatch) -> None:
    """Slicer names a lone label's segment after the label-map node (4.11-5.6 even when the colour table names
    it; 5.8 when the table does not): the module names segments itself, by label order."""
    import double_mrml

    slicer, _, logic = env
    monkeypatch.setattr(double_mrml.ColorTableNode, "GetColorName", lambda self, index: "")
    image = Volume(np.zeros((4, 5, 6), np.int16))
    reference = add_volume(slicer, image)
    labels = np.zeros(image.shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    node = logic.segmentationFromLabels(image.with_array(labels), LUNG_LABELS, reference, "ct lung")
    segmentation = node.GetSegmentation()
    assert segmentation.GetSegment(segmentation.GetNthSegmentID(0)).GetName() == "lung"  # not "ct lung labels"
    labels[3, 4, 5] = 2
    info = LUNG_LABELS + [{"value": 2, "name": "trachea", "terminology": "SCT^44567001^Trachea"}]
    logic.segmentationFromLabels(image.with_array(labels), info, reference, "ct lung", node)
    assert [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName() for i in range(2)] == \
        ["lung", "trachea"]  # not "Label_1", "Label_2"
    np.testing.assert_array_equal(segment_world_mask(slicer, node, "trachea", reference), labels == 2)


def test_empty_result_gives_an_empty_segmentation(env) -> None:
    slicer, _, logic = env
    image = Volume(np.zeros((3, 4, 5), np.int16))
    node = logic.segmentationFromLabels(image.with_array(np.zeros((3, 4, 5), np.uint8)), LUNG_LABELS,
                                        add_volume(slicer, image), "empty")
    assert node.GetSegmentation().GetNumberOfSegments() == 0


def world_labels(volume: Volume) -> Volume:
    """Labels from each voxel's world position: the patient's left half (LPS x > 0) is 1, and above z = 10 mm
    in it 2, so any misplacement shows."""
    k, j, i = np.indices(volume.shape)
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    lps = ijk @ (volume.direction * np.asarray(volume.spacing)).T + np.asarray(volume.origin)
    labels = (lps[:, 0] > 0).astype(np.uint8)
    labels[(labels == 1) & (lps[:, 2] > 10)] = 2
    return volume.with_array(labels.reshape(volume.shape))


def oblique(volume: Volume) -> Volume:
    angle = np.radians(25)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    return Volume(volume.array, volume.spacing, volume.origin, rotation @ volume.direction)


@pytest.mark.parametrize("storage", ["as-is", "flipped", "permuted", "oblique"])
def test_results_line_up_in_world_space(env, storage) -> None:
    """The path a result takes: the node exported to a file (as the background job gets it), labels computed
    on that file's geometry, written, read back and imported as segments on the node."""
    from Med3DLib import inference, scene

    slicer, _, logic = env
    image, _, _ = make_ct_phantom((10, 12, 14), (3.0, 2.5, 4.0), seed=1)
    image = Volume(image.array, image.spacing, (-15.0, -20.0, -12.0), image.direction)
    stored = {"as-is": image, "flipped": store_as(image, flip=(0, 2)),
              "permuted": store_as(image, flip=(1,), permute=(2, 0, 1)), "oblique": oblique(image)}[storage]
    node = add_volume(slicer, stored, storage)
    folder, exported = inference.export_input("test", node)
    try:
        labels_file = Path(folder) / "labels.nrrd"
        write_volume(world_labels(read_volume(exported)), labels_file)
        info = [{"value": 1, "name": "left", "color": [255, 0, 0]}, {"value": 2, "name": "left top"}]
        result = scene.segmentation_from_labels(read_volume(labels_file), info, node, "world")
    finally:
        shutil.rmtree(folder)
    left = segment_world_mask(slicer, result, "left", node)
    top = segment_world_mask(slicer, result, "left top", node)
    # Expected from the node's own IJK-to-RAS, as Slicer would place each voxel: RAS x < 0 is patient left.
    k, j, i = np.indices(stored.shape)
    ras = geometry.ijk_to_ras(scene.ijk_to_ras(node),
                              np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)).reshape(stored.shape + (3,))
    assert left.any() and top.any()
    np.testing.assert_array_equal(left.astype(bool), (ras[..., 0] < 0) & ~(ras[..., 2] > 10))
    np.testing.assert_array_equal(top.astype(bool), (ras[..., 0] < 0) & (ras[..., 2] > 10))


# --------------------------------------------------------------------------------------- real engine runs

def test_segment_with_a_real_bundle_on_a_real_scan(env, data_dir, model_folder) -> None:
    """The blocking console form: waits for the background job, reports progress, returns the node."""
    slicer, _, logic = env
    node = slicer.util.loadVolume(str(data_dir / "ct" / "abdomen_ct_small.nii.gz"))
    before = slicer.util.arrayFromVolume(node).copy()
    events = []
    logic.progressCallback = lambda fraction, text: events.append((fraction, text))
    result = logic.segment(node, task="lung", model=str(model_folder / "lung-everywhere.pt"), device="cpu")
    assert result.GetName() == f"{node.GetName()} lung"
    mask = segment_world_mask(slicer, result, "lung", node)
    # the bundle's constant output, lung everywhere, as the lung clean-up leaves it: the body (its two largest
    # pieces), nothing outside it, in the right place
    body = inside_body(read_volume(data_dir / "ct" / "abdomen_ct_small.nii.gz"))
    mask = mask.astype(bool)
    assert mask.shape == before.shape and not (mask & ~body).any() and mask.sum() > 0.99 * body.sum() > 0
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)  # input untouched
    assert events and events[-1][0] == 1.0, "the engine's progress never reached the progress callback"


def test_without_a_lung_model_the_classical_method_segments_both_lungs(env, data_dir, tmp_path, monkeypatch) -> None:
    slicer, _, logic = env
    monkeypatch.setenv("MED3D_MODELS", str(tmp_path))  # no model at all
    node = slicer.util.loadVolume(str(data_dir / "ct" / "abdomen_ct_small.nii.gz"))
    segmentation = logic.segment(node, "lung", device="cpu").GetSegmentation()
    names = [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName() for i in range(2)]
    assert names == ["right lung", "left lung"]
    codes = []
    for index in range(2):  # SNOMED CT: right lung structure 3341006, left lung structure 44029006
        tag = vtk.reference("")
        assert segmentation.GetSegment(segmentation.GetNthSegmentID(index)).GetTag("TerminologyEntry", tag)
        codes.append(segments.parse_terminology(str(tag))["type"][1])
    assert codes == ["3341006", "44029006"]


def test_an_engine_error_is_one_clear_line(env, model_folder) -> None:
    slicer, _, logic = env
    node = add_volume(slicer, Volume(np.full((8, 8, 8), -700, np.int16)))
    with pytest.raises(Med3DError) as caught:  # the engine refuses a nodule model for segmentation
        logic.segment(node, "lung", model=str(model_folder / "nodule-3to1.pt"), device="cpu")
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message and "exit code" not in message
    assert "classification" in message and not slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode")


def test_classify_nodule_fills_the_table(env, data_dir) -> None:
    slicer, _, logic = env
    node = slicer.util.loadVolume(str(data_dir / "ct" / "chest_ct.nrrd"))
    roi_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Nodule 1")
    centre = geometry.ijk_to_ras(scene_matrix(node), [[256, 256, 24]])[0]
    roi_node.SetCenter(centre)
    roi_node.SetSize(20, 20, 20)
    probabilities = logic.classifyNodule(node, roi_node, device="cpu")
    assert probabilities == pytest.approx({"benign": 0.25, "malignant": 0.75})
    table = logic.lastResultTable.GetTable()
    rows = {table.GetValue(r, 0).ToString(): table.GetValue(r, 1).ToString() for r in range(table.GetNumberOfRows())}
    assert rows["P(benign)"] == "0.2500" and rows["P(malignant)"] == "0.7500" and rows["class"] == "malignant"
    assert rows["ROI centre RAS (mm)"] == ", ".join(f"{v:.1f}" for v in centre)
    assert rows["ROI size (mm)"] == "20.0, 20.0, 20.0"


def test_classify_with_a_mask_uses_the_masked_nodule(env, data_dir) -> None:
    slicer, _, logic = env
    node = add_volume(slicer, Volume(np.full((20, 30, 30), -700, np.int16), spacing=(1.0, 1.0, 2.0)))
    labels = np.zeros((20, 30, 30), np.uint8)
    labels[8:12, 10:16, 10:16] = 1
    mask = logic.segmentationFromLabels(logic.volumeFromNode(node).with_array(labels), [{"value": 1, "name": "n"}],
                                        node, "nodule mask")
    assert logic.classifyNodule(node, maskNode=mask, device="cpu") == pytest.approx({"benign": 0.25, "malignant": 0.75})
    table = logic.lastResultTable.GetTable()
    rows = {table.GetValue(r, 0).ToString(): table.GetValue(r, 1).ToString() for r in range(table.GetNumberOfRows())}
    # The box the network saw: the mask's 6 x 6 x 8 mm box plus the 8 mm context margin on every side.
    assert rows["ROI size (mm)"] == "22.0, 22.0, 24.0"
    # The nodule's measured size: 144 voxels of 2 mm^3, and the sphere of that volume.
    assert float(rows["volume (mL)"]) == pytest.approx(0.288)
    assert float(rows["diameter (mm)"]) == pytest.approx((6 * 288 / np.pi) ** (1 / 3), rel=1e-5)


def test_classify_with_an_roi_shows_the_learnt_outline(env, model_folder) -> None:
    """A model fine-tuned with masks estimates the nodule's outline from the ROI alone (nodule_outline.py); the
    module shows it as a segment to check. This model's outline marks the whole cube it was shown."""
    slicer, _, logic = env
    node = add_volume(slicer, Volume(np.full((20, 30, 30), -700, np.int16), spacing=(1.0, 1.0, 2.0)))
    roi_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Nodule 2")
    roi_node.SetCenter(geometry.ijk_to_ras(scene_matrix(node), [[15, 15, 10]])[0])
    roi_node.SetSize(10, 10, 10)
    probabilities = logic.classifyNodule(node, roi_node, model=str(model_folder / "nodule-outline.pt"), device="cpu")
    assert probabilities == pytest.approx({"benign": 0.25, "malignant": 0.75})  # the fusion gives the image's own
    table_node = logic.lastResultTable
    table = table_node.GetTable()
    rows = {table.GetValue(r, 0).ToString(): table.GetValue(r, 1).ToString() for r in range(table.GetNumberOfRows())}
    assert rows["probability from"] == "image + learnt outline measures"
    assert rows["size from"] == "learnt outline (an estimate)"
    outline = logic.lastOutline
    assert outline.GetName() == "Nodule 2 outline (estimated)"
    segmentation = outline.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    assert segmentation.GetSegment(segmentation.GetNthSegmentID(0)).GetName() == "nodule outline (estimated)"
    # every voxel centre inside the 10 mm box: I and J 10 voxels of 1 mm, K 5 slices of 2 mm (10.0 +- 2.5)
    expected = np.zeros((20, 30, 30), bool)
    expected[8:13, 10:21, 10:21] = True
    np.testing.assert_array_equal(segment_world_mask(slicer, outline, "nodule outline (estimated)", node), expected)
    # the size is measured on the cube: 6 of its 2 mm voxels per axis have their centres in the 10 mm box
    assert float(rows["volume (mL)"]) == pytest.approx(6 ** 3 * 8 / 1000)
    # Classifying the same ROI again updates its table and outline instead of adding new ones (the ROI keeps node
    # references to them, as vtkMRMLNode::SetNodeReferenceID stores them) ...
    tables, segmentations = (len(slicer.mrmlScene.GetNodesByClass(c))
                             for c in ("vtkMRMLTableNode", "vtkMRMLSegmentationNode"))
    roi_node.SetSize(10, 10, 6)
    logic.classifyNodule(node, roi_node, model=str(model_folder / "nodule-outline.pt"), device="cpu")
    assert logic.lastResultTable is table_node and logic.lastOutline is outline
    assert len(slicer.mrmlScene.GetNodesByClass("vtkMRMLTableNode")) == tables
    assert len(slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode")) == segmentations
    assert segment_world_mask(slicer, outline, "nodule outline (estimated)", node).sum() < expected.sum()
    # ... and a model without an outline removes the earlier outline, which no longer says where the answer came from
    logic.classifyNodule(node, roi_node, model=str(model_folder / "nodule-3to1.pt"), device="cpu")
    assert logic.lastOutline is None and slicer.mrmlScene.GetNodeByID(outline.GetID()) is None
    assert len(slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode")) == segmentations - 1
    table = logic.lastResultTable.GetTable()
    assert logic.lastResultTable is table_node
    rows = {table.GetValue(r, 0).ToString(): table.GetValue(r, 1).ToString() for r in range(table.GetNumberOfRows())}
    assert rows["probability from"] == "image" and "size from" not in rows
    # with a mask there is no outline to estimate: the mask is the outline
    labels = expected.astype(np.uint8)
    mask = logic.segmentationFromLabels(logic.volumeFromNode(node).with_array(labels), [{"value": 1, "name": "n"}],
                                        node, "nodule mask")
    logic.classifyNodule(node, maskNode=mask, model=str(model_folder / "nodule-outline.pt"), device="cpu")
    assert logic.lastOutline is None


def test_classify_refuses_bad_rois_before_loading_a_model(env) -> None:
    slicer, _, logic = env
    node = add_volume(slicer, Volume(np.zeros((5, 6, 7), np.int16)))
    roi_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far")
    roi_node.SetCenter(500.0, 0.0, 0.0)
    roi_node.SetSize(10, 10, 10)
    with pytest.raises(Med3DError, match="does not contain any voxel"):
        logic.classifyNodule(node, roi_node, model="/nonexistent.pt")
    with pytest.raises(Med3DError, match="no ROI is selected"):
        logic.classifyNodule(node, None)


def test_create_roi_at_the_crosshair(env) -> None:
    from Med3DLib import scene

    slicer, _, logic = env
    crosshair = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLCrosshairNode")
    crosshair.position = [10.0, -20.0, 5.0]
    volume = add_volume(slicer, Volume(np.zeros((4, 5, 6), np.int16)))
    node = logic.createRoiAtCursor(25.0, volume)
    assert node.GetNodeReference(scene.ROI_VOLUME_ROLE) is volume
    centre, size, axes = scene.roi_from_node(node)
    np.testing.assert_allclose(centre, [10, -20, 5])
    np.testing.assert_allclose(size, [25, 25, 25])
    np.testing.assert_allclose(axes, np.eye(3))


def test_model_file_is_added_once_and_listed(env, model_folder, tmp_path, monkeypatch) -> None:
    slicer, _, logic = env
    own = tmp_path / "own"
    own.mkdir()
    monkeypatch.setenv("MED3D_MODELS", str(own))
    assert logic.availableModels("lung") == []
    added = logic.addModelFile(str(model_folder / "lung-everywhere.pt"))
    assert Path(added).parent == own
    assert [m.name for m in logic.availableModels("lung")] == ["lung-everywhere"]
    with pytest.raises(Med3DError, match="already in"):
        logic.addModelFile(str(model_folder / "lung-everywhere.pt"))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(Med3DError, match="is not a Med3D model"):
        logic.addModelFile(str(broken))
    assert not (own / "broken.pt").exists()


# ------------------------------------------------------------------------------------------- dependencies

def test_missing_packages_are_installed_only_after_asking(env, monkeypatch) -> None:
    slicer, med3d, logic = env
    import PyTorchUtils
    from Med3DLib import dependencies

    missing = {"torch", "nibabel"}
    monkeypatch.setattr(dependencies, "is_installed", lambda name: name not in missing)
    slicer.util.confirmAnswer = False
    with pytest.raises(Med3DError, match="needs these packages to run: torch, nibabel>=4.0"):
        logic.ensureDependencies()
    assert slicer.util.pipInstalls == [] and PyTorchUtils.installs == []
    slicer.util.confirmAnswer = True
    record = slicer.util.pip_install

    def pip_install(arguments):  # the install works: the packages become importable
        record(arguments)
        assert "numpy==" in Path(arguments[2]).read_text()  # Slicer's numpy pinned: pip cannot replace it
        missing.difference_update(a.split(">=")[0] for a in arguments)

    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    # torch installed but still not importable (Python cached the folder's contents): restart needed.
    with pytest.raises(Med3DError, match="still not importable after the install: torch; restart Slicer"):
        logic.ensureDependencies()
    assert "nibabel>=4.0" in slicer.util.confirmations[-1]
    (arguments,) = slicer.util.pipInstalls
    assert arguments[:2] == ["nibabel>=4.0", "-c"] and PyTorchUtils.installs == [["install", "torch>=1.13",
                                                                                 "torchvision"]]
    assert not Path(arguments[2]).exists()  # the constraints file's folder is gone again (item 8)
    missing.clear()
    asked = len(slicer.util.confirmations)
    logic.ensureDependencies()  # nothing missing: no question
    assert len(slicer.util.confirmations) == asked


# --------------------------------------------------------------------------------------------- fine-tuning

def test_export_training_cases_from_the_scene_leaves_nodes_untouched(env, tmp_path) -> None:
    from Med3DLib import training_export

    slicer, _, logic = env
    image, labels, _ = make_ct_phantom((8, 10, 12), (3.0, 3.0, 3.0), seed=2)
    volume_node = add_volume(slicer, image, "phantom")
    lung = labels.with_array((labels.array == 1).astype(np.uint8))
    segmentation_node = logic.segmentationFromLabels(lung, LUNG_LABELS, volume_node, "phantom lung")
    voxels = slicer.util.arrayFromVolume(volume_node).copy()
    modified = volume_node.modifiedCount
    pairs = training_export.training_pairs("lung", [segmentation_node])
    assert pairs == [(volume_node, segmentation_node)]  # the segmentation's own reference volume
    table = training_export.export_training_cases("lung", pairs, str(tmp_path))
    exported = read_volume(tmp_path / "labels" / "case_000.nii.gz")
    np.testing.assert_array_equal(exported.array, lung.array)
    assert exported.same_geometry(image) and Path(table).is_file()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume_node), voxels)
    assert volume_node.modifiedCount == modified


def test_each_nodule_roi_is_exported_with_the_scan_it_marks(env, tmp_path) -> None:
    """Item 6: every checked ROI used to be paired with the current input volume, whatever scan it was drawn on."""
    from Med3DLib import training_export

    slicer, _, logic = env
    first = add_volume(slicer, Volume(np.full((10, 10, 10), -700, np.int16), origin=(0.0, 0.0, 0.0)), "first")
    second = add_volume(slicer, Volume(np.full((10, 10, 10), 100, np.int16), origin=(0.0, 0.0, 500.0)), "second")
    in_second = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Nodule 1 malignant")
    in_second.SetCenter(-4.0, -4.0, 504.0)  # RAS: inside the second scan only
    in_second.SetSize(4, 4, 4)
    remembered = logic.createRoiAtCursor(4.0, first)  # drawn while the first scan was the input
    remembered.SetName("Nodule 2 benign")
    pairs = training_export.training_pairs("nodule", [in_second, remembered], inputVolume=first)
    assert pairs == [(second, in_second), (first, remembered)]
    table = Path(training_export.export_training_cases("nodule", pairs, str(tmp_path)))
    rows = table.read_text().splitlines()[1:]
    images = {row.split(",")[1]: read_volume(tmp_path / row.split(",")[0]) for row in rows}
    assert images["malignant"].array.max() == 100 and images["benign"].array.max() == -700
    overlapping = add_volume(slicer, Volume(np.zeros((10, 10, 10), np.int16), origin=(0.0, 0.0, 500.0)), "copy")
    assert overlapping is not None
    with pytest.raises(Med3DError, match="lies inside several volumes \\(second, copy\\)"):
        training_export.training_pairs("nodule", [in_second])


FAKE_ENGINE = """
import json, sys, time
args = sys.argv[1:]
for step in range(1, 4):
    print(json.dumps({"kind": "progress", "stage": "train", "step": step, "total": 3,
                      "metrics": {"loss": 1.0 / step}}), flush=True)
    time.sleep(0.05)
if "--fail" in args:
    print("med3d finetune: error: out of memory", file=sys.stderr)
    sys.exit(2)
print(json.dumps({"kind": "result", "stage": "finetune", "model": "x"}), flush=True)
"""


def test_finetune_job_reports_plots_and_fails_clearly(env, tmp_path) -> None:
    """The run machinery with a FAKE engine script in place of ``med3d finetune`` (same JSON-lines protocol)."""
    from Med3DLib import jobs, training_export

    slicer, med3d, logic = env
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    run = jobs.FinetuneJob([sys.executable, str(script)], str(tmp_path / "new.pt"), None)
    run.lossPlot = training_export.LossPlot()
    run.on_progress = lambda running: running.lossPlot.update(running.state.losses)
    assert run.start().wait(60) == 0
    assert run.state.losses == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert run.state.result["model"] == "x" and run.failure() is None
    series = slicer.mrmlScene.GetNodeByID(run.lossPlot.chartNode.seriesIDs[0])
    table = slicer.mrmlScene.GetNodeByID(series.tableNodeID).GetTable()
    assert (series.xColumn, series.yColumn) == ("step", "loss")
    assert [table.GetValue(r, 1).ToDouble() for r in range(table.GetNumberOfRows())] == \
        pytest.approx([1.0, 0.5, 1 / 3])
    failing = jobs.FinetuneJob([sys.executable, str(script), "--fail"], "x", None).start()
    failing.wait(60)
    assert failing.failure() == "out of memory"  # the engine's own one-line message


def test_finetune_from_the_scene_deletes_its_exported_cases(env, tmp_path, monkeypatch) -> None:
    """Item 8: the work folder with the exported training CTs is deleted when the run ends (and on cancel)."""
    slicer, _, logic = env
    image, labels, _ = make_ct_phantom((8, 10, 12), (3.0, 3.0, 3.0), seed=2)
    volume_node = add_volume(slicer, image, "phantom")
    lung = labels.with_array((labels.array == 1).astype(np.uint8))
    pairs = [(volume_node, logic.segmentationFromLabels(lung, LUNG_LABELS, volume_node, "phantom lung"))]
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    seen = []

    def fake_command(python, task, data, *args, **kwargs):  # the FAKE engine, shown the exported table
        seen.append(Path(data))
        return [sys.executable, str(script)]

    monkeypatch.setattr("Med3DLib.finetune_job.finetune_command", fake_command)
    run = logic.finetune("lung", pairs=pairs, newModelName="fresh", epochs=1)
    assert seen[0].is_file() and seen[0].name == "cases.csv"
    run.wait(60)
    assert not seen[0].parent.exists()
    cancelled = logic.finetune("lung", pairs=pairs, newModelName="fresh2", epochs=1)
    cancelled.cancel()
    from Med3DLib import jobs

    assert not seen[1].parent.exists() and not list(jobs._LIVE)


def test_finetune_refuses_an_existing_name_and_no_data(env, model_folder) -> None:
    slicer, _, logic = env
    with pytest.raises(Med3DError, match="already exists"):
        logic.finetune("lung", folder="/data", newModelName="lung-everywhere")
    with pytest.raises(Med3DError, match="no training data"):
        logic.finetune("lung", newModelName="brand-new")
    with pytest.raises(Med3DError, match="unknown task"):
        logic.finetune("brain", folder="/data")


def test_the_modules_own_self_test_passes_against_the_double(env) -> None:
    slicer, med3d, _ = env
    med3d.Med3DTest().runTest()
