"""Volume geometry, file round trips and bad inputs, on small synthetic volumes (real scans: test_volume_data.py)."""
from __future__ import annotations

import gzip
import itertools

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from med3dcore.errors import Med3DError
from med3dcore.volume import (Geometry, Volume, as_label_map, canonical_spacing, from_canonical, smallest_label_dtype,
                              to_canonical)
from med3dcore.volume_files import read_geometry, read_volume, write_volume

FORMATS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def oblique_volume(dtype=np.int16) -> Volume:
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=(5, 6, 7)).astype(dtype)
    direction = rotation(2, 20) @ rotation(0, -10)
    return Volume(array, (0.7, 0.8, 2.5), (-12.25, 30.5, -100.125), direction)


def world(volume: Volume, ijk) -> np.ndarray:
    ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
    return (volume.ijk_to_lps() @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]


# ------------------------------------------------------------------------------------------------ geometry

def test_geometry_matches_simpleitk_index_to_point():
    vol = oblique_volume()
    image = vol.to_sitk()
    for ijk in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        expected = image.TransformIndexToPhysicalPoint(ijk)
        np.testing.assert_allclose(world(vol, ijk)[0], expected, atol=1e-9)
    # Array order (K, J, I): voxel (I=6, J=1, K=2) is array[2, 1, 6].
    assert image[6, 1, 2] == vol.array[2, 1, 6]


def test_lps_to_ijk_inverts_ijk_to_lps():
    vol = oblique_volume()
    ijk = np.array([[0.0, 0.0, 0.0], [6.0, 5.0, 4.0], [1.5, 2.25, 3.75]])
    np.testing.assert_allclose(vol.lps_to_ijk(world(vol, ijk)), ijk, atol=1e-9)


def test_sitk_round_trip_keeps_everything():
    vol = oblique_volume(np.float32)
    back = Volume.from_sitk(vol.to_sitk())
    assert back.array.dtype == np.float32 and np.array_equal(back.array, vol.array)
    assert back.spacing == vol.spacing and back.origin == vol.origin
    assert np.array_equal(back.direction, vol.direction)


def test_bool_array_becomes_uint8_in_sitk():
    vol = Volume(np.zeros((2, 3, 4), bool))
    assert vol.to_sitk().GetPixelID() == sitk.sitkUInt8


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4, 5)])
def test_non_3d_arrays_are_refused(shape):
    with pytest.raises(Med3DError, match="3D volumes"):
        Volume(np.zeros(shape))


@pytest.mark.parametrize("kwargs, message", [
    ({"spacing": (1, 1)}, "three finite numbers"),
    ({"spacing": (1, 0, 1)}, "positive"),
    ({"origin": (0, np.nan, 0)}, "finite"),
    ({"direction": np.zeros((3, 3))}, "singular"),
    ({"direction": np.eye(2)}, "3x3"),
])
def test_bad_geometry_is_refused(kwargs, message):
    with pytest.raises(Med3DError, match=message):
        Volume(np.zeros((2, 2, 2)), **kwargs)


def test_with_array_and_same_geometry():
    vol = oblique_volume()
    other = vol.with_array(vol.array * 2)
    assert other.same_geometry(vol) and np.array_equal(other.array, vol.array * 2)
    shifted = Volume(vol.array, vol.spacing, (vol.origin[0] + 0.01,) + vol.origin[1:], vol.direction)
    assert not shifted.same_geometry(vol) and shifted.same_geometry(vol, atol=0.02)
    with pytest.raises(Med3DError, match="shape"):
        vol.with_array(np.zeros((5, 6, 8)))


# ------------------------------------------------------------------------------------------------- files

@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64])
def test_round_trip_every_format_and_dtype(tmp_path, suffix, dtype):
    vol = oblique_volume(dtype)
    path = write_volume(vol, tmp_path / f"v{suffix}")
    back = read_volume(path)
    assert back.array.dtype == np.dtype(dtype)
    assert np.array_equal(back.array, vol.array)
    if suffix.startswith(".nii"):
        # NIfTI stores geometry as float32: exact to float32 precision.
        assert back.same_geometry(vol, atol=1e-5)
    elif suffix in (".nrrd", ".nhdr"):
        # NRRD stores spacing x direction vectors; an oblique grid comes back to the last bit or two.
        assert back.same_geometry(vol, atol=1e-12)
    else:
        assert back.spacing == vol.spacing and back.origin == vol.origin
        assert np.array_equal(back.direction, vol.direction)


@pytest.mark.parametrize("suffix", FORMATS)
def test_axis_aligned_geometry_round_trips_bit_for_bit(tmp_path, suffix):
    vol = Volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4), (0.5, 0.75, 2.0), (-120.5, 33.25, -7.0),
                 np.diag([-1.0, -1.0, 1.0]))
    back = read_volume(write_volume(vol, tmp_path / f"v{suffix}"))
    assert np.array_equal(back.array, vol.array)
    assert back.spacing == vol.spacing and back.origin == vol.origin
    assert np.array_equal(back.direction, vol.direction)


@pytest.mark.parametrize("use_sform", [True, False])
def test_nifti_written_by_nibabel_reads_in_lps(tmp_path, use_sform):
    """nibabel's affine maps (I, J, K) to RAS; ours to LPS: they differ by negating the first two rows."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(2, 30) @ rotation(0, 15) @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = (-100.5, 20.25, 33.0)
    data = np.random.default_rng(2).integers(0, 500, (7, 6, 5)).astype(np.int16)  # (I, J, K)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine if use_sform else None, code=1 if use_sform else 0)
    nib.save(image, str(tmp_path / "n.nii.gz"))
    vol = read_volume(tmp_path / "n.nii.gz")
    np.testing.assert_allclose(vol.ijk_to_lps(), np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, atol=1e-4)
    assert np.array_equal(vol.array, data.T)


@pytest.mark.parametrize("suffix", FORMATS)
def test_read_geometry_reads_the_header_only_and_agrees(tmp_path, suffix):
    vol = oblique_volume()
    path = write_volume(vol, tmp_path / f"v{suffix}")
    geometry = read_geometry(path)
    assert geometry.same_as(read_volume(path).geometry, atol=0.0)
    assert geometry.shape == vol.shape


def test_read_geometry_refuses_what_read_volume_refuses(tmp_path):
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    (tmp_path / "notes.nii.gz").write_text("patient list\n")
    for name, message in (("slice.nrrd", "2D image"), ("rgb.nrrd", "3 values per voxel"),
                          ("notes.nii.gz", "cannot read"), ("missing.nrrd", "does not exist")):
        with pytest.raises(Med3DError, match=message):
            read_geometry(tmp_path / name)


def test_write_refuses_to_overwrite_unless_asked(tmp_path):
    vol = oblique_volume()
    path = write_volume(vol, tmp_path / "v.nrrd")
    with pytest.raises(Med3DError, match="already exists.*--overwrite"):
        write_volume(vol.with_array(vol.array + 1), path)
    assert np.array_equal(read_volume(path).array, vol.array)
    write_volume(vol.with_array(vol.array + 1), path, overwrite=True)
    assert np.array_equal(read_volume(path).array, vol.array + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nrrd"]  # no temporary files left behind


def test_write_errors(tmp_path):
    vol = oblique_volume()
    with pytest.raises(Med3DError, match="does not exist; create it first"):
        write_volume(vol, tmp_path / "missing" / "v.nii.gz")
    with pytest.raises(Med3DError, match="choose a file name ending in"):
        write_volume(vol, tmp_path / "v.png")
    folder = tmp_path / "folder.nrrd"
    folder.mkdir()
    with pytest.raises(Med3DError, match="is a folder"):
        write_volume(vol, folder, overwrite=True)


def expect_read_error(path, message: str) -> str:
    with pytest.raises(Med3DError, match=message) as info:
        read_volume(path)
    assert "\n" not in str(info.value)  # the CLI prints it as one line
    return str(info.value)


def test_missing_path(tmp_path):
    expect_read_error(tmp_path / "nothing.nii.gz", "does not exist")


@pytest.mark.parametrize("name", ["photo.png", "photo.jpg"])
def test_png_and_jpeg_are_refused(tmp_path, name):
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(tmp_path / name))
    expect_read_error(tmp_path / name, "not a volume format.*NIfTI")


def test_text_renamed_nifti(tmp_path):
    (tmp_path / "notes.nii.gz").write_text("patient list\n")
    expect_read_error(tmp_path / "notes.nii.gz", "cannot read .*notes.nii.gz.* as NIfTI")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti(tmp_path, suffix):
    # SimpleITK alone reads a truncated NIfTI without complaint, filling the gap with garbage.
    noise = np.random.default_rng(0).normal(size=(20, 30, 40)).astype(np.float32)
    path = write_volume(Volume(noise), tmp_path / f"v{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    expect_read_error(path, "truncated or damaged.*header promises")
    path.write_bytes(data[:200])  # not even a whole header
    expect_read_error(path, "damaged, truncated")


def test_truncated_gzip_stream_inside_nifti(tmp_path):
    path = write_volume(oblique_volume(np.float32), tmp_path / "v.nii.gz")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))  # a valid gzip file whose voxels are short
    expect_read_error(path, "truncated or damaged.*header promises")


def test_multi_member_gzip_nifti_is_complete(tmp_path):
    # bgzip and some tools write several gzip members; the size in the last trailer covers only the last one.
    vol = oblique_volume(np.float32)
    path = write_volume(vol, tmp_path / "v.nii.gz")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:500]) + gzip.compress(raw[500:]))
    assert np.array_equal(read_volume(path).array, vol.array)
    path.write_bytes(gzip.compress(raw[:500]) + gzip.compress(raw[500:])[:-30])
    expect_read_error(path, "truncated or damaged")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_truncated_nrrd_and_metaimage(tmp_path, suffix):
    path = write_volume(oblique_volume(np.float32), tmp_path / f"v{suffix}", compress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 200])
    expect_read_error(path, "damaged, truncated")


def test_empty_folder(tmp_path):
    expect_read_error(tmp_path, "is empty")


def test_folder_without_dicom(tmp_path):
    write_volume(oblique_volume(), tmp_path / "v.nii.gz")
    (tmp_path / "readme.txt").write_text("not dicom")
    expect_read_error(tmp_path, "no DICOM series found")


def test_2d_image(tmp_path):
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "slice.nii.gz"))
    expect_read_error(tmp_path / "slice.nii.gz", "is a 2D image")


def test_single_slice_volume(tmp_path):
    sitk.WriteImage(sitk.Image([8, 8, 1], sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    expect_read_error(tmp_path / "slice.nrrd", "single slice")


def test_4d_image(tmp_path):
    sitk.WriteImage(sitk.Image([8, 8, 4, 3], sitk.sitkInt16), str(tmp_path / "series.nii.gz"))
    expect_read_error(tmp_path / "series.nii.gz", "4D image.*extract one 3D volume")


def test_4d_header_around_one_volume_is_read(tmp_path):
    image = sitk.Image([8, 7, 4, 1], sitk.sitkInt16)
    image[3, 2, 1, 0] = 42
    sitk.WriteImage(image, str(tmp_path / "one.nii.gz"))
    vol = read_volume(tmp_path / "one.nii.gz")
    assert vol.shape == (4, 7, 8) and vol.array[1, 2, 3] == 42


def test_vector_image(tmp_path):
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    expect_read_error(tmp_path / "rgb.nrrd", "3 values per voxel")


# ------------------------------------------------------------------------------------------------ label maps

def test_smallest_label_dtype():
    assert smallest_label_dtype(np.array([0, 255])) == np.uint8
    assert smallest_label_dtype(np.array([-1, 5])) == np.int8
    assert smallest_label_dtype(np.array([0, 300])) == np.uint16
    assert smallest_label_dtype(np.array([0, 70000], np.int64)) == np.uint32
    assert smallest_label_dtype(np.array([-70000, 1])) == np.int32
    with pytest.raises(Med3DError, match="32-bit"):
        smallest_label_dtype(np.array([0, 2 ** 40]))


def test_float_mask_becomes_integer_label_map():
    mask = Volume(np.array([0.0, 1.0, 2.0, 1.0] * 2).reshape(2, 2, 2))
    labels = as_label_map(mask)
    assert labels.array.dtype == np.uint8 and np.array_equal(labels.array, mask.array.astype(np.uint8))
    assert labels.same_geometry(mask)
    wide = as_label_map(Volume(np.full((2, 2, 2), 1000, np.int64)))
    assert wide.array.dtype == np.uint16


@pytest.mark.parametrize("values, message", [
    ([0.0, 0.5], "fractional"), ([0.0, np.nan], "NaN"), ([-1024, 40], "negative"),
])
def test_bad_label_maps(values, message):
    with pytest.raises(Med3DError, match=message):
        as_label_map(Volume(np.resize(np.array(values), (2, 2, 2))))


# -------------------------------------------------------------------------------------------- orientation

def signed_permutations():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            direction = np.zeros((3, 3))
            for axis, (row, sign) in enumerate(zip(perm, signs)):
                direction[row, axis] = sign
            yield direction


@pytest.mark.parametrize("direction", list(signed_permutations()))
def test_canonical_is_identity_keeps_world_positions_and_inverts_exactly(direction):
    rng = np.random.default_rng(1)
    vol = Volume(rng.integers(0, 1000, (3, 4, 5)).astype(np.int16), (1.0, 2.0, 3.0), (10.5, -3.0, 7.25), direction)
    canon, orientation = to_canonical(vol)
    np.testing.assert_array_equal(canon.direction, np.eye(3))
    # Every voxel keeps its world position.
    k, j, i = np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij")
    ijk = np.c_[i.ravel(), j.ravel(), k.ravel()]
    canon_ijk = np.round(canon.lps_to_ijk(world(vol, ijk))).astype(int)
    np.testing.assert_array_equal(canon.array[canon_ijk[:, 2], canon_ijk[:, 1], canon_ijk[:, 0]], vol.array.ravel())
    # Spacing follows the axes: world axis L, P, S get the spacing of the image axis along them.
    expected_spacing = tuple(vol.spacing[int(np.argmax(np.abs(direction[w])))] for w in range(3))
    assert canon.spacing == expected_spacing == canonical_spacing(vol)
    back = from_canonical(canon, orientation)
    assert np.array_equal(back.array, vol.array) and back.array.dtype == vol.array.dtype
    assert back.spacing == vol.spacing and back.origin == vol.origin
    assert np.array_equal(back.direction, vol.direction)


def test_oblique_volume_gets_the_closest_axes():
    # I points mostly along S, J along L, K along P: canonical axes are (J, K, I) with the signs fixed.
    base = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    direction = rotation(1, 15) @ base
    vol = Volume(np.arange(60, dtype=np.int16).reshape(3, 4, 5), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0), direction)
    canon, orientation = to_canonical(vol)
    assert orientation.axes == (1, 2, 0) and orientation.flips == (True, False, False)
    assert np.all(np.diag(canon.direction) > 0.95)
    assert canon.shape == (5, 3, 4)  # canonical (K, J, I) sizes are those of the original (I, K, J)
    back = from_canonical(canon.array, orientation)
    assert np.array_equal(back.array, vol.array) and np.array_equal(back.direction, vol.direction)


def test_orientation_works_on_channel_arrays():
    vol = Volume(np.arange(60, dtype=np.float32).reshape(3, 4, 5), direction=np.diag([-1.0, 1.0, -1.0]))
    canon, orientation = to_canonical(vol)
    stacked = np.stack([vol.array, -vol.array])
    forward = orientation.forward(stacked)
    assert np.array_equal(forward[0], canon.array) and np.array_equal(forward[1], -canon.array)
    assert np.array_equal(orientation.inverse(forward), stacked)


def test_from_canonical_refuses_a_wrong_shape():
    vol = Volume(np.zeros((3, 4, 5)), direction=np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    _, orientation = to_canonical(vol)
    with pytest.raises(Med3DError, match="does not match"):
        from_canonical(np.zeros((3, 4, 5)), orientation)


def test_geometry_describe_is_readable():
    text = Geometry((3, 4, 5), (0.5, 0.5, 2.0), (1.0, 2.0, 3.0)).describe()
    assert text == "size 5x4x3 (I x J x K), spacing 0.5x0.5x2 mm, origin (1, 2, 3)"
