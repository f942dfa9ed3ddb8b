"""Med3DLib's Slicer-free parts of background inference and the panel's lists: the ``med3d`` command lines (checked
against the real CLI parser), the classification result as the table shows it (every numeric field the engine
reports), the torch-free model header reader, and the device list for each kind of PyTorch build."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bundles import LUNG_LABELS, NODULE_LABELS, constant_output_bundle
from Med3DLib import device_probe, jobs, model_catalog, models, scene
from med3dcore.cli import build_parser
from med3dcore.errors import Med3DError


@pytest.fixture(scope="module")
def bundle_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("catalog")
    constant_output_bundle(folder / "nodule.pt", {"type": "classifier", "num_classes": 2}, [0.0, math.log(3.0)],
                           {"type": "classification", "name": "nodule"}, NODULE_LABELS, preprocessing={},
                           extra={"nodule_input": {"cube": 16, "spacing_mm": 2.0}})
    constant_output_bundle(folder / "lung.pt", {"type": "lung_decoder", "num_classes": 2, "channels": [8, 8, 8]},
                           [-5.0, 5.0], {"type": "segmentation", "name": "lung"}, LUNG_LABELS, preprocessing={})
    return folder


# ---------------------------------------------------------------------------------------------- commands

def test_segment_commands_parse_with_the_real_cli() -> None:
    command = jobs.segment_command("/s/PythonSlicer", "/w/in.nrrd", "/w/out.nrrd", "lung", models.CLASSICAL, "cpu")
    assert command[:4] == ["/s/PythonSlicer", "-m", "med3dcore.cli", "segment"]
    args = build_parser().parse_args(command[3:])
    assert (args.input, args.output, args.task, args.method, args.model) == \
        ("/w/in.nrrd", "/w/out.nrrd", "lung", "classical", None)
    assert (args.progress, args.device) == ("jsonl", "cpu")
    args = build_parser().parse_args(jobs.segment_command("p", "i", "o", "liver", "/m/liver.pt")[3:])
    assert (args.model, args.task, args.device) == ("/m/liver.pt", "liver", "auto")


def test_classify_commands_parse_with_the_real_cli() -> None:
    command = jobs.classify_command("p", "/w/in.nrrd", "/m/n.pt", "cpu", roi=(-12.5, 3.0, 40.0, 10.0, 10.0, 12.0))
    args = build_parser().parse_args(command[3:])
    assert (args.model, args.progress, args.roi, args.mask) == ("/m/n.pt", "jsonl", "-12.5000,3.0000,40.0000,"
                                                                "10.0000,10.0000,12.0000", None)
    args = build_parser().parse_args(jobs.classify_command("p", "i", "/m/n.pt", mask="/w/mask.nrrd")[3:])
    assert (args.mask, args.roi) == ("/w/mask.nrrd", None)


def test_classify_reports_every_result_field_as_one_jsonl_result_event(bundle_folder, tmp_path) -> None:
    """The panel shows whatever numbers the result event carries; the engine's event must carry every field of
    its result (issue 9 adds the nodule's diameter and volume), so nothing else needs to change then."""
    from med3dcore.infer import ClassificationResult
    from med3dcore.volume import Volume
    from med3dcore.volume_files import write_volume

    image = write_volume(Volume(np.full((20, 30, 30), -700, np.int16), spacing=(1.0, 1.0, 2.0)), tmp_path / "ct.nrrd")
    command = jobs.classify_command(sys.executable, str(image), str(bundle_folder / "nodule.pt"), "cpu",
                                    roi=(15.0, 15.0, 20.0, 10.0, 10.0, 10.0))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["kind"] for e in events][-1] == "result" and events[-2]["step"] == events[-2]["total"]
    result = events[-1]
    assert {f.name for f in dataclasses.fields(ClassificationResult)} <= set(result)
    assert result["probabilities"] == pytest.approx({"benign": 0.25, "malignant": 0.75})


def test_result_rows_show_extra_numeric_fields() -> None:
    event = {"kind": "result", "stage": "classify", "probabilities": {"benign": 0.25, "malignant": 0.75},
             "predicted": "malignant", "roi_center_lps": [10.0, -20.0, 5.0], "roi_size_mm": [6, 6, 8],
             "warnings": ["x"], "diameter_mm": 7.25, "volume_ml": 0.1996, "note": "text is not shown",
             "flag": True, "axes_mm": [7.25, 6.5, 5.0]}
    assert scene.result_rows(event) == [
        ("P(benign)", "0.2500"), ("P(malignant)", "0.7500"), ("class", "malignant"),
        ("ROI centre RAS (mm)", "-10.0, 20.0, 5.0"), ("ROI size (mm)", "6.0, 6.0, 8.0"),
        ("diameter (mm)", "7.25"), ("volume (mL)", "0.1996"), ("axes (mm)", "7.25, 6.5, 5")]
    # with a mask's measures in the probability, the table says so and keeps the image's own answer beside it
    event.update(basis="image + mask measures", image_probabilities={"benign": 0.5, "malignant": 0.5})
    assert scene.result_rows(event)[3:6] == [
        ("probability from", "image + mask measures"), ("P(benign), image alone", "0.5000"),
        ("P(malignant), image alone", "0.5000")]
    event.update(basis="image", image_probabilities={"benign": 0.25, "malignant": 0.75})
    assert scene.result_rows(event)[3] == ("probability from", "image") and len(scene.result_rows(event)) == 9
    assert scene.probabilities_text(event) == "benign: 0.25  malignant: 0.75  ->  malignant"
    event.update(basis="image + mask measures")
    assert scene.probabilities_text(event) == \
        "benign: 0.25  malignant: 0.75  ->  malignant  (from the image + mask measures)"
    # a learnt outline's size is labelled an estimate, right after what the probability comes from
    event.update(basis="image + learnt outline measures", size_from="learnt outline")
    rows = scene.result_rows(event)
    assert rows[6] == ("size from", "learnt outline (an estimate)") and ("diameter (mm)", "7.25") in rows


def test_engine_errors_become_their_own_one_line_message(tmp_path) -> None:
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('noise', file=sys.stderr)\n"
                      "print('med3d segment: error: the scan is 2D; give a 3D volume', file=sys.stderr)\n"
                      "sys.exit(2)\n")
    job = jobs.InferenceJob([sys.executable, str(script)], str(tmp_path / "work"), "segmentation", lambda j: None)
    (tmp_path / "work").mkdir()
    job.start().wait(60)
    with pytest.raises(Med3DError, match=r"^the scan is 2D; give a 3D volume$"):
        job.finish()
    assert not (tmp_path / "work").exists()


# ----------------------------------------------------------------------------------------- model headers

def test_headers_read_without_torch_agree_with_the_engine(bundle_folder) -> None:
    from med3dcore.bundles import list_models

    engine = {m.name: m for m in list_models(bundle_folder)}
    read = {e.name: e for e in model_catalog.ModelCatalog().entries(str(bundle_folder))}
    assert set(read) == set(engine) == {"lung", "nodule"}
    for name, entry in read.items():
        assert entry.kind == "bundle" and entry.error is None
        assert entry.task == engine[name].task and entry.labels == engine[name].labels
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from Med3DLib import model_catalog; "
            "model_catalog.read_header(sys.argv[2]); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(Path(model_catalog.__file__).parents[1]),
                           str(bundle_folder / "lung.pt")], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/med3d-catalog-exploit",))


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path) -> None:
    marker = Path("/tmp/med3d-catalog-exploit")
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"format": "med3d-bundle", "x": Exploit()}, protocol=2))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    entries = {e.name: e for e in model_catalog.ModelCatalog().entries(str(tmp_path))}
    assert entries["evil"].kind == "" and "refused to load" in entries["evil"].error
    assert entries["text"].kind == "" and "not a readable PyTorch checkpoint" in entries["text"].error
    assert not marker.exists()


def test_medicalnet_weights_are_offered_only_as_a_starting_point(tmp_path) -> None:
    import torch

    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(2, 1, 3, 3, 3)}}, tmp_path / "resnet_10.pth")
    (entry,) = model_catalog.ModelCatalog().entries(str(tmp_path))
    assert entry.kind == "weights" and models.models_for_task([entry], "lung") == []
    choices = models.start_model_choices([entry])
    assert choices[0] == ("(from scratch)", "")
    # resnet_10.pth is a catalog file: offered under the catalog's name (the engine checks the file by it)
    assert ("MedicalNet ResNet-10 (3DSeg-8)", "medicalnet-resnet10") in choices
    assert ("resnet_10", str(entry.path)) not in choices


def test_catalog_encoders_are_offered_with_a_download_when_missing(tmp_path) -> None:
    from med3dcore import catalog

    choices = dict((value, title) for title, value in models.start_model_choices([]))
    for model in catalog.KNOWN_MODELS:  # nothing downloaded: each one is offered with the download's size
        value = models.NOT_DOWNLOADED + model.name
        assert models.pending_name(value) == model.name and model.approx_size in choices[value]
    with pytest.raises(Med3DError, match="not downloaded yet: press Download"):
        models.pick_start_model([], models.NOT_DOWNLOADED + "medicalnet-resnet50", str(tmp_path))
    assert models.pick_start_model([], "medicalnet-resnet50", str(tmp_path)) == "medicalnet-resnet50"


def test_models_folder_is_the_engines(monkeypatch, tmp_path) -> None:
    from med3dcore.catalog import models_dir

    monkeypatch.setenv("MED3D_MODELS", str(tmp_path))
    assert Path(model_catalog.models_folder()) == models_dir()
    monkeypatch.delenv("MED3D_MODELS")
    assert Path(model_catalog.models_folder()) == models_dir()


# --------------------------------------------------------------------------------------------- devices

@pytest.mark.parametrize("found, items, text", [
    ({"torch": "2.4", "cuda_build": "12.1", "cuda": ["NVIDIA A40"], "mps": False},
     ["auto", "cpu", "cuda:0"], "GPU: NVIDIA A40"),
    ({"torch": "2.4", "cuda_build": None, "cuda": [], "mps": True}, ["auto", "cpu", "mps"], "Apple MPS"),
    ({"torch": "2.4", "cuda_build": None, "cuda": [], "mps": False}, ["auto", "cpu"], "CPU-only build"),
    ({"torch": "2.4", "cuda_build": "12.1", "cuda": [], "mps": False}, ["auto", "cpu"], "No GPU visible"),
    ({"torch": None}, ["auto", "cpu"], "not known until PyTorch is installed"),
    ({"torch": None, "error": "OSError: fbgemm.dll"}, ["auto", "cpu"], "does not load (OSError: fbgemm.dll)"),
])
def test_device_list_for_each_kind_of_pytorch(found, items, text) -> None:
    """Item 10: Apple Silicon used to read "CPU-only build" although the engine uses MPS there."""
    choices, info = device_probe.device_choices(found)
    assert [device for _, device in choices] == items and text in info


def test_the_device_check_answers_what_torch_says_here() -> None:
    import torch

    probe = device_probe.DeviceProbe(sys.executable).start()
    probe.process.wait(120)
    found = probe.poll()
    assert found["torch"] == torch.__version__ and found["cuda_build"] == torch.version.cuda
    assert len(found["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
