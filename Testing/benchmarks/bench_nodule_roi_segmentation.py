"""Would a learnt nodule segmentation give ROI users the measured-size model? (issue 9, exploratory)

With only an ROI, `classify` has the network alone (AUC ~0.84 on the LIDC CV), below a ruler (0.89); with a mask the
measured-size model reaches 0.90. This benchmark asks how much of that gap a segmentation learnt from the 823 LIDC
masks would close, on the same patient-grouped folds as bench_nodules_cv.py:

    python Testing/benchmarks/bench_nodule_roi_segmentation.py --out /tmp/nroi --only 0 1 --threads 1
    python Testing/benchmarks/bench_nodule_roi_segmentation.py --out /tmp/nroi --only 2 3 4 --threads 1
    python Testing/benchmarks/bench_nodule_roi_segmentation.py --out /tmp/nroi --summary [--image-run /tmp/ncv/base]

Per fold a ResNet-10 with a slim lung decoder (64, 32, 16 channels; 2 classes, full resolution; segmentation
fine-tuning's cross-entropy + soft Dice, training_setup.ce_dice_loss) learns the masks of the other folds' cubes
(the cubes bench_nodules_cv.py trains on: the mask's box plus the trained context, what an ROI drawn as the README
says shows), then segments the held-out cubes; the component nearest the cube's centre is the nodule. The product's
six measures (nodule_outline.cube_measures, on the 1 mm cube grid with HU restored from the window) of the
predicted and of the true masks then go through one logistic regression fitted on the training folds' true-mask
measures (as the product's stage 1 is), scored on the held-out fold. --summary pools the folds: AUC with its
patient-bootstrap interval for true-mask and predicted-mask measures, the Dice of the predicted masks, and, with
--image-run, the network-alone probabilities of that CV run and the paired differences against them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from med3dcore.classification_finetune import CubeSampler
from med3dcore.nodule_cubes import cached_cubes
from med3dcore.finetune import grouped_folds
from med3dcore.nets import build_model
from med3dcore.nodule_measures import fit_logistic, logistic_logit
from med3dcore.nodule_outline import central_component, cube_measures
from med3dcore.nodules import NoduleInputSpec, read_nodule_table, trained_context
from med3dcore.progress import make_reporter
from med3dcore.training_setup import ce_dice_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nodule_stats import fmt, paired_auc_difference, summarise  # noqa: E402

DATA = Path(os.environ.get("MED3D_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data"


def measured(cube: np.ndarray, mask: np.ndarray, spec: NoduleInputSpec) -> np.ndarray:
    """The product's measures of a mask on a cube (nodule_outline.cube_measures); NaN for an empty one."""
    found = cube_measures(cube, mask, spec)
    return np.full(6, np.nan) if found is None else found


def train_fold(cubes: np.ndarray, masks: np.ndarray, labels: np.ndarray, steps: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model({"backbone": {"depth": 10, "shortcut_type": "B"},
                         "head": {"type": "lung_decoder", "num_classes": 2, "channels": [64, 32, 16]}})
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: (1 - s / steps) ** 0.9)
    sampler = CubeSampler(cubes, labels, 8, seed=seed, masks=masks)
    model.train()
    for step in range(1, steps + 1):
        batch = sampler.next_batch(step)
        loss = ce_dice_loss(model(batch["image"]), (batch["mask"][:, 0] >= 0.5).long())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0:
            print(f"  step {step}: loss {loss.item():.3f}", file=sys.stderr)
    return model.eval()


def run_fold(k: int, test: np.ndarray, cubes: np.ndarray, masks: np.ndarray, labels: np.ndarray,
             spec: NoduleInputSpec, args: argparse.Namespace) -> dict:
    start = time.time()
    train = np.setdiff1d(np.arange(len(labels)), test)
    model = train_fold(cubes[train], masks[train], labels[train], args.steps, args.seed)
    predicted, dice = [], []
    with torch.no_grad():
        for i in test:
            pred = model(torch.from_numpy(cubes[i:i + 1])).argmax(1)[0].numpy() > 0
            pred = central_component(pred)
            truth = masks[i, 0] >= 0.5
            dice.append(2 * np.sum(pred & truth) / max(pred.sum() + truth.sum(), 1))
            predicted.append(measured(cubes[i], pred, spec))
    true_train = np.array([measured(cubes[i], masks[i, 0] >= 0.5, spec) for i in train])
    true_test = np.array([measured(cubes[i], masks[i, 0] >= 0.5, spec) for i in test])
    predicted = np.array(predicted)
    empty = int(np.isnan(predicted[:, 0]).sum())
    fallback = np.nanmedian(true_train, axis=0)  # an empty prediction gets the typical nodule's measures
    predicted = np.where(np.isnan(predicted), fallback, predicted)
    lr = fit_logistic(true_train, labels[train])
    to_p = lambda x: (1 / (1 + np.exp(-logistic_logit(lr, x)))).tolist()  # noqa: E731
    return {"fold": k, "test": test.tolist(), "true_mask_p": to_p(true_test), "predicted_mask_p": to_p(predicted),
            "dice": dice, "empty": empty, "seconds": time.time() - start}


def summary(out: Path, labels: np.ndarray, patients: list, image_run: Path = None) -> None:
    rows = [json.loads(f.read_text()) for f in sorted(out.glob("fold*.json"))]
    if len(rows) < 5:
        raise SystemExit(f"{out}: {len(rows)} of 5 folds finished")
    order = np.concatenate([r["test"] for r in rows])
    pooled = {name: np.empty(len(labels)) for name in ("true_mask_p", "predicted_mask_p")}
    for name in pooled:
        pooled[name][order] = np.concatenate([r[name] for r in rows])
    dice = np.concatenate([r["dice"] for r in rows])
    print(f"predicted masks: Dice to the LIDC masks median {np.median(dice):.3f}, quartiles "
          f"{np.percentile(dice, 25):.3f}-{np.percentile(dice, 75):.3f}, below 0.5: {np.mean(dice < 0.5):.1%}; "
          f"{sum(r['seconds'] for r in rows) / 60:.1f} min")
    table = {"measures of the true masks (cube grid)": pooled["true_mask_p"],
             "measures of the learnt masks (ROI only)": pooled["predicted_mask_p"]}
    if image_run:
        alone = np.empty(len(labels))
        for k in range(5):
            record = json.loads((image_run / f"fold{k}.json").read_text())
            alone[np.array(rows[k]["test"])] = record["image_probabilities"]
        table[f"network alone ({image_run.name})"] = alone
        logit = lambda p: np.log(np.clip(p, 1e-6, 1) / np.clip(1 - p, 1e-6, 1))  # noqa: E731
        table["learnt-mask measures + network (mean logit)"] = 1 / (1 + np.exp(
            -(logit(pooled["predicted_mask_p"]) + logit(alone)) / 2))
    print("| model | AUC | accuracy | minus learnt-mask measures (paired) |\n|---|---|---|---|")
    reference = pooled["predicted_mask_p"]
    for name, p in table.items():
        s = summarise(p, labels, patients)
        diff = "-" if p is reference else fmt(paired_auc_difference(p, reference, labels, patients))
        print(f"| {name} | {fmt(s['AUC'])} | {fmt(s['accuracy'])} | {diff} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", type=int, nargs="*")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("--image-run", type=Path, help="a bench_nodules_cv.py run to compare with")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = read_nodule_table(str(DATA / "nodules" / "labels.csv"))
    labels = np.array([c.label for c in cases])
    patients = [c.patient for c in cases]
    folds = grouped_folds(patients, 5, strata=labels, seed=0)
    if args.summary:
        summary(args.out, labels, patients, args.image_run)
        return 0
    spec = trained_context(cases, NoduleInputSpec())
    cache = args.out.parent / "cache"
    cubes = cached_cubes(cases, spec, cache, make_reporter("none"))
    masks = cached_cubes(cases, spec, cache, make_reporter("none"), kind="mask")
    args.out.mkdir(parents=True, exist_ok=True)
    for k, test in enumerate(folds):
        target = args.out / f"fold{k}.json"
        if (args.only is not None and k not in args.only) or target.exists():
            continue
        record = run_fold(k, test, cubes, masks, labels, spec, args)
        target.write_text(json.dumps(record))
        print(f"fold {k}: median Dice {np.median(record['dice']):.3f} ({record['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
