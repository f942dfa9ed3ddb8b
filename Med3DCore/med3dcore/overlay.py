"""A quick-look PNG of a label map on its scan: axial, coronal and sagittal views side by side.

Views follow the radiological convention whatever the file's storage order: axial seen from the feet (patient
right on the left of the picture, anterior at the top), coronal seen from the front (patient right on the left,
superior at the top), sagittal seen from the patient's left (anterior on the left, superior at the top). All three
share one millimetre-per-pixel scale, so anisotropic voxels show with their true proportions. Each view cuts
through the centre of the labelled region (the middle of the scan when nothing is labelled). Each label shows
as a light fill with a solid two-pixel outline in its colour, so the anatomy under it stays readable and a
mislabelled region's border is plain to see. Written pictures carry a legend strip: each label's name, colour
and volume in millilitres, and the intensity window the scan is shown in.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont  # pillow comes with scikit-image
from skimage.transform import resize

from .errors import Med3DError
from .safe_io import Outputs
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


def label_font(size: int) -> "ImageFont.ImageFont":
    """The font of the overlays' and training curves' labels, at ``size`` pixels where Pillow can scale it."""
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _markers(picture: "Image.Image", name: str) -> None:
    """Which side is which: patient right/left on axial and coronal views, anterior/posterior on sagittal."""
    left, right = ("A", "P") if name == "sagittal" else ("R", "L")
    draw, font = ImageDraw.Draw(picture), label_font(12)
    middle = picture.height // 2 - 6
    draw.text((3, middle), left, fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
    draw.text((picture.width - 10, middle), right, fill=(255, 255, 255), font=font, stroke_width=1,
              stroke_fill=(0, 0, 0))


def label_volumes_ml(labels: Volume, values: Sequence[int]) -> Dict[int, float]:
    """Millilitres per label value: voxel count times the voxel's volume."""
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    counts = np.bincount(np.asarray(labels.array).astype(np.int64).ravel().clip(min=0))
    return {int(v): float(counts[v]) * voxel_ml if v < len(counts) else 0.0 for v in values}


def _legend(width: int, rows: List[Tuple[Tuple[int, int, int], str]], note: str) -> np.ndarray:
    """A dark strip: one line per label (swatch with its outline colour, text), then the window note."""
    font, line = label_font(14), 20
    height = 8 + line * (len(rows) + 1)
    strip = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(strip)
    y = 5
    for color, text in rows:
        fill = tuple(int(round(0.35 * c + 0.65 * 24)) for c in color)
        draw.rectangle((6, y + 2, 24, y + 15), fill=fill, outline=color, width=2)
        draw.text((32, y), text, fill=(235, 235, 235), font=font)
        y += line
    draw.text((6, y), note, fill=(170, 170, 170), font=font)
    return np.asarray(strip)


def render_overlay(image: Volume, labels: Volume, label_info: Optional[Sequence[Mapping]] = None,
                   window: Optional[Tuple[float, float]] = None, height: int = 320,
                   opacity: float = 0.35, legend: bool = False) -> np.ndarray:
    """The overlay picture as an RGB uint8 array (rows, columns, 3).

    ``labels`` must lie on ``image``'s grid. ``window`` (low, high) maps intensities to grey (default: the
    0.5-99.5 percentiles). ``height`` is the height in pixels of the tallest view. ``opacity`` is the fill's;
    outlines are solid. ``legend`` adds the strip below the views (label names, colours, volumes in mL, window).
    """
    if image.shape != labels.shape or not image.same_geometry(labels, atol=1e-3):
        raise Med3DError("the label map's geometry differs from the scan's; an overlay needs both on one grid")
    canon_image, _ = to_canonical(image)
    canon_labels, _ = to_canonical(labels)
    img = np.asarray(canon_image.array, dtype=np.float32)
    lab = np.asarray(canon_labels.array).astype(np.int64)
    if window is None:
        low, high = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
        window_note = f"window {low:.4g} to {high:.4g} (0.5-99.5 percentiles of the scan)"
    else:
        low, high = window
        window_note = f"window {low:g} to {high:g}" + (" HU" if low < -200 or high > 200 else "")
    grey = np.clip((img - low) / max(float(high - low), 1e-6), 0.0, 1.0)

    centre = _view_centre(lab)
    values = sorted(int(v) for v in np.unique(lab) if v > 0)
    names = {int(info["value"]): str(info.get("name") or f"label {info['value']}") for info in (label_info or [])}
    shown = sorted(set(values) | set(names))  # the model's labels, present or not, and any others present
    colors = _colors(label_info, shown)
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
        edge[1:, :] |= edge[:-1, :]  # two pixels wide: visible at a glance, on any tissue
        edge[:, 1:] |= edge[:, :-1]
        for value, color in colors.items():
            where = lab_px == value
            rgb[where] = (1.0 - opacity) * rgb[where] + opacity * np.asarray(color, dtype=float)
            rgb[where & edge] = color  # a solid outline keeps pale colours visible on dark tissue
        halo = _edges(lab_px > 0) & (lab_px == 0)
        rgb[halo] = 0.3 * rgb[halo]  # a dark rim outside: the outline stands out on bright tissue too
        picture = Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))
        ImageDraw.Draw(picture).text((4, 2), name, fill=(255, 255, 0), font=label_font(12), stroke_width=1,
                                     stroke_fill=(0, 0, 0))
        _markers(picture, name)
        pictures.append(np.asarray(picture))

    gap = 4
    rows = max(p.shape[0] for p in pictures)
    canvas = np.zeros((rows, sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1), 3), dtype=np.uint8)
    x = 0
    for p in pictures:
        top = (rows - p.shape[0]) // 2
        canvas[top:top + p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    if not legend:
        return canvas
    volumes = label_volumes_ml(labels, shown)
    entries = [(colors[v], f"{v}  {names.get(v, f'label {v}')}: {volumes[v]:.1f} mL") for v in shown]
    if not entries:
        entries = [((128, 128, 128), "no labelled voxels")]
    return np.concatenate([canvas, _legend(canvas.shape[1], entries, window_note)], axis=0)


def write_overlay(image: Volume, labels: Volume, path: Union[str, os.PathLike],
                  label_info: Optional[Sequence[Mapping]] = None, window: Optional[Tuple[float, float]] = None,
                  overwrite: bool = False) -> Path:
    """Render :func:`render_overlay` and save it as a PNG; an existing file is kept unless ``overwrite``."""
    with Outputs(overwrite) as outputs:
        path = stage_overlay(outputs, image, labels, path, label_info, window)
    return path


def stage_overlay(outputs: Outputs, image: Volume, labels: Volume, path: Union[str, os.PathLike],
                  label_info: Optional[Sequence[Mapping]] = None,
                  window: Optional[Tuple[float, float]] = None) -> Path:
    """Stage the overlay PNG in ``outputs`` (the one write path: staged, read back, published with the rest)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise Med3DError(f"the overlay is a PNG picture; give a file name ending in .png, not '{path.name}'")
    outputs.check(path, what="overlay")
    picture = render_overlay(image, labels, label_info, window, legend=True)

    def write(staged: Path) -> None:
        Image.fromarray(picture).save(staged, format="PNG")

    def verify(staged: Path) -> None:
        with Image.open(staged) as back:
            back.load()  # decodes every row: a cut file fails here
            if back.size != (picture.shape[1], picture.shape[0]):
                raise Med3DError("the picture read back has another size")

    outputs.stage(path, write, verify=verify, what="overlay")
    return path
