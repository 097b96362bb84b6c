"""Which cells a figure shows, chosen from probabilities already read back (no pass over the images to choose them).

A grid of a few dozen cells out of thousands is only useful when its cells are the ones a reader should look at: the
calls the model got most confidently wrong (an engineer looks for what they share: a stain, blur, one patient), the
calls it got most confidently right (what the model takes for a class), and the calls it is least sure of. Every
choice here is a pure function of (probabilities of `all`, labels), so the same run gives the same cells, and a test
can recompute them from predictions_<split>.csv.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train.evaluation.metrics import THRESHOLD, predicted_labels

MISTAKE = "mistake"  # labelled, called the other class
CORRECT = "correct"  # labelled, called its class
CONFIDENT = "confident"  # no label: one of the surest calls
UNCERTAIN = "uncertain"  # probability closest to the threshold, labelled or not
GIVEN = "given"  # every cell was shown, in the order given: nothing was chosen
CLASS_NAMES = ("hem", "all")  # index = the label / call (1 = all), as every CSV of the run writes it


@dataclass(frozen=True)
class Pick:
    index: int  # row of the probabilities given
    kind: str  # MISTAKE, CORRECT, CONFIDENT, UNCERTAIN or GIVEN


def confidence(probs_all) -> np.ndarray:
    """(N,) probability the model gives its own call: prob_all for an `all` call, 1 - prob_all for a `hem` call."""
    p = np.asarray(probs_all, np.float64)
    return np.where(predicted_labels(p) == 1, p, 1 - p)


def _surest(mask: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices where `mask`, highest `score` first; ties in index order (a stable sort), so the choice is fixed."""
    where = np.flatnonzero(mask)
    return where[np.argsort(-score[where], kind="stable")]


def _alternate(groups: list[np.ndarray]) -> list[int]:
    """The groups' elements interleaved (first of each, then second of each, ...), a group that runs out skipped."""
    longest = max((len(g) for g in groups), default=0)
    return [int(g[i]) for i in range(longest) for g in groups if i < len(g)]


def confident_mistakes(probs_all, labels, n: int) -> list[int]:
    """Up to `n` mistakes, the most confident first, alternating the true classes (all called hem, hem called all)
    so that one class's many mistakes cannot hide the other's; unlabelled rows (label -1) are never mistakes."""
    labels = np.asarray(labels, np.int64)
    calls, sure = predicted_labels(probs_all), confidence(probs_all)
    return _alternate([_surest((labels == c) & (calls != c), sure) for c in (1, 0)])[:n]


def useful_cells(probs_all, labels, n: int) -> list[Pick]:
    """Up to `n` cells worth looking at: the most confident mistakes of each class first (up to half of `n`), then the
    most confident correct calls of each class (or, unlabelled, the surest calls; half of what is left), then the
    least certain calls (probability nearest the threshold) among the rest. A group with too few cells leaves its
    places to the next, so min(n, N) cells are chosen."""
    probs_all = np.asarray(probs_all, np.float64)
    labels = np.asarray(labels, np.int64)
    calls, sure = predicted_labels(probs_all), confidence(probs_all)
    picks = [Pick(i, MISTAKE) for i in confident_mistakes(probs_all, labels, (n + 1) // 2)]
    taken = np.zeros(len(probs_all), bool)
    taken[[p.index for p in picks]] = True
    right = [_surest(~taken & (labels == c) & (calls == c), sure) for c in (1, 0)]
    unknown = [_surest(~taken & (labels < 0) & (calls == c), sure) for c in (1, 0)]
    wanted = (n - len(picks) + 1) // 2
    correct = _alternate(right)[:wanted]
    sure_calls = _alternate(unknown)[:wanted - len(correct)]  # unlabelled rows fill what labelled ones leave
    picks += [Pick(i, CORRECT) for i in correct] + [Pick(i, CONFIDENT) for i in sure_calls]
    taken[[p.index for p in picks]] = True
    doubt = _surest(~taken, -np.abs(probs_all - THRESHOLD))
    return picks + [Pick(int(i), UNCERTAIN) for i in doubt[:n - len(picks)]]


def describe(picks: list[Pick], labels) -> str:
    """What was chosen, for a figure's title: e.g. `4 most confident mistakes (2 all called hem, 2 hem called all),
    6 most confident correct calls, 6 least certain calls`."""
    labels = np.asarray(labels, np.int64)
    counts = {kind: [p for p in picks if p.kind == kind] for kind in (GIVEN, MISTAKE, CORRECT, CONFIDENT, UNCERTAIN)}
    parts = []
    if counts[GIVEN]:
        parts.append(f"all {len(counts[GIVEN])} images given, in order")
    if counts[MISTAKE]:
        wrong = [sum(labels[p.index] == c for p in counts[MISTAKE]) for c in (1, 0)]
        split = ", ".join(f"{k} {CLASS_NAMES[c]} called {CLASS_NAMES[1 - c]}" for k, c in zip(wrong, (1, 0)) if k)
        parts.append(f"{_count(len(counts[MISTAKE]), 'most confident mistake')} ({split})")
    for kind, text in ((CORRECT, "most confident correct call"), (CONFIDENT, "surest call"),
                       (UNCERTAIN, "least certain call")):
        if counts[kind]:
            parts.append(_count(len(counts[kind]), text) + (" (no label)" if kind == CONFIDENT else ""))
    return ", ".join(parts)


def _count(k: int, thing: str) -> str:
    return f"{k} {thing}{'' if k == 1 else 's'}"
