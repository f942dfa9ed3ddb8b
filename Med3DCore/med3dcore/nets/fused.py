"""The inference form of a network: BatchNorm folded into the convolutions, ReLU and residual additions fused
into them, and every convolution sent straight to oneDNN on CPU.

:func:`prepare_for_inference` changes a model in eval mode *in place* (it can no longer be trained afterwards):

- **BatchNorm folding** (exact up to float rounding): a convolution followed by an inference-mode BatchNorm
  becomes one convolution with ``w * g / sqrt(v + eps)`` and bias ``(b - m) * g / sqrt(v + eps) + beta``, the BN
  an ``nn.Identity``. Only BN that *follows* a convolution folds (pre-activation blocks and DenseASPP put BN
  before the convolution with a ReLU between, which no folding can express).
- **Fusion**: ``conv -> ReLU`` and a residual block's ``conv -> + shortcut -> ReLU`` run as one oneDNN primitive
  (post-ops), so no separate pass over the feature map for BN, ReLU or the addition.
- **oneDNN for every convolution on CPU**: PyTorch's own dispatch sends batch-1 convolutions whose
  N*C*D*H is below 20480 (ResNet layer2's 3x3x3, the first dilated layer3 convolution and its 1x1x1 shortcut on
  small tiles) to its slow im2col kernels (``slow_conv3d_forward``, ``slow_conv_dilated3d``); the fused modules
  call oneDNN for all of them.

The replaced modules subclass ``nn.Conv3d`` / ``nn.ConvTranspose3d`` and keep their places, so code that walks
the network by position (``lowmem.slab_forward``) still works. Where the oneDNN operators are missing (another
torch build, CUDA, MPS) or answer differently in a one-off probe, the same modules run plain ``F.conv3d`` +
``add`` + ``relu``: the results are the same, only slower.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import BasicBlock, Bottleneck, ResNet3D

Conv = (nn.Conv3d, nn.ConvTranspose3d)
# Modules whose (conv, BN) attribute pairs are applied in this order in their forward (checked in the tests).
_PAIRS: Dict[type, Tuple[Tuple[str, str], ...]] = {
    ResNet3D: (("conv1", "bn1"),),
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}


# ------------------------------------------------------------------------------------------------ BN folding

def _foldable(bn: nn.Module) -> bool:
    return (isinstance(bn, nn.BatchNorm3d) and not bn.training and bn.track_running_stats
            and bn.running_mean is not None and bn.running_var is not None)


@torch.no_grad()
def fold_into(conv: nn.Module, bn: nn.BatchNorm3d) -> None:
    """Fold ``bn`` (inference statistics) into ``conv`` in place; ``conv`` gains a bias if it had none.
    The per-channel scale and shift are computed in float64, the weights scaled in place in their own dtype
    (one pass over them: folding the whole network takes milliseconds, not a second of float64 copies)."""
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = conv.weight
    if isinstance(conv, nn.ConvTranspose3d):  # weight (in, out / groups, k, k, k): output channels on dim 1
        groups = conv.groups
        weight.unflatten(0, (groups, -1)).mul_(scale.to(weight.dtype).view(groups, 1, -1, 1, 1, 1))
    else:
        weight.mul_(scale.to(weight.dtype).view(-1, 1, 1, 1, 1))
    bias = conv.bias.double() * scale + shift if conv.bias is not None else shift
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=False)
    else:
        conv.bias.copy_(bias.to(weight.dtype))


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution (adjacent in an ``nn.Sequential``, or a known
    (conv, bn) pair of the ResNet stem and blocks) into it, in place; the BN becomes ``nn.Identity``. The model
    must be in eval mode. Returns the number of BN layers folded."""
    folded = 0
    for module in list(model.modules()):
        pairs: List[Tuple[nn.Module, str, nn.Module, str]] = []
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:]):
                pairs.append((module, a, module, b))
        for conv_name, bn_name in _PAIRS.get(type(module), ()):
            pairs.append((module, conv_name, module, bn_name))
        for owner, conv_name, bn_owner, bn_name in pairs:
            conv, bn = owner._modules.get(conv_name), bn_owner._modules.get(bn_name)
            if isinstance(conv, Conv) and _foldable(bn):
                fold_into(conv, bn)
                bn_owner._modules[bn_name] = nn.Identity()
                folded += 1
    return folded


# ------------------------------------------------------------------------------------------------ fused modules

def _onednn_ops() -> bool:
    mkldnn = getattr(torch.backends, "mkldnn", None)
    if mkldnn is None or not mkldnn.is_available() or not getattr(mkldnn, "enabled", True):
        return False
    try:
        return hasattr(torch.ops.mkldnn, "_convolution_pointwise") and \
            hasattr(torch.ops.mkldnn, "_convolution_transpose_pointwise")
    except (AttributeError, RuntimeError):
        return False


class FusedConv3d(nn.Conv3d):
    """A ``Conv3d`` (BN already folded into it) with an optional residual addition and ReLU after it, computed by
    one oneDNN primitive on CPU when :attr:`onednn` is set, by ``F.conv3d`` + ``add`` + ``relu`` otherwise."""

    onednn = False  # set per instance by prepare_for_inference after a successful probe

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, relu: bool) -> "FusedConv3d":
        fused = cls.__new__(cls)
        fused.__dict__.update(conv.__dict__)  # same parameters, hooks and settings; only the class changes
        fused.relu = bool(relu)
        return fused

    def _use_onednn(self, x: torch.Tensor) -> bool:
        return (self.onednn and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple))

    def forward(self, x: torch.Tensor,  # type: ignore[override]
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._use_onednn(x):
            if x.dtype == torch.bfloat16 and self.in_channels == 1:
                # One input channel gives AMX nothing to multiply: float32 is 1.5-2x faster for the stem.
                out = self._onednn(x.float(), self.weight.float(), _float(self.bias), residual)
                return out.to(torch.bfloat16)
            if x.dtype == torch.bfloat16 and _phased_dilation(self) and residual is None:
                return self._phased(x)
            if x.dtype == torch.bfloat16 and _phased_dilation(self):
                out = self._phased(x, relu=False)
                return F.relu(out.add_(residual), inplace=True) if self.relu else out.add_(residual)
            return self._onednn(x, self.weight, self.bias, residual)
        out = super().forward(x)
        if residual is not None:
            out = out + residual
        return F.relu(out, inplace=True) if self.relu else out

    def _onednn(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                residual: Optional[torch.Tensor], dilation: Optional[int] = None,
                relu: Optional[bool] = None) -> torch.Tensor:
        unary = "relu" if (self.relu if relu is None else relu) else "none"
        dil = list(self.dilation) if dilation is None else [dilation] * 3
        pad = list(self.padding) if dilation is None else [dilation] * 3
        args = (pad, list(self.stride), dil, self.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, unary, [], "")
        residual = residual.contiguous(memory_format=_layout(x))  # oneDNN wants the addend in the output's layout
        return torch.ops.mkldnn._convolution_pointwise(x, residual, weight, bias, *args, "add", 1.0, unary, [], "")

    def _phased(self, x: torch.Tensor, relu: Optional[bool] = None) -> torch.Tensor:
        """A dilation-d convolution (d >= 4, padding d) as a dilation-2 convolution on the (d/2)^3 interleaved
        sub-volumes of ``x`` (space-to-batch): every output voxel reads the same inputs, zeros where the original
        reads its zero padding. oneDNN's AMX bf16 kernel takes 3-15x longer at dilation 4 than at 2."""
        f = self.dilation[0] // 2
        n, c, d, h, w = x.shape
        pads = ((-w) % f, (-h) % f, (-d) % f)
        if any(pads):
            x = F.pad(x, (0, pads[0], 0, pads[1], 0, pads[2]))
        dp, hp, wp = d + pads[2], h + pads[1], w + pads[0]
        phases = x.reshape(n, c, dp // f, f, hp // f, f, wp // f, f).permute(0, 3, 5, 7, 1, 2, 4, 6)
        phases = phases.reshape(n * f ** 3, c, dp // f, hp // f, wp // f).contiguous(
            memory_format=torch.channels_last_3d)
        out = self._onednn(phases, self.weight, self.bias, None, dilation=2, relu=relu)
        o = out.shape[1]
        out = out.reshape(n, f, f, f, o, dp // f, hp // f, wp // f).permute(0, 4, 5, 1, 6, 2, 7, 3)
        out = out.reshape(n, o, dp, hp, wp)[:, :, :d, :h, :w]
        return out.contiguous(memory_format=torch.channels_last_3d)


def _float(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


def _phased_dilation(conv: nn.Conv3d) -> bool:
    """A 3x3x3 convolution with one even dilation >= 4 on every axis, stride 1, padding = dilation, one group."""
    d = conv.dilation[0]
    return (d >= 4 and d % 2 == 0 and conv.dilation == (d, d, d) and conv.padding == (d, d, d)
            and conv.stride == (1, 1, 1) and conv.kernel_size == (3, 3, 3) and conv.groups == 1)


class FusedConvTranspose3d(nn.ConvTranspose3d):
    """A ``ConvTranspose3d`` (BN folded) with an optional ReLU, one oneDNN primitive on CPU when :attr:`onednn`."""

    onednn = False

    @classmethod
    def from_conv(cls, conv: nn.ConvTranspose3d, relu: bool) -> "FusedConvTranspose3d":
        fused = cls.__new__(cls)
        fused.__dict__.update(conv.__dict__)
        fused.relu = bool(relu)
        return fused

    def forward(self, x: torch.Tensor,  # type: ignore[override]
                output_size: Optional[List[int]] = None) -> torch.Tensor:
        if (self.onednn and output_size is None and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.bfloat16)
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                x, self.weight, self.bias, list(self.padding), list(self.output_padding), list(self.stride),
                list(self.dilation), self.groups, "relu" if self.relu else "none", [], "")
        out = super().forward(x, output_size)
        return F.relu(out, inplace=True) if self.relu else out


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) \
        and not x.is_contiguous() else torch.contiguous_format


class FusedBasicBlock(nn.Module):
    """``BasicBlock`` after folding: conv1 + ReLU, then conv2 + shortcut + ReLU, each one primitive."""

    def __init__(self, block: BasicBlock) -> None:
        super().__init__()
        self.conv1 = _fused(block.conv1, relu=True)
        self.conv2 = _fused(block.conv2, relu=True)
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.conv1(x), residual=identity)


class FusedBottleneck(nn.Module):
    """``Bottleneck`` after folding: 1x1x1 + ReLU, 3x3x3 + ReLU, 1x1x1 + shortcut + ReLU."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.conv1 = _fused(block.conv1, relu=True)
        self.conv2 = _fused(block.conv2, relu=True)
        self.conv3 = _fused(block.conv3, relu=True)
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=identity)


def _fused(conv: nn.Module, relu: bool) -> nn.Module:
    if isinstance(conv, (FusedConv3d, FusedConvTranspose3d)):
        conv.relu = conv.relu or relu
        return conv
    if isinstance(conv, nn.ConvTranspose3d):
        return FusedConvTranspose3d.from_conv(conv, relu)
    return FusedConv3d.from_conv(conv, relu)


def _is_relu(module: Optional[nn.Module]) -> bool:
    return isinstance(module, nn.ReLU)


def fuse(model: nn.Module) -> int:
    """Replace, in place, folded blocks and (conv, [Identity,] ReLU) runs of a folded model by fused modules;
    returns the number of convolutions now fused or routed. Call after :func:`fold_batchnorm`."""
    count = 0
    for module in list(model.modules()):
        if isinstance(module, ResNet3D) and isinstance(module.bn1, nn.Identity) and _is_relu(module.relu):
            module.conv1 = _fused(module.conv1, relu=True)  # stem: maxpool(relu(bn1(conv1(x))))
            module.relu = nn.Identity()
            count += 1
        for name, child in list(module._modules.items()):
            if type(child) is BasicBlock and all(isinstance(b, nn.Identity) for b in (child.bn1, child.bn2)):
                module._modules[name] = FusedBasicBlock(child)
                count += 2
            elif type(child) is Bottleneck and all(isinstance(b, nn.Identity)
                                                   for b in (child.bn1, child.bn2, child.bn3)):
                module._modules[name] = FusedBottleneck(child)
                count += 3
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for index, name in enumerate(names):
                conv = module._modules[name]
                if type(conv) not in (nn.Conv3d, nn.ConvTranspose3d):
                    continue
                # conv, [Identity left by a folded BN], ReLU -> fused conv, Identity, Identity (same positions)
                rest = [module._modules[n] for n in names[index + 1:index + 3]]
                skip = 1 if rest and isinstance(rest[0], nn.Identity) else 0
                relu_at = index + 1 + skip
                relu = relu_at < len(names) and _is_relu(module._modules[names[relu_at]])
                module._modules[name] = _fused(conv, relu=relu)
                if relu:
                    module._modules[names[relu_at]] = nn.Identity()
                count += 1
    for module in list(model.modules()):  # every other convolution (e.g. a head's classifier): routed, no ReLU
        for name, child in list(module._modules.items()):
            if type(child) in (nn.Conv3d, nn.ConvTranspose3d):
                module._modules[name] = _fused(child, relu=False)
                count += 1
    return count


def _set_onednn(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, (FusedConv3d, FusedConvTranspose3d)):
            module.onednn = on


def _probe_onednn(dtype: torch.dtype) -> bool:
    """One tiny fused convolution (with a residual and a dilation) and one transposed convolution through oneDNN,
    compared with the plain operators: False (use the plain path) on any error or difference."""
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 5, 6, 7, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last_3d)
        conv = FusedConv3d.from_conv(nn.Conv3d(4, 4, 3, padding=2, dilation=2), relu=True).to(dtype)
        convt = FusedConvTranspose3d.from_conv(nn.ConvTranspose3d(4, 3, 3, stride=2, padding=1, output_padding=1),
                                               relu=True).to(dtype)
        with torch.inference_mode():
            plain = (conv(x, residual=x), convt(x))
            conv.onednn = convt.onednn = True
            fast = (conv(x, residual=x), convt(x))
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return all(a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
                   for a, b in zip(plain, fast))
    except Exception:  # noqa: BLE001 - any failure of a private operator means: use the public path
        return False


def prepare_for_inference(model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32,
                          onednn: Optional[bool] = None) -> Dict[str, int]:
    """Fold, fuse and (on CPU) route the convolutions of an eval-mode ``model`` to oneDNN, in place.

    ``onednn``: None = when the operators exist and a probe agrees with the plain operators (CPU only).
    Returns what was done: ``{"folded": BN layers folded, "fused": convolutions replaced, "onednn": 0/1}``.
    """
    model.eval()
    folded = fold_batchnorm(model)
    fused = fuse(model)
    use = bool(device.type == "cpu" and _onednn_ops() and (onednn is not False) and _probe_onednn(dtype))
    _set_onednn(model, use)
    return {"folded": folded, "fused": fused, "onednn": int(use)}
