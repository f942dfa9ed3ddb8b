"""Lungs on every real CT in ../shared/data: the classical method (no weights) and a Med3D lung model trained on
the classical method's labels, leave-one-scan-out.

    python Testing/benchmarks/bench_lungs.py [--out /tmp/med3d_bench_lungs] [--steps 400] [--no-loso]
                                            [--final /work/models/lung_real.pt]

Classical method, per scan (each in a fresh process, 2 threads): lung volume per side (L), connected components per
side, share of lung voxels above -300 HU, trachea and main bronchi (airway volume cut out, its lumen inside the
lungs), seconds and peak memory (the process's peak RSS, reading included, and the method's own peak numpy
allocation), Dice against every real lung mask there is (the TotalSegmentator silver lung bases of abdomen_ct,
and the lobes of the multilabel maps merged per side), and an overlay PNG per scan (plus a coronal view through
the carina with the airway that was cut out, label 3) under --out.

Med3D model, leave one scan out: for each full chest CT, a ResNet-10 lung model (lung preset, from scratch,
Adam lr 0.001, classical labels of the two other chest CTs, no validation split) segments the held-out scan;
Dice of its lung mask against the classical method's, as `med3d segment` gives it (its clean-up includes
classical_lung.refine_to_air: the boundary moved onto the scan's air/tissue boundary within 3 mm) and with the
clean-up's other steps only (the network's own boundary). --reuse scores models already trained under --out.
Then the end-to-end time (read, segment, write) on chest_ct.nrrd of the model trained without it and of the
classical method.

--final trains the model the other benchmarks use on all three chest CTs, with exactly this command (kept outside
the repository):

    mkdir -p /work/models/chest_cts && ln -sf /work/shared/data/ct/chest_ct.nrrd \\
        /work/shared/data/ct/chest_ct_lidc1011.nii.gz /work/shared/data/ct/chest_ct_4dphase.nii.gz \\
        /work/models/chest_cts/
    med3d finetune --task lung --images /work/models/chest_cts --labels classical --init scratch --lr 0.001 \\
        --val-fraction 0 --steps 400 --device cpu --out /work/models --name lung_real --progress none

(the run folder /work/models/lung_real/ keeps the classical labels and the preprocessing cache).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("MED3D_SHARED", ROOT.parent / "shared")) / "data"
CHESTS = ["ct/chest_ct.nrrd", "ct/chest_ct_lidc1011.nii.gz", "ct/chest_ct_4dphase.nii.gz"]
SCANS = CHESTS + ["ct/abdomen_ct.nii.gz", "ct/abdomen_ct_small.nii.gz", "dicom/abdomen_ct_series", "dicom/ct_3slice"]
RIGHT_LOBES, LEFT_LOBES = (12, 13, 14), (10, 11)  # totalsegmentator_labels.json, ct_total
LR = 0.001  # from scratch: 0.01 (the paper's) learnt no faster in 150 steps here, as the demo found too


def _one(scan: str, out: Path) -> dict:
    """Child process: the classical method on one scan, with time and memory, figures and overlays."""
    import resource
    import tracemalloc

    import numpy as np
    from scipy import ndimage

    from med3dcore.classical_lung import LUNG_LABELS, LUNG_WINDOW, segment_lungs
    from med3dcore.overlay import write_overlay
    from med3dcore.volume import Volume, to_canonical
    from med3dcore.volume_files import read_volume

    image = read_volume(DATA / scan)
    start = time.perf_counter()
    found = segment_lungs(image)
    seconds = time.perf_counter() - start
    tracemalloc.start()  # a second run for the method's own allocations (tracing slows it down)
    segment_lungs(image)
    peak_alloc = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    labels = found.labels.array
    ml = float(np.prod(image.spacing)) / 1000.0
    row = {"scan": scan, "seconds": round(seconds, 2), "peak_rss_gb": round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "peak_numpy_gb": round(peak_alloc / 2**30, 2),
        "threshold_hu": found.details["threshold_hu"], "warnings": found.warnings, "sides": {}}
    for info in LUNG_LABELS:
        lung = labels == info["value"]
        _, count = ndimage.label(lung, structure=np.ones((3, 3, 3)))
        row["sides"][info["name"]] = {"litres": round(float(lung.sum()) * ml / 1000.0, 3), "components": int(count),
                                      "above_-300_pct": round(100.0 * float(np.mean(image.array[lung] > -300)), 2)
                                      if lung.any() else None}
    if found.airway is not None:
        airway = found.airway.array > 0
        lumen = airway & (image.array < -900)
        row["airway"] = {"ml": round(float(airway.sum()) * ml, 1),
                         "lumen_inside_lungs_ml": round(float((lumen & (labels > 0)).sum()) * ml, 2),
                         "lumen_ml": round(float(lumen.sum()) * ml, 1)}
        both = found.labels.with_array(np.where(airway & (labels == 0), 3, labels).astype(np.uint8))
        canon, _ = to_canonical(both)
        where = np.argwhere(canon.array == 3)
        low = where[where[:, 0] <= np.percentile(where[:, 0], 30)]  # the carina and main bronchi
        j = int(low[:, 1].mean())  # a coronal slab through them
        slab = slice(max(j - 2, 0), j + 3)
        cimage, _ = to_canonical(image)
        crop = lambda v: Volume(v.array[:, slab], v.spacing, tuple(  # noqa: E731
            (v.ijk_to_lps() @ np.array([0, slab.start, 0, 1.0]))[:3]), v.direction)
        info3 = list(LUNG_LABELS) + [{"value": 3, "name": "airway", "color": [240, 200, 40]}]
        write_overlay(crop(cimage), crop(canon), out / f"{Path(scan).name.split('.')[0]}_airway.png", info3,
                      LUNG_WINDOW, overwrite=True)
    row["dice"] = _dice_rows(scan, labels)
    write_overlay(image, found.labels, out / f"{Path(scan).name.split('.')[0]}.png", LUNG_LABELS, LUNG_WINDOW,
                  overwrite=True)
    return row


def _dice_rows(scan: str, labels) -> dict:
    """Dice against every real lung mask of this scan (TotalSegmentator silver masks; lobes merged per side)."""
    import numpy as np

    from med3dcore.metrics import dice
    from med3dcore.volume_files import read_volume

    rows = {}
    if scan == "ct/abdomen_ct.nii.gz":
        silver_volume = read_volume(DATA / "ct" / "abdomen_ct_lung.nii.gz")
        silver, ml = silver_volume.array > 0, float(np.prod(silver_volume.spacing)) / 1000.0
        lobes = read_volume(DATA / "ct" / "abdomen_ct_small_multilabel.nii.gz").array  # its slices 82-111
        rows["lung (abdomen_ct_lung)"] = round(float(dice(labels > 0, silver)), 4)
        rows["false positive mL"] = round(float(((labels > 0) & ~silver).sum()) * ml, 1)
        rows["false negative mL"] = round(float((silver & (labels == 0)).sum()) * ml, 1)
        rows["right lung, slices 82-111 (lobes)"] = round(float(dice(labels[82:] == 1, np.isin(lobes, RIGHT_LOBES))), 4)
        rows["left lung, slices 82-111 (lobes)"] = round(float(dice(labels[82:] == 2, np.isin(lobes, LEFT_LOBES))), 4)
        rows["gut gas labelled lung (voxels)"] = int(((labels[82:] > 0) & np.isin(lobes, (6, 18, 19, 20))).sum())
    elif scan == "ct/abdomen_ct_small.nii.gz":
        lobes = read_volume(DATA / "ct" / "abdomen_ct_small_multilabel.nii.gz").array
        rows["right lung (lobes)"] = round(float(dice(labels == 1, np.isin(lobes, RIGHT_LOBES))), 4)
        rows["left lung (lobes)"] = round(float(dice(labels == 2, np.isin(lobes, LEFT_LOBES))), 4)
    elif scan == "dicom/abdomen_ct_series":
        multilabel = read_volume(DATA / "dicom" / "abdomen_ct_series_multilabel.nii.gz").array
        rows["TotalSegmentator lung voxels"] = int(np.isin(multilabel, RIGHT_LOBES + LEFT_LOBES).sum())
        rows["mask voxels"] = int((labels > 0).sum())
    return rows


def classical_rows(out: Path, threads: int) -> list:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    rows = []
    for scan in SCANS:
        result = subprocess.run([sys.executable, __file__, "--one", scan, "--out", str(out)], capture_output=True,
                                text=True, env=env, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _end_to_end(scan: Path, out: Path, **kwargs) -> float:
    from med3dcore.infer import segment
    from med3dcore.volume_files import read_volume, write_volume

    start = time.perf_counter()
    result = segment(read_volume(scan), task="lung", device="cpu", **kwargs)
    write_volume(result.labels, out, overwrite=True)
    return round(time.perf_counter() - start, 2)


def loso_rows(out: Path, steps: int, held_out: list[str] | None = None, reuse: bool = False,
              amp: str = "auto") -> dict:
    """Leave one chest CT out: train on the other two (classical labels), Dice against classical on it."""
    import numpy as np

    from med3dcore.classical_lung import inside_body, segment_lungs
    from med3dcore.segmentation_finetune import SegmentationSettings, finetune_segmentation
    from med3dcore.clean_up import KEEP_COMPONENTS, keep_largest_components
    from med3dcore.infer import load_model, segment
    from med3dcore.metrics import dice
    from med3dcore.pseudo_labels import classical_lung_domain
    from med3dcore.volume_files import read_volume

    rows = {}
    for held in held_out or CHESTS:
        name = "loso_" + Path(held).name.split(".")[0]
        bundle, train_s = out / f"{name}.pt", None
        if not (reuse and bundle.exists()):
            images = out / name / "images"
            images.mkdir(parents=True, exist_ok=True)
            for other in CHESTS:
                link = images / Path(other).name
                if other != held and not link.exists():
                    link.symlink_to(DATA / other)
            start = time.perf_counter()
            domain, sources = classical_lung_domain(images, out / name, name)
            settings = SegmentationSettings(steps=steps, lr=LR, val_fraction=0.0, validate_every=0, device="cpu",
                                            amp=amp)
            bundle = finetune_segmentation(domain, out, name, preset="lung", settings=settings,
                                           label_sources=sources, overwrite=True)["bundle"]
            train_s = round(time.perf_counter() - start)
        scan, model = read_volume(DATA / held), load_model(bundle)
        start = time.perf_counter()
        shipped = segment(scan, model, task="lung", device="cpu").labels.array
        segment_s = time.perf_counter() - start
        # the clean-up without its boundary step: body, then the largest components
        raw = segment(scan, model, task="lung", device="cpu", keep_largest=False).labels.array
        raw[~inside_body(scan)] = 0
        count = 1 if len(model.labels) > 1 else KEEP_COMPONENTS["lung"][1]
        without = keep_largest_components(raw, "per_label", count)
        classical = segment_lungs(scan).labels.array
        ml = float(np.prod(scan.spacing)) / 1e6
        rows[held] = {"dice_vs_classical": round(float(dice(shipped > 0, classical > 0)), 4),
                      "dice_without_boundary_step": round(float(dice(without > 0, classical > 0)), 4),
                      "segment_s": round(segment_s, 2), "train_s": train_s,
                      "model_litres": round(float(np.count_nonzero(shipped)) * ml, 3),
                      "classical_litres": round(float(np.count_nonzero(classical)) * ml, 3), "bundle": str(bundle)}
        if len(model.labels) > 1:
            rows[held]["dice_right_left"] = [round(float(dice(shipped == v, classical == v)), 4) for v in (1, 2)]
        print(json.dumps({held: rows[held]}), flush=True)
    if CHESTS[0] not in rows:
        return rows
    chest = DATA / CHESTS[0]
    bundle = rows[CHESTS[0]]["bundle"]
    rows["end_to_end_chest_ct_s"] = {
        "classical": _end_to_end(chest, out / "e2e_classical.nii.gz", method="classical"),
        "model (trained without chest_ct)": _end_to_end(chest, out / "e2e_model.nii.gz", model=bundle)}
    print(json.dumps(rows["end_to_end_chest_ct_s"]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "med3d_bench_lungs"))
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps of each lung model")
    parser.add_argument("--amp", default="auto", help="training precision of the leave-one-out models (train.amp)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-loso", action="store_true", help="classical figures only")
    parser.add_argument("--held-out", nargs="+", choices=CHESTS, help="leave out only these chest CTs (default: each)")
    parser.add_argument("--no-classical", action="store_true", help="skip the classical figures")
    parser.add_argument("--reuse", action="store_true", help="score the leave-one-out models already under --out")
    parser.add_argument("--final", help="also train the model on all three chest CTs into this .pt path")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(_one(args.one, out)))
        return
    import torch

    torch.set_num_threads(args.threads)
    report = {} if args.no_classical else {"classical": classical_rows(out, args.threads)}
    if not args.no_loso:
        report["loso"] = loso_rows(out, args.steps, args.held_out, args.reuse, args.amp)
    if args.final:
        final = Path(args.final)
        images = final.parent / "chest_cts"
        images.mkdir(parents=True, exist_ok=True)
        for chest in CHESTS:
            if not (images / Path(chest).name).exists():
                (images / Path(chest).name).symlink_to(DATA / chest)
        command = ["med3d", "finetune", "--task", "lung", "--images", str(images), "--labels", "classical",
                   "--init", "scratch", "--lr", str(LR), "--val-fraction", "0", "--steps", str(args.steps),
                   "--device", "cpu", "--out", str(final.parent), "--name", final.stem, "--progress", "none",
                   "--overwrite"]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        report["final"] = {"command": " ".join(command), "seconds": round(time.perf_counter() - start)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {out / 'report.json'}; overlays: {out}/*.png")


if __name__ == "__main__":
    main()
