"""infer.segment / infer.classify: geometry of results, task checks, clean-up, two-stage liver, bad inputs.

Networks are ResNet-10 encoders with small random heads: the pipeline, not the accuracy, is under test here.
The helpers at the top are reused by the other inference test modules.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch

from med3dcore import classical_lung, infer
from med3dcore.classical_lung import inside_body
from med3dcore.bundles import load_bundle, save_bundle
from med3dcore.clean_up import keep_largest_components
from med3dcore.errors import Med3DError
from med3dcore.nets import build_model
from med3dcore.nodules import NoduleInputSpec, mask_box, scan_box
from med3dcore.phantoms import make_ct_phantom, make_mr_phantom
from med3dcore.preprocess import PreprocessSpec
from med3dcore.volume import Volume

torch.set_num_threads(2)

BACKBONE = {"depth": 10, "shortcut_type": "B", "preact": False}
LUNG_LABELS = [{"value": 1, "name": "lung", "color": [197, 165, 145], "terminology": "SCT^39607008^Lung"}]
LIVER_LABELS = [{"value": 1, "name": "liver", "color": [221, 130, 101]},
                {"value": 2, "name": "liver_tumour", "color": [144, 238, 144]}]
NODULE_LABELS = [{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}]
CT_SPEC = PreprocessSpec(spacing=(3.0, 3.0, 3.0), window=(-1000.0, 400.0), modality="CT")


def tiny_net(head: Dict[str, Any], seed: int = 0, bias: Optional[List[float]] = None):
    """ResNet-10 + a head with random weights; ``bias`` sets the last layer's bias (e.g. to force a class)."""
    torch.manual_seed(seed)
    arch = {"backbone": dict(BACKBONE), "head": dict(head)}
    net = build_model(arch)
    if bias is not None:
        last = [m for m in net.head.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear))][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor(bias))
    return net, arch


def segmentation_bundle(path: Path, name: str = "lung", labels=LUNG_LABELS, spec: PreprocessSpec = CT_SPEC,
                        seed: int = 0, bias=None, extra=None) -> Path:
    net, arch = tiny_net({"type": "lung_decoder", "num_classes": len(labels) + 1, "channels": [16, 8, 8]}, seed,
                         bias)
    return save_bundle(path, net, architecture=arch, task={"type": "segmentation", "name": name}, labels=labels,
                       preprocessing=spec, provenance={"data": "random weights (test)"}, extra=extra)


def classification_bundle(path: Path, seed: int = 0, bias=None, temperature: Optional[float] = None) -> Path:
    net, arch = tiny_net({"type": "classifier", "num_classes": 2}, seed, bias)
    extra: Dict[str, Any] = {"nodule_input": {"cube": 24, "spacing_mm": 1.0}}
    if temperature is not None:
        extra["temperature"] = temperature
    return save_bundle(path, net, architecture=arch, task={"type": "classification", "name": "nodule"},
                       labels=NODULE_LABELS, preprocessing={}, provenance={"data": "random weights (test)"},
                       extra=extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"lung": segmentation_bundle(folder / "lung.pt"),
            "nodule": classification_bundle(folder / "nodule.pt")}


@pytest.fixture(scope="module")
def phantom():
    image, labels, _ = make_ct_phantom((24, 40, 36), (2.5, 2.0, 4.0), seed=3, flip=(1,), permute=(0, 2, 1))
    return image, labels


# ------------------------------------------------------------------------------------------------ segment

def test_segment_returns_labels_in_exact_input_geometry(models, phantom):
    image, _ = phantom
    events = []
    result = infer.segment(image, models["lung"], task="lung", device="cpu", reporter=events.append,
                           tile=(16, 32, 32), overlap=0.25, keep_largest=False)
    assert result.labels.shape == image.shape
    assert result.labels.spacing == image.spacing and result.labels.origin == image.origin
    assert np.array_equal(result.labels.direction, image.direction)
    assert result.labels.array.dtype == np.uint8
    assert set(np.unique(result.labels.array)) <= {0, 1}
    assert result.label_info == [{"value": 1, "name": "lung", "color": [197, 165, 145],
                                  "terminology": "SCT^39607008^Lung"}]
    assert result.warnings == []
    steps = [e for e in events if e["stage"] == "lung"]
    assert steps and steps[-1]["step"] == steps[-1]["total"] > 1  # several tiles at this tile size


def test_segment_tiles_agree_with_whole_volume(models, phantom):
    image, _ = phantom
    whole = infer.segment(image, models["lung"], device="cpu", tile=None, keep_largest=False).labels.array
    tiled = infer.segment(image, models["lung"], device="cpu", tile=(16, 16, 16), overlap=0.25,
                          batch_size=3, keep_largest=False).labels.array
    # Random weights: tiles see less context than the whole volume, yet most voxels must agree.
    assert np.mean(whole == tiled) > 0.8


def test_segment_accepts_a_loaded_bundle_and_forced_class(tmp_path, phantom):
    image, _ = phantom
    path = segmentation_bundle(tmp_path / "all_lung.pt", bias=[0.0, 5.0])  # class 1 wins everywhere
    result = infer.segment(image, load_bundle(path), device="cpu", keep_largest=False)
    assert result.labels.array.min() == 1
    # with the clean-up, a lung model's label stays inside the body (test_segment_method.py)
    cleaned = infer.segment(image, load_bundle(path), device="cpu").labels.array > 0
    assert cleaned.any() and not (cleaned & ~inside_body(image)).any()


def test_mr_given_to_ct_model_warns(models):
    image, _, _ = make_mr_phantom((16, 24, 24), (3.0, 3.0, 3.0), seed=1)
    events = []
    result = infer.segment(image, models["lung"], device="cpu", reporter=events.append)
    assert len(result.warnings) == 1 and "does not look like a CT" in result.warnings[0]
    messages = [e for e in events if e["kind"] == "message"]
    assert messages and "does not look like a CT" in messages[0]["message"]


def test_wrong_model_kinds_are_clear_errors(models, phantom, tmp_path):
    image, _ = phantom
    with pytest.raises(Med3DError, match="classification model.*med3d classify"):
        infer.segment(image, models["nodule"])
    with pytest.raises(Med3DError, match="'lung' model but task 'liver'"):
        infer.segment(image, models["lung"], task="liver")
    with pytest.raises(Med3DError, match="does not exist"):
        infer.segment(image, tmp_path / "missing.pt")
    medicalnet = tmp_path / "resnet_10.pth"
    net, _ = tiny_net({"type": "coarse_seg", "num_classes": 2})
    torch.save({"state_dict": {f"module.{k[len('encoder.'):]}": v for k, v in net.state_dict().items()
                               if k.startswith("encoder.")}}, medicalnet)
    with pytest.raises(Med3DError, match="MedicalNet backbone"):
        infer.segment(image, medicalnet)
    with pytest.raises(Med3DError, match="unknown segmentation option"):
        infer.segment(image, models["lung"], tiles=(8, 8, 8))
    with pytest.raises(Med3DError, match="needs a Volume"):
        infer.segment(image.array, models["lung"])


def test_keep_largest_components_rules():
    labels = np.zeros((10, 30, 30), dtype=np.uint8)
    labels[2:8, 2:12, 2:12] = 1    # 600 voxels
    labels[2:8, 2:12, 18:28] = 1   # 600 voxels
    labels[2:4, 20:24, 2:6] = 1    # 32 voxels: third component, dropped
    two = keep_largest_components(labels, "per_label", 2)
    assert two.sum() == 1200 and two[3, 21, 3] == 0
    one = keep_largest_components(labels, "per_label", 1)
    assert one.sum() == 600
    small_second = labels.copy()
    small_second[2:8, 2:12, 18:28] = 0
    small_second[2:4, 20:24, 2:6] = 0
    small_second[5, 5, 25] = 1     # a 1-voxel "second lung": noise, below the 5% rule
    assert keep_largest_components(small_second, "per_label", 2).sum() == 600
    organ = np.zeros((10, 30, 30), dtype=np.uint8)
    organ[1:9, 1:15, 1:15] = 1
    organ[4:6, 5:8, 5:8] = 2       # tumour inside the organ: one foreground component, kept whole
    organ[4:6, 20:25, 20:25] = 1   # separate blob: dropped
    kept = keep_largest_components(organ, "foreground", 1)
    assert kept[4, 6, 6] == 2 and kept[5, 22, 22] == 0 and (kept > 0).sum() == 8 * 14 * 14


def test_lung_clean_up_keeps_two_components(tmp_path, phantom, monkeypatch):
    image, _ = phantom
    probs = np.zeros((2,) + image.shape, dtype=np.float32)
    probs[0] = 1.0
    probs[:, 2:10, 2:10, 2:10] = [[[[0.0]]], [[[1.0]]]]
    probs[:, 12:20, 20:28, 2:10] = [[[[0.0]]], [[[1.0]]]]
    probs[:, 20:22, 30:32, 30:32] = [[[[0.0]]], [[[1.0]]]]
    classes = np.argmax(probs, axis=0).astype(np.uint8)
    monkeypatch.setattr(infer, "_classes", lambda *a, **k: (classes.copy(), 2))
    monkeypatch.setattr(classical_lung, "clean_up_model_labels", lambda volume, labels: labels)  # rule alone
    labels = infer.segment(image, segmentation_bundle(tmp_path / "l.pt"), device="cpu").labels.array
    assert labels.sum() == 2 * 512 and labels[21, 31, 31] == 0
    labels = infer.segment(image, tmp_path / "l.pt", device="cpu", keep_largest=False).labels.array
    assert labels.sum() == 2 * 512 + 8


# ------------------------------------------------------------------------------------------------ two-stage liver

def _liver_bundle(tmp_path, margin_mm=6.0, fine_bias=None, coarse_bias=None):
    coarse_net, coarse_arch = tiny_net({"type": "coarse_seg", "num_classes": 2}, seed=5, bias=coarse_bias)
    coarse_spec = PreprocessSpec(spacing=(4.0, 4.0, 4.0), window=(-200.0, 250.0), modality="CT")
    extra = {"coarse": {"architecture": coarse_arch, "preprocessing": coarse_spec.to_dict(),
                        "state_dict": coarse_net.state_dict(), "input_size": [16, 24, 24]},
             "margin_mm": margin_mm}
    return segmentation_bundle(tmp_path / "liver.pt", name="liver", labels=LIVER_LABELS, bias=fine_bias,
                               spec=PreprocessSpec(spacing=(2.0, 2.0, 2.0), window=(-200.0, 250.0), modality="CT"),
                               extra=extra)


def test_two_stage_crops_with_margin_and_pastes_back(tmp_path, phantom, monkeypatch):
    image, _ = phantom  # spacing (2.5, 2.0, 4.0) mm (I, J, K)
    seen = {}

    def fake_classes(volume, net, spec, device, opts, reporter, stage, input_size=None):
        seen[stage] = volume
        probs = np.zeros((3 if stage == "fine" else 2,) + volume.shape, dtype=np.float32)
        if stage == "coarse":
            probs[0] = 1.0
            probs[0, 10:14, 15:25, 12:20] = 0.0  # the organ
            probs[1, 10:14, 15:25, 12:20] = 1.0
            probs[1, 1, 1, 1], probs[0, 1, 1, 1] = 1.0, 0.0  # a stray voxel: not the largest component
        else:
            probs[1] = 1.0  # everything inside the crop is liver
        return np.argmax(probs, axis=0).astype(np.uint8), probs.shape[0]

    monkeypatch.setattr(infer, "_classes", fake_classes)
    result = infer.segment(image, _liver_bundle(tmp_path, margin_mm=6.0), task="liver", device="cpu")
    crop = seen["fine"]
    # Margin 6 mm: 2 voxels in K (4 mm; ceil(1.5)), 3 in J (2 mm), 3 in I (2.5 mm; ceil(2.4)).
    assert crop.shape == (4 + 4, 10 + 6, 8 + 6)
    expected_origin = image.ijk_to_lps() @ np.array([12 - 3, 15 - 3, 10 - 2, 1.0])
    assert np.allclose(crop.origin, expected_origin[:3])
    assert np.array_equal(crop.array, image.array[8:16, 12:28, 9:23])
    labels = result.labels.array
    assert labels.shape == image.shape and labels[8:16, 12:28, 9:23].min() == 1
    assert labels.sum() == 8 * 16 * 14 and result.labels.same_geometry(image)


def test_two_stage_runs_both_networks(tmp_path, phantom):
    image, _ = phantom
    events = []
    path = _liver_bundle(tmp_path, coarse_bias=[0.0, 5.0], fine_bias=[0.0, 0.0, 5.0])
    result = infer.segment(image, path, device="cpu", reporter=events.append)
    assert {"coarse", "fine"} <= {e["stage"] for e in events}
    # The coarse stage says "organ everywhere", the fine one "tumour everywhere": the whole scan is label 2.
    assert result.labels.same_geometry(image) and np.all(result.labels.array == 2)
    assert [i["name"] for i in result.label_info] == ["liver", "liver_tumour"]


def test_two_stage_empty_coarse_warns(tmp_path, phantom):
    image, _ = phantom
    result = infer.segment(image, _liver_bundle(tmp_path, coarse_bias=[5.0, 0.0]), device="cpu")
    assert not result.labels.array.any()
    assert "found no liver" in result.warnings[0]


# ------------------------------------------------------------------------------------------------ classify

@pytest.fixture(scope="module")
def ct_with_nodule():
    image, labels, _ = make_ct_phantom((32, 48, 48), (1.5, 1.5, 1.5), seed=4, nodules=("malignant",))
    return image, labels


def test_classify_roi_mask_and_whole_crop(models, ct_with_nodule):
    image, labels = ct_with_nodule
    nodule = labels.with_array((labels.array == 5).astype(np.uint8))
    spec = NoduleInputSpec.from_dict(load_bundle(models["nodule"]).extra["nodule_input"])
    reach = spec.cube * spec.spacing_mm  # the cube's side in mm
    scan_low, scan_high = scan_box(image)
    _, low, high = mask_box(image, nodule, spec.context_mm)
    low, high = np.maximum(low, scan_low), np.minimum(high, scan_high)
    by_mask = infer.classify(image, models["nodule"], mask=nodule, device="cpu")
    assert set(by_mask.probabilities) == {"benign", "malignant"}
    assert sum(by_mask.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert by_mask.predicted == max(by_mask.probabilities, key=by_mask.probabilities.get)
    # The reported box is the one shown: the mask's box plus the context margin, within the scan and the cube.
    assert np.allclose(by_mask.roi_center_lps, (low + high) / 2.0)
    assert np.allclose(by_mask.roi_size_mm, np.minimum(high - low, reach))
    # Its measured size: the phantom's malignant nodule is a 20 mm ball drawn on a 1.5 mm grid.
    voxels = int(nodule.array.sum())
    assert by_mask.volume_ml == pytest.approx(voxels * 1.5 ** 3 / 1000.0)
    assert by_mask.diameter_mm == pytest.approx((6 * voxels * 1.5 ** 3 / np.pi) ** (1 / 3))
    # Given back as an ROI, the reported box gives the same answer.
    again = infer.classify(image, models["nodule"], roi=(by_mask.roi_center_lps, by_mask.roi_size_mm), device="cpu")
    assert again.probabilities == pytest.approx(by_mask.probabilities, abs=1e-6)
    assert again.roi_center_lps == pytest.approx(by_mask.roi_center_lps) and again.diameter_mm is None
    centre = tuple(float(v) for v in (low + high) / 2.0)
    by_roi = infer.classify(image, models["nodule"], roi=(centre, (20.0, 20.0, 20.0)), device="cpu")
    assert by_roi.roi_center_lps == pytest.approx(centre) and by_roi.roi_size_mm == pytest.approx((20.0,) * 3)
    whole = infer.classify(image, models["nodule"], device="cpu")
    assert np.allclose(whole.roi_size_mm, np.minimum((72.0, 72.0, 48.0), reach))


def test_classify_bad_inputs_as_a_new_user_gives_them(models, ct_with_nodule):
    image, labels = ct_with_nodule
    with pytest.raises(Med3DError, match="ROI centre .* lies outside the scan"):
        infer.classify(image, models["nodule"], roi=((500.0, 0.0, 0.0), (20.0, 20.0, 20.0)))
    with pytest.raises(Med3DError, match="mask has no voxels"):
        infer.classify(image, models["nodule"], mask=labels.with_array(np.zeros(labels.shape, np.uint8)))
    with pytest.raises(Med3DError, match="segmentation model.*med3d segment"):
        infer.classify(image, models["lung"], roi=((0.0, 0.0, 0.0), None))
    with pytest.raises(Med3DError, match="not both"):
        infer.classify(image, models["nodule"], roi=((0.0, 0.0, 0.0), None), mask=labels)
    small = Volume(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(Med3DError, match="mask's geometry differs from the image's"):
        infer.classify(image, models["nodule"], mask=small)


def test_classify_divides_the_logits_by_the_stored_temperature(tmp_path, ct_with_nodule):
    """softmax(logits / T) with the bundle's T; a bundle without one (written before calibration) uses T = 1."""
    image, labels = ct_with_nodule
    nodule = labels.with_array((labels.array == 5).astype(np.uint8))
    bias = [0.25, 2.0]  # zero weights in the last layer: the logits are exactly this bias, whatever the input

    def by_hand(t: float) -> float:
        z = np.array(bias) / t
        return float(np.exp(z[1]) / np.exp(z).sum())

    old = infer.classify(image, classification_bundle(tmp_path / "old.pt", bias=bias), mask=nodule, device="cpu")
    hot = infer.classify(image, classification_bundle(tmp_path / "hot.pt", bias=bias, temperature=2.5), mask=nodule,
                         device="cpu")
    cold = infer.classify(image, classification_bundle(tmp_path / "cold.pt", bias=bias, temperature=0.5),
                          mask=nodule, device="cpu")
    assert old.probabilities["malignant"] == pytest.approx(by_hand(1.0), abs=1e-6)  # 0.852
    assert hot.probabilities["malignant"] == pytest.approx(by_hand(2.5), abs=1e-6)  # 0.668
    assert cold.probabilities["malignant"] == pytest.approx(by_hand(0.5), abs=1e-6)  # 0.971
    assert infer.probability_temperature(load_bundle(tmp_path / "hot.pt")) == 2.5
    assert infer.probability_temperature(load_bundle(tmp_path / "old.pt")) == 1.0
    assert hot.predicted == old.predicted == cold.predicted == "malignant"  # a temperature never changes the answer


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 1e6, "2.5", True])
def test_a_bad_stored_temperature_is_one_clear_error(tmp_path, bad):
    from med3dcore.bundle_checks import CHECKSUM_KEY, content_digest

    good = classification_bundle(tmp_path / "good.pt", temperature=1.5)
    raw = torch.load(good, weights_only=True)
    raw["extra"]["temperature"] = bad
    raw[CHECKSUM_KEY] = content_digest(raw)  # a consistent file whose value is wrong, not a damaged copy
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(Med3DError, match="probability temperature must be a number from 0.01 to 100") as info:
        load_bundle(tmp_path / "bad.pt")
    assert "bad.pt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(Med3DError, match="probability temperature"):  # a hand-made Bundle is checked where used
        infer.probability_temperature(dataclasses.replace(load_bundle(good), extra={"temperature": bad}))

