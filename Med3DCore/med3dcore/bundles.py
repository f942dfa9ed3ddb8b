"""Med3D model bundles: self-describing model files (architecture, task, labels, preprocessing, provenance,
weights; layout in DEVELOPERS.md) saved, checked and loaded; inspecting any checkpoint file; the models folder.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from . import __version__
from .bundle_checks import CHECKSUM_KEY, TASK_TYPES, check_bundle, content_digest
from .catalog import models_dir
from .checkpoint_files import (BUNDLE_FORMAT, MODEL_SUFFIXES, TRAINING_FORMAT, PathLike, atomic_save, file_weights,
                               refuse_overwrite, safe_load)
from .errors import Med3DError
from .medicalnet import backbone_state, count_parameters, describe_architecture, detect_architecture, unwrap
from .nets.heads import HEADS
from .nets.model import Med3DNet, build_model
from .nets.resnet import DEPTHS

BUNDLE_VERSION = 1
BUNDLE_KEYS = ("architecture", "task", "labels", "preprocessing", "provenance", "state_dict")


# ----------------------------------------------------------------------------------------------------------------
# Med3D bundles


@dataclass
class Bundle:
    """A Med3D model file, as :func:`load_bundle` returns it (see DEVELOPERS.md for the layout)."""

    architecture: Dict[str, Any]
    task: Dict[str, Any]
    labels: List[Dict[str, Any]]
    preprocessing: Dict[str, Any]
    provenance: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]
    extra: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None


def _plain(value: Any, where: str) -> Any:
    """Metadata as plain containers, numbers, strings and tensors, which ``weights_only`` loading accepts."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    for kind in (bool, int, float, str):  # exact types: numpy's float64 and str_ subclass float and str
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:  # numpy scalars
        return value.item()
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict(), where)
    raise TypeError(f"bundle field {where} holds a {type(value).__name__}; store plain numbers, strings, lists, "
                    f"dicts or tensors")


def _check_labels(labels: Any) -> List[Dict[str, Any]]:
    from .bundle_checks import check_labels

    return check_labels(labels, "the model")


def _check_against_architecture(architecture: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """The weights must be those of the network ``architecture`` describes (backbone and head)."""
    backbone = architecture.get("backbone")
    head = dict(architecture.get("head") or {})
    if not isinstance(backbone, Mapping) or "type" not in head:
        raise Med3DError("architecture must be {'backbone': {'depth', 'shortcut_type', 'preact'}, 'head': "
                         "{'type', ...}}")
    if not any(k.startswith("encoder.") for k in state):
        raise Med3DError("the model's weights have no 'encoder.' keys; save a Med3DNet (encoder + head)")
    found = detect_architecture({k: v for k, v in state.items() if k.startswith("encoder.")})
    wanted = {"depth": int(backbone.get("depth", 0)), "shortcut_type": str(backbone.get("shortcut_type", "B")),
              "preact": bool(backbone.get("preact", False))}
    if found != wanted:
        raise Med3DError(f"the architecture says {describe_architecture(wanted)} but the weights are "
                         f"{describe_architecture(found)}")
    head_type = head.pop("type")
    if head_type not in HEADS:
        raise Med3DError(f"unknown head type {head_type!r}; known: {', '.join(sorted(HEADS))}")
    in_channels = 512 if DEPTHS[found["depth"]][0] == "basic" else 2048
    try:
        head_net = HEADS[head_type](in_channels=in_channels, **head)
    except TypeError as exc:
        raise Med3DError(f"head {architecture['head']!r} has parameters its type does not take ({exc})") from None
    expected = {k: tuple(v.shape) for k, v in head_net.state_dict().items()}
    stored = {k[len("head."):]: tuple(v.shape) for k, v in state.items() if k.startswith("head.")}
    if expected != stored:
        raise Med3DError(f"the head weights do not match head {architecture['head']!r}; save the model that "
                         f"architecture describes")


def save_bundle(path: PathLike, model: Union[nn.Module, Mapping[str, torch.Tensor]], *,
                architecture: Mapping[str, Any], task: Mapping[str, Any], labels: List[Mapping[str, Any]],
                preprocessing: Any, provenance: Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None,
                overwrite: bool = False) -> Path:
    """Write a Med3D model bundle atomically; returns its path.

    ``model`` is a :class:`Med3DNet` (or its state dict); ``architecture`` must describe it (checked);
    ``preprocessing`` is a dict or an object with ``to_dict()`` (a ``PreprocessSpec``). ``format``,
    ``format_version`` and, in ``provenance``, ``created`` (UTC ISO time) and ``med3dcore`` (version) are added.
    An existing file is replaced only with ``overwrite=True``.
    """
    path = Path(path)
    refuse_overwrite(path, overwrite)
    model = unwrap(model)
    raw = model.state_dict() if isinstance(model, nn.Module) else model
    state = {str(k): v.detach().cpu() for k, v in raw.items()}
    arch = _plain(architecture, "architecture")
    _check_against_architecture(arch, state)
    task_d = _plain(task, "task")
    if not isinstance(task_d, dict) or task_d.get("type") not in TASK_TYPES:
        raise Med3DError(f"task must be a dict whose 'type' is one of {', '.join(TASK_TYPES)}, got {task!r}")
    prov = dict(_plain(provenance, "provenance") or {})
    prov["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    prov["med3dcore"] = __version__
    bundle = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION,
        "architecture": arch, "task": task_d, "labels": _plain(_check_labels(labels), "labels"),
        "preprocessing": _plain(preprocessing, "preprocessing") or {}, "provenance": prov,
        "state_dict": state, "extra": _plain(extra or {}, "extra"),
    }
    check_bundle(bundle, str(path))  # never write a bundle that loading would refuse
    bundle[CHECKSUM_KEY] = content_digest(bundle)  # verified by load_bundle: bytes changed later are refused
    return atomic_save(bundle, path, overwrite=overwrite, what="model")


def _not_a_bundle(obj: Any, path: Path) -> str:
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith(TRAINING_FORMAT):
        return (f"{path} is a training checkpoint (for --resume), not a Med3D model: use the model the run wrote, "
                f"OUT/NAME.pt beside the run folder")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return (f"{path} is a MedicalNet backbone file, not a Med3D model: fine-tune it first with "
                f"med3d finetune --init {path}")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return (f"{path} is a bare state dict (weights without architecture, labels or preprocessing), not a Med3D "
                f"model: fine-tune from it with med3d finetune --init {path}")
    return f"{path} is not a Med3D model file (no format '{BUNDLE_FORMAT}'); give a model saved by med3d"


def _bundle_from(obj: Any, path: Path) -> Bundle:
    if not isinstance(obj, dict) or obj.get("format") != BUNDLE_FORMAT:
        raise Med3DError(_not_a_bundle(obj, path))
    version = obj.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise Med3DError(f"{path} has no valid format_version; the file is damaged")
    if version > BUNDLE_VERSION:
        raise Med3DError(f"{path} is format version {version}, newer than this med3dcore {__version__} reads "
                         f"(up to {BUNDLE_VERSION}); upgrade med3dcore")
    if version < 1:
        raise Med3DError(f"{path} has format version {version}, which no med3dcore wrote; the file is damaged")
    missing = [k for k in BUNDLE_KEYS if k not in obj]
    if missing:
        raise Med3DError(f"{path} lacks {', '.join(missing)}; the file is damaged or was not written by med3dcore")
    check_bundle(obj, str(path))  # types, sizes within limits, checksum
    return Bundle(architecture=obj["architecture"], task=obj["task"], labels=list(obj["labels"]),
                  preprocessing=obj["preprocessing"], provenance=obj["provenance"], state_dict=obj["state_dict"],
                  extra=obj.get("extra") or {}, path=path)


def load_bundle(path: PathLike) -> Bundle:
    """Read a Med3D model bundle; a MedicalNet file, a newer format version or a damaged file is a Med3DError."""
    path = Path(path)
    return _bundle_from(safe_load(path), path)


def model_from_bundle(bundle: Bundle) -> Med3DNet:
    """The bundle's network with its weights loaded strictly, in eval mode, on the CPU."""
    try:
        model = build_model(bundle.architecture)
    except (TypeError, ValueError) as exc:  # load_bundle checks the description; a hand-made Bundle may not be
        raise Med3DError(f"{bundle.path or 'the bundle'}: its architecture cannot be built ({exc})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in bundle.state_dict.items()}
    where = bundle.path or "the bundle"
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise Med3DError(f"{where}: weights do not fit the architecture it records ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected, e.g. {first}); the file is damaged")
    for key, shape in expected.items():
        if stored[key] != shape:
            raise Med3DError(f"{where}: tensor {key} has shape {stored[key]}, its architecture needs {shape}; "
                             f"the file is damaged")
    model.load_state_dict(bundle.state_dict, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Inspecting and listing files


def _describe(obj: Any, path: Path) -> Dict[str, Any]:
    info: Dict[str, Any] = {"path": str(path)}
    if isinstance(obj, dict) and obj.get("format") == BUNDLE_FORMAT:
        bundle = _bundle_from(obj, path)
        state = bundle.state_dict
        info["format"] = BUNDLE_FORMAT
        info["format_version"] = obj["format_version"]
    else:
        state = file_weights(obj, path)
        bundle = None
        training = isinstance(obj, dict) and str(obj.get("format", "")).startswith(TRAINING_FORMAT)
        info["format"] = "training-checkpoint" if training else \
            "medicalnet" if isinstance(obj, dict) and "state_dict" in obj else "state_dict"
        if training:
            config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
            info["step"] = obj.get("step")
            info["total_steps"] = config.get("steps")
            info["best"] = obj.get("format") != TRAINING_FORMAT
            metrics = obj.get("metrics") if info["best"] else _json_field(obj.get("best"), {}).get("metrics")
            info["metrics"] = metrics if isinstance(metrics, dict) else {}
    backbone = backbone_state(state)
    info.update(detect_architecture(backbone))
    info["backbone_parameters"] = count_parameters(backbone)
    info["total_parameters"] = count_parameters(state)
    info["tensors"] = sum(1 for v in state.values() if isinstance(v, torch.Tensor))
    if bundle is not None:
        info["head"] = bundle.architecture.get("head")
        info["task"] = bundle.task
        info["labels"] = bundle.labels
        info["created"] = bundle.provenance.get("created")
        info["med3dcore"] = bundle.provenance.get("med3dcore")
        info["checksum"] = "verified" if CHECKSUM_KEY in obj else "none (saved before checksums)"
        info["provenance"] = {k: v for k, v in bundle.provenance.items() if k not in ("created", "med3dcore")}
        if "nodule_input" in bundle.extra:  # how the classifier sees a nodule: users draw their ROIs after it
            info["nodule_input"] = bundle.extra["nodule_input"]
        parts = {"measured_fusion": "a measured-size model (classify with a mask)",
                 "outline": "a nodule outline network (classify without a mask)"}
        info["also_holds"] = [text for key, text in parts.items() if key in bundle.extra]
    return info


def _json_field(value: Any, default: Any) -> Any:
    """A checkpoint's JSON-encoded field (training checkpoints store history and best as JSON text)."""
    import json

    try:
        return json.loads(value) if isinstance(value, str) else default
    except ValueError:
        return default


def inspect_file(path: PathLike) -> Dict[str, Any]:
    """Describe a checkpoint of any accepted kind (JSON-serialisable).

    Keys: ``path``, ``format`` (``medicalnet`` | ``med3d-bundle`` | ``training-checkpoint`` | ``state_dict``),
    ``depth``, ``shortcut_type``, ``preact``, ``backbone_parameters``, ``total_parameters`` (learnable elements),
    ``tensors``; bundles add ``format_version``, ``head``, ``task``, ``labels``, ``created``, ``med3dcore`` and
    ``provenance`` (data, init, steps, metrics ...); a run's ``checkpoints/last.pt``/``best.pt`` add ``step``,
    ``total_steps``, ``best`` and the validation ``metrics``.
    """
    path = Path(path)
    return _describe(safe_load(path, mmap=True), path)


@dataclass
class ModelInfo:
    """One file in a models folder; ``error`` says why it cannot be used (then ``task``/``labels`` are empty)."""

    path: Path
    name: str
    task: Dict[str, Any]
    labels: List[Dict[str, Any]]
    error: Optional[str] = None


def list_models(folder: Optional[PathLike] = None) -> List[ModelInfo]:
    """The checkpoint files (``.pt``, ``.pth``, ``.ckpt``) in ``folder`` (default :func:`models_dir`), sorted by
    name. Bundles come with task and labels; other or unreadable files carry an ``error`` instead of failing."""
    folder = Path(folder) if folder is not None else models_dir()
    if not folder.is_dir():
        return []
    found: List[ModelInfo] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES):
        try:
            bundle = _bundle_from(safe_load(path, mmap=True), path)
        except Med3DError as exc:
            found.append(ModelInfo(path=path, name=path.stem, task={}, labels=[], error=str(exc)))
            continue
        found.append(ModelInfo(path=path, name=path.stem, task=bundle.task, labels=bundle.labels))
    return found
