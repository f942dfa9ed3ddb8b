"""`med3d demo --quick`: the whole offline pipeline runs and leaves sane outputs (few training steps, so the
scores themselves are not checked beyond being valid numbers)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from med3dcore.cli import main
from med3dcore.volume_files import read_volume


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    code = main(["demo", "--out", str(out), "--quick", "--device", "cpu", "--progress", "none"])
    return out, code


def test_demo_outputs_exist_and_are_sane(demo, capsys):
    out, code = demo
    assert code == 0
    image = read_volume(out / "heldout_ct.nii.gz")
    labels = read_volume(out / "heldout_lung_labels.nii.gz")
    assert labels.same_geometry(image) and labels.array.dtype == np.uint8
    assert set(np.unique(labels.array)) <= {0, 1}
    picture = Image.open(out / "heldout_overlay.png")
    assert picture.mode == "RGB" and picture.size[1] > 320 and picture.size[0] > 320  # views + legend strip
    assert Image.open(out / "heldout_vs_truth.png").size[1] > 320
    for task in ("lung", "nodule"):
        assert Image.open(out / f"{task}_curves.png").size == (1000, 440)
    report = json.loads((out / "report.json").read_text())
    assert report["synthetic"] is True and report["quick"] is True
    for name in ("pretrained", "scratch"):
        scores = report["results"][name]
        assert 0.0 <= scores["lung_dice"] <= 1.0
        assert 0.0 <= scores["nodule_accuracy"] <= 1.0 and 0.0 <= scores["nodule_auc"] <= 1.0
    probabilities = report["heldout_nodule"]["probabilities"]
    assert set(probabilities) == {"benign", "malignant"} and sum(probabilities.values()) == pytest.approx(1.0)
    for path in report["outputs"]["models"].values():
        assert path.endswith(".pt") and (out / "models").joinpath(path.rsplit("/", 1)[-1]).is_file()
    markdown = (out / "report.md").read_text()
    assert "synthetic" in markdown.lower() and "not patient scans" in markdown
    assert "| from scratch |" in markdown
    assert "these numbers are NOT results" in markdown  # quick mode says its scores mean nothing


def test_demo_keeps_only_what_a_user_looks_at(demo):
    """No training checkpoints or caches (hundreds of MB) unless --keep-checkpoints; models and pictures stay."""
    out, _ = demo
    leftovers = [p for p in out.rglob("*") if p.name in ("checkpoints", "cache") or p.suffix == ".tmp"]
    assert leftovers == []
    assert {p.name for p in (out / "models").glob("*.pt")} == {"lung_pretrained.pt", "lung_scratch.pt",
                                                               "nodule_pretrained.pt", "nodule_scratch.pt"}
    assert (out / "models" / "lung_scratch" / "training_curve.png").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["quick_note"].startswith("Quick mode") and report["kept_checkpoints"] is False
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total < 450e6  # models and encoder (~370 MB), pictures, report; was 1.5 GB with checkpoints


def test_demo_refuses_to_overwrite_a_previous_run(demo, capsys):
    out, _ = demo
    assert main(["demo", "--out", str(out), "--quick", "--progress", "none"]) == 2
    assert "already holds a demo" in capsys.readouterr().err


def test_demo_lung_model_says_it_saw_only_phantoms(demo, data_dir):
    from med3dcore.infer import segment
    from med3dcore.pseudo_labels import SYNTHETIC_MODEL_WARNING
    from med3dcore.bundles import load_bundle

    out, _ = demo
    bundle = load_bundle(out / "models" / "lung_pretrained.pt")
    data = bundle.provenance["data"]
    assert data["synthetic"] is True and set(data["label_sources"].values()) == {"synthetic"}
    result = segment(read_volume(data_dir / "ct" / "chest_ct.nrrd"), bundle, task="lung", device="cpu")
    assert SYNTHETIC_MODEL_WARNING in result.warnings
