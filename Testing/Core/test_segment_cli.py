"""`med3d segment`: files and DICOM folders in, label map in the input's exact geometry out, overlay, model
lookup in the models folder, and one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from med3dcore.classical_lung import inside_body
from med3dcore.cli import main
from med3dcore.infer import segment
from med3dcore.phantoms import make_ct_phantom
from med3dcore.preprocess import PreprocessSpec
from med3dcore.volume_files import read_volume, write_volume
from test_infer import segmentation_bundle


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seg")
    image, _, _ = make_ct_phantom((20, 32, 28), (3.0, 2.5, 4.0), seed=2, flip=(2,))
    scan = write_volume(image, folder / "scan.nrrd")
    model = segmentation_bundle(folder / "lung.pt", bias=[0.0, 5.0])  # labels everything: geometry is visible
    return folder, scan, model


def test_segment_file_with_overlay(setup, capsys):
    folder, scan, model = setup
    out, png = folder / "labels.nii.gz", folder / "overlay.png"
    code = main(["segment", str(scan), str(out), "--task", "lung", "--model", str(model), "--overlay", str(png),
                 "--progress", "none", "--tile", "16,16,16", "--overlap", "0.2", "--batch-size", "2"])
    assert code == 0
    image, labels = read_volume(scan), read_volume(out)
    assert labels.same_geometry(image, atol=1e-5) and labels.array.dtype == np.uint8
    # what the Python API gives: the lung clean-up keeps the phantom's lung inside its body (test_infer.py)
    expected = segment(image, model, task="lung", device="cpu").labels.array
    np.testing.assert_array_equal(labels.array, expected)
    assert expected.any() and not (expected.astype(bool) & ~inside_body(image)).any()
    stdout = capsys.readouterr().out
    expected_ml = np.count_nonzero(expected) * 3.0 * 2.5 * 4.0 / 1000.0
    assert f"lung: {expected_ml:.1f} mL" in stdout
    picture = Image.open(png)
    assert picture.mode == "RGB" and picture.size[1] == 320 + 8 + 20 * 2  # views, legend: one label + window


def test_segment_jsonl_result_and_refusals(setup, capsys):
    folder, scan, model = setup
    out = folder / "labels2.nrrd"
    args = ["segment", str(scan), str(out), "--model", str(model), "--progress", "jsonl", "--tile", "whole"]
    assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    result = lines[-1]
    assert result["kind"] == "result" and result["output"] == str(out) and result["warnings"] == []
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main(["segment", str(scan), str(folder / "x.png"), "--model", str(model)]) == 2
    assert "end the name in" in capsys.readouterr().err
    assert main(["segment", str(scan), str(folder / "y.nrrd"), "--model", str(model), "--tile", "4,4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("med3d segment: error: --tile must be") and err.count("\n") == 1
    for bad in ("0", "9", "two"):
        assert main(["segment", str(scan), str(folder / "z.nrrd"), "--model", str(model), "--passes", bad]) == 2
        err = capsys.readouterr().err
        assert err == f"med3d segment: error: --passes must be 'auto' or a whole number from 1 to 8, got '{bad}'\n"
    assert not (folder / "z.nrrd").exists()
    # ITK's NIfTI writer would write 'twice.nii.gz' for this name: refused before any work, nothing written
    before = sorted(folder.iterdir())
    assert main(["segment", str(scan), str(folder / "twice.nii.gz.nii.gz"), "--model", str(model)]) == 2
    assert capsys.readouterr().err == ("med3d segment: error: cannot write 'twice.nii.gz.nii.gz': the NIfTI writer "
                                       "would store it under another name; drop the repeated extension (e.g. "
                                       "'twice.nii.gz')\n")
    assert sorted(folder.iterdir()) == before
    two = folder / "two.nrrd"
    assert main(["segment", str(scan), str(two), "--model", str(model), "--progress", "jsonl", "--passes", "2",
                 "--precision", "fp32"]) == 0
    messages = [json.loads(line).get("message", "") for line in capsys.readouterr().out.splitlines()]
    assert "lung: precision fp32; 2 passes at shifted grid alignments, averaged" in messages
    np.testing.assert_array_equal(read_volume(two).array, read_volume(out).array)  # labels everything either way


def test_segment_finds_model_in_models_folder(setup, tmp_path, monkeypatch, capsys):
    folder, scan, model = setup
    monkeypatch.setenv("MED3D_MODELS", str(tmp_path))
    args = ["segment", str(scan), str(tmp_path / "l.nrrd"), "--task", "lung", "--progress", "none",
            "--method", "model"]  # auto would fall back to the classical lung method (test_segment_method.py)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no --model given and no 'lung' segmentation model in" in err and "med3d finetune --task lung" in err
    (tmp_path / "lung.pt").symlink_to(model)
    assert main(args) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "l.nrrd").array,
                                  segment(read_volume(scan), model, task="lung", device="cpu").labels.array)


def test_segment_dicom_series_keeps_series_geometry(data_dir, tmp_path):
    series = data_dir / "dicom" / "abdomen_ct_series"
    coarse = PreprocessSpec(spacing=(6.0, 6.0, 6.0), modality="CT")  # a small grid: geometry is what is tested
    model = segmentation_bundle(tmp_path / "lung.pt", bias=[0.0, 5.0], spec=coarse)
    out = tmp_path / "labels.nrrd"
    assert main(["segment", str(series), str(out), "--model", str(model), "--progress", "none",
                 "--no-clean-up"]) == 0
    image, labels = read_volume(series), read_volume(out)
    assert labels.shape == image.shape == (20, 512, 512)
    assert labels.same_geometry(image, atol=1e-4) and labels.array.min() == 1
