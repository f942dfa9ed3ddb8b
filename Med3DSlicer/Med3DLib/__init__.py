"""Slicer glue for the Med3D module, in modules named for what they do (see DEVELOPERS.md): ``runner`` and
``jobs`` (background engine processes), ``inference`` (starting them from the scene and loading results),
``scene`` and ``training_export`` (Slicer nodes <-> engine volumes and files), ``installer``/``dependencies``
(packages), ``model_catalog``/``models`` (model lists), ``catalog_download`` (published encoders' Download), ``device_probe`` (device list), ``binding`` (parameter
node <-> panel), ``panel`` (what the panel shows), and Slicer-free maths: ``geometry``, ``roi``, ``segments``,
``progress_reader``, ``finetune_job``. Slicer is imported inside functions only, so all of it is tested with
plain pytest and the Slicer double.

Importing this package makes the engine importable when the module runs from a source checkout: an installed
extension carries ``med3dcore`` next to ``Med3D.py``, a checkout has it in ``../Med3DCore``; Slicer puts only
the module's own folder on ``sys.path`` when it loads ``Med3D.py`` at start-up.
"""
from __future__ import annotations

import importlib.util
import os
import sys


def _engine_on_path() -> None:
    if importlib.util.find_spec("med3dcore") is not None:
        return
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "Med3DCore")
    if os.path.isfile(os.path.join(source, "med3dcore", "__init__.py")) and source not in sys.path:
        sys.path.append(source)


_engine_on_path()
