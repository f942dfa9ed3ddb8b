"""Exact, lower-memory inference for the lung decoder.

The memory peak of ResNet + lung decoder sits in the decoder's last, full-resolution group (transposed conv that
doubles the size -> BN -> ReLU -> 3x3x3 conv -> BN -> ReLU, then the 1x1x1 classifier): two full-resolution
feature maps are alive at once. :func:`slab_forward` runs that group in slabs along K, each with the one-voxel
halo its two convolutions need, and concatenates the results, which are identical to the plain forward (every
output voxel sees exactly the inputs it would see in one piece). Peak memory then scales with the slab, not the
tile, so large tiles -- the fast setting -- stay affordable.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .nets.heads import LungDecoderHead, fit_to_size

LAST_GROUP = 6  # ConvTranspose3d, BN, ReLU, Conv3d, BN, ReLU


def supports_slabs(model: nn.Module) -> bool:
    """True for a Med3DNet whose head is the lung decoder with the layer layout this module relies on."""
    head = getattr(model, "head", None)
    if not isinstance(head, LungDecoderHead) or len(head.up) < LAST_GROUP:
        return False
    last = list(head.up)[-LAST_GROUP:]
    convt, conv = last[0], last[3]
    return (isinstance(convt, nn.ConvTranspose3d) and convt.stride == (2, 2, 2) and convt.kernel_size == (3, 3, 3)
            and convt.padding == (1, 1, 1) and convt.output_padding == (1, 1, 1)
            and isinstance(conv, nn.Conv3d) and conv.kernel_size == (3, 3, 3) and conv.padding == (1, 1, 1)
            and conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1))


def slab_forward(model: nn.Module, x: torch.Tensor, slab: int = 32) -> torch.Tensor:
    """``model(x)`` for a lung-decoder Med3DNet, computing the full-resolution group in K-slabs of ``slab``
    (even) output slices. Use under ``torch.inference_mode()``; training needs the plain forward."""
    head: LungDecoderHead = model.head  # type: ignore[assignment]
    layers = list(head.up)
    early, last = nn.Sequential(*layers[:-LAST_GROUP]), nn.Sequential(*layers[-LAST_GROUP:], head.classify)
    half = early(model.encoder.features(x))  # (N, C, k, j, i): the group's input, half the output size
    k = half.shape[2]
    slab = max(2, slab - slab % 2)
    pieces: List[torch.Tensor] = []
    for a in range(0, 2 * k, slab):
        b = min(a + slab, 2 * k)
        # Output row 2m needs input row m; row 2m+1 needs rows m and m+1; the 3x3x3 conv adds one row each side.
        s, e = max(a // 2 - 1, 0), min(b // 2 + 1, k)
        out = last(half[:, :, s:e])
        pieces.append(out[:, :, a - 2 * s:b - 2 * s])
        del out
    return fit_to_size(torch.cat(pieces, dim=2), x.shape[2:])
