"""The auxiliary nodule-mask loss of classification fine-tuning (issue 9's "segmentation that transfers to
classification", used while fine-tuning rather than in a separate pretraining).

While the classifier learns benign vs malignant, a 1x1x1 convolution on the encoder's last feature map (stride 8:
4x4x4 cells for a 32^3 cube) predicts the fraction of each cell the nodule's mask fills, with a binary cross-entropy
against the mask cube average-pooled to that map. It asks the encoder to encode where and how large the nodule is,
the strongest single predictor of malignancy, from the image. The head lives only during training: the bundle holds
the classifier alone, so classify, evaluate and old bundles are unaffected.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

MASK_HEAD = "mask_head"


def attach_mask_head(model: nn.Module) -> nn.Module:
    """Give a classifier (:class:`~med3dcore.nets.model.Med3DNet`) the training-only mask head; its parameters are
    "new layers" for the optimiser (they are outside ``encoder.``)."""
    setattr(model, MASK_HEAD, nn.Conv3d(model.encoder.out_channels, 1, kernel_size=1))
    return model


def detach_mask_head(model: nn.Module) -> nn.Module:
    """Remove the mask head (before the classifier is saved), if there is one."""
    if hasattr(model, MASK_HEAD):
        delattr(model, MASK_HEAD)
    return model


def mask_classification_loss(weight: float) -> Callable[[nn.Module, Mapping[str, torch.Tensor]],
                                                          Tuple[torch.Tensor, Dict[str, float]]]:
    """Cross-entropy of the class plus ``weight`` x the mask head's cross-entropy, for batches with ``"mask"``
    (N, 1, D, H, W) fractions in [0, 1] on the image cubes' grid."""

    def loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        device = next(model.parameters()).device
        x = batch["image"].to(device)
        features = model.encoder.features(x)
        logits = model.head(features, x.shape[2:])
        labels = batch["label"].to(device)
        class_loss = F.cross_entropy(logits.float(), labels)
        predicted = getattr(model, MASK_HEAD)(features).float()
        target = F.adaptive_avg_pool3d(batch["mask"].to(device).float(), predicted.shape[2:])
        mask_loss = F.binary_cross_entropy_with_logits(predicted, target)
        return class_loss + weight * mask_loss, {"accuracy": float((logits.argmax(1) == labels).float().mean()),
                                                  "mask_loss": float(mask_loss.detach())}

    return loss
