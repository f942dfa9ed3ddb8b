"""`med3d --help` and argument errors answer at once: the parser imports no torch (or other heavy modules)."""
from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "SimpleITK", "nibabel", "skimage", "scipy", "PIL", "tqdm")
PROBE = """
import sys
from med3dcore.cli import main
try:
    code = main({argv!r})
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY", heavy, "CODE", code)
"""


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["segment"], 2),                                   # missing arguments
    (["finetune", "--task", "kidney", "--out", "x"], 2),  # a bad choice
    (["models", "list"], 0),                              # the catalog is read without torch
    (["models", "--help"], 0),
])
def test_parser_imports_nothing_heavy(argv, code, tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True,
                         text=True, env={"MED3D_MODELS": str(tmp_path), "PATH": ""}, timeout=60)
    assert f"HEAVY [] CODE {code}" in out.stdout, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
