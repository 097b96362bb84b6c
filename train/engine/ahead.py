"""The training batches of an epoch, augmented: inline, or one batch ahead on a side stream (`augmented_batches`).

Inline, each batch is augmented on the compute stream right before its step, in series with it. Ahead (on by
default on CUDA, `--augment-ahead`), batch i+1 is fetched and augmented on a second CUDA stream before step i is
queued, so its kernels run while step i's do; the compute stream waits for it with an event (a device-side wait;
the host goes on). Both ways draw the batches' parameters from `generator` in the same order, one batch at a time,
so a seeded run trains on the same tensors either way: only when the kernels run changes.

Memory that crosses streams is kept correct with `record_stream`: the batch and its labels are made on the side
stream (the loader's copy waits there, `staging.Staging.send` orders it on the current stream) and used on the
compute stream, so the caching allocator does not hand their memory out again before the compute stream is done
with them. At most two augmented batches live at once (the one being trained on, the one ahead).

On a CPU there is no second stream: "ahead" runs the same order of calls (fetch and augment batch i+1, then step
i) on the one thread, which is what the CPU tests compare with the inline order.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from train.augment import GpuAugment
from train.engine.timing import EpochTimer


def ahead_default(device: str | torch.device) -> bool:
    """Whether `--augment-ahead` is on when not given: on CUDA only (a CPU has no second stream to overlap on)."""
    return torch.device(device).type == "cuda"


def augmented_batches(loader, augment: GpuAugment, generator: torch.Generator, prepare, timer: EpochTimer,
                      device: torch.device, ahead: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(augmented images ready for the model, labels) per training batch of `loader`, with `timer`'s marks.
    `prepare` is the step's layout change (Precision.prepare)."""
    if not ahead:
        return _inline(loader, augment, generator, prepare, timer)
    if device.type == "cuda":
        return _ahead_on_side_stream(loader, augment, generator, prepare, timer, device)
    return _ahead_in_order(loader, augment, generator, prepare, timer)


def _augment(augment: GpuAugment, images: torch.Tensor, labels: torch.Tensor, generator, prepare) -> torch.Tensor:
    return prepare(augment.apply(images, augment.sample(len(labels), generator)))


def _inline(loader, augment, generator, prepare, timer: EpochTimer):
    batches = iter(loader)
    while True:
        timer.data_start()
        try:
            images, labels = next(batches)
        except StopIteration:
            timer.discard_step()
            return
        timer.batch_ready()
        x = _augment(augment, images, labels, generator, prepare)
        timer.augmented()
        yield x, labels


def _ahead_in_order(loader, augment, generator, prepare, timer: EpochTimer):
    """The side-stream order of calls on one thread: batch i+1 is fetched and augmented before batch i is yielded."""
    batches = iter(loader)

    def fetch():
        start = timer.mark()
        try:
            images, labels = next(batches)
        except StopIteration:
            return None
        ready = timer.mark()
        x = _augment(augment, images, labels, generator, prepare)
        end = timer.mark()
        return x, labels, (start, end), (ready, end)

    pending = fetch()
    while pending is not None:
        x, labels, data, augmented = pending
        pending = fetch()
        timer.add_step(data, augmented)
        yield x, labels


def _ahead_on_side_stream(loader, augment, generator, prepare, timer: EpochTimer, device: torch.device):
    compute = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    # the side stream starts after everything queued so far (the model's weights, an earlier epoch's work)
    side.wait_stream(compute)
    batches = iter(loader)

    def launch():
        with torch.cuda.stream(side):
            try:
                images, labels = next(batches)  # its copy (Staging) or gather (resident) is ordered on `side`
            except StopIteration:
                return None
            start = timer.mark(side)
            x = _augment(augment, images, labels, generator, prepare)
            end = timer.mark(side)
        images.record_stream(side)  # read on the side stream, whichever stream made it
        return x, labels, (start, end), end

    pending = launch()
    while pending is not None:
        x, labels, augmented, done = pending
        pending = launch()  # batch i+1 is queued on the side stream before step i on the compute stream
        wait_start = timer.mark(compute)
        compute.wait_event(done)
        timer.add_step((wait_start, timer.mark(compute)), augmented)
        x.record_stream(compute)
        labels.record_stream(compute)
        yield x, labels
