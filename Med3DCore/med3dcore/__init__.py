"""Med3DCore: the plain-PyTorch engine of Med3D (volumes, preprocessing, MedicalNet-exact 3D-ResNets,
checkpoints, multi-domain pretraining, fine-tuning and inference). It knows nothing of Slicer."""
from __future__ import annotations

from .errors import Med3DError

__version__ = "0.1.0"
__all__ = ["Med3DError", "__version__"]
