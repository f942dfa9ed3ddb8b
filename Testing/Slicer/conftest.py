"""Fixtures for the Slicer module's tests: ``Med3DSlicer`` on ``sys.path`` (as Slicer puts a module's folder
there) and the Slicer double in its 5.8 and 5.10 modes."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import pytest

import os

ROOT = Path(__file__).resolve().parents[2]
# MED3D_SLICER_MODULE_DIR: test another copy of the module (e.g. an older commit's, to see a test fail on it).
MODULE_DIR = Path(os.environ.get("MED3D_SLICER_MODULE_DIR") or ROOT / "Med3DSlicer")
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

SLICER_VERSIONS = ("5.8", "5.10")


def run_events(slicer, until: Callable[[], bool], timeout: float = 120.0) -> None:
    """Slicer's event loop: process events until ``until()`` holds (the GUI thread is never blocked longer
    than one slot)."""
    end = time.monotonic() + timeout
    while not until():
        if time.monotonic() > end:
            raise AssertionError(f"not done within {timeout} s")
        slicer.app.processEvents()
        time.sleep(0.02)


@pytest.fixture(params=SLICER_VERSIONS)
def slicer_double(request):
    """The Slicer double as ``slicer`` with the Med3D module loaded; yields (slicer, the Med3D module)."""
    import slicer_double as double

    slicer = double.install(request.param)
    try:
        sys.modules.pop("Med3D", None)
        loaded = double.load_module("Med3D")
        yield slicer, sys.modules[loaded.name]
    finally:
        double.uninstall()


@pytest.fixture()
def models_dir(tmp_path, monkeypatch) -> Path:
    """An empty models folder, set as $MED3D_MODELS."""
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv("MED3D_MODELS", str(folder))
    return folder


@pytest.fixture(scope="session")
def probed_devices():
    """What the real device check (a child Python importing torch) answers on this machine, asked once: each
    panel would otherwise spend seconds on it (test_slicer_fresh_install.py runs the check itself)."""
    import slicer_double as double

    try:
        from Med3DLib import device_probe
    except ImportError:  # an older module under test (MED3D_SLICER_MODULE_DIR)
        return {}
    double.install()
    try:
        probe = device_probe.DeviceProbe().start()
        probe.process.wait(120)
        return probe.poll()
    finally:
        double.uninstall()


@pytest.fixture()
def panel(slicer_double, models_dir, probed_devices, monkeypatch):
    """The Med3D panel as Slicer builds it (``setup()`` from Med3D.ui), shown, with this machine's devices;
    yields (slicer, Med3D module, widget)."""
    slicer, med3d = slicer_double
    device_probe = sys.modules.get("Med3DLib.device_probe")  # absent in an older module under test
    if device_probe is not None:
        monkeypatch.setattr(device_probe, "start_probe", lambda: (None, dict(probed_devices)))
    widget = slicer.util.getModuleWidget("Med3D")
    slicer.util.selectModule("Med3D")
    run_events(slicer, lambda: getattr(widget, "_probe", None) is None)
    yield slicer, med3d, widget
    widget.cleanup()
