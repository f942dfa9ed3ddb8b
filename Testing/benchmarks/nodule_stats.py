"""Statistics for the nodule benchmarks: metrics with 95 % confidence intervals from a bootstrap over patients
(scipy.stats.bootstrap over patient indices; a patient's nodules are resampled together, since they are not
independent), paired differences between two classifiers scored on the same cases, and the measured-features
baselines a radiologist could use instead of a CNN (a ruler's diameter; a few numbers measured from the mask).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.stats import bootstrap

from med3dcore.metrics import (auc, brier, expected_calibration_error, sensitivity_at_specificity)
from med3dcore.nodule_size import measure_nodule
from med3dcore.volume import Volume

Interval = Tuple[float, float, float]  # estimate, low, high


def _by_patient(groups: Sequence[str]) -> List[np.ndarray]:
    names = sorted(set(groups))
    where = {g: i for i, g in enumerate(names)}
    members: List[List[int]] = [[] for _ in names]
    for case, g in enumerate(groups):
        members[where[g]].append(case)
    return [np.array(m) for m in members]


def patient_bootstrap(statistic: Callable[[np.ndarray], float], groups: Sequence[str], n_resamples: int = 2000,
                      seed: int = 0) -> Interval:
    """``statistic(case_indices)`` on all cases, with a 95 % percentile interval from resampling patients."""
    members = _by_patient(groups)

    def on_patients(patients: np.ndarray) -> float:
        return statistic(np.concatenate([members[int(p)] for p in patients]))

    everyone = np.arange(len(members))
    result = bootstrap((everyone,), on_patients, n_resamples=n_resamples, vectorized=False, method="percentile",
                       rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return statistic(np.concatenate(members)), float(low), float(high)


METRICS: Dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "AUC": lambda p, y: auc(p, y),
    "accuracy": lambda p, y: float(np.mean((p >= 0.5) == y)),
    "sens@90%spec": lambda p, y: sensitivity_at_specificity(p, y, 0.9),
    "Brier": lambda p, y: brier(p, y),
    "ECE": lambda p, y: expected_calibration_error(p, y),
}


def summarise(probabilities: np.ndarray, labels: np.ndarray, groups: Sequence[str],
              n_resamples: int = 2000) -> Dict[str, Interval]:
    """Every metric of :data:`METRICS` on the pooled out-of-fold probabilities, each with its 95 % interval."""
    p, y = np.asarray(probabilities, float), np.asarray(labels, int)
    return {name: patient_bootstrap(lambda idx, f=f: f(p[idx], y[idx]), groups, n_resamples)
            for name, f in METRICS.items()}


def paired_auc_difference(a: np.ndarray, b: np.ndarray, labels: np.ndarray, groups: Sequence[str],
                          n_resamples: int = 2000) -> Interval:
    """AUC(a) - AUC(b) on the same cases, the interval from the same patient resamples for both."""
    y = np.asarray(labels, int)
    return patient_bootstrap(lambda idx: auc(a[idx], y[idx]) - auc(b[idx], y[idx]), groups, n_resamples)


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
