"""Behaviour of nets.resnet beyond the golden configurations: every depth, shortcut types, pre-activation, shapes,
gradients and argument checking."""
from __future__ import annotations

import pytest
import torch

from med3dcore.errors import Med3DError
from med3dcore.medicalnet import count_parameters, detect_architecture
from med3dcore.nets import ResNet3D, build_model, resnet3d
from med3dcore.nets.resnet import DEPTHS, Bottleneck, PreActBasicBlock, PreActBottleneck, ZeroPadShortcut

torch.set_num_threads(2)

# Learnable parameters of the encoder, counted independently from the ResNet papers' block formulas.
def expected_parameters(depth: int, shortcut: str, preact: bool) -> int:
    kind, counts = DEPTHS[depth]
    total = 64 * 7 ** 3 + 2 * 64  # conv1 + bn1
    in_planes = 64
    for layer, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
        out = planes * (4 if kind == "bottleneck" else 1)
        for i in range(count):
            c_in = in_planes if i == 0 else out
            if kind == "basic":
                total += c_in * planes * 27 + planes * planes * 27
                total += 2 * (c_in if preact else planes) + 2 * planes
            else:
                total += c_in * planes + planes * planes * 27 + planes * out
                total += (2 * c_in + 4 * planes) if preact else (4 * planes + 2 * out)
            needs_shortcut = i == 0 and (layer == 1 or c_in != out)
            if needs_shortcut and shortcut == "B":
                total += c_in * out + 2 * out
        in_planes = out
    if preact:
        total += 2 * in_planes
    return total


@pytest.mark.parametrize("depth", sorted(DEPTHS))
@pytest.mark.parametrize("preact", [False, True])
def test_every_depth_has_expected_size_and_is_recognised(depth, preact):
    shortcut = "A" if depth in (18, 34) else "B"
    with torch.device("meta"):  # shapes only: no memory, no init cost for ResNet-200
        net = resnet3d(depth, shortcut, num_seg_classes=None, preact=preact)
    assert net.out_channels == (512 if DEPTHS[depth][0] == "basic" else 2048)
    assert sum(p.numel() for p in net.parameters()) == expected_parameters(depth, shortcut, preact)
    assert detect_architecture(net.state_dict()) == {"depth": depth, "shortcut_type": shortcut, "preact": preact}
    assert count_parameters(net.state_dict()) == expected_parameters(depth, shortcut, preact)
    assert not any(k.startswith("conv_seg") for k in net.state_dict())


def test_known_published_parameter_counts():
    # MedicalNet's ResNet-50 backbone: 46.16 M learnable parameters; ResNet-10: 14.36 M.
    with torch.device("meta"):
        assert sum(p.numel() for p in resnet3d(50, "B", None).parameters()) == 46_155_072
        assert sum(p.numel() for p in resnet3d(10, "B", None).parameters()) == 14_355_520


def test_output_stride_is_8_and_conv_seg_upsamples_by_2():
    net = resnet3d(10, "B", num_seg_classes=3).eval()
    x = torch.randn(1, 1, 24, 40, 33)
    with torch.no_grad():
        feats = net.features(x)
        logits = net(x)
    assert feats.shape == (1, 512, 3, 5, 5)
    assert logits.shape == (1, 3, 6, 10, 10)
    assert torch.allclose(logits, net.conv_seg(feats))


def test_encoder_only_returns_features():
    enc = resnet3d(10, "A", num_seg_classes=None).eval()
    assert enc.conv_seg is None
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(enc(x), enc.features(x))
    assert enc(x).shape == (2, 512, 2, 2, 2)


def test_dilation_and_strides_match_medicalnet():
    net = resnet3d(50, "B", None)
    assert net.conv1.stride == (2, 2, 2) and net.conv1.padding == (3, 3, 3) and net.conv1.bias is None
    assert net.maxpool.kernel_size == 3 and net.maxpool.stride == 2 and net.maxpool.padding == 1
    assert net.layer2[0].conv2.stride == (2, 2, 2)
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for block in layer:
            assert block.conv2.stride == (1, 1, 1)
            assert block.conv2.dilation == (dilation,) * 3 and block.conv2.padding == (dilation,) * 3


def test_shortcut_a_pads_zero_channels_on_strided_identity():
    x = torch.randn(2, 3, 5, 6, 7)
    out = ZeroPadShortcut(out_planes=8, stride=2)(x)
    assert out.shape == (2, 8, 3, 3, 4)
    assert torch.equal(out[:, :3], x[:, :, ::2, ::2, ::2])
    assert torch.count_nonzero(out[:, 3:]) == 0


def test_shortcut_a_has_no_downsample_parameters():
    keys_a = resnet3d(18, "A", None).state_dict()
    keys_b = resnet3d(18, "B", None).state_dict()
    assert not any("downsample" in k for k in keys_a)
    assert {k.rsplit(".", 2)[0] for k in keys_b if "downsample" in k} == {
        "layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample"}


@pytest.mark.parametrize("shortcut,preact", [("A", False), ("B", True)])
def test_trains_backward_through_whole_network(shortcut, preact):
    torch.manual_seed(0)
    net = resnet3d(10, shortcut, num_seg_classes=2, preact=preact).train()
    loss = net(torch.randn(2, 1, 12, 12, 12)).square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0
    assert net.layer4[-1].conv2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("block", [Bottleneck, PreActBottleneck, PreActBasicBlock])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_blocks_keep_shape_rules_and_pass_gradients(block, shortcut):
    # small widths stand in for ResNet-50+ (bottleneck) layers: stride 2, dilation 2, channel change
    torch.manual_seed(0)
    out_planes = 4 * block.expansion
    down = ZeroPadShortcut(out_planes, 2) if shortcut == "A" else torch.nn.Sequential(
        torch.nn.Conv3d(3, out_planes, 1, stride=2, bias=False), torch.nn.BatchNorm3d(out_planes))
    unit = block(3, 4, stride=2, dilation=2, downsample=down).train()
    x = torch.randn(2, 3, 9, 7, 8, requires_grad=True)
    out = unit(x)
    assert out.shape == (2, out_planes, 5, 4, 4)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in unit.parameters())


def test_preact_blocks_normalise_their_input_and_end_with_final_bn():
    net = resnet3d(10, "B", None, preact=True)
    assert net.layer2[0].bn1.num_features == 64  # sees the block input, not the block's 128 planes
    assert net.final_bn.num_features == 512
    assert resnet3d(10, "B", None).final_bn is None


def test_build_model_wraps_encoder_and_head():
    model = build_model({"backbone": {"depth": 10, "shortcut_type": "A"},
                         "head": {"type": "coarse_seg", "num_classes": 4}})
    assert isinstance(model.encoder, ResNet3D) and model.encoder.shortcut_type == "A"
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 16, 24, 20)).shape == (1, 4, 16, 24, 20)


@pytest.mark.parametrize("kwargs,message", [
    ({"depth": 11}, "unknown ResNet depth 11; choose one of: 10, 18, 34, 50, 101, 152, 200"),
    ({"depth": "18"}, "unknown ResNet depth '18'"),
    ({"depth": 18, "shortcut_type": "C"}, "unknown shortcut type 'C'; choose 'A'"),
    ({"depth": 18, "num_seg_classes": 0}, "num_seg_classes must be a positive integer or None"),
])
def test_bad_arguments_raise_med3d_error(kwargs, message):
    with pytest.raises(Med3DError) as info:
        resnet3d(**kwargs)
    assert message in str(info.value)


def test_lower_case_shortcut_and_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    net = resnet3d(np.int64(10), "b", np.int32(3))
    assert (net.depth, net.shortcut_type, net.num_seg_classes) == (10, "B", 3)
    assert type(net.depth) is int and net.conv_seg[-1].out_channels == 3


@pytest.mark.parametrize("shape,dtype,message", [
    ((1, 64, 64), torch.float32, "a 2D image cannot be used"),
    ((1, 1, 64, 64), torch.float32, "got shape (1, 1, 64, 64) (4 dimensions)"),
    ((1, 2, 16, 16, 16), torch.float32, "one input channel, got 2"),
    ((1, 1, 16, 16, 16), torch.int16, "floating-point tensor, got torch.int16"),
])
def test_bad_input_raises_med3d_error(shape, dtype, message):
    net = resnet3d(10, "B", 2).eval()
    with pytest.raises(Med3DError) as info:
        net(torch.zeros(shape, dtype=dtype))
    assert message in str(info.value)
