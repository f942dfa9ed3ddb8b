"""Networks: MedicalNet-exact 3D-ResNets (``resnet3d``), task heads (``HEADS``) and encoder + head models."""
from __future__ import annotations

from .heads import HEADS
from .model import Med3DNet, build_encoder, build_model
from .resnet import ResNet3D, resnet3d

__all__ = ["HEADS", "Med3DNet", "ResNet3D", "build_encoder", "build_model", "resnet3d"]
