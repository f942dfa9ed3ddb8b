"""The one place that bounds sizes taken from untrusted metadata, before anything is allocated.

A file from a stranger is small, but what it *declares* can be huge: a YAML config whose aliases nest a few
levels deep expands a thousand-fold per level, a 4 MB ``.pt`` zip can declare gigabytes of compressed data, a
bundle can ask for 10^9 classes, a 4096-voxel nodule cube or a 0.01 mm grid, a volume header can claim 10^15
voxels. Each is checked here against limits far above any real model or scan and far below what would exhaust a
workstation, and refused with one line naming the value and the limit.
"""
from __future__ import annotations

import operator
import os
import zipfile
from typing import Any, Iterable, Mapping, Optional, Sequence

from .errors import Med3DError

MAX_VOXELS = 2 ** 31             # one volume (read, resampled, or a network input): 8 GiB as float32
MAX_CLASSES = 256                # network output classes (labels are 1..255 plus background)
MAX_CHANNELS = 4096              # any head's channel count
MAX_LIST = 64                    # lengths of head parameter lists (dilations, channels)
MAX_CUBE = 256                   # nodule cube side, voxels
MAX_INPUT_SIDE = 1024            # a coarse stage's fixed input size per axis, voxels
SPACING_RANGE_MM = (0.05, 100.0)  # a model's voxel spacing, nodule cube spacing
TEMPERATURE_RANGE = (0.01, 100.0)  # a classifier's probability temperature (fitting stays within 0.05..20)
MAX_YAML_NODES = 1_000_000       # a config after alias expansion
MAX_METADATA_NODES = 1_000_000   # a bundle's metadata (dicts, lists, values), shared references counted each time
MAX_STRING = 1 << 20             # one metadata string
ARCHIVE_SLACK = 64 << 20         # a .pt zip may declare this much more than it holds (a compressed pickle)
GZIP_MAX_RATIO = 1100            # deflate cannot expand more than ~1032:1


def refuse(what: str, value: Any, limit: str, hint: str = "the file is damaged or not meant for Med3D") -> Med3DError:
    """The one-line refusal of a size beyond a limit."""
    return Med3DError(f"{what} is {_shown(value)}, beyond Med3D's limit ({limit}); {hint}")


def whole_number(value: Any, what: str, low: int, high: int) -> int:
    """``value`` as an int in ``low..high`` (bools, floats and strings are refused)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number_ = operator.index(value)  # int and numpy integers
    except TypeError:
        number_ = None
    if number_ is None or not low <= number_ <= high:
        raise Med3DError(f"{what} must be a whole number from {low} to {high}, got {_shown(value)}")
    return int(number_)


def number(value: Any, what: str, low: float, high: float) -> float:
    """``value`` as a finite float in ``low..high`` (bools and strings are refused)."""
    out = None
    if not isinstance(value, (bool, str, bytes)) and value is not None:
        try:
            out = float(value)
        except (TypeError, ValueError):
            out = None
    if out is None or not low <= out <= high:  # NaN fails this too
        raise Med3DError(f"{what} must be a number from {low:g} to {high:g}, got {_shown(value)}")
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def voxels(shape: Sequence[int], what: str, hint: str = "") -> int:
    """The number of voxels of ``shape``; refused above :data:`MAX_VOXELS`."""
    count = 1
    for side in shape:
        count *= max(int(side), 0)
    if count > MAX_VOXELS:
        size = "x".join(str(int(s)) for s in shape)
        raise Med3DError(f"{what} would have {count:.3g} voxels ({size}), beyond Med3D's limit of {MAX_VOXELS:.3g}; "
                         + (hint or "the file's header is damaged or not meant for Med3D"))
    return count


def spacing(values: Iterable[Any], what: str) -> None:
    low, high = SPACING_RANGE_MM
    for value in values:
        number(value, what, low, high)


# ------------------------------------------------------------------------------------------------------ archives

def check_torch_archive(path: "os.PathLike[str]", what: str = "checkpoint") -> None:
    """Refuse a ``.pt`` zip whose members declare far more data than the file holds (a zip bomb), from its
    central directory alone. torch writes members uncompressed, so a real checkpoint declares about its size."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(str(path)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a readable zip: torch.load reports it as damaged
    declared = sum(max(int(m.file_size), 0) for m in members)
    if declared > size + ARCHIVE_SLACK or len(members) > 1_000_000:
        raise Med3DError(f"refused to load {path}: its {len(members)} zip members declare {declared / 2**30:.1f} GiB "
                         f"in a {size / 2**20:.1f} MiB file (a zip bomb or a damaged {what}); nothing was unpacked")


# ------------------------------------------------------------------------------------------------------ YAML

def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` that first counts the document with its aliases expanded and refuses more than
    :data:`MAX_YAML_NODES` nodes (an alias bomb stays a few hundred bytes on disk)."""
    import yaml

    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return None
    sizes: dict = {}
    active: set = set()

    def expanded(n: Any) -> int:
        key = id(n)
        if key in active:
            raise Med3DError(f"config {where} holds a YAML alias that refers to itself (a value containing itself); "
                             "write the value out")
        if key in sizes:
            return sizes[key]
        active.add(key)
        if isinstance(n, yaml.SequenceNode):
            total = 1 + sum(expanded(child) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            total = 1 + sum(expanded(k) + expanded(v) for k, v in n.value)
        else:
            total = 1
        active.discard(key)
        sizes[key] = min(total, MAX_YAML_NODES + 1)
        return sizes[key]

    count = expanded(node)
    if count > MAX_YAML_NODES:
        raise Med3DError(f"config {where} expands to more than {MAX_YAML_NODES:,} values through its YAML aliases "
                         "(*name references nested into each other); write the values out or use fewer aliases")
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


# ------------------------------------------------------------------------------------------------------ metadata

def check_metadata(value: Any, where: str, skip: Sequence[str] = ("state_dict",)) -> None:
    """Walk a loaded bundle's metadata (tensors and the ``skip`` keys at the top level excluded) and refuse more
    than :data:`MAX_METADATA_NODES` values, counting a shared list each time it is reached (a pickle can nest
    shared references like a YAML alias bomb), nesting deeper than 64 levels, or strings over 1 MiB."""
    import torch

    budget = [MAX_METADATA_NODES]

    def walk(item: Any, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise Med3DError(f"{where}: its metadata holds more than {MAX_METADATA_NODES:,} values (nested shared "
                             "lists?); the file is damaged or not meant for Med3D")
        if depth > 64:
            raise Med3DError(f"{where}: its metadata nests deeper than 64 levels; the file is damaged or not meant "
                             "for Med3D")
        if isinstance(item, (str, bytes)) and len(item) > MAX_STRING:
            raise Med3DError(f"{where}: a metadata string is {len(item):,} characters long; the file is damaged or "
                             "not meant for Med3D")
        if isinstance(item, Mapping):
            for key, child in item.items():
                walk(key, depth + 1)
                if not isinstance(child, torch.Tensor):
                    walk(child, depth + 1)
        elif isinstance(item, (list, tuple)):
            for child in item:
                if not isinstance(child, torch.Tensor):
                    walk(child, depth + 1)

    if isinstance(value, Mapping):
        for key, child in value.items():
            if key not in skip and not isinstance(child, torch.Tensor):
                walk(child, 1)
    else:
        walk(value, 0)


def head_parameters(head: Mapping[str, Any], where: str) -> None:
    """Bounds of the head description's sizes (class and channel counts, dilations, dropout)."""
    for key, value in head.items():
        name = f"{where} head '{key}'"
        if key == "num_classes":
            whole_number(value, name, 1, MAX_CLASSES)
        elif key in ("mid_channels", "growth"):
            whole_number(value, name, 1, MAX_CHANNELS)
        elif key in ("channels", "dilations"):
            if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or \
                    not 1 <= len(value) <= MAX_LIST:
                raise Med3DError(f"{name} must be a list of 1..{MAX_LIST} whole numbers, got {value!r}")
            for item in value:
                whole_number(item, name, 1, MAX_CHANNELS if key == "channels" else 64)
        elif key == "dropout":
            number(value, name, 0.0, 1.0)


def input_size(value: Optional[Any], where: str) -> None:
    """A coarse stage's fixed input size: None, or three whole numbers 8..:data:`MAX_INPUT_SIDE`."""
    if value is None:
        return
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or len(value) != 3:
        raise Med3DError(f"{where} must be three whole numbers (K, J, I) or null, got {value!r}")
    for side in value:
        whole_number(side, where, 8, MAX_INPUT_SIDE)
