"""Augmentation one batch ahead (train.engine.ahead): the order of calls, the same tensors, the same run; the
compile-mode (and which modes capture CUDA graphs), augment-ahead and augment-backend settings of train.run."""
import json

import pandas as pd
import pytest
import torch

from pipeline import store
from tests.helpers import common
from train.augment import GpuAugment
from train.data.loader import CacheLoader
from train.engine.ahead import ahead_default, augmented_batches
from train.engine.config import COMPILE_MODES, CUDA_GRAPH_MODES, uses_cuda_graphs
from train.engine.loop import Precision
from train.engine.timing import EpochTimer
from train.run import main

CPU = torch.device("cpu")
SIZE = 16
TIMING = ["epoch_s", "imgs_per_s", "data_wait", "augment_share"]


class CountingLoader:
    """A loader that logs when each batch is taken from it."""

    def __init__(self, loader, log: list):
        self.loader, self.log = loader, log

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            self.log.append(("fetched", i))
            yield batch


def _batches(cache, ahead: bool, log: list | None = None):
    loader = CacheLoader(cache, SIZE, "train", 4, train=True, seed=3)
    augment = GpuAugment.from_manifest(store.read_manifest(cache), SIZE).train()
    generator = torch.Generator().manual_seed(11)
    source = CountingLoader(loader, log) if log is not None else loader
    timer = EpochTimer(CPU)
    out = []
    for i, (x, labels) in enumerate(augmented_batches(source, augment, generator, Precision().prepare, timer, CPU,
                                                      ahead)):
        if log is not None:
            log.append(("stepped", i))
        out.append((x.clone(), labels.clone()))
    return out, timer


def test_ahead_fetches_and_augments_the_next_batch_before_the_step_and_gives_the_same_tensors(cache):
    inline, _ = _batches(cache, ahead=False)
    log: list = []
    ahead, timer = _batches(cache, ahead=True, log=log)
    assert len(inline) == len(ahead) > 2
    for (x0, y0), (x1, y1) in zip(inline, ahead):  # the parameters are drawn in the same order: the same tensors
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    n = len(ahead)
    # batch i + 1 is taken (and augmented) before step i; the last step has nothing left to fetch
    for i in range(n - 1):
        assert log.index(("fetched", i + 1)) < log.index(("stepped", i)), log
    assert log[-1] == ("stepped", n - 1)
    data, augment = timer.finish()
    assert 0 < augment <= data < 1  # on one thread the augmentation is part of the wait


def test_the_timer_adds_marked_spans():
    timer = EpochTimer(CPU)
    timer.add_step((1.0, 3.0), (2.0, 2.5))
    timer.add_step((4.0, 5.0), (4.0, 5.0))  # a side stream's augmentation may outlast the compute stream's wait
    data, augment = timer.finish()
    assert data > 0 and data == pytest.approx(2 * augment)  # both over the same epoch total: 3 s against 1.5 s


def test_ahead_is_on_by_default_on_cuda_only():
    assert ahead_default("cuda") and ahead_default(torch.device("cuda", 1))
    assert not ahead_default("cpu") and not ahead_default(CPU)


def _metrics(out):
    (run_dir,) = out.iterdir()
    return pd.read_csv(run_dir / "metrics.csv"), json.loads((run_dir / "config.json").read_text())["config"]


@pytest.mark.slow
def test_a_run_with_and_without_augment_ahead_writes_the_same_figures(cache, tmp_path):
    runs = {}
    for flag in ("--augment-ahead", "--no-augment-ahead"):
        out = tmp_path / flag
        assert main(["resnet18", "--stages", "16:2", "--device", "cpu", "--no-progress", flag,
                     *common(cache, out)]) == 0
        runs[flag] = _metrics(out)
    (on, on_config), (off, off_config) = runs["--augment-ahead"], runs["--no-augment-ahead"]
    assert on_config["augment_ahead"] is True and off_config["augment_ahead"] is False
    pd.testing.assert_frame_equal(on.drop(columns=TIMING), off.drop(columns=TIMING))
    assert len(on) == 2


def test_compile_mode_is_saved_and_implies_compile_and_a_bad_one_is_refused(cache, tmp_path, capsys):
    from train.experiment import session
    args = session.parse_args(["resnet18", "--stages", "16:1", "--compile-mode", "reduce-overhead", "--device",
                               "cpu", *common(cache, tmp_path)])
    config, _ = session.resolve_config(args)
    assert config.compile and config.compile_mode == "reduce-overhead"
    assert config.augment_ahead is False  # the CPU default
    default, _ = session.resolve_config(session.parse_args(["resnet18", "--stages", "16:1", "--device", "cpu",
                                                            *common(cache, tmp_path)]))
    assert not default.compile and default.compile_mode == "default"
    with pytest.raises(SystemExit) as stop:
        main(["resnet18", "--compile-mode", "fastest", *common(cache, tmp_path)])
    assert stop.value.code == 2 and "fastest" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--compile-mode must be one of"):
        type(config)(**{**config.as_dict(), "stages": config.stages, "lr_drop_epochs": (),
                        "compile_mode": "fastest"})


def test_the_modes_marked_as_cuda_graphs_are_those_whose_inductor_options_capture_them():
    """A mode that captures CUDA graphs unmarked would leave `Precision.cuda_graphs` off, and no step marked."""
    import torch._inductor
    for mode in COMPILE_MODES:
        captures = torch._inductor.list_mode_options(mode).get("triton.cudagraphs", False)
        assert (mode in CUDA_GRAPH_MODES) == captures, mode
        assert uses_cuda_graphs(mode, torch.device("cuda")) == captures and not uses_cuda_graphs(mode, CPU)
    assert CUDA_GRAPH_MODES <= set(COMPILE_MODES)
    assert not uses_cuda_graphs("eager", torch.device("cuda"))  # the bench's uncompiled row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ahead_gives_the_inline_tensors_without_a_host_wait(cache):
    """On CUDA the next batch is augmented on a side stream: the same tensors as inline, and no synchronisation in
    the per-batch path (the loader's own staging included)."""
    cuda = torch.device("cuda")
    results = {}
    for ahead in (False, True):
        loader = CacheLoader(cache, SIZE, "train", 4, train=True, seed=3, device=cuda)
        augment = GpuAugment.from_manifest(store.read_manifest(cache), SIZE, out_dtype=torch.bfloat16).to(cuda)
        augment.train()
        generator = torch.Generator().manual_seed(11)
        timer = EpochTimer(cuda)
        batches = augmented_batches(loader, augment, generator, Precision(channels_last=True).prepare, timer, cuda,
                                    ahead)
        first = [t * 1 for t in next(batches)]  # warm-up: the loader's first fill, pinned buffers; a copy (as below):
        # a yielded batch is the ring's buffer, written again three batches later
        torch.cuda.set_sync_debug_mode("error")
        try:
            rest = [(x * 1, y * 1) for x, y in batches]  # a step's use of each batch on the compute stream
        finally:
            torch.cuda.set_sync_debug_mode(0)
        results[ahead] = [first, *rest]
        timer.finish()
    for (x0, y0), (x1, y1) in zip(results[False], results[True], strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_augment_backend_is_saved_and_one_for_another_device_is_refused(cache, tmp_path, capsys):
    from train.experiment import session
    args = session.parse_args(["resnet18", "--stages", "16:1", "--augment-backend", "torch", "--device", "cpu",
                               *common(cache, tmp_path)])
    config, _ = session.resolve_config(args)
    assert config.augment_backend == "torch"
    assert main(["resnet18", "--stages", "16:1", "--augment-backend", "triton", "--device", "cpu", "--no-progress",
                 *common(cache, tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "--augment-backend triton runs on cuda only" in err and "use --augment-backend auto" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder made
