"""Node geometry <-> engine geometry.

A Slicer volume node describes its grid with one IJK-to-RAS 4x4 matrix (columns 0..2 = the I, J, K steps in
millimetres, column 3 = the origin, all in RAS). The engine's :class:`med3dcore.volume.Volume` uses ITK's
convention: spacing (I, J, K), origin and direction in LPS, ``direction[:, c]`` the unit vector of axis c.
RAS and LPS differ by the sign of the first two world axes, so the conversion negates the first two rows.
The voxel array is (K, J, I) on both sides, so it passes through untouched.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np

from med3dcore.errors import Med3DError

# Diagonal that maps LPS <-> RAS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

Geometry = Tuple[np.ndarray, np.ndarray, np.ndarray]  # spacing (3,), origin LPS (3,), direction LPS (3, 3)


def ijk_to_ras_matrix(spacing: Sequence[float], origin_lps: Sequence[float],
                      direction_lps: Any) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a grid given in ITK/LPS terms."""
    spacing = np.asarray(spacing, dtype=float).reshape(3)
    direction = np.asarray(direction_lps, dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(origin_lps, dtype=float).reshape(3)
    return matrix


def lps_geometry(ijk_to_ras: Any) -> Geometry:
    """Spacing, LPS origin and LPS direction (columns = I, J, K) of a 4x4 IJK-to-RAS matrix.

    Flipped, permuted and oblique grids all come out exactly; a degenerate matrix (an axis of zero length,
    or two parallel axes) is a :class:`Med3DError`.
    """
    matrix = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    steps = matrix[:3, :3]
    spacing = np.linalg.norm(steps, axis=0)
    if np.any(spacing <= 1e-12) or abs(np.linalg.det(steps)) <= 1e-12 * float(np.prod(spacing)):
        raise Med3DError("the volume's IJK-to-RAS matrix is degenerate (an axis has zero length or two axes are "
                         "parallel); fix the volume's spacing/directions in the Volumes module and try again")
    direction = LPS_TO_RAS @ (steps / spacing)
    origin = LPS_TO_RAS @ matrix[:3, 3]
    return spacing, origin, direction


def volume_from_node_data(array_kji: np.ndarray, ijk_to_ras: Any) -> Any:
    """A :class:`med3dcore.volume.Volume` from a node's (K, J, I) voxel array and its IJK-to-RAS matrix.

    The array is copied so the engine can never write into the scene's voxels.
    """
    from med3dcore.volume import Volume

    array = np.asarray(array_kji)
    if array.ndim != 3:
        raise Med3DError(f"the volume has {array.ndim} dimensions (shape {array.shape}); Med3D needs a 3D "
                         "scalar volume: pick a single-frame, single-component volume")
    spacing, origin, direction = lps_geometry(ijk_to_ras)
    return Volume(np.array(array, copy=True), tuple(spacing), tuple(origin), direction)


def node_data_from_volume(volume: Any) -> Tuple[np.ndarray, np.ndarray]:
    """The (K, J, I) array and IJK-to-RAS matrix that show an engine ``Volume`` in Slicer."""
    return np.asarray(volume.array), ijk_to_ras_matrix(volume.spacing, volume.origin, volume.direction)


def ras_to_ijk(ijk_to_ras: Any, points_ras: Any) -> np.ndarray:
    """Continuous IJK coordinates of RAS points (N, 3)."""
    matrix = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    points = np.atleast_2d(np.asarray(points_ras, dtype=float))
    homogeneous = np.c_[points, np.ones(len(points))]
    return (np.linalg.inv(matrix) @ homogeneous.T).T[:, :3]


def ijk_to_ras(ijk_to_ras_m: Any, points_ijk: Any) -> np.ndarray:
    """RAS coordinates of continuous IJK points (N, 3)."""
    matrix = np.asarray(ijk_to_ras_m, dtype=float).reshape(4, 4)
    points = np.atleast_2d(np.asarray(points_ijk, dtype=float))
    homogeneous = np.c_[points, np.ones(len(points))]
    return (matrix @ homogeneous.T).T[:, :3]


def parent_transform_error(volume_name: str, transform_name: str) -> Med3DError:
    """The refusal for a volume under a parent transform.

    Med3D reads voxels and IJK-to-RAS, which leave parent transforms out; computing on them would put the
    result in the wrong place. The scene is never modified, so hardening is left to the user.
    """
    return Med3DError(f"volume '{volume_name}' is under the transform '{transform_name}', which Med3D does not "
                      "apply; harden it first (Data module: right-click the volume > Harden transform), or "
                      "move the volume out of the transform, then run again")
