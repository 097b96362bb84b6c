"""The evaluation's mistakes figure (mistakes_<split>.png beside the confusion matrix): the most confident mistakes of
a split as the model saw them, each with its probability, label, patient and file.

It costs no pass over the split: the mistakes are chosen from the probabilities the evaluation has already read back
once at its end, and only those few images are read again from the cache (one small read per image). No map is
drawn here, so the figure stays cheap enough to make after every training run; `train.explain` draws the maps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from train.data.loader import CacheLoader
from train.evaluation import gallery, picks
from train.evaluation.metrics import predicted_labels

MISTAKES_SHOWN = 16  # 2 rows of 8: enough to see what mistakes share, few enough to read at once
COLUMNS = 8


def read_rows(loader: CacheLoader, indices) -> torch.Tensor:
    """(k, 3, S, S) uint8 on the CPU: the stored images of `loader`'s rows `indices` (into its `paths`, `labels`,
    `patients`), in the order given. A streaming loader over just those rows, one-row blocks, so only they are read
    (through the loader, with its checks), whatever the size of the split."""
    indices = np.asarray(indices, np.int64)
    if not len(indices):
        return torch.empty(0, 3, loader.stored_size, loader.stored_size, dtype=torch.uint8)
    rows = loader.source_rows[indices]
    subset = CacheLoader(loader.reader, loader.size, loader.splits, len(rows), rows=rows, device="cpu",
                         mode="streaming", block_images=1)
    images = torch.cat([x for x, _ in subset])  # ascending source order
    return images[torch.from_numpy(np.searchsorted(np.sort(rows), rows))]


def eval_views(stored: torch.Tensor, size: int) -> np.ndarray:
    """(k, size, size, 3) uint8 RGB: the centre `size` window of stored (k, 3, S, S) uint8 images, which is what the
    evaluation normalises and gives the model (`GpuAugment.eval_transform`), before normalising."""
    margin = (stored.shape[-1] - size) // 2
    return stored[:, :, margin:margin + size, margin:margin + size].permute(0, 2, 3, 1).contiguous().cpu().numpy()


def write_mistakes(loader: CacheLoader, probs_all: np.ndarray, labels: np.ndarray, path: Path, heading: str,
                   n: int = MISTAKES_SHOWN) -> list[int]:
    """Draw the `n` most confident mistakes of the split `loader` reads (`picks.confident_mistakes`; probabilities
    of `all` and labels in the loader's row order) to `path`, replacing an earlier figure (it is a report of the
    run, rewritten with the others). Returns the rows shown."""
    labels = np.asarray(labels, np.int64)
    chosen = picks.confident_mistakes(probs_all, labels, n)
    views = eval_views(read_rows(loader, chosen), loader.size)
    tiles = [gallery.Tile((view,), Path(str(loader.paths[i])).name, str(loader.patients[i]), float(probs_all[i]),
                          int(labels[i]), picks.MISTAKE) for view, i in zip(views, chosen)]
    wrong = int(((predicted_labels(probs_all) != labels) & (labels >= 0)).sum())
    shown = picks.describe([picks.Pick(i, picks.MISTAKE) for i in chosen], labels) if chosen else "no mistakes"
    title = (f"{heading}: {shown}, of {wrong} mistakes in {len(labels)} images\n"
             f"each cell as the model saw it (the evaluation view)")
    gallery.draw(tiles, title, path, COLUMNS, replace=True, empty_text=f"no mistakes among {len(labels)} images")
    return chosen
