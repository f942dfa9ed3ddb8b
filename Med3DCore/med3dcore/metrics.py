"""Evaluation metrics: Dice per label (segmentation); accuracy, ROC AUC, sensitivity at a fixed specificity, Brier
score and expected calibration error (classification); temperature scaling of binary logits.

AUC is computed from ranks (the Mann-Whitney U statistic, ties counted as one half), so no scikit-learn is needed.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from .errors import Med3DError


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty (nothing to find, nothing found)."""
    prediction = np.asarray(prediction, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise Med3DError(f"cannot compare masks of shapes {prediction.shape} and {truth.shape}; resample the "
                         f"prediction onto the reference label map's grid first")
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def dice_per_label(prediction: np.ndarray, truth: np.ndarray,
                   labels: Optional[Iterable[int]] = None) -> Dict[int, float]:
    """Dice for each label value (default: every non-zero value in either map)."""
    prediction = np.asarray(prediction)
    truth = np.asarray(truth)
    if labels is None:
        labels = sorted((set(np.unique(prediction).tolist()) | set(np.unique(truth).tolist())) - {0})
    return {int(v): dice(prediction == v, truth == v) for v in labels}


def accuracy(predicted: Sequence[int], truth: Sequence[int]) -> float:
    """Fraction of equal entries."""
    predicted = np.asarray(predicted)
    truth = np.asarray(truth)
    if predicted.shape != truth.shape or predicted.size == 0:
        raise Med3DError(f"accuracy needs two equally long, non-empty label lists (got {predicted.size} and "
                         f"{truth.size})")
    return float(np.mean(predicted == truth))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2.0 + 1.0
        start = stop + 1
    return ranks


def auc(scores: Sequence[float], truth: Sequence[int]) -> float:
    """Area under the ROC curve for binary ``truth`` (1 = positive) and scores where larger means positive.

    Equals the probability that a random positive scores above a random negative (ties count one half).
    """
    scores = np.asarray(scores, dtype=float)
    truth = np.asarray(truth).astype(int)
    if scores.shape != truth.shape:
        raise Med3DError(f"AUC needs one score per label (got {scores.size} scores, {truth.size} labels)")
    if not set(np.unique(truth).tolist()) <= {0, 1}:
        raise Med3DError("AUC needs binary labels 0/1")
    positives = int(truth.sum())
    negatives = len(truth) - positives
    if positives == 0 or negatives == 0:
        raise Med3DError("AUC is undefined when only one class is present; evaluate on cases of both classes")
    rank_sum = float(_average_ranks(scores)[truth == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def _binary(probabilities: Sequence[float], truth: Sequence[int]) -> "tuple":
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(truth).astype(int)
    if p.shape != y.shape or p.size == 0:
        raise Med3DError(f"need one probability per label (got {p.size} probabilities, {y.size} labels)")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise Med3DError("need binary labels 0/1")
    return p, y


def brier(probabilities: Sequence[float], truth: Sequence[int]) -> float:
    """Mean squared difference between the probability of the positive class and the 0/1 truth."""
    p, y = _binary(probabilities, truth)
    return float(np.mean((p - y) ** 2))


def reliability_bins(probabilities: Sequence[float], truth: Sequence[int], bins: int = 10) -> List[Dict[str, float]]:
    """Equal-width probability bins: per non-empty bin its mean predicted probability, the observed fraction of
    positives and the number of cases (the points of a reliability diagram)."""
    p, y = _binary(probabilities, truth)
    index = np.minimum((p * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        if inside.any():
            rows.append({"low": b / bins, "high": (b + 1) / bins, "predicted": float(p[inside].mean()),
                         "observed": float(y[inside].mean()), "count": int(inside.sum())})
    return rows


def expected_calibration_error(probabilities: Sequence[float], truth: Sequence[int], bins: int = 10) -> float:
    """ECE: the case-weighted mean gap between predicted probability and observed frequency over equal-width bins."""
    rows = reliability_bins(probabilities, truth, bins)
    total = sum(r["count"] for r in rows)
    return float(sum(r["count"] * abs(r["predicted"] - r["observed"]) for r in rows) / total)


def sensitivity_at_specificity(scores: Sequence[float], truth: Sequence[int], specificity: float = 0.9) -> float:
    """The highest sensitivity of any threshold whose specificity is at least ``specificity``."""
    s, y = _binary(scores, truth)
    negatives, positives = np.sort(s[y == 0]), s[y == 1]
    if len(negatives) == 0 or len(positives) == 0:
        raise Med3DError("sensitivity at a specificity needs cases of both classes")
    # Calling "positive" only scores above the k-th lowest negative keeps k negatives correct.
    k = int(np.ceil(specificity * len(negatives)))
    threshold = negatives[k - 1] if k >= 1 else -np.inf
    return float(np.mean(positives > threshold))


def fit_temperature(logits: np.ndarray, truth: Sequence[int]) -> float:
    """The temperature T > 0 that minimises the cross-entropy of ``softmax(logits / T)`` against ``truth``
    (temperature scaling: one parameter, so the ranking and hence AUC and accuracy stay as they are)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=float)
    y = np.asarray(truth).astype(int)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise Med3DError(f"temperature scaling needs (N, classes) logits and N labels, got {z.shape} and {len(y)}")

    def loss(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        scaled = scaled - scaled.max(axis=1, keepdims=True)
        log_p = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
        return float(-np.mean(log_p[np.arange(len(y)), y]))

    result = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))
