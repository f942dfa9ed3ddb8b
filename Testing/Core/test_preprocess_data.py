"""Preprocessing and the way back on real scans and masks from ../shared/data."""
from __future__ import annotations

import numpy as np
import pytest

from med3dcore.errors import Med3DError
from med3dcore.preprocess import (PreprocessSpec, check_intensity_range, median_spacing, prepare_label,
                                  preprocess_image, resample_to_reference, resample_volume, restore_labels,
                                  restore_probabilities)
from med3dcore.volume import Volume
from med3dcore.volume_files import read_volume


def rearranged_copy(vol: Volume, order, flips) -> Volume:
    """The same anatomy stored differently: new image axis c is old image axis order[c], reversed if flips[c].
    Written independently of med3dcore's reorientation code."""
    size_ijk = vol.shape[::-1]
    array = np.transpose(vol.array, [2 - order[2 - p] for p in range(3)])
    array = np.flip(array, [2 - c for c in range(3) if flips[c]])
    direction = np.stack([vol.direction[:, order[c]] * (-1 if flips[c] else 1) for c in range(3)], axis=1)
    first = np.zeros(3)
    for c in range(3):
        first[order[c]] = size_ijk[order[c]] - 1 if flips[c] else 0
    origin = (vol.ijk_to_lps() @ np.append(first, 1.0))[:3]
    spacing = tuple(vol.spacing[order[c]] for c in range(3))
    return Volume(np.ascontiguousarray(array), spacing, tuple(origin), direction)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def abdomen(data_dir):
    return read_volume(data_dir / "ct/abdomen_ct.nii.gz"), read_volume(data_dir / "ct/abdomen_ct_liver.nii.gz")


@pytest.fixture(scope="module")
def abdomen_rearranged(abdomen):
    image, liver = abdomen
    order, flips = (2, 0, 1), (False, True, True)
    return rearranged_copy(image, order, flips), rearranged_copy(liver, order, flips)


def test_rearranged_copy_is_the_same_anatomy(abdomen, abdomen_rearranged):
    image, copy = abdomen[0], abdomen_rearranged[0]
    assert copy.shape != image.shape
    rng = np.random.default_rng(0)
    ijk = np.c_[[rng.integers(0, n, 50) for n in image.shape[::-1]]].T
    points = (image.ijk_to_lps() @ np.c_[ijk, np.ones(50)].T).T[:, :3]
    copy_ijk = np.round(copy.lps_to_ijk(points)).astype(int)
    np.testing.assert_array_equal(copy.array[copy_ijk[:, 2], copy_ijk[:, 1], copy_ijk[:, 0]],
                                  image.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]])


def test_liver_round_trip_without_resampling_is_exact(abdomen, abdomen_rearranged):
    spec = PreprocessSpec(window=(-200, 250))
    arrays = []
    for image, liver in (abdomen, abdomen_rearranged):
        array, prepared = preprocess_image(image, spec)
        labels = prepare_label(liver, prepared)
        restored = restore_labels(labels, prepared)
        assert restored.spacing == image.spacing and restored.origin == image.origin
        assert np.array_equal(restored.direction, image.direction) and restored.shape == image.shape
        np.testing.assert_array_equal(restored.array, liver.array.astype(np.uint8))
        arrays.append((array, labels))
    # The network sees the same anatomy in the same layout whichever way the file was stored.
    np.testing.assert_array_equal(arrays[0][0], arrays[1][0])
    np.testing.assert_array_equal(arrays[0][1], arrays[1][1])


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 1.5), (2.0, 2.5, 4.0)])
def test_liver_round_trip_with_resampling(abdomen, abdomen_rearranged, spacing):
    for image, liver in (abdomen, abdomen_rearranged):
        array, prepared = preprocess_image(image, PreprocessSpec(spacing=spacing, window=(-200, 250)))
        assert array.dtype == np.float32 and array.shape == prepared.grid.shape
        assert abs(float(array.mean())) < 1e-3 and abs(float(array.std()) - 1) < 1e-3
        labels = prepare_label(liver, prepared)
        assert set(np.unique(labels)) == {0, 1}
        restored = restore_labels(labels, prepared)
        assert restored.same_geometry(image, atol=0.0) and restored.origin == image.origin
        assert dice(restored.array > 0, liver.array > 0) > 0.97
        probs = restore_probabilities(np.stack([labels == 0, labels == 1]).astype(np.float32), prepared)
        assert probs.shape == (2,) + image.shape
        assert dice(probs[1] > 0.5, liver.array > 0) > 0.97


def test_liver_is_soft_tissue_after_the_liver_window(abdomen):
    image, liver = abdomen
    spec = PreprocessSpec(window=(-200, 250), clip_percentiles=None, zscore=False)
    array, prepared = preprocess_image(image, spec)
    labels = prepare_label(liver, prepared)
    assert array.min() == -200 and array.max() == 250
    assert 0 < np.median(array[labels == 1]) < 150  # liver parenchyma in HU


def test_brain_mr_las_with_tumour(data_dir):
    image = read_volume(data_dir / "mr/brain_mr_1.nrrd")
    tumour = read_volume(data_dir / "mr/brain_mr_1_tumor.nrrd")
    array, prepared = preprocess_image(image, PreprocessSpec(spacing=(1.5, 1.5, 3.0), modality="MR"))
    assert prepared.orientation.flips == (False, True, False)  # stored with J towards anterior
    labels = prepare_label(tumour, prepared)
    restored = restore_labels(labels, prepared)
    assert restored.same_geometry(image, atol=0.0)
    assert dice(restored.array > 0, tumour.array > 0) > 0.9
    assert check_intensity_range(image.array, "MR") is None
    assert "no air" in check_intensity_range(image.array, "CT")


def test_mask_on_another_grid_must_be_resampled_first(data_dir):
    series = read_volume(data_dir / "dicom/abdomen_ct_series")
    mask = read_volume(data_dir / "dicom/abdomen_ct_series_multilabel.nii.gz")
    _, prepared = preprocess_image(series, PreprocessSpec(spacing=(1.5, 1.5, 2.0)))
    with pytest.raises(Med3DError, match="mask geometry differs from its image.*resample_to_reference"):
        prepare_label(mask, prepared)
    labels = prepare_label(resample_to_reference(mask, series, is_label=True), prepared)
    assert set(np.unique(labels)) <= set(np.unique(mask.array)) and 5 in labels


def test_modality_warnings_on_real_scans(data_dir):
    chest = read_volume(data_dir / "ct/chest_ct.nrrd")
    mr = read_volume(data_dir / "mr/abdomen_mr_small.nii.gz")
    assert check_intensity_range(chest.array, "CT") is None
    assert "like air in a CT" in check_intensity_range(chest.array, "MR")
    assert check_intensity_range(mr.array, "MR") is None
    assert "no air" in check_intensity_range(mr.array, "CT")


def test_median_spacing_of_the_brain_domain(data_dir):
    volumes = [read_volume(data_dir / f"mr/brain_mr_{n}.nrrd") for n in (1, 2)]
    np.testing.assert_allclose(median_spacing(volumes), (0.78125, 0.78125, 6.5), atol=1e-4)


def test_chest_ct_resamples_labels_without_new_values(data_dir):
    lesion = read_volume(data_dir / "ct/chest_ct_lesion.nrrd")
    out = resample_volume(lesion, (1.0, 1.0, 2.0), is_label=True)
    assert set(np.unique(out.array)) <= set(np.unique(lesion.array)) and out.array.max() > 0
    assert out.array.dtype == lesion.array.dtype
