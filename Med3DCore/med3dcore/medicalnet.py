"""MedicalNet-style 3D-ResNet weights: state-dict names and architecture detection, and import and export of
MedicalNet release files, ``{"state_dict": {"module.<key>": tensor}}`` with backbone keys only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping

import torch
from torch import nn

from .checkpoint_files import PathLike, atomic_save, file_weights, refuse_overwrite, safe_load
from .errors import Med3DError
from .nets.model import Med3DNet
from .nets.resnet import DEPTHS, ResNet3D

_PREFIXES = ("module.", "encoder.")
_BACKBONE_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "final_bn")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


# ----------------------------------------------------------------------------------------------------------------
# State dicts and architectures


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def backbone_state(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The 3D-ResNet backbone tensors of ``state_dict`` under MedicalNet names (prefixes stripped, heads dropped)."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            continue
        name = _strip(key)
        if name.split(".", 1)[0] in _BACKBONE_ROOTS:
            out[name] = value
    return out


def count_parameters(state_dict: Mapping[str, Any]) -> int:
    """Learnable elements in a state dict (batch-norm running statistics and counters excluded)."""
    return int(sum(v.numel() for k, v in state_dict.items()
                   if isinstance(v, torch.Tensor) and not str(k).endswith(_BUFFER_SUFFIXES)))


def detect_architecture(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Deduce ``{"depth", "shortcut_type", "preact"}`` from the key names and shapes of a 3D-ResNet state dict.

    Keys may carry ``module.`` and/or ``encoder.`` prefixes; non-backbone keys (``conv_seg``, ``head``) are ignored.
    """
    sd = backbone_state(state_dict)
    conv1 = sd.get("conv1.weight")
    if conv1 is None:
        raise Med3DError("the file holds no 3D-ResNet weights (no conv1.weight); give a MedicalNet or Med3D "
                         "checkpoint")
    if conv1.dim() != 5:
        raise Med3DError(f"conv1.weight has shape {tuple(conv1.shape)}: this is a {conv1.dim() - 2}D network, not "
                         f"a 3D-ResNet; give a MedicalNet or Med3D checkpoint")
    if conv1.shape[1] != 1:
        raise Med3DError(f"conv1.weight takes {conv1.shape[1]} input channels; Med3D networks take one channel")
    counts: List[int] = []
    for layer in range(1, 5):
        indices = {int(m.group(1)) for m in (re.match(rf"layer{layer}\.(\d+)\.", k) for k in sd) if m}
        if not indices or indices != set(range(len(indices))):
            raise Med3DError(f"layer{layer} of the 3D-ResNet is missing or incomplete in the file (blocks found: "
                             f"{sorted(indices)}); the file is damaged or not a MedicalNet-style network")
        counts.append(len(indices))
    kind = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    for depth, (known_kind, known_counts) in DEPTHS.items():
        if known_kind == kind and tuple(counts) == known_counts:
            break
    else:
        raise Med3DError(f"{kind} blocks per layer {tuple(counts)} match no ResNet depth "
                         f"({', '.join(str(d) for d in DEPTHS)}); the file is not a MedicalNet-style 3D-ResNet")
    return {"depth": depth, "shortcut_type": "B" if "layer2.0.downsample.0.weight" in sd else "A",
            "preact": "final_bn.weight" in sd}


def describe_architecture(arch: Mapping[str, Any]) -> str:
    """E.g. ``ResNet-18, shortcut A`` or ``pre-activation ResNet-200, shortcut B``."""
    name = f"ResNet-{arch['depth']}, shortcut {arch['shortcut_type']}"
    return f"pre-activation {name}" if arch.get("preact") else name


def unwrap(model: Any) -> Any:
    """The network inside a (Distributed)DataParallel wrapper, so names carry no extra ``module.``."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def _net_architecture(net: ResNet3D) -> Dict[str, Any]:
    return {"depth": net.depth, "shortcut_type": net.shortcut_type, "preact": net.preact}


# ----------------------------------------------------------------------------------------------------------------
# MedicalNet files


@dataclass
class LoadReport:
    """What :func:`load_medicalnet` did: ``loaded`` and ``left`` (not in the file, left as initialised) hold the
    target network's own state-dict names (``encoder.``/``head.`` prefixed for a :class:`Med3DNet`)."""

    loaded: List[str]
    left: List[str]

    def __repr__(self) -> str:  # the full lists run to hundreds of names: say how many, name the few left
        left = ", ".join(self.left[:4]) + (f", ... ({len(self.left) - 4} more)" if len(self.left) > 4 else "")
        return f"LoadReport(loaded={len(self.loaded)} tensors, left={len(self.left)}" + \
            (f": {left})" if self.left else ")")


def load_medicalnet(net: nn.Module, path: PathLike) -> LoadReport:
    """Load a 3D-ResNet backbone from ``path`` into ``net``, strictly.

    ``net`` is a :func:`~med3dcore.nets.resnet3d` network (its ``conv_seg`` is loaded too when the file has one of
    the same shapes, else left) or a :class:`Med3DNet` (its ``encoder``; the head is left). Accepted files: a
    MedicalNet release or training checkpoint, a Med3D bundle (its encoder), a bare state dict. Every backbone
    tensor of the network must be in the file with the same shape, and the file's depth, shortcut type and
    pre-activation must equal the network's; otherwise a :class:`Med3DError` says which differs.
    """
    if isinstance(net, Med3DNet):
        target, prefix = net.encoder, "encoder."
    else:
        target, prefix = net, ""
    if not isinstance(target, ResNet3D):
        raise Med3DError(f"load_medicalnet needs a resnet3d network or a Med3DNet, got {type(net).__name__}")
    path = Path(path)
    stored = file_weights(safe_load(path), path)
    weights = backbone_state(stored)
    file_arch = detect_architecture(weights)
    net_arch = _net_architecture(target)
    if file_arch != net_arch:
        raise Med3DError(f"{path} holds {describe_architecture(file_arch)}; model is "
                         f"{describe_architecture(net_arch)}; build the model with depth={file_arch['depth']}, "
                         f"shortcut_type='{file_arch['shortcut_type']}', preact={file_arch['preact']}")
    current = target.state_dict()
    seg = {_strip(k): v for k, v in stored.items() if isinstance(v, torch.Tensor) and _strip(k).startswith("conv_seg.")}
    if seg and set(seg) == {k for k in current if k.startswith("conv_seg.")} and all(
            tuple(v.shape) == tuple(current[k].shape) for k, v in seg.items()):
        weights.update(seg)
    missing = [k for k in current if k not in weights and not k.startswith("conv_seg.")]
    if missing:
        raise Med3DError(f"{path} lacks {len(missing)} backbone tensor(s) of {describe_architecture(net_arch)} (e.g. "
                         f"{missing[0]}); the file is incomplete or damaged, get it again")
    unexpected = [k for k in weights if k not in current]
    if unexpected:
        raise Med3DError(f"{path} has tensor(s) a {describe_architecture(net_arch)} does not have (e.g. "
                         f"{unexpected[0]}); it was not written for this network")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise Med3DError(f"{path}: tensor {key} has shape {tuple(value.shape)}, the model needs "
                             f"{tuple(current[key].shape)}; the file was written for another network")
        if value.is_floating_point() != current[key].is_floating_point():
            raise Med3DError(f"{path}: tensor {key} holds {value.dtype}, the model needs {current[key].dtype}")
    merged = dict(current)
    merged.update(weights)
    target.load_state_dict(merged, strict=True)
    loaded = [prefix + k for k in current if k in weights]
    left = [prefix + k for k in current if k not in weights]
    if prefix:
        left += [k for k in net.state_dict() if not k.startswith(prefix)]
    return LoadReport(loaded=loaded, left=left)


def export_medicalnet(encoder_or_model: nn.Module, path: PathLike, overwrite: bool = False) -> Path:
    """Write the backbone of a ``resnet3d`` network or a :class:`Med3DNet` as a MedicalNet release file,
    ``{"state_dict": {"module.<key>": tensor}}`` (no ``conv_seg``, no head), atomically."""
    net = unwrap(encoder_or_model)
    net = net.encoder if isinstance(net, Med3DNet) else net
    if not isinstance(net, ResNet3D):
        raise Med3DError(f"export_medicalnet needs a resnet3d network or a Med3DNet, got {type(net).__name__}")
    path = Path(path)
    refuse_overwrite(path, overwrite)
    state = {f"module.{k}": v.detach().cpu().clone() for k, v in net.state_dict().items()
             if not k.startswith("conv_seg.")}
    return atomic_save({"state_dict": state}, path, overwrite=overwrite, what="MedicalNet export")
