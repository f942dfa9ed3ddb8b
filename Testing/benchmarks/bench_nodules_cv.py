"""Nodule classification on the real LIDC-IDRI crops: patient-grouped k-fold cross-validation, accuracy and AUC,
from scratch vs from a pretrained encoder (the same folds for every run).

    python Testing/benchmarks/bench_nodules_cv.py --init scratch --out /tmp/nodule_cv/scratch
    python Testing/benchmarks/bench_nodules_cv.py --init ENCODER.pt --out /tmp/nodule_cv/pretrained
    python Testing/benchmarks/bench_nodule_table.py --runs /tmp/nodule_cv/scratch /tmp/nodule_cv/pretrained

Without tuning flags each fold is exactly what `med3d finetune --task nodule` does by default (its settings, input
cube and temperature scaling). Each fold trains on the other folds (with the inner patient-grouped validation split
that picks the best checkpoint by AUC and fits the temperature) and is scored once on its held-out patients with the
probabilities classify would give: with the nodule's mask, so the measured-size model takes part (``probabilities``;
nodule_measures.py), from the image alone (``image_probabilities``) and with an ROI alone (``roi_probabilities``:
``classify`` itself given the box the mask shows as its ROI, as ``med3d evaluate --roi-from-mask`` scores it, so the
learnt outline and the box it narrows to take part; nodule_outline.py). Per-fold results go to OUT/fold<k>.json, so
an interrupted run keeps the folds it finished; the prepared cubes are cached beside OUT. ``--rescore-roi RUN``
recomputes only the ROI-only answers of a finished run's fold bundles with today's classify (into OUT).
bench_nodule_table.py puts the runs next to the baselines, with confidence intervals.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from med3dcore.bundles import Bundle, load_bundle, model_from_bundle
from med3dcore.classification_finetune import (ClassificationSettings, classification_metrics, finetune_classification,
                                               predict_logits, softmax_with_temperature)
from med3dcore.finetune import grouped_folds
from med3dcore.infer import classify, probability_temperature
from med3dcore.nodule_cubes import cached_cubes
from med3dcore.nodule_measures import fused_probability, measure_cases
from med3dcore.nodules import NoduleCase, NoduleInputSpec, nodule_box, read_nodule_table, trained_context
from med3dcore.progress import make_reporter
from med3dcore.volume_files import read_volume

DATA = Path(os.environ.get("MED3D_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data"


def summary(folders) -> None:
    for folder in folders:
        folds = sorted(Path(folder).glob("fold*.json"))
        if not folds:
            print(f"{folder}: no finished folds")
            continue
        rows = [json.loads(f.read_text()) for f in folds]
        probs = np.concatenate([r["probabilities"] for r in rows])
        labels = np.concatenate([r["labels"] for r in rows])
        pooled = classification_metrics(np.stack([1 - probs, probs], 1), labels)
        accs = [r["test"]["accuracy"] for r in rows]
        aucs = [r["test"]["auc"] for r in rows]
        print(f"{rows[0]['init']}: {len(rows)} folds, {len(labels)} nodules | accuracy {np.mean(accs):.3f} "
              f"+- {np.std(accs):.3f}, AUC {np.mean(aucs):.3f} +- {np.std(aucs):.3f} (per fold) | pooled accuracy "
              f"{pooled['accuracy']:.3f}, AUC {pooled['auc']:.3f} | majority-class accuracy "
              f"{max(labels.mean(), 1 - labels.mean()):.3f} | {sum(r['seconds'] for r in rows) / 60:.1f} min")


def roi_only_probabilities(bundle: Bundle, cases: Sequence[NoduleCase]) -> np.ndarray:
    """Malignant probability of each case as `classify` gives it with an ROI alone: the box the case's mask shows,
    given as the ROI (`med3d evaluate --roi-from-mask`)."""
    out = []
    for case in cases:
        image = read_volume(case.image)
        low, high = nodule_box(image, mask=read_volume(case.mask), params=bundle.extra.get("nodule_input"))
        result = classify(image, bundle, roi=((low + high) / 2.0, high - low), device="cpu")
        out.append(result.probabilities["malignant"])
    return np.array(out)


def rescore_roi(run: Path, out: Path, cases: Sequence[NoduleCase], folds: Sequence[np.ndarray]) -> None:
    """Copy a finished run's folds into ``out`` with their ROI-only answers recomputed by today's classify."""
    out.mkdir(parents=True, exist_ok=True)
    for k, test_idx in enumerate(folds):
        record = json.loads((run / f"fold{k}.json").read_text())
        labels = np.array(record["labels"])
        p = roi_only_probabilities(load_bundle(run / f"fold{k}.pt"), [cases[i] for i in test_idx])
        record.update(roi_probabilities=p.tolist(), roi_test=classification_metrics(np.column_stack([1 - p, p]),
                                                                                     labels), rescored_from=str(run))
        (out / f"fold{k}.json").write_text(json.dumps(record))
        print(f"fold {k}: ROI-only AUC {record['roi_test']['auc']:.3f}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", default="scratch")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only", type=int, nargs="*", help="run only these fold numbers (0-based)")
    # Defaults: those of `med3d finetune --task nodule` (ClassificationSettings, NoduleInputSpec).
    parser.add_argument("--steps", type=int, default=ClassificationSettings.steps)
    parser.add_argument("--batch-size", type=int, default=ClassificationSettings.batch_size)
    parser.add_argument("--lr", type=float, help="encoder learning rate (default: the recipe's, by --init)")
    parser.add_argument("--head-lr", type=float, help="new layers' learning rate (default: the recipe's)")
    parser.add_argument("--freeze", default="")
    parser.add_argument("--cube", type=int, default=NoduleInputSpec.cube, help="cube size in voxels")
    parser.add_argument("--cube-spacing", type=float, default=NoduleInputSpec.spacing_mm, help="cube spacing in mm")
    parser.add_argument("--amp", default=ClassificationSettings.amp, help="auto, off, bf16 (CPU too), fp16 (CUDA)")
    parser.add_argument("--mask-weight", type=float, default=ClassificationSettings.mask_weight,
                        help="weight of the auxiliary nodule-mask loss (0: none)")
    parser.add_argument("--outline-steps", type=int, default=ClassificationSettings.outline_steps,
                        help="steps of the nodule outline network (default: 3 x --steps; 0: none)")
    parser.add_argument("--seed", type=int, default=ClassificationSettings.seed,
                        help="training seed (batches, augmentation, initial weights); the folds stay the same")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary", nargs="*", help="print the summary of finished runs and exit")
    parser.add_argument("--rescore-roi", type=Path, metavar="RUN",
                        help="recompute the ROI-only answers of RUN's fold bundles into --out, and exit")
    args = parser.parse_args()
    if args.summary:
        summary(args.summary)
        return 0
    torch.set_num_threads(args.threads)
    cases = read_nodule_table(str(DATA / "nodules" / "labels.csv"))
    labels = np.array([c.label for c in cases])
    folds = grouped_folds([c.patient for c in cases], args.folds, strata=labels, seed=0)
    if args.rescore_roi:
        rescore_roi(args.rescore_roi, args.out, cases, folds)
        return 0
    # The context the crops show around their masks, as finetune measures it (a property of how the crops were
    # cut, not of their labels, so measuring it on every case leaks nothing between folds).
    spec = trained_context(cases, NoduleInputSpec(cube=args.cube, spacing_mm=args.cube_spacing))
    cubes = cached_cubes(cases, spec, args.out.parent / "cache", make_reporter("bar"))
    # Every crop has a mask: the mask loss (--mask-weight) and the outline network (--outline-steps) learn from them.
    masks = cached_cubes(cases, spec, args.out.parent / "cache", make_reporter("bar"), kind="mask")
    args.out.mkdir(parents=True, exist_ok=True)
    reporter = make_reporter("bar")
    for k, test_idx in enumerate(folds):
        if args.only is not None and k not in args.only:
            continue
        target = args.out / f"fold{k}.json"
        if target.exists():
            continue
        train_idx = np.setdiff1d(np.arange(len(cases)), test_idx)
        start = time.time()
        result = finetune_classification(
            [cases[i] for i in train_idx], args.out, f"fold{k}", init=args.init, spec=spec, cubes=cubes[train_idx],
            settings=ClassificationSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                            head_lr=args.head_lr, amp=args.amp, mask_weight=args.mask_weight,
                                            seed=args.seed, outline_steps=args.outline_steps,
                                            freeze=tuple(p for p in args.freeze.split(",") if p)),
            mask_cubes=masks[train_idx], reporter=reporter, overwrite=True)
        bundle = load_bundle(result["bundle"])
        logits = predict_logits(model_from_bundle(bundle), cubes[test_idx])
        image_probs = softmax_with_temperature(logits, probability_temperature(bundle))  # classify --roi
        probs = image_probs
        if "measured_fusion" in bundle.extra:  # classify --mask: the image and the mask's measures
            p = fused_probability(bundle.extra["measured_fusion"], measure_cases([cases[i] for i in test_idx]),
                                  logits[:, 1] - logits[:, 0])
            probs = np.column_stack([1 - p, p])
        roi_probs = image_probs
        if "outline" in bundle.extra:  # classify without a mask: the image and the learnt outline's measures
            p = roi_only_probabilities(bundle, [cases[i] for i in test_idx])  # the bundle loaded above
            roi_probs = np.column_stack([1 - p, p])
        test = classification_metrics(probs, labels[test_idx])
        record = {"init": args.init, "fold": k, "test": test, "validation": result["metrics"],
                  "probabilities": probs[:, 1].tolist(), "image_probabilities": image_probs[:, 1].tolist(),
                  "image_test": classification_metrics(image_probs, labels[test_idx]),
                  "roi_probabilities": roi_probs[:, 1].tolist(),
                  "roi_test": classification_metrics(roi_probs, labels[test_idx]),
                  "outline": result["outline"].get("validation_dice"), "outline_steps": args.outline_steps,
                  "labels": labels[test_idx].tolist(),
                  "train_cases": int(len(train_idx)), "test_patients": len({cases[i].patient for i in test_idx}),
                  "steps": args.steps, "amp": args.amp, "lr": args.lr, "head_lr": args.head_lr,
                  "mask_weight": args.mask_weight, "seed": args.seed,
                  "input": spec.to_dict(), "seconds": time.time() - start}
        target.write_text(json.dumps(record))
        print(f"fold {k}: test accuracy {test['accuracy']:.3f} AUC {test['auc']:.3f} "
              f"({record['seconds']:.0f} s)", file=sys.stderr)
    summary([args.out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
