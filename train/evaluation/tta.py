"""Test-time augmentation over the dihedral group: the 8 flips and quarter turns of a square crop.

A cell on a black background has no preferred orientation, so the model's probabilities are averaged over the 8
symmetries of the square (identity, three quarter turns, and the horizontal flip of each). On a square crop each
view is an exact permutation of pixels (`torch.rot90`/`torch.flip`): nothing is resampled, no corner goes black.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from train.engine.loop import Precision

VIEWS = 8


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 views of a (B, C, S, S) batch: rotations by 0, 90, 180, 270 degrees, then the horizontal flip of each.

    Together they are the dihedral group of the square: applying any of them to any view gives another view."""
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected a (B, C, S, S) batch of square images, got {tuple(x.shape)}")
    turns = [x] + [torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)]
    return turns + [torch.flip(t, dims=(-1,)) for t in turns]


@torch.no_grad()
def tta_probs(model, x: torch.Tensor, precision: "Precision", device: torch.device) -> torch.Tensor:
    """Softmax probabilities (B, classes) float32 of `model` (in eval mode) averaged over the 8 views of the
    normalised batch x (B, C, S, S), on x's device. Nothing here waits for the device.

    One forward pass over the stacked (8B, C, S, S) batch rather than 8 passes of B: an eager ResNet step at eval
    batch sizes is bound by kernel launches, not arithmetic (the README's GPU check), so one pass costs 8x fewer launches.
    Its memory is that of an 8x larger eval batch (no autograd state is kept), so a caller that must stay within
    plain evaluation's memory passes B / 8 images (train.predict does by default)."""
    with precision.autocast(device):
        logits = model(precision.prepare(stacked_views(x)))
    return mean_over_views(logits, x.shape[0])


def stacked_views(x: torch.Tensor) -> torch.Tensor:
    """(8B, C, S, S), view-major: one forward pass sees every view of every image."""
    return torch.cat(dihedral_views(x))


def mean_over_views(logits: torch.Tensor, b: int) -> torch.Tensor:
    """(B, classes) float32: the softmax of (8B, classes) view-major logits, averaged over the 8 views."""
    return torch.softmax(logits.float(), 1).view(VIEWS, b, -1).mean(0)


class DihedralTTA(torch.nn.Module):
    """`model` behind the 8 dihedral views, for code that calls a model and takes the softmax of its output
    (the loop's `predict_split`, so train.evaluate --tta evaluates through the very path of plain evaluation). It
    returns log(mean softmax over the views), whose softmax is that mean again. Call it under the caller's autocast,
    like the model; one forward pass over the stacked (8B) batch, as `tta_probs`."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.module = model  # `module`, as DDP names it: predict_split() finds the head's class count through it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = stacked_views(x).contiguous(memory_format=torch.channels_last)
        probs = mean_over_views(self.module(views), x.shape[0])
        return probs.clamp_min(1e-30).log()  # no -inf: a probability can underflow to 0 in float32
