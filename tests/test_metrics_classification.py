"""kdface.metrics.classification_top1 (Wang et al. 2017 Tables 1-2 "Top1 acc") against a plain
loop, hand-computed counts, its doctest and its argument checks."""
from __future__ import annotations

import doctest

import numpy as np
import pytest

from kdface import metrics
from kdface.metrics import _classification


def test_hand_computed_counts():
    out = metrics.classification_top1([0, 2, 1, 1, 3], [0, 1, 1, 1, 3])
    assert out["top1_accuracy"] == 0.8 and out["num_correct"] == 4
    assert out["num_images"] == 5 and out["num_identities"] == 3
    np.testing.assert_array_equal(out["per_identity_accuracy"], [1.0, 2 / 3, 1.0])


def test_equals_a_loop_over_argmax_of_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 7))
    labels = rng.integers(0, 7, 200)
    predicted = logits.argmax(axis=1)
    correct = 0
    for row, label in zip(logits, labels):
        best = max(range(7), key=lambda c: row[c])  # "the identity of the maximum prediction"
        correct += best == label
    out = metrics.classification_top1(predicted, labels, num_classes=7)
    assert out["num_correct"] == correct
    assert out["top1_accuracy"] == correct / 200
    for c, acc in zip(np.unique(labels), out["per_identity_accuracy"]):
        rows = labels == c
        assert acc == np.mean(predicted[rows] == c)


def test_planted_wrong_labels_drop_the_accuracy_by_their_share():
    labels = np.arange(40) % 5
    predicted = labels.copy()
    assert metrics.classification_top1(predicted, labels)["top1_accuracy"] == 1.0
    wrong = labels.copy()
    wrong[[3, 17, 29]] = (wrong[[3, 17, 29]] + 1) % 5
    assert metrics.classification_top1(predicted, wrong)["top1_accuracy"] == 37 / 40


def test_doctest():
    failures, tried = doctest.testmod(_classification)[:2]
    assert tried >= 1 and failures == 0


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        metrics.classification_top1([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="empty set"):
        metrics.classification_top1(np.array([], int), np.array([], int))
    with pytest.raises(TypeError, match="predicted must be int"):
        metrics.classification_top1([0.0], [0])
    with pytest.raises(ValueError, match=r"labels must be int \[N\], got shape \(1, 2\)"):
        metrics.classification_top1([0, 1], [[0, 1]])
    with pytest.raises(ValueError, match=r"predicted must lie in \[0, 3\)"):
        metrics.classification_top1([3], [0], num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        metrics.classification_top1([0], [0], num_classes=0)
