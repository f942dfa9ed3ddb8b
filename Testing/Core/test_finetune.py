"""Fine-tuning: patient-grouped splits, freezing and learning rates, initialisation from MedicalNet files and
bundles, and short real runs on synthetic phantoms that write bundles inference can use."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from med3dcore.bundles import load_bundle, model_from_bundle, save_bundle
from med3dcore.classification_finetune import (ClassificationSettings, CubeSampler, classification_loss,
                                               finetune_classification)
from med3dcore.nodule_cubes import cached_cubes, prepare_cases
from med3dcore.domains import domain_from_dict
from med3dcore.errors import Med3DError
from med3dcore.finetune import (build_initialised_model, encoder_head_groups, freeze_encoder_parts, grouped_folds,
                                grouped_split)
from med3dcore.infer import classify
from med3dcore.medicalnet import export_medicalnet
from med3dcore.nodule_evaluation import patient_digest
from med3dcore.nodule_mask_loss import attach_mask_head, detach_mask_head, mask_classification_loss
from med3dcore.nodule_measures import MEASURE_NAMES
from med3dcore.nets import build_model
from med3dcore.nodules import NoduleInputSpec, read_nodule_table
from med3dcore.phantoms import make_ct_phantom, make_nodule_crop
from med3dcore.segmentation_finetune import SegmentationSettings, finetune_segmentation
from med3dcore.volume_files import read_volume, write_volume

torch.set_num_threads(2)
SMALL_HEAD = {"type": "classifier", "num_classes": 2}


# ------------------------------------------------------------------------------------------------------ splits
def test_grouped_split_never_splits_a_patient():
    rng = np.random.default_rng(0)
    groups = [f"p{int(g)}" for g in rng.integers(0, 40, 200)]
    labels = rng.integers(0, 2, 200)
    train, val = grouped_split(groups, 0.25, labels, seed=3)
    assert len(set(train) | set(val)) == 200 and not set(train) & set(val)
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    n_val_patients = len({groups[i] for i in val})
    assert 8 <= n_val_patients <= 12  # about 25% of ~40 patients
    assert set(labels[val]) == {0, 1}
    # deterministic for a seed, different for another
    again = grouped_split(groups, 0.25, labels, seed=3)
    assert np.array_equal(again[1], val)


def test_grouped_split_needs_two_patients():
    with pytest.raises(Med3DError, match="at least two patients"):
        grouped_split(["a", "a", "a"], 0.2)
    with pytest.raises(Med3DError, match="above 0 and below 1"):
        grouped_split(["a", "b"], 1.5)
    with pytest.raises(Med3DError, match="0 \\(no validation\\) cannot make a train/validation split.*such as 0.2"):
        grouped_split(["a", "b"], 0.0)


def test_grouped_folds_partition_by_patient_and_balance_strata():
    rng = np.random.default_rng(1)
    groups = [f"p{int(g)}" for g in rng.integers(0, 60, 300)]
    strata = np.array([int(g[1:]) % 3 == 0 for g in groups])
    folds = grouped_folds(groups, 3, strata, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(300))
    patient_sets = [{groups[i] for i in f} for f in folds]
    assert all(not a & b for n, a in enumerate(patient_sets) for b in patient_sets[n + 1:])
    positive_patients = [sum(1 for p in s if int(p[1:]) % 3 == 0) for s in patient_sets]
    assert max(positive_patients) - min(positive_patients) <= 1
    with pytest.raises(Med3DError, match="folds"):
        grouped_folds(["a", "b"], 3)


# ------------------------------------------------------------------------------------- model initialisation
def test_freeze_and_learning_rate_groups():
    model = build_model({"backbone": {"depth": 10}, "head": SMALL_HEAD})
    frozen = freeze_encoder_parts(model, ["conv1", "layer1"])
    assert frozen and all(n.startswith(("encoder.conv1.", "encoder.layer1.")) for n in frozen)
    assert not model.encoder.conv1.weight.requires_grad and model.encoder.layer2[0].conv1.weight.requires_grad
    groups = {g["name"]: g for g in encoder_head_groups(model, 1e-3, 1e-2)}
    assert groups["pretrained"]["lr"] == 1e-3 and groups["new"]["lr"] == 1e-2
    ids = {id(p) for p in groups["pretrained"]["params"]}
    assert id(model.encoder.conv1.weight) not in ids and id(model.encoder.layer4[0].conv1.weight) in ids
    assert {id(p) for p in groups["new"]["params"]} == {id(p) for p in model.head.parameters()}
    with pytest.raises(Med3DError, match="cannot freeze 'layer9'"):
        freeze_encoder_parts(model, ["layer9"])


def test_init_from_medicalnet_file_and_bundle(tmp_path):
    torch.manual_seed(0)
    source = build_model({"backbone": {"depth": 10, "shortcut_type": "A"}, "head": SMALL_HEAD})
    export_medicalnet(source, tmp_path / "resnet_10.pth")
    model, prov = build_initialised_model({"type": "lung_decoder", "num_classes": 2, "channels": [8, 8, 8]},
                                          str(tmp_path / "resnet_10.pth"))
    assert prov["architecture"]["backbone"]["shortcut_type"] == "A"  # taken from the file
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)
    save_bundle(tmp_path / "b.pt", source, architecture={"backbone": {"depth": 10, "shortcut_type": "A"},
                                                         "head": SMALL_HEAD},
                task={"type": "classification", "name": "x"}, labels=[{"value": 0, "name": "a"}],
                preprocessing={}, provenance={})
    model2, prov2 = build_initialised_model(SMALL_HEAD, str(tmp_path / "b.pt"))
    assert torch.equal(model2.encoder.layer4[0].conv2.weight, source.encoder.layer4[0].conv2.weight)
    assert prov2["init_format"] == "med3d-bundle"
    with pytest.raises(Med3DError, match="no such file"):
        build_initialised_model(SMALL_HEAD, str(tmp_path / "missing.pth"))


# -------------------------------------------------------------------------------------------- classification
def _nodule_table(folder: Path, n_patients: int = 10) -> Path:
    rows = []
    for p in range(n_patients):
        for kind in ("benign", "malignant"):
            image, mask = make_nodule_crop(kind, seed=p * 2 + (kind == "malignant"), shape=(16, 24, 24),
                                           spacing=(1.0, 1.0, 2.0))
            stem = f"p{p}_{kind}"
            write_volume(image, folder / f"{stem}.nii.gz")
            write_volume(mask, folder / f"{stem}_mask.nii.gz")
            rows.append({"image": f"{stem}.nii.gz", "mask": f"{stem}_mask.nii.gz", "patient_id": f"P{p}",
                         "label": kind})
    path = folder / "nodules.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_cube_sampler_is_a_function_of_the_step():
    cubes = np.random.default_rng(0).random((10, 1, 8, 8, 8)).astype(np.float32)
    labels = np.arange(10) % 2
    a, b = CubeSampler(cubes, labels, 4, seed=5), CubeSampler(cubes, labels, 4, seed=5)
    for step in (1, 7, 3):
        assert torch.equal(a.next_batch(step)["image"], b.next_batch(step)["image"])
    # three batches of 4 from 10 cases: the first epoch visits every case once
    first_epoch = np.concatenate([a.indices(s) for s in (1, 2, 3)])[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))



def test_cube_sampler_moves_each_mask_with_its_image():
    cubes = np.random.default_rng(1).random((6, 1, 8, 8, 8)).astype(np.float32)
    labels = np.arange(6) % 2
    plain = CubeSampler(cubes, labels, 4, seed=3)
    with_masks = CubeSampler(cubes, labels, 4, seed=3, masks=cubes * 0.5)
    for step in (1, 2, 5):
        batch = with_masks.next_batch(step)
        assert batch["image"].shape == batch["mask"].shape == (4, 1, 8, 8, 8)
        # same flips, transposes and shifts on both channels, and the same images as without masks
        torch.testing.assert_close(batch["mask"], batch["image"] * 0.5)
        assert torch.equal(batch["image"], plain.next_batch(step)["image"])
    assert "mask" not in plain.next_batch(1)


def test_mask_loss_adds_the_weighted_mask_term_and_trains_its_head():
    torch.manual_seed(0)
    model = attach_mask_head(build_model({"backbone": {"depth": 10}, "head": {"type": "classifier",
                                                                              "num_classes": 2}}))
    image = torch.randn(2, 1, 16, 16, 16)
    mask = torch.zeros(2, 1, 16, 16, 16)
    mask[:, :, 4:12, 4:12, 4:12] = 1.0
    batch = {"image": image, "label": torch.tensor([0, 1]), "mask": mask}
    plain, _ = classification_loss(model, batch)
    combined, info = mask_classification_loss(0.5)(model, batch)
    assert combined.item() == pytest.approx(plain.item() + 0.5 * info["mask_loss"], rel=1e-5)
    combined.backward()
    assert model.mask_head.weight.grad.abs().sum() > 0
    new_layers = next(g for g in encoder_head_groups(model, 1e-3, 1e-2) if g["name"] == "new")
    assert new_layers["lr"] == 1e-2 and any(p is model.mask_head.weight for p in new_layers["params"])
    detach_mask_head(model)
    assert not any(k.startswith("mask_head") for k in model.state_dict())


def test_mask_loss_run_saves_the_classifier_alone(tmp_path):
    cases = read_nodule_table(str(_nodule_table(tmp_path, n_patients=4)))
    spec, events = NoduleInputSpec(cube=16, spacing_mm=2.0), []
    settings = ClassificationSettings(steps=3, batch_size=4, val_fraction=0.5, validate_every=3, mask_weight=1.0,
                                      cache_dir=str(tmp_path / "cache"))
    result = finetune_classification(cases, tmp_path / "out", "nodule", spec=spec, settings=settings,
                                     backbone={"depth": 10}, reporter=events.append)
    steps = [e for e in events if e.get("stage") == "finetune" and e.get("kind") == "progress"]
    assert len(steps) == 3 and all("mask_loss" in e["metrics"] for e in steps)
    bundle = load_bundle(result["bundle"])
    assert not any(k.startswith("mask_head") for k in bundle.state_dict)
    assert bundle.provenance["settings"]["mask_weight"] == 1.0
    assert model_from_bundle(bundle)(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2)
    # the masks' cubes were cached beside the images'
    assert len(list((tmp_path / "cache").glob("nodule_cubes-*.npy"))) == 2
    # without a mask for every case the loss is left out, and the run says so
    no_masks = [dataclasses.replace(c, mask=None, roi=None) if n == 0 else c for n, c in enumerate(cases)]
    events.clear()
    finetune_classification(no_masks, tmp_path / "out", "roi", spec=spec, settings=settings, backbone={"depth": 10},
                            reporter=events.append)
    assert any(e.get("kind") == "message" and "no auxiliary mask loss" in e["message"] for e in events)
    steps = [e for e in events if e.get("stage") == "finetune" and e.get("kind") == "progress"]
    assert steps and not any("mask_loss" in e["metrics"] for e in steps)

def test_prepared_cubes_are_cached_per_table_and_spec(tmp_path):
    cases = read_nodule_table(str(_nodule_table(tmp_path, n_patients=2)))
    spec, cache = NoduleInputSpec(cube=8, spacing_mm=2.0), tmp_path / "cache"
    prepared = []
    first = cached_cubes(cases, spec, cache, prepared.append)
    assert len(prepared) == len(cases) and len(list(cache.glob("nodule_cubes-*.npy"))) == 1
    np.testing.assert_array_equal(first, prepare_cases(cases, spec))
    again = []
    np.testing.assert_array_equal(cached_cubes(cases, spec, cache, again.append), first)
    assert again == []  # read from the cache, nothing prepared
    # another spec, or a changed source file, is a new entry
    cached_cubes(cases, NoduleInputSpec(cube=8, spacing_mm=3.0), cache)
    os.utime(cases[0].image, ns=(0, 0))
    changed = []
    cached_cubes(cases, spec, cache, changed.append)
    assert len(changed) == len(cases) and len(list(cache.glob("nodule_cubes-*.npy"))) == 3


@pytest.mark.slow
def test_classification_run_learns_phantom_nodules_and_writes_a_bundle(tmp_path):
    cases = read_nodule_table(str(_nodule_table(tmp_path)))
    spec = NoduleInputSpec(cube=16, spacing_mm=2.0)
    events = []
    result = finetune_classification(
        cases, tmp_path / "out", "nodule", spec=spec, backbone={"depth": 10, "shortcut_type": "B"},
        settings=ClassificationSettings(steps=30, batch_size=4, val_fraction=0.3, validate_every=10, lr=1e-3),
        reporter=events.append)
    bundle = load_bundle(result["bundle"])
    assert bundle.task == {"type": "classification", "name": "nodule"}
    assert [l["name"] for l in bundle.labels] == ["benign", "malignant"]
    assert bundle.extra["nodule_input"]["cube"] == 16
    # the phantom crops leave 4-6 mm around their nodules: the context shown is narrowed to that, per axis, kept in
    # the bundle (classify below reproduces the validation probabilities only if it shows the same context)
    assert bundle.extra["nodule_input"]["context_mm"] == [4.0, 5.0, 6.0]
    assert any(e.get("kind") == "message" and "x, y, z = 4, 5, 6 mm" in e["message"] for e in events)
    assert bundle.provenance["init"] == "scratch"
    assert bundle.provenance["data"]["validation_patients"] == 3
    assert set(bundle.provenance["metrics"]) == {"accuracy", "auc", "loss", "brier", "ece"}
    # the phantoms' two kinds differ in size and density: a short run separates them
    assert result["metrics"]["auc"] >= 0.8
    # temperature scaling fitted on the 6 validation cases, stored, and what classify then gives
    calibration = bundle.provenance["calibration"]
    assert calibration["fitted_on"] == "validation" and calibration["validation_cases"] == 6
    assert bundle.extra["temperature"] == calibration["temperature"] == result["calibration"]["temperature"]
    assert 0.05 <= calibration["temperature"] <= 20.0 and calibration["temperature"] != 1.0
    assert set(calibration["before"]) == set(calibration["after"]) == {"brier", "ece"}
    assert calibration["after"]["brier"] == pytest.approx(result["metrics"]["brier"])
    data = bundle.provenance["data"]
    # digests, not the ids themselves, travel with the model
    assert sorted(data["train_patient_sha256"] + data["validation_patient_sha256"]) == sorted(
        patient_digest(f"P{p}") for p in range(10))
    assert not any(f"P{p}" in json.dumps(bundle.provenance) for p in range(10))
    assert len(data["validation_patient_sha256"]) == 3
    validation = [c for c in cases if patient_digest(c.patient) in data["validation_patient_sha256"]]
    by_classify = [classify(read_volume(c.image), bundle, mask=read_volume(c.mask), device="cpu")
                   for c in validation]
    assert [r.image_probabilities["malignant"] for r in by_classify] == pytest.approx(
        result["probabilities"][:, 1].tolist(), abs=1e-5)
    # every case has a mask, so the measured-size model was fitted and classify --mask gives its probability
    fusion = bundle.provenance["measured_fusion"]
    assert bundle.extra["measured_fusion"]["features"] == list(MEASURE_NAMES)
    assert {r.basis for r in by_classify} == {"image + mask measures"}
    fused = np.array([r.probabilities["malignant"] for r in by_classify])
    y = np.array([c.label for c in validation])
    assert fusion["validation"]["brier"] == pytest.approx(float(np.mean((fused - y) ** 2)), abs=1e-5)
    assert any(e.get("kind") == "message" and e["message"] == fusion["summary"] for e in events)
    summary = [e["message"] for e in events if e.get("kind") == "result"]
    assert len(summary) == 1 and f"temperature {calibration['temperature']:.3f}" in summary[0]
    assert f"Brier {calibration['before']['brier']:.3f} -> {calibration['after']['brier']:.3f}" in summary[0]
    steps = [e for e in events if e.get("stage") == "finetune" and e.get("kind") == "progress"]
    assert len(steps) == 30 and all("loss" in e["metrics"] for e in steps)
    assert any(e.get("kind") == "message" and "auc" in e.get("metrics", {}) for e in events)
    model = model_from_bundle(bundle)
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2)
    with pytest.raises(Med3DError, match="exists"):
        finetune_classification(cases, tmp_path / "out", "nodule", spec=spec,
                                settings=ClassificationSettings(steps=1))


# --------------------------------------------------------------------------------------------- segmentation
def _phantom_domain(folder: Path, n: int, mapping: dict, names: dict):
    cases = []
    for c in range(n):
        image, labels, _ = make_ct_phantom(shape=(16, 32, 32), spacing=(3.0, 3.0, 6.0), seed=c, nodules=())
        remapped = np.zeros(labels.shape, np.uint8)
        for source, target in mapping.items():
            remapped[np.asarray(labels.array) == source] = target
        write_volume(image, folder / f"case{c}.nii.gz")
        write_volume(labels.with_array(remapped), folder / f"case{c}_label.nii.gz")
        cases.append({"image": f"case{c}.nii.gz", "label": f"case{c}_label.nii.gz"})
    return domain_from_dict({"name": "phantoms", "modality": "CT", "labels": names, "cases": cases}, folder)


@pytest.mark.slow
def test_lung_preset_writes_a_bundle_that_segments(tmp_path):
    from med3dcore.infer import segment

    domain = _phantom_domain(tmp_path, 3, {1: 1}, {1: "lung"})
    result = finetune_segmentation(
        domain, tmp_path / "out", "lung", preset="lung",
        settings=SegmentationSettings(steps=3, batch_size=1, patch=(8, 16, 16), validate_every=3,
                                      spacing=(6.0, 6.0, 6.0), val_fraction=0.34))
    bundle = load_bundle(result["bundle"])
    assert bundle.task == {"type": "segmentation", "name": "lung"}
    assert bundle.labels[0]["terminology"] == "SCT^39607008^Lung" and bundle.labels[0]["color"]
    assert bundle.architecture["head"]["type"] == "lung_decoder"
    assert bundle.preprocessing["spacing"] == [6.0, 6.0, 6.0] and bundle.preprocessing["modality"] == "CT"
    data = bundle.provenance["data"]
    assert len(data["validation_cases"]) == 1 and not set(data["validation_cases"]) & set(data["train_cases"])
    assert "dice" in bundle.provenance["metrics"]
    image, _, _ = make_ct_phantom(shape=(16, 32, 32), spacing=(3.0, 3.0, 6.0), seed=9, nodules=())
    out = segment(image, result["bundle"], device="cpu")
    assert out.labels.shape == image.shape and out.labels.same_geometry(image)


@pytest.mark.slow
def test_liver_preset_has_two_stages(tmp_path):
    domain = _phantom_domain(tmp_path, 3, {2: 1, 3: 2}, {1: "liver", 2: "liver tumour"})
    result = finetune_segmentation(
        domain, tmp_path / "out", "liver", preset="liver",
        settings=SegmentationSettings(steps=2, batch_size=1, patch=(8, 16, 16), validate_every=2,
                                      spacing=(6.0, 6.0, 6.0), val_fraction=0.34, coarse_steps=2))
    bundle = load_bundle(result["bundle"])
    assert bundle.architecture["head"]["type"] == "denseaspp"
    assert [l["name"] for l in bundle.labels] == ["liver", "liver tumour"]
    assert bundle.preprocessing["window"] == [-200.0, 250.0]
    coarse = bundle.extra["coarse"]
    assert coarse["architecture"]["head"]["type"] == "coarse_seg"
    assert coarse["preprocessing"]["spacing"] == [4.0, 4.0, 4.0]
    assert bundle.extra["margin_mm"] == 10.0
    net = build_model(coarse["architecture"])
    net.load_state_dict(coarse["state_dict"])


def test_preset_rejects_unmapped_labels(tmp_path):
    domain = _phantom_domain(tmp_path, 2, {2: 5}, {5: "liver"})
    with pytest.raises(Med3DError, match="--label-map 5:1"):
        finetune_segmentation(domain, tmp_path / "out", "x", preset="liver")


def test_chosen_validation_cases_must_not_share_a_patient(tmp_path):
    domain = _phantom_domain(tmp_path, 3, {1: 1}, {1: "lung"})
    with pytest.raises(Med3DError, match="share no patient"):
        finetune_segmentation(domain, tmp_path / "out", "x", preset="lung", val_cases=["case0"],
                              groups={"case0": "P", "case1": "P", "case2": "Q"})
    with pytest.raises(Med3DError, match="must be case ids"):
        finetune_segmentation(domain, tmp_path / "out", "x", preset="lung", val_cases=["nope"])
