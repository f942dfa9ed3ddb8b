"""Med3D model bundles: save/load round trip, refusals with clear messages, inspect_file and the models folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from med3dcore import __version__
from med3dcore.bundles import Bundle, inspect_file, list_models, load_bundle, model_from_bundle, save_bundle
from med3dcore.catalog import models_dir
from med3dcore.checkpoint_files import BUNDLE_FORMAT, atomic_save, safe_load
from med3dcore.errors import Med3DError
from med3dcore.medicalnet import count_parameters, export_medicalnet, load_medicalnet
from med3dcore.nets import Med3DNet, build_model, resnet3d
from med3dcore.preprocess import PreprocessSpec

torch.set_num_threads(2)

ARCH = {"backbone": {"depth": 10, "shortcut_type": "B", "preact": False},
        "head": {"type": "classifier", "num_classes": 2}}
LABELS = [{"value": 0, "name": "benign", "color": [0, 200, 0]}, {"value": 1, "name": "malignant"}]
TASK = {"type": "classification", "name": "nodule"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    net = build_model(ARCH)
    with torch.no_grad():  # non-default BN statistics, so a missing buffer would change the output
        for name, tensor in net.state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(0.1 * torch.randn(tensor.shape))
    return net.eval()


@pytest.fixture(scope="module")
def bundle_path(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("bundles") / "nodule.pt"
    save_bundle(path, model, architecture=ARCH, task=TASK, labels=LABELS,
                preprocessing=PreprocessSpec(spacing=(1.0, 1.0, 1.0), window=(-1000.0, 400.0), modality="CT"),
                provenance={"data": "LIDC crops", "steps": 10, "metrics": {"auc": np.float64(0.75)}},
                extra={"nodule_input": {"cube": 32, "spacing_mm": 1.0}})
    return path


def _save(path, model, **changes):
    kwargs = dict(architecture=ARCH, task=TASK, labels=LABELS, preprocessing={}, provenance={})
    kwargs.update(changes)
    return save_bundle(path, model, **kwargs)


def test_bundle_round_trip_reproduces_the_model(model, bundle_path):
    bundle = load_bundle(bundle_path)
    assert isinstance(bundle, Bundle) and bundle.path == bundle_path
    assert bundle.architecture == ARCH and bundle.task == TASK and bundle.labels == LABELS
    assert bundle.preprocessing["window"] == [-1000.0, 400.0] and bundle.preprocessing["modality"] == "CT"
    assert PreprocessSpec.from_dict(bundle.preprocessing).spacing == (1.0, 1.0, 1.0)
    assert bundle.provenance["metrics"] == {"auc": 0.75} and type(bundle.provenance["metrics"]["auc"]) is float
    assert bundle.provenance["med3dcore"] == __version__ and bundle.provenance["created"].endswith("+00:00")
    assert bundle.extra == {"nodule_input": {"cube": 32, "spacing_mm": 1.0}}
    raw = safe_load(bundle_path)
    assert raw["format"] == BUNDLE_FORMAT and raw["format_version"] == 1
    restored = model_from_bundle(bundle)
    assert isinstance(restored, Med3DNet) and not restored.training
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


def test_bundle_metadata_is_json_serialisable(bundle_path):
    bundle = load_bundle(bundle_path)
    json.dumps([bundle.architecture, bundle.task, bundle.labels, bundle.preprocessing, bundle.provenance,
                bundle.extra])


def test_save_bundle_never_overwrites_unless_asked(model, bundle_path):
    before = bundle_path.read_bytes()
    with pytest.raises(Med3DError, match="already exists; choose another name or allow overwriting"):
        _save(bundle_path, model)
    assert bundle_path.read_bytes() == before


@pytest.mark.parametrize("changes,message", [
    ({"architecture": {"backbone": {"depth": 18, "shortcut_type": "A"}, "head": ARCH["head"]}},
     "the architecture says ResNet-18, shortcut A but the weights are ResNet-10, shortcut B"),
    ({"architecture": {"backbone": ARCH["backbone"], "head": {"type": "classifier", "num_classes": 5}}},
     "the head weights do not match head"),
    ({"architecture": {"backbone": ARCH["backbone"], "head": {"type": "mystery"}}}, "unknown head type 'mystery'"),
    ({"architecture": {"backbone": ARCH["backbone"]}}, "architecture must be"),
    ({"task": {"type": "regression"}}, "task must be a dict whose 'type' is one of segmentation, classification"),
    ({"labels": [{"value": 1, "name": "a"}, {"value": 1, "name": "b"}]}, "label value 1 is used twice"),
    ({"labels": [{"value": 1, "name": "a", "color": [300, 0, 0]}]}, "give three values 0-255"),
    ({"labels": [{"name": "no value"}]}, "needs an integer 'value' and a 'name'"),
])
def test_save_bundle_checks_its_description(model, tmp_path, changes, message):
    path = tmp_path / "bad.pt"
    with pytest.raises(Med3DError, match=message):
        _save(path, model, **changes)
    assert not path.exists()


def test_save_bundle_unwraps_data_parallel(model, tmp_path):
    path = _save(tmp_path / "dp.pt", torch.nn.DataParallel(model))
    assert load_bundle(path).state_dict.keys() == model.state_dict().keys()


def test_save_bundle_needs_a_med3d_model(tmp_path):
    with pytest.raises(Med3DError, match="no 'encoder.' keys; save a Med3DNet"):
        _save(tmp_path / "x.pt", resnet3d(10, "B", None))


def test_load_bundle_of_a_medicalnet_file_says_fine_tune_first(model, tmp_path):
    path = tmp_path / "resnet_10.pth"
    export_medicalnet(model, path)
    with pytest.raises(Med3DError) as info:
        load_bundle(path)
    assert str(info.value) == (f"{path} is a MedicalNet backbone file, not a Med3D model: fine-tune it first with "
                               f"med3d finetune --init {path}")


def _tampered(bundle_path, tmp_path, **changes):
    raw = safe_load(bundle_path)
    raw.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del raw[key]
    path = tmp_path / "tampered.pt"
    atomic_save(raw, path)
    return path


@pytest.mark.parametrize("changes,message", [
    ({"format_version": 2}, "is format version 2, newer than this med3dcore .* reads \\(up to 1\\); upgrade"),
    ({"format_version": "1"}, "has no valid format_version"),
    ({"labels": None, "task": None}, "lacks task, labels; the file is damaged or was not written by med3dcore"),
    ({"state_dict": {}}, "holds no weights"),
])
def test_load_bundle_refuses_damaged_or_newer_files(bundle_path, tmp_path, changes, message):
    with pytest.raises(Med3DError, match=message):
        load_bundle(_tampered(bundle_path, tmp_path, **changes))


def test_load_bundle_of_other_files(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(1)}, bare)
    with pytest.raises(Med3DError, match="is a bare state dict .* not a Med3D model"):
        load_bundle(bare)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(Med3DError, match="is not a Med3D model file \\(no format 'med3d-bundle'\\)"):
        load_bundle(other)


def test_model_from_bundle_refuses_weights_that_do_not_fit(bundle_path):
    bundle = load_bundle(bundle_path)
    state = dict(bundle.state_dict)
    del state["encoder.layer1.0.bn1.running_var"]
    broken = Bundle(bundle.architecture, bundle.task, bundle.labels, bundle.preprocessing, bundle.provenance,
                    state, path=bundle.path)
    with pytest.raises(Med3DError, match="weights do not fit the architecture it records \\(1 missing"):
        model_from_bundle(broken)
    state = dict(bundle.state_dict)
    state["encoder.conv1.weight"] = torch.zeros(64, 1, 7, 7, 5)
    reshaped = Bundle(bundle.architecture, bundle.task, bundle.labels, bundle.preprocessing, bundle.provenance,
                      state, path=bundle.path)
    with pytest.raises(Med3DError, match="tensor encoder.conv1.weight has shape \\(64, 1, 7, 7, 5\\)"):
        model_from_bundle(reshaped)


def test_bundle_encoder_loads_with_load_medicalnet(model, bundle_path):
    net = resnet3d(10, "B", num_seg_classes=None)
    report = load_medicalnet(net, bundle_path)
    assert report.left == []
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in net.state_dict().items())


def test_inspect_bundle_and_medicalnet_file(model, bundle_path, tmp_path):
    info = inspect_file(bundle_path)
    backbone = count_parameters(model.encoder.state_dict())
    assert backbone == sum(p.numel() for p in model.encoder.parameters()) == 14_355_520
    assert info["format"] == "med3d-bundle" and info["format_version"] == 1
    assert (info["depth"], info["shortcut_type"], info["preact"]) == (10, "B", False)
    assert info["backbone_parameters"] == backbone
    assert info["total_parameters"] == sum(p.numel() for p in model.parameters()) == backbone + 512 * 2 + 2
    assert info["task"] == TASK and info["labels"] == LABELS and info["head"] == ARCH["head"]
    json.dumps(info)

    release = tmp_path / "resnet_10.pth"
    export_medicalnet(model, release)
    info = inspect_file(release)
    assert info["format"] == "medicalnet" and info["depth"] == 10 and info["shortcut_type"] == "B"
    assert info["backbone_parameters"] == info["total_parameters"] == backbone
    assert "task" not in info and info["tensors"] == len(model.encoder.state_dict())

    bare = tmp_path / "bare.pt"
    torch.save(resnet3d(18, "A", None, preact=True).state_dict(), bare)
    info = inspect_file(bare)
    assert (info["format"], info["depth"], info["shortcut_type"], info["preact"]) == ("state_dict", 18, "A", True)


def test_inspect_refuses_non_networks(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(Med3DError, match="holds no 3D-ResNet weights"):
        inspect_file(path)


def test_models_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MED3D_MODELS", str(tmp_path / "models"))
    assert models_dir() == tmp_path / "models"
    monkeypatch.delenv("MED3D_MODELS")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models_dir() == tmp_path / ".med3d" / "models"


def test_list_models_reports_bundles_and_unusable_files(model, bundle_path, tmp_path, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "b_nodule.pt").write_bytes(bundle_path.read_bytes())
    export_medicalnet(model, folder / "a_backbone.pth")
    (folder / "c_broken.ckpt").write_bytes(bundle_path.read_bytes()[:1000])
    (folder / "notes.txt").write_text("not a model")
    models = list_models(folder)
    assert [m.name for m in models] == ["a_backbone", "b_nodule", "c_broken"]
    backbone, nodule, broken = models
    assert nodule.error is None and nodule.task == TASK and nodule.labels == LABELS
    assert nodule.path == folder / "b_nodule.pt"
    assert "MedicalNet backbone file, not a Med3D model" in backbone.error and backbone.task == {}
    assert "damaged or truncated" in broken.error
    monkeypatch.setenv("MED3D_MODELS", str(folder))
    assert [m.name for m in list_models()] == ["a_backbone", "b_nodule", "c_broken"]
    assert list_models(tmp_path / "absent") == []
