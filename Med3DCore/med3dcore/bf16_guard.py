"""Training in bf16 on CPUs whose oneDNN bf16 convolutions get weight gradients wrong over thin feature maps.

On an AMD Zen 5 CPU (AVX512_BF16, no AMX) with torch 2.13, a 3D convolution under bf16 autocast whose input map is
one to three voxels thin on some side gets a weight gradient unrelated to float32's (uninitialised memory), while
maps of four voxels and more are right (:func:`med3dcore.devices.cpu_bf16_gradients_ok`). Deep ResNet layers reach
such maps on small training patches (8x16x16 liver patches: layer1 onwards). Rather than train everything in float32
there (1.5-1.8x slower), :class:`ThinMapsInFloat32` runs just those convolutions in float32.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .devices import cpu_bf16_gradients_ok

THIN = 3  # voxels: a map this thin or thinner on any side runs in float32 (4 and more were right)
_CONVOLUTIONS = (F.conv3d, torch.conv3d, F.conv_transpose3d, torch.conv_transpose3d)


class ThinMapsInFloat32(TorchFunctionMode):
    """Inside CPU bf16 autocast: 3D convolutions (and transposed ones) whose input is at most :data:`THIN` voxels
    on some spatial side run in float32, autocast off; every other call is left as it is. Outside autocast it
    changes nothing."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONVOLUTIONS and torch.is_autocast_enabled("cpu") and min(args[0].shape[2:]) <= THIN:
            wide = lambda a: a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
            with torch.autocast("cpu", enabled=False):
                return func(*[wide(a) for a in args], **{k: wide(v) for k, v in kwargs.items()})
        return func(*args, **kwargs)


def needs_thin_map_guard(device: torch.device, amp_dtype: Optional[torch.dtype]) -> bool:
    """Whether bf16 training on ``device`` needs :class:`ThinMapsInFloat32`: a CPU whose bf16 gradients over
    two-voxel maps fail the check."""
    return device.type == "cpu" and amp_dtype == torch.bfloat16 and not cpu_bf16_gradients_ok(depth=2)


def thin_map_guard(device: torch.device, amp_dtype: Optional[torch.dtype]) -> ContextManager[Any]:
    """:class:`ThinMapsInFloat32` where :func:`needs_thin_map_guard`, else a context that does nothing. A new one
    per use (a mode is entered once at a time)."""
    return ThinMapsInFloat32() if needs_thin_map_guard(device, amp_dtype) else contextlib.nullcontext()
