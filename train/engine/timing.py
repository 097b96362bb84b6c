"""Where a training epoch's time goes, without making the host wait per step: `EpochTimer`.

Each step has three marks: before the loop asks the loader for a batch, when the batch is there, and when
augmentation has been queued. "Data" is the first mark to the third (waiting for the loader, the copy to the
device, augmentation), "augment" the second to the third.

On CUDA the marks are events on the compute stream, read once at the end of the epoch (the loop synchronises there
anyway). An event is timestamped when the GPU reaches it, so the figures are the GPU's view: time the GPU spent
without training work because the batch was not there yet, plus the augmentation kernels; a host that runs ahead of
the GPU costs nothing and counts nothing. On the CPU every op runs when it is called, so wall time is the same view.

With the augmentation one batch ahead on a side stream (train.engine.ahead) the two figures are taken apart
(`add_step`): "data" is the compute stream's wait for the batch (marks on the compute stream around its wait for the
side stream's event), "augment" the augmentation kernels on the side stream, which overlap the previous step and so
may exceed "data": the share of the epoch the side stream was busy, not time lost.
"""
from __future__ import annotations

import time

import torch


class EpochTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._pending: list = []  # the step being marked inline: [data start, batch ready]
        self._spans: list[tuple] = []  # per step: (data start, data end, augment start, augment end)
        self._start = self.mark()

    def mark(self, stream: "torch.cuda.Stream | None" = None):
        """A point in time: an event recorded on `stream` (default: the current stream) on CUDA, else wall time."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream or torch.cuda.current_stream(self.device))  # returns at once
        return event

    def data_start(self) -> None:
        self._pending = [self.mark()]

    def batch_ready(self) -> None:
        self._pending.append(self.mark())

    def augmented(self) -> None:
        """The inline step's third mark: its data wait runs from the first, its augmentation from the second."""
        (start, ready), end = self._pending, self.mark()
        self.add_step((start, end), (ready, end))
        self._pending = []

    def discard_step(self) -> None:
        """Drop the last step's marks (the loader had no batch left)."""
        self._pending = []

    def add_step(self, data: tuple, augment: tuple) -> None:
        """A step whose data wait and augmentation were marked apart ((start, end) marks each, from `mark`)."""
        self._spans.append((*data, *augment))

    def finish(self) -> tuple[float, float]:
        """(data share, augmentation share) of the epoch, once, at its end; on CUDA this waits for the GPU."""
        end = self.mark()
        if self.cuda:
            end.synchronize()
            seconds = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731 (milliseconds between events)
        else:
            seconds = lambda a, b: b - a  # noqa: E731
        total = seconds(self._start, end)
        data = sum(seconds(s[0], s[1]) for s in self._spans)
        augment = sum(seconds(s[2], s[3]) for s in self._spans)
        if total <= 0:
            return 0.0, 0.0
        return data / total, augment / total
