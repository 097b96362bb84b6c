"""Every random stream of a run, derived one way: numpy's SeedSequence of (seed, epoch) with a named stream.

The loader's shuffles and the augmentation's parameters each depend on (seed, epoch) and on what they are for (and
the rank), never on what was drawn before, so a resumed run replays its epochs exactly and a seed means the same on
every device. One derivation rather than hand-picked multipliers: SeedSequence mixes its inputs so that nearby
(seed, epoch, stream) never give related generators, and a new stream cannot collide with an old one by arithmetic.
"""
from __future__ import annotations

import numpy as np
import torch

SHUFFLE = 0  # the loader's epoch permutation; a streamed window's shuffle uses stream 1 + its first row
AUGMENT = 1  # the augmentation parameters of a training epoch (spawn key, so it never meets the shuffle streams)


def epoch_generator(seed: int, epoch: int, stream: int = SHUFFLE) -> np.random.Generator:
    """The numpy generator of `stream` in epoch `epoch` (0-based) of a run seeded with `seed`."""
    return np.random.default_rng([seed, epoch, stream])


def augment_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The CPU torch generator that draws a training epoch's augmentation parameters on rank `rank`."""
    state = np.random.SeedSequence([seed, epoch], spawn_key=(AUGMENT, rank)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)  # manual_seed takes a non-negative int64
