"""The models folder as the panel lists it: each file's header (task, labels), read without torch and cached by
modification time, so switching tasks or re-entering the module reads nothing again.

A ``torch.save`` file is a zip archive whose ``data.pkl`` holds the object with each tensor replaced by a
reference to a separate storage entry. Only ``data.pkl`` is read here, with an unpickler that knows a handful
of names (tensors and storages become placeholders, their data is never read) and refuses every other name,
so a file from a stranger cannot run code and a 100 MB model costs a few kilobytes. Loading the weights,
with the engine's full checks, happens in the background process that uses the model.
"""
from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

MODEL_SUFFIXES = (".pt", ".pth", ".ckpt")  # as med3dcore.checkpoint_files.MODEL_SUFFIXES
BUNDLE_FORMAT = "med3d-bundle"             # as med3dcore.checkpoint_files.BUNDLE_FORMAT


def models_folder() -> str:
    """Where models live: the engine's ``med3dcore.catalog.models_dir`` (torch-free), ``$MED3D_MODELS``, else
    ``~/.med3d/models``."""
    from med3dcore.catalog import models_dir

    return str(models_dir())


class ModelEntry(NamedTuple):
    """One file of the models folder. ``kind``: "bundle" (a Med3D model), "weights" (a checkpoint with a
    state dict, e.g. a MedicalNet backbone: only a starting point for fine-tuning) or "" with ``error``."""
    path: str
    name: str
    kind: str
    task: Dict[str, Any]
    labels: List[Dict[str, Any]]
    error: Optional[str] = None


class _Placeholder:
    """Stands for a tensor or storage whose data is not read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): lambda text, encoding="latin1": text.encode(encoding),  # bytes in protocol 2
}
_TENSOR_BUILDERS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")


class _HeaderUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch._utils" and name in _TENSOR_BUILDERS:
            return _Placeholder
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            return _Placeholder
        raise pickle.UnpicklingError(f"refused to load '{module}.{name}'")

    def persistent_load(self, pid: Any) -> Any:
        return _Placeholder()


def read_header(path: str) -> ModelEntry:
    """What ``path`` holds, from its pickle alone; never raises (problems become ``error``)."""
    name = os.path.splitext(os.path.basename(path))[0]

    def failed(why: str) -> ModelEntry:
        return ModelEntry(path, name, "", {}, [], why)

    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pickles:
                return failed("not a PyTorch checkpoint (no data.pkl in the archive)")
            data = archive.read(pickles[0])
    except (OSError, zipfile.BadZipFile):
        return failed("not a readable PyTorch checkpoint of the current format (a zip archive)")
    try:
        import io

        content = _HeaderUnpickler(io.BytesIO(data)).load()
    except Exception as error:  # any malformed or foreign pickle: describe, never fail the panel
        return failed(f"cannot be read safely: {error}")
    if not isinstance(content, dict):
        return failed("not a Med3D model (the file holds no dictionary)")
    if content.get("format") == BUNDLE_FORMAT:
        task, labels = content.get("task"), content.get("labels")
        if not isinstance(task, dict) or not isinstance(labels, list):
            return failed("a damaged Med3D model (task or labels missing)")
        labels = [dict(label) for label in labels if isinstance(label, dict)]
        return ModelEntry(path, name, "bundle", dict(task), labels)
    if "state_dict" in content or all(isinstance(v, _Placeholder) for v in content.values()):
        return ModelEntry(path, name, "weights", {}, [], None)
    return failed("not a Med3D model")


class ModelCatalog:
    """The entries of a models folder; a file is read again only when its size or modification time changes."""

    def __init__(self) -> None:
        self._cache: Dict[str, Tuple[Tuple[int, int], ModelEntry]] = {}
        self.reads = 0  # files read so far (for the tests)

    def entries(self, folder: str) -> List[ModelEntry]:
        if not os.path.isdir(folder):
            return []
        found = []
        for item in sorted(os.scandir(folder), key=lambda e: e.name):
            if not item.is_file() or not item.name.lower().endswith(MODEL_SUFFIXES):
                continue
            stat = item.stat()
            key = (stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get(item.path)
            if cached is None or cached[0] != key:
                self.reads += 1
                cached = (key, read_header(item.path))
                self._cache[item.path] = cached
            found.append(cached[1])
        return found


def add_model_file(path: str, folder: str) -> str:
    """Copy a Med3D model into ``folder`` after checking its header; an existing file is never replaced."""
    import shutil

    from med3dcore.errors import Med3DError

    entry = read_header(path)
    if entry.kind != "bundle":
        raise Med3DError(f"{path} is not a Med3D model ({entry.error or 'a weights file'}); add a .pt file saved "
                         "by Med3D fine-tuning")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, os.path.basename(path))
    if os.path.abspath(target) != os.path.abspath(path):
        if os.path.exists(target):
            raise Med3DError(f"a model file named {os.path.basename(path)} is already in {folder}; rename the new "
                             "file first")
        shutil.copyfile(path, target)
    return target
