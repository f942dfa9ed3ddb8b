"""The learnt nodule outline (nodule_outline.py): what classify gives with an ROI alone when the bundle holds one."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from med3dcore.bundles import load_bundle, model_from_bundle
from med3dcore.classification_finetune import ClassificationSettings, finetune_classification
from med3dcore.cli import main
from med3dcore.infer import classify
from med3dcore.nodule_evaluation import patient_digest
from med3dcore.nodule_measures import MEASURE_NAMES, measure_features
from med3dcore.metrics import dice
from med3dcore.nodule_outline import (OUTLINE_ARCHITECTURE, central_component, cube_measures, outline_answers,
                                      outline_box, outline_on_image)
from med3dcore.nodule_size import measure_nodule
from med3dcore.nodules import NoduleInputSpec, nodule_box, prepare_nodule, read_nodule_table, visible_in_cube
from med3dcore.volume import Volume
from med3dcore.volume_files import read_volume

from test_finetune import _nodule_table
from test_infer import classification_bundle, segmentation_bundle

SPEC = NoduleInputSpec(cube=16, spacing_mm=2.0)


def test_central_component_keeps_the_blob_at_the_centre():
    mask = np.zeros((16, 16, 16), bool)
    mask[0:6, 0:6, 0:6] = True  # larger, in a corner
    mask[7:10, 7:10, 6:9] = True  # smaller, at the centre
    kept = central_component(mask)
    assert kept.sum() == 27 and kept[8, 8, 7] and not kept[0, 0, 0]
    assert not central_component(np.zeros((4, 4, 4), bool)).any()


def test_cube_measures_restore_hu_on_the_cube_grid():
    low, high = SPEC.window
    hu = np.full((16, 16, 16), -850.0)
    grid = np.indices(hu.shape) - 7.5
    ball = (grid ** 2).sum(0) <= 3.2 ** 2
    hu[ball] = 40.0
    cube = ((np.clip(hu, low, high) - (low + high) / 2) / ((high - low) / 2)).astype(np.float32)[None]
    measures = cube_measures(cube, ball, SPEC)
    volume_mm3 = ball.sum() * 2.0 ** 3  # 2 mm voxels
    assert measures[0] == pytest.approx(math.log((6 * volume_mm3 / math.pi) ** (1 / 3)))
    assert measures[1] == pytest.approx(40.0, abs=0.01) and measures[2] == pytest.approx(0.0, abs=0.01)
    expected = measure_features(Volume(hu.astype(np.float32), (2.0, 2.0, 2.0)), ball.astype(np.uint8))
    np.testing.assert_allclose(measures, expected, rtol=1e-5, atol=1e-3)
    assert len(measures) == len(MEASURE_NAMES)
    assert cube_measures(cube, np.zeros_like(ball), SPEC) is None


def test_an_outline_on_the_cube_lands_on_the_image_where_the_cube_was_cut():
    """Cube (axis-aligned in LPS, 2 mm) -> an image with its own spacing, origin and flipped axes: a ball on the
    cube lands at the same LPS place, only inside the box shown, with about the same volume."""
    image = Volume(np.zeros((30, 40, 50), np.int16), (0.8, 0.7, 1.5), (30.0, -12.0, 5.0),
                   np.diag([-1.0, -1.0, 1.0]))
    centre_ijk = np.array([20.0, 15.0, 12.0])  # i, j, k
    centre = (image.ijk_to_lps() @ np.append(centre_ijk, 1.0))[:3]
    size = np.array([13.0, 13.0, 13.0])
    low, high = nodule_box(image, center_lps=centre, size_mm=size, params=SPEC)
    grid = np.indices((16, 16, 16)) - 7.5
    ball = (grid ** 2).sum(0) <= 2.6 ** 2  # radius 5.2 mm on the 2 mm cube
    outline = outline_on_image(image, ball, low, high, SPEC)
    assert outline.same_geometry(image) and outline.array.dtype == np.uint8
    ijk = np.argwhere(outline.array > 0)[:, ::-1].astype(float)
    lps = (image.ijk_to_lps() @ np.column_stack([ijk, np.ones(len(ijk))]).T)[:3].T
    np.testing.assert_allclose(lps.mean(axis=0), centre, atol=0.5)
    assert measure_nodule(image, outline)["volume_ml"] == pytest.approx(ball.sum() * 8 / 1000, rel=0.15)
    # a cube filled everywhere marks exactly the image voxels inside the box, and the cube voxels inside it
    full = outline_on_image(image, np.ones((16, 16, 16), bool), low, high, SPEC).array > 0
    ijk = np.argwhere(np.ones(image.shape, bool))[:, ::-1].astype(float)
    lps = (image.ijk_to_lps() @ np.column_stack([ijk, np.ones(len(ijk))]).T)[:3].T
    inside = np.all((lps >= low) & (lps <= high), axis=1).reshape(image.shape)
    np.testing.assert_array_equal(full, inside)
    assert visible_in_cube(low, high, SPEC).sum() == 6 ** 3  # 2 mm cube voxel centres (odd mm) in a 13 mm box
    assert not outline_on_image(image, np.zeros((16, 16, 16), bool), low, high, SPEC).array.any()


def test_the_box_an_outline_calls_for_is_its_extent_along_the_axes_trained_without_context():
    spec = NoduleInputSpec(cube=16, spacing_mm=2.0, context_mm=(4.0, 4.0, 0.0))
    low, high = np.array([-16.0, -16.0, -16.0]), np.array([16.0, 16.0, 10.0])  # centre (0, 0, -3)
    found = np.zeros((16, 16, 16), bool)
    found[5:9, 6:8, 7:12] = True  # z, y, x cube indices; voxel centres at centre + (index - 7.5) * 2 mm
    new_low, new_high = outline_box(found, low, high, spec)
    # Only z is narrowed (the crops showed no context along it): voxels 5..8 -> centres -8..-2, +-1 mm half voxel.
    np.testing.assert_allclose(new_low, [-16.0, -16.0, -9.0])
    np.testing.assert_allclose(new_high, [16.0, 16.0, -1.0])
    # never beyond the box it was found in
    everywhere = np.ones((16, 16, 16), bool)
    np.testing.assert_allclose(np.stack(outline_box(everywhere, low, high, spec)), np.stack([low, high]))


def test_a_deeper_roi_is_narrowed_to_the_box_its_outline_calls_for(outlined):
    """An ROI reaching far beyond the nodule along z is shown as a mask would be: the box classify reports lies
    inside the ROI, is the box its outline calls for (to within a cube voxel: it has settled, so given back it gives
    the same answer) and is much shallower than the ROI. (The phantom run's context fills its 16 mm cube along z,
    so the bundle is given the context of crops that end with their nodules along z, as LIDC's do.)"""
    bundle = load_bundle(outlined["result"]["bundle"])
    bundle.extra["nodule_input"] = {**bundle.extra["nodule_input"], "context_mm": [4.0, 5.0, 0.0]}
    spec = NoduleInputSpec.from_dict(bundle.extra["nodule_input"])
    case = outlined["cases"][0]
    image, mask = read_volume(case.image), read_volume(case.mask)
    low, high = nodule_box(image, mask=mask, params=spec)
    centre, size = (low + high) / 2, (high - low) + np.array([0.0, 0.0, 8.0])
    deep = classify(image, bundle, roi=(centre, size), device="cpu")
    box_low = np.asarray(deep.roi_center_lps) - np.asarray(deep.roi_size_mm) / 2
    box_high = box_low + np.asarray(deep.roi_size_mm)
    roi_low, roi_high = nodule_box(image, center_lps=centre, size_mm=size, params=spec)
    assert np.all(box_low >= roi_low - 1e-6) and np.all(box_high <= roi_high + 1e-6)
    assert deep.roi_size_mm[2] <= (roi_high - roi_low)[2] - 6.0
    cube = prepare_nodule(image, center_lps=deep.roi_center_lps, size_mm=deep.roi_size_mm, params=spec)
    found = outline_answers(bundle.extra, "b", cube[None], [0.0], torch.device("cpu"),
                            visible=visible_in_cube(box_low, box_high, spec)[None])[0][2]
    settled = np.stack(outline_box(found, box_low, box_high, spec)) - np.stack([box_low, box_high])
    assert np.abs(settled).max() < spec.spacing_mm  # no side would move by a cube voxel
    np.testing.assert_allclose(box_low[:2], roi_low[:2])  # in-plane the ROI is kept
    np.testing.assert_allclose(box_high[:2], roi_high[:2])
    again = classify(image, bundle, roi=(deep.roi_center_lps, deep.roi_size_mm), device="cpu")
    assert again.probabilities == pytest.approx(deep.probabilities, abs=1e-9)
    assert deep.diameter_mm == pytest.approx(classify(image, bundle, mask=mask, device="cpu").diameter_mm, rel=0.35)


@pytest.fixture(scope="module")
def outlined(tmp_path_factory):
    """A small nodule run on phantom crops (every case has a mask, so an outline network is trained)."""
    folder = tmp_path_factory.mktemp("outline")
    cases = read_nodule_table(str(_nodule_table(folder)))
    events = []
    settings = ClassificationSettings(steps=20, batch_size=4, val_fraction=0.3, validate_every=10, lr=1e-3,
                                      outline_steps=60)
    result = finetune_classification(cases, folder / "out", "nodule", spec=NoduleInputSpec(cube=16),
                                     backbone={"depth": 10}, settings=settings, reporter=events.append)
    return {"folder": folder, "cases": cases, "events": events, "result": result,
            "bundle": load_bundle(result["bundle"])}


def test_a_run_with_masks_stores_an_outline_that_classify_uses_without_a_mask(outlined):
    bundle, result, events = outlined["bundle"], outlined["result"], outlined["events"]
    assert bundle.extra["outline"]["architecture"] == OUTLINE_ARCHITECTURE
    assert bundle.extra["outline_fusion"]["features"] == list(MEASURE_NAMES)
    outline_steps = [e for e in events if e.get("stage") == "outline" and e.get("kind") == "progress"]
    assert len(outline_steps) == 60
    record = bundle.provenance["outline"]
    assert record["validation_dice"] == result["outline"]["validation_dice"] >= 0.5  # bright balls in lung
    assert any(e.get("kind") == "message" and e["message"].startswith("nodule outline (classify without a mask)")
               for e in events)
    # Given the box a mask shows, the outline's answers on that cube are the fit's validation probabilities, and
    # classify with that box as its ROI gives the same answers on the box it narrows to (the one it reports).
    fitted = result["outline"]
    shown = [c for c in outlined["cases"]
             if patient_digest(c.patient) in bundle.provenance["data"]["validation_patient_sha256"]]
    assert len(shown) == len(fitted["probabilities"]) == 6
    net = model_from_bundle(bundle)
    spec = NoduleInputSpec.from_dict(bundle.extra["nodule_input"])

    def answer_on(image, low, high):
        cube = prepare_nodule(image, center_lps=(low + high) / 2, size_mm=high - low, params=spec)
        with torch.no_grad():
            logits = net(torch.from_numpy(cube)[None])[0].numpy()
        found = outline_answers(bundle.extra, "b", cube[None], [logits[1] - logits[0]], torch.device("cpu"),
                                visible=visible_in_cube(low, high, spec)[None])
        return logits, found[0]

    for case, expected in zip(shown, fitted["probabilities"]):
        image, mask = read_volume(case.image), read_volume(case.mask)
        by_mask = classify(image, bundle, mask=mask, device="cpu")
        low, high = nodule_box(image, mask=mask, params=spec)
        assert answer_on(image, low, high)[1][0] == pytest.approx(expected, abs=1e-5)
        by_roi = classify(image, bundle, roi=(by_mask.roi_center_lps, by_mask.roi_size_mm), device="cpu")
        assert by_roi.basis == "image + learnt outline measures" and by_roi.size_from == "learnt outline"
        reported = np.asarray(by_roi.roi_center_lps), np.asarray(by_roi.roi_size_mm)
        # this run's crops show context along every axis, so nothing is narrowed: the box given is the box shown
        assert by_roi.roi_size_mm == pytest.approx(by_mask.roi_size_mm)
        assert np.all(reported[0] - reported[1] / 2 >= low - 1e-6)
        assert np.all(reported[0] + reported[1] / 2 <= high + 1e-6)
        logits, (p, size, _) = answer_on(image, reported[0] - reported[1] / 2, reported[0] + reported[1] / 2)
        assert by_roi.probabilities["malignant"] == pytest.approx(p, abs=1e-6)
        assert by_roi.image_probabilities["malignant"] == pytest.approx(
            float(torch.softmax(torch.from_numpy(logits) / bundle.extra["temperature"], 0)[1]), abs=1e-6)
        assert by_roi.diameter_mm == pytest.approx(size["diameter_mm"])
        # the reported box, given back as the ROI, is shown again as it is: the same answer
        again = classify(image, bundle, roi=reported, device="cpu")
        assert again.probabilities == pytest.approx(by_roi.probabilities, abs=1e-9)
        assert again.roi_size_mm == pytest.approx(by_roi.roi_size_mm)
        # the outline's size estimates the mask's (2 mm cube voxels against the crop's finer ones)
        assert by_mask.size_from == "mask" and by_mask.outline is None
        assert by_roi.diameter_mm == pytest.approx(by_mask.diameter_mm, rel=0.35)
        # the outline itself, on the image's grid: where the mask is, inside the box shown, the size it measures
        outline = by_roi.outline
        assert outline.same_geometry(image) and outline.array.dtype == np.uint8
        assert set(np.unique(outline.array)) <= {0, 1}
        assert dice(outline.array > 0, mask.array > 0) >= 0.5
        ijk = np.argwhere(outline.array > 0)[:, ::-1]
        lps = (image.ijk_to_lps() @ np.column_stack([ijk, np.ones(len(ijk))]).T)[:3].T
        low = np.asarray(by_roi.roi_center_lps) - np.asarray(by_roi.roi_size_mm) / 2
        assert np.all(lps >= low - 1e-6) and np.all(lps <= low + np.asarray(by_roi.roi_size_mm) + 1e-6)
        on_image = measure_nodule(image, outline)
        assert on_image["volume_ml"] == pytest.approx(by_roi.volume_ml, rel=0.35)
        # given back as a mask it marks the same nodule
        again = classify(image, bundle, mask=outline, device="cpu")
        assert again.size_from == "mask" and again.diameter_mm == pytest.approx(on_image["diameter_mm"])


def test_the_cli_says_the_size_is_an_estimate(outlined, capsys):
    case = outlined["cases"][0]
    assert main(["classify", case.image, "--model", str(outlined["result"]["bundle"]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "(estimated from the learnt outline)" in out
    assert "probability from: image + learnt outline measures (image alone: benign " in out
    assert main(["inspect", str(outlined["result"]["bundle"])]) == 0
    assert "a nodule outline network (classify without a mask)" in capsys.readouterr().out


def test_the_cli_writes_the_outline_it_estimates(outlined, tmp_path, capsys):
    case, model = outlined["cases"][0], str(outlined["result"]["bundle"])
    out = tmp_path / "outline.nii.gz"
    assert main(["classify", case.image, "--model", model, "--device", "cpu", "--outline", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    written = read_volume(out)
    assert result["outline"] == str(out) and written.same_geometry(read_volume(case.image))
    expected = classify(read_volume(case.image), outlined["bundle"], device="cpu").outline.array
    np.testing.assert_array_equal(written.array, expected)
    before = out.read_bytes()
    refusals = [(["--outline", str(out)], "already exists"),
                (["--outline", str(out), "--mask", case.mask, "--overwrite"], "with --mask, the mask is the outline"),
                (["--outline", str(tmp_path / "o.nii.gz.nii.gz")], "drop the repeated extension"),
                (["--outline", case.image, "--overwrite"], "--outline names the input scan")]
    for args, text in refusals:
        assert main(["classify", case.image, "--model", model, "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0] and "Traceback" not in err[0], err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["outline.nii.gz"]
    assert main(["classify", case.image, "--model", model, "--device", "cpu", "--outline", str(out),
                 "--overwrite"]) == 0
    assert "learnt outline written to" in capsys.readouterr().out
    # a model without an outline network says so and writes nothing
    plain, missing = classification_bundle(tmp_path / "plain.pt"), tmp_path / "none.nrrd"
    assert main(["classify", case.image, "--model", str(plain), "--device", "cpu", "--outline", str(missing)]) == 0
    assert "no outline written to" in capsys.readouterr().out and not missing.exists()
    assert main(["classify", case.image, "--model", str(plain), "--device", "cpu", "--outline", str(missing),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["outline"] is None and result["warnings"] == [] and not missing.exists()


def test_evaluate_scores_what_roi_users_get_on_a_table_with_masks(outlined, tmp_path, capsys):
    csv, model = str(outlined["folder"] / "nodules.csv"), str(outlined["result"]["bundle"])
    assert main(["evaluate", "--model", model, "--csv", csv, "--device", "cpu", "--roi-from-mask", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["roi_from_mask"] is True and result["cases"] == len(outlined["cases"])
    assert result["probability_from"] == {"image + learnt outline measures": len(outlined["cases"])}
    for case, row in list(zip(outlined["cases"], result["per_case"]))[:3]:  # classify given the mask's box as ROI
        image = read_volume(case.image)
        shown = classify(image, outlined["bundle"], mask=read_volume(case.mask), device="cpu")
        by_roi = classify(image, outlined["bundle"], roi=(shown.roi_center_lps, shown.roi_size_mm), device="cpu")
        assert row["probability"] == pytest.approx(by_roi.probabilities["malignant"], abs=1e-6)
    assert main(["evaluate", "--model", model, "--csv", csv, "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["probability_from"] == {"image + mask measures": len(outlined["cases"])}
    lung = segmentation_bundle(tmp_path / "lung.pt")
    assert main(["evaluate", "--model", str(lung), "--csv", csv, "--roi-from-mask"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--roi-from-mask is for nodule classification models" in err[0]


def test_an_empty_outline_leaves_the_image_answer_with_a_warning(outlined):
    bundle = outlined["bundle"]
    state = dict(bundle.extra["outline"]["state_dict"])
    last = [k for k in state if k.startswith("head.") and k.endswith(".bias")][-1]
    state[last] = torch.tensor([1e4, -1e4])  # background everywhere
    bundle.extra = {**bundle.extra, "outline": {**bundle.extra["outline"], "state_dict": state}}
    case = outlined["cases"][0]
    result = classify(read_volume(case.image), bundle, device="cpu")
    assert result.basis == "image" and result.probabilities == result.image_probabilities
    assert result.diameter_mm is None and result.size_from is None
    assert result.outline.same_geometry(read_volume(case.image)) and not result.outline.array.any()
    assert any("the learnt outline found no nodule" in w for w in result.warnings)


@pytest.mark.parametrize("damage, message", [
    (lambda extra: extra.pop("outline_fusion"), "has no fusion record"),
    (lambda extra: extra["outline"].pop("state_dict"), "lacks 'state_dict'"),
    (lambda extra: extra.update(outline=[1, 2]), "'extra.outline' must be a mapping"),
    (lambda extra: extra["outline"]["state_dict"].pop("head.out.weight", None) or
     extra["outline"]["state_dict"].update({"head.extra": torch.zeros(1)}), "does not fit its architecture"),
])
def test_a_damaged_outline_is_one_line_naming_the_file(outlined, tmp_path, capsys, damage, message):
    raw = torch.load(outlined["result"]["bundle"], weights_only=False)
    raw["extra"]["outline"]["state_dict"] = dict(raw["extra"]["outline"]["state_dict"])
    damage(raw["extra"])
    raw.pop("content_sha256")  # a bundle saved before checksums: only the checks stand guard
    path = tmp_path / "damaged.pt"
    torch.save(raw, path)
    before = path.read_bytes()
    case = outlined["cases"][0]
    code = main(["classify", case.image, "--model", str(path), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and str(path) in err[0], err
    assert "Traceback" not in err[0] and path.read_bytes() == before


def test_outline_steps_zero_trains_none_and_bad_values_are_one_line(outlined, tmp_path, capsys):
    cases = outlined["cases"][:8]
    settings = ClassificationSettings(steps=2, batch_size=4, val_fraction=0.5, validate_every=2, outline_steps=0)
    result = finetune_classification(cases, tmp_path / "out", "none", spec=SPEC, backbone={"depth": 10},
                                     settings=settings)
    bundle = load_bundle(result["bundle"])
    assert "outline" not in bundle.extra and "outline_fusion" not in bundle.extra
    assert bundle.provenance["outline"] == {"note": "no outline model: outline steps 0"}
    csv = str(outlined["folder"] / "nodules.csv")
    for args, text in ((["--task", "nodule", "--csv", csv, "--outline-steps", "-1"], "--outline-steps must be"),
                       (["--task", "lung", "--images", str(tmp_path), "--outline-steps", "5"], "is for --task nodule")):
        assert main(["finetune", *args, "--out", str(tmp_path / "cli")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "cli").exists()
