"""Real-data segmentation experiments: the two-stage liver model (and a lung model) fine-tuned on what
../shared/data offers plus synthetic phantoms, scored on ct/abdomen_ct.nii.gz against its silver liver mask.

    python Testing/benchmarks/bench_liver.py --task liver --init scratch --out /tmp/med3d_work/models
    python Testing/benchmarks/bench_liver.py --task lung --init scratch --out /tmp/med3d_work/models

Liver training data: ct/abdomen_ct_small (TotalSegmentator liver, label 5; the SAME patient as the test scan:
slices 82-111 of it, holding most of its liver), dicom/ct_3slice (hand-drawn liver, 3 slices) and phantoms with
liver and tumour; validation (best checkpoint): the DICOM series (label 5, resampled onto the series' grid in
world space) and one phantom. Lung training data: ct/abdomen_ct with its lung-base mask and phantoms;
validation: two phantoms. The script writes OUT/<task>.pt and prints Dice on the test scan, and for the liver
also the label map of the DICOM series (checked to have the series' geometry).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from med3dcore.domains import domain_from_dict
from med3dcore.segmentation_finetune import SegmentationSettings, finetune_segmentation
from med3dcore.infer import segment
from med3dcore.metrics import dice
from med3dcore.phantoms import make_ct_phantom
from med3dcore.preprocess import resample_to_reference
from med3dcore.progress import make_reporter
from med3dcore.volume import Volume
from med3dcore.volume_files import read_volume, write_volume

DATA = Path(os.environ.get("MED3D_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data"
LUNG_LOBES = (10, 11, 12, 13, 14)  # TotalSegmentator ct_total lung lobes
LIVER = 5


def _binary(volume: Volume, values, target: int = 1) -> Volume:
    return volume.with_array(np.isin(np.asarray(volume.array), values).astype(np.uint8) * target)


def write_cases(task: str, folder: Path, n_phantoms: int):
    """Write the label maps (values 1 [, 2]) the task needs and a CSV; returns (csv, validation case ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(case_id: str, image: str, label: Volume, patient: str) -> None:
        path = folder / f"{case_id}_label.nii.gz"
        write_volume(label, path, overwrite=True)
        rows.append({"case_id": case_id, "image": image, "label": str(path), "patient_id": patient})

    if task == "liver":
        small = read_volume(DATA / "ct/abdomen_ct_small_multilabel.nii.gz")
        add("abdomen_ct_small", str(DATA / "ct/abdomen_ct_small.nii.gz"), _binary(small, [LIVER]), "abdomen_ct")
        add("ct_3slice", str(DATA / "dicom/ct_3slice"), read_volume(DATA / "dicom/ct_3slice_liver.nrrd"), "ct_3slice")
        series = read_volume(DATA / "dicom/abdomen_ct_series")
        labels = resample_to_reference(read_volume(DATA / "dicom/abdomen_ct_series_multilabel.nii.gz"), series,
                                       is_label=True)
        add("dicom_series", str(DATA / "dicom/abdomen_ct_series"), _binary(labels, [LIVER]), "dicom_series")
        mapping, validation = {2: 1, 3: 2}, ["dicom_series", "phantom0"]
    else:
        full = read_volume(DATA / "ct/abdomen_ct_lung.nii.gz")
        add("abdomen_ct", str(DATA / "ct/abdomen_ct.nii.gz"), _binary(full, [1]), "abdomen_ct")
        mapping, validation = {1: 1}, ["phantom0", "phantom1"]
    for p in range(n_phantoms):
        image, labels, _ = make_ct_phantom(shape=(40, 96, 96), spacing=(3.5, 3.5, 6.0), seed=100 + p,
                                           tumour=task == "liver", nodules=())
        remapped = np.zeros(labels.shape, np.uint8)
        for source, target in mapping.items():
            remapped[np.asarray(labels.array) == source] = target
        image_path = folder / f"phantom{p}.nii.gz"
        write_volume(image, image_path, overwrite=True)
        add(f"phantom{p}", str(image_path), labels.with_array(remapped), f"phantom{p}")
    table = folder / "cases.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table, validation, {r["case_id"]: r["patient_id"] for r in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("liver", "lung"), default="liver")
    parser.add_argument("--init", default="scratch")
    parser.add_argument("--out", type=Path, default=Path("/tmp/med3d_work/models"))
    parser.add_argument("--name", default=None)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--coarse-steps", type=int, default=60)
    parser.add_argument("--phantoms", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = args.name or args.task
    start = time.time()
    table, validation, groups = write_cases(args.task, Path(f"/tmp/med3d_work/{args.task}_data"), args.phantoms)
    labels = {1: "liver", 2: "liver tumour"} if args.task == "liver" else {1: "lung"}
    domain = domain_from_dict({"name": args.task, "csv": str(table), "labels": labels, "modality": "CT"}, table.parent)
    settings = SegmentationSettings(steps=args.steps, coarse_steps=args.coarse_steps, batch_size=2,
                                    patch=(24, 64, 64), validate_every=40, seed=0, device="cpu",
                                    cache_dir=f"/tmp/med3d_work/{args.task}_cache")
    result = finetune_segmentation(domain, args.out, name, preset=args.task, init=args.init, settings=settings,
                                   groups=groups, val_cases=validation, reporter=make_reporter("bar"),
                                   overwrite=True)
    trained = time.time() - start
    report = {"task": args.task, "init": args.init, "bundle": str(result["bundle"]), "validation": result["metrics"],
              "coarse": result["coarse"], "train_seconds": round(trained)}
    test = read_volume(DATA / "ct/abdomen_ct.nii.gz")
    truth = read_volume(DATA / f"ct/abdomen_ct_{args.task}.nii.gz")
    t0 = time.time()
    predicted = segment(test, str(result["bundle"]), device="cpu")
    report["test_seconds"] = round(time.time() - t0, 1)
    assert predicted.labels.same_geometry(test)
    found = np.asarray(predicted.labels.array) == 1
    report["test_dice"] = dice(found, np.asarray(truth.array) > 0)
    report["test_voxels"] = {"predicted": int(found.sum()), "reference": int((np.asarray(truth.array) > 0).sum())}
    if args.task == "liver":
        series = read_volume(DATA / "dicom/abdomen_ct_series")
        out = segment(series, str(result["bundle"]), device="cpu")
        report["dicom_series_geometry_kept"] = bool(out.labels.same_geometry(series))
        write_volume(out.labels, Path(f"/tmp/med3d_work/{name}_dicom_series_labels.nii.gz"), overwrite=True)
    print(json.dumps(report, indent=2))
    (args.out / f"{name}_report.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
