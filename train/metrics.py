"""Classification metrics from labels and predictions (numpy only; the class count is 2 here but nothing assumes it).

Weighted F1 is the C-NMC 2019 challenge metric: per-class F1 averaged with the class frequencies as weights.
"""
from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """(C, C) int64: rows are true classes, columns predicted classes."""
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    return np.bincount(labels * num_classes + preds, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def classification_report(labels, preds, class_names=("hem", "all")) -> dict:
    cm = confusion_matrix(labels, preds, len(class_names))
    support = cm.sum(1)
    predicted = cm.sum(0)
    tp = np.diag(cm)
    precision = np.divide(tp, predicted, out=np.zeros(len(tp)), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(len(tp)), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(len(tp)), where=denom > 0)
    total = support.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "f1_weighted": float((f1 * support).sum() / total) if total else float("nan"),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "confusion": cm.tolist(),
    }
