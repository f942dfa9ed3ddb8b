"""Task heads that sit on a MedicalNet encoder's layer4 features.

Every head's ``forward(features, input_size)`` takes the encoder output (N, C, k, j, i) and the spatial size
(K, J, I) of the network input, so heads that must return input-sized maps can do so and the others ignore it.
``HEADS`` maps the ``type`` of an architecture's head description to its class (see ``nets.build_model``).
"""
from __future__ import annotations

from typing import Dict, Sequence, Type

import torch
import torch.nn.functional as F
from torch import nn


class CoarseSegHead(nn.Module):
    """1x1x1 convolution to the classes, then trilinear upsampling to the input size.

    This is both a Med3D pretraining branch (one per domain) and the coarse stage of two-stage liver segmentation.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
        logits = self.conv(features)
        return F.interpolate(logits, size=tuple(int(s) for s in input_size), mode="trilinear", align_corners=False)


HEADS: Dict[str, Type[nn.Module]] = {
    "coarse_seg": CoarseSegHead,
}
