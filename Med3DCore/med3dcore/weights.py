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
import os
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from . import __version__, limits
from .bundle_checks import CHECKSUM_KEY, check_bundle, content_digest
from .errors import Med3DError
from .safe_io import regular_file, write_atomically
from .nets.heads import HEADS
from .nets.model import Med3DNet, build_model
from .nets.resnet import DEPTHS, ResNet3D

PathLike = Union[str, "os.PathLike[str]"]

BUNDLE_FORMAT = "med3d-bundle"
BUNDLE_VERSION = 1
BUNDLE_KEYS = ("architecture", "task", "labels", "preprocessing", "provenance", "state_dict")
TASK_TYPES = ("segmentation", "classification", "encoder")
MODEL_SUFFIXES = (".pt", ".pth", ".ckpt")
TRAINING_FORMAT = "med3d-train-checkpoint"  # as train.CHECKPOINT_FORMAT (+ "-best" for best.pt)

_PREFIXES = ("module.", "encoder.")
_BACKBONE_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "final_bn")
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


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
    # os.stat first: a FIFO would block the read, /dev/zero would never end, neither is "a folder".
    regular_file(path, "checkpoint file", folder_hint="give the .pth/.pt file inside it")
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
    if head.startswith(b"PK"):
        limits.check_torch_archive(path)  # a zip bomb is refused from its directory, before anything is unpacked
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


def atomic_save(obj: Any, path: PathLike, overwrite: bool = True, what: str = "checkpoint") -> Path:
    """``torch.save`` through the one write path (:mod:`med3dcore.safe_io`): staged in the same folder, flushed,
    checked to read back as a complete archive, then moved into place.

    A failure at any point (a full disk, Ctrl-C) leaves an existing file at ``path`` untouched and nothing
    temporary behind. ``overwrite=False`` publishes only if ``path`` does not exist, even if another process
    creates it meanwhile; a symbolic link at ``path`` is never written through.
    """
    def write(staged: Path) -> None:
        with open(staged, "wb") as fh:
            torch.save(obj, fh)

    def verify(staged: Path) -> None:
        with zipfile.ZipFile(str(staged)) as archive:  # the directory sits at the end: a cut file has none
            if not archive.namelist():
                raise Med3DError("the written archive is empty")

    return write_atomically(path, write, overwrite=overwrite, verify=verify, what=what)


def _refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise Med3DError(f"{path} already exists; choose another name or allow overwriting (--overwrite; overwrite=True from Python)")


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

    def __repr__(self) -> str:  # the full lists run to hundreds of names: say how many, name the few left
        left = ", ".join(self.left[:4]) + (f", ... ({len(self.left) - 4} more)" if len(self.left) > 4 else "")
        return f"LoadReport(loaded={len(self.loaded)} tensors, left={len(self.left)}" + \
            (f": {left})" if self.left else ")")


def _file_weights(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of any accepted file kind, keys as stored."""
    if isinstance(obj, dict) and obj.get("format") == BUNDLE_FORMAT:
        sd = obj.get("state_dict")
    elif isinstance(obj, dict) and str(obj.get("format", "")).startswith(TRAINING_FORMAT):
        sd = obj.get("model")  # a run's checkpoints/last.pt or best.pt
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
    return atomic_save({"state_dict": state}, path, overwrite=overwrite, what="MedicalNet export")


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
        state = _file_weights(obj, path)
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


from .catalog import models_dir  # noqa: E402 (torch-free, for the Slicer module and the CLI)


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
# Downloads: one implementation, in downloads.py (no torch there, so the Slicer module and the CLI's start-up
# can use it); re-exported here for the public API.

from .downloads import download_weights, sha256_of  # noqa: E402,F401
