"""`med3d finetune --task lung --labels classical`: unlabelled real CTs get the classical method's lungs as
training labels, a real mask wins where a case has one, and the bundle's provenance says which was which
(one optimisation step on small patches: the plumbing is under test, not the model)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from med3dcore.bundles import load_bundle
from med3dcore.classical_lung import segment_lungs
from med3dcore.cli import main
from med3dcore.pseudo_labels import label_sources_record, trained_only_on_synthetic
from med3dcore.volume_files import read_volume

TINY = ["--steps", "1", "--val-fraction", "0", "--patch", "8,16,16", "--batch-size", "1", "--device", "cpu",
        "--progress", "none"]


@pytest.fixture()
def folders(data_dir, tmp_path):
    images, real = tmp_path / "images", tmp_path / "real"
    images.mkdir()
    real.mkdir()
    for name in ("abdomen_ct.nii.gz", "abdomen_ct_small.nii.gz"):  # lung bases at the top of both
        (images / name).symlink_to(data_dir / "ct" / name)
    (real / "abdomen_ct.nii.gz").symlink_to(data_dir / "ct" / "abdomen_ct_lung.nii.gz")  # TotalSegmentator's
    return images, real


def test_classical_labels_with_a_real_mask_winning(data_dir, folders, tmp_path):
    images, real = folders
    out = tmp_path / "models"
    args = ["finetune", "--task", "lung", "--images", str(images), "--labels", "classical", "--real-labels",
            str(real), "--out", str(out), "--name", "lung_real"] + TINY
    assert main(args) == 0
    bundle = load_bundle(out / "lung_real.pt")
    data = bundle.provenance["data"]
    assert data["label_sources"] == {"abdomen_ct": "real", "abdomen_ct_small": "classical"}
    assert data["label_counts"] == {"real": 1, "classical": 1, "synthetic": 0} and data["synthetic"] is False
    assert not trained_only_on_synthetic(bundle.provenance)
    assert bundle.task == {"type": "segmentation", "name": "lung"} and bundle.labels[0]["name"] == "lung"
    labels = out / "lung_real" / "pseudo_labels"
    real_used = read_volume(labels / "abdomen_ct.real.nii.gz")
    silver = read_volume(data_dir / "ct" / "abdomen_ct_lung.nii.gz")
    assert real_used.same_geometry(silver) and np.array_equal(real_used.array, (silver.array > 0).astype(np.uint8))
    pseudo = read_volume(labels / "abdomen_ct_small.classical.nii.gz")
    small = read_volume(data_dir / "ct" / "abdomen_ct_small.nii.gz")
    assert np.array_equal(pseudo.array, (segment_lungs(small).labels.array > 0).astype(np.uint8))
    stamp = os.stat(labels / "abdomen_ct_small.classical.nii.gz").st_mtime_ns
    assert main(args + ["--overwrite"]) == 0  # the labels of unchanged scans are not made again
    assert os.stat(labels / "abdomen_ct_small.classical.nii.gz").st_mtime_ns == stamp


def test_classical_labels_refusals(folders, tmp_path, capsys):
    images, real = folders
    base = ["finetune", "--images", str(images), "--out", str(tmp_path / "m")] + TINY
    for extra, message in ((["--task", "liver", "--labels", "classical"], "use it with --task lung"),
                           (["--task", "lung", "--labels", str(images), "--real-labels", str(real)],
                            "--real-labels goes with --labels classical")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "someone_else.nii.gz").symlink_to(real / "abdomen_ct.nii.gz")
    assert main(base + ["--task", "lung", "--labels", "classical", "--real-labels", str(stray)]) == 2
    assert "match no scan" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").glob("*.pt"))


def test_label_source_records():
    record = label_sources_record(["a", "b", "c"], {"a": "synthetic", "b": "classical"})
    assert record == {"label_sources": {"a": "synthetic", "b": "classical", "c": "real"},
                      "label_counts": {"real": 1, "classical": 1, "synthetic": 1}, "synthetic": False}
    assert label_sources_record(["a"], {"a": "synthetic"})["synthetic"] is True
    assert trained_only_on_synthetic({"data": label_sources_record(["a"], {"a": "synthetic"})})
    assert not trained_only_on_synthetic({"data": "random weights"})
