"""A quick-look PNG of a label map on its scan: axial, coronal and sagittal views side by side.

Views follow the radiological convention whatever the file's storage order: axial seen from the feet (patient
right on the left of the picture, anterior at the top), coronal seen from the front (patient right on the left,
superior at the top), sagittal seen from the patient's left (anterior on the left, superior at the top). All three
share one millimetre-per-pixel scale, so anisotropic voxels show with their true proportions. Each view cuts
through the centre of the labelled region (the middle of the scan when nothing is labelled).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw  # pillow comes with scikit-image
from skimage.transform import resize

from .errors import Med3DError
from .volume import Volume, to_canonical

DEFAULT_COLORS = [(230, 80, 60), (80, 200, 90), (70, 130, 230), (240, 200, 40), (200, 90, 220), (60, 210, 210)]


def _colors(label_info: Optional[Sequence[Mapping]], values: Sequence[int]) -> Dict[int, Tuple[int, int, int]]:
    given = {int(info["value"]): tuple(int(c) for c in info["color"])
             for info in (label_info or []) if info.get("color") is not None}
    return {v: given.get(v, DEFAULT_COLORS[n % len(DEFAULT_COLORS)]) for n, v in enumerate(values)}


Panel = Tuple[str, np.ndarray, np.ndarray, int, int]


def _panels(image: np.ndarray, labels: np.ndarray, centre: Sequence[int]) -> List[Panel]:
    """(name, image slice, label slice, row axis, column axis) in display order; arrays are canonical (S, P, L)."""
    k, j, i = centre
    flip_rows = lambda a: a[::-1]  # noqa: E731 - superior at the top
    return [
        ("axial", image[k], labels[k], 1, 2),                                    # rows P (anterior up), cols L
        ("coronal", flip_rows(image[:, j]), flip_rows(labels[:, j]), 0, 2),       # rows S (up), cols L
        ("sagittal", flip_rows(image[:, :, i]), flip_rows(labels[:, :, i]), 0, 1),  # rows S (up), cols P
    ]


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels whose label differs from a 4-neighbour's (the outline of every labelled region)."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge


def _view_centre(labels: np.ndarray) -> List[int]:
    """Per axis, the slice through the labels' centroid, or the fullest slice when the centroid's slice holds less
    than half as much (the centroid of two lungs lies between them, where a sagittal view would show nothing)."""
    found = np.argwhere(labels > 0)
    if not len(found):
        return [n // 2 for n in labels.shape]
    centre = []
    for axis, c in enumerate(found.mean(axis=0).round().astype(int)):
        counts = np.bincount(found[:, axis], minlength=labels.shape[axis])
        centre.append(int(c) if counts[c] * 2 >= counts.max() else int(np.argmax(counts)))
    return centre


def render_overlay(image: Volume, labels: Volume, label_info: Optional[Sequence[Mapping]] = None,
                   window: Optional[Tuple[float, float]] = None, height: int = 320,
                   opacity: float = 0.45) -> np.ndarray:
    """The overlay picture as an RGB uint8 array (rows, columns, 3).

    ``labels`` must lie on ``image``'s grid. ``window`` (low, high) maps intensities to grey (default: the
    0.5-99.5 percentiles). ``height`` is the height in pixels of the tallest view.
    """
    if image.shape != labels.shape or not image.same_geometry(labels, atol=1e-3):
        raise Med3DError("the label map's geometry differs from the scan's; an overlay needs both on one grid")
    canon_image, _ = to_canonical(image)
    canon_labels, _ = to_canonical(labels)
    img = np.asarray(canon_image.array, dtype=np.float32)
    lab = np.asarray(canon_labels.array).astype(np.int64)
    if window is None:
        low, high = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    else:
        low, high = window
    grey = np.clip((img - low) / max(float(high - low), 1e-6), 0.0, 1.0)

    centre = _view_centre(lab)
    values = sorted(int(v) for v in np.unique(lab) if v > 0)
    colors = _colors(label_info, values)
    spacing_kji = np.asarray(canon_image.spacing, dtype=float)[::-1]
    extent = np.asarray(lab.shape) * spacing_kji
    mm_per_pixel = max(extent[0], extent[1]) / height  # the tallest view (P for axial, S for the others)

    pictures = []
    for name, grey_slice, label_slice, row_axis, col_axis in _panels(grey, lab, centre):
        size = tuple(max(1, int(round(extent[axis] / mm_per_pixel))) for axis in (row_axis, col_axis))
        g = resize(grey_slice, size, order=1, mode="edge", anti_aliasing=False, preserve_range=True)
        lab_px = resize(label_slice, size, order=0, mode="edge", anti_aliasing=False, preserve_range=True).astype(int)
        rgb = np.repeat((g * 255.0)[..., None], 3, axis=2)
        edge = _edges(lab_px)
        for value, color in colors.items():
            where = lab_px == value
            rgb[where] = (1.0 - opacity) * rgb[where] + opacity * np.asarray(color, dtype=float)
            rgb[where & edge] = color  # a solid outline keeps pale colours visible on dark tissue
        picture = Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))
        ImageDraw.Draw(picture).text((4, 2), name, fill=(255, 255, 0))
        pictures.append(np.asarray(picture))

    gap = 4
    rows = max(p.shape[0] for p in pictures)
    canvas = np.zeros((rows, sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1), 3), dtype=np.uint8)
    x = 0
    for p in pictures:
        top = (rows - p.shape[0]) // 2
        canvas[top:top + p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    return canvas


def write_overlay(image: Volume, labels: Volume, path: Union[str, os.PathLike],
                  label_info: Optional[Sequence[Mapping]] = None, window: Optional[Tuple[float, float]] = None,
                  overwrite: bool = False) -> Path:
    """Render :func:`render_overlay` and save it as a PNG; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise Med3DError(f"the overlay is a PNG picture; give a file name ending in .png, not '{path.name}'")
    if path.exists() and not overwrite:
        raise Med3DError(f"{path} already exists; choose another name or pass --overwrite")
    if not path.parent.is_dir():
        raise Med3DError(f"folder {path.parent} does not exist; create it first")
    Image.fromarray(render_overlay(image, labels, label_info, window)).save(path)
    return path
