"""Task heads that sit on a MedicalNet encoder's layer4 features.

Every head's ``forward(features, input_size)`` takes the encoder output (N, C, k, j, i) and the spatial size
(K, J, I) of the network input, so heads that must return input-sized maps can do so and the others ignore it.
``HEADS`` maps the ``type`` of an architecture's head description to its class (see ``nets.build_model``).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Med3DError
from .denseaspp import DenseASPPHead


def _size(input_size: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(s) for s in input_size)


def fit_to_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop (at the far end) a map that is at least ``size``; interpolate any axis that came out smaller.

    The encoder rounds every odd size up at each of its three strides, so an upsampled map is never smaller
    than the input for the lung decoder; cropping the far end drops only what padding produced.
    """
    size = _size(size)
    if tuple(x.shape[2:]) == size:
        return x
    if all(have >= want for have, want in zip(x.shape[2:], size)):
        return x[..., :size[0], :size[1], :size[2]]
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class CoarseSegHead(nn.Module):
    """1x1x1 convolution to the classes, then trilinear upsampling to the input size.

    This is both a Med3D pretraining branch (one per domain) and the coarse stage of two-stage liver segmentation.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
        logits = self.conv(features)
        return F.interpolate(logits, size=_size(input_size), mode="trilinear", align_corners=False)


class LungDecoderHead(nn.Module):
    """The Med3D lung decoder: three groups of (3x3x3 transposed conv that doubles the size, 3x3x3 conv),
    each followed by batch norm and ReLU, then a 1x1x1 conv to the classes.

    The encoder's output stride is 8, so three doublings come back to the input size; inputs that are not a
    multiple of 8 are cropped back to exactly ``input_size``.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (256, 128, 64)) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 3 or min(channels) < 1:
            raise Med3DError(f"lung decoder needs three positive channel counts, got {channels}")
        layers = []
        previous = in_channels
        for width in channels:
            layers += [
                nn.ConvTranspose3d(previous, width, kernel_size=3, stride=2, padding=1, output_padding=1,
                                   bias=False),
                nn.BatchNorm3d(width), nn.ReLU(inplace=True),
                nn.Conv3d(width, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm3d(width), nn.ReLU(inplace=True),
            ]
            previous = width
        self.up = nn.Sequential(*layers)
        self.classify = nn.Conv3d(previous, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
        return fit_to_size(self.classify(self.up(features)), input_size)


class ClassifierHead(nn.Module):
    """Global average pooling + (optional dropout) + one fully-connected layer; returns (N, num_classes) logits."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(float(dropout))
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
        pooled = torch.flatten(F.adaptive_avg_pool3d(features, 1), 1)
        return self.fc(self.dropout(pooled))


HEADS: Dict[str, Type[nn.Module]] = {
    "coarse_seg": CoarseSegHead,
    "lung_decoder": LungDecoderHead,
    "classifier": ClassifierHead,
    "denseaspp": DenseASPPHead,
}

