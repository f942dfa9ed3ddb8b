"""`med3d classify` end to end on the real chest CT and its lesion: JSON output, the same numbers as the engine,
and one-line errors for the bad inputs a new user tries."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from med3dcore.bundles import save_bundle
from med3dcore.cli import main
from med3dcore.nets import build_model
from med3dcore.nodules import NoduleInputSpec, prepare_nodule
from med3dcore.volume_files import read_volume, write_volume

SPEC = NoduleInputSpec(cube=24, spacing_mm=1.33)


@pytest.fixture(scope="module")
def nodule_model(tmp_path_factory):
    torch.manual_seed(0)
    arch = {"backbone": {"depth": 10, "shortcut_type": "B", "preact": False},
            "head": {"type": "classifier", "num_classes": 2}}
    path = tmp_path_factory.mktemp("models") / "nodule.pt"
    save_bundle(path, build_model(arch), architecture=arch, task={"type": "classification", "name": "nodule"},
                labels=[{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}], preprocessing={},
                provenance={}, extra={"nodule_input": SPEC.to_dict()})
    return path


@pytest.fixture(scope="module")
def chest(data_dir):
    ct = read_volume(data_dir / "ct/chest_ct.nrrd")
    lesion = read_volume(data_dir / "ct/chest_ct_lesion.nrrd")
    kji = np.argwhere(lesion.array > 0)
    matrix = ct.ijk_to_lps()
    centre = matrix[:3, :3] @ kji[:, ::-1].mean(axis=0) + matrix[:3, 3]
    return ct, lesion, centre


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_roi_gives_the_engine_probabilities(capsys, data_dir, chest, nodule_model):
    ct, _, centre = chest
    roi = ",".join(f"{v:.3f}" for v in centre) + ",30,30,30"
    code, out, _ = _run(capsys, ["classify", str(data_dir / "ct/chest_ct.nrrd"), "--model", str(nodule_model),
                                 f"--roi={roi}", "--json", "--device", "cpu"])
    assert code == 0
    result = json.loads(out)
    assert set(result["probabilities"]) == {"benign", "malignant"}
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["roi_center_lps"] == pytest.approx(list(centre), abs=1e-2)
    # the same cube through the same network by hand
    from med3dcore.bundles import load_bundle, model_from_bundle
    net = model_from_bundle(load_bundle(nodule_model))
    cube = prepare_nodule(ct, center_lps=np.round(centre, 3), size_mm=(30, 30, 30), params=SPEC)
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(cube)[None]), 1)[0, 1].item()
    assert result["probabilities"]["malignant"] == pytest.approx(expected, abs=1e-4)
    assert result["predicted"] == max(result["probabilities"], key=result["probabilities"].get)


def test_mask_and_text_output(capsys, data_dir, nodule_model):
    code, out, _ = _run(capsys, ["classify", str(data_dir / "ct/chest_ct.nrrd"), "--model", str(nodule_model),
                                 "--mask", str(data_dir / "ct/chest_ct_lesion.nrrd"), "--device", "cpu"])
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("benign: ") and lines[1].startswith("malignant: ")
    assert lines[2].startswith("nodule: ") and "mm equivalent-sphere diameter" in lines[2]
    assert lines[-2].startswith("box shown") and lines[-1].split(": ")[1] in ("benign", "malignant")


def test_mask_reports_size_and_the_box_shown_gives_the_same_answer(capsys, data_dir, chest, nodule_model):
    """The JSON carries the nodule's measured size; the box it reports, given back as --roi, is the input the
    network saw, so the probabilities do not move (they did when the bare mask box was reported)."""
    ct, lesion, _ = chest
    scan = str(data_dir / "ct/chest_ct.nrrd")
    code, out, _ = _run(capsys, ["classify", scan, "--model", str(nodule_model), "--mask",
                                 str(data_dir / "ct/chest_ct_lesion.nrrd"), "--json", "--device", "cpu"])
    assert code == 0
    by_mask = json.loads(out)
    voxels = int(np.count_nonzero(lesion.array))
    assert by_mask["volume_ml"] == pytest.approx(voxels * float(np.prod(ct.spacing)) / 1000.0)
    assert by_mask["diameter_mm"] == pytest.approx((6000.0 * by_mask["volume_ml"] / np.pi) ** (1 / 3))
    roi = ",".join(repr(v) for v in by_mask["roi_center_lps"] + by_mask["roi_size_mm"])
    code, out, _ = _run(capsys, ["classify", scan, "--model", str(nodule_model), f"--roi={roi}", "--json",
                                 "--device", "cpu"])
    by_roi = json.loads(out)
    assert code == 0 and by_roi["diameter_mm"] is None and by_roi["volume_ml"] is None
    assert by_roi["probabilities"]["malignant"] == pytest.approx(by_mask["probabilities"]["malignant"], abs=1e-6)
    assert by_roi["roi_size_mm"] == pytest.approx(by_mask["roi_size_mm"])


def test_roi_outside_the_scan(capsys, data_dir, nodule_model):
    code, out, err = _run(capsys, ["classify", str(data_dir / "ct/chest_ct.nrrd"), "--model", str(nodule_model),
                                   "--roi", "5000,5000,5000,20,20,20"])
    assert code == 2 and out == ""
    assert "outside the scan" in err and len(err.strip().splitlines()) == 1


def test_empty_mask(capsys, tmp_path, chest, data_dir, nodule_model):
    ct, lesion, _ = chest
    empty = tmp_path / "empty.nrrd"
    write_volume(lesion.with_array(np.zeros(lesion.shape, np.uint8)), empty)
    code, _, err = _run(capsys, ["classify", str(data_dir / "ct/chest_ct.nrrd"), "--model", str(nodule_model),
                                 "--mask", str(empty)])
    assert code == 2 and "no voxels" in err and len(err.strip().splitlines()) == 1


def test_segmentation_model_given_to_classify(capsys, tmp_path, data_dir):
    arch = {"backbone": {"depth": 10, "shortcut_type": "B", "preact": False},
            "head": {"type": "coarse_seg", "num_classes": 2}}
    path = tmp_path / "lung.pt"
    save_bundle(path, build_model(arch), architecture=arch, task={"type": "segmentation", "name": "lung"},
                labels=[{"value": 1, "name": "lung"}], preprocessing={}, provenance={})
    code, _, err = _run(capsys, ["classify", str(data_dir / "ct/chest_ct.nrrd"), "--model", str(path),
                                 "--roi", "0,0,0,10,10,10"])
    assert code == 2 and "segmentation model" in err and "med3d segment" in err


def test_bad_roi_text(capsys, data_dir, nodule_model):
    code, _, err = _run(capsys, ["classify", str(data_dir / "ct/chest_ct.nrrd"), "--model", str(nodule_model),
                                 "--roi", "1,2,3"])
    assert code == 2 and "CX,CY,CZ,SX,SY,SZ" in err
