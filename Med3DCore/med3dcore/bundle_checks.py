"""What a Med3D bundle must look like before anything uses it, and its content checksum.

A bundle is loaded with ``weights_only=True`` (no code runs), but its *values* come from whoever wrote the file:
a ``task`` that is a string, labels without names, colours given as words, a depth of ``"ten"``, 10^9 classes.
:func:`check_bundle` checks every field Med3D later relies on (types, and sizes through :mod:`med3dcore.limits`)
and raises one :class:`Med3DError` naming the field, so one bad file in a models folder is reported as unusable
instead of breaking whatever lists the folder.

Bundles written by :func:`med3dcore.bundles.save_bundle` carry ``content_sha256``: a SHA-256 over every field
(weights and metadata) but itself. A file whose bytes changed after saving (a damaged copy, flipped bits, an
edit) no longer matches and is refused; bundles written before checksums existed have none and still load.
"""
from __future__ import annotations

import hashlib
import inspect
import operator
import re
from typing import Any, Dict, List, Mapping, Optional

import torch

from . import limits
from .errors import Med3DError

CHECKSUM_KEY = "content_sha256"
TASK_TYPES = ("segmentation", "classification", "encoder")


# ------------------------------------------------------------------------------------------------------- checksum

def content_digest(bundle: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of every field of ``bundle`` except :data:`CHECKSUM_KEY`: tensors by dtype, shape and bytes,
    containers and plain values by type and value, in a fixed order."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}\0".encode())
            if tensor.numel():
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(value, Mapping):
            digest.update(f"D{len(value)}\0".encode())
            for key in sorted(value, key=str):
                feed(str(key))
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}\0".encode())
            for item in value:
                feed(item)
        elif isinstance(value, str):
            data = value.encode("utf-8", "surrogatepass")
            digest.update(f"S{len(data)}\0".encode() + data)
        elif value is None or isinstance(value, (bool, int, float)):
            digest.update(f"{type(value).__name__}:{value!r}\0".encode())
        else:
            digest.update(f"O{type(value).__name__}:{value!r}\0".encode())

    feed({k: v for k, v in bundle.items() if k != CHECKSUM_KEY})
    return digest.hexdigest()


def verify_checksum(bundle: Mapping[str, Any], where: str) -> Optional[bool]:
    """True when the bundle's checksum matches, None when it has none (written before checksums); a mismatch is
    a :class:`Med3DError`."""
    stored = bundle.get(CHECKSUM_KEY)
    if stored is None:
        return None
    if not isinstance(stored, str) or not re.fullmatch(r"[0-9a-f]{64}", stored):
        raise Med3DError(f"{where} has a damaged checksum field; get the file again")
    if content_digest(bundle) != stored:
        raise Med3DError(f"{where} does not match the checksum it was saved with: its bytes changed after saving "
                         "(a damaged copy or download, or an edited file); get the file again or re-export it")
    return True


# ------------------------------------------------------------------------------------------------------- fields

def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise Med3DError(f"{what} must be a mapping, got {type(value).__name__}; the file is damaged or not a "
                         "Med3D model")
    return value


def check_architecture(architecture: Any, where: str) -> None:
    """Backbone depth/shortcut/preact and a known head type whose parameters its class takes, within limits."""
    from .nets.heads import HEADS
    from .nets.resnet import DEPTHS

    arch = _mapping(architecture, f"{where}: 'architecture'")
    backbone = _mapping(arch.get("backbone"), f"{where}: 'architecture.backbone'")
    head = _mapping(arch.get("head"), f"{where}: 'architecture.head'")
    depth = backbone.get("depth")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth not in DEPTHS:
        raise Med3DError(f"{where}: backbone depth {depth!r} is not one of {', '.join(str(d) for d in DEPTHS)}; the "
                         "file is damaged or not a Med3D model")
    if str(backbone.get("shortcut_type", "B")).upper() not in ("A", "B") or \
            not isinstance(backbone.get("shortcut_type", "B"), str):
        raise Med3DError(f"{where}: backbone shortcut type {backbone.get('shortcut_type')!r} is not 'A' or 'B'")
    if not isinstance(backbone.get("preact", False), bool):
        raise Med3DError(f"{where}: backbone 'preact' must be true or false, got {backbone.get('preact')!r}")
    kind = head.get("type")
    if not isinstance(kind, str) or kind not in HEADS:
        raise Med3DError(f"{where}: unknown head type {kind!r}; known: {', '.join(sorted(HEADS))}")
    params = {k: v for k, v in head.items() if k != "type"}
    accepted = set(inspect.signature(HEADS[kind].__init__).parameters) - {"self", "in_channels"}
    unknown = sorted(str(k) for k in params if k not in accepted)
    if unknown or "num_classes" not in params:
        raise Med3DError(f"{where}: head '{kind}' has parameters {', '.join(unknown) or '(no num_classes)'} it does "
                         f"not take (it takes {', '.join(sorted(accepted))}); the file is damaged")
    limits.head_parameters(params, where)


def check_labels(labels: Any, where: str, first_value: int = 0) -> List[Dict[str, Any]]:
    """Labels as a list of ``{value, name, color?, terminology?}``: whole values from ``first_value``, unique
    values and names, colours three whole numbers 0..255."""
    if not isinstance(labels, (list, tuple)):
        raise Med3DError(f"{where}: labels must be a list of {{'value': int, 'name': str}}, got "
                         f"{type(labels).__name__}")
    if len(labels) > limits.MAX_CLASSES:
        raise limits.refuse(f"{where}: the number of labels", len(labels), f"at most {limits.MAX_CLASSES}")
    values, names = set(), set()
    for item in labels:
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item.get("name").strip():
            raise Med3DError(f"{where}: label {item!r} needs an integer 'value' and a 'name'")
        name, value = item["name"], item.get("value")
        if isinstance(value, bool) or not isinstance(value, int):
            raise Med3DError(f"{where}: label {item!r:.120} needs an integer 'value' and a 'name'")
        value = limits.whole_number(value, f"{where}: the value of label '{name}'", first_value, 2 ** 31 - 1)
        if value in values:
            raise Med3DError(f"{where}: label value {value} is used twice; give each label its own value")
        if name in names:
            raise Med3DError(f"{where}: label name '{name}' is used twice; give each label its own name")
        values.add(value)
        names.add(name)
        color = item.get("color")
        if color is not None and (isinstance(color, (str, bytes, Mapping)) or not hasattr(color, "__len__") or
                                  len(color) != 3 or not all(_byte(c) for c in color)):
            raise Med3DError(f"{where}: label '{name}' has colour {color!r:.80}; give three values 0-255")
        terminology = item.get("terminology")
        if terminology is not None and not isinstance(terminology, str):
            raise Med3DError(f"{where}: label '{name}' has terminology {terminology!r}; give a string or none")
    return [dict(item) for item in labels]


def _byte(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and 0 <= operator.index(value) <= 255
    except TypeError:
        return False


def _check_preprocessing(value: Any, where: str) -> None:
    from .preprocess import PreprocessSpec

    if value is None or (isinstance(value, Mapping) and not value):
        return
    spec = PreprocessSpec.from_dict(_mapping(value, f"{where}: 'preprocessing'"))
    if spec.spacing is not None:
        limits.spacing(spec.spacing, f"{where}: preprocessing spacing (mm)")


def _check_state(value: Any, where: str) -> None:
    if not isinstance(value, Mapping) or not value:
        raise Med3DError(f"{where} holds no weights; the file is damaged")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        raise Med3DError(f"{where}: its weights hold entries that are not named tensors; the file is damaged")


def check_temperature(value: Any, where: str) -> float:
    """A classifier's probability temperature (``extra["temperature"]``; probabilities are ``softmax(logits /
    T)``): finite, positive and within :data:`limits.TEMPERATURE_RANGE`, else one line naming the file."""
    low, high = limits.TEMPERATURE_RANGE
    try:
        return limits.number(value, f"{where}: its probability temperature", low, high)
    except Med3DError as exc:
        raise Med3DError(f"{exc}; the file is damaged or was not written by med3d finetune (fine-tune again)") from None


def check_bundle(obj: Mapping[str, Any], where: str) -> Optional[bool]:
    """Check a loaded bundle dict (see the module docstring); returns :func:`verify_checksum`'s answer."""
    limits.check_metadata(obj, where)
    check_architecture(obj["architecture"], where)
    task = _mapping(obj["task"], f"{where}: 'task'")
    if task.get("type") not in TASK_TYPES:
        raise Med3DError(f"{where}: task type {task.get('type')!r} is not one of {', '.join(TASK_TYPES)}")
    if not isinstance(task.get("name", ""), str):
        raise Med3DError(f"{where}: task name {task.get('name')!r} is not a string")
    check_labels(obj["labels"], where, first_value=1 if task["type"] == "segmentation" else 0)
    _check_preprocessing(obj["preprocessing"], where)
    _mapping(obj["provenance"], f"{where}: 'provenance'")
    _check_state(obj["state_dict"], where)
    extra = _mapping(obj.get("extra") or {}, f"{where}: 'extra'")
    if "coarse" in extra:
        coarse = _mapping(extra["coarse"], f"{where}: 'extra.coarse'")
        for key in ("architecture", "preprocessing", "state_dict"):
            if key not in coarse:
                raise Med3DError(f"{where}: its coarse stage lacks '{key}'; the file is damaged")
        check_architecture(coarse["architecture"], f"{where} (coarse stage)")
        _check_preprocessing(coarse["preprocessing"], f"{where} (coarse stage)")
        _check_state(coarse["state_dict"], f"{where} (coarse stage)")
        limits.input_size(coarse.get("input_size"), f"{where}: the coarse stage's input size")
    if "margin_mm" in extra:
        limits.number(extra["margin_mm"], f"{where}: the coarse stage's margin (mm)", 0.0, 1000.0)
    if "temperature" in extra:
        check_temperature(extra["temperature"], where)
    from .nodule_measures import check_fusion

    for key in ("measured_fusion", "outline_fusion"):
        if key in extra:
            check_fusion(extra[key], where)
    if "outline" in extra:  # the nodule outline network (nodule_outline.py) comes with its fusion record
        outline = _mapping(extra["outline"], f"{where}: 'extra.outline'")
        for key in ("architecture", "state_dict"):
            if key not in outline:
                raise Med3DError(f"{where}: its nodule outline network lacks '{key}'; the file is damaged")
        check_architecture(outline["architecture"], f"{where} (nodule outline)")
        _check_state(outline["state_dict"], f"{where} (nodule outline)")
        if "outline_fusion" not in extra:
            raise Med3DError(f"{where}: its nodule outline network has no fusion record; the file is damaged")
    if "nodule_input" in extra:  # bounded here too, so that a bad one names the file
        from .nodules import NoduleInputSpec

        try:
            NoduleInputSpec.from_dict(_mapping(extra["nodule_input"], f"{where}: 'extra.nodule_input'"))
        except Med3DError as exc:
            raise Med3DError(f"{where}: {exc}") from None
    for name, branch in _mapping(extra.get("branches") or {}, f"{where}: 'extra.branches'").items():
        limits.whole_number(_mapping(branch, f"{where}: branch '{name}'").get("num_classes"),
                            f"{where}: branch '{name}' classes", 1, limits.MAX_CLASSES)
    return verify_checksum(obj, where)

