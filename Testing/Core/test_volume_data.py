"""Reading, writing and reorienting every real scan and mask in ../shared/data."""
from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from med3dcore.errors import Med3DError
from med3dcore.preprocess import resample_to_reference
from med3dcore.volume import Volume, as_label_map, from_canonical, to_canonical
from med3dcore.volume_files import list_dicom_series, read_geometry, read_volume, write_volume

# Every scan and mask outside nodules/ (those are tested below), with facts from the data README.
SCANS = {
    "ct/abdomen_ct.nii.gz": ((112, 101, 122), (3.0, 3.0, 3.0)),
    "ct/abdomen_ct_liver.nii.gz": ((112, 101, 122), (3.0, 3.0, 3.0)),
    "ct/abdomen_ct_lung.nii.gz": ((112, 101, 122), (3.0, 3.0, 3.0)),
    "ct/abdomen_ct_small.nii.gz": ((30, 101, 122), (3.0, 3.0, 3.0)),
    "ct/abdomen_ct_small_multilabel.nii.gz": ((30, 101, 122), (3.0, 3.0, 3.0)),
    "ct/chest_ct.nrrd": ((48, 512, 512), (0.57, 0.57, 5.0)),
    "ct/chest_ct_lesion.nrrd": ((48, 512, 512), (0.57, 0.57, 5.0)),
    "dicom/abdomen_ct_series": ((20, 512, 512), (0.98, 0.98, 2.0)),
    "dicom/abdomen_ct_series_multilabel.nii.gz": ((20, 512, 512), (0.98, 0.98, 2.0)),
    "dicom/ct_3slice": ((3, 512, 512), (0.81, 0.81, 1.0)),
    "dicom/ct_3slice_liver.nrrd": ((3, 512, 512), (0.81, 0.81, 1.0)),
    "dicom/ct_3slice_spine.nrrd": ((3, 512, 512), (0.81, 0.81, 1.0)),
    "dicom/ct_3slice_heart.nrrd": ((3, 512, 512), (0.81, 0.81, 1.0)),
    "mr/abdomen_mr_small.nii.gz": ((20, 91, 117), (3.0, 3.0, 3.0)),
    "mr/abdomen_mr_small_multilabel.nii.gz": ((20, 91, 117), (3.0, 3.0, 3.0)),
    "mr/brain_mr_1.nrrd": ((25, 256, 256), (0.78, 0.78, 6.5)),
    "mr/brain_mr_1_tumor.nrrd": ((25, 256, 256), (0.78, 0.78, 6.5)),
    "mr/brain_mr_2.nrrd": ((23, 256, 256), (0.78, 0.78, 6.5)),
    "mr/brain_mr_2_tumor.nrrd": ((23, 256, 256), (0.78, 0.78, 6.5)),
}
# (image, mask) pairs stored on the same grid.
PAIRS = [
    ("ct/abdomen_ct.nii.gz", "ct/abdomen_ct_liver.nii.gz"), ("ct/abdomen_ct.nii.gz", "ct/abdomen_ct_lung.nii.gz"),
    ("ct/abdomen_ct_small.nii.gz", "ct/abdomen_ct_small_multilabel.nii.gz"),
    ("ct/chest_ct.nrrd", "ct/chest_ct_lesion.nrrd"),
    ("mr/abdomen_mr_small.nii.gz", "mr/abdomen_mr_small_multilabel.nii.gz"),
    ("mr/brain_mr_1.nrrd", "mr/brain_mr_1_tumor.nrrd"), ("mr/brain_mr_2.nrrd", "mr/brain_mr_2_tumor.nrrd"),
    ("dicom/ct_3slice", "dicom/ct_3slice_liver.nrrd"), ("dicom/ct_3slice", "dicom/ct_3slice_spine.nrrd"),
    ("dicom/ct_3slice", "dicom/ct_3slice_heart.nrrd"),
]


def assert_identical(a: Volume, b: Volume, geometry_atol: float = 0.0) -> None:
    assert a.array.dtype == b.array.dtype and np.array_equal(a.array, b.array)
    if geometry_atol == 0.0:
        assert a.spacing == b.spacing and a.origin == b.origin and np.array_equal(a.direction, b.direction)
    else:
        assert a.same_geometry(b, atol=geometry_atol)


@pytest.mark.parametrize("name", sorted(SCANS))
def test_every_scan_reads_round_trips_and_reorients(data_dir, tmp_path, name):
    vol = read_volume(data_dir / name)
    shape, spacing = SCANS[name]
    assert vol.shape == shape
    assert read_geometry(data_dir / name).same_as(vol.geometry, atol=0.0)
    np.testing.assert_allclose(vol.spacing, spacing, atol=0.01)
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        back = read_volume(write_volume(vol, tmp_path / f"copy{suffix}"))
        # NIfTI keeps geometry in float32: bit-exact for NIfTI sources, within 1e-5 mm for DICOM/NRRD ones.
        exact = not suffix.startswith(".nii") or name.endswith(".nii.gz")
        assert_identical(back, vol, 0.0 if exact else 1e-5)
    canon, orientation = to_canonical(vol)
    assert np.all(np.diag(canon.direction) > 0.99)
    assert_identical(from_canonical(canon, orientation), vol)


@pytest.mark.parametrize("image, mask", PAIRS)
def test_masks_lie_on_their_images_grid(data_dir, image, mask):
    img, msk = read_volume(data_dir / image), read_volume(data_dir / mask)
    assert msk.same_geometry(img, atol=1e-4)
    labels = as_label_map(msk)
    assert labels.array.dtype == np.uint8 and labels.array.max() >= 1


def test_float64_liver_mask_reads_as_labels(data_dir):
    liver = read_volume(data_dir / "ct/abdomen_ct_liver.nii.gz")
    assert liver.array.dtype == np.float64  # as stored
    labels = as_label_map(liver)
    assert labels.array.dtype == np.uint8 and set(np.unique(labels.array)) == {0, 1}


def test_orientations_as_the_readme_says(data_dir):
    # abdomen CT: I->R, J->A (LPS diag -1, -1, 1); brain MR "LAS": I->L, J->A; chest CT: LPS.
    np.testing.assert_array_equal(read_volume(data_dir / "ct/abdomen_ct.nii.gz").direction, np.diag([-1, -1, 1]))
    np.testing.assert_array_equal(read_volume(data_dir / "mr/brain_mr_1.nrrd").direction, np.diag([1, -1, 1]))
    np.testing.assert_array_equal(read_volume(data_dir / "ct/chest_ct.nrrd").direction, np.eye(3))


@pytest.mark.parametrize("name", [n for n in sorted(SCANS) if n.endswith(".nii.gz")])
def test_nibabel_and_simpleitk_agree_on_nifti_geometry(data_dir, name):
    """nibabel gives the RAS affine of the qform/sform; flipping the first two rows must give our LPS matrix,
    and its (I, J, K) voxels must be our (K, J, I) array transposed."""
    nii = nib.load(str(data_dir / name))
    vol = read_volume(data_dir / name)
    lps_from_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    np.testing.assert_allclose(lps_from_ras @ nii.affine, vol.ijk_to_lps(), atol=1e-4)
    assert np.array_equal(np.asarray(nii.dataobj).T, vol.array)


def test_list_dicom_series(data_dir):
    assert list_dicom_series(data_dir / "dicom/abdomen_ct_series") == [("", "CT Body 3.0", 20)]
    assert list_dicom_series(data_dir / "dicom/ct_3slice") == [
        ("1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1", "", 3)]


def test_folder_with_two_series_lists_them(data_dir, tmp_path):
    for folder in ("abdomen_ct_series", "ct_3slice"):
        for source in (data_dir / "dicom" / folder).iterdir():
            (tmp_path / f"{folder}-{source.name}").symlink_to(source)
    with pytest.raises(Med3DError, match=r"2 DICOM series.*--series-uid.*\(no uid\) 'CT Body 3.0' \(20 files\)"
                                         r".*23430.1 '' \(3 files\)"):
        read_volume(tmp_path)
    picked = read_volume(tmp_path, series_uid="1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1")
    assert picked.shape == (3, 512, 512)
    assert read_volume(tmp_path, series_uid="").shape == (20, 512, 512)
    with pytest.raises(Med3DError, match="is not in folder"):
        read_volume(tmp_path, series_uid="1.2.3")


def test_series_with_a_missing_slice_is_refused(data_dir, tmp_path):
    files = sorted((data_dir / "dicom/abdomen_ct_series").iterdir())
    for source in files[:9] + files[10:]:
        (tmp_path / source.name).symlink_to(source)
    with pytest.raises(Med3DError, match="unevenly spaced slices.*between 2 and 4 mm"):
        read_volume(tmp_path)


def test_single_dicom_file_points_to_its_folder(data_dir):
    with pytest.raises(Med3DError, match="one DICOM file; give the folder"):
        read_volume(data_dir / "dicom/ct_3slice/01.dcm")


def corner_points(vol: Volume) -> np.ndarray:
    k, j, i = (n - 1 for n in vol.shape)
    corners = np.array([[a, b, c] for a in (0, i) for b in (0, j) for c in (0, k)], dtype=float)
    return (vol.ijk_to_lps() @ np.c_[corners, np.ones(8)].T).T[:, :3]


def test_dicom_series_and_its_flipped_nifti_mask_share_world_space(data_dir):
    series = read_volume(data_dir / "dicom/abdomen_ct_series")
    mask = read_volume(data_dir / "dicom/abdomen_ct_series_multilabel.nii.gz")
    assert series.array.dtype == np.int16
    # Same box in world space although the mask's J axis runs the other way.
    np.testing.assert_allclose(np.sort(corner_points(mask), axis=0), np.sort(corner_points(series), axis=0),
                               atol=1e-3)
    assert not mask.same_geometry(series)
    on_series = resample_to_reference(mask, series, is_label=True, fill=255)
    assert 255 not in on_series.array  # the mask covers the whole series grid
    assert np.array_equal(on_series.array, mask.array[:, ::-1, :])
    # Anatomy check: liver (ct_total 5) is soft tissue in this contrast CT; overlaying the arrays without
    # world coordinates puts it over fat and air.
    liver_hu = series.array[on_series.array == 5].mean()
    assert 40 < liver_hu < 150
    assert series.array[mask.array == 5].mean() < 0


def test_ct_3slice_dicom_and_masks_anatomy(data_dir):
    ct = read_volume(data_dir / "dicom/ct_3slice")
    assert ct.array.dtype == np.int32 and ct.array.min() == -3024  # GE padding kept as stored
    hu = {}
    for organ, value in (("liver", 1), ("spine", 2), ("heart", 3)):
        mask = read_volume(data_dir / f"dicom/ct_3slice_{organ}.nrrd")
        np.testing.assert_allclose(corner_points(mask), corner_points(ct), atol=1e-3)
        on_ct = resample_to_reference(mask, ct, is_label=True)
        assert np.array_equal(on_ct.array, mask.array) and set(np.unique(mask.array)) == {0, value}
        hu[organ] = np.median(ct.array[mask.array > 0])
    assert 0 < hu["liver"] < 100 and hu["spine"] > 150


# ------------------------------------------------------------------------------------------------- nodules

def nodule_rows(data_dir):
    with open(data_dir / "nodules/labels.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def test_nodule_sample_round_trips_in_every_format(data_dir, tmp_path):
    rows = nodule_rows(data_dir)
    sample = rows[:: max(1, len(rows) // 20)][:20]
    for row in sample:
        for key in ("image", "mask"):
            vol = read_volume(data_dir / "nodules" / row[key])
            for suffix in (".nii.gz", ".nrrd", ".mha"):
                assert_identical(read_volume(write_volume(vol, tmp_path / f"n{suffix}", overwrite=True)), vol)
    assert len(sample) == 20


def test_every_nodule_and_mask_reads_and_reorients_exactly(data_dir):
    rows = nodule_rows(data_dir)
    assert len(rows) == 823
    orientations = set()
    for row in rows:
        image = read_volume(data_dir / "nodules" / row["image"])
        mask = read_volume(data_dir / "nodules" / row["mask"])
        assert mask.same_geometry(image, atol=1e-4), row["mask"]
        labels = as_label_map(mask).array
        assert set(np.unique(labels)) <= {0, 1} and labels.any(), row["mask"]
        canon, orientation = to_canonical(image)
        assert_identical(from_canonical(canon, orientation), image)
        orientations.add(tuple(np.sign(np.diag(image.direction)).astype(int)))
    assert len(orientations) >= 2  # mixed orientations, as the README warns
