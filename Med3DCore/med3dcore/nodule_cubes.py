"""Prepared nodule cubes of a classification table: the network inputs (and, for the auxiliary mask loss, the
masks on the same cubes) of every case, kept in a cache keyed by the source files and the input spec so that a
second run on the same table does not read 823 crops again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import Med3DError
from .nodules import NoduleCase, NoduleInputSpec, prepare_nodule, prepare_nodule_mask
from .progress import Reporter, make_event, null_reporter
from .safe_io import os_reason
from .training_data import save_npy_atomically, source_stamp
from .volume_files import read_volume


def prepare_cases(cases: Sequence[NoduleCase], spec: NoduleInputSpec,
                  reporter: Optional[Reporter] = None, kind: str = "image") -> np.ndarray:
    """Prepared cubes (N, 1, D, H, W) of a classification table's cases (mask, ROI or whole crop each); with
    ``kind="mask"`` their masks on the same cubes (:func:`~med3dcore.nodules.prepare_nodule_mask`; every case
    needs a mask)."""
    reporter = reporter or null_reporter
    cubes = np.zeros((len(cases), 1, spec.cube, spec.cube, spec.cube), np.float32)
    for n, case in enumerate(cases):
        image = read_volume(case.image)
        if kind == "mask":
            cubes[n] = prepare_nodule_mask(image, read_volume(case.mask), spec)
        elif case.mask:
            cubes[n] = prepare_nodule(image, mask=read_volume(case.mask), params=spec)
        elif case.roi:
            cubes[n] = prepare_nodule(image, center_lps=case.roi[:3], size_mm=case.roi[3:], params=spec)
        else:
            cubes[n] = prepare_nodule(image, params=spec)
        reporter(make_event("prepare", n + 1, len(cases)))
    return cubes


CUBE_CACHE_VERSION = 1


def cube_cache_path(cases: Sequence[NoduleCase], spec: NoduleInputSpec, cache_dir: Path,
                    kind: str = "image") -> Path:
    """Where the prepared cubes (or mask cubes) of these cases live in ``cache_dir``: keyed by every source file
    (path, size, mtime), mask, ROI and the input spec, so any change prepares them afresh."""
    payload = {"version": CUBE_CACHE_VERSION, "spec": spec.to_dict(),
               **({"kind": kind} if kind != "image" else {}),  # image keys as before: old caches stay valid
               "cases": [[source_stamp(Path(c.image)), source_stamp(Path(c.mask)) if c.mask else None,
                          list(c.roi) if c.roi else None] for c in cases]}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"nodule_cubes-{key}.npy"


def load_cached_cubes(cases: Sequence[NoduleCase], spec: NoduleInputSpec, cache_dir: Path,
                      kind: str = "image") -> Optional[np.ndarray]:
    """The cubes :func:`store_cubes` kept for exactly these cases and spec, else None (also for a damaged entry,
    which is then prepared and stored again). Writes nothing."""
    path = cube_cache_path(cases, spec, cache_dir, kind)
    if not path.is_file():
        return None
    try:
        cubes = np.load(path)
    except (OSError, ValueError):
        return None
    return cubes if cubes.shape == (len(cases), 1, spec.cube, spec.cube, spec.cube) and cubes.dtype == np.float32 \
        else None


def store_cubes(cases: Sequence[NoduleCase], spec: NoduleInputSpec, cache_dir: Path, cubes: np.ndarray,
                kind: str = "image") -> None:
    """Keep prepared cubes for the next run on the same table (through the one write path)."""
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Med3DError(f"cannot create the cube cache folder {cache_dir}: {os_reason(exc)}") from None
    save_npy_atomically(cube_cache_path(cases, spec, cache_dir, kind), cubes)


def cached_cubes(cases: Sequence[NoduleCase], spec: NoduleInputSpec, cache_dir: Path,
                 reporter: Optional[Reporter] = None, kind: str = "image") -> np.ndarray:
    """:func:`prepare_cases` once per table, spec and kind: later runs load the cubes from the cache (the 823 LIDC
    cubes take ~10 s to prepare, a third of a short run)."""
    cubes = load_cached_cubes(cases, spec, cache_dir, kind)
    if cubes is None:
        cubes = prepare_cases(cases, spec, reporter, kind)
        store_cubes(cases, spec, cache_dir, cubes, kind)
    return cubes
