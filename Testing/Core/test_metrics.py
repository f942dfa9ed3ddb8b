"""Metrics against values worked out by hand and against a brute-force pair count."""
from __future__ import annotations

import numpy as np
import pytest

from med3dcore.errors import Med3DError
from med3dcore.metrics import accuracy, auc, dice, dice_per_label


def test_dice_hand_computed():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[0, :2, :2] = True      # 4 voxels
    b[0, :2, :3] = True      # 6 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 10)
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0
    assert dice(np.zeros(3), np.zeros(3)) == 1.0


def test_dice_per_label_multilabel():
    truth = np.array([0, 1, 1, 2, 2, 2, 0])
    pred = np.array([0, 1, 2, 2, 2, 0, 1])
    scores = dice_per_label(pred, truth)
    assert scores == {1: pytest.approx(2 * 1 / 4), 2: pytest.approx(2 * 2 / 6)}
    assert dice_per_label(pred, truth, labels=[3]) == {3: 1.0}


def test_dice_shape_mismatch_is_clear():
    with pytest.raises(Med3DError, match="resample the prediction"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    with pytest.raises(Med3DError, match="non-empty"):
        accuracy([], [])


def test_auc_hand_computed():
    # positives 0.8, 0.4; negatives 0.5, 0.1: pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) -> 3/4
    assert auc([0.8, 0.5, 0.4, 0.1], [1, 0, 1, 0]) == pytest.approx(0.75)
    assert auc([0.9, 0.1], [1, 0]) == 1.0
    assert auc([0.1, 0.9], [1, 0]) == 0.0
    # a tie between a positive and a negative counts one half
    assert auc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)


def test_auc_matches_pair_count_on_random_data():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(200), 2)  # rounding forces ties
    truth = rng.integers(0, 2, 200)
    pos, neg = scores[truth == 1], scores[truth == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert auc(scores, truth) == pytest.approx(brute, abs=1e-12)


def test_auc_needs_both_classes():
    with pytest.raises(Med3DError, match="only one class"):
        auc([0.2, 0.3], [1, 1])
    with pytest.raises(Med3DError, match="binary"):
        auc([0.2, 0.3], [1, 2])
