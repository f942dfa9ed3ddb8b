"""An encoder (MedicalNet 3D-ResNet without ``conv_seg``) plus one task head, built from a serialisable
architecture description that checkpoint bundles record::

    {"backbone": {"depth": 10, "shortcut_type": "B", "preact": false},
     "head": {"type": "coarse_seg", "num_classes": 2}}          # head params as the head's __init__ takes them

Parameter names are ``encoder.<MedicalNet key>`` and ``head.<...>``, so the encoder exports to MedicalNet layout by
stripping ``encoder.``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
from torch import nn

from ..errors import Med3DError
from .heads import HEADS
from .resnet import resnet3d


class Med3DNet(nn.Module):
    """Encoder + head; ``forward(x)`` returns the head's output for input ``x`` (N, 1, K, J, I)."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.features(x), x.shape[2:])


def build_encoder(backbone: Mapping[str, Any]) -> nn.Module:
    """A MedicalNet 3D-ResNet without ``conv_seg`` from ``{"depth", "shortcut_type", "preact"}``."""
    return resnet3d(depth=int(backbone["depth"]), shortcut_type=str(backbone.get("shortcut_type", "B")),
                    num_seg_classes=None, preact=bool(backbone.get("preact", False)))


def build_model(architecture: Mapping[str, Any]) -> Med3DNet:
    """Build the network an architecture description names (untrained weights)."""
    try:
        backbone = architecture["backbone"]
        head_spec: Dict[str, Any] = dict(architecture["head"])
    except (KeyError, TypeError) as exc:
        raise Med3DError(f"architecture description lacks {exc}; expected {{'backbone': ..., 'head': ...}}") from None
    head_type = head_spec.pop("type", None)
    if head_type not in HEADS:
        raise Med3DError(f"unknown head type {head_type!r}; known: {', '.join(sorted(HEADS))}")
    encoder = build_encoder(backbone)
    head = HEADS[head_type](in_channels=encoder.out_channels, **head_spec)
    return Med3DNet(encoder, head)
