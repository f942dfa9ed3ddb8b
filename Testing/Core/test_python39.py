"""The engine and the Slicer module run on Python 3.9 (Slicer 5.8): no newer syntax or stdlib anywhere."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for folder in ("Med3DCore", "Med3DSlicer", "Testing") for p in (ROOT / folder).rglob("*.py"))


def test_sources_found() -> None:
    assert any(p.name == "volume.py" for p in SOURCES), "Med3DCore sources not found"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_parses_as_python39(path: Path) -> None:
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def test_vermin_finds_nothing_newer_than_39() -> None:
    # The console script beside this interpreter (the venv's, also when the venv is not activated), else PATH's.
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install vermin); the ast check above still ran")
    targets = [str(ROOT / "Med3DCore" / "med3dcore"), str(ROOT / "Med3DSlicer")]
    result = subprocess.run([vermin, "-t=3.9-", "--violations", "--no-tips", "-q",
                             *[t for t in targets if Path(t).exists()]],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"vermin found Python > 3.9 features:\n{result.stdout}{result.stderr}"
