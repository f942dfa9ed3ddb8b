"""Nodule inputs for classification: one fixed, isotropic, world-aligned cube around a nodule.

Nodule crops come in mixed spacing and orientation, and at inference the nodule may sit in a whole CT marked by
an ROI or a mask. :func:`prepare_nodule` handles all of these the same way: it samples a cube of ``cube``^3 voxels
at ``spacing_mm`` on a grid aligned with the LPS axes (array order (K, J, I) = (S, P, L)), so reorientation,
isotropic resampling and the pad/crop happen in one trilinear interpolation. Only the *visible box*
(:func:`nodule_box`) is shown and the cube is centred on it: the ROI box, or the mask's bounding box plus
``context_mm``, always within the scan; everything else reads as air. That keeps a tight training crop and the same
nodule in a whole CT looking alike, provided the context is no wider than the crops had: fine-tuning measures it
per axis (:func:`trained_context`; the LIDC crops carry none along z).
Intensities are clipped to the CT ``window`` (HU) and scaled to [-1, 1].

:func:`read_nodule_table` reads a classification CSV (image, optional mask or ROI, label, optional patient id).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from . import limits
from .domains import read_csv_rows
from .errors import Med3DError
from .volume import Volume

CLASS_NAMES = ("benign", "malignant")


@dataclass
class NoduleInputSpec:
    """What :func:`prepare_nodule` needs; stored in classification bundles as ``extra["nodule_input"]``."""

    cube: int = 32                               # voxels per side
    spacing_mm: float = 1.0                      # isotropic output spacing
    window: Tuple[float, float] = (-1000.0, 400.0)  # HU clipped to this range, then scaled to [-1, 1]
    # Margin around a mask's bounding box that stays visible: one number for every side, or (x, y, z) LPS mm.
    context_mm: Union[float, Tuple[float, float, float]] = 8.0

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["window"] = [float(v) for v in self.window]
        if not isinstance(self.context_mm, (int, float)):
            out["context_mm"] = [float(v) for v in self.context_mm]
        return out

    def context_text(self) -> str:
        """The context around a mask per axis, for people: ``x, y, z = 8, 8, 0 mm``."""
        context = self.context_mm if isinstance(self.context_mm, tuple) else (self.context_mm,) * 3
        return "x, y, z = " + ", ".join(f"{float(v):g}" for v in context) + " mm"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NoduleInputSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise Med3DError(f"unknown nodule input parameter(s) {sorted(unknown)}; known: {sorted(known)}")
        spec = cls(**dict(data))
        # Bounded here (limits.py): a stranger's bundle must not ask for a 4096^3 cube or a 0.001 mm grid.
        spec.cube = limits.whole_number(spec.cube, "the nodule input cube", 8, limits.MAX_CUBE)
        spec.spacing_mm = limits.number(spec.spacing_mm, "the nodule input spacing (mm)", *limits.SPACING_RANGE_MM)
        context = spec.context_mm
        if isinstance(context, (list, tuple)) and len(context) == 3:
            spec.context_mm = tuple(limits.number(v, "the nodule context margin (mm)", 0.0, 1000.0) for v in context)
        elif isinstance(context, (list, tuple)):
            raise Med3DError(f"the nodule context margin must be one number or three (x, y, z mm), got {context!r}")
        else:
            spec.context_mm = limits.number(context, "the nodule context margin (mm)", 0.0, 1000.0)
        window = spec.window
        if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
            raise Med3DError(f"the nodule input window must be two numbers (low, high HU), got {window!r}")
        spec.window = (limits.number(window[0], "the nodule window", -1e6, 1e6),
                       limits.number(window[1], "the nodule window", -1e6, 1e6))
        if spec.window[1] <= spec.window[0]:
            raise Med3DError(f"invalid nodule input window {spec.window}: its upper bound must be above its lower one")
        return spec


def _spec(params: Union[NoduleInputSpec, Mapping[str, Any], None]) -> NoduleInputSpec:
    if params is None:
        return NoduleInputSpec()
    if isinstance(params, NoduleInputSpec):
        return params
    return NoduleInputSpec.from_dict(params)


def _index_to_world(volume: Volume, ijk: np.ndarray) -> np.ndarray:
    """(N, 3) continuous (i, j, k) indices -> (N, 3) LPS points."""
    matrix = volume.ijk_to_lps()
    return ijk @ matrix[:3, :3].T + matrix[:3, 3]


def _half_voxel_extent(volume: Volume) -> np.ndarray:
    """How far a voxel reaches from its centre along each LPS axis (mm)."""
    direction = np.abs(np.asarray(volume.direction, float).reshape(3, 3))
    return direction @ (np.asarray(volume.spacing, float) / 2.0)


def scan_box(volume: Volume) -> Tuple[np.ndarray, np.ndarray]:
    """The scan's extent in LPS mm (voxel edges included), as (low corner, high corner)."""
    size = np.array(volume.array.shape[::-1], float)  # (I, J, K)
    corners = np.array([[a, b, c] for a in (0, size[0] - 1) for b in (0, size[1] - 1) for c in (0, size[2] - 1)])
    world = _index_to_world(volume, corners)
    half = _half_voxel_extent(volume)
    return world.min(axis=0) - half, world.max(axis=0) + half


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in values) + ")"


def mask_box(image: Volume, mask: Union[Volume, np.ndarray],
             context_mm: Union[float, Sequence[float]] = 0.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroid, low corner, high corner) in LPS mm of a mask's non-zero voxels (voxel edges included), the box
    grown by ``context_mm`` (one number, or x, y, z); the mask must lie on the image's grid."""
    if isinstance(mask, np.ndarray):
        if mask.shape != image.array.shape:
            raise Med3DError(f"the mask's shape {mask.shape} differs from the image's {image.array.shape}; "
                             f"give a mask on the image's voxel grid")
        values = mask
    else:
        if not image.same_geometry(mask, atol=1e-3):
            raise Med3DError(
                f"the mask's geometry differs from the image's (size {mask.array.shape[::-1]} vs "
                f"{image.array.shape[::-1]}, spacing {_fmt(mask.spacing)} vs {_fmt(image.spacing)}, origin "
                f"{_fmt(mask.origin)} vs {_fmt(image.origin)}); resample the mask onto the image's grid first")
        values = mask.array
    kji = np.argwhere(np.asarray(values) > 0)
    if len(kji) == 0:
        raise Med3DError("the mask has no voxels (all zero); draw the nodule in the mask or give an ROI instead")
    world = _index_to_world(image, kji[:, ::-1].astype(float))
    half = _half_voxel_extent(image) + np.asarray(context_mm, dtype=float)
    return world.mean(axis=0), world.min(axis=0) - half, world.max(axis=0) + half


def nodule_box(volume: Volume, *, center_lps: Optional[Sequence[float]] = None,
               size_mm: Optional[Sequence[float]] = None, mask: Union[Volume, np.ndarray, None] = None,
               params: Union[NoduleInputSpec, Mapping[str, Any], None] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The box (low corner, high corner; LPS mm) the network is shown for a nodule: the ROI box, or the mask's
    bounding box plus ``context_mm``, or the whole scan; always within the scan and within the cube, which is
    centred on this box. Giving the returned box back as an ROI (centre = its middle, size = its extent) shows the
    network exactly the same input."""
    spec = _spec(params)
    low_scan, high_scan = scan_box(volume)
    if mask is not None and center_lps is not None:
        raise Med3DError("give either a mask or an ROI (centre and size), not both")
    if mask is not None:
        _, low, high = mask_box(volume, mask, spec.context_mm)
    elif center_lps is not None:
        centre = np.asarray(center_lps, float).reshape(-1)
        if centre.shape != (3,) or not np.all(np.isfinite(centre)):
            raise Med3DError(f"the ROI centre must be three finite numbers (x, y, z in LPS mm), got {center_lps}")
        if np.any(centre < low_scan) or np.any(centre > high_scan):
            raise Med3DError(
                f"the ROI centre {_fmt(centre)} mm lies outside the scan, which spans {_fmt(low_scan)} to "
                f"{_fmt(high_scan)} mm (LPS); give LPS coordinates (Slicer shows RAS: negate x and y)")
        if size_mm is None:  # no size: the whole cube around the centre
            size = np.full(3, spec.cube * float(spec.spacing_mm))
        else:
            size = np.asarray(size_mm, float).reshape(-1)
            if size.shape != (3,) or not np.all(np.isfinite(size)) or not np.all(size > 0):
                raise Med3DError(f"the ROI size must be three positive numbers in mm, got {size_mm}")
        low, high = centre - size / 2.0, centre + size / 2.0
    else:
        low, high = low_scan, high_scan
    low, high = np.maximum(low, low_scan), np.minimum(high, high_scan)
    # The cube is centred on the visible box; clipping the box to the cube keeps that centre.
    centre, reach = (low + high) / 2.0, spec.cube * float(spec.spacing_mm) / 2.0
    return np.maximum(low, centre - reach), np.minimum(high, centre + reach)


def prepare_nodule(volume: Volume, *, center_lps: Optional[Sequence[float]] = None,
                   size_mm: Optional[Sequence[float]] = None, mask: Union[Volume, np.ndarray, None] = None,
                   params: Union[NoduleInputSpec, Mapping[str, Any], None] = None) -> np.ndarray:
    """The network input (1, D, H, W) float32 for one nodule: a cube centred on :func:`nodule_box`'s box, which
    alone is visible (the rest reads as air).

    - ``mask`` (a label map on the image's grid, non-zero = nodule): the mask's bounding box plus ``context_mm``.
    - ``center_lps`` (+ optional ``size_mm``, both LPS mm): an axis-aligned ROI box; without a size the whole
      cube around the centre.
    - neither: the whole image is the nodule crop.
    """
    spec = _spec(params)
    array = np.asarray(volume.array)
    if array.dtype.kind == "f" and not math.isfinite(float(np.add.reduce(array.reshape(-1), dtype=np.float64))):
        raise Med3DError("the scan contains NaN or infinite voxels, so no probability computed from it would mean "
                         "anything; fix or re-export the scan")
    low, high = nodule_box(volume, center_lps=center_lps, size_mm=size_mm, mask=mask, params=spec)
    lo_w, hi_w = spec.window
    cube = np.clip(_sample_cube(volume, array, low, high, spec, fill=lo_w), lo_w, hi_w)
    cube = (cube - (lo_w + hi_w) / 2.0) / ((hi_w - lo_w) / 2.0)
    return cube[None].astype(np.float32)


def cube_points(low: np.ndarray, high: np.ndarray, spec: NoduleInputSpec) -> np.ndarray:
    """LPS centres (N, 3) of the cube's voxels, in (K, J, I) order: axis-aligned in LPS, centred on the box,
    index (i, j, k) -> centre + (index - (n-1)/2) * spacing."""
    centre = (np.asarray(low, float) + np.asarray(high, float)) / 2.0
    n, step = spec.cube, float(spec.spacing_mm)
    offsets = (np.arange(n) - (n - 1) / 2.0) * step
    zz, yy, xx = np.meshgrid(centre[2] + offsets, centre[1] + offsets, centre[0] + offsets, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1)


def visible_in_cube(low: np.ndarray, high: np.ndarray,
                    params: Union[NoduleInputSpec, Mapping[str, Any], None] = None) -> np.ndarray:
    """Which voxels (D, H, W) of the cube shown for the box (``low``, ``high``; LPS mm) lie inside the box; the
    others read as air (:func:`prepare_nodule`)."""
    spec = _spec(params)
    points = cube_points(low, high, spec)
    return np.all((points >= low) & (points <= high), axis=1).reshape((spec.cube,) * 3)


def _sample_cube(volume: Volume, array: np.ndarray, low: np.ndarray, high: np.ndarray, spec: NoduleInputSpec,
                 fill: float) -> np.ndarray:
    """``array`` (on ``volume``'s grid) linearly sampled on the cube centred on the box (low, high); points outside
    the box or the scan read ``fill``."""
    n = spec.cube
    points = cube_points(low, high, spec)
    visible = np.all((points >= low) & (points <= high), axis=1)
    ijk = volume.lps_to_ijk(points)
    shape_ijk = np.array(array.shape[::-1])
    inside = visible & np.all((ijk >= -0.5) & (ijk <= shape_ijk - 0.5), axis=1)
    values = np.full(len(points), fill, dtype=np.float32)
    if inside.any():
        # Interpolate from the bounding sub-block only, so a whole CT is not converted to float.
        coords = np.clip(ijk[inside], 0, shape_ijk - 1)
        first = np.floor(coords.min(axis=0)).astype(int)
        last = np.minimum(np.ceil(coords.max(axis=0)).astype(int), shape_ijk - 1)
        block = np.asarray(array[first[2]:last[2] + 1, first[1]:last[1] + 1, first[0]:last[0] + 1], dtype=np.float32)
        local = (coords - first)[:, ::-1].T  # (k, j, i) rows for map_coordinates
        values[inside] = ndimage.map_coordinates(block, local, order=1, mode="nearest")
    return values.reshape(n, n, n)


def prepare_nodule_mask(volume: Volume, mask: Union[Volume, np.ndarray],
                        params: Union[NoduleInputSpec, Mapping[str, Any], None] = None) -> np.ndarray:
    """The nodule mask on the cube :func:`prepare_nodule` gives for ``mask`` (1, D, H, W) float32: the fraction of
    each output voxel inside the nodule (linear interpolation), 0 outside the visible box. Training targets for the
    auxiliary mask loss of classification fine-tuning."""
    spec = _spec(params)
    low, high = nodule_box(volume, mask=mask, params=spec)
    labels = np.asarray(mask.array if isinstance(mask, Volume) else mask)
    return _sample_cube(volume, labels != 0, low, high, spec, fill=0.0)[None]


@dataclass
class NoduleCase:
    """One row of a classification table; paths are absolute, ``roi`` is (cx, cy, cz, sx, sy, sz) LPS mm."""

    image: str
    label: int
    mask: Optional[str] = None
    roi: Optional[Tuple[float, ...]] = None
    patient: str = ""


def label_from_row(row: Mapping[str, str], line: int) -> int:
    """0 = benign, 1 = malignant from a ``label`` column (benign/malignant/0/1) or a LIDC ``malignancy`` rating
    (1-3 benign, 4-5 malignant, as the Med3D paper merges them)."""
    text = (row.get("label") or "").strip().lower()
    if text in ("benign", "0"):
        return 0
    if text in ("malignant", "1"):
        return 1
    rating = (row.get("malignancy") or "").strip()
    if not text and rating:
        try:
            value = int(float(rating))
        except ValueError:
            value = 0
        if 1 <= value <= 5:
            return int(value >= 4)
    raise Med3DError(f"line {line}: label {row.get('label')!r} is not benign/malignant/0/1 (and no malignancy "
                     f"rating 1-5 to merge); fix the CSV")


def read_nodule_table(csv_path: str) -> List[NoduleCase]:
    """Read a classification CSV: columns ``image``, ``label`` (or ``malignancy``), optional ``mask``, optional
    ``roi`` ("cx,cy,cz,sx,sy,sz", LPS mm) and optional ``patient_id`` (for grouped splits; default: the image).
    Relative paths are relative to the CSV's folder."""
    if not os.path.isfile(csv_path):
        raise Med3DError(f"classification table {csv_path} does not exist")
    folder = os.path.dirname(os.path.abspath(csv_path))
    rows = read_csv_rows(csv_path)
    columns = set(rows[0]) if rows else set()
    if rows and ("image" not in columns or not ({"label", "malignancy"} & columns)):
        raise Med3DError(f"{csv_path} needs an 'image' column and a 'label' (or 'malignancy') column; it has "
                         f"{sorted(columns)}")
    cases = []
    for line, row in enumerate(rows, start=2):
        if not (row.get("image") or "").strip():
            raise Med3DError(f"{csv_path} line {line}: the row names no image; fill it in or remove the row")
        image = os.path.join(folder, row["image"].strip())
        if not os.path.exists(image):
            raise Med3DError(f"{csv_path} line {line}: image {image} does not exist")
        mask = (row.get("mask") or "").strip() or None
        if mask is not None:
            mask = os.path.join(folder, mask)
            if not os.path.exists(mask):
                raise Med3DError(f"{csv_path} line {line}: mask {mask} does not exist")
        roi = parse_roi(row["roi"]) if (row.get("roi") or "").strip() else None
        patient = (row.get("patient_id") or "").strip() or image
        cases.append(NoduleCase(image=image, label=label_from_row(row, line), mask=mask, roi=roi,
                                patient=patient))
    if not cases:
        raise Med3DError(f"{csv_path} has no rows")
    return cases


def parse_roi(text: str) -> Tuple[float, ...]:
    """"CX,CY,CZ,SX,SY,SZ" (LPS mm; centre then size) -> six floats."""
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 6 or not all(np.isfinite(values)) or min(values[3:]) <= 0:
        raise Med3DError(f"ROI {text!r} must be six numbers CX,CY,CZ,SX,SY,SZ: centre and positive size in LPS mm")
    return values


def trained_context(cases: Sequence[NoduleCase], spec: NoduleInputSpec) -> NoduleInputSpec:
    """``spec`` with its context narrowed, axis by axis, to what the training crops show around their masks.

    A crop cut tight to its nodule shows no context beyond its edges (LIDC crops: about 10 mm in-plane and none
    along z), so a network trained on it has never seen the context that ``context_mm`` would show around the same
    nodule in a whole CT, and answers differently there. Per LPS axis the median over ``cases`` of the narrower of
    the two margins between the mask's box and the image's edge caps ``context_mm``. Crops with room on every axis,
    a spec whose context is already per axis, or cases without masks (an ROI is shown as drawn) leave ``spec``
    as it is.
    """
    from .volume_files import read_volume

    if not isinstance(spec.context_mm, (int, float)) or not cases or any(c.mask is None for c in cases):
        return spec
    margins = []
    for case in cases:
        mask = read_volume(case.mask)
        try:
            _, low, high = mask_box(mask, np.asarray(mask.array))
        except Med3DError as exc:
            raise Med3DError(f"{case.mask}: {exc}") from None
        low_scan, high_scan = scan_box(mask)
        margins.append(np.minimum(low - low_scan, high_scan - high))
    median = np.floor(np.median(np.maximum(margins, 0.0), axis=0) * 10.0) / 10.0  # 0.1 mm steps, never wider
    context = tuple(float(min(spec.context_mm, m)) for m in median)
    return spec if min(context) >= spec.context_mm else dataclasses.replace(spec, context_mm=context)
