"""Synthetic phantoms: anatomy, intensities, determinism, stored orientations, nodule kinds, phantom domains."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from med3dcore.errors import Med3DError
from med3dcore.phantoms import (LABEL_NAMES, make_ct_phantom, make_mr_phantom, make_nodule_crop, store_as,
                                write_phantom_domains)
from med3dcore.volume import to_canonical
from med3dcore.volume_files import read_volume


def _median_hu(image, labels, value):
    return float(np.median(image.array[labels.array == value]))


def test_ct_phantom_has_every_structure_with_its_hu():
    image, labels, names = make_ct_phantom((48, 48, 48), spacing=(1.5, 1.5, 2.0), seed=3, noise=0.0)
    assert names == LABEL_NAMES and image.array.dtype == np.int16 and labels.array.dtype == np.uint8
    assert image.shape == labels.shape == (48, 48, 48)
    assert image.spacing == (1.5, 1.5, 2.0) and labels.same_geometry(image)
    assert set(np.unique(labels.array)) == {0, 1, 2, 3, 4, 5}
    assert _median_hu(image, labels, 1) == -850
    assert _median_hu(image, labels, 2) == 60
    assert _median_hu(image, labels, 3) == 20
    assert _median_hu(image, labels, 4) == 400
    body = image.array[labels.array == 0]
    assert np.count_nonzero(body == 40) > 0 and np.count_nonzero(body == -100) > 0  # soft tissue and fat rim


def test_ct_phantom_anatomy_sides():
    image, labels, _ = make_ct_phantom((40, 40, 40), seed=0)
    k, j, i = np.nonzero(labels.array == 2)
    assert i.mean() < 20  # liver on the patient's right: -x in LPS, low I
    kl, _, _ = np.nonzero(labels.array == 1)
    assert kl.mean() > k.mean()  # lungs above the liver (+z superior)
    _, jb, _ = np.nonzero(labels.array == 4)
    assert jb.mean() > 25  # spine posterior (+y)


def test_same_seed_same_phantom_other_seed_differs():
    a = make_ct_phantom((32, 32, 32), seed=7)
    b = make_ct_phantom((32, 32, 32), seed=7)
    c = make_ct_phantom((32, 32, 32), seed=8)
    assert np.array_equal(a[0].array, b[0].array) and np.array_equal(a[1].array, b[1].array)
    assert not np.array_equal(a[1].array, c[1].array)


@pytest.mark.parametrize("flip,permute", [((2,), None), ((0, 1), None), ((), (2, 1, 0)), ((1,), (1, 2, 0))])
def test_stored_flipped_or_transposed_is_the_same_anatomy(flip, permute):
    spacing = (1.0, 1.5, 2.5)
    ref_image, ref_labels, _ = make_ct_phantom((20, 24, 28), spacing=spacing, seed=5)
    image, labels, _ = make_ct_phantom((20, 24, 28), spacing=spacing, seed=5, flip=flip, permute=permute)
    assert not np.array_equal(labels.array, ref_labels.array) or labels.shape != ref_labels.shape
    # Every voxel keeps its world position: the canonical views are identical.
    canon, _ = to_canonical(labels)
    canon_img, _ = to_canonical(image)
    assert np.array_equal(canon.array, ref_labels.array) and np.array_equal(canon_img.array, ref_image.array)
    assert np.allclose(canon.origin, ref_labels.origin) and np.allclose(canon.spacing, spacing)
    # And a world point maps to the same label in both storages.
    point = ref_labels.ijk_to_lps() @ np.array([9, 11, 13, 1.0])
    i, j, k = np.round(labels.lps_to_ijk(point[:3])).astype(int)
    assert labels.array[k, j, i] == ref_labels.array[13, 11, 9]


def test_store_as_rejects_a_bad_permutation():
    image, _, _ = make_ct_phantom((8, 8, 8))
    with pytest.raises(Med3DError, match="permute"):
        store_as(image, permute=(0, 0, 1))


def test_mr_phantom_contrast_differs_from_ct():
    image, labels, _ = make_mr_phantom((40, 40, 40), seed=2, noise=0.0)
    assert image.array.dtype == np.float32
    fat_like = image.array[labels.array == 0].max()
    assert _median_hu(image, labels, 1) < 60 < _median_hu(image, labels, 2)  # lung dark, liver bright
    assert fat_like > _median_hu(image, labels, 2)  # fat is the brightest tissue


@pytest.mark.parametrize("kind", ["benign", "malignant"])
def test_nodule_crop(kind):
    image, mask = make_nodule_crop(kind, seed=4, shape=(24, 40, 40), spacing=(0.7, 0.7, 1.25))
    assert image.shape == mask.shape == (24, 40, 40) and mask.same_geometry(image)
    voxels = int(mask.array.sum())
    volume_mm3 = voxels * 0.7 * 0.7 * 1.25
    diameter = (6 * volume_mm3 / np.pi) ** (1 / 3)
    if kind == "benign":
        assert 3.0 < diameter < 10.0 and np.median(image.array[mask.array > 0]) > 120  # small, dense
    else:
        assert 10.0 < diameter < 32.0 and np.median(image.array[mask.array > 0]) < 120  # larger, soft tissue
    assert np.median(image.array[mask.array == 0]) < -700  # lung around it


def test_malignant_nodules_are_irregular_benign_round():
    def sphericity_ratio(mask):
        pts = np.argwhere(mask.array > 0).astype(float)
        r = np.linalg.norm(pts - pts.mean(0), axis=1)
        return r.max() / (len(pts) * 3 / (4 * np.pi)) ** (1 / 3)  # farthest point / equal-volume radius
    benign = [sphericity_ratio(make_nodule_crop("benign", seed=s, shape=(40, 40, 40), spacing=(0.5,) * 3)[1])
              for s in range(3)]
    malignant = [sphericity_ratio(make_nodule_crop("malignant", seed=s)[1]) for s in range(3)]
    assert max(benign) < 1.3 < min(malignant)


def test_unknown_nodule_kind_is_a_clear_error():
    with pytest.raises(Med3DError, match="unknown nodule kind 'cyst'"):
        make_nodule_crop("cyst")
    with pytest.raises(Med3DError, match="shape"):
        make_ct_phantom((2, 8, 8))


def test_write_phantom_domains(tmp_path):
    config_path = write_phantom_domains(tmp_path, n_cases=2, seed=1, shape=(16, 20, 20))
    config = json.loads(config_path.read_text())
    names = [d["name"] for d in config["domains"]]
    assert names == ["phantom_ct_lung", "phantom_ct_liver", "phantom_ct_bone", "phantom_mr_abdomen"]
    liver = config["domains"][1]
    with open(tmp_path / liver["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    lab = read_volume(tmp_path / "phantom_ct_liver" / rows[1]["label"])
    assert set(np.unique(lab.array)) <= {0, 1, 2} and lab.direction[0, 0] == -1  # second case stored flipped
    msd = json.loads((tmp_path / config["domains"][2]["dataset_json"]).read_text())
    assert msd["labels"] == {"0": "background", "1": "bone"} and len(msd["training"]) == 2
    img = read_volume(tmp_path / "phantom_mr_abdomen" / "imagesTr" / "case_000.nii.gz")
    assert img.spacing == pytest.approx((2.0, 2.0, 3.0)) and img.shape == (16, 20, 20)
    with pytest.raises(Med3DError, match="already exists"):
        write_phantom_domains(tmp_path, n_cases=1)
