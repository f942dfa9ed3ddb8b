"""A box ROI (centre, side lengths, axis directions; RAS, millimetres) as a voxel box of a volume and as the
LPS centre/size that ``med3dcore.infer.classify`` takes.

A Slicer ROI may be rotated relative to the volume's grid. The voxel box is the smallest index box that holds
every voxel centre inside the ROI's corners' bounding box in IJK space, so nothing the user framed is lost.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np

from med3dcore.errors import Med3DError

from .geometry import LPS_TO_RAS, ras_to_ijk

VoxelBox = Tuple[Tuple[int, int, int], Tuple[int, int, int]]  # (start IJK inclusive, stop IJK exclusive)


def _axes(axes_ras: Optional[Any]) -> np.ndarray:
    if axes_ras is None:
        return np.eye(3)
    axes = np.asarray(axes_ras, dtype=float).reshape(3, 3)
    norms = np.linalg.norm(axes, axis=0)
    if np.any(norms <= 1e-12):
        raise Med3DError("the ROI has an axis of zero length; recreate the ROI (Markups module) and try again")
    return axes / norms


def roi_corners_ras(center_ras: Sequence[float], size_mm: Sequence[float],
                    axes_ras: Optional[Any] = None) -> np.ndarray:
    """The 8 corners (8, 3) of a box ROI; ``axes_ras`` columns are the ROI's X, Y, Z directions in RAS."""
    center = np.asarray(center_ras, dtype=float).reshape(3)
    size = np.asarray(size_mm, dtype=float).reshape(3)
    axes = _axes(axes_ras)
    signs = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    return center + (signs * size) @ axes.T


def check_roi_size(size_mm: Sequence[float]) -> None:
    size = np.asarray(size_mm, dtype=float).reshape(3)
    if not np.all(np.isfinite(size)) or np.any(size <= 0):
        raise Med3DError(f"the ROI has size {tuple(round(float(s), 2) for s in size)} mm; every side must be "
                         "larger than zero: drag the ROI's handles to frame the nodule")


def roi_to_voxel_box(center_ras: Sequence[float], size_mm: Sequence[float], axes_ras: Optional[Any],
                     ijk_to_ras: Any, shape_kji: Sequence[int]) -> VoxelBox:
    """The voxel box (start, stop) in IJK, clipped to the volume, of a ROI.

    Raises :class:`Med3DError` when the ROI is empty or lies outside the volume.
    """
    check_roi_size(size_mm)
    corners = ras_to_ijk(ijk_to_ras, roi_corners_ras(center_ras, size_mm, axes_ras))
    low, high = corners.min(axis=0), corners.max(axis=0)
    dims = np.array(shape_kji[::-1], dtype=int)  # (I, J, K) sizes
    # Voxel centres sit at integer indices; keep those inside [low, high] (tolerance for round-off).
    start = np.maximum(np.ceil(low - 1e-6).astype(int), 0)
    stop = np.minimum(np.floor(high + 1e-6).astype(int) + 1, dims)
    if np.any(stop <= start):
        raise Med3DError("the ROI does not contain any voxel of the volume (it lies outside the volume or is "
                         "thinner than one voxel); place it on the nodule in the selected volume")
    return tuple(int(v) for v in start), tuple(int(v) for v in stop)


def roi_to_lps(center_ras: Sequence[float], size_mm: Sequence[float],
               axes_ras: Optional[Any] = None) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
    """LPS centre and size (mm, along L, P, S) for ``infer.classify(roi=...)``.

    A rotated ROI becomes the axis-aligned box that holds it, so the engine's crop covers all of it.
    """
    check_roi_size(size_mm)
    corners = roi_corners_ras(center_ras, size_mm, axes_ras)
    extent = corners.max(axis=0) - corners.min(axis=0)  # sign-free, so the same in RAS and LPS
    center_lps = LPS_TO_RAS @ np.asarray(center_ras, dtype=float).reshape(3)
    return (tuple(float(v) for v in center_lps), tuple(float(v) for v in extent))
