"""Overlay PNG: anatomical orientation, true proportions, storage-order independence, refusals."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from med3dcore.errors import Med3DError
from med3dcore.overlay import render_overlay, write_overlay
from med3dcore.phantoms import store_as
from med3dcore.volume import Volume

RED = (255, 0, 0)


def _marked_scan():
    """A 20 x 30 x 40 (K, J, I) LPS scan with 1 x 1 x 3 mm voxels (I, J, K) and a label box in the patient's
    left-anterior-superior corner."""
    image = np.zeros((20, 30, 40), dtype=np.int16)
    labels = np.zeros_like(image, dtype=np.uint8)
    labels[14:18, 2:8, 30:37] = 1  # superior (high K), anterior (low J), patient left (high I)
    spacing = (1.0, 1.0, 3.0)      # (I, J, K) mm: the scan is 40 x 30 x 60 mm
    return Volume(image, spacing), Volume(labels, spacing)


def _red(picture):
    return (picture[..., 0] > 80) & (picture[..., 1] < 60) & (picture[..., 2] < 60)


def test_orientation_and_proportions():
    image, labels = _marked_scan()
    info = [{"value": 1, "name": "lesion", "color": list(RED)}]
    pic = render_overlay(image, labels, info, window=(-1, 1), height=120, opacity=1.0)
    # Tallest view 60 mm (superior-inferior) -> 120 px: 0.5 mm per pixel. Widths: axial 40 mm, coronal 40 mm,
    # sagittal 30 mm -> 80 + 80 + 60 px plus two 4 px gaps.
    assert pic.shape == (120, 80 + 4 + 80 + 4 + 60, 3)
    red = _red(pic)
    axial, coronal, sagittal = red[:, :80], red[:, 84:164], red[:, 168:]
    # Axial (30 x 40 mm -> 60 x 80 px, centred vertically: rows 30..90): patient left on the right, anterior up.
    rows, cols = np.nonzero(axial)
    assert cols.min() >= 40 and rows.max() < 60
    assert rows.min() >= 30 + 2 * 2 - 1 and cols.min() >= 2 * 30 - 1
    # Coronal: patient left on the right, superior up.
    rows, cols = np.nonzero(coronal)
    assert cols.min() >= 40 and rows.max() < 60
    # Sagittal: anterior on the left, superior up.
    rows, cols = np.nonzero(sagittal)
    assert cols.max() < 30 and rows.max() < 60
    # Label extent in the coronal view: 4 slices x 3 mm = 12 mm = 24 px tall, 7 mm = 14 px wide.
    rows, cols = np.nonzero(coronal)
    assert rows.max() - rows.min() + 1 == 24 and cols.max() - cols.min() + 1 == 14


@pytest.mark.parametrize("flip,permute", [((0,), None), ((1, 2), (2, 0, 1)), ((), (0, 2, 1))])
def test_same_picture_whatever_the_storage_order(flip, permute):
    image, labels = _marked_scan()
    image = image.with_array(np.random.default_rng(0).normal(size=image.shape).astype(np.float32))
    reference = render_overlay(image, labels, window=(-2, 2))
    stored = render_overlay(store_as(image, flip, permute), store_as(labels, flip, permute), window=(-2, 2))
    assert np.array_equal(reference, stored)


def test_write_overlay_png_and_refusals(tmp_path):
    image, labels = _marked_scan()
    out = write_overlay(image, labels, tmp_path / "ov.png")
    # the views (320 px tall) and the legend strip: one 20 px line per label plus the window line, 8 px margin
    assert Image.open(out).size == (213 + 4 + 213 + 4 + 160, 320 + 8 + 20 * 2) and Image.open(out).mode == "RGB"
    with pytest.raises(Med3DError, match="already exists"):
        write_overlay(image, labels, out)
    write_overlay(image, labels, out, overwrite=True)
    with pytest.raises(Med3DError, match=r"\.png"):
        write_overlay(image, labels, tmp_path / "ov.jpg")
    with pytest.raises(Med3DError, match="does not exist"):
        write_overlay(image, labels, tmp_path / "missing" / "ov.png")
    shifted = Volume(labels.array, labels.spacing, (5.0, 0.0, 0.0))
    with pytest.raises(Med3DError, match="geometry differs"):
        render_overlay(image, shifted)


def test_every_view_shows_two_separate_structures():
    """Two lungs: their centroid lies between them, yet the sagittal view must cut through one of them."""
    image = np.zeros((20, 30, 40), dtype=np.int16)
    labels = np.zeros_like(image, dtype=np.uint8)
    labels[5:15, 8:22, 4:14] = 1   # patient right
    labels[5:15, 8:22, 26:36] = 1  # patient left; nothing at I = 20, the centroid's sagittal slice
    info = [{"value": 1, "name": "lung", "color": list(RED)}]
    pic = render_overlay(Volume(image, (1.0, 1.0, 3.0)), Volume(labels, (1.0, 1.0, 3.0)), info, window=(-1, 1),
                         height=120, opacity=1.0)
    red = _red(pic)
    axial, coronal, sagittal = red[:, :80], red[:, 84:164], red[:, 168:]
    assert axial.sum() > 0 and coronal.sum() > 0
    assert sagittal.sum() > 0.5 * 14 * 10 * 3 * 2 * 2  # a whole lung's section (J x K mm at 0.5 mm per pixel), roughly


def test_outline_over_translucent_fill_and_a_legend_with_volumes():
    from med3dcore.overlay import label_volumes_ml

    image, labels = _marked_scan()
    two = labels.array.copy()
    two[2:6, 10:20, 5:15] = 2
    labels = labels.with_array(two)
    grey = 128
    image = image.with_array(np.full(image.shape, grey, np.int16))
    info = [{"value": 1, "name": "lesion", "color": [255, 0, 0]}, {"value": 2, "name": "cyst", "color": [0, 0, 255]},
            {"value": 3, "name": "absent", "color": [0, 255, 0]}]
    views = render_overlay(image, labels, info, window=(0, 255), height=120)
    pic = render_overlay(image, labels, info, window=(0, 255), height=120, legend=True)
    assert np.array_equal(pic[:120], views)
    # 4 x 6 x 7 voxels of 1 x 1 x 3 mm = 504 mm^3; 4 x 10 x 10 x 3 = 1200 mm^3; label 3 is listed with 0 mL
    assert label_volumes_ml(labels, [1, 2, 3]) == pytest.approx({1: 0.504, 2: 1.2, 3: 0.0})
    legend = pic[120:]
    assert legend.shape[0] == 8 + 20 * 4  # three labels and the window line
    for row, color in enumerate(([255, 0, 0], [0, 0, 255], [0, 255, 0])):  # each swatch's outline in its colour
        swatch = legend[5 + 20 * row + 2:5 + 20 * row + 16, 6:25]
        assert (np.abs(swatch.astype(int) - color).sum(axis=2) == 0).any()
    # the views cut through the cyst (the fuller label): its border is pure blue, its inside a blend with the scan
    pixels = views.astype(int)
    pure = (pixels == [0, 0, 255]).all(axis=2)
    blended = (pixels[..., 2] > grey + 20) & (pixels[..., 0] > 40) & (pixels[..., 0] < grey)
    assert pure.sum() > 20 and blended.sum() > 20


def test_no_labels_still_says_so():
    image, labels = _marked_scan()
    pic = render_overlay(image, labels.with_array(np.zeros_like(labels.array)), window=(-1, 1), height=60,
                         legend=True)
    assert pic.shape[0] == 60 + 8 + 20 * 2
