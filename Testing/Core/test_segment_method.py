"""Choosing how to segment: infer.segment(method=auto|model|classical) and `med3d segment --method`; the
'no model -> classical' line; and the warning a model trained only on phantoms gives on a real scan."""
from __future__ import annotations

import json

import numpy as np
import pytest

from med3dcore import infer
from med3dcore.bundles import save_bundle
from med3dcore.cli import main
from med3dcore.errors import Med3DError
from med3dcore.model_choice import choose_method
from med3dcore.preprocess import PreprocessSpec
from med3dcore.pseudo_labels import SYNTHETIC_MODEL_WARNING
from med3dcore.volume_files import read_volume
from test_infer import LUNG_LABELS, tiny_net

COARSE = PreprocessSpec(spacing=(8.0, 8.0, 8.0), window=(-1000.0, 400.0), modality="CT")  # geometry, not accuracy


def lung_bundle(path, data, name="lung"):
    """A small lung bundle (ResNet-10, tiny head, random weights) whose provenance says ``data``."""
    net, arch = tiny_net({"type": "lung_decoder", "num_classes": 2, "channels": [16, 8, 8]}, bias=[0.0, 5.0])
    return save_bundle(path, net, architecture=arch, task={"type": "segmentation", "name": name},
                       labels=LUNG_LABELS, preprocessing=COARSE, provenance={"data": data})


@pytest.fixture(scope="module")
def abdomen(data_dir):
    return read_volume(data_dir / "ct" / "abdomen_ct.nii.gz")  # lung bases at the top: a fast real case


@pytest.fixture()
def no_models(tmp_path, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    monkeypatch.setenv("MED3D_MODELS", str(folder))
    return folder


def test_classical_through_segment(abdomen, no_models):
    result = infer.segment(abdomen, task="lung", method="classical")
    assert result.method == "classical" and result.labels.same_geometry(abdomen)
    assert [(i["value"], i["name"], i["terminology"]) for i in result.label_info] == [
        (1, "right lung", "SCT^3341006^Right lung"), (2, "left lung", "SCT^44029006^Left lung")]
    assert all(i["color"] == [197, 165, 145] for i in result.label_info)
    auto = infer.segment(abdomen, task="lung")  # no model anywhere: auto falls back to classical
    assert auto.method == "classical" and np.array_equal(auto.labels.array, result.labels.array)


def test_auto_prefers_a_model_and_errors_say_what_to_do(abdomen, no_models, tmp_path):
    model = lung_bundle(no_models / "lung.pt", {"domain": "mine", "label_sources": {"a": "real"}})
    assert choose_method(None, "lung") == ("model", model)
    result = infer.segment(abdomen, task="lung")
    assert result.method == "model" and result.label_info[0]["name"] == "lung" and result.warnings == []
    assert choose_method(None, "lung", "classical") == ("classical", None)
    model.unlink()
    with pytest.raises(Med3DError, match="no --model given and no 'liver' segmentation model"):
        infer.segment(abdomen, task="liver")
    with pytest.raises(Med3DError, match="no 'lung' segmentation model.*--method classical"):
        infer.segment(abdomen, task="lung", method="model")
    with pytest.raises(Med3DError, match="segments lungs only, not 'liver'"):
        infer.segment(abdomen, task="liver", method="classical")
    with pytest.raises(Med3DError, match="uses no model"):
        infer.segment(abdomen, model=tmp_path / "x.pt", method="classical")
    with pytest.raises(Med3DError, match="unknown segmentation method 'deep'"):
        infer.segment(abdomen, task="lung", method="deep")


def test_cli_method_choices(data_dir, no_models, tmp_path, capsys):
    scan = data_dir / "ct" / "abdomen_ct.nii.gz"
    out = tmp_path / "lungs.nrrd"
    assert main(["segment", str(scan), str(out), "--task", "lung", "--progress", "none"]) == 0
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if "classical" in line]
    assert len(said) == 1 and "using the classical lung method" in said[0] and str(no_models) in said[0]
    assert "right lung:" in captured.out and "left lung:" in captured.out
    assert set(np.unique(read_volume(out).array)) == {0, 1, 2}
    args = ["segment", str(scan), str(tmp_path / "b.nrrd"), "--progress", "jsonl", "--method", "classical"]
    assert main(args) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["kind"] == "result" and events[-1]["method"] == "classical"
    assert not any("using the classical" in str(e.get("message")) for e in events)  # asked for: nothing to say
    for extra, message in ((["--task", "liver", "--method", "classical"], "segments lungs only"),
                           (["--task", "lung", "--method", "model"], "no 'lung' segmentation model"),
                           (["--method", "classical", "--model", str(scan)], "uses no model")):
        assert main(["segment", str(scan), str(tmp_path / "c.nrrd"), "--progress", "none"] + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("med3d segment: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "c.nrrd").exists()


def test_phantom_trained_model_warns_on_a_real_scan(data_dir, tmp_path, capsys):
    chest = read_volume(data_dir / "ct" / "chest_ct.nrrd")
    synthetic = lung_bundle(tmp_path / "phantom.pt", {"domain": "phantom_lung", "synthetic": True,
                                                      "label_sources": {"case_00": "synthetic"}})
    result = infer.segment(chest, synthetic, task="lung")
    assert result.warnings == [SYNTHETIC_MODEL_WARNING]
    assert "--method classical" in SYNTHETIC_MODEL_WARNING and "synthetic phantoms" in SYNTHETIC_MODEL_WARNING
    assert infer.segment(chest, synthetic, task="lung", synthetic_input=True).warnings == []
    legacy = lung_bundle(tmp_path / "legacy.pt", {"domain": "phantom_lung", "train_cases": ["case_00"]})
    assert infer.segment(chest, legacy).warnings == [SYNTHETIC_MODEL_WARNING]  # a demo bundle of before
    mixed = lung_bundle(tmp_path / "mixed.pt", {"label_sources": {"a": "synthetic", "b": "classical"}})
    assert infer.segment(chest, mixed).warnings == []
    assert main(["segment", str(data_dir / "ct" / "chest_ct.nrrd"), str(tmp_path / "l.nrrd"), "--model",
                 str(synthetic), "--progress", "jsonl"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["warnings"] == [SYNTHETIC_MODEL_WARNING]
    assert any(e.get("message") == f"warning: {SYNTHETIC_MODEL_WARNING}" for e in events)


def test_lung_model_clean_up_keeps_nothing_outside_the_body(abdomen, tmp_path):
    """A lung network that calls every voxel lung (as one did with the air beside a patient, chest_ct_4dphase):
    the clean-up drops all air outside the body before keeping the largest components."""
    from med3dcore.classical_lung import inside_body

    model = lung_bundle(tmp_path / "lung.pt", {"domain": "mine", "label_sources": {"a": "real"}})
    body = inside_body(abdomen)
    assert body is not None and 0.2 < body.mean() < 0.9 and not body[:, 0, 0].any()  # corners are outside
    raw = infer.segment(abdomen, model, task="lung", device="cpu", keep_largest=False).labels.array > 0
    cleaned = infer.segment(abdomen, model, task="lung", device="cpu").labels.array > 0
    assert (raw & ~body).sum() > 0.1 * raw.sum()  # the network's "lung" outside the body
    assert cleaned.any() and not (cleaned & ~body).any()


def test_inside_body_is_none_for_an_mr(data_dir):
    from med3dcore.classical_lung import inside_body

    mr = read_volume(next(p for p in sorted((data_dir / "mr").iterdir()) if p.name.endswith((".nii.gz", ".nrrd"))))
    assert inside_body(mr) is None
