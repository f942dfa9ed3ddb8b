"""Device selection: ``auto`` picks CUDA, then Apple MPS, then CPU."""
from __future__ import annotations

import torch

from .errors import Med3DError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a user's device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) into a usable device.

    Asking for a device that is not there is a :class:`Med3DError` that says why, never a silent fallback.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "gpu":
        name = "cuda"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support (a CPU-only build is installed)"
                   if torch.version.cuda is None else "no CUDA GPU is visible to PyTorch (driver missing or "
                   "CUDA_VISIBLE_DEVICES hides it)")
            raise Med3DError(f"device '{name}' was asked for, but {why}; use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise Med3DError(f"device '{name}' was asked for, but only {torch.cuda.device_count()} CUDA "
                             f"device(s) exist (cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return dev
    if name == "mps":
        if not _mps_available():
            raise Med3DError("device 'mps' was asked for, but Apple MPS is not available here; use cpu or auto")
        return torch.device("mps")
    raise Med3DError(f"unknown device '{name}'; choose one of: {', '.join(DEVICE_CHOICES)} (or cuda:N)")


def describe_device(device: torch.device) -> str:
    """A short human description, e.g. ``cuda:0 (NVIDIA H100)`` or ``cpu (2 threads)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
