"""`med3d finetune` from the command line: the JSON-lines progress stream the Slicer module plots, the bundle it
writes, custom label sets from folder pairs, and one-line errors."""
from __future__ import annotations


import numpy as np
import pytest

from med3dcore.bundles import load_bundle
from med3dcore.cli import main
from med3dcore.phantoms import make_ct_phantom
from med3dcore.progress import decode_event
from med3dcore.volume_files import write_volume

from test_finetune import _nodule_table


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_nodule_run_streams_jsonl_events(capsys, tmp_path):
    table = _nodule_table(tmp_path, n_patients=4)
    code, out, _ = _run(capsys, ["finetune", "--task", "nodule", "--csv", str(table), "--out", str(tmp_path / "m"),
                                 "--name", "nod", "--steps", "4", "--batch-size", "2", "--cube", "16",
                                 "--cube-spacing", "2", "--val-every", "2", "--val-fraction", "0.5",
                                 "--progress", "jsonl", "--device", "cpu"])
    assert code == 0
    events = [decode_event(line) for line in out.splitlines()]
    assert all(e is not None for e in events)  # nothing but events on stdout
    steps = [e for e in events if e["kind"] == "progress" and e["stage"] == "finetune"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4] and all(e["total"] == 4 for e in steps)
    assert all(np.isfinite(e["metrics"]["loss"]) for e in steps)
    validations = [e for e in events if e["kind"] == "message" and "accuracy" in e.get("metrics", {})]
    assert len(validations) == 2
    result = [e for e in events if e["kind"] == "result"]
    assert result and result[-1]["path"].endswith("nod.pt")
    bundle = load_bundle(tmp_path / "m" / "nod.pt")
    assert bundle.provenance["settings"]["steps"] == 4
    # the same name again is refused, not overwritten
    code, _, err = _run(capsys, ["finetune", "--task", "nodule", "--csv", str(table), "--out", str(tmp_path / "m"),
                                 "--name", "nod", "--steps", "1", "--progress", "none"])
    assert code == 2 and "exists" in err and "--overwrite" in err
    # --overwrite starts afresh (the earlier run's checkpoints are cleared, not resumed)
    code, _, err = _run(capsys, ["finetune", "--task", "nodule", "--csv", str(table), "--out", str(tmp_path / "m"),
                                 "--name", "nod", "--steps", "1", "--batch-size", "2", "--cube", "16",
                                 "--cube-spacing", "2", "--progress", "none", "--overwrite", "--device", "cpu"])
    assert code == 0, err
    assert load_bundle(tmp_path / "m" / "nod.pt").provenance["settings"]["steps"] == 1


@pytest.mark.slow
def test_custom_labels_from_folders(capsys, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for c in range(3):
        image, labels, _ = make_ct_phantom(shape=(12, 24, 24), spacing=(4.0, 4.0, 8.0), seed=c, nodules=())
        write_volume(image, tmp_path / "img" / f"c{c}.nii.gz")
        # bone (4) and liver (2) of the phantom as labels 7 and 9 of "someone's" label set
        arr = np.asarray(labels.array)
        write_volume(labels.with_array(np.where(arr == 4, 7, np.where(arr == 2, 9, 0)).astype(np.uint8)),
                     tmp_path / "lab" / f"c{c}.nii.gz")
    code, _, err = _run(capsys, ["finetune", "--task", "segmentation", "--images", str(tmp_path / "img"), "--labels",
                                 str(tmp_path / "lab"), "--label-names", "1:bone,2:liver", "--label-map", "7:1,9:2",
                                 "--out", str(tmp_path / "m"), "--name", "abdo", "--steps", "2", "--patch", "8,16,16",
                                 "--spacing", "8,8,8", "--val-every", "2", "--val-fraction", "0.34",
                                 "--progress", "none", "--device", "cpu"])
    assert code == 0, err
    bundle = load_bundle(tmp_path / "m" / "abdo.pt")
    assert [(l["value"], l["name"]) for l in bundle.labels] == [(1, "bone"), (2, "liver")]
    assert all(len(l["color"]) == 3 for l in bundle.labels)
    assert bundle.architecture["head"]["num_classes"] == 3
    assert bundle.task == {"type": "segmentation", "name": "abdo"}


@pytest.mark.parametrize("argv, message", [
    (["--task", "nodule", "--images", "x", "--labels", "y"], "--task nodule reads a --csv"),
    (["--task", "lung"], "exactly one data source"),
    (["--task", "lung", "--images", "x"], "--images needs --labels"),
    (["--task", "segmentation", "--csv", "t.csv", "--label-map", "5"], "VALUE:TARGET"),
    (["--task", "lung", "--csv", "t.csv", "--patch", "8,8"], "--patch must be 3"),
])
def test_bad_arguments_are_one_line_errors(capsys, tmp_path, argv, message):
    code, _, err = _run(capsys, ["finetune", *argv, "--out", str(tmp_path), "--progress", "none"])
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
