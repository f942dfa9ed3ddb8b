"""Real Med3D model bundles with exactly known outputs, for the module's tests."""
from __future__ import annotations

from pathlib import Path

import torch

from med3dcore.bundles import save_bundle
from med3dcore.nets import build_model

BACKBONE = {"depth": 10, "shortcut_type": "B", "preact": False}
LUNG_LABELS = [{"value": 1, "name": "lung", "color": [197, 165, 145], "terminology": "SCT^39607008^Lung"}]
NODULE_LABELS = [{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}]


def constant_output_bundle(path: Path, head: dict, bias: list, task: dict, labels: list, **kwargs) -> Path:
    """A real ResNet-10 bundle whose last layer has zero weights and ``bias``: its output is known exactly."""
    torch.manual_seed(0)
    architecture = {"backbone": dict(BACKBONE), "head": head}
    net = build_model(architecture)
    last = [m for m in net.head.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear))][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor(bias))
    return save_bundle(path, net, architecture=architecture, task=task, labels=labels,
                       provenance={"data": "constant-output test bundle"}, **kwargs)
