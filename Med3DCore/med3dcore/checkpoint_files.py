"""Checkpoint files: the kinds Med3D understands, safe loading, atomic saving, and the weights inside any of them.

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

import contextlib
import os
import pickletools
import re
import signal
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import torch

from . import limits
from .errors import Med3DError
from .safe_io import regular_file, write_atomically

PathLike = Union[str, "os.PathLike[str]"]

BUNDLE_FORMAT = "med3d-bundle"
MODEL_SUFFIXES = (".pt", ".pth", ".ckpt")
TRAINING_FORMAT = "med3d-train-checkpoint"  # as train.CHECKPOINT_FORMAT (+ "-best" for best.pt)


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

    A failure at any point (a full disk, a kill) leaves an existing file at ``path`` untouched and nothing
    temporary behind. Ctrl-C during the write is acted on once the file is published (:func:`ctrl_c_deferred`).
    ``overwrite=False`` publishes only if ``path`` does not exist, even if another process creates it meanwhile; a
    symbolic link at ``path`` is never written through.
    """
    def write(staged: Path) -> None:
        with open(staged, "wb") as fh:
            torch.save(obj, fh)

    def verify(staged: Path) -> None:
        with zipfile.ZipFile(str(staged)) as archive:  # the directory sits at the end: a cut file has none
            if not archive.namelist():
                raise Med3DError("the written archive is empty")

    with ctrl_c_deferred():
        return write_atomically(path, write, overwrite=overwrite, verify=verify, what=what)


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt. torch.save writes through Python
    file callbacks; an interrupt raised inside one reaches its C++ zip writer as a failed write ("unexpected pos")
    and would be reported as a disk error instead of an interruption. Main thread only (where signals arrive)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        yield  # no signals here, or Ctrl-C ignored by whoever started us (nohup, a background job): leave it so
        return
    received: List[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def refuse_overwrite(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file unless ``overwrite`` (checked before any work that would write it)."""
    if path.exists() and not overwrite:
        raise Med3DError(f"{path} already exists; choose another name or allow overwriting (--overwrite; overwrite=True from Python)")


def file_weights(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
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
