"""3D-ResNets with the exact parameter names and semantics of Tencent's MedicalNet release.

A MedicalNet checkpoint (``{"state_dict": {"module.<key>": tensor}}``) loads into :func:`resnet3d` unchanged:

- stem: ``conv1`` (7x7x7, stride 2, padding 3, no bias), ``bn1``, ReLU, max-pool (3, stride 2, padding 1);
- ``layer1`` .. ``layer4`` with 64/128/256/512 planes; ``layer2`` has stride 2, ``layer3``/``layer4`` keep stride 1
  and dilate their 3x3x3 convolutions by 2 and 4 (padding = dilation), so the output stride is 8;
- the first block of a layer gets a shortcut when the stride or channel count changes: type ``A`` is parameter-free
  (strided identity padded with zero channels), type ``B`` is ``downsample.0`` (1x1x1 conv) + ``downsample.1`` (BN);
- ``conv_seg``: ConvTranspose3d(C, 32, 2, stride 2) with bias, BN, ReLU, Conv3d(32, 32, 3, padding 1), BN, ReLU,
  Conv3d(32, classes, 1), the last two without bias (indices 0, 1, 3, 4, 6 hold parameters).

Pre-activation ResNet (``preact=True``, our naming, MedicalNet has none): each block runs BN -> ReLU -> conv (He et
al. 2016, "Identity mappings"), so a block's ``bn1`` sees the block input; the shortcut (type A or B) takes the
pre-activated input when the block has one. Since the sum leaving the last block is not normalised, a
``final_bn`` + ReLU follows ``layer4``; its presence is how a state dict is recognised as pre-activation.
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Med3DError

# depth -> (block kind, blocks per layer), as MedicalNet defines them.
DEPTHS: Dict[int, Tuple[str, Tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
SHORTCUT_TYPES = ("A", "B")
SEG_CHANNELS = 32  # width of MedicalNet's conv_seg head


def _conv3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation,
                     bias=False)


def _conv1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Shortcut type A: keep every ``stride``-th voxel and append zero channels up to ``out_planes``."""

    def __init__(self, out_planes: int, stride: int) -> None:
        super().__init__()
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride, ::self.stride]
        missing = self.out_planes - x.shape[1]
        if missing > 0:
            zeros = x.new_zeros((x.shape[0], missing) + tuple(x.shape[2:]))
            x = torch.cat([x, zeros], dim=1)
        return x


def _shortcut(kind: str, in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if kind == "A":
        return ZeroPadShortcut(out_planes, stride)
    return nn.Sequential(_conv1(in_planes, out_planes, stride), nn.BatchNorm3d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions (MedicalNet ``BasicBlock``)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv3(in_planes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1x1 reduce, 3x3x3 (strided, dilated), 1x1x1 expand by 4 (MedicalNet ``Bottleneck``)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv1(in_planes, planes)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = _conv1(planes, planes * 4)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block: (BN, ReLU, 3x3x3 conv) twice, identity added after."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm3d(in_planes)
        self.conv1 = _conv3(in_planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, 1, dilation)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        identity = x if self.downsample is None else self.downsample(pre)
        return out + identity


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: (BN, ReLU, conv) for the 1x1x1, 3x3x3 and 1x1x1 convolutions."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm3d(in_planes)
        self.conv1 = _conv1(in_planes, planes)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn3 = nn.BatchNorm3d(planes)
        self.conv3 = _conv1(planes, planes * 4)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        identity = x if self.downsample is None else self.downsample(pre)
        return out + identity


Block = Union[Type[BasicBlock], Type[Bottleneck], Type[PreActBasicBlock], Type[PreActBottleneck]]


class ResNet3D(nn.Module):
    """MedicalNet's 3D-ResNet; build it with :func:`resnet3d`.

    ``features(x)`` is the output of ``layer4`` (N, out_channels, ~K/8, ~J/8, ~I/8); ``forward(x)`` applies
    ``conv_seg`` to it (logits at ~1/4 of the input size, as MedicalNet), or returns the features when the network
    was built without ``conv_seg`` (``num_seg_classes=None``).
    """

    def __init__(self, depth: int, shortcut_type: str = "B", num_seg_classes: Optional[int] = 2,
                 preact: bool = False) -> None:
        super().__init__()
        kind, counts = DEPTHS[depth]
        block: Block
        if kind == "basic":
            block = PreActBasicBlock if preact else BasicBlock
        else:
            block = PreActBottleneck if preact else Bottleneck
        self.depth = depth
        self.shortcut_type = shortcut_type
        self.preact = preact
        self.num_seg_classes = num_seg_classes
        self._in_planes = 64

        self.conv1 = nn.Conv3d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, counts[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(block, 128, counts[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(block, 256, counts[2], stride=1, dilation=2)
        self.layer4 = self._make_layer(block, 512, counts[3], stride=1, dilation=4)
        self.out_channels = 512 * block.expansion
        # Pre-activation blocks leave the last sum un-normalised; this BN is also the preact marker in state dicts.
        self.final_bn = nn.BatchNorm3d(self.out_channels) if preact else None

        self.conv_seg: Optional[nn.Sequential] = None
        if num_seg_classes is not None:
            self.conv_seg = nn.Sequential(
                nn.ConvTranspose3d(self.out_channels, SEG_CHANNELS, kernel_size=2, stride=2),
                nn.BatchNorm3d(SEG_CHANNELS),
                nn.ReLU(inplace=True),
                nn.Conv3d(SEG_CHANNELS, SEG_CHANNELS, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm3d(SEG_CHANNELS),
                nn.ReLU(inplace=True),
                nn.Conv3d(SEG_CHANNELS, num_seg_classes, kernel_size=1, bias=False),
            )
        self._init_weights()

    def _make_layer(self, block: Block, planes: int, count: int, stride: int, dilation: int) -> nn.Sequential:
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_planes != out_planes:
            downsample = _shortcut(self.shortcut_type, self._in_planes, out_planes, stride)
        blocks: List[nn.Module] = [block(self._in_planes, planes, stride, dilation, downsample)]
        self._in_planes = out_planes
        blocks.extend(block(out_planes, planes, 1, dilation) for _ in range(count - 1))
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output (``layer4``) for ``x`` of shape (N, 1, K, J, I)."""
        check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.final_bn is not None:
            x = F.relu(self.final_bn(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        return feats if self.conv_seg is None else self.conv_seg(feats)

    def extra_repr(self) -> str:
        return f"depth={self.depth}, shortcut_type={self.shortcut_type!r}, preact={self.preact}"


def check_input(x: torch.Tensor) -> None:
    """Raise :class:`Med3DError` unless ``x`` is a (N, 1, K, J, I) tensor the network can take."""
    if not isinstance(x, torch.Tensor):
        raise Med3DError(f"the network needs a torch.Tensor of shape (N, 1, K, J, I), got {type(x).__name__}")
    if x.dim() != 5:
        raise Med3DError(f"the network needs a 3D volume batch of shape (N, 1, K, J, I), got shape "
                         f"{tuple(x.shape)} ({x.dim()} dimensions); a 2D image cannot be used, add a batch and "
                         f"channel axis to a 3D array with x[None, None]")
    if x.shape[1] != 1:
        raise Med3DError(f"the network takes one input channel, got {x.shape[1]} (shape {tuple(x.shape)}); "
                         f"pass a single-channel volume as (N, 1, K, J, I)")
    if not x.is_floating_point():
        raise Med3DError(f"the network needs a floating-point tensor, got {x.dtype}; convert with x.float()")


def resnet3d(depth: int, shortcut_type: str = "B", num_seg_classes: Optional[int] = 2,
             preact: bool = False) -> ResNet3D:
    """Build a MedicalNet 3D-ResNet.

    Args:
        depth: 10, 18, 34, 50, 101, 152 or 200.
        shortcut_type: ``"A"`` (parameter-free) or ``"B"`` (1x1x1 conv + BN). MedicalNet released 10 B, 18 A,
            34 A and 50/101/152/200 B.
        num_seg_classes: classes of MedicalNet's ``conv_seg`` head; ``None`` builds the encoder alone.
        preact: pre-activation blocks (BN-ReLU-conv) plus a ``final_bn`` after ``layer4``.
    """
    if _as_int(depth) not in DEPTHS:
        raise Med3DError(f"unknown ResNet depth {depth!r}; choose one of: {', '.join(str(d) for d in DEPTHS)}")
    kind = str(shortcut_type).upper() if isinstance(shortcut_type, str) else shortcut_type
    if kind not in SHORTCUT_TYPES:
        raise Med3DError(f"unknown shortcut type {shortcut_type!r}; choose 'A' (parameter-free, zero-padded "
                         f"identity) or 'B' (1x1x1 convolution + batch norm)")
    classes = None if num_seg_classes is None else _as_int(num_seg_classes)
    if num_seg_classes is not None and (classes is None or classes < 1):
        raise Med3DError(f"num_seg_classes must be a positive integer or None (encoder only), got "
                         f"{num_seg_classes!r}")
    return ResNet3D(int(depth), kind, classes, bool(preact))


def _as_int(value: object) -> Optional[int]:
    """An integer given as any integer type (numpy's too), else None; bools and floats are not integers here."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None
