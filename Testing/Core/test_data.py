"""Domains, run configs, up-front validation, the preprocessing cache and patch sampling (phantoms + real scans)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from med3dcore.domains import domain_from_dict, load_run_config
from med3dcore.errors import Med3DError
from med3dcore.phantoms import make_ct_phantom, write_phantom_domains
from med3dcore.training_data import PatchSampler, PreparedCases, preprocess_case, validate_domains
from med3dcore.volume import Volume
from med3dcore.volume_files import write_volume


@pytest.fixture(scope="module")
def phantom_config(tmp_path_factory):
    return write_phantom_domains(tmp_path_factory.mktemp("phantoms"), n_cases=3, seed=0, shape=(16, 24, 24))


def test_all_source_layouts_load_with_their_label_spaces(phantom_config):
    run = load_run_config(phantom_config)
    by_name = {d.name: d for d in run.domains}
    assert [len(d.cases) for d in run.domains] == [3, 3, 3, 3]
    assert by_name["phantom_ct_lung"].label_names == {1: "lung", 2: "lung_nodule"}
    assert by_name["phantom_ct_liver"].label_names == {1: "liver", 2: "liver_tumour"}
    assert by_name["phantom_ct_bone"].label_names == {1: "bone"} and by_name["phantom_ct_bone"].modality == "CT"
    assert by_name["phantom_mr_abdomen"].modality == "MR"
    assert by_name["phantom_ct_liver"].cases[1].image.name == "case_001.nii.gz"  # from the CSV
    assert run.training["patch_size"] == [24, 24, 24] and run.model["depth"] == 10


def test_validation_gives_each_domain_its_median_spacing(phantom_config):
    run = load_run_config(phantom_config)
    spacings = validate_domains(run.domains)
    assert spacings == {"phantom_ct_lung": (2.0, 2.0, 2.5), "phantom_ct_liver": (1.5, 1.5, 3.0),
                        "phantom_ct_bone": (2.0, 2.0, 2.0), "phantom_mr_abdomen": (2.0, 2.0, 3.0)}


def test_folder_pair_matches_nnunet_names_and_reports_unmatched(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for name in ("a_0000.nii.gz", "b_0000.nii.gz", "c.nii.gz"):
        (tmp_path / "img" / name).write_bytes(b"")
    for name in ("a.nii.gz", "b.nii.gz", "d.nii.gz"):
        (tmp_path / "lab" / name).write_bytes(b"")
    with pytest.raises(Med3DError, match="no label for c.nii.gz; no image for d"):
        domain_from_dict({"name": "x", "images": "img", "masks": "lab", "labels": {1: "a"}}, tmp_path)
    os.remove(tmp_path / "img" / "c.nii.gz")
    os.remove(tmp_path / "lab" / "d.nii.gz")
    domain = domain_from_dict({"name": "x", "images": "img", "masks": "lab", "labels": {1: "a"}}, tmp_path)
    assert [(c.case_id, c.label.name) for c in domain.cases] == [("a", "a.nii.gz"), ("b", "b.nii.gz")]


@pytest.mark.parametrize("entry,message", [
    ({"name": "x", "csv": "a.csv", "images": "i"}, "exactly one of"),
    ({"name": "ct.abdomen", "csv": "a.csv"}, "needs a 'name' of letters"),
    ({"name": "x", "cases": [{"image": "a.nii.gz", "label": "b.nii.gz"}], "labels": {300: "rib"}},
     "label values must be 1..255"),
    ({"name": "x", "images": "i"}, "no 'masks' folder"),
    ({"name": "x", "cases": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}, "no label names"),
    ({"name": "x", "cases": [{"image": "a.nii.gz", "label": "b.nii.gz"}], "labels": {1: "a"},
      "label_map": {5: 2}}, "label_map targets \\[2\\] have no name"),
    ({"name": "x", "cases": [{"image": "a", "masks": {"kidney": "k"}}], "labels": {1: "liver"}}, "masks \\['kidney'\\]"),
    ({"name": "x", "cases": [{"image": "a.nii.gz", "label": "${MED3D_NOT_SET_ANYWHERE}/b"}], "labels": {1: "a"}},
     "MED3D_NOT_SET_ANYWHERE"),
])
def test_bad_domain_entries_are_clear_errors(tmp_path, entry, message):
    with pytest.raises(Med3DError, match=message):
        domain_from_dict(entry, tmp_path)


def test_validation_reports_every_problem_at_once(tmp_path):
    image, labels, _ = make_ct_phantom((12, 16, 16), seed=1)
    write_volume(image, tmp_path / "img.nii.gz")
    write_volume(labels, tmp_path / "lab.nii.gz")  # values 1..5
    organs = np.where(labels.array <= 2, labels.array, 0).astype(np.uint8)
    shifted = Volume(organs, labels.spacing, (5.0, 0.0, 0.0), labels.direction)
    write_volume(shifted, tmp_path / "shifted.nii.gz")
    write_volume(labels.with_array(np.zeros_like(labels.array)), tmp_path / "empty.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    domains = [
        domain_from_dict({"name": "organs", "labels": {1: "lung", 2: "liver"}, "cases": [
            {"id": "ok_but_extra_labels", "image": "img.nii.gz", "label": "lab.nii.gz"},
            {"id": "moved", "image": "img.nii.gz", "label": "shifted.nii.gz"},
            {"id": "empty", "image": "img.nii.gz", "label": "empty.nii.gz"},
        ]}, tmp_path),
        domain_from_dict({"name": "other", "labels": {1: "x"}, "cases": [
            {"id": "broken", "image": "broken.nii.gz", "label": "lab.nii.gz"},
            {"id": "missing", "image": "img.nii.gz", "label": "nowhere.nii.gz"},
        ]}, tmp_path),
    ]
    with pytest.raises(Med3DError) as err:
        validate_domains(domains)
    message = str(err.value)
    assert "\n" not in message and message.startswith("5 problem(s) in the data")
    assert "case ok_but_extra_labels: label values [3, 4, 5] are outside the domain's label space [1, 2]" in message
    assert "case moved: label grid differs from the image" in message
    assert "case empty: the label map is empty" in message
    assert "domain 'other', case broken: image:" in message
    assert "case missing: label:" in message and "nowhere.nii.gz" in message
    # A label_map selecting a subset makes the first case valid.
    ok = domain_from_dict({"name": "subset", "labels": {1: "lung", 2: "liver"}, "label_map": {1: 1, 2: 2},
                           "cases": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}, tmp_path)
    assert validate_domains([ok]) == {"subset": tuple(float(s) for s in image.spacing)}


def test_masks_are_merged_into_one_label_space(tmp_path):
    image, labels, _ = make_ct_phantom((12, 16, 16), seed=2)
    write_volume(image, tmp_path / "img.nii.gz")
    write_volume(labels.with_array((labels.array == 2).astype(np.uint8)), tmp_path / "liver.nrrd")
    write_volume(labels.with_array((labels.array == 4).astype(np.uint8)), tmp_path / "bone.nrrd")
    domain = domain_from_dict({"name": "m", "labels": {1: "liver", 2: "bone"}, "cases": [
        {"image": "img.nii.gz", "masks": {"liver": "liver.nrrd", "bone": "bone.nrrd"}}]}, tmp_path)
    spacing = validate_domains([domain])["m"]
    array, merged = preprocess_case(domain.cases[0], domain, _spec(domain, spacing))
    assert np.array_equal(merged == 1, labels.array == 2) and np.array_equal(merged == 2, labels.array == 4)
    assert abs(float(array.mean())) < 1e-4 and abs(float(array.std()) - 1) < 1e-3  # z-scored


def _spec(domain, spacing):
    from med3dcore.training_data import domain_spec
    return domain_spec(domain, spacing)


def test_cache_is_reused_and_a_changed_source_invalidates_its_entry(tmp_path):
    config = write_phantom_domains(tmp_path / "d", n_cases=2, seed=3, shape=(12, 16, 16))
    run = load_run_config(config)
    spacings = validate_domains(run.domains)
    data = PreparedCases(run.domains, spacings, tmp_path / "cache")
    image, labels = data.arrays(0, 1)
    assert isinstance(image, np.memmap) and image.dtype == np.float32 and labels.dtype == np.uint8
    paths = data.entry_paths(0, 1)
    assert all(p.is_file() for p in paths)
    mtime = paths[0].stat().st_mtime_ns
    # A fresh instance (a new run) finds the entry and does not redo it.
    again = PreparedCases(run.domains, spacings, tmp_path / "cache")
    assert np.array_equal(again.arrays(0, 1)[0], image) and paths[0].stat().st_mtime_ns == mtime
    # Change the source label: different file contents and mtime -> a new key, the stale entry is removed.
    case = run.domains[0].cases[1]
    changed = np.zeros(labels.shape, np.uint8)
    changed[2:6, 3:9, 4:8] = 1
    from med3dcore.volume_files import read_volume
    old = read_volume(case.label)
    write_volume(old.with_array(changed), case.label, overwrite=True)
    os.utime(case.label, ns=(mtime + 10 ** 9, mtime + 10 ** 9))
    fresh = PreparedCases(run.domains, spacings, tmp_path / "cache")
    new_paths = fresh.entry_paths(0, 1)
    assert new_paths != paths
    _, new_labels = fresh.arrays(0, 1)
    assert int(new_labels.sum()) == int(changed.sum()) and not paths[0].exists()
    # Without a cache the same arrays come back, computed afresh.
    nocache = PreparedCases(run.domains, spacings, None)
    assert np.array_equal(nocache.arrays(0, 1)[1], new_labels)


def test_sampler_shapes_foreground_share_and_domain_order(phantom_config):
    run = load_run_config(phantom_config)
    data = PreparedCases(run.domains, validate_domains(run.domains), phantom_config.parent / "cache")
    sampler = PatchSampler(data, (12, 20, 20), batch_size=4, foreground_share=1.0, seed=1)
    names = []
    for step in range(1, 9):
        batch = sampler.next_batch(step)
        names.append(batch["domain_name"])
        assert tuple(batch["image"].shape) == (4, 1, 12, 20, 20) and tuple(batch["label"].shape) == (4, 12, 20, 20)
        assert all(int((batch["label"][i] > 0).sum()) > 0 for i in range(4))  # every patch holds foreground
        assert int(batch["label"].max()) <= 2
    assert names == [d.name for d in run.domains] * 2  # round robin
    proportional = PatchSampler(data, (12, 20, 20), 2, domain_sampling="proportional", seed=0)
    drawn = [proportional.next_batch(s)["domain"] for s in range(40)]
    assert set(drawn) == {0, 1, 2, 3} and drawn[:8] != [0, 1, 2, 3, 0, 1, 2, 3]
    background_only = PatchSampler(data, (4, 4, 4), 4, foreground_share=0.0, seed=0)
    fractions = [float((background_only.next_batch(s)["label"] > 0).float().mean()) for s in range(12)]
    assert np.mean(fractions) < 0.5


def test_small_volumes_are_padded(tmp_path):
    config = write_phantom_domains(tmp_path, n_cases=1, seed=0, shape=(6, 10, 10))
    run = load_run_config(config)
    data = PreparedCases(run.domains[:1], validate_domains(run.domains[:1]), None)
    batch = PatchSampler(data, (16, 16, 16), 2, seed=0).next_batch(1)
    image = batch["image"][0, 0].numpy()
    assert image.shape == (16, 16, 16) and np.isclose(image[-1, -1, -1], image.min())


def test_sampler_state_resumes_and_ranks_split_the_global_batch(phantom_config):
    run = load_run_config(phantom_config)
    data = PreparedCases(run.domains, validate_domains(run.domains), phantom_config.parent / "cache")
    a = PatchSampler(data, (8, 12, 12), 4, domain_sampling="proportional", seed=5)
    for s in range(3):
        a.next_batch(s)
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    expected = a.next_batch(3)
    b = PatchSampler(data, (8, 12, 12), 4, domain_sampling="proportional", seed=99)
    b.load_state_dict(state)
    got = b.next_batch(3)
    assert got["domain"] == expected["domain"] and np.array_equal(got["image"], expected["image"])
    # Two ranks with half the batch each hold exactly the single-process batch, in order.
    ranks = [PatchSampler(data, (8, 12, 12), 4, domain_sampling="proportional", seed=5, rank=r, world_size=2)
             for r in (0, 1)]
    whole = PatchSampler(data, (8, 12, 12), 4, domain_sampling="proportional", seed=5)
    for s in range(4):
        full = whole.next_batch(s)
        halves = [r.next_batch(s) for r in ranks]
        assert all(h["domain"] == full["domain"] for h in halves)
        assert np.array_equal(np.concatenate([h["label"] for h in halves]), full["label"])


def test_bad_sampler_settings(phantom_config):
    run = load_run_config(phantom_config)
    data = PreparedCases(run.domains, {d.name: (2.0, 2.0, 2.0) for d in run.domains}, None)
    with pytest.raises(Med3DError, match="foreground_share"):
        PatchSampler(data, (8, 8, 8), 2, foreground_share=1.5)
    with pytest.raises(Med3DError, match="domain_sampling 'random' unknown"):
        PatchSampler(data, (8, 8, 8), 2, domain_sampling="random")
    with pytest.raises(Med3DError, match="not divisible"):
        PatchSampler(data, (8, 8, 8), 3, world_size=2)


def test_config_file_errors(tmp_path):
    with pytest.raises(Med3DError, match="does not exist"):
        load_run_config(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(Med3DError, match="cannot parse config"):
        load_run_config(tmp_path / "bad.json")
    (tmp_path / "empty.yaml").write_text("name: x\ndomains: []\n")
    with pytest.raises(Med3DError, match="non-empty 'domains' list"):
        load_run_config(tmp_path / "empty.yaml")


def test_real_five_domain_config_validates(data_dir, monkeypatch):
    """The example config reads the real scans in place: five domains, two modalities, own label spaces."""
    monkeypatch.setenv("MED3D_SHARED", str(data_dir.parent))
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "five_domain.yaml")
    run = load_run_config(config)
    assert [d.name for d in run.domains] == ["ct_abdomen", "mr_abdomen", "mr_brain_tumour", "ct_chest_lesion",
                                             "ct_3slice"]
    assert {d.modality for d in run.domains} == {"CT", "MR"}
    assert run.domains[0].label_names[5] == "liver" and run.domains[4].label_names == {1: "liver", 2: "spine",
                                                                                        3: "heart"}
    spacings = validate_domains(run.domains)
    assert spacings["ct_abdomen"] == pytest.approx((3.0, 3.0, 3.0))
    assert spacings["ct_chest_lesion"] == pytest.approx((0.5703125, 0.5703125, 5.0))
    assert spacings["mr_brain_tumour"] == pytest.approx((0.78125, 0.78125, 6.5))
    # The 3-slice case: three masks merged into labels 1..3 on the DICOM grid.
    d = run.domains[4]
    image, labels = preprocess_case(d.cases[0], d, _spec(d, spacings["ct_3slice"]))
    assert image.shape == labels.shape == (3, 512, 512) and set(np.unique(labels)) == {0, 1, 2, 3}


def test_example_phantom_config_matches_the_generated_one(phantom_config, monkeypatch):
    monkeypatch.setenv("MED3D_PHANTOMS", str(phantom_config.parent))
    example = load_run_config(os.path.join(os.path.dirname(__file__), "..", "configs", "phantom.yaml"))
    generated = load_run_config(phantom_config)
    assert [(d.name, d.modality, d.label_names, [c.image for c in d.cases], [c.label for c in d.cases])
            for d in example.domains] == \
        [(d.name, d.modality, d.label_names, [c.image for c in d.cases], [c.label for c in d.cases])
         for d in generated.domains]
