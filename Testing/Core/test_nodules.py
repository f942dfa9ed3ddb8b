"""Nodule inputs: geometry (scale, centre, orientation independence), real LIDC crops of mixed spacing and
orientation, a whole chest CT with an ROI or a mask, the classification table, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from med3dcore.errors import Med3DError
from med3dcore.nodules import (NoduleCase, NoduleInputSpec, nodule_box, label_from_row, mask_box, parse_roi,
                               prepare_nodule, prepare_nodule_mask, read_nodule_table, scan_box,
                               trained_context)
from med3dcore.volume import Volume
from med3dcore.volume_files import read_volume, write_volume

SPEC = NoduleInputSpec(cube=32, spacing_mm=1.0, window=(-1000.0, 400.0), context_mm=8.0)


def _sphere_volume(direction: np.ndarray) -> Volume:
    """A 10 mm sphere at 0 HU in air (-1000 HU), centred at LPS (12, -30, 40), on an anisotropic grid."""
    shape_kji = (20, 60, 64)
    spacing = np.array([0.7, 0.8, 2.5])
    origin = np.array([12.0, -30.0, 40.0]) - direction @ (spacing * (np.array(shape_kji[::-1]) - 1) / 2)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape_kji], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], 1).astype(float)
    world = origin + (ijk * spacing) @ direction.T
    inside = np.linalg.norm(world - [12.0, -30.0, 40.0], axis=1) <= 5.0
    array = np.where(inside, 0, -1000).reshape(shape_kji).astype(np.int16)
    return Volume(array, tuple(spacing), tuple(origin), direction)


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0]),
                                       np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, -1]])])
def test_sphere_comes_out_centred_isotropic_and_to_scale(direction):
    cube = prepare_nodule(_sphere_volume(direction), center_lps=(12.0, -30.0, 40.0), size_mm=(40, 40, 40),
                          params=SPEC)
    assert cube.shape == (1, 32, 32, 32) and cube.dtype == np.float32
    solid = cube[0] > (-500 - (-300)) / 700.0  # above -500 HU
    # 10 mm sphere at 1 mm voxels: about 4/3 pi 5^3 = 524 voxels (slice thickness 2.5 mm blurs z a little)
    assert 400 < solid.sum() < 650
    centroid = np.argwhere(solid).mean(axis=0)
    assert np.allclose(centroid, 15.5, atol=0.6)
    extent = np.ptp(np.argwhere(solid), axis=0) + 1
    assert np.all(np.abs(extent - 10) <= 2), extent
    # 0 HU maps to (0 - (-300)) / 700
    assert cube[0, 15, 15, 15] == pytest.approx(300 / 700, abs=1e-3)



@pytest.mark.parametrize("direction", [np.eye(3), np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, -1]])])
def test_a_mask_cube_covers_its_nodule_on_the_image_cube(direction):
    volume = _sphere_volume(direction)
    mask = (volume.array > -500).astype(np.uint8)
    cube = prepare_nodule(volume, mask=mask, params=SPEC)
    fractions = prepare_nodule_mask(volume, mask, params=SPEC)
    assert fractions.shape == (1, 32, 32, 32) and fractions.dtype == np.float32
    assert fractions.min() >= 0.0 and fractions.max() <= 1.0
    # the mask's volume is kept (1 mm voxels: mL x 1000 = voxel sum) and it sits where the image shows the sphere
    voxel_mm3 = float(np.prod(volume.spacing))
    assert fractions.sum() == pytest.approx(mask.sum() * voxel_mm3, rel=0.05)
    solid = cube[0] > (-500 - (-300)) / 700.0
    assert np.abs((fractions[0] > 0.5) ^ solid).sum() <= 0.1 * solid.sum()
    # a label map with another non-zero value is the same nodule
    np.testing.assert_array_equal(prepare_nodule_mask(volume, mask * 3, params=SPEC), fractions)


def test_real_crop_mask_cube_keeps_the_nodule_volume(data_dir):
    case = read_nodule_table(str(data_dir / "nodules" / "labels.csv"))[0]
    image, mask = read_volume(case.image), read_volume(case.mask)
    fractions = prepare_nodule_mask(image, mask, params=SPEC)
    measured_mm3 = float((np.asarray(mask.array) != 0).sum() * np.prod(image.spacing))
    assert fractions.sum() == pytest.approx(measured_mm3, rel=0.03)

def test_flipped_or_transposed_file_gives_the_same_cube(data_dir):
    vol = read_volume(data_dir / "nodules/image/LIDC-IDRI-0001_R_1.nii.gz")
    mask = read_volume(data_dir / "nodules/mask/LIDC-IDRI-0001_R_1.nii.gz")
    reference = prepare_nodule(vol, mask=mask, params=SPEC)

    def flip_i_swap_jk(v: Volume) -> Volume:
        # flip the I axis and swap J and K on disk while keeping every voxel at the same place in the world
        nI = v.array.shape[2]
        array = np.swapaxes(v.array[:, :, ::-1], 0, 1)
        direction = v.direction.copy()
        origin = np.asarray(v.origin) + direction[:, 0] * v.spacing[0] * (nI - 1)
        direction[:, 0] *= -1
        direction = direction[:, [0, 2, 1]]
        spacing = (v.spacing[0], v.spacing[2], v.spacing[1])
        return Volume(np.ascontiguousarray(array), spacing, tuple(origin), direction)

    moved = prepare_nodule(flip_i_swap_jk(vol), mask=flip_i_swap_jk(mask), params=SPEC)
    assert np.allclose(moved, reference, atol=1e-4)


def test_real_crops_of_mixed_spacing_centre_on_the_nodule(data_dir):
    cases = read_nodule_table(str(data_dir / "nodules/labels.csv"))
    picked = [c for c in cases if c.mask][:: 40][:12]
    centre_values, corner_values, spacings = [], [], set()
    for case in picked:
        vol = read_volume(case.image)
        spacings.add(round(vol.spacing[2], 2))
        cube = prepare_nodule(vol, mask=read_volume(case.mask), params=SPEC)[0]
        assert cube.shape == (32, 32, 32)
        assert cube.min() >= -1.0 and cube.max() <= 1.0
        centre_values.append(cube[14:18, 14:18, 14:18].mean())
        corner_values.append(cube[:4, :4, :4].mean())
    assert len(spacings) >= 2  # the sample really mixes slice spacings
    # nodules are soft tissue in air-filled lung: the centre is denser than the far corner, which for all but
    # large nodules lies outside the visible box (mask box + 8 mm) and reads as air (-1)
    assert np.median(centre_values) > np.median(corner_values) + 0.3
    assert sum(bool(np.isclose(v, -1.0)) for v in corner_values) >= len(corner_values) // 2


def test_whole_chest_ct_with_roi_or_mask(data_dir):
    ct = read_volume(data_dir / "ct/chest_ct.nrrd")
    lesion = read_volume(data_dir / "ct/chest_ct_lesion.nrrd")
    low, high = nodule_box(ct, mask=lesion, params=SPEC)
    centre = (low + high) / 2.0  # the cube is centred on the box it shows
    from_mask = prepare_nodule(ct, mask=lesion, params=SPEC)
    from_roi = prepare_nodule(ct, center_lps=centre, size_mm=(30, 30, 30), params=SPEC)
    assert from_roi.shape == from_mask.shape == (1, 32, 32, 32)
    # Same centre, same grid: where both show the scan they agree exactly.
    both = (from_roi > -1) & (from_mask > -1)
    assert both.sum() > 1000
    assert np.allclose(from_roi[both], from_mask[both], atol=1e-5)
    # The ROI box (30 mm) hides the outer voxels of the 32 mm cube.
    assert np.all(from_roi[0, 0] == -1.0) and np.all(from_roi[0, :, :, 0] == -1.0)
    # the lesion is denser than the lung around it
    assert from_mask[0, 14:18, 14:18, 14:18].mean() > from_mask[0].mean()


def test_the_box_shown_given_back_as_an_roi_shows_the_same_input(data_dir):
    """Whatever marks the nodule (mask, ROI partly outside the scan, no size, the whole crop), the box nodule_box
    reports, given back as an ROI, yields the identical cube."""
    ct = read_volume(data_dir / "ct/chest_ct.nrrd")
    lesion = read_volume(data_dir / "ct/chest_ct_lesion.nrrd")
    crop = read_volume(data_dir / "nodules/image/LIDC-IDRI-0001_R_1.nii.gz")
    scan_low, scan_high = scan_box(ct)
    edge = scan_low + np.array([5.0, 60.0, 40.0])  # an ROI sticking out of the scan's low corner
    for scan, marks in ((ct, {"mask": lesion}), (ct, {"center_lps": edge, "size_mm": (40, 40, 40)}),
                        (ct, {"center_lps": edge}), (crop, {})):
        low, high = nodule_box(scan, params=SPEC, **marks)
        assert np.all(low >= scan_box(scan)[0] - 1e-9) and np.all(high <= scan_box(scan)[1] + 1e-9)
        assert np.all(high - low <= SPEC.cube * SPEC.spacing_mm + 1e-9)
        first = prepare_nodule(scan, params=SPEC, **marks)
        again = prepare_nodule(scan, center_lps=(low + high) / 2.0, size_mm=high - low, params=SPEC)
        assert np.array_equal(first, again)


def _place_crop(ct: Volume, crop: Volume, crop_mask: Volume) -> np.ndarray:
    """The crop's mask on the whole CT's grid (the LIDC crops are cut from it on the same voxel grid)."""
    first = np.round(ct.lps_to_ijk(np.asarray(crop.origin, float)[None])[0]).astype(int)[::-1]
    stop = first + np.array(crop.shape)
    assert np.array_equal(np.asarray(ct.array)[first[0]:stop[0], first[1]:stop[1], first[2]:stop[2]], crop.array)
    full = np.zeros(ct.shape, np.uint8)
    full[first[0]:stop[0], first[1]:stop[1], first[2]:stop[2]] = np.asarray(crop_mask.array) > 0
    return full


def test_a_crop_and_its_whole_ct_show_the_network_the_same_cube(data_dir):
    """LIDC-IDRI-1011's three nodule crops are cut from chest_ct_lidc1011 (voxel for voxel). With the context the
    crops were measured to carry (trained_context: 8 mm in-plane, none along z) the cube from crop + mask equals
    the cube from the whole CT + the same mask, up to the outermost half slice (the crop's edge is clamped where
    the CT continues); with 8 mm along z too, the whole CT shows slices no crop has."""
    table = read_nodule_table(str(data_dir / "nodules/labels.csv"))
    spec = trained_context(table, NoduleInputSpec())
    assert spec.context_mm == (8.0, 8.0, 0.0)
    ct = read_volume(data_dir / "ct/chest_ct_lidc1011.nii.gz")
    for n in (1, 2, 3):
        crop = read_volume(data_dir / f"nodules/image/LIDC-IDRI-1011_R_{n}.nii.gz")
        crop_mask = read_volume(data_dir / f"nodules/mask/LIDC-IDRI-1011_R_{n}.nii.gz")
        full = _place_crop(ct, crop, crop_mask)
        matched = np.abs(prepare_nodule(crop, mask=crop_mask, params=spec) - prepare_nodule(ct, mask=full, params=spec))
        wider = np.abs(prepare_nodule(crop, mask=crop_mask) - prepare_nodule(ct, mask=full))  # 8 mm on every side
        assert matched.mean() < 0.005 and np.count_nonzero(matched > 1e-5) <= 2 * 32 * 32  # two edge planes at most
        assert wider.mean() > 0.04 and np.count_nonzero(wider > 1e-5) > 10000


def test_trained_context_follows_the_crops(tmp_path):
    """Per axis, the median over cases of the narrower margin between mask box and crop edge caps the context."""
    cases = []
    for n, pad_z in enumerate((0, 1, 0)):  # margins along z: 0, 2.5, 0 mm -> median 0
        array = np.full((4 + 2 * pad_z, 30, 26), -1000, np.int16)  # 1 mm in-plane: x margin 10 or 8 mm, y 10
        mask = np.zeros(array.shape, np.uint8)
        mask[pad_z:pad_z + 4, 10:20, 8 + 2 * (n == 0):18] = 1
        image_path, mask_path = tmp_path / f"i{n}.nii.gz", tmp_path / f"m{n}.nii.gz"
        write_volume(Volume(array, (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), np.eye(3)), str(image_path))
        write_volume(Volume(mask, (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), np.eye(3)), str(mask_path))
        cases.append(NoduleCase(image=str(image_path), label=n % 2, mask=str(mask_path)))
    assert trained_context(cases, NoduleInputSpec()).context_mm == (8.0, 8.0, 0.0)
    assert trained_context(cases, NoduleInputSpec(context_mm=5.0)).context_mm == (5.0, 5.0, 0.0)
    per_axis = NoduleInputSpec(context_mm=(3.0, 4.0, 5.0))
    assert trained_context(cases, per_axis) is per_axis  # already per axis: as given
    roi_case = NoduleCase(image=cases[0].image, label=0, roi=(10.0, 15.0, 5.0, 20.0, 20.0, 10.0))
    assert trained_context(cases + [roi_case], NoduleInputSpec()).context_mm == 8.0  # an ROI is shown as drawn
    volume = read_volume(cases[1].image)
    _, low, high = mask_box(volume, read_volume(cases[1].mask), (8.0, 8.0, 0.0))
    assert np.allclose(high - low, [10 + 16, 10 + 16, 10.0])
    write_volume(volume.with_array(np.zeros(volume.shape, np.uint8)), cases[2].mask, overwrite=True)
    with pytest.raises(Med3DError, match=r"m2\.nii\.gz: the mask has no voxels"):
        trained_context(cases, NoduleInputSpec())


def test_roi_outside_the_scan_is_a_clear_error(data_dir):
    ct = read_volume(data_dir / "ct/chest_ct.nrrd")
    low, high = scan_box(ct)
    outside = (high[0] + 50.0, (low[1] + high[1]) / 2, (low[2] + high[2]) / 2)
    with pytest.raises(Med3DError, match="outside the scan.*LPS"):
        prepare_nodule(ct, center_lps=outside, size_mm=(20, 20, 20), params=SPEC)


def test_bad_masks_and_rois_are_clear_errors():
    vol = _sphere_volume(np.eye(3))
    with pytest.raises(Med3DError, match="no voxels"):
        prepare_nodule(vol, mask=vol.with_array(np.zeros(vol.shape, np.uint8)))
    shifted = Volume(np.ones(vol.shape, np.uint8), vol.spacing, tuple(np.add(vol.origin, 5.0)), vol.direction)
    with pytest.raises(Med3DError, match="geometry differs.*resample the mask"):
        prepare_nodule(vol, mask=shifted)
    with pytest.raises(Med3DError, match="either a mask or an ROI"):
        prepare_nodule(vol, mask=vol.with_array(np.ones(vol.shape, np.uint8)), center_lps=(12, -30, 40))
    with pytest.raises(Med3DError, match="size must be three positive"):
        prepare_nodule(vol, center_lps=(12, -30, 40), size_mm=(0, 10, 10))
    with pytest.raises(Med3DError, match="CX,CY,CZ,SX,SY,SZ"):
        parse_roi("1,2,3")
    assert parse_roi("1, 2,3,4,5,6") == (1, 2, 3, 4, 5, 6)


def test_spec_round_trip_and_validation():
    spec = NoduleInputSpec(cube=24, spacing_mm=1.25)
    assert NoduleInputSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(Med3DError, match="unknown nodule input"):
        NoduleInputSpec.from_dict({"cubes": 3})
    with pytest.raises(Med3DError, match="cube must be"):
        NoduleInputSpec.from_dict({"cube": 4})
    per_axis = NoduleInputSpec(context_mm=(8.0, 8.0, 0.0))
    assert per_axis.to_dict()["context_mm"] == [8.0, 8.0, 0.0]
    assert NoduleInputSpec.from_dict(per_axis.to_dict()) == per_axis
    with pytest.raises(Med3DError, match="one number or three"):
        NoduleInputSpec.from_dict({"context_mm": [8.0, 8.0]})
    with pytest.raises(Med3DError, match="context margin"):
        NoduleInputSpec.from_dict({"context_mm": [8.0, -1.0, 0.0]})


def test_real_label_table(data_dir):
    cases = read_nodule_table(str(data_dir / "nodules/labels.csv"))
    assert len(cases) == 823
    assert sum(c.label for c in cases) == 207
    assert len({c.patient for c in cases}) == 445
    assert all(c.mask for c in cases)


def test_malignancy_ratings_merge_as_in_the_paper():
    assert [label_from_row({"malignancy": str(r)}, 2) for r in range(1, 6)] == [0, 0, 0, 1, 1]
    assert label_from_row({"label": "Malignant"}, 2) == 1
    with pytest.raises(Med3DError, match="line 7"):
        label_from_row({"label": "maybe"}, 7)


def test_table_errors(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("path,label\na.nii,1\n")
    with pytest.raises(Med3DError, match="'image' column"):
        read_nodule_table(str(bad))
    bad.write_text("image,label\nmissing.nii.gz,benign\n")
    with pytest.raises(Med3DError, match="line 2: image .* does not exist"):
        read_nodule_table(str(bad))
