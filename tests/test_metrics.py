import numpy as np
import pytest

from train.engine.loop import loss_and_acc
from train.evaluation.metrics import classification_report, confusion_matrix


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


def test_patient_table_and_summary_against_hand_counts():
    from train.evaluation.metrics import patient_summary, patient_table
    patients = ["P2", "P1", "P1", "P2", "P2", "H3", "H3"]
    labels = [1, 1, 1, 1, 1, 0, 0]
    probs = [0.9, 0.2, 0.7, 0.4, 0.8, 0.1, 0.6]  # P1: 1 of 2 right, P2: 2 of 3, H3: 1 of 2
    table = patient_table(patients, probs, labels)
    assert table["patient"].tolist() == ["H3", "P1", "P2"]
    assert table["cells"].tolist() == [2, 2, 3] and table["label"].tolist() == [0, 1, 1]
    assert table["accuracy"].tolist() == pytest.approx([0.5, 0.5, 2 / 3])
    assert table["predicted_all_share"].tolist() == pytest.approx([0.5, 0.5, 2 / 3])
    assert table["mean_prob_all"].tolist() == pytest.approx([0.35, 0.45, 0.7])
    assert table["predicted_label"].tolist() == [1, 1, 1]  # a tie calls `all`
    s = patient_summary(table)
    assert s["patients"] == s["labelled_patients"] == 3
    assert s["mean_patient_accuracy"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    assert s["min_patient_accuracy"] == 0.5 and s["max_patient_accuracy"] == pytest.approx(2 / 3)
    assert s["patient_call_accuracy"] == pytest.approx(2 / 3)  # H3 called `all`: wrong
    # unlabelled (a test set without labels): counts and shares, no accuracy
    blind = patient_table(patients, probs)
    assert blind["label"].tolist() == [-1, -1, -1] and blind["accuracy"].isna().all()
    assert patient_summary(blind)["mean_patient_accuracy"] is None
