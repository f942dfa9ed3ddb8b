"""``python -m med3dcore.cli``: the ``med3d`` command without the console script (e.g. in Slicer's Python)."""
from __future__ import annotations

import sys

from . import main

sys.exit(main())
