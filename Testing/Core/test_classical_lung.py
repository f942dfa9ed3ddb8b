"""The classical lung method on every real CT in ../shared/data: two lungs of plausible size on each full chest CT,
aerated (few voxels above -300 HU), trachea and main bronchi outside; lung bases of the abdominal CT against the
TotalSegmentator silver mask; no lung (and a warning) in the abdominal DICOM series; no bowel gas where a crude
threshold finds plenty; the same world-space result whatever the storage order; a clear error for MR."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from med3dcore.classical_lung import LUNG_LABELS, clean_up_model_labels, inside_body, refine_to_air, segment_lungs
from med3dcore.errors import Med3DError
from med3dcore.metrics import dice
from med3dcore.phantoms import store_as
from med3dcore.volume import Volume
from med3dcore.volume_files import read_volume

FULL_CHESTS = ["ct/chest_ct.nrrd", "ct/chest_ct_lidc1011.nii.gz", "ct/chest_ct_4dphase.nii.gz"]
GUT = (6, 18, 19, 20)          # TotalSegmentator ct_total: stomach, small bowel, duodenum, colon
RIGHT_LOBES, LEFT_LOBES = (12, 13, 14), (10, 11)
_CACHE = {}


def _run(data_dir, name):
    """Scan and classical result, computed once per scan for the whole module."""
    if name not in _CACHE:
        scan = read_volume(data_dir / name)
        _CACHE[name] = scan, segment_lungs(scan)
    return _CACHE[name]


def _ml(mask: np.ndarray, volume: Volume) -> float:
    return float(np.count_nonzero(mask)) * float(np.prod(volume.spacing)) / 1000.0


def crude_threshold(scan: Volume, threshold: float = -400.0, min_ml: float = 5.0) -> np.ndarray:
    """The baseline the issue measured: air inside the body (below -400 HU, not joined to the image border within
    its slice), regions of at least ``min_ml`` kept. Slices are axial in these files (K is the slice axis)."""
    air = np.asarray(scan.array) < threshold
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(air, structure=structure)
    border = np.unique(np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(),
                                       labels[:, :, -1].ravel()]))
    inside = air & ~np.isin(labels, border)
    regions, _ = ndimage.label(inside)
    sizes = np.bincount(regions.ravel()) * float(np.prod(scan.spacing)) / 1000.0
    sizes[0] = 0
    return (sizes >= min_ml)[regions]


@pytest.mark.parametrize("name", FULL_CHESTS)
def test_full_chest_ct_two_aerated_lungs_airways_outside(data_dir, name):
    scan, found = _run(data_dir, name)
    labels = found.labels
    assert labels.same_geometry(scan, atol=1e-6) and labels.array.dtype == np.uint8
    assert set(np.unique(labels.array)) == {0, 1, 2} and found.warnings == []
    world_x = {}
    for info in LUNG_LABELS:
        lung = labels.array == info["value"]
        assert 1.0 <= _ml(lung, scan) / 1000.0 <= 4.5, (info["name"], _ml(lung, scan))
        components, count = ndimage.label(lung, structure=np.ones((3, 3, 3)))
        assert count == 1, (info["name"], count)
        assert np.mean(scan.array[lung] > -300) < 0.02  # aerated: vessels inside are filled, hilum is not
        k, j, i = np.argwhere(lung).mean(axis=0)
        world_x[info["name"]] = (scan.ijk_to_lps() @ np.array([i, j, k, 1.0]))[0]
    assert world_x["right lung"] < world_x["left lung"]  # LPS: x grows towards the patient's left
    # Trachea and both main bronchi were found and cut out: the airway reaches 2 cm to each side of the trachea,
    # its lumen is outside the lungs, and so is all of its top 3 cm (the trachea above the carina).
    airway = found.airway.array > 0
    assert 15.0 <= _ml(airway, scan) <= 120.0
    lps = (scan.ijk_to_lps() @ np.c_[np.argwhere(airway)[:, ::-1], np.ones(int(airway.sum()))].T)[:3]
    trachea_x = lps[0][lps[2] > lps[2].max() - 10.0].mean()
    assert lps[0].min() < trachea_x - 20.0 and lps[0].max() > trachea_x + 20.0
    lumen = airway & (scan.array < -900)
    assert np.count_nonzero(lumen & (labels.array > 0)) <= 0.02 * np.count_nonzero(lumen)
    assert not np.any((labels.array > 0) & airway & (lps_z_map(scan, airway) > lps[2].max() - 30.0))


def lps_z_map(scan: Volume, mask: np.ndarray) -> np.ndarray:
    """World z (mm) of every voxel of ``mask`` in place (NaN elsewhere)."""
    out = np.full(mask.shape, np.nan)
    index = np.argwhere(mask)
    out[tuple(index.T)] = (scan.ijk_to_lps() @ np.c_[index[:, ::-1], np.ones(len(index))].T)[2]
    return out


def test_nodule_inside_the_lung_is_lung(data_dir):
    scan, found = _run(data_dir, "ct/chest_ct.nrrd")
    lesion = read_volume(data_dir / "ct" / "chest_ct_lesion.nrrd").array > 0
    assert lesion.sum() > 100 and np.all(found.labels.array[lesion] == 1)  # a right-lung lesion, soft tissue


def test_abdomen_lung_bases_match_totalsegmentator_and_skip_bowel_gas(data_dir):
    scan, found = _run(data_dir, "ct/abdomen_ct.nii.gz")
    labels = found.labels.array
    silver = read_volume(data_dir / "ct" / "abdomen_ct_lung.nii.gz").array > 0
    assert dice(labels > 0, silver) >= 0.85
    # Per side on the top 30 slices, where the multilabel map holds the lobes (same patient, cropped by index).
    lobes = read_volume(data_dir / "ct" / "abdomen_ct_small_multilabel.nii.gz").array
    top = labels[82:]
    assert dice(top == 1, np.isin(lobes, RIGHT_LOBES)) >= 0.85
    assert dice(top == 2, np.isin(lobes, LEFT_LOBES)) >= 0.85
    gut = np.isin(lobes, GUT)
    crude = crude_threshold(scan)
    assert _ml(crude[82:] & gut, scan) > 20.0  # the crude threshold calls stomach and bowel gas lung ...
    assert dice(crude, silver) < 0.5
    assert np.count_nonzero((top > 0) & gut) == 0  # ... this method does not
    assert _ml(labels > 0, scan) < 1.2 * _ml(silver, scan)


def test_abdominal_dicom_series_shows_no_lung(data_dir):
    scan, found = _run(data_dir, "dicom/abdomen_ct_series")
    assert found.labels.same_geometry(scan) and not found.labels.array.any()
    assert len(found.warnings) == 1 and found.warnings[0].startswith("no lung found in this CT")
    crude = crude_threshold(scan)
    assert _ml(crude, scan) > 10.0  # gas a crude threshold would call lung


def test_mr_is_a_clear_error(data_dir):
    mr = read_volume(data_dir / "mr" / "abdomen_mr_small.nii.gz")
    with pytest.raises(Med3DError, match="needs a CT in Hounsfield units.*no values below -500"):
        segment_lungs(mr)


def test_storage_order_does_not_change_the_world_space_result(data_dir):
    scan, found = _run(data_dir, "ct/chest_ct.nrrd")
    for flip, permute in (((1, 2), None), ((0,), (0, 2, 1))):
        stored = store_as(scan, flip=flip, permute=permute)
        again = segment_lungs(stored).labels
        expected = store_as(found.labels, flip=flip, permute=permute)
        assert again.same_geometry(stored, atol=1e-6)
        assert np.array_equal(again.array, expected.array)


def test_one_lung_in_view_is_labelled_by_its_side(data_dir):
    scan, found = _run(data_dir, "ct/chest_ct.nrrd")
    n = scan.shape[2]
    keep = n // 2 + n // 10  # a field of view on one side, cutting through the mediastinum
    for side, start in (("right", 0), ("left", n - keep)):
        origin = scan.ijk_to_lps() @ np.array([start, 0, 0, 1.0])
        half = Volume(scan.array[:, :, start:start + keep], scan.spacing, tuple(origin[:3]), scan.direction)
        result = segment_lungs(half)
        value = 1 if side == "right" else 2
        assert set(np.unique(result.labels.array)) == {0, value}
        reference = found.labels.array[:, :, start:start + keep] == value
        assert dice(result.labels.array == value, reference) > 0.98
        assert len(result.warnings) == 1 and f"only the {side} lung was found" in result.warnings[0]


def test_padding_noise_and_no_trachea_in_view(data_dir):
    scan, found = _run(data_dir, "ct/chest_ct_lidc1011.nii.gz")  # padded with -2048 outside its circle
    noisy = np.asarray(scan.array, dtype=np.float32) + np.random.default_rng(0).normal(0.0, 60.0, scan.shape)
    noisy[scan.array < -1500] = -3024  # another scanner's padding value
    result = segment_lungs(scan.with_array(noisy.astype(np.int16)))
    for value in (1, 2):
        assert dice(result.labels.array == value, found.labels.array == value) > 0.97
    lower = Volume(scan.array[:45], scan.spacing, scan.origin, scan.direction)  # below the carina: no trachea
    bases = segment_lungs(lower)
    assert bases.details["trachea"] is None
    for value in (1, 2):
        assert dice(bases.labels.array == value, found.labels.array[:45] == value) > 0.97


def test_refine_to_air_puts_a_coarse_boundary_back_on_the_lung(data_dir):
    scan, found = _run(data_dir, "ct/chest_ct.nrrd")
    truth = found.labels.array
    coarse = np.zeros_like(truth)  # a network's typical error: its lungs a few millimetres too large
    for value in (1, 2):
        grown = ndimage.binary_dilation(truth == value, structure=np.ones((1, 3, 3), bool), iterations=4)
        coarse[grown & (coarse == 0)] = value
    refined = refine_to_air(found.labels.with_array(coarse), scan)
    assert refined.same_geometry(scan)
    for value in (1, 2):
        assert dice(coarse == value, truth == value) < 0.94
        assert dice(refined.array == value, truth == value) > 0.98
    other = Volume(truth, scan.spacing, (0.0, 0.0, 0.0), scan.direction)
    with pytest.raises(Med3DError, match="grid differs from the scan"):
        refine_to_air(other, scan)


def test_model_clean_up_keeps_the_lung_inside_the_body_on_its_air(data_dir):
    """A network's lungs grown past the pleura, plus the air beside the patient taken for lung (as a lung model
    did on chest_ct_4dphase): the clean-up keeps nothing outside the body, and the pleura where the CT has it."""
    scan, found = _run(data_dir, "ct/chest_ct.nrrd")
    truth = found.labels.array
    body = inside_body(scan)
    labels = np.where(ndimage.binary_dilation(truth > 0, structure=np.ones((1, 3, 3), bool), iterations=3),
                      1, 0).astype(np.uint8)
    labels[~body & (scan.array < -500)] = 1
    cleaned = clean_up_model_labels(scan, labels.copy())
    assert cleaned.shape == truth.shape and set(np.unique(cleaned)) == {0, 1}
    assert (labels & ~body).sum() > 1000 and not (cleaned.astype(bool) & ~body).any()
    assert dice(labels > 0, truth > 0) < 0.8 and dice(cleaned > 0, truth > 0) > 0.98
    mr = Volume(np.full(truth.shape, 300.0, np.float32), scan.spacing, scan.origin, scan.direction)
    np.testing.assert_array_equal(clean_up_model_labels(mr, labels.copy()), labels)  # not a CT: left alone
