"""The run's figures and files: confusion matrices, accuracy/loss curves, predictions CSV."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from train.evaluation.metrics import predicted_labels  # noqa: E402

CLASS_LABELS = ("hem (normal)", "all (leukemic)")


def plot_confusion(cm, title: str, path: Path, class_labels=CLASS_LABELS) -> None:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=120)
    ax.imshow(cm, cmap="Blues")
    totals = cm.sum(1, keepdims=True).clip(min=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            dark = cm[i, j] > cm.max() / 2
            ax.text(j, i, f"{cm[i, j]}\n{cm[i, j] / totals[i, 0]:.1%}", ha="center", va="center",
                    color="white" if dark else "black", fontsize=11)
    ax.set_xticks(range(len(class_labels)), class_labels)
    ax.set_yticks(range(len(class_labels)), class_labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(metrics: pd.DataFrame, title: str, path: Path) -> None:
    """Train and valid accuracy and loss per epoch, stage boundaries (size switches) marked."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, key, label in ((acc_ax, "acc", "accuracy"), (loss_ax, "loss", "cross-entropy loss")):
        ax.plot(metrics["epoch"], metrics[f"train_{key}"], "o-", ms=3, label=f"train {key}")
        ax.plot(metrics["epoch"], metrics[f"valid_{key}"], "s-", ms=3, label=f"valid {key}")
        for _, first in metrics.groupby("stage").head(1).iterrows():
            if first["epoch"] > metrics["epoch"].min():
                ax.axvline(first["epoch"] - 0.5, color="gray", ls="--", lw=1)
            ax.annotate(f"{int(first['size'])} px", (first["epoch"] - 0.4, 1.0), xycoords=("data", "axes fraction"),
                        va="top", fontsize=8, color="gray")
        ax.set_xlim(metrics["epoch"].min() - 0.6, metrics["epoch"].max() + 0.6)  # room for the size labels
        if len(metrics) <= 20:
            ax.set_xticks(metrics["epoch"].tolist())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if key == "acc" else "upper right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_predictions(paths, probs_all: np.ndarray, path: Path, patients=None, probs_all_tta=None) -> None:
    """One row per image: its file name, path, patient, the predicted label (1 = all) and the probability of `all`
    (and of the TTA mean, `prob_all_tta`, when given)."""
    table = pd.DataFrame({
        "image": [Path(p).name for p in paths],
        "path": list(paths),
        "predicted_label": predicted_labels(probs_all),
        "prob_all": np.round(np.asarray(probs_all, np.float64), 6),
    })
    if patients is not None:
        table.insert(2, "patient", list(patients))
    if probs_all_tta is not None:
        table["prob_all_tta"] = np.round(np.asarray(probs_all_tta, np.float64), 6)
    table.to_csv(path, index=False)


def write_table(table: pd.DataFrame, path: Path) -> None:
    """A per-patient table (metrics.patient_table) as CSV, shares and accuracies to 6 decimals."""
    table.round(6).to_csv(path, index=False)


def plot_compare(runs: list[tuple[str, pd.DataFrame]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, metrics in runs:
        ax.plot(metrics["epoch"], metrics["valid_acc"], "-", lw=1.5, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid accuracy")
    ax.set_title("validation accuracy per run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def result_line(summary: dict) -> str:
    """One line with a run's result, from its summary.json: what `train.run` prints before the run folder."""
    test = summary.get("splits", {}).get("test")
    if test is not None:
        test_text = f"test acc {test['accuracy']:.4f}, test F1 (weighted) {test['f1_weighted']:.4f}"
    else:
        test_text = "test unlabelled" if "test" in summary.get("splits", {}) else "no test split"
    valid = summary.get("best_valid_acc")
    valid_text = "no valid split" if valid is None else f"best valid acc {valid:.4f}"
    return (f"result: {summary['model']}, {valid_text} (epoch {summary['checkpoint_epoch']}, "
            f"{summary['checkpoint_size']} px), {test_text}, training {summary['train_seconds']:.1f} s")


def split_result_lines(summary: dict) -> list[str]:
    """One line per evaluated split (`train.evaluate`), same figures and names as `result_line`."""
    head = (f"result: {summary['model']} {summary['checkpoint']} (epoch {summary['checkpoint_epoch']}, "
            f"{summary['checkpoint_size']} px)")
    lines = []
    for split, report in summary.get("splits", {}).items():
        if report is None:
            lines.append(f"{head}, {split} unlabelled (predictions_{split}.csv)")
        else:
            lines.append(f"{head}, {split} acc {report['accuracy']:.4f}, {split} F1 (weighted) "
                         f"{report['f1_weighted']:.4f}")
    for split, report in ((summary.get("tta") or {}).get("splits") or {}).items():
        if report is not None:
            lines.append(f"{head} with TTA (8 views), {split} acc {report['accuracy']:.4f}, {split} F1 (weighted) "
                         f"{report['f1_weighted']:.4f}")
    return lines
