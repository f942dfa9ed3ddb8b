"""Fine-tuning from Slicer: export training cases to a temporary folder and build the ``med3d finetune``
command that a background ``PythonSlicer`` runs with ``--progress jsonl``.

The scene's nodes are never modified: the Slicer side turns them into engine ``Volume`` objects, and only
these copies are written here.
"""
from __future__ import annotations

import csv
import os
import re
from typing import Any, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from med3dcore.errors import Med3DError

CLASSES = ("benign", "malignant")


class SegmentationCase(NamedTuple):
    image: Any          # med3dcore.volume.Volume
    labels: Any         # Volume of integer labels on the image's grid
    patient: str = ""


class NoduleCase(NamedTuple):
    image: Any                              # Volume
    center_lps: Tuple[float, float, float]  # ROI centre
    size_mm: Tuple[float, float, float]     # ROI size
    label: str                              # "benign" or "malignant"
    patient: str = ""


def class_from_name(name: str) -> str:
    """The nodule class a ROI's name states ("Nodule 3 malignant" -> "malignant")."""
    words = set(re.findall(r"[a-z]+", name.lower()))
    found = [c for c in CLASSES if c in words]
    if len(found) != 1:
        raise Med3DError(f"ROI '{name}' does not say its class; put exactly one of 'benign' or 'malignant' in "
                         "the ROI's name (e.g. 'Nodule 1 malignant')")
    return found[0]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "case"


def export_segmentation_cases(cases: Sequence[SegmentationCase], folder: str) -> str:
    """Write images/ and labels/ (NIfTI) and ``cases.csv`` (image,label,patient_id); returns the CSV path."""
    from med3dcore.volume import as_label_map
    from med3dcore.volume_files import write_volume

    if not cases:
        raise Med3DError("no training cases were chosen; pick at least one volume with its segmentation")
    for sub in ("images", "labels"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rows = []
    for index, case in enumerate(cases):
        if not case.image.same_geometry(case.labels):
            raise Med3DError(f"training case {index + 1}: the segmentation's grid differs from its volume's; "
                             "export the segmentation with the volume as reference geometry")
        name = f"case_{index:03d}"
        image = os.path.join("images", name + ".nii.gz")
        label = os.path.join("labels", name + ".nii.gz")
        write_volume(case.image, os.path.join(folder, image))
        write_volume(as_label_map(case.labels), os.path.join(folder, label))
        rows.append({"image": image, "label": label, "patient_id": case.patient or name})
    return _write_csv(os.path.join(folder, "cases.csv"), ["image", "label", "patient_id"], rows)


def export_nodule_cases(cases: Sequence[NoduleCase], folder: str) -> str:
    """Write the images and a classification table (image,label,roi,patient_id) as ``nodules.csv``."""
    from med3dcore.volume_files import write_volume

    if not cases:
        raise Med3DError("no training nodules were chosen; pick ROIs named with their class (benign/malignant)")
    labels = {case.label for case in cases}
    if not labels <= set(CLASSES):
        raise Med3DError(f"nodule classes must be benign or malignant, got {sorted(labels - set(CLASSES))}")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    written = {}
    for index, case in enumerate(cases):
        key = id(case.image)  # several ROIs on one volume share one exported image
        if key not in written:
            written[key] = os.path.join("images", f"volume_{len(written):03d}.nii.gz")
            write_volume(case.image, os.path.join(folder, written[key]))
        roi = ",".join(f"{v:.4f}" for v in tuple(case.center_lps) + tuple(case.size_mm))
        rows.append({"image": written[key], "label": case.label, "roi": roi,
                     "patient_id": case.patient or written[key]})
    return _write_csv(os.path.join(folder, "nodules.csv"), ["image", "label", "roi", "patient_id"], rows)


def _write_csv(path: str, columns: List[str], rows: List[Mapping[str, str]]) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def model_name(models_folder: str, name: str, resume: bool = False) -> str:
    """A file-safe model name; the new model becomes ``<models folder>/<name>.pt``, never replacing a model
    (a resumed run keeps its name: its bundle is only written at the end)."""
    stem = _safe_name(name)
    if not resume and os.path.exists(os.path.join(models_folder, stem + ".pt")):
        raise Med3DError(f"a model named '{stem}' already exists in {models_folder}; choose another name")
    return stem


# Batch sizes ``med3d finetune`` uses by default (patches for segmentation, cubes for nodules).
DEFAULT_BATCH = {"lung": 2, "liver": 2, "nodule": 8}


def data_arguments(data: str) -> List[str]:
    """``med3d finetune`` data flags for a table (.csv), an MSD ``dataset.json`` or a folder holding ``images/``
    and ``labels/``."""
    if os.path.isfile(data) and data.lower().endswith(".csv"):
        return ["--csv", data]
    if os.path.isfile(data) and data.lower().endswith(".json"):
        return ["--dataset", data]
    if os.path.isdir(os.path.join(data, "images")) and os.path.isdir(os.path.join(data, "labels")):
        return ["--images", os.path.join(data, "images"), "--labels", os.path.join(data, "labels")]
    raise Med3DError(f"training data '{data}' is not a .csv table, a dataset.json or a folder with images/ and "
                     "labels/ subfolders; pick one of these")


def count_cases(data: str) -> int:
    """How many training cases ``data`` holds (see :func:`data_arguments`)."""
    import json

    kind = data_arguments(data)[0]
    if kind == "--csv":
        with open(data, newline="") as handle:
            return sum(1 for _ in csv.DictReader(handle))
    if kind == "--dataset":
        with open(data) as handle:
            return len(json.load(handle).get("training", []))
    return sum(1 for name in os.listdir(os.path.join(data, "images")) if not name.startswith("."))


def steps_for_epochs(epochs: int, cases: int, task: str) -> int:
    """Optimisation steps for ``epochs`` passes over ``cases`` at the engine's default batch size."""
    if epochs < 1:
        raise Med3DError(f"epochs must be at least 1, got {epochs}")
    batch = DEFAULT_BATCH.get(task, 2)
    return int(epochs) * max(1, -(-int(cases) // batch))


def finetune_command(python: str, task: str, data: str, out_dir: str, name: str, init: Optional[str] = None,
                     steps: Optional[int] = None, lr: Optional[float] = None, device: str = "auto",
                     resume: bool = False, extra: Sequence[str] = ()) -> List[str]:
    """The command line of ``med3d finetune`` for a background run with JSON-lines progress."""
    command = [python, "-m", "med3dcore.cli", "finetune", "--task", task, *data_arguments(data),
               "--out", out_dir, "--name", name, "--device", device, "--progress", "jsonl",
               "--init", init or "scratch"]
    if steps is not None:
        command += ["--steps", str(int(steps))]
    if lr is not None:
        command += ["--lr", repr(float(lr))]
    if resume:
        command.append("--resume")
    return command + list(extra)
