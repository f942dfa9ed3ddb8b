"""Shared pytest fixtures: paths to ../shared/data and ../shared/golden (skip with a reason when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MED3D_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
GOLDEN = SHARED / "golden"

# Tests run on 2 cores beside other work: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data, the real scans; tests that need it skip when it is missing (a user's checkout)."""
    if not (DATA / "README.md").is_file():
        pytest.skip(f"real data folder {DATA} is missing (set MED3D_SHARED to the folder holding data/)")
    return DATA


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """../shared/golden, the reference MedicalNet outputs."""
    if not (GOLDEN / "medicalnet_golden.npz").is_file():
        pytest.skip(f"golden folder {GOLDEN} is missing (set MED3D_SHARED to the folder holding golden/)")
    return GOLDEN
