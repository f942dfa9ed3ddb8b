"""What a new user ran into on a first try (issue 13's smaller things), one test each: inspecting a run's own
checkpoints and a bundle's provenance, evaluating images against themselves, an output that is a folder, a
validation fraction of 0, hints that fit the task, messages from Python that speak Python, a readable LoadReport,
and lung fine-tuning with a single case."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from med3dcore.bundles import inspect_file
from med3dcore.cli import main
from med3dcore.errors import Med3DError
from med3dcore.medicalnet import load_medicalnet
from med3dcore.segmentation_finetune import SegmentationSettings, finetune_segmentation, segmentation_loss
from med3dcore.nets import build_model, resnet3d
from med3dcore.phantoms import make_ct_phantom
from med3dcore.train import train
from med3dcore.training_setup import TrainConfig
from med3dcore.volume_files import write_volume

torch.set_num_threads(2)
ARCH = {"backbone": {"depth": 10, "shortcut_type": "B"}, "head": {"type": "coarse_seg", "num_classes": 2}}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A real (tiny) training run: checkpoints/last.pt and best.pt as the training loop writes them."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_model(ARCH)

    def batch(step):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(1, 1, 16, 16, 16, generator=g)
        return {"image": x, "label": (x[:, 0] > 0).long()}

    train(model, TrainConfig(steps=2, batch_size=1, lr=1e-3, device="cpu", validate_every=2), batch,
          segmentation_loss, out, validate=lambda m: {"dice": 0.25})
    return out


def test_inspect_reads_a_runs_own_checkpoints(run_folder, capsys):
    for name, best in (("last.pt", False), ("best.pt", True)):
        info = inspect_file(run_folder / "checkpoints" / name)
        assert info["format"] == "training-checkpoint" and info["depth"] == 10 and info["step"] == 2
        assert info["best"] is best and info["metrics"] == {"dice": 0.25}
        assert main(["inspect", str(run_folder / "checkpoints" / name)]) == 0
        out = capsys.readouterr().out
        assert "step:        2 of 2" in out and "metrics:     dice=0.25" in out and "--resume" in out
    # and a training checkpoint given where a model is expected says which file to use instead
    assert main(["segment", str(run_folder / "x.nii.gz"), str(run_folder / "y.nii.gz"), "--model",
                 str(run_folder / "checkpoints" / "best.pt"), "--progress", "none"]) == 2


def test_inspect_shows_a_bundles_provenance(tmp_path, capsys):
    from med3dcore.bundles import save_bundle

    save_bundle(tmp_path / "lung.pt", build_model(ARCH), architecture=ARCH,
                task={"type": "segmentation", "name": "lung"}, labels=[{"value": 1, "name": "lung"}],
                preprocessing={}, provenance={"init": "medicalnet-resnet10", "steps": 200,
                                              "data": {"train_cases": ["a", "b", "c"], "validation_cases": ["d"],
                                                       "synthetic": True},
                                              "metrics": {"dice": 0.9123}})
    assert main(["inspect", str(tmp_path / "lung.pt")]) == 0
    out = capsys.readouterr().out
    assert "trained:     from medicalnet-resnet10, 200 steps" in out
    assert "data:        3 train, 1 validation cases (synthetic only)" in out
    assert "metrics:     dice=0.9123" in out
    assert main(["inspect", str(tmp_path / "lung.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["metrics"] == {"dice": 0.9123}


def test_evaluate_refuses_to_score_images_against_themselves(tmp_path, capsys):
    (tmp_path / "scans").mkdir()
    assert main(["evaluate", "--model", str(tmp_path / "m.pt"), "--images", str(tmp_path / "scans"),
                 "--labels", str(tmp_path / "scans" / "."), "--device", "cpu"]) == 2
    assert "same folder, so every image would be scored against itself" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_an_output_that_is_a_folder_is_one_clear_error(tmp_path, capsys, extra):
    image, _, _ = make_ct_phantom((8, 16, 16), (4.0, 4.0, 8.0), seed=0)
    scan = write_volume(image, tmp_path / "ct.nii.gz")
    (tmp_path / "out.nii.gz").mkdir()
    assert main(["segment", str(scan), str(tmp_path / "out.nii.gz"), "--progress", "none"] + extra) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "it is a folder; choose a file name" in err
    assert "already exists" not in err and (tmp_path / "out.nii.gz").is_dir()


def test_validation_fraction_zero_is_explained(capsys, tmp_path):
    assert main(["finetune", "--task", "nodule", "--csv", str(tmp_path / "t.csv"), "--out", str(tmp_path),
                 "--val-fraction", "0"]) == 2
    assert "--val-fraction 0 (no validation) is for segmentation" in capsys.readouterr().err
    assert main(["finetune", "--task", "lung", "--images", "a", "--labels", "b", "--out", str(tmp_path),
                 "--val-fraction", "1"]) == 2
    assert "at least 0 and below 1" in capsys.readouterr().err



@pytest.mark.parametrize("weight", ["-1", "nan", "inf"])
def test_a_bad_mask_weight_is_one_clear_error(capsys, tmp_path, weight):
    assert main(["finetune", "--task", "nodule", "--csv", str(tmp_path / "t.csv"), "--out", str(tmp_path),
                 "--mask-weight", weight]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--mask-weight must be a number of at least 0" in err
    assert list(tmp_path.iterdir()) == []


def test_a_mask_weight_for_segmentation_is_one_clear_error(capsys, tmp_path):
    assert main(["finetune", "--task", "lung", "--images", "a", "--labels", "b", "--out", str(tmp_path),
                 "--mask-weight", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--mask-weight is for --task nodule" in err
    assert list(tmp_path.iterdir()) == []

def test_missing_model_hint_does_not_send_a_liver_user_to_the_demo(tmp_path, monkeypatch):
    from med3dcore import infer

    monkeypatch.setenv("MED3D_MODELS", str(tmp_path))
    image, _, _ = make_ct_phantom((8, 16, 16), (4.0, 4.0, 8.0), seed=0)
    for call in (lambda: infer.segment(image, task="liver"), lambda: infer.load_model(tmp_path / "liver.pt")):
        with pytest.raises(Med3DError) as caught:
            call()
        assert "demo" not in str(caught.value)


def test_python_callers_are_told_the_python_argument(tmp_path):
    image, _, _ = make_ct_phantom((8, 16, 16), (4.0, 4.0, 8.0), seed=0)
    path = write_volume(image, tmp_path / "ct.nii.gz")
    with pytest.raises(Med3DError, match=r"overwrite=True from Python"):
        write_volume(image, path)


def test_load_report_prints_short(tmp_path):
    from med3dcore.medicalnet import export_medicalnet

    net = resnet3d(10, "B", num_seg_classes=2)
    report = load_medicalnet(net, export_medicalnet(resnet3d(10, "B", num_seg_classes=None), tmp_path / "r.pth"))
    backbone = [k for k in net.state_dict() if not k.startswith("conv_seg.")]
    head = [k for k in net.state_dict() if k.startswith("conv_seg.")]
    assert report.loaded == backbone and report.left == head  # the lists themselves are unchanged ...
    assert repr(report) == (f"LoadReport(loaded={len(backbone)} tensors, left={len(head)}: {', '.join(head[:4])}, "
                            f"... ({len(head) - 4} more))")
    assert len(repr(report)) < 160  # ... but printing one is a line, not hundreds of names


@pytest.mark.slow
def test_lung_fine_tuning_with_a_single_case_trains_without_validation(tmp_path):
    from med3dcore.domains import Case, Domain

    image, labels, _ = make_ct_phantom((16, 32, 32), (3.0, 3.0, 4.0), seed=1)
    img = write_volume(image, tmp_path / "ct.nii.gz")
    lab = write_volume(labels.with_array(np.isin(labels.array, (1, 5)).astype(np.uint8)), tmp_path / "lung.nii.gz")
    domain = Domain(name="one", modality="CT", label_names={1: "lung"}, cases=[Case("ct", img, lab)])
    events = []
    result = finetune_segmentation(domain, tmp_path / "m", "lung", preset="lung", reporter=events.append,
                                   settings=SegmentationSettings(steps=2, batch_size=1, patch=(16, 32, 32),
                                                                 device="cpu"))
    assert result["bundle"].is_file()
    assert any("one patient only" in e.get("message", "") for e in events)
