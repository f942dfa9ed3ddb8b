"""Slicer glue that needs no Slicer: node geometry, ROI boxes, segment naming, the progress-line reader,
the background-process runner and dependency checks. Everything here is tested by plain pytest; the thin
Slicer-facing code lives in ``Med3D.py``."""
from __future__ import annotations
