"""lowmem.slab_forward: the lung decoder computed in K-slabs equals the plain forward exactly."""
from __future__ import annotations

import pytest
import torch

from med3dcore.lowmem import slab_forward, supports_slabs
from med3dcore.nets import build_model
from med3dcore.sliding import make_predictor

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def lung_net():
    torch.manual_seed(0)
    net = build_model({"backbone": {"depth": 10, "shortcut_type": "B"},
                       "head": {"type": "lung_decoder", "num_classes": 3, "channels": [16, 8, 8]}}).eval()
    for module in net.modules():  # non-trivial BN statistics, so slab borders would show if they were wrong
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("shape", [(21, 30, 27), (8, 16, 16)])
@pytest.mark.parametrize("slab", [2, 6, 64])
def test_slabs_equal_plain_forward(lung_net, shape, slab):
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = lung_net(x)
        got = slab_forward(lung_net, x, slab)
    assert got.shape == expected.shape == (1, 3) + shape
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_only_lung_decoder_models_use_slabs(lung_net):
    assert supports_slabs(lung_net)
    coarse = build_model({"backbone": {"depth": 10, "shortcut_type": "B"},
                          "head": {"type": "coarse_seg", "num_classes": 2}})
    assert not supports_slabs(coarse) and not supports_slabs(torch.nn.Conv3d(1, 2, 1))


def test_predictor_uses_slabs_transparently(lung_net):
    x = torch.randn(2, 1, 16, 24, 24, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = torch.softmax(lung_net(x), dim=1)
        got = make_predictor(lung_net, "cpu", "fp32")(x)
    assert torch.allclose(got, expected, atol=1e-5)
