"""Preprocessing on small synthetic volumes: spacing, resampling, intensities, crops, the spec, the way back."""
from __future__ import annotations

import json

import numpy as np
import pytest

from med3dcore.errors import Med3DError
from med3dcore.preprocess import (Box, PreprocessSpec, apply_window, check_intensity_range, clip_percentiles,
                                  crop_or_pad, median_spacing, prepare_label, preprocess_image, resample_to_reference,
                                  resample_volume, resampled_geometry, restore_labels, restore_probabilities, uncrop,
                                  zscore)
from med3dcore.volume import Geometry, Volume, to_canonical

SWAP_IJ = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def world_of_voxels(geometry: Geometry) -> np.ndarray:
    """LPS positions of every voxel centre, shape (K, J, I, 3)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(float)
    return (ijk1 @ geometry.ijk_to_lps().T)[..., :3]


def ramp(geometry: Geometry) -> np.ndarray:
    """A linear function of world position, which linear interpolation reproduces exactly."""
    xyz = world_of_voxels(geometry)
    return (0.5 * xyz[..., 0] - 0.25 * xyz[..., 1] + 2.0 * xyz[..., 2] + 10.0).astype(np.float32)


def ball(shape, centre, radius) -> np.ndarray:
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return ((k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius ** 2).astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


# ------------------------------------------------------------------------------------------------ spacing

def test_median_spacing_of_triples():
    assert median_spacing([(1, 1, 5), (0.5, 0.7, 2.5), (0.8, 0.9, 3)]) == (0.8, 0.9, 3.0)


def test_median_spacing_counts_volumes_in_canonical_order():
    # A volume whose I axis runs along P has its I spacing on the canonical J axis.
    plain = Volume(np.zeros((2, 2, 2)), (1.0, 2.0, 3.0))
    swapped = Volume(np.zeros((2, 2, 2)), (2.0, 1.0, 3.0), direction=SWAP_IJ)
    assert median_spacing([plain, swapped, swapped.geometry]) == (1.0, 2.0, 3.0)


def test_median_spacing_errors():
    with pytest.raises(Med3DError, match="at least one"):
        median_spacing([])
    with pytest.raises(Med3DError, match=r"a spacing \(I, J, K\) must be 3 finite numbers"):
        median_spacing([(1.0, 2.0)])


def test_resampled_geometry_covers_the_same_box():
    g = Geometry((10, 20, 30), (0.7, 0.9, 2.5), (5.0, -3.0, 12.0), SWAP_IJ)
    new = resampled_geometry(g, (1.5, 1.5, 1.5))
    assert new.shape == (17, 12, 14)  # round(30*0.7/1.5), round(20*0.9/1.5), round(10*2.5/1.5)
    centre = lambda geo: geo.ijk_to_lps() @ np.append((np.array(geo.shape[::-1]) - 1) / 2, 1)  # noqa: E731
    np.testing.assert_allclose(centre(new), centre(g), atol=1e-9)
    extent_old = np.array(g.shape[::-1]) * np.array(g.spacing)
    extent_new = np.array(new.shape[::-1]) * np.array(new.spacing)
    assert np.all(np.abs(extent_new - extent_old) <= np.array(new.spacing) / 2 + 1e-9)
    np.testing.assert_array_equal(new.direction, g.direction)


def test_linear_resampling_reproduces_a_linear_function():
    g = Geometry((8, 10, 12), (1.0, 1.5, 3.0), (-4.0, 2.0, 7.0), np.diag([-1.0, 1.0, 1.0]))
    vol = Volume(ramp(g), g.spacing, g.origin, g.direction)
    out = resample_volume(vol, (0.75, 1.0, 2.0))
    assert out.array.dtype == np.float32 and out.spacing == (0.75, 1.0, 2.0)
    expected = ramp(out.geometry)
    # Inside the original voxel centres linear interpolation is exact (edges extrapolate the nearest voxel).
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(out.array[inner], expected[inner], atol=1e-3)


def test_integer_image_resamples_to_float32_without_rounding():
    vol = Volume(np.array([0, 1] * 32, np.int16).reshape(4, 4, 4), (1.0, 1.0, 1.0))
    out = resample_volume(vol, (0.5, 1.0, 1.0))
    assert out.array.dtype == np.float32
    assert np.any((out.array > 0.2) & (out.array < 0.8))  # values between the two inputs exist


def test_label_resampling_never_invents_labels():
    rng = np.random.default_rng(3)
    labels = rng.choice(np.array([0, 2, 7], np.uint8), size=(9, 11, 13))
    vol = Volume(labels, (1.0, 1.3, 2.2), direction=SWAP_IJ)
    for spacing in [(0.6, 0.6, 0.9), (2.1, 1.7, 3.3)]:
        out = resample_volume(vol, spacing, is_label=True)
        assert out.array.dtype == np.uint8
        assert set(np.unique(out.array)) <= {0, 2, 7}


def test_resample_to_reference_on_a_flipped_grid_is_a_flip():
    rng = np.random.default_rng(4)
    vol = Volume(rng.normal(size=(4, 5, 6)).astype(np.float32), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    flipped = Geometry(vol.shape, vol.spacing, (5.0, 8.0, 0.0), np.diag([-1.0, -1.0, 1.0]))
    for is_label in (False, True):
        out = resample_to_reference(vol, flipped, is_label=is_label)
        assert out.same_geometry(flipped)
        np.testing.assert_allclose(out.array, vol.array[:, ::-1, ::-1], atol=1e-6)


def test_resample_to_reference_fills_outside():
    vol = Volume(np.full((4, 4, 4), 7, np.int16))
    shifted = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (2.0, 0.0, 0.0))
    image = resample_to_reference(vol, shifted)
    assert np.all(image.array[..., :2] == 7) and np.all(image.array[..., 2:] == 7)  # min of a constant is 7
    labels = resample_to_reference(vol, shifted, is_label=True)
    assert np.all(labels.array[..., :2] == 7) and np.all(labels.array[..., 2:] == 0)
    assert labels.array.dtype == np.int16


# ----------------------------------------------------------------------------------------------- intensity

def test_apply_window_clips_and_keeps_input():
    a = np.array([-1000, -200, 0, 250, 3000], np.int16).reshape(1, 1, 5)
    out = apply_window(a, -200, 250)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.ravel(), [-200, -200, 0, 250, 250])
    assert a.ravel()[0] == -1000
    with pytest.raises(Med3DError, match="low < high"):
        apply_window(a, 250, -200)


def test_clip_percentiles_matches_numpy():
    a = np.random.default_rng(5).normal(size=(10, 20, 30)) * 100
    out = clip_percentiles(a, 0.5, 99.5)
    lo, hi = np.percentile(a.astype(np.float32), [0.5, 99.5])
    assert out.dtype == np.float32
    assert out.min() == pytest.approx(lo, rel=1e-6) and out.max() == pytest.approx(hi, rel=1e-6)
    inside = (a > lo + 1e-3) & (a < hi - 1e-3)
    np.testing.assert_allclose(out[inside], a[inside], rtol=1e-6)
    with pytest.raises(Med3DError, match="0 <= low < high <= 100"):
        clip_percentiles(a, 99.5, 0.5)


def test_zscore_mean_zero_std_one():
    a = (np.random.default_rng(6).normal(size=(20, 30, 40)) * 300 + 40).astype(np.int16)
    out = zscore(a)
    assert out.dtype == np.float32
    assert abs(float(out.mean())) < 1e-4 and float(out.std()) == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(out, (a - a.mean()) / a.std(), atol=1e-4)


def test_zscore_of_constant_is_zeros_not_nan():
    out = zscore(np.full((3, 4, 5), 42.0))
    assert np.all(out == 0)


# ------------------------------------------------------------------------------------------ crop and pad

def test_centre_crop_and_pad():
    a = np.arange(4 * 6 * 8, dtype=np.int32).reshape(4, 6, 8)
    out, box = crop_or_pad(a, (2, 8, 4), pad_value=-1)
    assert box == Box((1, -1, 2), (2, 8, 4)) and box.stop == (3, 7, 6)
    np.testing.assert_array_equal(out[:, 1:7, :], a[1:3, :, 2:6])
    assert np.all(out[:, 0] == -1) and np.all(out[:, 7] == -1)
    back = uncrop(out, box, a.shape, fill=-5)
    np.testing.assert_array_equal(back[1:3, :, 2:6], a[1:3, :, 2:6])
    assert np.all(back[0] == -5) and np.all(back[:, :, :2] == -5)


def test_crop_around_a_centre_near_the_edge_with_channels():
    a = np.stack([np.arange(5 * 5 * 5).reshape(5, 5, 5)] * 2)
    out, box = crop_or_pad(a, (3, 3, 3), center=(0, 4, 2))
    assert out.shape == (2, 3, 3, 3) and box.start == (-1, 3, 1)
    np.testing.assert_array_equal(out[:, 1:, :2, :], a[:, 0:2, 3:5, 1:4])
    assert np.all(out[:, 0] == 0)
    np.testing.assert_array_equal(uncrop(out, box, (5, 5, 5))[:, 0:2, 3:5, 1:4], a[:, 0:2, 3:5, 1:4])


def test_crop_errors():
    with pytest.raises(Med3DError, match="three positive sizes"):
        crop_or_pad(np.zeros((4, 4, 4)), (0, 2, 2))
    with pytest.raises(Med3DError, match="does not match the crop box"):
        uncrop(np.zeros((2, 2, 2)), Box((0, 0, 0), (3, 3, 3)), (4, 4, 4))


# ---------------------------------------------------------------------------------------------------- spec

def test_spec_round_trips_through_json():
    spec = PreprocessSpec(spacing=(1.5, 1.5, 2), window=(-200, 250), clip_percentiles=(1, 99), zscore=True,
                          canonical=True, modality="ct")
    assert spec.modality == "CT"
    text = json.dumps(spec.to_dict())
    again = PreprocessSpec.from_dict(json.loads(text))
    assert again == spec and again.spacing == (1.5, 1.5, 2.0)
    assert PreprocessSpec.from_dict({}) == PreprocessSpec()
    assert PreprocessSpec().to_dict() == {"spacing": None, "window": None, "clip_percentiles": [0.5, 99.5],
                                          "zscore": True, "canonical": True, "modality": None}


@pytest.mark.parametrize("data, message", [
    ({"spacing": [1, 1]}, "3 finite numbers"),
    ({"spacing": [1, -1, 1]}, "positive"),
    ({"spacing": "1,1,1"}, "3 numbers"),
    ({"window": [250, -200]}, "low < high"),
    ({"clip_percentiles": [0.5, 101]}, "0 <= low < high <= 100"),
    ({"zscore": "yes"}, "true or false"),
    ({"modality": "PET"}, "modality must be one of CT, MR"),
    ({"spacings": [1, 1, 1]}, "unknown preprocessing setting.*spacings"),
])
def test_spec_bad_values(data, message):
    with pytest.raises(Med3DError, match=message):
        PreprocessSpec.from_dict(data)


def test_spec_from_non_mapping():
    with pytest.raises(Med3DError, match="mapping"):
        PreprocessSpec.from_dict([("spacing", None)])


# ------------------------------------------------------------------------------------------------ pipeline

def flipped_swapped_volume(array: np.ndarray, spacing=(1.0, 1.5, 2.0)) -> Volume:
    """A volume stored with I along P, J along -L and K along -S."""
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    return Volume(array, spacing, (30.0, -20.0, 15.0), direction)


def test_pipeline_without_resampling_is_exact_both_ways():
    rng = np.random.default_rng(7)
    image = flipped_swapped_volume(rng.normal(size=(12, 14, 16)).astype(np.float32) * 50)
    spec = PreprocessSpec(zscore=True, clip_percentiles=None)
    array, prepared = preprocess_image(image, spec)
    canon, _ = to_canonical(image)
    assert array.shape == canon.shape == prepared.grid.shape and not prepared.resampled
    np.testing.assert_allclose(array, zscore(canon.array), atol=1e-6)
    labels = ball(image.shape, (6, 7, 8), 5)
    on_grid = prepare_label(image.with_array(labels), prepared)
    np.testing.assert_array_equal(on_grid, to_canonical(image.with_array(labels))[0].array)
    restored = restore_labels(on_grid, prepared)
    assert restored.spacing == image.spacing and restored.origin == image.origin
    assert np.array_equal(restored.direction, image.direction)
    np.testing.assert_array_equal(restored.array, labels)
    probs = restore_probabilities(np.stack([1.0 - on_grid, on_grid]).astype(np.float32), prepared)
    np.testing.assert_array_equal(probs[1], labels)


def test_pipeline_with_resampling_restores_labels_on_the_input_grid():
    image = flipped_swapped_volume(np.zeros((20, 24, 28), np.int16), spacing=(1.0, 1.5, 2.0))
    labels = ball(image.shape, (10, 12, 14), 8) * 3
    spec = PreprocessSpec(spacing=(1.2, 1.2, 1.2), clip_percentiles=None, zscore=False)
    array, prepared = preprocess_image(image, spec)
    assert prepared.resampled and prepared.grid.spacing == (1.2, 1.2, 1.2) and array.shape == prepared.grid.shape
    on_grid = prepare_label(image.with_array(labels), prepared)
    assert on_grid.shape == prepared.grid.shape and set(np.unique(on_grid)) == {0, 3}
    restored = restore_labels(on_grid, prepared)
    assert restored.shape == image.shape and restored.spacing == image.spacing
    assert restored.origin == image.origin and np.array_equal(restored.direction, image.direction)
    assert dice(restored.array == 3, labels == 3) > 0.97
    probs = restore_probabilities(np.stack([on_grid == 0, on_grid == 3]).astype(np.float32), prepared)
    assert probs.shape == (2,) + image.shape and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert dice(probs[1] > 0.5, labels == 3) > 0.97


def test_pipeline_runs_steps_in_order():
    a = np.linspace(-1100, 1500, 10 * 10 * 10, dtype=np.float32).reshape(10, 10, 10)
    image = Volume(a)
    array, prepared = preprocess_image(image, PreprocessSpec(window=(-200, 250), clip_percentiles=None, zscore=False,
                                                             canonical=False))
    np.testing.assert_array_equal(array, np.clip(a, -200, 250))
    array, prepared = preprocess_image(image, PreprocessSpec(window=(-200, 250)))
    expected = zscore(clip_percentiles(apply_window(a, -200, 250)))
    np.testing.assert_allclose(array, expected, atol=1e-5)
    assert prepared.stats["std"] > 0


def test_pipeline_bad_inputs():
    image = Volume(np.zeros((4, 5, 6), np.float32))
    with pytest.raises(Med3DError, match="NaN"):
        preprocess_image(image.with_array(np.full((4, 5, 6), np.nan, np.float32)), PreprocessSpec())
    _, prepared = preprocess_image(image, PreprocessSpec())
    with pytest.raises(Med3DError, match="mask geometry differs from its image"):
        prepare_label(Volume(np.zeros((4, 5, 6), np.uint8), spacing=(2.0, 1.0, 1.0)), prepared)
    with pytest.raises(Med3DError, match=r"do not match the preprocessed grid \(4, 5, 6\)"):
        restore_labels(np.zeros((4, 5, 7), np.int64), prepared)
    with pytest.raises(Med3DError, match="must be integers"):
        restore_labels(np.zeros((4, 5, 6), np.float32), prepared)
    with pytest.raises(Med3DError, match=r"\(C, K, J, I\)"):
        restore_probabilities(np.zeros((4, 5, 6), np.float32), prepared)


def test_restored_int64_labels_come_back_in_a_slicer_friendly_dtype():
    image = Volume(np.zeros((4, 5, 6), np.int16))
    _, prepared = preprocess_image(image, PreprocessSpec())
    restored = restore_labels(np.ones((4, 5, 6), np.int64) * 2, prepared)
    assert restored.array.dtype == np.uint8 and np.all(restored.array == 2)


# ------------------------------------------------------------------------------------------------ warnings

def test_intensity_range_warnings():
    ct = np.full((8, 8, 8), 40, np.int16)
    ct[:, :2] = -1000  # air around the body
    mr = np.random.default_rng(8).integers(0, 800, (8, 8, 8)).astype(np.int16)
    assert check_intensity_range(ct, "CT") is None
    assert check_intensity_range(mr, "MR") is None
    assert "no air" in check_intensity_range(mr, "CT")
    assert "like air in a CT" in check_intensity_range(ct, "MR")
    assert check_intensity_range(mr, None) is None
    with pytest.raises(Med3DError, match="modality"):
        check_intensity_range(mr, "PET")
