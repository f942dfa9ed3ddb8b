"""Evaluation metrics: Dice per label (segmentation), accuracy and ROC AUC (classification).

AUC is computed from ranks (the Mann-Whitney U statistic, ties counted as one half), so no scikit-learn is needed.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

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
