"""``med3d inspect``: reports for each kind of checkpoint; bad files give one line on stderr and exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from med3dcore.bundles import inspect_file, save_bundle
from med3dcore.cli import main
from med3dcore.errors import Med3DError
from med3dcore.medicalnet import export_medicalnet
from med3dcore.nets import build_model, resnet3d

from hostile_cases import tiny_bundle

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect")
    arch = {"backbone": {"depth": 10, "shortcut_type": "B"}, "head": {"type": "coarse_seg", "num_classes": 3}}
    model = build_model(arch)
    save_bundle(folder / "liver.pt", model, architecture=arch, task={"type": "segmentation", "name": "liver"},
                labels=[{"value": 1, "name": "liver"}, {"value": 2, "name": "tumour"}], preprocessing={},
                provenance={})
    export_medicalnet(model, folder / "resnet_10.pth")
    torch.save(resnet3d(18, "A", None).state_dict(), folder / "bare.pt")
    return folder


def test_inspect_bundle_text(files, capsys):
    assert main(["inspect", str(files / "liver.pt")]) == 0
    out = capsys.readouterr().out
    assert "format:      med3d-bundle (Med3D model)" in out
    assert "network:     ResNet-10, shortcut B" in out
    assert "parameters:  backbone 14,355,520 (14.36 M), total 14,357,059 (14.36 M)" in out
    assert "head:        coarse_seg (num_classes=3)" in out
    assert "task:        segmentation (liver)" in out
    assert "labels:      1=liver, 2=tumour" in out


@pytest.mark.parametrize("nodule_input, line", [
    ({"cube": 32, "spacing_mm": 1.0, "window": [-1000.0, 400.0], "context_mm": [8.0, 8.0, 0.0]},
     "nodule input: 32^3 voxels at 1 mm, -1000..400 HU; context around a mask x, y, z = 8, 8, 0 mm (draw an ROI "
     "with this margin around the nodule)"),
    ({"cube": 24, "spacing_mm": 1.25}, "nodule input: 24^3 voxels at 1.25 mm, -1000..400 HU; context around a mask "
                                       "x, y, z = 8, 8, 8 mm")])  # a bundle from before per-axis context
def test_inspect_shows_how_a_classifier_sees_a_nodule(tmp_path, capsys, nodule_input, line):
    """The context a nodule classifier shows around a mask is the margin to draw an ROI with."""
    arch = {"backbone": {"depth": 10, "shortcut_type": "B"}, "head": {"type": "classifier", "num_classes": 2}}
    save_bundle(tmp_path / "nodule.pt", build_model(arch), architecture=arch,
                task={"type": "classification", "name": "nodule"},
                labels=[{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}], preprocessing=None,
                provenance={}, extra={"nodule_input": nodule_input})
    assert main(["inspect", str(tmp_path / "nodule.pt")]) == 0
    assert line in capsys.readouterr().out



@pytest.mark.parametrize("nodule_input, reason", [
    ({"cube": 32, "context_mm": [8.0, 8.0]}, "the nodule context margin must be one number or three (x, y, z mm), "
                                             "got [8.0, 8.0]"),
    ({"cube": 32, "context_mm": -1}, "the nodule context margin (mm) must be a number from 0 to 1000, got -1"),
    ("32^3", "'extra.nodule_input'")])
def test_a_damaged_nodule_input_names_the_file(tmp_path, capsys, nodule_input, reason):
    """A stranger's bundle whose nodule input is damaged: one line that names the file, as for every other field
    (bundle_checks), from inspect and from classify alike; save_bundle refuses to write one."""
    arch = {"backbone": {"depth": 10, "shortcut_type": "B"}, "head": {"type": "classifier", "num_classes": 2}}
    path = tiny_bundle(tmp_path / "nodule.pt", architecture=arch, task={"type": "classification", "name": "nodule"},
                       labels=[{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}],
                       preprocessing=None, extra={"nodule_input": nodule_input})
    before = path.read_bytes()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and str(path) in err and reason in err and "Traceback" not in err
    assert path.read_bytes() == before
    with pytest.raises(Med3DError, match="nodule"):
        save_bundle(tmp_path / "again.pt", build_model(arch), architecture=arch,
                    task={"type": "classification", "name": "nodule"},
                    labels=[{"value": 0, "name": "benign"}, {"value": 1, "name": "malignant"}], preprocessing=None,
                    provenance={}, extra={"nodule_input": nodule_input})
    assert not (tmp_path / "again.pt").exists()

def test_inspect_medicalnet_and_bare_files_text(files, capsys):
    assert main(["inspect", str(files / "resnet_10.pth")]) == 0
    out = capsys.readouterr().out
    assert "format:      medicalnet (MedicalNet backbone)" in out and "depth:       10" in out
    assert "task:" not in out and f"med3d finetune --init {files / 'resnet_10.pth'}" in out
    assert main(["inspect", str(files / "bare.pt")]) == 0
    out = capsys.readouterr().out
    assert "format:      state_dict (bare state dict)" in out and "shortcut:    A" in out


def test_inspect_json_equals_engine(files, capsys):
    assert main(["inspect", "--json", str(files / "liver.pt")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(inspect_file(files / "liver.pt")))
    assert printed["labels"][1]["name"] == "tumour" and printed["depth"] == 10


def test_inspect_error_in_process(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.pth")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"med3d inspect: error: checkpoint file {tmp_path / 'missing.pth'} does not exist; " \
                           f"check the path\n"


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_file(kind, folder):
    path = folder / ("scan.png" if kind == "png" else "model.pth")
    if kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    elif kind == "text":
        path.write_text("state_dict = {}\n")
    elif kind == "truncated":
        torch.save({"state_dict": {"w": torch.randn(5000)}}, path)
        path.write_bytes(path.read_bytes()[:3000])
    else:
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _RunsCode(folder / "pwned")}, path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("png", "is not a PyTorch checkpoint (it looks like a PNG image)"),
    ("text", "is not a PyTorch checkpoint (it looks like a text file)"),
    ("truncated", "is damaged or truncated"),
    ("malicious", "refused to load"),
])
def test_inspect_bad_file_in_subprocess(tmp_path, kind, message):
    path = _bad_file(kind, tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "med3dcore.cli", "inspect", str(path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("med3d inspect: error: ") and message in lines[0] and str(path) in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pwned").exists()
