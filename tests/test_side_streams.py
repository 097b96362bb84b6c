"""The CUDA side streams of augmentation ahead and of staging, checked on the CPU with fakes of torch.cuda's streams
and events that log what would be queued: one side stream per device for the process (not one per epoch, which
would strand each epoch's cached memory on a stream no later epoch uses), and the ring of output buffers that hands
augmented batches to the compute stream in stream order (a slot is written only after the compute stream's event
says the step that read it is done)."""
from contextlib import contextmanager
from itertools import count

import pytest
import torch

from pipeline import store
from train.augment import GpuAugment
from train.data import staging
from train.data.loader import CacheLoader
from train.engine.ahead import RING_SLOTS, augmented_batches
from train.engine.loop import Precision
from train.engine.timing import EpochTimer

CUDA = torch.device("cuda", 0)  # only a name here: every tensor stays on the CPU
SIZE = 16


class FakeCuda:
    """torch.cuda's streams and events as objects that log the calls a CUDA run would queue, in order."""

    def __init__(self):
        self.log: list[tuple] = []
        self.streams_made = 0
        self.compute = self.Stream("compute", self)
        self.current = self.compute
        self.event_ids = count()

    class Stream:
        def __init__(self, name, cuda):
            self.name, self.cuda = name, cuda

        def wait_stream(self, other):
            self.cuda.log.append(("wait_stream", self.name, other.name))

        def wait_event(self, event):
            self.cuda.log.append(("wait", self.name, event.id))

    def new_stream(self, device=None):
        self.streams_made += 1
        return self.Stream(f"side{self.streams_made}", self)

    def event(self, enable_timing=False):
        cuda = self

        class Event:
            id = next(cuda.event_ids)

            def record(self, stream=None):
                cuda.log.append(("record", (stream or cuda.current).name, self.id))

        return Event()

    @contextmanager
    def stream(self, s):
        before, self.current = self.current, s
        try:
            yield
        finally:
            self.current = before

    def install(self, monkeypatch):
        monkeypatch.setattr(staging, "SIDE_STREAMS", {})  # streams made by earlier tests are not this test's
        monkeypatch.setattr(torch.cuda, "Stream", self.new_stream)
        monkeypatch.setattr(torch.cuda, "Event", self.event)
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self.current)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: None)
        copy = torch.Tensor.copy_

        def logged_copy(dst, *args, **kwargs):
            self.log.append(("write", self.current.name, dst.data_ptr()))
            return copy(dst, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "copy_", logged_copy)
        return self


@pytest.fixture
def fake_cuda(monkeypatch):
    return FakeCuda().install(monkeypatch)


def _epoch(cache, device, ahead, log=None, epoch=0):
    """One epoch's (augmented images, labels), copied when yielded; with `log`, ("yield"/"stepped", pointer)."""
    loader = CacheLoader(cache, SIZE, "train", 2, train=True, seed=3)
    loader.set_epoch(epoch)
    augment = GpuAugment.from_manifest(store.read_manifest(cache), SIZE).train()
    generator = torch.Generator().manual_seed(11 + epoch)
    out = []
    for x, labels in augmented_batches(loader, augment, generator, Precision(channels_last=True).prepare,
                                       EpochTimer(device), device, ahead):
        if log is not None:
            log.append(("yield", x.data_ptr()))
        out.append((x.clone(), labels.clone()))
        if log is not None:
            log.append(("stepped", x.data_ptr()))  # the step that reads x has been queued
    return out


def test_ahead_makes_its_side_stream_once_for_all_epochs(cache, fake_cuda):
    for epoch in range(2):
        assert len(_epoch(cache, CUDA, ahead=True, epoch=epoch)) > 0
    assert fake_cuda.streams_made == 1


def test_staging_copies_share_one_stream_per_device_across_epochs(monkeypatch, fake_cuda):
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))  # no CUDA to pin for
    for device in (CUDA, torch.device("cuda")):  # each epoch of a host-placed loader makes its Staging; the
        staging.Staging(2, (4, 4, 3), device)  # second names the current device (0) without an index
    assert fake_cuda.streams_made == 1


def test_ahead_hands_batches_over_through_a_ring_in_stream_order(cache, fake_cuda):
    inline = _epoch(cache, torch.device("cpu"), ahead=False)
    log = fake_cuda.log
    ahead = _epoch(cache, CUDA, ahead=True, log=log)
    assert len(ahead) == len(inline) > 2 * RING_SLOTS
    for (x0, y0), (x1, y1) in zip(inline, ahead, strict=True):  # the same tensors as inline
        assert torch.equal(x0, x1) and torch.equal(y0, y1)

    yielded = [entry[1] for entry in log if entry[0] == "yield"]
    ring = yielded[:RING_SLOTS]
    assert len(set(ring)) == RING_SLOTS
    assert yielded == [ring[i % RING_SLOTS] for i in range(len(yielded))]  # the ring's buffers, in turn

    slot_event = {}
    for at, entry in enumerate(log):
        if entry[0] != "write" or entry[2] not in ring:
            continue
        slot = entry[2]
        assert entry[1] != "compute"  # written on the side stream
        before = log[:at]
        waits = [e for e in before if e[0] == "wait" and e[1] != "compute"]
        event = waits[-1][2]  # the side stream's last wait before writing is on this slot's event
        assert slot_event.setdefault(slot, event) == event
        wait_at = max(i for i, e in enumerate(before) if e == waits[-1])
        records = [i for i, e in enumerate(before) if e == ("record", "compute", event)]
        assert records and records[-1] < wait_at  # wait_event -> write, on an event the compute stream recorded
        stepped = [i for i, e in enumerate(before) if e == ("stepped", slot)]
        if stepped:  # rewritten: only once the step that read it last was queued and its event recorded after
            assert stepped[-1] < records[-1]
            yields = [i for i, e in enumerate(before) if e == ("yield", slot)]
            assert yields[-1] < stepped[-1]  # never written while handed out
    assert len(set(slot_event.values())) == RING_SLOTS
    writes = [e for e in log if e[0] == "write" and e[2] in ring]
    assert len(writes) == len(ahead)
