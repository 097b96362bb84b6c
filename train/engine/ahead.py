"""The training batches of an epoch, augmented: inline, or one batch ahead on a side stream (`augmented_batches`).

Inline, each batch is augmented on the compute stream right before its step, in series with it. Ahead (on by
default on CUDA, `--augment-ahead`), batch i+1 is fetched and augmented on a second CUDA stream before step i is
queued, so its kernels run while step i's do; the compute stream waits for it with an event (a device-side wait;
the host goes on). Both ways draw the batches' parameters from `generator` in the same order, one batch at a time,
so a seeded run trains on the same tensors either way: only when the kernels run changes.

The augmented batches cross streams through a ring of `RING_SLOTS` output buffers, handed over in stream order:
batch j is augmented on the side stream, which then waits (device-side) for the event that says the compute stream
is done with slot j % RING_SLOTS before copying it there; the compute stream waits for the copy before step j and
records that slot's event once step j has been queued (when the loop asks for the next batch). So the batches' memory
is the ring's three buffers, however far the host runs ahead, and the augmentation's temporaries stay on the side
stream, reused in its own order. (`record_stream` would instead free a batch only once the host has noticed, at a
later allocation, that the compute stream is past it: memory growing with how far the host runs ahead.) The labels
are tiny and keep `record_stream`. The side stream is one per device for the process (`staging.device_stream`),
reused every epoch: the caching allocator reuses a freed block only on the stream that allocated it.

On a CPU there is no second stream: "ahead" runs the same order of calls (fetch and augment batch i+1, then step
i) on the one thread, which is what the CPU tests compare with the inline order.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from train.augment import GpuAugment
from train.data.staging import device_stream
from train.engine.timing import EpochTimer

RING_SLOTS = 3  # augmented batches in device memory: one being trained on, one ready, one being written


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


class _OutputRing:
    """`slots` device buffers for augmented batches, each with the compute stream's event that says it is free.

    A buffer is allocated on the compute stream (outside the side stream's context), so when it is freed (a new
    shape, the epoch's end) its block goes back to the stream that reads it; a fresh buffer's event is recorded at
    once, so the side stream's first write also waits for whatever compute work had that block before."""

    def __init__(self, slots: int):
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self.consumed = [torch.cuda.Event() for _ in range(slots)]

    def buffer_for(self, slot: int, x: torch.Tensor, compute) -> torch.Tensor:
        buffer = self.buffers[slot]
        if buffer is None or buffer.shape != x.shape or buffer.dtype != x.dtype or buffer.stride() != x.stride():
            buffer = self.buffers[slot] = torch.empty_like(x)  # x's layout (channels_last from `prepare`)
            self.consumed[slot].record(compute)
        return buffer


def _ahead_on_side_stream(loader, augment, generator, prepare, timer: EpochTimer, device: torch.device):
    compute = torch.cuda.current_stream(device)
    side = device_stream(device, "augment ahead")
    # the side stream starts after everything queued so far (the model's weights, an earlier epoch's work)
    side.wait_stream(compute)
    batches = iter(loader)
    ring = _OutputRing(RING_SLOTS)
    launched = 0

    def launch():
        nonlocal launched
        with torch.cuda.stream(side):
            try:
                images, labels = next(batches)  # its copy (Staging) or gather (resident) is ordered on `side`
            except StopIteration:
                return None
            start = timer.mark(side)
            x = _augment(augment, images, labels, generator, prepare)
            end = timer.mark(side)  # before the wait below: the augmentation's span, not the ring's
        slot = launched % RING_SLOTS
        launched += 1
        out = ring.buffer_for(slot, x, compute)
        with torch.cuda.stream(side):
            side.wait_event(ring.consumed[slot])  # the step that read this slot last has finished
            out.copy_(x)
            done = torch.cuda.Event()
            done.record(side)
        images.record_stream(side)  # read on the side stream, whichever stream made it
        return out, labels, (start, end), done, slot

    try:
        pending = launch()
        while pending is not None:
            x, labels, augmented, done, slot = pending
            pending = launch()  # batch i+1 is queued on the side stream before step i on the compute stream
            wait_start = timer.mark(compute)
            compute.wait_event(done)
            timer.add_step((wait_start, timer.mark(compute)), augmented)
            labels.record_stream(compute)
            yield x, labels
            ring.consumed[slot].record(compute)  # asked for the next batch: step i has been queued after its reads
    finally:
        # a stopped epoch may leave a copy into the ring queued on the side stream; the buffers go back to the
        # compute stream's pool, so its later work must come after that copy (a device-side wait)
        compute.wait_stream(side)
