"""Our 3D-ResNet equals Tencent's MedicalNet: same state-dict names and shapes, same numbers on the golden input,
and a MedicalNet release file built exactly as published loads unchanged (../shared/golden, see its README)."""
from __future__ import annotations

import json
import math
import zlib
from typing import Dict, List

import numpy as np
import pytest
import torch

from med3dcore.errors import Med3DError
from med3dcore.medicalnet import detect_architecture, load_medicalnet
from med3dcore.nets import Med3DNet, build_model, resnet3d

torch.set_num_threads(2)
CONFIGS = ("resnet10_B", "resnet18_A", "resnet50_B")


def golden_tensor(key: str, shape: List[int]) -> torch.Tensor:
    """The reference weight for ``key``, made by the formula in ../shared/golden/README.md."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if key.endswith(".num_batches_tracked"):
        return torch.tensor(0)
    if key.endswith(".running_var"):
        return torch.rand(shape, generator=g) + 0.5
    if key.endswith(".running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:
        noise = 0.1 * torch.randn(shape, generator=g)
        return 1 + noise if key.endswith(".weight") else noise
    return torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))


@pytest.fixture(scope="module")
def golden(golden_dir):
    configs = json.loads((golden_dir / "medicalnet_golden.json").read_text())["configs"]
    arrays = np.load(golden_dir / "medicalnet_golden.npz")
    return configs, {k: torch.from_numpy(arrays[k]) for k in arrays.files}


def golden_state(config: Dict) -> Dict[str, torch.Tensor]:
    return {k: golden_tensor(k, s) for k, s in config["keys"].items()}


def assert_close(actual: torch.Tensor, reference: torch.Tensor) -> None:
    assert actual.shape == reference.shape
    scale = reference.abs().max().item()
    assert scale > 0
    err = (actual - reference).abs().max().item()
    assert err <= 1e-4 * scale, f"max abs error {err:.3g} vs reference scale {scale:.3g}"


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_names_and_shapes_equal_medicalnet(golden, name):
    config = golden[0][name]
    net = resnet3d(config["depth"], config["shortcut_type"], config["num_seg_classes"])
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert ours == config["keys"]
    assert list(ours) == list(config["keys"])  # same order too
    backbone = sum(v.numel() for k, v in net.state_dict().items() if not k.startswith("conv_seg."))
    assert backbone == config["backbone_elements"]


@pytest.mark.parametrize("name", CONFIGS)
def test_outputs_equal_golden(golden, name):
    configs, arrays = golden
    config = configs[name]
    net = resnet3d(config["depth"], config["shortcut_type"], config["num_seg_classes"])
    net.load_state_dict(golden_state(config), strict=True)
    net.eval()
    with torch.no_grad():
        features = net.features(arrays["input"])
        seg = net(arrays["input"])
    assert list(features.shape) == config["features_shape"]
    assert list(seg.shape) == config["seg_shape"]
    assert_close(features, arrays[f"{name}_features"])
    assert_close(seg, arrays[f"{name}_seg"])


def write_release_file(config: Dict, path) -> None:
    """A MedicalNet release as published: module.-prefixed backbone keys only."""
    state = {"module." + k: v for k, v in golden_state(config).items() if not k.startswith("conv_seg.")}
    torch.save({"state_dict": state}, path)


@pytest.mark.parametrize("name", ["resnet10_B", "resnet18_A"])
def test_release_file_loads_into_resnet_and_reproduces_features(golden, name, tmp_path):
    configs, arrays = golden
    config = configs[name]
    path = tmp_path / f"{name}.pth"
    write_release_file(config, path)
    net = resnet3d(config["depth"], config["shortcut_type"], num_seg_classes=2).eval()
    report = load_medicalnet(net, path)
    assert report.left == [k for k in config["keys"] if k.startswith("conv_seg.")]
    assert report.loaded == [k for k in config["keys"] if not k.startswith("conv_seg.")]
    with torch.no_grad():
        assert_close(net.features(arrays["input"]), arrays[f"{name}_features"])


def test_release_file_loads_into_med3dnet_encoder(golden, tmp_path):
    configs, arrays = golden
    config = configs["resnet50_B"]
    path = tmp_path / "resnet_50.pth"
    write_release_file(config, path)
    model = build_model({"backbone": {"depth": 50, "shortcut_type": "B"},
                         "head": {"type": "coarse_seg", "num_classes": 3}}).eval()
    head_before = model.head.conv.weight.detach().clone()
    report = load_medicalnet(model, path)
    assert isinstance(model, Med3DNet)
    assert report.left == ["head.conv.weight", "head.conv.bias"]
    assert len(report.loaded) == sum(1 for k in config["keys"] if not k.startswith("conv_seg."))
    assert all(k.startswith("encoder.") for k in report.loaded)
    assert torch.equal(model.head.conv.weight, head_before)
    x = arrays["input"]
    with torch.no_grad():
        assert_close(model.encoder.features(x), arrays["resnet50_B_features"])
        assert model(x).shape == (1, 3) + tuple(x.shape[2:])


def test_release_file_of_other_shortcut_is_refused_with_both_architectures(golden, tmp_path):
    path = tmp_path / "resnet_18.pth"
    write_release_file(golden[0]["resnet18_A"], path)
    net = resnet3d(18, "B", num_seg_classes=None)
    before = net.conv1.weight.detach().clone()
    with pytest.raises(Med3DError, match="holds ResNet-18, shortcut A; model is ResNet-18, shortcut B"):
        load_medicalnet(net, path)
    assert torch.equal(net.conv1.weight, before)  # nothing half-loaded
    with pytest.raises(Med3DError, match="holds ResNet-18, shortcut A; model is ResNet-10, shortcut B"):
        load_medicalnet(resnet3d(10, "B", None), path)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("prefix", ["", "module.", "encoder.", "module.encoder."])
def test_detect_architecture_from_golden_keys(golden, name, prefix):
    config = golden[0][name]
    state = {prefix + k: torch.empty(s) for k, s in config["keys"].items()}
    assert detect_architecture(state) == {"depth": config["depth"], "shortcut_type": config["shortcut_type"],
                                          "preact": False}
