"""A 3D image with its physical geometry: :class:`Volume`, its voxel grid :class:`Geometry`, label maps, and exact
reorientation to and from the canonical (closest to LPS) layout.

Conventions (see DESIGN.md): ``array`` is (K, J, I) = (slice, row, column), as SimpleITK's ``GetArrayFromImage``
gives it; ``spacing`` and ``origin`` are in (I, J, K) order, ITK's LPS world (mm); ``direction[:, c]`` is the LPS
direction of image axis c. Reading and writing files: :mod:`med3dcore.volume_files`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Tuple, Union

import numpy as np
import SimpleITK as sitk

from .errors import Med3DError

# Integer dtypes Slicer accepts (updateVolumeFromArray rejects int64), smallest first.
_LABEL_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32)


def _vector3(value, name: str) -> Tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise Med3DError(f"volume {name} must be three numbers (I, J, K), got {value!r}") from None
    if len(out) != 3 or not all(np.isfinite(out)):
        raise Med3DError(f"volume {name} must be three finite numbers (I, J, K), got {value!r}")
    return out  # type: ignore[return-value]


# Direction cosines from DICOM carry about six decimals; a sheared grid is off by far more.
_ORTHONORMAL_TOLERANCE = 1e-3


def check_orthonormal(direction: np.ndarray) -> None:
    """Refuse a sheared or scaled direction matrix: every step of Med3D (reorientation, resampling, the way back
    to the input's grid) assumes a rotation, and coercing a shear to one puts the anatomy elsewhere."""
    error = np.abs(direction.T @ direction - np.eye(3)).max()
    if error > _ORTHONORMAL_TOLERANCE:
        cosines = np.clip(np.abs(direction.T @ direction)[np.triu_indices(3, 1)], 0.0, 1.0)
        worst = 90.0 - float(np.degrees(np.arccos(cosines.max())))
        raise Med3DError(f"the volume's axes are not perpendicular (sheared by {worst:.1f} degrees) or not of unit "
                         "length; Med3D needs a rectilinear grid and will not guess one: resample the scan onto a "
                         "regular grid first (e.g. Slicer's Resample Scalar Volume)")


@dataclass(eq=False)  # compare grids with same_as(atol): == on arrays is ambiguous
class Geometry:
    """The voxel grid of a volume without its voxels: shape (K, J, I), spacing, origin, direction (LPS)."""

    shape: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]
        if len(self.shape) != 3:
            raise Med3DError(f"a volume grid needs three sizes (K, J, I), got {self.shape}")
        self.spacing = _vector3(self.spacing, "spacing")
        if min(self.spacing) <= 0:
            raise Med3DError(f"volume spacing must be positive, got {self.spacing}; fix the file's header")
        self.origin = _vector3(self.origin, "origin")
        direction = np.array(self.direction, dtype=np.float64)
        if direction.shape != (3, 3):
            raise Med3DError(f"volume direction must be a 3x3 matrix, got shape {direction.shape}")
        if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
            raise Med3DError("volume direction matrix is singular or not finite; fix the file's header")
        check_orthonormal(direction)
        self.direction = direction

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix taking a homogeneous voxel index (I, J, K, 1) to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        matrix[:3, 3] = self.origin
        return matrix

    def lps_to_ijk(self, points) -> np.ndarray:
        """Continuous voxel indices (I, J, K) of LPS points, shape (N, 3) or (3,)."""
        pts = np.asarray(points, dtype=np.float64)
        scaled = self.direction * np.asarray(self.spacing)[None, :]
        return np.linalg.solve(scaled, (pts - np.asarray(self.origin)).T).T

    def same_as(self, other: "Geometry", atol: float = 1e-4) -> bool:
        """True when both grids have the same shape and, within ``atol`` (mm, or unitless for directions), the
        same spacing, origin and direction."""
        return (tuple(self.shape) == tuple(other.shape)
                and np.allclose(self.spacing, other.spacing, rtol=0, atol=atol)
                and np.allclose(self.origin, other.origin, rtol=0, atol=atol)
                and np.allclose(self.direction, other.direction, rtol=0, atol=atol))

    def describe(self) -> str:
        """A short human-readable line, for error messages."""
        size = "x".join(str(s) for s in self.shape[::-1])
        spacing = "x".join(f"{s:.4g}" for s in self.spacing)
        origin = ", ".join(f"{o:.4g}" for o in self.origin)
        return f"size {size} (I x J x K), spacing {spacing} mm, origin ({origin})"


@dataclass(eq=False)  # compare with same_geometry() and np.array_equal()
class Volume:
    """A 3D image: ``array`` (K, J, I) plus its LPS geometry; spacing/origin are (I, J, K)."""

    array: np.ndarray
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise Med3DError(
                f"Med3D works on 3D volumes, got a {self.array.ndim}D array of shape {self.array.shape}; "
                "give a single 3D image (split 4D series into 3D volumes, stack 2D slices into a series)")
        geometry = Geometry(self.array.shape, self.spacing, self.origin, self.direction)  # validates
        self.spacing, self.origin, self.direction = geometry.spacing, geometry.origin, geometry.direction

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Array shape (K, J, I)."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def geometry(self) -> Geometry:
        """The voxel grid (shape, spacing, origin, direction)."""
        return Geometry(self.array.shape, self.spacing, self.origin, self.direction)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix taking a homogeneous voxel index (I, J, K, 1) to LPS mm."""
        return self.geometry.ijk_to_lps()

    def lps_to_ijk(self, points) -> np.ndarray:
        """Continuous voxel indices (I, J, K) of LPS points, shape (N, 3) or (3,)."""
        return self.geometry.lps_to_ijk(points)

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume with the same geometry and new voxels of the same shape."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise Med3DError(f"new voxel array has shape {array.shape}, the volume has {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def same_geometry(self, other: Union["Volume", Geometry], atol: float = 1e-4) -> bool:
        """True when ``other`` lies on the same voxel grid (see :meth:`Geometry.same_as`)."""
        other_geometry = other.geometry if isinstance(other, Volume) else other
        return self.geometry.same_as(other_geometry, atol)

    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with the same voxels and geometry (bool becomes uint8, float16 float32)."""
        array = self.array
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        elif array.dtype == np.float16:
            array = array.astype(np.float32)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))  # row-major, column c = axis c
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        """A volume from a 3D scalar SimpleITK image (voxels copied)."""
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            check_scalar_3d(image, "image")  # raises the matching message
        return cls(sitk.GetArrayFromImage(image), image.GetSpacing(), image.GetOrigin(),
                   np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3))


def check_scalar_3d(image: Union[sitk.Image, sitk.ImageFileReader], what: str) -> None:
    """Refuse 2D, 4D+, vector and single-slice images (an image or a reader after ReadImageInformation)."""
    dim, shape = image.GetDimension(), image.GetSize()
    size = "x".join(str(s) for s in shape)
    components = (image.GetNumberOfComponents() if isinstance(image, sitk.ImageFileReader)
                  else image.GetNumberOfComponentsPerPixel())
    if dim == 2:
        raise Med3DError(f"{what} is a 2D image (size {size}); Med3D needs a 3D volume "
                         "(a NIfTI/NRRD/MHA volume or a DICOM series folder)")
    if dim != 3:
        raise Med3DError(f"{what} is a {dim}D image (size {size}), e.g. a time series; "
                         "extract one 3D volume first")
    if components != 1:
        raise Med3DError(f"{what} has {components} values per voxel (colour or "
                         "vector image); Med3D needs a scalar (grey-value) 3D volume")
    if min(shape) < 2:
        raise Med3DError(f"{what} is a single slice (size {size}); Med3D needs a 3D volume with at least two "
                         "voxels along every axis")


# ----------------------------------------------------------------------------------------------------- label maps

def smallest_label_dtype(array: np.ndarray) -> np.dtype:
    """The smallest integer dtype (uint8 ... int32, never int64, which Slicer rejects) that holds the values."""
    if array.size == 0:
        return np.dtype(np.uint8)
    low, high = int(array.min()), int(array.max())
    for dtype in _LABEL_DTYPES:
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    raise Med3DError(f"label values {low}..{high} do not fit in 32-bit integers; this is not a label map")


def as_label_map(volume: Volume) -> Volume:
    """The volume with integer labels in the smallest fitting dtype; float masks (e.g. float64 0/1) are accepted
    when every value is a whole non-negative number."""
    array = volume.array
    if array.dtype == np.bool_:
        return volume.with_array(array.astype(np.uint8))
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)):
            raise Med3DError("label map contains NaN or infinite values; give a mask of whole numbers (0, 1, ...)")
        if not np.array_equal(array, np.round(array)):
            raise Med3DError("label map has fractional values (e.g. probabilities or an image); give a mask of "
                             "whole numbers (0, 1, ...), or threshold it first")
    elif array.dtype.kind not in "iu":
        raise Med3DError(f"label map has voxel type {array.dtype}; give a mask of whole numbers (0, 1, ...)")
    if array.size and array.min() < 0:
        raise Med3DError(f"label map has negative values (minimum {array.min()}); this looks like an image, "
                         "not a mask of labels 0, 1, ...")
    dtype = smallest_label_dtype(array)
    return volume if array.dtype == dtype else volume.with_array(array.astype(dtype))


# ---------------------------------------------------------------------------------------------------- orientation

@dataclass
class Orientation:
    """How :func:`to_canonical` rearranged a volume, and the original grid to restore exactly.

    ``axes[w]`` is the original image axis (0=I, 1=J, 2=K) that became canonical axis ``w``; ``flips[w]`` says
    whether it was reversed. ``original`` is the input's grid, restored bit-for-bit by :func:`from_canonical`.
    """

    axes: Tuple[int, int, int]
    flips: Tuple[bool, bool, bool]
    original: Geometry

    @property
    def is_identity(self) -> bool:
        return tuple(self.axes) == (0, 1, 2) and not any(self.flips)

    @property
    def canonical_shape(self) -> Tuple[int, int, int]:
        """Array shape (K, J, I) after reorientation."""
        ijk = self.original.shape[::-1]
        return tuple(ijk[a] for a in self.axes)[::-1]  # type: ignore[return-value]

    def forward(self, array: np.ndarray) -> np.ndarray:
        """Reorient the last three (K, J, I) axes of ``array`` from the original to the canonical layout."""
        if self.is_identity:
            return array
        lead = array.ndim - 3
        # Canonical array axis (2 - w) holds original image axis axes[w], i.e. original array axis 2 - axes[w].
        order = list(range(lead)) + [lead + 2 - self.axes[2 - p] for p in range(3)]
        out = np.transpose(array, order)
        flip_axes = tuple(lead + 2 - w for w in range(3) if self.flips[w])
        if flip_axes:
            out = np.flip(out, flip_axes)
        return np.ascontiguousarray(out)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        """Undo :meth:`forward` on the last three axes of ``array``."""
        if self.is_identity:
            return array
        lead = array.ndim - 3
        flip_axes = tuple(lead + 2 - w for w in range(3) if self.flips[w])
        out = np.flip(array, flip_axes) if flip_axes else array
        order = list(range(lead)) + [lead + 2 - self.axes[2 - p] for p in range(3)]
        return np.ascontiguousarray(np.transpose(out, np.argsort(order)))

    def canonical_geometry(self) -> Geometry:
        """The grid of the reoriented volume (same voxel centres in world space, new index order)."""
        g = self.original
        size_ijk = g.shape[::-1]
        corner = [0.0, 0.0, 0.0]  # original index of the canonical voxel (0, 0, 0)
        direction = np.empty((3, 3))
        for w, (axis, flip) in enumerate(zip(self.axes, self.flips)):
            corner[axis] = float(size_ijk[axis] - 1) if flip else 0.0
            direction[:, w] = -g.direction[:, axis] if flip else g.direction[:, axis]
        origin = g.ijk_to_lps() @ np.array(corner + [1.0])
        spacing = tuple(g.spacing[a] for a in self.axes)
        return Geometry(self.canonical_shape, spacing, tuple(origin[:3]), direction)


def orientation_of(geometry: Union[Volume, Geometry]) -> Orientation:
    """The axis permutation and flips that bring a grid closest to the LPS identity direction."""
    g = geometry.geometry if isinstance(geometry, Volume) else geometry
    best_axes, best_score = (0, 1, 2), -1.0
    # Six permutations: pick the one whose axes line up best with L, P, S (robust for oblique scans).
    for perm in itertools.permutations(range(3)):
        score = sum(abs(g.direction[w, perm[w]]) for w in range(3))
        if score > best_score + 1e-9:
            best_axes, best_score = perm, score
    flips = tuple(bool(g.direction[w, best_axes[w]] < 0) for w in range(3))
    return Orientation(tuple(best_axes), flips, g)  # type: ignore[arg-type]


def to_canonical(volume: Volume) -> Tuple[Volume, Orientation]:
    """Permute and flip axes (no interpolation) so the direction is closest to identity (LPS).

    The voxels keep their world positions; :func:`from_canonical` undoes it exactly. A volume that is already
    canonical comes back as the same object (no copy).
    """
    orientation = orientation_of(volume)
    if orientation.is_identity:
        return volume, orientation
    g = orientation.canonical_geometry()
    return Volume(orientation.forward(volume.array), g.spacing, g.origin, g.direction), orientation


def from_canonical(array_or_volume: Union[np.ndarray, Volume], orientation: Orientation) -> Volume:
    """Bring a canonical-layout array (or volume) back to the original grid, geometry restored bit-for-bit."""
    array = array_or_volume.array if isinstance(array_or_volume, Volume) else np.asarray(array_or_volume)
    expected = orientation.canonical_shape
    if array.shape != tuple(expected):
        raise Med3DError(f"array of shape {array.shape} does not match the reoriented volume's shape {expected}")
    g = orientation.original
    return Volume(orientation.inverse(array), g.spacing, g.origin, g.direction.copy())


def canonical_spacing(volume: Union[Volume, Geometry]) -> Tuple[float, float, float]:
    """The spacing (I, J, K) the volume has after :func:`to_canonical` (no voxels touched)."""
    orientation = orientation_of(volume)
    return tuple(orientation.original.spacing[a] for a in orientation.axes)  # type: ignore[return-value]
