"""Checkpoint files: safe loading, atomic saving, MedicalNet import/export, Med3D bundles, models on disk.

Three kinds of file are understood (see :func:`inspect_file`):

- ``"medicalnet"``: a MedicalNet release, ``{"state_dict": {"module.<key>": tensor}}`` with backbone keys only (a
  MedicalNet training checkpoint, which adds ``optimizer`` and epoch entries and ``conv_seg`` keys, also counts);
- ``"med3d-bundle"``: our self-describing model file (architecture, task, labels, preprocessing, provenance,
  weights), written by :func:`save_bundle`;
- ``"state_dict"``: a bare ``{key: tensor}`` dict of a 3D-ResNet, keys with or without ``module.``/``encoder.``.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint from a stranger cannot run code. Every file
is written through :func:`atomic_save`, so a crash never leaves a half-written file in place of a good one.
"""
from __future__ import annotations

import datetime
import hashlib
import http.client
import os
import pickletools
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from . import __version__
from .errors import Med3DError
from .nets.heads import HEADS
from .nets.model import Med3DNet, build_model
from .nets.resnet import DEPTHS, ResNet3D

PathLike = Union[str, "os.PathLike[str]"]

BUNDLE_FORMAT = "med3d-bundle"
BUNDLE_VERSION = 1
BUNDLE_KEYS = ("architecture", "task", "labels", "preprocessing", "provenance", "state_dict")
TASK_TYPES = ("segmentation", "classification", "encoder")
MODEL_SUFFIXES = (".pt", ".pth", ".ckpt")

_PREFIXES = ("module.", "encoder.")
_BACKBONE_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "final_bn")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing files


def _sniff(head: bytes) -> Optional[str]:
    """What a file that is not a torch checkpoint looks like, from its first bytes (None: could be a checkpoint)."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None  # zip archive (torch >= 1.6) or pickle (older torch)
    known = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"\x1f\x8b", "a gzip file (a .nii.gz "
             "volume?)"), (b"NRRD", "an NRRD volume"), (b"%PDF", "a PDF document"), (b"\x89HDF", "an HDF5 file"))
    for magic, what in known:
        if head.startswith(magic):
            return what
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    try:
        head[:128].decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "an unknown binary file"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0][:200] if lines else "no details"


def safe_load(path: PathLike, mmap: bool = False) -> Any:
    """Load a torch checkpoint on the CPU without letting it run code (``weights_only=True``).

    A missing, empty, truncated or foreign file, and a pickle that asks to import or call anything beyond plain
    containers and tensors, raise :class:`Med3DError` with a one-line message. ``mmap=True`` maps tensors lazily
    (fast look at the metadata of big files).
    """
    path = Path(path)
    if not path.exists():
        raise Med3DError(f"checkpoint file {path} does not exist; check the path")
    if not path.is_file():
        raise Med3DError(f"{path} is a folder, not a checkpoint file; give the .pth/.pt file inside it")
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise Med3DError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
    if not head:
        raise Med3DError(f"{path} is empty (0 bytes), probably from an interrupted download or save; get the file "
                         f"again")
    looks_like = _sniff(head)
    if looks_like:
        raise Med3DError(f"{path} is not a PyTorch checkpoint (it looks like {looks_like}); give a .pth/.pt file "
                         f"saved with torch.save, e.g. a MedicalNet release or a Med3D model")
    kwargs: Dict[str, Any] = {"map_location": "cpu", "weights_only": True}
    if mmap and head.startswith(b"PK"):
        kwargs["mmap"] = True
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the user cannot act on that
            warnings.simplefilter("ignore", UserWarning)
            try:
                return torch.load(str(path), **kwargs)
            except TypeError:  # torch < 2.1 has no mmap argument
                kwargs.pop("mmap", None)
                return torch.load(str(path), **kwargs)
    except Exception as exc:  # torch raises many types here; each becomes one clear message
        raise Med3DError(_load_failure(path, head, exc)) from None


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")


def _pickle_imports(path: Path, head: bytes) -> List[str]:
    """Names the file's (first) pickle imports, found by reading its opcodes without executing anything."""
    try:
        if head.startswith(b"PK"):
            with zipfile.ZipFile(str(path)) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                data = archive.read(name)
        else:
            data = path.read_bytes()
    except Exception:  # unreadable archive: nothing to name
        return []
    names: List[str] = []
    strings: List[str] = []
    memo: Dict[int, str] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and "UNICODE" in opcode.name:
                strings.append(arg)
            elif opcode.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif opcode.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                strings.append(memo[arg])
    except Exception:  # truncated or odd pickle: report what was seen so far
        pass
    return names


def _load_failure(path: Path, head: bytes, exc: Exception) -> str:
    text = str(exc)
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    suspicious = [n for n in _pickle_imports(path, head) if not n.startswith(_SAFE_GLOBAL_PREFIXES)]
    culprit = suspicious[0] if suspicious else (blocked.group(1) if blocked else None)
    if culprit:
        return (f"refused to load {path}: it asks to import or call '{culprit}', which plain weights never "
                f"need and which could run code (nothing from it was run); use checkpoints from trusted sources "
                f"only, or re-save plain tensors with torch.save")
    if "Weights only load failed" in text or "Unpickl" in type(exc).__name__:
        if head.startswith(b"PK"):
            return (f"refused to load {path}: it holds Python objects beyond tensors and plain containers "
                    f"({_first_line(text.split('WeightsUnpickler error:')[-1])}); re-save it with plain tensors")
        return (f"{path} is a Python pickle that is not a PyTorch checkpoint which can be loaded safely; give a "
                f".pth/.pt file saved with torch.save")
    if isinstance(exc, (EOFError, RuntimeError)) or "EOF" in text or "zip" in text.lower():
        reason = _first_line(text).split(". ")[0].rstrip(".")[:120]  # the first sentence, not a cut-off one
        return (f"{path} is damaged or truncated (PyTorch cannot read it: {reason}); an "
                f"interrupted download or save? get the file again")
    return f"cannot read {path} as a PyTorch checkpoint: {type(exc).__name__}: {_first_line(text)}"


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, flush, fsync, then rename over ``path``.

    A failure at any point leaves an existing file at ``path`` untouched and no temporary file behind. This
    function replaces an existing file: callers decide beforehand whether that is allowed.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise Med3DError(f"cannot save {path}: folder {folder} does not exist; create it first")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(folder))
    try:
        _default_mode(tmp_name)
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise Med3DError(f"cannot save {path}: {exc.strerror or exc}; check free disk space and "
                             f"permissions") from None
        raise
    _fsync_folder(folder)
    return path


def _default_mode(name: str) -> None:
    """Give a temporary file the permissions a plainly created file would get (mkstemp makes it owner-only, 0600,
    so a model saved into a shared folder would be unreadable to colleagues and to Slicer run by another user)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable on POSIX; folders cannot be opened this way on Windows.
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise Med3DError(f"{path} already exists; choose another name or allow overwriting (--overwrite)")


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


def _unwrap(model: Any) -> Any:
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


def _file_weights(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of any accepted file kind, keys as stored."""
    if isinstance(obj, dict) and obj.get("format") == BUNDLE_FORMAT:
        sd = obj.get("state_dict")
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    else:
        sd = obj
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise Med3DError(f"{path} holds no network weights (expected a MedicalNet file {{'state_dict': ...}}, a Med3D "
                         f"model or a state dict)")
    return sd


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
    stored = _file_weights(safe_load(path), path)
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
    net = _unwrap(encoder_or_model)
    net = net.encoder if isinstance(net, Med3DNet) else net
    if not isinstance(net, ResNet3D):
        raise Med3DError(f"export_medicalnet needs a resnet3d network or a Med3DNet, got {type(net).__name__}")
    path = Path(path)
    _refuse_overwrite(path, overwrite)
    state = {f"module.{k}": v.detach().cpu().clone() for k, v in net.state_dict().items()
             if not k.startswith("conv_seg.")}
    return atomic_save({"state_dict": state}, path)


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
    if not isinstance(labels, (list, tuple)):
        raise Med3DError(f"labels must be a list of {{'value': int, 'name': str}}, got {type(labels).__name__}")
    seen = set()
    for item in labels:
        if not isinstance(item, Mapping) or not isinstance(item.get("value"), int) or not item.get("name"):
            raise Med3DError(f"label {item!r} needs an integer 'value' and a 'name'")
        if item["value"] in seen:
            raise Med3DError(f"label value {item['value']} is used twice; give each label its own value")
        seen.add(item["value"])
        color = item.get("color")
        if color is not None and (len(color) != 3 or not all(0 <= int(c) <= 255 for c in color)):
            raise Med3DError(f"label '{item['name']}' has colour {color!r}; give three values 0-255")
    return [dict(item) for item in labels]


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
    _refuse_overwrite(path, overwrite)
    model = _unwrap(model)
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
    return atomic_save(bundle, path)


def _not_a_bundle(obj: Any, path: Path) -> str:
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
    if not isinstance(obj["state_dict"], dict) or not obj["state_dict"]:
        raise Med3DError(f"{path} holds no weights; the file is damaged")
    return Bundle(architecture=obj["architecture"], task=obj["task"], labels=list(obj["labels"]),
                  preprocessing=obj["preprocessing"], provenance=obj["provenance"], state_dict=obj["state_dict"],
                  extra=obj.get("extra") or {}, path=path)


def load_bundle(path: PathLike) -> Bundle:
    """Read a Med3D model bundle; a MedicalNet file, a newer format version or a damaged file is a Med3DError."""
    path = Path(path)
    return _bundle_from(safe_load(path), path)


def model_from_bundle(bundle: Bundle) -> Med3DNet:
    """The bundle's network with its weights loaded strictly, in eval mode, on the CPU."""
    model = build_model(bundle.architecture)
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
        state = _file_weights(obj, path)
        bundle = None
        info["format"] = "medicalnet" if isinstance(obj, dict) and "state_dict" in obj else "state_dict"
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
    return info


def inspect_file(path: PathLike) -> Dict[str, Any]:
    """Describe a checkpoint of any accepted kind (JSON-serialisable).

    Keys: ``path``, ``format`` (``medicalnet`` | ``med3d-bundle`` | ``state_dict``), ``depth``, ``shortcut_type``,
    ``preact``, ``backbone_parameters``, ``total_parameters`` (learnable elements), ``tensors``; bundles add
    ``format_version``, ``head``, ``task``, ``labels``, ``created`` and ``med3dcore``.
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


def models_dir() -> Path:
    """Where models live: ``$MED3D_MODELS``, else ``~/.med3d/models`` (not created here)."""
    env = os.environ.get("MED3D_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".med3d" / "models"


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


# ----------------------------------------------------------------------------------------------------------------
# Downloads


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(url: str, dest: PathLike, sha256: Optional[str] = None,
                     reporter: Optional[Callable[[Dict[str, Any]], None]] = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (streamed to a temporary file, checked, then renamed into place).

    An existing ``dest`` whose checksum matches ``sha256`` (or any existing ``dest`` when no checksum is given) is
    kept and returned without a download; one that does not match is an error, never silently replaced.
    Progress events have stage ``download`` with ``step``/``total`` in bytes.
    """
    from .progress import make_event

    dest = Path(dest)
    expected = sha256.strip().lower() if sha256 else None
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise Med3DError(f"sha256 {sha256!r} is not a SHA-256 checksum (64 hexadecimal digits)")
    if dest.exists():
        if expected is None or _sha256(dest) == expected:
            return dest
        raise Med3DError(f"{dest} already exists with a different checksum than expected; delete it to download "
                         f"it again")
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise Med3DError(f"cannot download {url!r}: give an http(s):// or file:// address")
    if not dest.parent.is_dir():
        raise Med3DError(f"cannot download to {dest}: folder {dest.parent} does not exist; create it first")
    hint = f"or download it by hand and place it at {dest}"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=str(dest.parent))
    digest = hashlib.sha256()
    try:
        _default_mode(tmp_name)
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=timeout)
            except urllib.error.HTTPError as exc:
                raise Med3DError(f"download of {url} failed: HTTP {exc.code} {exc.reason}; check the address "
                                 f"{hint}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise Med3DError(f"cannot reach {url} ({reason}); check the network connection {hint}") from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                done = 0
                try:
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if reporter is not None:
                            reporter(make_event("download", done, total, message=dest.name))
                except (OSError, http.client.HTTPException) as exc:
                    raise Med3DError(f"download of {url} broke off after {done} bytes ({exc}); try again "
                                     f"{hint}") from None
            if total is not None and done != total:
                raise Med3DError(f"download of {url} is incomplete ({done} of {total} bytes); try again {hint}")
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if expected is not None and got != expected:
            raise Med3DError(f"checksum mismatch for {url}: expected sha256 {expected}, got {got}; the download is "
                             f"damaged or the file changed, try again {hint}")
        os.replace(tmp_name, dest)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    return dest
