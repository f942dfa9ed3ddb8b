"""The inference form of the networks (nets/fused.py): BatchNorm folding, fused ReLU / residual additions, oneDNN
routing and its fallback; the precision choice (devices.resolve_precision); restoring the class map without
per-class full-resolution maps (preprocess.restore_class_map). Small networks and volumes; no timing."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from med3dcore import devices
from med3dcore.devices import resolve_precision
from med3dcore.errors import Med3DError
from med3dcore.lowmem import supports_slabs
from med3dcore.nets import fused as fused_module
from med3dcore.nets import build_model
from med3dcore.nets.fused import (FusedBasicBlock, FusedBottleneck, FusedConv3d, FusedConvTranspose3d,
                                  fold_batchnorm, prepare_for_inference)
from med3dcore.preprocess import PreprocessSpec, preprocess_image, restore_class_map, restore_probabilities
from med3dcore.sliding import make_predictor
from med3dcore.volume import Volume

torch.set_num_threads(2)
CPU = torch.device("cpu")


def _random_statistics(net: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so a wrong fold shows."""
    gen = torch.Generator().manual_seed(3)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm3d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return net.eval()


def _net(depth: int, shortcut: str, head: dict) -> nn.Module:
    torch.manual_seed(0)
    return _random_statistics(build_model({"backbone": {"depth": depth, "shortcut_type": shortcut},
                                           "head": head}))


LUNG = {"type": "lung_decoder", "num_classes": 3, "channels": [16, 8, 8]}


@pytest.mark.parametrize("depth,shortcut,head", [
    (10, "B", LUNG),                                       # basic blocks, 1x1x1 shortcut, transposed convs
    (18, "A", {"type": "coarse_seg", "num_classes": 2}),   # zero-padded shortcut
    (50, "B", {"type": "classifier", "num_classes": 2}),   # bottlenecks
])
def test_folding_and_fusion_keep_the_outputs(depth, shortcut, head):
    net = _net(depth, shortcut, head)
    x = torch.randn(2, 1, 16, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = net(x)
    folded = copy.deepcopy(net)
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert fold_batchnorm(folded) == n_bn  # every BN of these networks follows a convolution
    assert not any(isinstance(m, nn.BatchNorm3d) for m in folded.modules())
    with torch.inference_mode():
        assert torch.allclose(folded(x), expected, atol=1e-5, rtol=1e-4)
    for onednn in (False, None):  # the plain path and (where the operators exist) oneDNN
        fast = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
        report = prepare_for_inference(fast, CPU, onednn=onednn)
        assert report["folded"] == n_bn and report["fused"] > 0
        assert not any(type(m) in (nn.Conv3d, nn.ConvTranspose3d) for m in fast.modules())  # all routed
        assert not any(type(m) is nn.ReLU for m in fast.encoder.modules())  # all fused
        with torch.inference_mode():
            got = fast(x.contiguous(memory_format=torch.channels_last_3d))
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (onednn, (got - expected).abs().max())


def test_fused_blocks_replace_the_residual_blocks():
    net = copy.deepcopy(_net(10, "B", LUNG))
    prepare_for_inference(net, CPU)
    blocks = [net.encoder.layer1[0], net.encoder.layer4[0]]
    assert all(isinstance(b, FusedBasicBlock) for b in blocks)
    assert isinstance(blocks[1].conv2, FusedConv3d) and blocks[1].conv2.relu and blocks[1].conv2.dilation == (4,) * 3
    assert isinstance(net.head.up[0], FusedConvTranspose3d) and net.head.up[0].relu
    assert isinstance(net.head.classify, FusedConv3d) and not net.head.classify.relu
    assert supports_slabs(net)  # the slab-wise decoder still finds its layers in place
    bottleneck = _net(50, "B", {"type": "classifier", "num_classes": 2})
    prepare_for_inference(bottleneck, CPU)
    assert isinstance(bottleneck.encoder.layer3[2], FusedBottleneck)


def test_bn_that_precedes_a_convolution_is_not_folded():
    """Pre-activation blocks and DenseASPP normalise before a convolution, with a ReLU between: unfoldable. Only
    DenseASPP's BN after its 1x1x1 bottleneck convolution folds."""
    net = _net(10, "B", {"type": "denseaspp", "num_classes": 2, "dilations": [1, 2], "mid_channels": 8,
                         "growth": 4, "dropout": 0.0})
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = net(x)
    prepare_for_inference(net, CPU)
    for layer in net.head.layers:  # BN, ReLU, conv 1x1x1, BN, ReLU, conv 3x3x3
        assert isinstance(layer[0], nn.BatchNorm3d) and isinstance(layer[3], nn.Identity)
        assert isinstance(layer[2], FusedConv3d) and layer[2].relu and isinstance(layer[4], nn.Identity)
    assert isinstance(net.head.classify[0], nn.BatchNorm3d)
    with torch.inference_mode():
        assert torch.allclose(net(x), expected, atol=1e-5, rtol=1e-4)
    preact = _random_statistics(build_model({"backbone": {"depth": 18, "shortcut_type": "A", "preact": True},
                                             "head": {"type": "coarse_seg", "num_classes": 2}}))
    with torch.inference_mode():
        expected = preact(x)
    blocks_bn = sum(isinstance(m, nn.BatchNorm3d) for m in preact.encoder.layer1.modules())
    assert fold_batchnorm(preact) == 1  # the stem's conv1 -> bn1 only
    assert sum(isinstance(m, nn.BatchNorm3d) for m in preact.encoder.layer1.modules()) == blocks_bn
    with torch.inference_mode():
        assert torch.allclose(preact(x), expected, atol=1e-5, rtol=1e-4)


def test_training_mode_bn_is_left_alone():
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
    assert fold_batchnorm(net) == 0  # still in training mode: batch statistics, nothing to fold
    assert isinstance(net[1], nn.BatchNorm3d)


ONEDNN_BF16 = fused_module._onednn_ops() and fused_module._probe_onednn(torch.bfloat16)
DILATED = [(4, (8, 13, 13)), (4, (7, 9, 12)), (8, (9, 17, 20)), (6, (5, 6, 7))]  # odd sizes, dilation 4 to 8


@pytest.mark.skipif(not fused_module._onednn_ops(), reason="this torch build has no oneDNN fused operators")
@pytest.mark.parametrize("dilation,shape", DILATED)
def test_dilated_convolution_as_interleaved_sub_volumes(dilation, shape):
    """The sub-volume form (used in bf16 for dilation >= 4) is the same convolution, zero padding included and odd
    sizes padded: checked in float32, where it must agree to rounding, on every CPU."""
    torch.manual_seed(0)
    conv = FusedConv3d.from_conv(nn.Conv3d(8, 6, 3, padding=dilation, dilation=dilation), relu=True)
    x = torch.randn(2, 8, *shape).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        plain = nn.functional.conv3d(x, conv.weight, conv.bias, 1, dilation, dilation).relu()
        phased = conv._phased(x)
    assert phased.shape == plain.shape and torch.allclose(phased, plain, atol=1e-5)


@pytest.mark.skipif(not ONEDNN_BF16, reason="this CPU's oneDNN has no bf16 convolutions (needs AVX512BW/VL/DQ, "
                                            "AVX-NE-CONVERT or AMX); the float32 test above covers the transform")
@pytest.mark.parametrize("dilation,shape", DILATED)
def test_bf16_dilated_convolution_as_interleaved_sub_volumes(dilation, shape):
    """In bf16, dilation >= 4 runs as dilation 2 on (d/2)^3 interleaved sub-volumes: the same convolution up to
    bf16 rounding, with and without the fused residual."""
    torch.manual_seed(0)
    conv = FusedConv3d.from_conv(nn.Conv3d(8, 6, 3, padding=dilation, dilation=dilation), relu=True)
    conv.onednn = True
    conv = conv.to(torch.bfloat16)
    x = torch.randn(2, 8, *shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    residual = torch.randn(2, 6, *shape).to(torch.bfloat16)
    w, b = conv.weight.float(), conv.bias.float()
    with torch.inference_mode():
        plain = nn.functional.conv3d(x.float(), w, b, 1, dilation, dilation)
        assert torch.allclose(conv(x).float(), plain.relu(), atol=0.03)
        assert torch.allclose(conv(x, residual=residual).float(), (plain + residual.float()).relu(), atol=0.05)


@pytest.mark.skipif(not fused_module._onednn_ops(), reason="this torch build has no oneDNN fused operators")
def test_bf16_single_channel_convolution_computes_in_float32():
    torch.manual_seed(0)
    stem = FusedConv3d.from_conv(nn.Conv3d(1, 4, 7, stride=2, padding=3), relu=True)
    stem.onednn = True
    stem = stem.to(torch.bfloat16)
    x = torch.randn(1, 1, 9, 10, 11).to(torch.bfloat16)
    with torch.inference_mode():
        out = stem(x)
    expected = nn.functional.conv3d(x.float(), stem.weight.float(), stem.bias.float(), 2, 3).relu()
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), expected, atol=0.03, rtol=0.01)


def test_fused_conv_trains_through_the_plain_path():
    """Gradients never go through the oneDNN operators (they have none): the plain path takes over."""
    conv = FusedConv3d.from_conv(nn.Conv3d(2, 3, 3, padding=1), relu=True)
    conv.onednn = True
    x = torch.randn(1, 2, 5, 5, 5, requires_grad=True)
    conv(x).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


def test_predictor_folds_and_is_idempotent():
    """make_predictor prepares the model in place; a second predictor on the same model changes nothing more."""
    net = _net(10, "B", LUNG)
    reference = copy.deepcopy(net)
    x = torch.randn(1, 1, 16, 24, 24, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = torch.softmax(reference(x), dim=1)
        first = make_predictor(net, "cpu", "fp32")(x)
        second = make_predictor(net, "cpu", "fp32")(x)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert torch.allclose(first, expected, atol=1e-5) and torch.equal(first, second)


# ------------------------------------------------------------------------------------------------ precision

@pytest.mark.parametrize("native,expected", [("AMX", "bf16"), ("AVX512_BF16", "bf16"), (None, "fp32")])
def test_auto_precision_follows_the_cpu(monkeypatch, native, expected):
    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: native)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("auto", torch.device("cuda")) == "amp"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"


@pytest.mark.parametrize("amx,avx,flags,expected", [
    (True, True, "", "AMX"), (False, True, "", "AVX512_BF16"), (False, False, "", None),
    (None, None, "fpu avx512f avx512_bf16", "AVX512_BF16"), (None, None, "avx512f amx_bf16 amx_tile", "AMX"),
    (None, None, "fpu sse2 avx2 avx512f", None),
])
def test_native_bf16_detection(monkeypatch, amx, avx, flags, expected):
    """torch's CPU probes when this torch has them, else the kernel's CPU flags."""
    for name, value in (("_is_amx_tile_supported", amx), ("_is_avx512_bf16_supported", avx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda v=value: v, raising=False)
    monkeypatch.setattr(devices, "_cpu_flags", lambda: set(flags.split()))
    assert devices.cpu_bf16_support() == expected


def test_float16_is_refused_off_cuda(monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: "AMX")
    for device in ("cpu", "mps"):
        with pytest.raises(Med3DError, match=r"'amp' \(float16 autocast\) needs a CUDA device.*use bf16"):
            resolve_precision("amp", torch.device(device))
    with pytest.raises(Med3DError, match="unknown precision 'fp16'; choose one of: auto, fp32, bf16, amp"):
        resolve_precision("fp16", CPU)
    with pytest.raises(Med3DError, match="needs a CUDA device"):
        make_predictor(nn.Conv3d(1, 2, 1), "cpu", "amp")


def test_auto_predictor_runs_in_the_chosen_dtype(monkeypatch):
    for native, dtype in (("AMX", torch.bfloat16), (None, torch.float32)):
        monkeypatch.setattr(devices, "cpu_bf16_support", lambda n=native: n)
        net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
        out = make_predictor(net, "cpu", "auto")(torch.randn(1, 1, 6, 8, 8))
        assert next(net.parameters()).dtype == dtype and out.dtype == torch.float32
        assert torch.allclose(out.sum(1), torch.ones(1, 6, 8, 8), atol=1e-5)


# ------------------------------------------------------------------------------------------------ restore

def _oblique_volume(shape, spacing) -> Volume:
    """A volume stored flipped and transposed, so restoring also reorients."""
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    return Volume(np.zeros(shape, np.int16), spacing, (30.0, -20.0, 15.0), direction)


def _smooth_probabilities(shape, classes: int, seed: int) -> np.ndarray:
    """Softmax of smooth random fields: class boundaries cross voxels at arbitrary fractions."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    logits = np.stack([np.sin(rng.uniform(2, 7) * k + rng.uniform(0, 6)) + np.cos(rng.uniform(2, 7) * j) * i * 2
                       + rng.uniform(-0.5, 0.5) for _ in range(classes)])
    e = np.exp(logits - logits.max(axis=0))
    return (e / e.sum(axis=0)).astype(np.float32)


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("spacing", [(1.0, 1.5, 2.0), None])
def test_class_map_equals_argmax_of_restored_probabilities(classes, spacing):
    image = _oblique_volume((21, 24, 28), (0.7, 0.9, 2.5))
    _, prepared = preprocess_image(image, PreprocessSpec(spacing=spacing, clip_percentiles=None, zscore=False))
    assert prepared.resampled == (spacing is not None)
    probs = _smooth_probabilities(prepared.grid.shape, classes, seed=classes)
    expected = np.argmax(restore_probabilities(probs, prepared), axis=0)
    got = restore_class_map(probs, prepared)
    assert got.shape == image.shape and got.dtype == np.uint8
    assert len(np.unique(expected)) == classes  # every class present: the test can see a wrong one
    np.testing.assert_array_equal(got, expected)


def test_class_map_checks_the_grid():
    image = _oblique_volume((4, 5, 6), (1.0, 1.0, 1.0))
    _, prepared = preprocess_image(image, PreprocessSpec(clip_percentiles=None, zscore=False))
    with pytest.raises(Med3DError, match="do not match the preprocessed grid"):
        restore_class_map(np.zeros((2, 4, 5, 7), np.float32), prepared)
