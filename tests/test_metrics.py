import numpy as np
import pytest

from train.loop import loss_and_acc
from train.metrics import classification_report, confusion_matrix


def test_metrics_against_hand_computed_values():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    preds = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 0])
    assert confusion_matrix(labels, preds).tolist() == [[2, 2], [1, 5]]
    r = classification_report(labels, preds)
    assert r["accuracy"] == pytest.approx(0.7)
    # hem: precision 2/3, recall 2/4, F1 = 2*(2/3*1/2)/(2/3+1/2) = 4/7; all: precision 5/7, recall 5/6, F1 = 10/13
    assert r["per_class"]["hem"]["precision"] == pytest.approx(2 / 3)
    assert r["per_class"]["hem"]["recall"] == pytest.approx(0.5)
    assert r["per_class"]["all"]["precision"] == pytest.approx(5 / 7)
    assert r["per_class"]["all"]["recall"] == pytest.approx(5 / 6)
    assert r["f1_weighted"] == pytest.approx((4 * 4 / 7 + 6 * 10 / 13) / 10)


def test_a_class_never_predicted_has_zero_precision_not_nan():
    r = classification_report(np.array([0, 1, 1]), np.array([1, 1, 1]))
    assert r["per_class"]["hem"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_loss_and_accuracy_from_probabilities():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    loss, acc = loss_and_acc(probs, np.array([0, 1, 1]))
    assert acc == pytest.approx(2 / 3)
    assert loss == pytest.approx(-(np.log(0.9) + np.log(0.8) + np.log(0.4)) / 3)
    assert all(np.isnan(v) for v in loss_and_acc(probs, np.array([-1, -1, -1])))
