"""An exponential moving average of a model's weights and buffers, updated on the device after every step.

Written here (timm's ModelEmaV3 update) rather than with torch.optim.swa_utils.AveragedModel: AveragedModel's
update_parameters tests its `n_averaged` counter, a device tensor, with `bool(...)` and `if ... > 0` on every call,
i.e. two host waits per training step on a GPU (torch 2.14), and with use_buffers=True it runs the EMA formula
through integer buffers (BatchNorm's num_batches_tracked), truncating them. Here the update is one `_foreach_lerp_`
over the floating-point tensors and one `_foreach_copy_` of the integer ones, with a host float as the weight and
nothing read back. The formula is get_ema_multi_avg_fn's: ema = decay * ema + (1 - decay) * weights, BatchNorm's
running statistics included.

`warmup` (timm's ModelEmaV3 `use_warmup`, gamma 1, power 2/3): the k-th update since the EMA started uses
decay min(decay, 1 - k ** (-2/3)), i.e. 0 (a copy), 0.37, 0.52, ... 0.95 at k = 78, 0.998 only from k ~ 11,000, so
that a run of a few hundred steps is not dominated by the initial weights (a fixed 0.998 keeps 86% of them after 78
steps).
"""
from __future__ import annotations

import copy

import torch

WARMUP_POWER = 2 / 3


class ModelEma:
    """`module` is a frozen, eval-mode copy of `net` that follows it with `update()`."""

    def __init__(self, net: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.updates = 0  # since the EMA (re)started; saved in checkpoints
        self.net = net
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        # the tensors are updated in place (optimizer steps, load_state_dict), so the pairs are made once
        mine, theirs = self.module.state_dict(keep_vars=True), net.state_dict(keep_vars=True)
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        others = [k for k in mine if k not in set(floats)]
        self._float_pairs = ([mine[k].detach() for k in floats], [theirs[k].detach() for k in floats])
        self._other_pairs = ([mine[k].detach() for k in others], [theirs[k].detach() for k in others])

    def decay_at(self, k: int) -> float:
        """The decay of the k-th update (1-based) since the EMA started."""
        return min(self.decay, 1.0 - k ** -WARMUP_POWER) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards `net`'s current weights and buffers, queued on their device."""
        self.updates += 1
        if self._float_pairs[0]:
            torch._foreach_lerp_(*self._float_pairs, 1.0 - self.decay_at(self.updates))
        if self._other_pairs[0]:
            torch._foreach_copy_(*self._other_pairs)  # step counters: the model's own

    @torch.no_grad()
    def restart(self) -> None:
        """Start again from `net`'s weights (a new stage)."""
        self.module.load_state_dict(self.net.state_dict())
        self.updates = 0

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int = 0) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
