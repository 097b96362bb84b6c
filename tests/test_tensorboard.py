"""--tensorboard: the event files of a tiny run read back (every metrics.csv value, each stage's training views, the
settings and final figures), --resume appending without duplicates, one folder per CV fold, the missing-package
error, and no host read added to training."""
import io
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from pipeline.store import CacheReader
from tests.helpers import common
from tests.train_helpers import CountReads
from train.augment import GpuAugment
from train.cv import main as cv_main
from train.data.loader import loader_for
from train.engine import run_folder as rf
from train.engine import tensorboard as tb
from train.data.seeds import augment_generator
from train.engine.trainer import Trainer
from train.experiment.session import parse_args, resolve_config
from train.run import main

CPU = ["--no-progress", "--device", "cpu"]
STAGES = ["--stages", "16:1", "24:1"]


def events(folder: Path):
    """Everything the event files in `folder` hold, as TensorBoard shows it (purged events left out)."""
    return event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0,
                                                                          "tensors": 0}).Reload()


def scalars(acc, tag: str) -> dict[int, float]:
    points = acc.Scalars(tag)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{tag}: an epoch logged twice: {steps}"
    return {p.step: p.value for p in points}


@pytest.fixture(scope="module")
def run_dir(cache, tmp_path_factory) -> Path:
    """Two stages of one epoch, stopped after the first and resumed with --tensorboard again: the second stage's
    first epoch is trained by the resumed process."""
    out = tmp_path_factory.mktemp("tb")
    assert main(["resnet18", *STAGES, "--tensorboard", "--stop-after", "1"] + common(cache, out) + CPU) == 0
    (run,) = out.iterdir()
    assert main(["resnet18", "--resume", str(run), "--tensorboard"] + CPU) == 0
    return run


def test_every_metrics_value_is_a_scalar_per_epoch_and_resume_appends_once(run_dir):
    folder = run_dir / tb.FOLDER
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one file per process, in the same folder
    acc = events(folder)
    metrics = pd.read_csv(run_dir / rf.METRICS)
    assert list(metrics["epoch"]) == [1, 2]
    for column in rf.METRIC_COLUMNS:
        if column == tb.STEP_COLUMN:
            continue
        logged = scalars(acc, tb.tag_of(column))
        assert sorted(logged) == [1, 2], column
        for epoch, value in zip(metrics["epoch"], metrics[column]):
            assert logged[epoch] == pytest.approx(value, rel=1e-6, abs=1e-9), (column, epoch)
    config = json.loads((run_dir / rf.CONFIG).read_text())
    assert "tensorboard" not in json.dumps(config)  # it changes nothing trained: not a setting of the run


def test_each_stage_start_shows_its_first_batch_after_augmentation_unnormalised(run_dir):
    acc = events(run_dir / tb.FOLDER)
    config = rf.read_run_config(run_dir)
    reader = CacheReader(config.cache_dir)
    assert sorted(acc.Tags()["images"]) == [tb.stage_tag(1, 16), tb.stage_tag(2, 24)]
    for index, stage in enumerate(config.stages):
        epoch = config.stage_start(index)
        (image,) = acc.Images(tb.stage_tag(index + 1, stage.size))
        assert image.step == epoch + 1
        # the first batch of the stage's first epoch as the trainer's loader yields it, and its augmentation
        loader = loader_for(reader, stage.size, "train", stage.batch_size, config.fold, train=True,
                            device=torch.device("cpu"), rank=0, world_size=1, seed=config.seed)
        loader.set_epoch(epoch)
        images, _ = next(iter(loader))
        augment = GpuAugment.from_manifest(reader.manifest, stage.size)
        views = augment.apply(images, augment.sample(len(images), augment_generator(config.seed, epoch, 0)))
        expected = ((views * augment.std + augment.mean).clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy()
        grid = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
        n = min(len(views), tb.VIEWS)
        assert grid.shape == (stage.size, stage.size * n, 3)  # one row of n tiles (fewer than 8 here)
        for i in range(n):
            tile = grid[:, i * stage.size:(i + 1) * stage.size].astype(np.float64)
            assert np.abs(tile - expected[i]).max() <= 1.0, i  # PNG's uint8 truncation


def test_the_settings_and_final_figures_are_in_the_hparams_tab(run_dir):
    acc = events(run_dir / tb.FOLDER)
    content = acc.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert start["model"].string_value == "resnet18" and start["stages"].string_value == "16:1:4 24:1:4"
    assert start["lr"].number_value == pytest.approx(0.005) and start["nesterov"].string_value == "off"
    assert "cache_dir" not in start and start["cache_key"].string_value == Path(rf.read_run_config(run_dir)
                                                                                 .cache_dir).name
    metrics = {m.name.tag for m in HParamsPluginData.FromString(content["_hparams_/experiment"])
               .experiment.metric_infos}
    summary = rf.read_summary(run_dir)
    expected = {"final/best_valid_acc": summary["best_valid_acc"], "final/test_acc": summary["test_acc"],
                "final/test_f1_weighted": summary["test_f1_weighted"],
                "final/valid/f1_weighted": summary["splits"]["valid"]["f1_weighted"]}
    assert set(expected) <= metrics
    for tag, value in expected.items():
        assert scalars(acc, tag) == {2: pytest.approx(value)}, tag
    (text,) = acc.Tensors("config/text_summary")
    shown = textwrap.dedent(text.tensor_proto.string_val[0].decode())
    assert json.loads(shown) == json.loads((run_dir / rf.CONFIG).read_text())["config"]


def test_a_resumed_process_hides_an_epoch_logged_before_a_kill(tmp_path):
    """Killed after the board wrote epoch 2 but before last.pt held it: the resumed process trains epoch 2 again,
    and TensorBoard shows that epoch once, with the new values."""
    row = {name: 0.5 for name in rf.METRIC_COLUMNS}
    board = tb.TensorBoard(tmp_path, first_step=1)
    for epoch in (1, 2):
        board.epoch({**row, "epoch": epoch, "train_loss": float(epoch)})
    board.close()
    board = tb.TensorBoard(tmp_path, first_step=2)  # resumed from last.pt of epoch 1
    for epoch in (2, 3):
        board.epoch({**row, "epoch": epoch, "train_loss": 10.0 * epoch})
    board.close()
    assert scalars(events(tmp_path / tb.FOLDER), "loss/train") == {1: 1.0, 2: 20.0, 3: 30.0}


def test_a_cv_writes_one_folder_per_fold(cache, tmp_path, capsys):
    assert cv_main(["resnet18", "--folds", "2", "--stages", "16:1", "--tensorboard"] + common(cache, tmp_path)
                   + CPU) == 0
    cv_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    for index in range(2):
        acc = events(rf.fold_dir(cv_dir, index) / tb.FOLDER)
        assert sorted(scalars(acc, "accuracy/valid")) == [1]
        start = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
        assert start.session_start_info.hparams["fold"].string_value == f"patients {index}/2"
    assert not (cv_dir / tb.FOLDER).exists()  # TensorBoard pointed at the CV folder finds the folds' folders


def test_a_missing_package_stops_before_anything_starts(cache, run_dir, tmp_path, monkeypatch, capsys):
    # None in sys.modules makes an import fail (Python's documented way to block one)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(tb.TensorBoardMissing, match=r"pip install -e '\.\[tb\]'"):
        tb.require()
    out = tmp_path / "out"
    resumed_before = sorted(p.name for p in run_dir.rglob("*"))
    for command, args in ((main, ["resnet18", "--stages", "16:1", "--tensorboard"] + common(cache, out)),
                          (cv_main, ["resnet18", "--folds", "2", "--stages", "16:1", "--tensorboard"]
                           + common(cache, out)),
                          (main, ["resnet18", "--resume", str(run_dir), "--tensorboard"])):
        assert command(args + CPU) == 2
        err = capsys.readouterr().err
        assert "error: --tensorboard needs the tensorboard package" in err and "pip install" in err
    assert not out.exists() or not any(out.iterdir())  # no run folder, no CV folder
    assert sorted(p.name for p in run_dir.rglob("*")) == resumed_before
    # without the flag the package is never needed (a run without --tensorboard is not tried here: it trains)
    args = parse_args(["resnet18", "--stages", "16:1"] + common(cache, out) + CPU)
    assert resolve_config(args)[0].stages[0].size == 16


def test_the_board_adds_no_host_read_to_training(cache, tmp_path):
    """Trained with and without the board (which shows the stage's views), the host reads the same device values:
    the board takes the epoch's figures from the metrics row and its images once per stage."""
    config, _ = resolve_config(parse_args(["resnet18", "--stages", "16:1"] + common(cache, tmp_path) + CPU))
    reads = {}
    for on in (False, True):
        run = tmp_path / str(on)
        run.mkdir()
        board = tb.open_board(run, on, first_step=1)
        trainer = Trainer(config, run, progress=False, board=board)
        with CountReads() as counter:
            trainer.fit()
        board.close()
        reads[on] = counter.reads
        assert (run / tb.FOLDER).is_dir() == on  # off: no board, no folder
    assert reads[True] == reads[False]
    assert events(tmp_path / "True" / tb.FOLDER).Tags()["images"] == [tb.stage_tag(1, 16)]
