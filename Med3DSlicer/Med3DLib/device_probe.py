"""The device list of the panel, from what a background Python finds (torch is never imported in Slicer's own
process: importing it is slow, a half-installed torch can fail with a DLL error, and Slicer's process would
then hold GPU memory that a background run needs).

The probe is a few lines of Python run in ``PythonSlicer``; it prints one JSON object. The panel starts it when
it is built, after packages were installed and when it is shown again while torch was missing, so a GPU
appears without restarting Slicer; :func:`device_choices` turns the answer into the list.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

from . import runner

PROBE_CODE = r"""
import json, sys
import importlib.util
try:
    found = importlib.util.find_spec("torch") is not None
except ImportError:
    found = False
if not found:
    print(json.dumps({"torch": None}))
    sys.exit(0)
try:
    import torch
except Exception as error:
    print(json.dumps({"torch": None, "error": f"{type(error).__name__}: {error}"}))
    sys.exit(0)
mps = getattr(torch.backends, "mps", None)
print(json.dumps({
    "torch": torch.__version__,
    "cuda_build": torch.version.cuda,
    "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
    "mps": bool(mps is not None and mps.is_available()),
}))
"""

NOT_PROBED = {"torch": None, "pending": True}


def device_choices(found: Dict[str, Any]) -> Tuple[List[Tuple[str, str]], str]:
    """(title, device) items and the explanation under the list, for a probe's answer."""
    items = [("auto", "auto"), ("CPU", "cpu")]
    if found.get("pending"):
        return items, "Looking for GPUs..."
    if found.get("error"):
        return items, (f"PyTorch is installed but does not load ({found['error']}); reinstall it from the "
                       "PyTorch module, then restart Slicer")
    if not found.get("torch"):
        return items, "GPU: not known until PyTorch is installed (Apply installs it, after asking)"
    names = list(found.get("cuda") or [])
    for index, name in enumerate(names):
        items.append((f"GPU {index} ({name})", f"cuda:{index}"))
    if names:
        return items, "GPU: " + ", ".join(names) + (" (auto uses the first)" if len(names) > 1 else "")
    if found.get("mps"):
        items.append(("Apple GPU (MPS)", "mps"))
        return items, "GPU: Apple MPS (auto uses it)"
    if found.get("cuda_build") is None:
        return items, ("No GPU use possible: this PyTorch is a CPU-only build (reinstall it from the PyTorch "
                       "module to get a CUDA build)")
    return items, "No GPU visible to PyTorch (no NVIDIA GPU, or the driver is missing or too old)"


class DeviceProbe:
    """One background probe; ``poll()`` on the main thread returns the answer once it has arrived."""

    def __init__(self, python: Optional[str] = None) -> None:
        self.process = runner.BackgroundProcess([python or runner.python_executable(), "-c", PROBE_CODE],
                                                env=runner.engine_environment())
        self.result: Optional[Dict[str, Any]] = None

    def start(self) -> "DeviceProbe":
        self.process.start()
        return self

    def poll(self) -> Optional[Dict[str, Any]]:
        if self.result is None and self.process.finished():
            lines = [line for line in self.process.lines() if line.startswith("{")]
            try:
                self.result = json.loads(lines[-1])
            except (IndexError, ValueError):
                tail = self.process.stderr_tail().strip().splitlines()
                self.result = {"torch": None, "error": tail[-1] if tail else "the device check did not answer"}
        return self.result

    def cancel(self) -> None:
        self.process.cancel(grace=0.5)


def start_probe() -> Tuple[Optional[DeviceProbe], Dict[str, Any]]:
    """A started probe and the answer to show meanwhile (or no probe and why, when it cannot start)."""
    from med3dcore.errors import Med3DError

    try:
        return DeviceProbe().start(), NOT_PROBED
    except Med3DError as error:
        return None, {"torch": None, "error": str(error)}
