"""Med3D preprocessing: reorientation, resampling to a per-domain spacing, CT windows, percentile clipping,
z-scoring, and the exact way back to the input's grid.

``preprocess_image`` runs the steps a :class:`PreprocessSpec` names (the spec is stored in checkpoints) and returns
a :class:`Prepared` record; ``restore_labels`` / ``restore_probabilities`` use it to put network outputs on the
input's own grid, and ``prepare_label`` brings a training mask onto the network's grid. Resampling uses SimpleITK
(multi-threaded C++); intensity steps work in float32, in place, so a big CT never gets float64 copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from . import limits
from .errors import Med3DError
from .volume import (Geometry, Orientation, Volume, as_label_map, canonical_spacing, smallest_label_dtype,
                     to_canonical)

MODALITIES = ("CT", "MR")
_CHUNK = 1 << 20  # voxels per chunk when summing squares in float64


# ----------------------------------------------------------------------------------------------------------- spec

def _numbers(value: Any, count: int, name: str) -> Tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise Med3DError(f"{name} must be {count} numbers, got {value!r}")
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise Med3DError(f"{name} must be {count} numbers, got {value!r}") from None
    if len(out) != count or not all(math.isfinite(v) for v in out):
        raise Med3DError(f"{name} must be {count} finite numbers, got {value!r}")
    return out


@dataclass
class PreprocessSpec:
    """What :func:`preprocess_image` does, in order: reorient to canonical (``canonical``), resample to
    ``spacing`` (I, J, K mm of the canonical volume; None keeps the input's), clip to the CT ``window``
    (lo, hi HU), clip to the volume's ``clip_percentiles`` (lo, hi in 0..100), z-score (``zscore``).
    ``modality`` ("CT", "MR" or None) is what the model expects, for warnings about mismatched inputs."""

    spacing: Optional[Tuple[float, float, float]] = None
    window: Optional[Tuple[float, float]] = None
    clip_percentiles: Optional[Tuple[float, float]] = (0.5, 99.5)
    zscore: bool = True
    canonical: bool = True
    modality: Optional[str] = None

    def __post_init__(self) -> None:
        if self.spacing is not None:
            self.spacing = _numbers(self.spacing, 3, "preprocessing 'spacing'")  # type: ignore[assignment]
            if min(self.spacing) <= 0:
                raise Med3DError(f"preprocessing spacing must be positive millimetres, got {self.spacing}")
        if self.window is not None:
            self.window = _numbers(self.window, 2, "preprocessing 'window'")  # type: ignore[assignment]
            if self.window[0] >= self.window[1]:
                raise Med3DError(f"preprocessing window must be (low, high) with low < high, got {self.window}")
        if self.clip_percentiles is not None:
            low, high = _numbers(self.clip_percentiles, 2, "preprocessing 'clip_percentiles'")
            self.clip_percentiles = (low, high)
            if not 0 <= low < high <= 100:
                raise Med3DError("preprocessing clip_percentiles must be (low, high) with 0 <= low < high <= 100, "
                                 f"got {self.clip_percentiles}")
        for name in ("zscore", "canonical"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise Med3DError(f"preprocessing '{name}' must be true or false, got {getattr(self, name)!r}")
            setattr(self, name, bool(getattr(self, name)))
        if self.modality is not None:
            modality = str(self.modality).upper()
            if modality not in MODALITIES:
                raise Med3DError(f"preprocessing modality must be one of {', '.join(MODALITIES)} or none, "
                                 f"got {self.modality!r}")
            self.modality = modality

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict (lists, floats, bools, None), as checkpoints record it."""
        return {"spacing": None if self.spacing is None else list(self.spacing),
                "window": None if self.window is None else list(self.window),
                "clip_percentiles": None if self.clip_percentiles is None else list(self.clip_percentiles),
                "zscore": self.zscore, "canonical": self.canonical, "modality": self.modality}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessSpec":
        """The spec a dict describes; missing keys take the defaults, unknown keys or bad values are errors."""
        if not isinstance(data, Mapping):
            raise Med3DError(f"preprocessing description must be a mapping, got {type(data).__name__}")
        known = tuple(f.name for f in fields(cls))
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise Med3DError(f"unknown preprocessing setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**dict(data))


# ------------------------------------------------------------------------------------------------------- spacing

def median_spacing(volumes_or_spacings: Iterable[Union[Volume, Geometry, Sequence[float]]]
                   ) -> Tuple[float, float, float]:
    """Per-axis median spacing (I, J, K), Med3D's per-domain target spacing.

    Volumes (or grids) count with their canonical spacing (after :func:`to_canonical`), the order
    :func:`preprocess_image` resamples in; plain triples are taken as given.
    """
    rows = []
    for item in volumes_or_spacings:
        if isinstance(item, (Volume, Geometry)):
            rows.append(canonical_spacing(item))
        else:
            rows.append(_numbers(item, 3, "a spacing (I, J, K)"))
    if not rows:
        raise Med3DError("median spacing of no volumes: give at least one volume or spacing")
    return tuple(float(v) for v in np.median(np.asarray(rows), axis=0))  # type: ignore[return-value]


def resampled_geometry(geometry: Geometry, spacing: Sequence[float]) -> Geometry:
    """The grid with ``spacing`` (I, J, K) that covers the same physical box as ``geometry``, centred on it."""
    spacing = _numbers(spacing, 3, "target spacing (I, J, K)")
    if min(spacing) <= 0:
        raise Med3DError(f"target spacing must be positive millimetres, got {spacing}")
    size_ijk = np.asarray(geometry.shape[::-1], dtype=np.float64)
    old, new = np.asarray(geometry.spacing), np.asarray(spacing)
    new_size = np.maximum(1, np.round(size_ijk * old / new))
    limits.voxels(new_size[::-1], "resampling to a spacing of " + "x".join(f"{v:g}" for v in new) + " mm",
                  "the model's spacing is far finer than the scan's (a damaged or foreign model?)")
    new_size = new_size.astype(int)
    centre = geometry.ijk_to_lps() @ np.append((size_ijk - 1) / 2, 1.0)
    origin = centre[:3] - geometry.direction @ (new * (new_size - 1) / 2)
    return Geometry(tuple(int(s) for s in new_size[::-1]), spacing, tuple(origin), geometry.direction.copy())


def _resample(volume: Volume, target: Geometry, is_label: bool, fill: Optional[float]) -> np.ndarray:
    """Voxels of ``volume`` on the ``target`` grid (world space). ``fill`` None extrapolates the nearest voxel,
    for grids that cover the same box; labels use nearest neighbour and keep their dtype, images come back
    float32 from linear interpolation."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in target.shape[::-1]])
    resampler.SetOutputSpacing(target.spacing)
    resampler.SetOutputOrigin(target.origin)
    resampler.SetOutputDirection(tuple(target.direction.ravel()))
    image = volume.to_sitk()
    if is_label:
        resampler.SetInterpolator(sitk.sitkNearestNeighbor)
        resampler.SetOutputPixelType(image.GetPixelID())
    else:
        resampler.SetInterpolator(sitk.sitkLinear)
        resampler.SetOutputPixelType(sitk.sitkFloat32)
    if fill is None:
        resampler.SetUseNearestNeighborExtrapolator(True)
    else:
        resampler.SetDefaultPixelValue(float(fill))
    return sitk.GetArrayFromImage(resampler.Execute(image))


def resample_volume(volume: Volume, spacing: Sequence[float], is_label: bool = False) -> Volume:
    """Resample to ``spacing`` (I, J, K mm) over the same physical box: images linearly (float32 out), label
    maps by nearest neighbour (same dtype, no new label values)."""
    target = resampled_geometry(volume.geometry, spacing)
    return Volume(_resample(volume, target, is_label, None), target.spacing, target.origin, target.direction)


def resample_to_reference(volume: Volume, reference: Union[Volume, Geometry], is_label: bool = False,
                          fill: Optional[float] = None) -> Volume:
    """Resample in world space onto another volume's grid. Voxels outside ``volume`` get ``fill`` (default 0 for
    label maps, the volume's minimum for images)."""
    target = reference.geometry if isinstance(reference, Volume) else reference
    if fill is None:
        fill = 0.0 if is_label or volume.array.size == 0 else float(volume.array.min())
    return Volume(_resample(volume, target, is_label, fill), target.spacing, target.origin, target.direction.copy())


# ----------------------------------------------------------------------------------------------------- intensity

def _float32_copy(array: np.ndarray) -> np.ndarray:
    return np.array(array, dtype=np.float32, copy=True)


def _window_(a: np.ndarray, low: float, high: float) -> None:
    np.clip(a, low, high, out=a)


def _clip_percentiles_(a: np.ndarray, low: float, high: float) -> None:
    if a.size:
        lo, hi = np.percentile(a, [low, high])
        np.clip(a, lo, hi, out=a)


def _mean_std(a: np.ndarray) -> Tuple[float, float]:
    flat = a.reshape(-1)
    mean = float(np.add.reduce(flat, dtype=np.float64)) / max(flat.size, 1)
    squares = 0.0
    for start in range(0, flat.size, _CHUNK):  # float64 only a chunk at a time
        chunk = flat[start:start + _CHUNK].astype(np.float64) - mean
        squares += float(np.dot(chunk, chunk))
    return mean, math.sqrt(squares / max(flat.size, 1))


def _zscore_(a: np.ndarray) -> None:
    mean, std = _mean_std(a)
    if not std > 1e-12 * max(1.0, abs(mean)):
        a[...] = 0.0  # a constant volume carries no contrast; zeros, not NaN
        return
    a -= np.float32(mean)
    a *= np.float32(1.0 / std)


def apply_window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip intensities to a window (e.g. CT liver -200..250 HU); float32 copy."""
    low, high = _numbers((low, high), 2, "window (low, high)")
    if low >= high:
        raise Med3DError(f"window must be (low, high) with low < high, got ({low}, {high})")
    out = _float32_copy(array)
    _window_(out, low, high)
    return out


def clip_percentiles(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to this array's ``low`` and ``high`` percentiles (Med3D: 0.5 and 99.5); float32 copy."""
    low, high = _numbers((low, high), 2, "percentiles (low, high)")
    if not 0 <= low < high <= 100:
        raise Med3DError(f"percentiles must satisfy 0 <= low < high <= 100, got ({low}, {high})")
    out = _float32_copy(array)
    _clip_percentiles_(out, low, high)
    return out


def zscore(array: np.ndarray) -> np.ndarray:
    """Subtract the mean and divide by the standard deviation of this array; a constant array gives zeros."""
    out = _float32_copy(array)
    _zscore_(out)
    return out


# ----------------------------------------------------------------------------------------------- crop and pad

@dataclass
class Box:
    """A box of voxels in (K, J, I) index space: ``start`` (may be negative or past the end) and ``size``."""

    start: Tuple[int, int, int]
    size: Tuple[int, int, int]

    @property
    def stop(self) -> Tuple[int, int, int]:
        return tuple(s + n for s, n in zip(self.start, self.size))  # type: ignore[return-value]


def _overlap(box: Box, full_shape: Sequence[int]) -> Tuple[Tuple[slice, ...], Tuple[slice, ...]]:
    """Slices of the part of ``box`` inside an array of ``full_shape``: (in the full array, in the box)."""
    full, inner = [], []
    for start, size, n in zip(box.start, box.size, full_shape):
        lo, hi = max(start, 0), min(start + size, n)
        hi = max(hi, lo)
        full.append(slice(lo, hi))
        inner.append(slice(lo - start, hi - start))
    return tuple(full), tuple(inner)


def crop_or_pad(array: np.ndarray, shape: Sequence[int], center: Optional[Sequence[float]] = None,
                pad_value: float = 0) -> Tuple[np.ndarray, Box]:
    """Cut a ``shape`` (K, J, I) window from the last three axes, centred on ``center`` (voxel index K, J, I;
    default the array's centre), padding with ``pad_value`` where it reaches outside. Returns the window and
    its :class:`Box` for :func:`uncrop`."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise Med3DError(f"crop shape must be three positive sizes (K, J, I), got {shape}")
    if array.ndim < 3:
        raise Med3DError(f"crop_or_pad needs an array with at least 3 axes, got shape {array.shape}")
    full_shape = array.shape[-3:]
    if center is None:
        start = tuple((n - s) // 2 for n, s in zip(full_shape, shape))
    else:
        centre = _numbers(center, 3, "crop center (K, J, I)")
        start = tuple(int(math.floor(c + 0.5)) - s // 2 for c, s in zip(centre, shape))
    box = Box(start, shape)  # type: ignore[arg-type]
    lead = array.shape[:-3]
    out = np.full(lead + shape, pad_value, dtype=array.dtype)
    full, inner = _overlap(box, full_shape)
    out[(Ellipsis,) + inner] = array[(Ellipsis,) + full]
    return out, box


def uncrop(array: np.ndarray, box: Box, full_shape: Sequence[int], fill: float = 0) -> np.ndarray:
    """Put a window from :func:`crop_or_pad` back into an array of ``full_shape`` (K, J, I) filled with ``fill``."""
    full_shape = tuple(int(s) for s in full_shape)
    if tuple(array.shape[-3:]) != tuple(box.size):
        raise Med3DError(f"array of shape {array.shape} does not match the crop box size {box.size}")
    lead = array.shape[:-3]
    out = np.full(lead + full_shape, fill, dtype=array.dtype)
    full, inner = _overlap(box, full_shape)
    out[(Ellipsis,) + full] = array[(Ellipsis,) + inner]
    return out


# ------------------------------------------------------------------------------------------------------ pipeline

@dataclass
class Prepared:
    """What :func:`preprocess_image` did to one volume, enough to go back exactly.

    ``orientation.original`` is the input's grid, ``canonical`` the grid after reorientation and ``grid`` the
    grid of the preprocessed array (after resampling).
    """

    spec: PreprocessSpec
    orientation: Orientation
    canonical: Geometry
    grid: Geometry
    stats: Dict[str, float] = field(default_factory=dict)

    @property
    def original(self) -> Geometry:
        return self.orientation.original

    @property
    def resampled(self) -> bool:
        return not self.grid.same_as(self.canonical, atol=0.0)


def _orient(volume: Volume, canonical: bool) -> Tuple[Volume, Orientation]:
    if canonical:
        return to_canonical(volume)
    return volume, Orientation((0, 1, 2), (False, False, False), volume.geometry)


def preprocess_image(volume: Volume, spec: PreprocessSpec) -> Tuple[np.ndarray, Prepared]:
    """Run ``spec`` on an image: canonical reorientation -> resample to ``spec.spacing`` -> window -> percentile
    clip -> z-score. Returns the float32 array (K, J, I) and the :class:`Prepared` record for the way back."""
    if volume.array.dtype.kind not in "iuf":
        raise Med3DError(f"image has voxel type {volume.array.dtype}; give a grey-value image (integers or floats)")
    oriented, orientation = _orient(volume, spec.canonical)
    canonical = oriented.geometry
    if spec.spacing is not None and not np.allclose(canonical.spacing, spec.spacing, rtol=1e-6, atol=0):
        grid = resampled_geometry(canonical, spec.spacing)
        data = _resample(oriented, grid, is_label=False, fill=None)
    else:
        grid = canonical
        data = _float32_copy(oriented.array)
    if volume.array.dtype.kind == "f" and not math.isfinite(float(np.add.reduce(data.reshape(-1), dtype=np.float64))):
        raise Med3DError("image contains NaN or infinite values; fix or re-export the image")
    if spec.window is not None:
        _window_(data, *spec.window)
    if spec.clip_percentiles is not None:
        _clip_percentiles_(data, *spec.clip_percentiles)
    stats: Dict[str, float] = {}
    if spec.zscore:
        stats["mean"], stats["std"] = _mean_std(data)
        _zscore_(data)
    return data, Prepared(spec, orientation, canonical, grid, stats)


def prepare_label(mask: Volume, prepared: Prepared) -> np.ndarray:
    """Bring a training mask through the geometric steps of :func:`preprocess_image` (reorient, nearest-neighbour
    resample; no intensity steps). The mask must lie on its image's grid."""
    if not mask.same_geometry(prepared.original, atol=1e-3):
        raise Med3DError(f"mask geometry differs from its image: mask {mask.geometry.describe()}, image "
                         f"{prepared.original.describe()}; resample the mask onto the image "
                         "(resample_to_reference) or fix its header")
    labels = as_label_map(mask)
    oriented = prepared.orientation.forward(labels.array)
    if not prepared.resampled:
        return oriented
    c = prepared.canonical
    return _resample(Volume(oriented, c.spacing, c.origin, c.direction), prepared.grid, is_label=True, fill=None)


def _check_grid_shape(array: np.ndarray, prepared: Prepared, what: str, lead: int) -> None:
    expected = tuple(prepared.grid.shape)
    if array.ndim != 3 + lead or tuple(array.shape[lead:]) != expected:
        layout = "(C, K, J, I)" if lead else "(K, J, I)"
        raise Med3DError(f"{what} of shape {array.shape} do not match the preprocessed grid {expected}; "
                         f"expected {layout} for the same volume")


def restore_labels(labels: np.ndarray, prepared: Prepared) -> Volume:
    """A label map (K, J, I) on the preprocessed grid, back on the input's grid: exactly the input's size,
    spacing, origin and direction (nearest neighbour), in the smallest integer dtype Slicer accepts."""
    labels = np.asarray(labels)
    _check_grid_shape(labels, prepared, "labels", 0)
    if labels.dtype.kind not in "biu":
        raise Med3DError(f"labels must be integers (e.g. an argmax), got {labels.dtype}")
    labels = labels.astype(smallest_label_dtype(labels), copy=False)
    if prepared.resampled:
        g = prepared.grid
        labels = _resample(Volume(labels, g.spacing, g.origin, g.direction), prepared.canonical, True, None)
    original = prepared.original
    return Volume(prepared.orientation.inverse(labels), original.spacing, original.origin, original.direction.copy())


def restore_probabilities(probs: np.ndarray, prepared: Prepared) -> np.ndarray:
    """Class probabilities (C, K, J, I) on the preprocessed grid, back on the input's grid (linear), float32."""
    probs = np.asarray(probs, dtype=np.float32)
    _check_grid_shape(probs, prepared, "probabilities", 1)
    if prepared.resampled:
        g = prepared.grid
        probs = np.stack([_resample(Volume(p, g.spacing, g.origin, g.direction), prepared.canonical, False, None)
                          for p in probs])
    return prepared.orientation.inverse(probs)


RESTORE_SLICES = 8  # output slices per chunk when more than two class maps are restored (memory: C x chunk)


def _argmax_uint(probs: np.ndarray) -> np.ndarray:
    index = np.argmax(probs, axis=0)
    return index.astype(np.uint8 if probs.shape[0] <= 256 else np.uint16)


def restore_class_map(probs: np.ndarray, prepared: Prepared) -> np.ndarray:
    """The argmax over classes of :func:`restore_probabilities` (class indices, uint8, on the input's grid)
    without its full-resolution float map per class.

    Linear interpolation commutes with differences, so for two classes only ``p1 - p0`` is resampled and its
    sign taken (class 1 where ``p1 > p0``, as argmax decides ties for class 0); with more classes the input's
    grid is restored in chunks of :data:`RESTORE_SLICES` slices, each class resampled onto the chunk alone and
    reduced to its argmax. Without resampling the argmax is taken on the grid and reoriented (no interpolation).
    """
    probs = np.asarray(probs, dtype=np.float32)
    _check_grid_shape(probs, prepared, "probabilities", 1)
    if probs.shape[0] < 2 or not prepared.resampled:
        return prepared.orientation.inverse(_argmax_uint(probs) if probs.shape[0] >= 2
                                            else np.zeros(probs.shape[1:], np.uint8))
    g, c = prepared.grid, prepared.canonical
    if probs.shape[0] == 2:
        difference = np.subtract(probs[1], probs[0])
        restored = _resample(Volume(difference, g.spacing, g.origin, g.direction), c, False, None)
        return prepared.orientation.inverse(np.greater(restored, 0).view(np.uint8))
    sources = [Volume(p, g.spacing, g.origin, g.direction) for p in probs]
    out = np.empty(c.shape, dtype=np.uint8 if probs.shape[0] <= 256 else np.uint16)
    to_lps = c.ijk_to_lps()
    for k0 in range(0, c.shape[0], RESTORE_SLICES):
        k1 = min(k0 + RESTORE_SLICES, c.shape[0])
        origin = tuple((to_lps @ np.array([0.0, 0.0, k0, 1.0]))[:3])
        chunk = Geometry((k1 - k0,) + tuple(c.shape[1:]), c.spacing, origin, c.direction)
        out[k0:k1] = _argmax_uint(np.stack([_resample(src, chunk, False, None) for src in sources]))
    return prepared.orientation.inverse(out)


# ------------------------------------------------------------------------------------------------------ warnings

def check_intensity_range(array: np.ndarray, modality: Optional[str]) -> Optional[str]:
    """A warning when intensities do not look like ``modality`` ("CT" in HU, "MR"), else None; e.g. an MR given
    to a model trained on CT windows has no air near -1000 HU."""
    if modality is None:
        return None
    modality = str(modality).upper()
    if modality not in MODALITIES:
        raise Med3DError(f"modality must be one of {', '.join(MODALITIES)} or none, got {modality!r}")
    array = np.asarray(array)
    if array.size == 0:
        return None
    sample = array[::2, ::2, ::2] if array.ndim == 3 else array  # plenty of voxels, a fraction of the time
    low = float(sample.min())
    air = float(np.count_nonzero(sample < -500)) / sample.size
    if modality == "CT" and low > -500:
        return (f"the image has no values below -500 (minimum {low:.0f}), so no air: it does not look like a CT "
                "in Hounsfield units (an MR, or a CT already rescaled?); a CT model's results will be unreliable")
    if modality == "MR" and air > 0.05:
        return (f"{air:.0%} of the image is below -500, like air in a CT in Hounsfield units; an MR model's "
                "results on a CT will be unreliable")
    return None
