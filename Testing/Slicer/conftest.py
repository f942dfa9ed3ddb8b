"""Fixtures for the Slicer module's tests: ``Med3DSlicer`` on ``sys.path`` and the Slicer double."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "Med3DSlicer"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))


@pytest.fixture()
def slicer_double():
    """A fresh Slicer double installed as ``slicer``; yields (slicer module, freshly imported Med3D module)."""
    import slicer_double as double

    slicer = double.install()
    try:
        sys.modules.pop("Med3D", None)
        med3d = importlib.import_module("Med3D")
        yield slicer, med3d
    finally:
        double.uninstall()
