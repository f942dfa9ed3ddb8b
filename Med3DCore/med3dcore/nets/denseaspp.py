"""A 3D DenseASPP head (after Yang et al., CVPR 2018) for the fine stage of two-stage liver segmentation.

Atrous 3x3x3 convolutions with growing dilation are stacked densely: each layer sees the encoder features and
the outputs of all earlier layers, so the head covers many receptive-field sizes at once. A 1x1x1 convolution
maps the concatenation to the classes, and trilinear upsampling returns the map at the network input size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Med3DError


class _AtrousLayer(nn.Sequential):
    """BN-ReLU-1x1x1 bottleneck, BN-ReLU-3x3x3 dilated conv."""

    def __init__(self, in_channels: int, mid_channels: int, growth: int, dilation: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm3d(in_channels), nn.ReLU(inplace=True),
            nn.Conv3d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.BatchNorm3d(mid_channels), nn.ReLU(inplace=True),
            nn.Conv3d(mid_channels, growth, kernel_size=3, padding=dilation, dilation=dilation, bias=False),
            nn.Dropout3d(dropout),
        )


class DenseASPPHead(nn.Module):
    """Densely connected atrous pyramid on layer4 features; ``forward`` returns (N, num_classes, K, J, I) logits.

    ``dilations`` are in feature-map voxels (the encoder's output stride is 8, so 3..12 span 24..96 input voxels).
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (3, 6, 12),
                 mid_channels: int = 64, growth: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        dilations = [int(d) for d in dilations]
        if not dilations or min(dilations) < 1:
            raise Med3DError(f"DenseASPP needs at least one positive dilation, got {dilations}")
        self.layers = nn.ModuleList()
        width = in_channels
        for dilation in dilations:
            self.layers.append(_AtrousLayer(width, mid_channels, growth, dilation, float(dropout)))
            width += growth
        self.classify = nn.Sequential(nn.BatchNorm3d(width), nn.ReLU(inplace=True),
                                      nn.Conv3d(width, num_classes, kernel_size=1))

    def forward(self, features: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
        stack = features
        for layer in self.layers:
            stack = torch.cat([stack, layer(stack)], dim=1)
        logits = self.classify(stack)
        return F.interpolate(logits, size=tuple(int(s) for s in input_size), mode="trilinear", align_corners=False)
