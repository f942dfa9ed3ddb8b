"""The measured-size part of the nodule classifier (nodule_measures.py): what is measured from a mask, the logistic
regressions fitted without scikit-learn, the fused probability classify gives with a mask, and the checks on a
stranger's bundle."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import expit as sigmoid

from med3dcore.bundles import load_bundle, save_bundle
from med3dcore.cli import main
from med3dcore.errors import Med3DError
from med3dcore.infer import classify
from med3dcore.nets import build_model
from med3dcore.nodule_measures import (MEASURE_NAMES, check_fusion, fit_fusion, fit_logistic, fit_nonnegative,
                                       fused_probability, logistic_logit, measure_features)
from med3dcore.nodules import nodule_box
from med3dcore.volume import Volume
from med3dcore.volume_files import write_volume

ARCH = {"backbone": {"depth": 10, "shortcut_type": "B", "preact": False},
        "head": {"type": "classifier", "num_classes": 2}}


def _scan(shape=(20, 30, 30), spacing=(0.7, 0.7, 2.0)):
    return Volume(np.full(shape, -800, np.int16), spacing=spacing)


def test_measures_of_a_box_shaped_nodule():
    scan = _scan()
    mask = np.zeros(scan.array.shape, np.uint8)
    mask[5:9, 10:20, 12:17] = 1  # 4 x 10 x 5 voxels of 2 x 0.7 x 0.7 mm
    values = scan.array.copy()
    values[mask > 0] = 40
    values[5, 10:20, 12:17] = 300  # one slice calcified: a quarter of the nodule above 200 HU
    values[8, 10:20, 12:17] = -500  # one slice ground glass: a quarter below -400 HU
    features = dict(zip(MEASURE_NAMES, measure_features(scan.with_array(values), mask)))
    volume = 200 * 0.7 * 0.7 * 2.0
    assert features["log diameter (mm)"] == pytest.approx(math.log((6 * volume / math.pi) ** (1 / 3)))
    inside = np.array([300] * 50 + [40] * 100 + [-500] * 50, float)
    assert features["mean HU"] == pytest.approx(inside.mean())
    assert features["SD of HU"] == pytest.approx(inside.std())
    assert features["fraction above 200 HU"] == pytest.approx(0.25)
    assert features["fraction below -400 HU"] == pytest.approx(0.25)
    # a box of 8 x 7 x 3.5 mm: its faces are its surface exactly
    area = 2 * (8 * 7 + 8 * 3.5 + 7 * 3.5)
    assert features["sphericity"] == pytest.approx(math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area)


def test_measures_depend_on_the_mask_not_on_the_box_around_it():
    """A crop and the whole scan it came from give the same numbers (so training crops and classify on a whole CT
    agree); a flat nodule is less spherical than a compact one."""
    rng = np.random.default_rng(0)
    scan = _scan()
    values = rng.normal(-700, 100, scan.array.shape).astype(np.int16)
    mask = np.zeros(scan.array.shape, np.uint8)
    mask[8:12, 10:18, 10:18] = 1
    whole = measure_features(scan.with_array(values), mask)
    crop = measure_features(Volume(values[6:14, 8:22, 7:20].copy(), spacing=scan.spacing), mask[6:14, 8:22, 7:20])
    np.testing.assert_allclose(crop, whole, rtol=1e-12)
    flat = np.zeros_like(mask)
    flat[9:10, 5:25, 5:25] = 1
    assert measure_features(scan.with_array(values), flat)[5] < 0.7 * whole[5]  # 0.51 against 0.80


def test_measures_refuse_an_empty_or_misplaced_mask():
    scan = _scan()
    with pytest.raises(Med3DError, match="the mask has no voxels"):
        measure_features(scan, np.zeros(scan.array.shape, np.uint8))
    with pytest.raises(Med3DError, match="differs from the image's"):
        measure_features(scan, np.ones((2, 2, 2), np.uint8))


def test_logistic_regression_is_the_penalised_optimum():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3)) * [1.0, 10.0, 0.1] + [0.0, 50.0, 0.0]
    y = (x[:, 0] + 0.1 * x[:, 1] - 5 + rng.normal(size=300) > 0).astype(int)
    model = fit_logistic(x, y)
    z = (x - np.array(model["mean"])) / np.array(model["scale"])
    p = sigmoid(logistic_logit(model, x))
    # the gradient of the summed log-loss + 0.5 |w|^2 vanishes at the answer (bias unpenalised)
    assert abs(np.sum(p - y)) < 1e-6
    np.testing.assert_allclose(z.T @ (p - y) + np.array(model["weights"]), 0.0, atol=1e-6)
    assert model["weights"][0] > 0 and model["weights"][1] > 0 and abs(model["weights"][2]) < model["weights"][0]
    # a constant column is harmless
    constant = fit_logistic(np.column_stack([x[:, 0], np.ones(300)]), y)
    assert constant["weights"][1] == 0.0 and np.isfinite(constant["bias"])
    with pytest.raises(Med3DError, match="labels of both classes"):
        fit_logistic(x, np.zeros(300))


def test_fusion_weighs_the_informative_input():
    """Stage 1 learns from the measures on the training cases; stage 2 on the validation cases gives the measures'
    logit a large weight and an uninformative image logit almost none."""
    rng = np.random.default_rng(2)

    def cases(n):
        y = rng.integers(0, 2, n)
        measures = rng.normal(size=(n, len(MEASURE_NAMES)))
        measures[:, 0] += 1.5 * y  # larger nodules are malignant
        return measures, y

    train, train_y = cases(400)
    val, val_y = cases(300)
    noise = rng.normal(size=300)
    record = fit_fusion(train, train_y, val, noise, val_y)
    assert record["features"] == list(MEASURE_NAMES)
    w_measures, w_image = record["combine"]["weights"]
    assert w_measures > 5 * w_image >= 0
    p = fused_probability(record, val, noise)
    assert p.shape == (300,) and np.all((p > 0) & (p < 1))
    assert np.mean((p > 0.5) == val_y) > 0.7
    check_fusion(record, "x.pt")  # what fine-tuning writes passes the bundle checks


def test_an_image_logit_that_votes_against_malignancy_gets_no_weight():
    """Non-negative stacking: given the measures, a logit that falls as malignancy rises is dropped (weight 0) and
    the measures' logit refitted alone; a plain fit would have given it a negative weight."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    measures_logit = 2.0 * y - 1.0 + rng.normal(size=400)
    image_logit = -0.8 * y + rng.normal(size=400)
    x = np.column_stack([measures_logit, image_logit])
    assert fit_logistic(x, y)["weights"][1] < 0
    model = fit_nonnegative(x, y)
    alone = fit_logistic(x[:, :1], y)
    assert model["weights"] == [pytest.approx(alone["weights"][0]), 0.0]
    assert model["bias"] == pytest.approx(alone["bias"])
    np.testing.assert_allclose(logistic_logit(model, x), logistic_logit(alone, x[:, :1]), atol=1e-12)
    # no input left: the base rate
    empty = fit_nonnegative(-x[:, :1], y)
    assert empty["weights"] == [0.0] and sigmoid(empty["bias"]) == pytest.approx(y.mean(), abs=1e-6)


def _fusion_bundle(path, fusion):
    torch.manual_seed(0)
    save_bundle(path, build_model(ARCH), architecture=ARCH, task={"type": "classification", "name": "nodule"},
                labels=[{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}], preprocessing={},
                provenance={}, extra={"nodule_input": {"cube": 16, "spacing_mm": 2.0}, "temperature": 2.0,
                                      "measured_fusion": fusion})
    return path


def _record():
    n = len(MEASURE_NAMES)
    return {"features": list(MEASURE_NAMES),
            "measures": {"mean": [2.0, 0.0, 100.0, 0.1, 0.1, 0.5], "scale": [0.5, 100.0, 50.0, 0.1, 0.1, 0.1],
                         "weights": [1.5] + [0.1] * (n - 1), "bias": -1.0},
            "combine": {"mean": [0.0, 0.0], "scale": [1.0, 1.0], "weights": [1.2, 0.3], "bias": -0.5}}


def test_classify_with_a_mask_uses_the_measures_and_an_roi_does_not(tmp_path):
    scan = _scan()
    mask = np.zeros(scan.array.shape, np.uint8)
    mask[8:12, 10:18, 10:18] = 1
    values = scan.array.copy()
    values[mask > 0] = 30
    scan = scan.with_array(values)
    bundle = load_bundle(_fusion_bundle(tmp_path / "fused.pt", _record()))
    by_mask = classify(scan, bundle, mask=mask, device="cpu")
    assert by_mask.basis == "image + mask measures"
    # the fused probability from the network's own logit and the mask's measures, by hand
    from med3dcore.bundles import model_from_bundle
    from med3dcore.nodules import prepare_nodule

    cube = prepare_nodule(scan, mask=mask, params=bundle.extra["nodule_input"])
    with torch.no_grad():
        logits = model_from_bundle(bundle)(torch.from_numpy(cube)[None])[0].numpy()
    expected = fused_probability(_record(), measure_features(scan, mask)[None], logits[1] - logits[0])[0]
    assert by_mask.probabilities["malignant"] == pytest.approx(expected, abs=1e-5)
    assert by_mask.probabilities["benign"] == pytest.approx(1 - expected, abs=1e-5)
    assert by_mask.image_probabilities["malignant"] == pytest.approx(sigmoid((logits[1] - logits[0]) / 2.0), abs=1e-5)
    # the box shown, given back as an ROI, gives the image's own probability (no mask, so no measures)
    low, high = nodule_box(scan, mask=mask, params=bundle.extra["nodule_input"])
    by_roi = classify(scan, bundle, roi=((low + high) / 2, high - low), device="cpu")
    assert by_roi.basis == "image" and by_roi.probabilities == pytest.approx(by_mask.image_probabilities, abs=1e-6)


def test_cli_says_what_the_probability_comes_from(tmp_path, capsys):
    scan = _scan()
    mask = np.zeros(scan.array.shape, np.uint8)
    mask[8:12, 10:18, 10:18] = 1
    write_volume(scan, tmp_path / "scan.nii.gz")
    write_volume(scan.with_array(mask), tmp_path / "mask.nii.gz")
    model = _fusion_bundle(tmp_path / "fused.pt", _record())
    assert main(["classify", str(tmp_path / "scan.nii.gz"), "--model", str(model), "--mask",
                 str(tmp_path / "mask.nii.gz"), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    source = [line for line in lines if line.startswith("probability from: ")]
    assert len(source) == 1 and source[0].startswith("probability from: image + mask measures (image alone: benign ")


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.update(features=["log diameter (mm)"]), "names other measures than this version"),
    (lambda r: r.pop("combine"), "lacks 'combine'"),
    (lambda r: r["measures"].update(weights=[1.0, 2.0]), "'measures' weights must be 6 numbers"),
    (lambda r: r["measures"].update(scale=[0.0] * 6), "'measures' scales"),
    (lambda r: r["combine"].update(bias=float("nan")), "'combine' bias"),
    (lambda r: r["combine"].update(weights=["a", 1.0]), "'combine' weights"),
])
def test_a_damaged_measured_size_model_is_one_line(tmp_path, capsys, damage, message):
    record = _record()
    damage(record)
    path = tmp_path / "damaged.pt"
    torch.manual_seed(0)
    # written past save_bundle's own checks, as a stranger's file would be
    good = load_bundle(_fusion_bundle(tmp_path / "good.pt", _record()))
    raw = torch.load(tmp_path / "good.pt", weights_only=False)
    raw["extra"]["measured_fusion"] = record
    raw.pop("content_sha256")  # a bundle saved before checksums: only the checks stand guard
    torch.save(raw, path)
    assert good.extra["measured_fusion"]["features"] == list(MEASURE_NAMES)
    with pytest.raises(Med3DError, match=message) as caught:
        load_bundle(path)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(path))
    scan = _scan()
    write_volume(scan, tmp_path / "scan.nii.gz")
    assert main(["classify", str(tmp_path / "scan.nii.gz"), "--model", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.split("'")[0].strip() in err[0] and "Traceback" not in err[0]


def test_evaluate_scores_what_classify_gives_with_each_mask(tmp_path, capsys):
    import json

    model = _fusion_bundle(tmp_path / "fused.pt", _record())
    rows = ["image,mask,label,patient_id"]
    for k, (size, label) in enumerate([(3, "benign"), (5, "benign"), (7, "malignant"), (9, "malignant")]):
        scan = _scan()
        mask = np.zeros(scan.array.shape, np.uint8)
        mask[8:8 + size // 2 + 1, 10:10 + size, 10:10 + size] = 1
        write_volume(scan.with_array(np.where(mask > 0, 40, -800).astype(np.int16)), tmp_path / f"s{k}.nii.gz")
        write_volume(scan.with_array(mask), tmp_path / f"m{k}.nii.gz")
        rows.append(f"s{k}.nii.gz,m{k}.nii.gz,{label},P{k}")
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    assert main(["evaluate", "--model", str(model), "--csv", str(tmp_path / "table.csv"), "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["probability_from"] == {"image + mask measures": 4}
    from med3dcore.volume_files import read_volume

    first = classify(read_volume(tmp_path / "s0.nii.gz"), str(model), mask=read_volume(tmp_path / "m0.nii.gz"),
                     device="cpu")
    assert result["per_case"][0]["probability"] == pytest.approx(first.probabilities["malignant"], abs=1e-6)
    assert result["per_case"][0]["basis"] == "image + mask measures"
