"""Task heads: output shapes at the input size (also for sizes that are not multiples of 8), the registry, and
parameter counts that follow from the layer definitions."""
from __future__ import annotations

import pytest
import torch

from med3dcore.errors import Med3DError
from med3dcore.nets import HEADS, build_model
from med3dcore.nets.denseaspp import DenseASPPHead
from med3dcore.nets.heads import ClassifierHead, LungDecoderHead

torch.set_num_threads(2)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_holds_the_four_heads():
    assert set(HEADS) == {"coarse_seg", "lung_decoder", "classifier", "denseaspp"}


@pytest.mark.parametrize("size", [(16, 16, 16), (13, 17, 11), (9, 20, 15)])
def test_lung_decoder_returns_exactly_the_input_size(size):
    torch.manual_seed(0)
    net = build_model({"backbone": {"depth": 10}, "head": {"type": "lung_decoder", "num_classes": 3,
                                                            "channels": [8, 8, 4]}}).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, *size))
    assert out.shape == (1, 3) + size
    assert torch.isfinite(out).all()


def test_lung_decoder_is_three_doublings():
    head = LungDecoderHead(in_channels=512, num_classes=2, channels=(16, 8, 4)).eval()
    with torch.no_grad():
        out = head.classify(head.up(torch.zeros(1, 512, 3, 4, 5)))
    assert out.shape == (1, 2, 24, 32, 40)
    # Three transposed convs (no bias) + three convs (no bias) + 6 BNs (2 params each) + 1x1x1 conv with bias.
    expected = (512 * 16 + 16 * 16 + 16 * 8 + 8 * 8 + 8 * 4 + 4 * 4) * 27 + 2 * (16 + 16 + 8 + 8 + 4 + 4) + 4 * 2 + 2
    assert _count(head) == expected


def test_lung_decoder_rejects_wrong_channel_list():
    with pytest.raises(Med3DError, match="three positive channel counts"):
        LungDecoderHead(512, 2, channels=(8, 8))


def test_classifier_pools_globally():
    head = ClassifierHead(in_channels=512, num_classes=2).eval()
    assert _count(head) == 512 * 2 + 2
    features = torch.randn(3, 512, 4, 5, 6)
    logits = head(features, (32, 40, 48))
    assert logits.shape == (3, 2)
    expected = features.mean(dim=(2, 3, 4)) @ head.fc.weight.T + head.fc.bias
    assert torch.allclose(logits, expected, atol=1e-5)
    # Any feature-map size gives the same pooled vector for a constant map.
    const = torch.ones(1, 512, 2, 2, 2)
    assert torch.allclose(head(const, (16,) * 3), head(torch.ones(1, 512, 5, 3, 7), (40, 24, 56)), atol=1e-5)


@pytest.mark.parametrize("size", [(16, 16, 16), (11, 19, 14)])
def test_denseaspp_output_at_input_size(size):
    torch.manual_seed(0)
    net = build_model({"backbone": {"depth": 10}, "head": {"type": "denseaspp", "num_classes": 3,
                                                            "mid_channels": 8, "growth": 4}}).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *size))
    assert out.shape == (2, 3) + size


def test_denseaspp_layers_see_all_earlier_outputs():
    head = DenseASPPHead(in_channels=32, num_classes=2, dilations=(1, 2, 3), mid_channels=8, growth=4)
    # Layer n's bottleneck takes the features plus n earlier outputs of `growth` channels each.
    widths = [layer[2].in_channels for layer in head.layers]
    assert widths == [32, 36, 40]
    assert [layer[5].dilation for layer in head.layers] == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    assert head.classify[2].in_channels == 44


def test_denseaspp_rejects_no_dilations():
    with pytest.raises(Med3DError, match="dilation"):
        DenseASPPHead(32, 2, dilations=())


def test_heads_learn_gradients_flow_to_encoder():
    torch.manual_seed(0)
    net = build_model({"backbone": {"depth": 10}, "head": {"type": "classifier", "num_classes": 2}})
    loss = net(torch.randn(2, 1, 16, 16, 16)).sum()
    loss.backward()
    assert net.encoder.conv1.weight.grad is not None
    assert float(net.encoder.conv1.weight.grad.abs().sum()) > 0
