"""Statistics for the nodule benchmarks: the metrics of ``med3d evaluate`` with their 95 % intervals (the product's
patient bootstrap, nodule_evaluation), paired differences between two classifiers scored on the same cases, and the
measured-features baselines a radiologist could use instead of a CNN (a ruler's diameter; a few numbers measured from the mask).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy import ndimage

from med3dcore.metrics import auc
from med3dcore.nodule_evaluation import LABELS, RESAMPLES, patient_interval, score_with_intervals
from med3dcore.nodule_size import measure_nodule
from med3dcore.volume import Volume

Interval = Tuple[float, float, float]  # estimate, low, high


def summarise(probabilities: np.ndarray, labels: np.ndarray, groups: Sequence[str],
              n_resamples: int = RESAMPLES) -> Dict[str, Interval]:
    """Every metric ``med3d evaluate`` prints, on the pooled out-of-fold probabilities, each with its 95 % interval
    (the product's stratified patient bootstrap, nodule_evaluation.score_with_intervals)."""
    scored = score_with_intervals(probabilities, labels, groups, n_resamples)["metrics"]
    return {LABELS[name]: (item["value"], *item["ci95"]) for name, item in scored.items()}


def paired_auc_difference(a: np.ndarray, b: np.ndarray, labels: np.ndarray, groups: Sequence[str],
                          n_resamples: int = RESAMPLES) -> Interval:
    """AUC(a) - AUC(b) on the same cases, the interval from the same patient resamples for both."""
    y = np.asarray(labels, int)
    low, high = patient_interval(lambda idx: auc(a[idx], y[idx]) - auc(b[idx], y[idx]), y, groups, n_resamples)
    return auc(a, y) - auc(b, y), low, high


def fmt(interval: Interval, digits: int = 3) -> str:
    value, low, high = interval
    return f"{value:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


# ------------------------------------------------------------------------------------------- baselines
FEATURE_NAMES = ("log diameter", "log mask volume", "mean HU", "SD HU", "fraction > 200 HU",
                 "surface/volume voxels", "log crop volume")


def measured_features(image: Volume, mask: Volume, diameter_mm: float) -> List[float]:
    """The seven numbers of the measured-features baseline (issue 9): the table's diameter, and six measured
    from the crop and its mask."""
    inside = np.asarray(mask.array) > 0
    hu = np.asarray(image.array, dtype=np.float64)[inside]
    surface = inside & ~ndimage.binary_erosion(inside)
    crop_ml = image.array.size * float(np.prod(image.spacing)) / 1000.0
    return [float(np.log(diameter_mm)), float(np.log(measure_nodule(image, mask)["volume_ml"])), float(hu.mean()),
            float(hu.std()), float(np.mean(hu > 200)), float(surface.sum() / inside.sum()), float(np.log(crop_ml))]


def logistic_oof(features: np.ndarray, labels: np.ndarray, folds: Sequence[np.ndarray]) -> np.ndarray:
    """Out-of-fold probabilities of a standardised logistic regression (scikit-learn, a `bench` extra)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = np.zeros(len(labels))
    for test in folds:
        train = np.setdiff1d(np.arange(len(labels)), test)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(features[train], labels[train])
        out[test] = model.predict_proba(features[test])[:, 1]
    return out


def per_fold_mean(probabilities: np.ndarray, labels: np.ndarray, folds: Sequence[np.ndarray]) -> Dict[str, float]:
    """Mean over folds of AUC and accuracy (the issue's targets are means over folds)."""
    aucs = [auc(probabilities[f], labels[f]) for f in folds]
    accs = [float(np.mean((probabilities[f] >= 0.5) == labels[f])) for f in folds]
    return {"AUC": float(np.mean(aucs)), "AUC_sd": float(np.std(aucs)), "accuracy": float(np.mean(accs)),
            "accuracy_sd": float(np.std(accs))}
