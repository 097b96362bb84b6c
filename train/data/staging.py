"""Host batches to the device without making the training loop wait: `Staging`.

A producer thread gathers each batch into one of a few reusable pinned buffers (`acquire`, then fill); the training
thread queues its copy to the device on a side stream (`send`), so the copy overlaps the previous step's compute,
and makes the compute stream wait for it with an event (a device-side wait; the host goes on). A buffer goes back
to the producer as soon as its copy is queued; the producer, not the training thread, waits for that copy to finish
before it writes into the buffer again. No pinning per batch: page-locking fresh memory costs far more than the copy.

The copies of every `Staging` on a device (every loader, every epoch) are queued on one stream (`device_stream`),
so the device memory of one epoch's batches is reused by the next.

On a CPU device the same protocol runs with ordinary buffers and `send` hands out a copy, so the producer/consumer
logic is exercised by the CPU tests too.

`produced_batches` runs a producer in a background thread and yields, on the training thread, the batches it puts:
through `Staging` (CUDA), or as the fresh host arrays the producer made (a CPU device wants them where they are).
"""
from __future__ import annotations

import queue
import threading

import torch

STAGING_BUFFERS = 3  # pinned batches in flight on CUDA: one being filled, one queued, one being copied

SIDE_STREAMS: dict[tuple[str, int], torch.cuda.Stream] = {}  # (purpose, CUDA device index): its one side stream


def device_stream(device: torch.device, purpose: str) -> torch.cuda.Stream:
    """The one side stream for `purpose` on CUDA `device`, made on first use and reused for the process's life.

    Reused, not made per epoch or per loader: the caching allocator ties each freed block to the stream that
    allocated it (it is handed out again on that stream only), and `torch.cuda.Stream()` draws the next stream of a
    round-robin pool, so fresh streams would leave each epoch's side-stream memory cached where no later epoch can
    reuse it (reserved memory growing until the pool's streams have all been drawn)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (purpose, index)
    if key not in SIDE_STREAMS:
        SIDE_STREAMS[key] = torch.cuda.Stream(torch.device("cuda", index))
    return SIDE_STREAMS[key]


class Staging:
    """`count` (images (B, S, S, 3) uint8, labels (B,) int64) host buffers and a side stream for `device`."""

    def __init__(self, batch_size: int, image_shape: tuple[int, ...], device: torch.device,
                 count: int = STAGING_BUFFERS):
        self.device = device
        cuda = device.type == "cuda"
        self.images = [torch.empty((batch_size, *image_shape), dtype=torch.uint8, pin_memory=cuda)
                       for _ in range(count)]
        self.labels = [torch.empty(batch_size, dtype=torch.int64, pin_memory=cuda) for _ in range(count)]
        self._copied: list[torch.cuda.Event | None] = [None] * count  # each buffer's last copy
        self._stream = device_stream(device, "staging copies") if cuda else None
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(count):
            self._free.put(i)

    def acquire(self, stop: threading.Event) -> int | None:
        """A free buffer's index, once its last copy has finished (producer side); None once `stop` is set."""
        while not stop.is_set():
            try:
                index = self._free.get(timeout=0.1)
            except queue.Empty:
                continue
            event = self._copied[index]
            if event is not None:
                event.synchronize()  # the producer thread waits, not the training loop
            return index
        return None

    def release(self, index: int) -> None:
        """Hand back a buffer that was acquired but not sent."""
        self._free.put(index)

    def send(self, index: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Queue the copy of buffer `index`'s first `rows` rows to the device (consumer side); returns the device
        tensors, ordered before any work queued after this call on the current stream. Never waits."""
        images, labels = self.images[index][:rows], self.labels[index][:rows]
        if self._stream is None:
            out = images.clone(), labels.clone()
        else:
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._stream):
                out = (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
                event = torch.cuda.Event()
                event.record(self._stream)
            compute.wait_event(event)
            for t in out:  # allocated on the side stream, used on the compute stream
                t.record_stream(compute)
            self._copied[index] = event
        self._free.put(index)
        return out


def produced_batches(produce, staging: Staging | None):
    """Run `produce(put, stop)` in a thread; yield the (images (B, S, S, 3) uint8, labels (B,) int64) batches it
    puts, on the device.

    The producer puts (buffer index, rows) when `staging` is given, else (images, labels) numpy arrays it made for
    this batch alone (the consumer keeps them). `put` returns False once the consumer has stopped (the producer
    should return); `stop` is the event that says so. An exception in the producer is raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=STAGING_BUFFERS - 1)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # CUDA's current device is per thread and starts at 0: without this, the producer's event waits would open a
    # context on GPU 0 from every DDP rank (as torch's own pin-memory thread, which sets it too).
    device_index = None
    if staging is not None and staging.device.type == "cuda":
        device_index = torch.cuda.current_device() if staging.device.index is None else staging.device.index

    def run() -> None:
        try:
            if device_index is not None:
                torch.cuda.set_device(device_index)
            produce(put, stop)
            put(done)
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(err)

    thread = threading.Thread(target=run, daemon=True, name="cache-batches")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            if staging is not None:
                yield staging.send(*item)
            else:  # a fresh host batch, already where a CPU device wants it
                yield tuple(torch.from_numpy(a) for a in item)
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)
