"""`med3d evaluate`: Dice per label for segmentation models, accuracy and AUC for classification models, equal
to what the engine and the metrics give case by case; clear errors for wrong inputs."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from med3dcore.bundles import save_bundle
from med3dcore.cli import main
from med3dcore.infer import classify, segment
from med3dcore.metrics import accuracy, auc, dice
from med3dcore.nets import build_model
from med3dcore.phantoms import make_ct_phantom, make_nodule_crop
from med3dcore.volume_files import write_volume

BACKBONE = {"depth": 10, "shortcut_type": "B", "preact": False}


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def lung_model(tmp_path_factory):
    torch.manual_seed(1)
    arch = {"backbone": BACKBONE, "head": {"type": "coarse_seg", "num_classes": 2}}
    path = tmp_path_factory.mktemp("models") / "lung.pt"
    save_bundle(path, build_model(arch), architecture=arch, task={"type": "segmentation", "name": "lung"},
                labels=[{"value": 1, "name": "lung"}], preprocessing={"spacing": [6.0, 6.0, 6.0]}, provenance={})
    return path


def test_segmentation_dice_per_label(capsys, tmp_path, lung_model):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    expected = []
    for c in range(2):
        image, lab, _ = make_ct_phantom(shape=(16, 24, 24), spacing=(4.0, 4.0, 8.0), seed=c, nodules=())
        lung_as_5 = lab.with_array(np.where(np.asarray(lab.array) == 1, 5, 0).astype(np.uint8))
        write_volume(image, images / f"case{c}.nii.gz")
        write_volume(lung_as_5, labels / f"case{c}.nii.gz")
        predicted = segment(image, str(lung_model), device="cpu").labels.array
        expected.append(dice(predicted == 1, np.asarray(lab.array) == 1))
    code, out, _ = _run(capsys, ["evaluate", "--model", str(lung_model), "--images", str(images), "--labels",
                                 str(labels), "--label-map", "5:1", "--device", "cpu", "--json"])
    assert code == 0
    result = json.loads(out)
    assert result["cases"] == 2 and result["task"]["name"] == "lung"
    assert [r["dice"]["lung"] for r in result["per_case"]] == pytest.approx(expected, abs=1e-9)
    assert result["mean_dice"]["lung"] == pytest.approx(np.mean(expected))
    # without the map the reference has no label 1: Dice 0 wherever the model finds lung
    code, out, _ = _run(capsys, ["evaluate", "--model", str(lung_model), "--images", str(images), "--labels",
                                 str(labels), "--device", "cpu"])
    unmapped = json.loads(out)
    assert all(r["dice"]["lung"] in (0.0, 1.0) for r in unmapped["per_case"])


def test_classification_accuracy_and_auc(capsys, tmp_path):
    torch.manual_seed(2)
    arch = {"backbone": BACKBONE, "head": {"type": "classifier", "num_classes": 2}}
    model = tmp_path / "nodule.pt"
    save_bundle(model, build_model(arch), architecture=arch, task={"type": "classification", "name": "nodule"},
                labels=[{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}], preprocessing={},
                provenance={}, extra={"nodule_input": {"cube": 16, "spacing_mm": 2.0}})
    rows, scores, truth = [], [], []
    for n, kind in enumerate(["benign", "malignant", "benign", "malignant", "malignant"]):
        image, mask = make_nodule_crop(kind, seed=n, shape=(16, 24, 24))
        write_volume(image, tmp_path / f"n{n}.nii.gz")
        write_volume(mask, tmp_path / f"n{n}_mask.nii.gz")
        rows.append({"image": f"n{n}.nii.gz", "mask": f"n{n}_mask.nii.gz", "label": kind})
        result = classify(image, str(model), mask=mask, device="cpu")
        scores.append(result.probabilities["malignant"])
        truth.append(int(kind == "malignant"))
    table = tmp_path / "table.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "mask", "label"])
        writer.writeheader()
        writer.writerows(rows)
    code, out, _ = _run(capsys, ["evaluate", "--model", str(model), "--csv", str(table), "--device", "cpu"])
    assert code == 0
    result = json.loads(out)
    assert result["cases"] == 5
    assert result["accuracy"] == pytest.approx(accuracy([int(s >= 0.5) for s in scores], truth))
    assert result["auc"] == pytest.approx(auc(scores, truth))
    assert [r["probability"] for r in result["per_case"]] == pytest.approx(scores, abs=1e-6)


def test_evaluate_errors(capsys, tmp_path, lung_model):
    code, _, err = _run(capsys, ["evaluate", "--model", str(lung_model)])
    assert code == 2 and "--csv FILE, or --images DIR --labels DIR" in err
    code, _, err = _run(capsys, ["evaluate", "--model", str(tmp_path / "none.pt"), "--csv", "x.csv"])
    assert code == 2 and "does not exist" in err
    code, _, err = _run(capsys, ["evaluate", "--model", str(lung_model), "--csv", "x.csv", "--label-map", "5-1"])
    assert code == 2 and "SOURCE:TARGET" in err


def test_a_bad_stored_temperature_is_exit_2_and_one_line(capsys, tmp_path):
    """A classification bundle whose probability temperature is not a finite number in 0.01..100: one line, exit
    status 2, from every command that would turn its logits into probabilities; no traceback."""
    from med3dcore.bundle_checks import CHECKSUM_KEY, content_digest

    arch = {"backbone": BACKBONE, "head": {"type": "classifier", "num_classes": 2}}
    good = tmp_path / "good.pt"
    save_bundle(good, build_model(arch), architecture=arch, task={"type": "classification", "name": "nodule"},
                labels=[{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}], preprocessing={},
                provenance={}, extra={"nodule_input": {"cube": 16, "spacing_mm": 2.0}, "temperature": 1.3})
    image, _ = make_nodule_crop("malignant", seed=0, shape=(16, 24, 24))
    write_volume(image, tmp_path / "n.nii.gz")
    (tmp_path / "table.csv").write_text("image,label\nn.nii.gz,malignant\n")
    for bad in (float("nan"), 0.0, -2.0, 1e9):
        raw = torch.load(good, weights_only=True)
        raw["extra"]["temperature"] = bad
        raw[CHECKSUM_KEY] = content_digest(raw)
        model = tmp_path / "bad.pt"
        torch.save(raw, model)
        before = model.read_bytes()
        for argv in (["evaluate", "--model", str(model), "--csv", str(tmp_path / "table.csv")],
                     ["classify", str(tmp_path / "n.nii.gz"), "--model", str(model), "--device", "cpu"]):
            code, out, err = _run(capsys, argv)
            assert code == 2 and out == "", (bad, argv[0])
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
            assert "bad.pt: its probability temperature must be a number from 0.01 to 100" in err
        assert model.read_bytes() == before
    code, out, _ = _run(capsys, ["classify", str(tmp_path / "n.nii.gz"), "--model", str(good), "--device", "cpu"])
    assert code == 0
