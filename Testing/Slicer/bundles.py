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


def outline_extra(nodule_input: dict) -> dict:
    """``extra`` of a nodule bundle whose learnt outline marks every voxel of the cube shown (zero weights, a bias
    for "nodule") and whose outline fusion gives back the classifier's own probability (weight 1 on its logit)."""
    from med3dcore.nodule_measures import MEASURE_NAMES
    from med3dcore.nodule_outline import OUTLINE_ARCHITECTURE

    torch.manual_seed(0)
    net = build_model(OUTLINE_ARCHITECTURE)
    last = [m for m in net.head.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-5.0, 5.0]))
    n = len(MEASURE_NAMES)
    fusion = {"features": list(MEASURE_NAMES),
              "measures": {"mean": [0.0] * n, "scale": [1.0] * n, "weights": [0.0] * n, "bias": 0.0},
              "combine": {"mean": [0.0, 0.0], "scale": [1.0, 1.0], "weights": [0.0, 1.0], "bias": 0.0}}
    return {"nodule_input": nodule_input, "outline_fusion": fusion,
            "outline": {"architecture": OUTLINE_ARCHITECTURE, "state_dict": net.state_dict()}}
