"""Med3DLib.geometry and Med3DLib.roi: IJK <-> RAS <-> LPS and ROI -> voxel box, on synthetic and real grids."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from Med3DLib import geometry, roi
from med3dcore.errors import Med3DError
from med3dcore.volume_files import read_volume


def rotation_z(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


MATRICES = {
    "identity-ras": np.diag([1.0, 1.0, 1.0, 1.0]),
    "lps-like": np.array([[-0.7, 0, 0, 120.0], [0, -0.7, 0, 95.5], [0, 0, 2.5, -300.0], [0, 0, 0, 1]]),
    "permuted": np.array([[0, 0, -2.0, 10], [-0.5, 0, 0, 20], [0, 3.0, 0, -5], [0, 0, 0, 1]]),
    "left-handed": np.array([[1.5, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, -4.0, 7], [0, 0, 0, 1]]),
}
oblique = np.eye(4)
oblique[:3, :3] = rotation_z(30) @ np.array([[1, 0, 0], [0, np.cos(0.4), -np.sin(0.4)],
                                              [0, np.sin(0.4), np.cos(0.4)]]) @ np.diag([0.8, 0.9, 3.0])
oblique[:3, 3] = [-12.0, 40.0, 3.3]
MATRICES["oblique"] = oblique


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_ijk_to_ras_round_trip(name: str) -> None:
    matrix = MATRICES[name]
    spacing, origin, direction = geometry.lps_geometry(matrix)
    np.testing.assert_allclose(geometry.ijk_to_ras_matrix(spacing, origin, direction), matrix, atol=1e-12)
    # The LPS geometry places voxels where the RAS matrix does, after the L/P sign flip.
    ijk = np.array([[0, 0, 0], [3, 1, 2], [7.5, -2, 11]])
    lps = ijk @ (direction * spacing).T + origin
    ras = geometry.ijk_to_ras(matrix, ijk)
    np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-9)
    np.testing.assert_allclose(geometry.ras_to_ijk(matrix, ras), ijk, atol=1e-9)


def test_lps_geometry_values_of_a_flipped_grid() -> None:
    spacing, origin, direction = geometry.lps_geometry(MATRICES["lps-like"])
    np.testing.assert_allclose(spacing, [0.7, 0.7, 2.5])
    np.testing.assert_allclose(origin, [-120.0, -95.5, -300.0])
    np.testing.assert_allclose(direction, np.eye(3))  # RAS -x, -y is LPS +x, +y


def test_volume_from_node_data_copies_and_keeps_kji() -> None:
    array = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    volume = geometry.volume_from_node_data(array, MATRICES["permuted"])
    assert volume.shape == (2, 3, 4)
    np.testing.assert_array_equal(volume.array, array)
    volume.array[0, 0, 0] = 99
    assert array[0, 0, 0] == 0, "the node's voxels must never be shared with the engine"
    back, matrix = geometry.node_data_from_volume(volume)
    np.testing.assert_allclose(matrix, MATRICES["permuted"], atol=1e-12)


def test_degenerate_and_2d_inputs_are_refused() -> None:
    flat = np.diag([1.0, 1.0, 0.0, 1.0])
    with pytest.raises(Med3DError, match="degenerate"):
        geometry.lps_geometry(flat)
    parallel = np.eye(4)
    parallel[:3, 1] = [1.0, 0, 0]
    with pytest.raises(Med3DError, match="parallel"):
        geometry.lps_geometry(parallel)
    with pytest.raises(Med3DError, match="3D scalar volume"):
        geometry.volume_from_node_data(np.zeros((4, 5)), np.eye(4))


def slicer_matrix_of(image: sitk.Image) -> np.ndarray:
    """IJK-to-RAS as Slicer's volume reader sets it: ITK's LPS geometry with the first two rows negated."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag([-1, -1, 1.0]) @ np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = np.array(image.GetOrigin()) * [-1, -1, 1]
    return matrix


@pytest.mark.parametrize("relative", ["mr/brain_mr_1.nrrd", "ct/chest_ct.nrrd", "ct/abdomen_ct_small.nii.gz",
                                      "dicom/abdomen_ct_series"])
def test_node_geometry_matches_the_engine_reader_on_real_scans(data_dir, relative: str) -> None:
    """A node built the way Slicer loads a file gives the same Volume as med3dcore.volume_files.read_volume."""
    path = data_dir / relative
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(path))
    volume = geometry.volume_from_node_data(sitk.GetArrayFromImage(image), slicer_matrix_of(image))
    expected = read_volume(path)
    np.testing.assert_allclose(volume.spacing, expected.spacing, rtol=1e-6)
    np.testing.assert_allclose(volume.origin, expected.origin, atol=1e-4)
    np.testing.assert_allclose(volume.direction, expected.direction, atol=1e-6)
    np.testing.assert_array_equal(volume.array, expected.array)


# ------------------------------------------------------------------------------------------------------ ROI

SPACING2 = np.diag([2.0, 2.0, 2.0, 1.0])  # voxel i sits at x = 2 i (RAS)


def test_roi_box_axis_aligned() -> None:
    box = roi.roi_to_voxel_box([10, 10, 10], [8, 8, 8], None, SPACING2, (20, 20, 20))
    assert box == ((3, 3, 3), (8, 8, 8))  # x in [6, 14] -> i in 3..7


def test_roi_box_on_a_flipped_grid_is_the_same_voxels() -> None:
    flipped = np.diag([-2.0, -2.0, 2.0, 1.0])
    box = roi.roi_to_voxel_box([-10, -10, 10], [8, 8, 8], None, flipped, (20, 20, 20))
    assert box == ((3, 3, 3), (8, 8, 8))


def test_roi_box_of_a_rotated_roi_covers_its_corners() -> None:
    # Rotated 45 degrees about S: the in-plane half-extent grows to 4*sqrt(2) = 5.66 mm -> x in [4.34, 15.66].
    box = roi.roi_to_voxel_box([10, 10, 10], [8, 8, 8], rotation_z(45), SPACING2, (20, 20, 20))
    assert box == ((3, 3, 3), (8, 8, 8))
    box = roi.roi_to_voxel_box([10, 10, 10], [9, 9, 8], rotation_z(45), SPACING2, (20, 20, 20))
    assert box == ((2, 2, 3), (9, 9, 8))  # half-extent 6.36 -> x in [3.64, 16.36] -> i in 2..8


def test_roi_box_is_clipped_to_the_volume() -> None:
    box = roi.roi_to_voxel_box([0, 0, 0], [10, 10, 10], None, SPACING2, (5, 6, 7))
    assert box == ((0, 0, 0), (3, 3, 3))
    box = roi.roi_to_voxel_box([12, 10, 8], [100, 100, 100], None, SPACING2, (5, 6, 7))
    assert box == ((0, 0, 0), (7, 6, 5))  # (I, J, K) sizes of a (K, J, I) = (5, 6, 7) array


def test_bad_rois_are_refused_with_a_clear_message() -> None:
    with pytest.raises(Med3DError, match="does not contain any voxel"):
        roi.roi_to_voxel_box([500, 0, 0], [10, 10, 10], None, SPACING2, (10, 10, 10))
    with pytest.raises(Med3DError, match="larger than zero"):
        roi.roi_to_voxel_box([10, 10, 10], [10, 0, 10], None, SPACING2, (10, 10, 10))
    with pytest.raises(Med3DError, match="zero length"):
        roi.roi_corners_ras([0, 0, 0], [1, 1, 1], np.zeros((3, 3)))


def test_roi_to_lps_flips_the_centre_and_bounds_a_rotated_roi() -> None:
    center, size = roi.roi_to_lps([10, -20, 30], [8, 6, 4])
    assert center == (-10.0, 20.0, 30.0)
    np.testing.assert_allclose(size, [8, 6, 4])
    _, size = roi.roi_to_lps([0, 0, 0], [8, 8, 4], rotation_z(45))
    np.testing.assert_allclose(size, [8 * np.sqrt(2), 8 * np.sqrt(2), 4])


def test_roi_around_a_real_lesion_holds_every_lesion_voxel(data_dir) -> None:
    """A ROI drawn (in RAS) around chest_ct_lesion's voxels gives a voxel box holding all of them."""
    image = sitk.ReadImage(str(data_dir / "ct" / "chest_ct.nrrd"))
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "ct" / "chest_ct_lesion.nrrd")))
    matrix = slicer_matrix_of(image)
    kji = np.argwhere(lesion > 0)
    assert len(kji) > 0
    ras = geometry.ijk_to_ras(matrix, kji[:, ::-1])
    center = (ras.min(axis=0) + ras.max(axis=0)) / 2
    size = ras.max(axis=0) - ras.min(axis=0) + np.array(image.GetSpacing())  # voxel edges, axis-aligned grid
    start, stop = roi.roi_to_voxel_box(center, size, None, matrix, lesion.shape)
    ijk = kji[:, ::-1]
    assert np.all(ijk >= start) and np.all(ijk < stop)
    # ...and not much more: at most one extra voxel layer on each side.
    assert np.all(np.array(stop) - np.array(start) <= ijk.max(axis=0) - ijk.min(axis=0) + 3)
