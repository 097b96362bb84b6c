"""Classification metrics from labels and predictions (numpy only; the class count is 2 here but nothing assumes it).

Weighted F1 is the C-NMC 2019 challenge metric: per-class F1 averaged with the class frequencies as weights.
"""
from __future__ import annotations

import numpy as np

# prob_all at or above it: the image is called `all` (leukemic). Every table, CSV and ensemble calls images with it.
THRESHOLD = 0.5
# a patient is called `all` when at least this share of its cells is
MAJORITY_SHARE = 0.5


def predicted_labels(probs_all) -> np.ndarray:
    """(N,) int64 calls, 1 = all, from (N,) probabilities of `all`."""
    return (np.asarray(probs_all, np.float64) >= THRESHOLD).astype(np.int64)


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


def patient_table(patients, probs_all, labels=None):
    """One row per patient (the clinical unit): `patient, label, cells, accuracy, predicted_all_share,
    mean_prob_all, predicted_label`, sorted by patient.

    `label` is the patient's true class when every one of its cells has the same known label (C-NMC: a patient is
    either leukemic or normal), else -1; `accuracy` is the share of its cells classified correctly (NaN without
    labels). `predicted_label` is the patient-level call by majority of cells (predicted `all` share >= MAJORITY_SHARE)."""
    import pandas as pd  # here, not at the top: the rest of this module is numpy only
    probs_all = np.asarray(probs_all, np.float64)
    preds = predicted_labels(probs_all)
    known = np.full(len(preds), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    frame = pd.DataFrame({"patient": np.asarray(patients, dtype=str), "label": known, "pred": preds,
                          "prob": probs_all})
    frame["correct"] = np.where(frame["label"] >= 0, frame["pred"] == frame["label"], np.nan)
    groups = frame.groupby("patient", sort=True)
    table = pd.DataFrame({
        "cells": groups.size(),
        "label": groups["label"].agg(lambda s: int(s.iloc[0]) if s.nunique() == 1 and s.iloc[0] >= 0 else -1),
        "accuracy": groups["correct"].mean(),
        "predicted_all_share": groups["pred"].mean(),
        "mean_prob_all": groups["prob"].mean(),
    }).reset_index()
    table["predicted_label"] = (table["predicted_all_share"] >= MAJORITY_SHARE).astype(np.int64)
    return table[["patient", "label", "cells", "accuracy", "predicted_all_share", "mean_prob_all",
                  "predicted_label"]]


def patient_summary(table) -> dict:
    """summary.json's per-patient figures of one split: how many patients, the mean, worst and best per-patient
    accuracy (each patient counts once, whatever its number of cells), and the patient-level accuracy of the
    majority call. Figures are None where no patient has a known label."""
    known = table[table["label"] >= 0]
    if not len(known):
        return {"patients": int(len(table)), "labelled_patients": 0, "mean_patient_accuracy": None,
                "min_patient_accuracy": None, "max_patient_accuracy": None, "patient_call_accuracy": None,
                "worst_patient": None}
    worst = known.loc[known["accuracy"].idxmin()]
    return {"patients": int(len(table)), "labelled_patients": int(len(known)),
            "mean_patient_accuracy": float(known["accuracy"].mean()),
            "min_patient_accuracy": float(known["accuracy"].min()),
            "max_patient_accuracy": float(known["accuracy"].max()),
            "patient_call_accuracy": float((known["predicted_label"] == known["label"]).mean()),
            "worst_patient": str(worst["patient"])}
