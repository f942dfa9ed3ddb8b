"""Classical lung segmentation of a CT: right and left lung from the image alone, no weights, in a few seconds.

Air inside the body is lung, airway or gas in the gut; the method keeps the lung (after Hu, Hoffman and Reinhardt
2001, IEEE TMI 20:490, with the anatomical rules a reader uses):

1. Work in the canonical orientation on a grid of about 2 mm (block means: exact volumes, less noise), so the
   heavy morphology is cheap; the boundary is refined on the full grid at the end.
2. The air/tissue threshold is the scan's own (iterative intersample selection over its histogram; padding of
   -2048/-3024 counts as air, bone as tissue).
3. Air joined to the image border within its axial slice is outside the body; the rest is inside (lungs, airways,
   bowel and stomach gas, oesophagus).
4. The trachea is the compact, midline, tracheal-sized air tube at the top of the largest air region; region
   growing with explosion control follows it into the main bronchi, which are then cut out: the two lungs fall
   apart (a thin anterior/posterior junction that still joins them is split where it is narrowest).
5. A region the airway does not reach is lung only if it has lung density: aerated parenchyma lies well above the
   density of pure air (-1000 HU), which is what gas in the gut holds. This keeps bowel and stomach gas out and
   still finds lung bases at the top of an abdominal CT.
6. Each lung's slices are filled (vessels and nodules inside the lung belong to it), sides come from the midline
   (the trachea, else the body's centre), and the label map goes back to the input's exact grid.

Labels follow Slicer's terminology: 1 right lung (SNOMED CT 3341006), 2 left lung (SNOMED CT 44029006).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from . import lung_morphology as lm
from .clean_up import bounding_box
from .errors import Med3DError
from .progress import Reporter, make_event, null_reporter
from .volume import Volume, from_canonical, to_canonical

# Colours: Slicer's "3D Slicer General Anatomy list" gives right and left lung recommendedDisplayRGBValue
# 197, 165, 145 (Slicer/Slicer Modules/Loadable/Terminologies/Resources/
# SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json, Lung 39607008 with laterality modifiers), the colour
# GenericAnatomyColors gives "right lung"/"left lung".
LUNG_COLOR = [197, 165, 145]
RIGHT_LUNG = {"value": 1, "name": "right lung", "color": LUNG_COLOR, "terminology": "SCT^3341006^Right lung"}
LEFT_LUNG = {"value": 2, "name": "left lung", "color": LUNG_COLOR, "terminology": "SCT^44029006^Left lung"}
LUNG_LABELS = [RIGHT_LUNG, LEFT_LUNG]
LUNG_WINDOW = (-1350.0, 150.0)  # the radiological lung window (level -600, width 1500), for overlays

WORK_MM = 2.0             # working grid spacing (upper bound); lungs are centimetres across, vessels millimetres
# A region the airway does not reach is lung when the median of its interior lies this far above the scan's own
# air (outside the body; scanners read it anywhere from -1024 to -975 HU). Gas in the gut is air: within about
# 50 HU of it even in small, partial-volume pockets. Aerated lung is 100-200 HU above it (healthy inspiration
# about -850 HU); severe emphysema, about -930 HU, still about 70 above.
LUNG_ABOVE_AIR_HU = 65.0
MIN_LUNG_ML = 3.0         # smaller isolated air pockets are not lung (a lung base sliver is tens of mL)
MIN_ANALYSED_ML = 0.5     # regions below this are not looked at
EXTRA_LUNG_FRACTION = 0.1  # with an airway found, a region it does not reach must be this share of the main lung
AIRWAY_MIN_ML = 50.0      # the trachea is searched in the largest air region only if it is at least this large


@dataclass
class ClassicalLungs:
    """The label map (input's grid; 1 right lung, 2 left lung), warnings, and what the method found (threshold,
    trachea, regions with their volumes and densities) for reports and benchmarks."""

    labels: Volume
    warnings: List[str] = field(default_factory=list)
    details: Dict[str, Any] = field(default_factory=dict)
    airway: Optional[Volume] = None  # trachea and main bronchi as cut out (uint8 on the input's grid), if found


def check_ct(array: np.ndarray) -> None:
    """Raise a clear Med3DError when the image is not a CT in Hounsfield units (no air below -500 HU)."""
    sample = np.asarray(array)[::2, ::2, ::2]
    low = float(sample.min()) if sample.size else 0.0
    if low > -500:
        raise Med3DError(f"the classical lung method needs a CT in Hounsfield units, but this image has no values "
                         f"below -500 (minimum {low:.0f}), so no air: is it an MR or a CT rescaled to other units? "
                         "Give a CT, or use a Med3D model trained for this kind of image (--method model --model FILE)")


def _interior_median(hu: np.ndarray, region: np.ndarray, box: Tuple[slice, ...], factors) -> float:
    """Median full-grid HU of the region's interior (eroded in-plane on the working grid, so the partial-volume
    rim does not count; the whole region when it is too thin to erode)."""
    interior = ndimage.binary_erosion(region, structure=lm.SLICE)
    if interior.sum() < 8:
        interior = region
    full_box = tuple(slice(s.start * f, min(s.stop * f, n)) for s, f, n in zip(box, factors, hu.shape))
    full = lm.upsample(interior, factors, [s.stop - s.start for s in full_box])
    values = np.clip(hu[full_box][full], lm.PADDING_FLOOR, None)
    return float(np.median(values)) if values.size else lm.AIR_HU


def _airway_split(component: np.ndarray, coarse: np.ndarray, threshold: float, midline: float,
                  spacing_kji, voxel_ml: float, details: Dict[str, Any]) -> Tuple[np.ndarray, Optional[float],
                                                                                     np.ndarray]:
    """Find the trachea in the largest air region and cut trachea and main bronchi out of it. Returns (the region
    without its airways, the trachea's left-right position or None, the airway mask)."""
    box = ndimage.find_objects(component.astype(np.uint8))[0]
    local = component[box]
    found = lm.find_trachea(local, midline - box[2].start, spacing_kji)
    airway = np.zeros_like(component)
    if found is None:
        details["trachea"] = None
        return component, None, airway
    z, seed = found
    grown, used = lm.grow_airways(coarse[box], local, z, seed, voxel_ml, threshold, spacing_kji)
    airway[box] = ndimage.binary_dilation(grown, structure=lm.FACES) & local  # the lumen's partial-volume rim
    x = float(np.nonzero(seed)[1].mean()) + box[2].start
    details["trachea"] = {"slice": int(z + box[0].start), "x": x, "airway_ml": round(float(grown.sum()) * voxel_ml, 1),
                          "growth_threshold": used}
    return component & ~airway, x, airway


def _airway_lungs(rest: np.ndarray, hu: np.ndarray, factors, voxel_ml: float, gas_limit: float) -> List[np.ndarray]:
    """The lungs among the pieces the airway cut leaves: the larger pieces (at most four) that have lung density;
    none when the 'trachea' led into gas (then it was not one)."""
    pieces, _ = ndimage.label(rest, structure=lm.FACES)
    piece_ml = np.bincount(pieces.ravel())[1:] * voxel_ml
    boxes = ndimage.find_objects(pieces)
    parts: List[np.ndarray] = []
    if not piece_ml.size:
        return parts
    for i in np.argsort(piece_ml)[::-1][:4]:
        if piece_ml[i] < max(MIN_LUNG_ML, 0.02 * piece_ml.max()):
            break
        if _interior_median(hu, pieces[boxes[i]] == i + 1, boxes[i], factors) > gas_limit:
            parts.append(pieces == i + 1)
    return parts


def _sides(parts: List[np.ndarray], midline: float, by_trachea: bool, outside: np.ndarray,
           unseen: np.ndarray, voxel_mm: float) -> List[Tuple[int, np.ndarray]]:
    """(label, mask) per lung part. A part with a fifth of itself across the midline holds both lungs and is split
    first. With the trachea as midline, the side of each part's centre of mass decides: right (1, smaller L index)
    or left (2). Without it the body's centre may be off (a field of view on one lung), so the side whose chest
    wall is nearer decides, and the body's centre only where that does not."""
    out = []
    skin = None
    for part in parts:
        cols = np.nonzero(part)[2]
        minority = min(np.mean(cols < midline), np.mean(cols >= midline))
        for piece in lm.split_two(part) if minority > 0.2 else [part]:
            side = 0
            if not by_trachea:
                skin = skin or lm.skin_distances(outside, unseen)
                side = lm.lateral_side(piece, *skin, voxel_mm=voxel_mm)
            if side == 0:
                side = -1 if np.nonzero(piece)[2].mean() < midline else 1
            out.append((1 if side < 0 else 2, piece))
    return out


def segment_lungs(volume: Volume, reporter: Optional[Reporter] = None) -> ClassicalLungs:
    """Right (1) and left (2) lung of a CT ``volume`` on exactly its grid; see the module docstring.

    A scan without lungs in view gives an empty map and a warning; an image that is not a CT in HU raises
    :class:`Med3DError`. Trachea and main bronchi are outside the lungs; vessels and nodules inside them are in.
    """
    reporter = reporter or null_reporter
    if not isinstance(volume, Volume):
        raise Med3DError(f"segment_lungs needs a Volume (see med3dcore.volume_files.read_volume), got "
                         f"{type(volume).__name__}")
    check_ct(volume.array)
    started = time.perf_counter()
    stage, total = "lung-classical", 4
    canon, orientation = to_canonical(volume)
    hu = canon.array
    factors = lm.grid_factors(canon.spacing, WORK_MM)
    spacing_kji = tuple(s * f for s, f in zip(reversed(canon.spacing), factors))
    voxel_ml = float(np.prod(spacing_kji)) / 1000.0
    coarse, padded = lm.block_mean(hu, factors)
    threshold = lm.air_threshold(coarse)
    reporter(make_event(stage, 1, total))

    air = coarse < threshold
    outside = lm.outside_air(air)
    body = ~outside
    inside = air & body
    regions, count = ndimage.label(inside, structure=lm.FACES)
    sizes = np.bincount(regions.ravel())[1:] * voxel_ml
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] >= MIN_ANALYSED_ML][:40]
    boxes = ndimage.find_objects(regions)
    air_level = lm.air_level(coarse, outside, padded)
    gas_limit = air_level + LUNG_ABOVE_AIR_HU
    details: Dict[str, Any] = {"threshold_hu": round(threshold, 1), "grid_factors": list(factors), "regions": [],
                               "trachea": None, "air_hu": round(air_level, 1)}
    reporter(make_event(stage, 2, total))

    midline = lm.body_midline(body)
    parts: List[np.ndarray] = []
    airway = np.zeros_like(air)
    trachea_x = None
    if order and sizes[order[0]] >= AIRWAY_MIN_ML:
        largest = regions == order[0] + 1
        rest, trachea_x, airway = _airway_split(largest, coarse, threshold, midline, spacing_kji, voxel_ml, details)
        if trachea_x is not None:
            parts = _airway_lungs(rest, hu, factors, voxel_ml, gas_limit)
            if parts:
                details["regions"].append({"ml": round(float(sizes[order[0]]), 1), "kind": "airway-connected",
                                           "lung_parts_ml": [round(float(p.sum()) * voxel_ml, 1) for p in parts]})
                order = order[1:]
            else:  # a tube without lung behind it (a loop of bowel): no trachea after all
                details["trachea"], trachea_x, airway = None, None, np.zeros_like(air)
    main_ml = max((float(p.sum()) * voxel_ml for p in parts), default=0.0)
    for index in order:
        box = boxes[index]
        region = regions[box] == index + 1
        median = _interior_median(hu, region, box, factors)
        ml = float(sizes[index])
        lung_like = median > gas_limit and ml >= max(MIN_LUNG_ML, EXTRA_LUNG_FRACTION * main_ml)
        details["regions"].append({"ml": round(ml, 1), "median_hu": round(median, 1),
                                   "kind": "lung" if lung_like else "not lung"})
        if lung_like:
            part = np.zeros_like(air)
            part[box] = region
            parts.append(part)
    reporter(make_event(stage, 3, total))

    if trachea_x is not None:
        midline = trachea_x
    details["midline_index"] = round(float(midline), 1)
    coarse_labels = np.zeros(air.shape, dtype=np.uint8)
    for value, part in _sides(parts, midline, trachea_x is not None, outside, padded, spacing_kji[2]):
        coarse_labels[part] = value
    labels = _refine(coarse_labels, hu, threshold, factors, airway)
    del coarse, air, outside, inside, regions
    result = from_canonical(labels, orientation)
    airway_volume = None
    if trachea_x is not None:
        airway_volume = from_canonical(lm.upsample(airway, factors, hu.shape).astype(np.uint8), orientation)
    warnings = _warnings(result.array, voxel_ml=float(np.prod(volume.spacing)) / 1000.0, details=details)
    details["seconds"] = round(time.perf_counter() - started, 2)
    for warning in warnings:
        reporter(make_event(stage, kind="message", message=f"warning: {warning}"))
    reporter(make_event(stage, 4, total))
    return ClassicalLungs(result, warnings, details, airway_volume)


def _refine(coarse_labels: np.ndarray, hu: np.ndarray, threshold: float, factors, airway: np.ndarray) -> np.ndarray:
    """Full-grid label map from the working-grid one: the interior of each lung as is, a boundary band of one
    working voxel decided by each full-grid voxel's own density (lightly smoothed), then slice-wise filling."""
    out = np.zeros(hu.shape, dtype=np.uint8)
    for value in (1, 2):  # each lung separately: filling must never bridge the mediastinum
        lung = coarse_labels == value
        if not lung.any():
            continue
        lung = lm.fill_holes_2d(lung)
        box = ndimage.find_objects(lung.astype(np.uint8))[0]
        box = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(box, lung.shape))
        full_box = tuple(slice(s.start * f, min(s.stop * f, n)) for s, f, n in zip(box, factors, hu.shape))
        shape = [s.stop - s.start for s in full_box]
        local = lung[box]
        other = (coarse_labels[box] > 0) & ~local
        core = lm.upsample(ndimage.binary_erosion(local, structure=lm.FACES), factors, shape)
        band = lm.upsample(ndimage.binary_dilation(local, structure=lm.FACES) & ~other & ~airway[box],
                           factors, shape)
        image = np.clip(hu[full_box], lm.PADDING_FLOOR, None).astype(np.float32)
        if factors[1] > 1 or factors[2] > 1:
            image = ndimage.uniform_filter(image, size=(1, 3, 3))
        fine = lm.fill_holes_2d(core | (band & (image < threshold)))
        # Band voxels that noise or a neighbouring air pocket cut off from the lung's core are not lung.
        pieces, _ = ndimage.label(fine, structure=lm.FACES)
        anchor = core if core.any() else lm.upsample(local, factors, shape)
        attached = np.zeros(int(pieces.max()) + 1, dtype=bool)
        attached[np.unique(pieces[anchor & fine])] = True
        attached[0] = False
        fine = attached[pieces]
        target = out[full_box]
        target[fine & (target == 0)] = value
    return out


def inside_body(volume: Volume) -> Optional[np.ndarray]:
    """Which voxels of ``volume``'s grid lie inside the body: all but the air joined to the image border within its
    axial slice (step 3 of the method, on its ~2 mm working grid). None when the image is not a CT in Hounsfield
    units. A lung model's clean-up uses it to drop air outside the patient that a network took for lung."""
    try:
        check_ct(volume.array)
    except Med3DError:
        return None
    canon, orientation = to_canonical(volume)
    body, _ = _body_and_threshold(canon)
    return from_canonical(body.astype(np.uint8), orientation).array > 0


def refine_to_air(labels: Volume, scan: Volume, band_mm: float = 3.0) -> Volume:
    """Any lung label map (e.g. a network's, made on a coarser grid) with each label's boundary moved onto the CT's
    own air/tissue boundary within ``band_mm`` of where it was: inside the band a voxel is lung when it holds air
    (the scan's threshold, as :func:`segment_lungs` finds it), deeper inside it stays as labelled, and each label's
    slices are filled. ``labels`` must lie on ``scan``'s grid; the result does too. A lung model's clean-up
    (:func:`clean_up_model_labels`) uses it: a network on a 3-4 mm grid cannot place the pleura as the
    full-resolution threshold does."""
    check_ct(scan.array)
    if not labels.same_geometry(scan, atol=1e-3):
        raise Med3DError("the lung labels' grid differs from the scan's; refine labels on the scan they belong to")
    canon, orientation = to_canonical(scan)
    threshold = lm.air_threshold(lm.block_mean(canon.array, lm.grid_factors(canon.spacing, WORK_MM))[0])
    out = _refine_to_threshold(canon, to_canonical(labels)[0].array, threshold, band_mm)
    return from_canonical(out.astype(labels.array.dtype if labels.array.dtype.kind in "iu" else np.uint8),
                          orientation)


def clean_up_model_labels(volume: Volume, labels: np.ndarray) -> np.ndarray:
    """A lung network's label map (``labels``, on ``volume``'s grid) cleaned with this method's steps: nothing
    outside the body (:func:`inside_body`), each boundary on the scan's own air/tissue boundary within 3 mm
    (:func:`refine_to_air`; leave-one-scan-out Dice against this method 0.92-0.93 without, 0.96-0.97 with,
    Testing/benchmarks/RESULTS.md). Returned unchanged for an image that is not a CT in Hounsfield units."""
    try:
        check_ct(volume.array)
    except Med3DError:
        return labels
    canon, orientation = to_canonical(volume)
    body, threshold = _body_and_threshold(canon)  # one threshold serves both steps
    inside = np.where(body, to_canonical(volume.with_array(labels))[0].array, 0)  # air outside is never lung
    refined = _refine_to_threshold(canon, inside, threshold, 3.0)
    refined[~body] = 0  # the band reaches past the skin where a label touches it
    return from_canonical(refined.astype(labels.dtype), orientation).array


def _body_and_threshold(canon: Volume) -> Tuple[np.ndarray, float]:
    """(inside-body mask on ``canon``'s grid, the scan's air threshold), both from the ~2 mm working grid."""
    factors = lm.grid_factors(canon.spacing, WORK_MM)
    coarse, _ = lm.block_mean(canon.array, factors)
    threshold = lm.air_threshold(coarse)
    return lm.upsample(~lm.outside_air(coarse < threshold), factors, canon.array.shape), threshold


def _refine_to_threshold(canon: Volume, labels: np.ndarray, threshold: float, band_mm: float) -> np.ndarray:
    """:func:`refine_to_air` on canonical arrays with the threshold given: uint8 labels on ``canon``'s grid."""
    out = np.zeros(labels.shape, dtype=np.uint8)
    steps = max(1, int(round(band_mm / min(canon.spacing[:2]))))
    # Only the labels' box: with a margin of the band plus two voxels, dilating, filtering and filling holes give
    # what they give on the whole grid (nothing they touch reaches the box's border).
    box = bounding_box(labels > 0, margin=(0, steps + 2, steps + 2))
    if box is None:
        return out
    image = np.maximum(canon.array[box], lm.PADDING_FLOOR).astype(np.float32)
    if min(canon.spacing[:2]) < 1.5:
        image = ndimage.uniform_filter(image, size=(1, 3, 3))
    _refine_box(labels[box], image < threshold, steps, out[box])
    return out


def _refine_box(labels: np.ndarray, air: np.ndarray, steps: int, out: np.ndarray) -> None:
    """:func:`refine_to_air` inside one box: writes each label, in value order, into ``out`` (a view)."""
    for value in (int(v) for v in np.unique(labels) if v != 0):
        lung = labels == value
        core = ndimage.binary_erosion(lung, structure=lm.SLICE, iterations=steps)
        band = ndimage.binary_dilation(lung, structure=lm.SLICE, iterations=steps) & ~core & air & (out == 0)
        fine = lm.fill_holes_2d(core | band)
        pieces, _ = ndimage.label(fine, structure=lm.FACES)
        attached = np.zeros(int(pieces.max()) + 1, dtype=bool)
        attached[np.unique(pieces[core if core.any() else lung])] = True
        attached[0] = False
        out[attached[pieces] & (out == 0)] = value


def _warnings(labels: np.ndarray, voxel_ml: float, details: Dict[str, Any]) -> List[str]:
    volumes = {info["name"]: float(np.count_nonzero(labels == info["value"])) * voxel_ml for info in LUNG_LABELS}
    details["volumes_ml"] = {k: round(v, 1) for k, v in volumes.items()}
    if not any(volumes.values()):
        return ["no lung found in this CT (no air-filled region of lung density inside the body): the label map is "
                "empty; does the scan show the chest or the lung bases?"]
    missing = [name for name, ml in volumes.items() if ml == 0]
    if missing:
        found = "left lung" if missing[0] == "right lung" else "right lung"
        return [f"only the {found} was found: the {missing[0]} is not in view, not aerated, or absent"]
    return []
