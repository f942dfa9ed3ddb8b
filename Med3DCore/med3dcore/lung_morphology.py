"""Image operations behind the classical lung method (``classical_lung.py``): the working grid, the scan's own
air/tissue threshold, slice-wise hole filling, the trachea and its explosion-controlled growth into the bronchi,
and the split of two lungs that touch.

Arrays are canonical (S, P, L): axis 0 runs to the head, axis 1 to the back, axis 2 to the patient's left.
Everything here is plain numpy/scipy on boolean masks, written for whole chest CTs in a few seconds.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

AIR_HU = -1000.0          # air by the definition of the Hounsfield scale
PADDING_FLOOR = -1024.0   # values below this are padding outside the field of view (-2048, -3024): treat as air
SOFT_CEILING = 400.0      # bone and metal above this would only pull the tissue mean of the threshold upwards
# The air/tissue threshold comes from the scan; outside this range it cannot separate aerated lung (-950..-600
# HU even in emphysema or expiration) from soft tissue (-150..100 HU), so it is clamped (Hu et al. 2001 found
# -500 +- 50 on every scan).
THRESHOLD_RANGE = (-700.0, -300.0)

SLICE = np.zeros((3, 3, 3), dtype=bool)
SLICE[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected within an axial slice, nothing across slices
FACES = ndimage.generate_binary_structure(3, 1)     # 6-connected in 3D


def grid_factors(spacing_ijk: Sequence[float], target_mm: float) -> Tuple[int, int, int]:
    """Whole-voxel block sizes (K, J, I) that bring the canonical spacing closest to ``target_mm`` from below."""
    return tuple(max(1, int(target_mm / float(s) + 1e-6)) for s in reversed(tuple(spacing_ijk)))  # type: ignore


def _block_reduce(array: np.ndarray, factors: Sequence[int], combine) -> np.ndarray:
    """Combine (``np.add`` or ``np.logical_or``) the voxels of each block, by strided slices: far faster than a
    reduction over reshaped axes for blocks of a few voxels. ``array``'s shape must be a multiple of ``factors``."""
    out = array
    for axis, f in enumerate(factors):
        if f > 1:
            index = [slice(None)] * 3
            index[axis] = slice(0, None, f)
            total = out[tuple(index)].copy()
            for offset in range(1, f):
                index[axis] = slice(offset, None, f)
                combine(total, out[tuple(index)], out=total)
            out = total
    return out


def block_mean(array: np.ndarray, factors: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(mean of each (fz, fy, fx) block as float32, blocks holding padding) with padding clipped to air first;
    edges repeat the last voxel. Averaging blocks also averages noise away, which the threshold needs on
    low-dose scans. Padding (below -1024 HU) marks where the field of view ends."""
    fz, fy, fx = (int(f) for f in factors)
    out_shape = tuple(-(-n // f) for n, f in zip(array.shape, (fz, fy, fx)))
    out = np.zeros(out_shape, dtype=np.float32)
    padded = np.zeros(out_shape, dtype=bool)
    step = max(1, 16 // fz) * fz  # slabs of whole blocks: a float copy of a whole large scan is not needed
    for z0 in range(0, array.shape[0], step):
        raw = array[z0:z0 + step]
        pads = [(0, -raw.shape[0] % fz), (0, out_shape[1] * fy - raw.shape[1]), (0, out_shape[2] * fx - raw.shape[2])]
        if any(p[1] for p in pads):
            raw = np.pad(raw, pads, mode="edge")
        rows = slice(z0 // fz, z0 // fz + raw.shape[0] // fz)
        values = np.maximum(raw, PADDING_FLOOR).astype(np.float32) if raw.dtype.kind in "iu" else \
            np.maximum(raw, PADDING_FLOOR, dtype=np.float32)
        out[rows] = _block_reduce(values, (fz, fy, fx), np.add) / float(fz * fy * fx)
        padded[rows] = _block_reduce(raw < PADDING_FLOOR, (fz, fy, fx), np.logical_or)
    return out, padded


def upsample(mask: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour inverse of :func:`block_mean`'s grid: every block gets its coarse value."""
    out = mask
    for axis, f in enumerate(factors):
        if f > 1:
            out = np.repeat(out, f, axis=axis)
    return out[: shape[0], : shape[1], : shape[2]]


def air_threshold(coarse: np.ndarray) -> float:
    """The scan's air/tissue threshold by iterative intersample selection (Ridler-Calvard, as Hu, Hoffman and
    Reinhardt 2001 use for lungs): the midpoint of the mean below and the mean above, repeated until it settles.
    Padding counts as air and bone as soft tissue; the result is clamped to :data:`THRESHOLD_RANGE`."""
    sample = coarse.ravel()
    if sample.size > 2_000_000:
        sample = sample[:: sample.size // 2_000_000 + 1]
    sample = np.clip(sample, PADDING_FLOOR, SOFT_CEILING)
    threshold = -500.0
    for _ in range(100):
        low, high = sample[sample < threshold], sample[sample >= threshold]
        if not low.size or not high.size:
            break
        new = 0.5 * (float(low.mean()) + float(high.mean()))
        if abs(new - threshold) < 0.5:
            threshold = new
            break
        threshold = new
    return float(np.clip(threshold, *THRESHOLD_RANGE))


def _touching_inplane_border(labels: np.ndarray, count: int) -> np.ndarray:
    """Lookup table: True for the labels that reach the in-plane (front/back/left/right) faces of the volume."""
    table = np.zeros(count + 1, dtype=bool)
    for face in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        table[np.unique(face)] = True
    table[0] = False
    return table


def outside_air(air: np.ndarray) -> np.ndarray:
    """Air connected to the image border within its own axial slice. Slice by slice, so that a scan which
    reaches the nose or mouth, whose airway joins the outside in 3D, still keeps its lungs inside the body."""
    labels, count = ndimage.label(air, structure=SLICE)
    return _touching_inplane_border(labels, count)[labels]


def air_level(coarse: np.ndarray, outside: np.ndarray, padded: np.ndarray) -> float:
    """The scan's own reading of air: the median of the outside air a few voxels away from the body and the field
    of view's edge (clamped to -1024..-950 HU); -1000 HU when no outside air is in view."""
    away = ndimage.binary_erosion(outside & ~padded, structure=SLICE, iterations=2)
    if np.count_nonzero(away) < 1000:
        return AIR_HU
    return float(np.clip(np.median(coarse[away]), PADDING_FLOOR, -950.0))


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every hole of every axial slice filled (background not connected to the slice's border)."""
    labels, count = ndimage.label(~mask, structure=SLICE)
    return mask | ~_touching_inplane_border(labels, count)[labels] & (labels > 0)


def body_midline(body: np.ndarray) -> float:
    """Left-right position (axis 2 index) of the body's centre of mass."""
    profile = body.sum(axis=(0, 1), dtype=np.float64)
    return float((profile * np.arange(body.shape[2])).sum() / max(profile.sum(), 1.0))


def _tube_continues(component: np.ndarray, z: int, blob: np.ndarray, area: float, slices: int) -> bool:
    """True when the blob at slice ``z`` continues downwards for ``slices`` slices as a cross-section of similar
    area overlapping it: a tube (the trachea), not the tip of a lung apex, whose section widens quickly."""
    rows, cols = np.nonzero(blob)
    for below in range(z - 1, z - 1 - slices, -1):
        if below < 0:
            return False
        sections, _ = ndimage.label(component[below])
        ids = np.unique(sections[rows, cols])
        ids = ids[ids > 0]
        if ids.size != 1:
            return False
        size = float(np.count_nonzero(sections == ids[0]))
        if not 0.5 * area <= size <= 2.0 * area:
            return False
    return True


def find_trachea(component: np.ndarray, midline: float, spacing_kji: Sequence[float],
                 area_cm2: Tuple[float, float] = (0.8, 8.0), tube_mm: float = 15.0,
                 search_mm: float = 150.0) -> Optional[Tuple[int, np.ndarray]]:
    """The trachea's highest cross-section in ``component`` (the lungs with their airways): a compact air blob of
    tracheal size that continues downwards as a tube for ``tube_mm``, searched from the component's top down
    ``search_mm``; the one nearest ``midline`` when several qualify. Returns (slice index, 2D mask) or None (the
    scan starts below the carina, or shows no airway)."""
    dz, dy, dx = spacing_kji
    z_levels = np.flatnonzero(component.any(axis=(1, 2)))
    if not z_levels.size:
        return None
    top = int(z_levels.max())
    pixel_cm2 = dy * dx / 100.0
    slices = max(1, int(round(tube_mm / dz)))
    for z in range(top, max(top - int(search_mm / dz) - 1, int(z_levels.min()) - 1), -1):
        blobs, count = ndimage.label(component[z])
        if not count:
            continue
        areas = np.bincount(blobs.ravel())[1:] * pixel_cm2
        found = []
        for b in np.flatnonzero((areas >= area_cm2[0]) & (areas <= area_cm2[1])) + 1:
            blob = blobs == b
            rows, cols = np.nonzero(blob)
            height, width = (np.ptp(rows) + 1) * dy, (np.ptp(cols) + 1) * dx
            if max(height, width) > 2.5 * min(height, width):  # a tube seen end-on, not a sliver of lung
                continue
            if _tube_continues(component, z, blob, float(rows.size), slices):
                found.append((abs(float(cols.mean()) - midline), blob))
        if found:
            return z, min(found, key=lambda item: item[0])[1]
    return None


def grow_airways(coarse: np.ndarray, allowed: np.ndarray, seed_z: int, seed: np.ndarray, voxel_ml: float,
                 ceiling: float, spacing_kji: Sequence[float], step: float = 10.0, max_ml: float = 120.0,
                 max_jump_ml: float = 50.0, reach_mm: Tuple[float, float, float] = (200.0, 70.0, 80.0)
                 ) -> Tuple[np.ndarray, float]:
    """Explosion-controlled region growing from the trachea (after Mori et al.): raise the threshold from the
    density of air towards ``ceiling`` while the airway connected to the seed stays airway-sized (at most
    ``max_ml``: trachea and main bronchi hold 30-80 mL) and grows without a sudden jump; the step before the airway
    leaks into lung is kept. The search stays in a box ``reach_mm`` (down, front/back, left/right) around the
    trachea, where trachea, carina and main bronchi lie. Returns (airway mask, threshold used)."""
    rows, cols = np.nonzero(seed)
    reach = [int(r / s) + 1 for r, s in zip(reach_mm, spacing_kji)]
    centre = (int(rows.mean()), int(cols.mean()))
    box = (slice(max(seed_z - reach[0], 0), seed_z + 1),
           slice(max(centre[0] - reach[1], 0), centre[0] + reach[1] + 1),
           slice(max(centre[1] - reach[2], 0), centre[1] + reach[2] + 1))
    local, image = allowed[box], coarse[box]
    seed_index = (np.full(rows.size, seed_z - box[0].start), rows - box[1].start, cols - box[2].start)
    best = np.zeros(local.shape, dtype=bool)
    best_threshold, previous_ml = AIR_HU, 0.0
    for threshold in np.arange(AIR_HU + step, ceiling + 1e-6, step):
        labels, _ = ndimage.label(local & (image < threshold), structure=FACES)
        ids = np.unique(labels[seed_index])
        ids = ids[ids > 0]
        if not ids.size:
            continue
        grown = np.isin(labels, ids)
        ml = float(grown.sum()) * voxel_ml
        if ml > max_ml or ml - previous_ml > max_jump_ml:
            break
        best, best_threshold, previous_ml = grown, float(threshold), ml
    out = np.zeros(allowed.shape, dtype=bool)
    out[box] = best
    return out, best_threshold


def skin_distances(outside: np.ndarray, unseen: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For every voxel, the number of voxels to the nearest outside air towards the patient's right (-L) and
    towards the left (+L) within its row; infinite where the body is cut first (image border or padding), since no
    skin is seen on that side."""
    n = outside.shape[2]
    index = np.arange(n, dtype=np.float32)
    last = np.maximum.accumulate(np.where(outside, index, -1.0), axis=2)
    towards_right = index - last
    cut = (last < 0) | np.take_along_axis(unseen, np.clip(last, 0, n - 1).astype(np.intp), axis=2)
    towards_right[cut] = np.inf
    first = np.minimum.accumulate(np.where(outside, index, float(n))[..., ::-1], axis=2)[..., ::-1]
    towards_left = first - index
    cut = (first >= n) | np.take_along_axis(unseen, np.clip(first, 0, n - 1).astype(np.intp), axis=2)
    towards_left[cut] = np.inf
    return towards_right, towards_left


def lateral_side(part: np.ndarray, towards_right: np.ndarray, towards_left: np.ndarray, voxel_mm: float,
                 chest_wall_mm: float = 80.0, decisive: float = 1.5) -> int:
    """Which side of ``part`` (a lung) faces the chest wall: -1 when the skin is nearer on its right-hand (-L) side
    (a right lung), +1 when nearer on its left (a left lung). The other side faces the mediastinum, always the
    thicker. 0 when this does not decide: the nearer skin is further than a chest wall (``chest_wall_mm``, median
    over the lung's rows) or not ``decisive`` times nearer than the other side's."""
    seen = part.any(axis=2)
    if not seen.any():
        return 0
    first = np.argmax(part, axis=2)[seen]
    last = part.shape[2] - 1 - np.argmax(part[..., ::-1], axis=2)[seen]
    zz, yy = np.nonzero(seen)
    right = float(np.median(towards_right[zz, yy, first]))
    left = float(np.median(towards_left[zz, yy, last]))
    wall = chest_wall_mm / voxel_mm
    if right <= wall and right * decisive <= left:
        return -1
    if left <= wall and left * decisive <= right:
        return 1
    return 0  # no skin seen on either side (the field of view cuts the chest), or no clear difference


def split_two(mask: np.ndarray, max_iterations: int = 6) -> List[np.ndarray]:
    """Split a mask that holds two lungs joined at a thin junction (anterior or posterior junction line): erode
    until two large parts appear, then give every voxel to the nearer part. Returns one or two masks."""
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box:
        return [mask]
    box = box[0]
    full, mask = mask, mask[box]
    core = mask
    for _ in range(max_iterations):
        core = ndimage.binary_erosion(core, structure=FACES)
        labels, count = ndimage.label(core, structure=FACES)
        if count < 2:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        first, second = np.argsort(sizes)[::-1][:2]
        if sizes[second] < 0.1 * sizes[first]:
            continue
        seeds = np.zeros(mask.shape, dtype=np.uint8)
        seeds[labels == first + 1], seeds[labels == second + 1] = 1, 2
        _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        owner = seeds[tuple(nearest)]
        parts = []
        for value in (1, 2):
            part = np.zeros_like(full)
            part[box] = mask & (owner == value)
            parts.append(part)
        return parts
    return [full]
