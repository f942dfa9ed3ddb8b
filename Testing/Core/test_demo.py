"""`med3d demo --quick`: the whole offline pipeline runs and leaves sane outputs (few training steps, so the
scores themselves are not checked beyond being valid numbers)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from med3dcore.cli import main
from med3dcore.volume import read_volume


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
    assert picture.mode == "RGB" and picture.size[1] == 320 and picture.size[0] > 320
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


def test_demo_refuses_to_overwrite_a_previous_run(demo, capsys):
    out, _ = demo
    assert main(["demo", "--out", str(out), "--quick", "--progress", "none"]) == 2
    assert "already holds a demo" in capsys.readouterr().err
