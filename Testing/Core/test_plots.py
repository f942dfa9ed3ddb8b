"""Training curves: the loop writes history.json and training_curve.png into the run folder (and resume keeps the
validation history); several runs share one picture, one colour each."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from med3dcore.errors import Med3DError
from med3dcore.plots import RUN_COLORS, curves_from_history, render_curves, write_curves

from test_train import _run


def test_run_folder_gets_history_and_curve_and_resume_keeps_validations(tmp_path):
    _, result = _run(tmp_path, steps=4, validate_every=2)  # no validate callable: no validation records
    record = json.loads((tmp_path / "history.json").read_text())
    assert [r["step"] for r in record["history"]] == [1, 2, 3, 4] and record["validations"] == []
    assert Image.open(tmp_path / "training_curve.png").size == (1000, 440)
    assert result.validations == []


def test_validation_records_survive_a_resume(tmp_path):
    import torch

    from med3dcore.train import train
    from med3dcore.training_setup import TrainConfig, seed_everything
    from test_train import Batches, TinyNet, seg_loss

    def run(steps, resume):
        seed_everything(0)
        model, batches = TinyNet(), Batches()
        config = TrainConfig(steps=steps, batch_size=4, lr=0.01, device="cpu", validate_every=2, checkpoint_every=2)
        return train(model, config, batches.next_batch, seg_loss, tmp_path, stateful={"sampler": batches},
                     validate=lambda m: {"dice": float(torch.rand(1))}, resume=resume)

    run(4, False)
    result = run(6, True)
    assert [v["step"] for v in result.validations] == [2, 4, 6]
    saved = json.loads((tmp_path / "history.json").read_text())
    assert [v["step"] for v in saved["validations"]] == [2, 4, 6] and len(saved["history"]) == 6


def test_curves_from_history_picks_the_metric_and_drops_non_finite_values():
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 1.0}]
    validations = [{"step": 2, "dice": 0.1, "dice_1": 0.1}, {"step": 3, "dice": float("inf")}]
    curves = curves_from_history(history, validations)
    assert curves == {"loss": [(1.0, 2.0), (3.0, 1.0)], "metric": "dice", "validation": [(2.0, 0.1)]}


def test_two_runs_on_one_picture(tmp_path):
    steps = np.arange(1, 61)
    runs = {"pretrained": {"loss": list(zip(steps, 1.0 / steps)), "metric": "dice",
                           "validation": [(30.0, 0.5), (60.0, 0.8)]},
            "scratch": {"loss": list(zip(steps, 2.0 / steps)), "metric": "dice", "validation": [(30.0, 0.2), (60.0, 0.4)]}}
    path = write_curves(tmp_path / "both.png", runs, title="demo")
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    for color in RUN_COLORS[:2]:  # each run's bold line and points are drawn in its own colour
        assert (pixels == color).all(axis=1).sum() > 100
    picture = np.asarray(render_curves({"empty": {"loss": [], "validation": []}}))
    assert picture.shape == (440, 1000, 3)  # no values: the panels say so, nothing fails
    with pytest.raises(Med3DError, match="PNG"):
        write_curves(tmp_path / "curve.jpg", runs)
