"""Device selection: ``auto`` picks CUDA, then Apple MPS, then CPU."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional, Set

from .errors import Med3DError

if TYPE_CHECKING:  # torch is imported where a device is resolved: `med3d --help` must not wait for it
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
# Inference precisions (see sliding.make_predictor and resolve_precision); here so the command line lists them
# without torch.
PRECISIONS = ("auto", "fp32", "bf16", "amp")
# Mixed precision of training steps (TrainConfig.amp, devices.training_autocast).
AMP_MODES = ("auto", "off", "bf16", "fp16")


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a user's device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) into a usable device.

    Asking for a device that is not there is a :class:`Med3DError` that says why, never a silent fallback.
    """
    import torch

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
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def _cpu_flags() -> Set[str]:
    """The CPU feature flags the kernel reports (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16_support() -> Optional[str]:
    """How this CPU computes bfloat16 natively -- ``"AMX"`` (AMX-BF16 tiles) or ``"AVX512_BF16"`` -- or None
    when it does not (then oneDNN emulates bf16 and it is slower than float32: 0.3x measured on an AVX-512 CPU
    without AVX512_BF16). Asks torch's CPU probes (torch >= 2.2), else the Linux CPU flags; oneDNN must be there."""
    import torch

    mkldnn = getattr(torch.backends, "mkldnn", None)
    if mkldnn is None or not mkldnn.is_available():
        return None
    cpu = getattr(torch, "cpu", None)
    amx_probe = getattr(cpu, "_is_amx_tile_supported", None)
    avx_probe = getattr(cpu, "_is_avx512_bf16_supported", None)
    if amx_probe is not None and avx_probe is not None:
        try:
            amx, avx = bool(amx_probe()), bool(avx_probe())
        except RuntimeError:
            amx = avx = False
    else:
        flags = _cpu_flags()
        amx, avx = "amx_bf16" in flags, "avx512_bf16" in flags
    return "AMX" if amx else "AVX512_BF16" if avx else None


@functools.lru_cache(maxsize=4)
def cpu_bf16_gradients_ok(depth: int = 2) -> bool:
    """Whether this CPU's bf16 convolutions give right weight gradients over a feature map ``depth`` voxels deep,
    where oneDNN has been seen to get them wrong at depth 2: a 3x3x3 convolution. On an AMD Zen 5 CPU (AVX512_BF16,
    no AMX) with torch 2.13 those gradients are unrelated to float32's (relative error about 1, sometimes 1e35 or
    NaN, and different on every call: uninitialised memory) over maps two voxels deep, and for other kernels and
    strides over maps of one or three (a 1x1x1 map at stride 2, the 7x7x7 stem on 3x6x6), never from four on, while
    forward passes and input gradients are right everywhere; deep layers on small training patches reach such maps.
    Checked once per process and depth against float32 (a few ms)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, int(depth), 8, 8, generator=generator)
    weight = (torch.randn(32, 32, 3, 3, 3, generator=generator) * 0.05).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = torch.nn.functional.conv3d(x, weight, padding=1)
    (low_grad,) = torch.autograd.grad(low.float().square().mean(), weight)
    (ref_grad,) = torch.autograd.grad(torch.nn.functional.conv3d(x, weight, padding=1).square().mean(), weight)
    error = float((low_grad - ref_grad).abs().max() / ref_grad.abs().max())
    return bool(error < 0.05)  # bf16 rounding gives about 0.01; NaN compares False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision inference runs in on ``device``: ``auto`` is ``amp`` (float16 autocast) on CUDA, ``bf16`` on
    a CPU with native bfloat16 (:func:`cpu_bf16_support`), ``fp32`` elsewhere (CPUs without it, Apple MPS).

    float16 is never used off CUDA: ``amp`` on a CPU is refused (PyTorch runs float16 3D convolutions there
    in its slow reference kernels, seconds per convolution), as is any name not in :data:`PRECISIONS`."""
    name = str(precision).strip().lower()
    if name not in PRECISIONS:
        raise Med3DError(f"unknown precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda":
            return "amp"
        return "bf16" if device.type == "cpu" and cpu_bf16_support() else "fp32"
    if name == "amp" and device.type != "cuda":
        raise Med3DError(f"precision 'amp' (float16 autocast) needs a CUDA device; on {device.type} float16 "
                         "convolutions are very slow: use bf16 (fast on CPUs with AVX512_BF16 or AMX) or fp32")
    return name


def training_autocast(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a training step (``TrainConfig.amp``): ``auto`` is bf16 on CUDA where supported, else
    float16; bf16 on a CPU with native bfloat16 (:func:`cpu_bf16_support`: segmentation steps 1.9x faster, the same
    leave-one-out lung Dice and cross-validated nodule AUC as float32, Testing/benchmarks/RESULTS.md) whose bf16
    weight gradients over maps four voxels deep pass :func:`cpu_bf16_gradients_ok` (thinner maps, where some CPUs
    fail, are trained in float32 by :class:`~med3dcore.bf16_guard.ThinMapsInFloat32`); float32 on other CPUs
    (emulated bf16 is slower there).
    ``bf16`` on any device, as asked; ``fp16`` only on CUDA (PyTorch's reference kernels on a CPU take minutes per
    step); ``off`` none."""
    import torch

    if amp not in AMP_MODES:
        raise Med3DError(f"amp '{amp}' unknown; choose {', '.join(AMP_MODES)}")
    if amp == "fp16" and device.type != "cuda":
        raise Med3DError("amp 'fp16' needs a CUDA device; on a CPU use bf16 (fast with AVX512_BF16 or AMX) or off")
    if amp == "off":
        return None
    if amp == "auto" and device.type != "cuda":
        native = device.type == "cpu" and cpu_bf16_support() and cpu_bf16_gradients_ok(depth=4)
        return torch.bfloat16 if native else None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def describe_precision(precision: str, device: torch.device) -> str:
    """One line for the user: the precision in effect and why, e.g. ``bf16 (this CPU has AMX)``."""
    if precision == "bf16" and device.type == "cpu":
        native = cpu_bf16_support()
        return f"bf16 (this CPU has {native})" if native else "bf16 (emulated: this CPU has no native bfloat16; " \
                                                             "fp32 is faster here)"
    if precision == "amp":
        return "amp (float16 autocast on CUDA)"
    return precision
