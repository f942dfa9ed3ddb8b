"""The nodule CV table (issue 9): what a user could use instead of a CNN, next to every finished CNN run, on the same
patient-grouped folds of the 823 LIDC crops in ../shared/data/nodules.

    python Testing/benchmarks/bench_nodule_table.py [--runs DIR ...] [--png reliability.png]

Baselines (scikit-learn, the `bench` extra): a logistic regression on log(diameter_mm) (a ruler), one on the seven
numbers of nodule_stats.measured_features (image + mask) and one on the six numbers `classify --mask` measures
(nodule_measures.measure_features, no network), each fitted on four folds and scored on the fifth. Every CNN run
folder given with --runs (bench_nodules_cv.py's OUT, one fold<k>.json per finished fold, all five needed) is scored
on the same out-of-fold cases (with the nodule's mask, as `classify --mask` gives them; runs whose bundles hold the
measured-size model also get a row of the network alone, as with an ROI), and so is a logistic regression on the
seven features plus the network's out-of-fold logit (does the CNN add to the measurements?). Each row: AUC, accuracy,
sensitivity at 90 % specificity, Brier and ECE on the pooled out-of-fold probabilities, each with a 95 % interval
from a bootstrap over patients; the mean over folds of AUC and accuracy (the issue's targets are means over folds);
and the paired AUC difference against the measured-features baseline (the same patient resamples for both), and each
later run's against the first run given (a lever against the defaults; image-alone rows against the first run's
image-alone row). --png draws the reliability diagram of every row.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from med3dcore.finetune import grouped_folds
from med3dcore.metrics import reliability_bins
from med3dcore.nodule_measures import measure_features
from med3dcore.nodules import read_nodule_table
from med3dcore.volume_files import read_volume

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nodule_stats import (FEATURE_NAMES, fmt, logistic_oof, measured_features, paired_auc_difference,  # noqa: E402
                          per_fold_mean, summarise)

ALONE = " (image alone, as with an ROI)"  # the suffix of a run's network-alone row
OUTLINE = " (ROI only: image + learnt outline)"  # the suffix of a run's classify-without-a-mask row
BASELINES = ("diameter LR", "measured-features LR", "product measures LR (no network)")
DATA = Path(os.environ.get("MED3D_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "data"


def feature_matrices(table: Path) -> Tuple[np.ndarray, np.ndarray]:
    """The seven measured features and the six `classify --mask` measures of every row of the nodule table, in its
    order (each crop read once)."""
    import csv

    with open(table, newline="") as handle:
        diameters = [float(row["diameter_mm"]) for row in csv.DictReader(handle)]
    seven, six = [], []
    for case, diameter in zip(read_nodule_table(str(table)), diameters):
        image, mask = read_volume(case.image), read_volume(case.mask)
        seven.append(measured_features(image, mask, diameter))
        six.append(measure_features(image, mask))
    return np.array(seven), np.array(six)


def cnn_probabilities(folder: Path, folds: List[np.ndarray], labels: np.ndarray,
                      key: str = "probabilities") -> Optional[np.ndarray]:
    """Out-of-fold malignant probabilities of a bench_nodules_cv.py run, checked against these folds: ``key``
    "probabilities" (what classify --mask gives) or "image_probabilities" (the network alone, as with an ROI;
    None for runs made before the measured-size model)."""
    out = np.full(len(labels), np.nan)
    for k, test in enumerate(folds):
        record = json.loads((folder / f"fold{k}.json").read_text())
        if not np.array_equal(np.asarray(record["labels"]), labels[test]):
            raise SystemExit(f"{folder}: fold {k} was not run on these folds")
        if key not in record:
            return None
        out[test] = record[key]
    return out


def reliability_png(rows: Dict[str, np.ndarray], labels: np.ndarray, path: Path) -> None:
    """One reliability diagram (predicted vs observed malignant fraction, 10 bins) with every row, drawn with
    Pillow (already a product dependency through the overlays)."""
    from PIL import Image, ImageDraw

    size, pad = 420, 50
    image = Image.new("RGB", (size + 2 * pad + 220, size + 2 * pad), "white")
    draw = ImageDraw.Draw(image)

    def xy(p: float, o: float):
        return pad + p * size, pad + (1 - o) * size

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(160, 160, 160))
    for t in (0.0, 0.5, 1.0):
        draw.text((xy(t, 0)[0] - 8, size + pad + 6), f"{t:.1f}", fill="black")
        draw.text((pad - 30, xy(0, t)[1] - 6), f"{t:.1f}", fill="black")
    draw.text((pad + size / 2 - 60, size + pad + 24), "predicted probability", fill="black")
    draw.text((6, 20), "observed malignant fraction", fill="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    for i, (name, p) in enumerate(rows.items()):
        colour = colours[i % len(colours)]
        points = [xy(b["predicted"], b["observed"]) for b in reliability_bins(p, labels)]
        draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((size + 2 * pad, pad + 18 * i), name, fill=colour)
    image.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", default=[], type=Path, help="bench_nodules_cv.py output folders")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--png", type=Path, help="write the reliability diagram here")
    args = parser.parse_args()
    table = DATA / "nodules" / "labels.csv"
    if not table.is_file():
        raise SystemExit(f"{table} is missing: this benchmark needs ../shared/data/nodules")
    start = time.time()
    cases = read_nodule_table(str(table))
    labels = np.array([c.label for c in cases])
    patients = [c.patient for c in cases]
    folds = grouped_folds(patients, 5, strata=labels, seed=0)
    features, product_measures = feature_matrices(table)
    rows = {"diameter LR": logistic_oof(features[:, :1], labels, folds),
            "measured-features LR": logistic_oof(features, labels, folds),
            # what classify --mask measures (nodule_measures.py), with no network: does the CNN add anything?
            "product measures LR (no network)": logistic_oof(product_measures, labels, folds)}
    for folder in args.runs:
        cnn = cnn_probabilities(folder, folds, labels)
        rows[folder.name] = cnn
        alone = cnn_probabilities(folder, folds, labels, "image_probabilities")
        if alone is not None and not np.allclose(alone, cnn):  # the run's bundles hold a measured-size model
            rows[f"{folder.name}{ALONE}"] = alone
            cnn = alone  # what the network adds to the measurements, below
        outlined = cnn_probabilities(folder, folds, labels, "roi_probabilities")
        if outlined is not None and not np.allclose(outlined, cnn):  # the bundles hold an outline network
            rows[f"{folder.name}{OUTLINE}"] = outlined
        # Does the CNN add anything to the measurements? Its out-of-fold logit as an eighth feature (exploratory:
        # the CNN logits of the stacker's training folds come from models that saw its test fold).
        logit = np.log(np.clip(cnn, 1e-6, 1 - 1e-6) / np.clip(1 - cnn, 1e-6, 1))
        rows[f"{folder.name} + features (stacked LR)"] = logistic_oof(np.column_stack([features, logit]), labels,
                                                                       folds)
    print(f"{len(labels)} nodules, {labels.sum()} malignant, {len(set(patients))} patients, 5 patient-grouped folds "
          f"(seed 0); features: {', '.join(FEATURE_NAMES)}; {time.time() - start:.0f} s to measure")
    first = args.runs[0].name if args.runs else None
    print("| model | AUC | accuracy | sens@90%spec | Brier | ECE | mean over folds: AUC, accuracy "
          f"| AUC minus features LR (paired) | AUC minus {first or 'the first run'} (paired) |")
    print("|---|---|---|---|---|---|---|---|---|")
    reference = rows["measured-features LR"]
    for name, p in rows.items():
        s = summarise(p, labels, patients, args.resamples)
        f = per_fold_mean(p, labels, folds)
        diff = "-" if p is reference else fmt(paired_auc_difference(p, reference, labels, patients, args.resamples))
        # an image-alone or ROI-only row against the first run's row of the same kind, when that run has one
        kind = next((suffix for suffix in (ALONE, OUTLINE) if name.endswith(suffix)), "")
        peer = f"{first}{kind}" if kind and f"{first}{kind}" in rows else first
        versus = "-" if first is None or name in (first, f"{first}{ALONE}", f"{first}{OUTLINE}", *BASELINES) \
            or "stacked" in name else fmt(paired_auc_difference(p, rows[peer], labels, patients, args.resamples))
        print(f"| {name} | {fmt(s['AUC'])} | {fmt(s['accuracy'])} | {fmt(s['sensitivity at 90% specificity'])} "
              f"| {fmt(s['Brier score'])} | {fmt(s['ECE'])} | {f['AUC']:.3f} +- {f['AUC_sd']:.3f}, {f['accuracy']:.3f} +- "
              f"{f['accuracy_sd']:.3f} | {diff} | {versus} |")
    for folder in args.runs:  # what the learnt outline adds for ROI users, paired with the image alone
        if f"{folder.name}{OUTLINE}" in rows and f"{folder.name}{ALONE}" in rows:
            gain = paired_auc_difference(rows[f"{folder.name}{OUTLINE}"], rows[f"{folder.name}{ALONE}"], labels,
                                         patients, args.resamples)
            print(f"{folder.name}: ROI only, image + learnt outline minus image alone (paired AUC): {fmt(gain)}")
    if args.png:
        reliability_png(rows, labels, args.png)
        print(f"reliability diagram: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
