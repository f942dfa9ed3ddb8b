"""Device choice: auto falls back to CPU here; asking for a missing GPU is a clear error, not a fallback."""
from __future__ import annotations

import pytest
import torch

from med3dcore.devices import describe_device, resolve_device
from med3dcore.errors import Med3DError


def test_auto_and_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("CPU").type == "cpu"
    assert describe_device(torch.device("cpu")).startswith("cpu (")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the error path needs none")
@pytest.mark.parametrize("name", ["cuda", "gpu", "cuda:1"])
def test_missing_cuda_is_a_clear_error(name: str) -> None:
    with pytest.raises(Med3DError, match=r"was asked for, but .*use --device cpu or auto"):
        resolve_device(name)


def test_unknown_device_lists_choices() -> None:
    with pytest.raises(Med3DError, match="unknown device 'tpu'; choose one of: auto, cpu, cuda, mps"):
        resolve_device("tpu")
