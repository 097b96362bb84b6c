"""Training options (timm's names): optimizer, weight decay groups, label smoothing, cosine/warmup schedule, EMA,
the --recipe presets, their checks by flag name, and exact resume with all of them on. Tiny cache, CPU."""
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from models import build_model
from pipeline import store
from pipeline.store import CacheReader
from tests.helpers import SIZE, common
from tests.train_helpers import CountReads
from train.engine import checkpoint as ckpt
from train.engine import estimate
from train.engine import loop as loop_mod
from train.engine import trainer as trainer_mod
from train.augment import GpuAugment
from train.engine.config import Stage, TrainConfig
from train.engine.distributed import Dist
from train.engine.ema import ModelEma
from train.engine.graph_skips import cuda_graph_skips_warning
from train.data.loader import CacheLoader
from train.engine.loop import Precision, loss_and_acc, predict_split, train_one_epoch, train_step
from train.engine.optim import Schedule, build_optimizer, param_groups, set_lr
from train.engine.options import RECIPES
from train.experiment.session import parse_args, resolve_config
from train.run import main

CPU = torch.device("cpu")
TRAINING_COLUMNS = ["epoch", "stage", "size", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc"]


def run(args, capsys) -> Path:
    assert main(args + ["--no-progress", "--device", "cpu"]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def config(**options) -> TrainConfig:
    """A config for the optimizer and schedule pieces (nothing here opens the cache)."""
    return TrainConfig(model="resnet18", cache_dir="unused", cache_key="unused", stages=(Stage(16, 4, 4),), **options)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- schedule

def test_cosine_and_warmup_follow_their_formulas():
    s = Schedule("cosine", base_lr=0.1, min_lr=0.001, warmup_epochs=2, warmup_lr=0.01)
    assert s.per_step
    assert s.lr(0, 10, level=0.1) == pytest.approx(0.01)  # warmup's first step
    assert s.lr(0.5, 10, level=0.1) == pytest.approx(0.01 + 0.09 * 0.25)
    assert s.lr(1, 10, level=0.1) == pytest.approx(0.055)
    assert s.lr(2, 10, level=0.1) == pytest.approx(0.1)  # the cosine starts at the base lr
    assert s.lr(6, 10, level=0.1) == pytest.approx(0.001 + 0.5 * 0.099)  # half way: half way down
    assert s.lr(4, 10, level=0.1) == pytest.approx(0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi / 4)))
    assert s.lr(10, 10, level=0.1) == pytest.approx(0.001)  # the stage's end
    # step / plateau: warmup towards the current level, then the level
    step = Schedule("step", base_lr=0.1, warmup_epochs=2, warmup_lr=0.0)
    assert step.lr(1, 10, level=0.05) == pytest.approx(0.025) and step.lr(3.5, 10, level=0.005) == 0.005
    # the report's schedule: the level, constant within an epoch
    assert not Schedule("step", 0.1).per_step and Schedule("step", 0.1).lr(0, 10, level=0.1) == 0.1


def test_a_run_sets_the_lr_of_every_step_and_logs_each_epochs_first(cache, tmp_path, capsys, monkeypatch):
    used = []
    real_step = loop_mod.train_step

    def spy(model, x, labels, optimizer, *rest):
        lrs = {group["lr"] for group in optimizer.param_groups}
        assert len(lrs) == 1
        used.append(lrs.pop())
        return real_step(model, x, labels, optimizer, *rest)
    monkeypatch.setattr(loop_mod, "train_step", spy)
    run_dir = run(["resnet18", "--stages", "16:3", "24:2", "--lr", "0.01", "--sched", "cosine", "--min-lr", "0.0001",
                   "--warmup-epochs", "1", "--warmup-lr", "0.001"] + common(cache, tmp_path), capsys)
    cosine = Schedule("cosine", 0.01, min_lr=0.0001, warmup_epochs=1, warmup_lr=0.001)
    steps = len(used) // 5
    assert steps >= 2 and len(used) == 5 * steps
    # (stage epochs, epoch within the stage) of the 5 global epochs: each stage restarts warmup and cosine
    position = [(3, 0), (3, 1), (3, 2), (2, 0), (2, 1)]
    for epoch, (epochs, e) in enumerate(position):
        expected = [cosine.lr(e + i / steps, epochs, level=0.01) for i in range(steps)]
        assert used[epoch * steps:(epoch + 1) * steps] == pytest.approx(expected, rel=1e-12), epoch
    logged = pd.read_csv(run_dir / "metrics.csv")["lr"].tolist()
    # by hand: warmup start, cosine start, half way down; then the second stage from the warmup again
    assert logged == pytest.approx([0.001, 0.01, 0.0001 + 0.5 * 0.0099, 0.001, 0.01], rel=1e-9)


# ---------------------------------------------------------------- optimizer

def test_weight_decay_spares_norm_layers_and_biases():
    net = build_model("resnet18")
    no_decay, decay = param_groups(net, 0.01)
    names = {id(p): name for name, p in net.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.01
    assert spared == {n for n, p in net.named_parameters() if n.startswith("bn") or ".bn" in n
                      or ".downsample.1." in n or n == "fc.bias"}
    assert decayed == {n for n, p in net.named_parameters() if p.ndim == 4} | {"fc.weight"}
    assert spared.isdisjoint(decayed) and len(spared) + len(decayed) == len(list(net.parameters()))
    assert len(param_groups(net, 0.0)) == 1  # no decay: the report's single group, old checkpoints load


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_a_step_with_zero_gradient_shrinks_only_the_decayed_weights(opt):
    torch.manual_seed(0)
    net = build_model("resnet18")
    for module in net.modules():  # norm weights and biases away from 1 and 0, so that a decay would show
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)
    lr, wd = 0.1, 0.01
    optimizer = build_optimizer(net, config(opt=opt, weight_decay=wd), lr, fused=False)
    assert isinstance(optimizer, torch.optim.AdamW if opt == "adamw" else torch.optim.SGD)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in net.named_parameters():
        if p.ndim > 1:  # SGD: p - lr * wd * p; AdamW: p * (1 - lr * wd); the same here
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd), rtol=1e-6, atol=0)
        else:
            assert torch.equal(p.detach(), before[name]), name


def test_nesterov_and_adamw_are_what_they_say():
    net = build_model("resnet18")
    sgd = build_optimizer(net, config(nesterov=True, momentum=0.8), 0.01, fused=False)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.8
    adamw = build_optimizer(net, config(opt="adamw", weight_decay=0.05), 0.001, fused=False)
    assert adamw.defaults["betas"] == (0.9, 0.999) and [g["weight_decay"] for g in adamw.param_groups] == [0, 0.05]


# ---------------------------------------------------------------- label smoothing

def test_the_training_loss_is_smoothed_cross_entropy():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0]]))
        model.bias.copy_(torch.tensor([0.1, -0.2]))
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0], [0.0, -1.0, 1.0]])
    y = torch.tensor([1, 0, 1])
    logp = torch.log_softmax(model(x).detach(), 1)
    eps = 0.2
    by_hand = (-(1 - eps) * logp[torch.arange(3), y] - eps / 2 * logp.sum(1)).mean()
    plain = -logp[torch.arange(3), y].mean()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, _ = train_step(model, x, y, optimizer, Precision(), CPU, label_smoothing=eps)
    torch.testing.assert_close(loss.detach(), by_hand)
    torch.testing.assert_close(by_hand, F.cross_entropy(model(x).detach(), y, label_smoothing=eps))
    assert not torch.allclose(loss.detach(), plain)
    loss, _ = train_step(model, x, y, optimizer, Precision(), CPU)
    torch.testing.assert_close(loss.detach(), plain)


# ---------------------------------------------------------------- EMA

def _bn_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))


def test_ema_follows_weights_and_batchnorm_statistics_without_reading_back():
    torch.manual_seed(0)
    net = _bn_model()
    ema = ModelEma(net, 0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    net.train()
    net(torch.randn(8, 3, 8, 8))  # moves running_mean / running_var, counts a batch
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    with CountReads() as reads:
        ema.update()
    assert reads.reads == 0  # nothing for the host to wait for on a GPU
    now = net.state_dict()
    for key, value in ema.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * start[key] + 0.1 * now[key])
            assert not torch.equal(value, now[key]), key
        else:
            assert torch.equal(value, now[key]), key  # num_batches_tracked: the model's own
    ema.restart()
    assert same_weights(ema.state_dict(), net.state_dict()) and ema.updates == 0
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_ema_warmup_follows_timms_formula_and_ends_at_the_decay():
    torch.manual_seed(0)
    net = _bn_model()
    ema = ModelEma(net, 0.998, warmup=True)
    assert [ema.decay_at(k) for k in (1, 2, 78)] == pytest.approx([0.0, 1 - 2 ** (-2 / 3), 1 - 78 ** (-2 / 3)])
    assert ema.decay_at(10**6) == 0.998 and ModelEma(net, 0.998).decay_at(1) == 0.998  # capped; off: fixed
    for step in (1, 2):
        start = {k: v.clone() for k, v in ema.state_dict().items()}
        with torch.no_grad():
            net[0].weight.mul_(1.5)
        ema.update()
        d = ema.decay_at(step)
        torch.testing.assert_close(ema.state_dict()["0.weight"], d * start["0.weight"] + (1 - d) * net[0].weight)
    assert ema.updates == 2


def test_ema_weights_are_what_validation_measures_and_best_pt_holds(cache, tmp_path, capsys, monkeypatch):
    seen = {"raw": {}, "ema": {}, "smoothing": set()}
    after_epoch, start_stage, one_epoch = (trainer_mod.Trainer.end_epoch, trainer_mod.Trainer.start_stage,
                                           trainer_mod.train_one_epoch)

    def record(self, epoch, *rest):
        seen["raw"][epoch] = ckpt.cpu_copy(self.net.state_dict())
        seen["ema"][epoch] = ckpt.cpu_copy(self.ema.state_dict())
        after_epoch(self, epoch, *rest)

    def check_start(self, index):
        start_stage(self, index)
        self.writer.wait()
        seen["stage_start_is_best"] = same_weights(self.net.state_dict(), ckpt.load(self.run_dir / "best.pt")["model"])
        seen["ema_restarted"] = same_weights(self.ema.state_dict(), self.net.state_dict())

    def spy_epoch(*args, **kwargs):
        seen["smoothing"].add(kwargs["label_smoothing"])
        return one_epoch(*args, **kwargs)
    monkeypatch.setattr(trainer_mod.Trainer, "end_epoch", record)
    monkeypatch.setattr(trainer_mod.Trainer, "start_stage", check_start)
    monkeypatch.setattr(trainer_mod, "train_one_epoch", spy_epoch)
    run_dir = run(["resnet18", "--stages", "16:3", "24:1", "--ema-decay", "0.9", "--label-smoothing", "0.2",
                   "--seed", "2"] + common(cache, tmp_path), capsys)
    assert seen["smoothing"] == {0.2} and seen["stage_start_is_best"] and seen["ema_restarted"]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    stage1 = metrics[metrics["stage"] == 1]
    # the first stage's best epoch: its EMA weights started the second stage
    first_best = int(stage1.loc[stage1["valid_acc"].idxmax(), "epoch"]) - 1
    assert not same_weights(seen["ema"][first_best], seen["raw"][first_best])
    best, last = ckpt.load(run_dir / "best.pt"), ckpt.load(run_dir / "last.pt")
    assert best["epoch"] == last["epoch"] == 3  # the second stage's only epoch
    assert same_weights(best["model"], seen["ema"][3]) and not same_weights(best["model"], seen["raw"][3])
    assert same_weights(last["model"], seen["ema"][3]) and same_weights(last["train_model"], seen["raw"][3])
    # re-evaluate on the valid split: the logged figures are the EMA weights' (plain cross-entropy), not the raw ones'
    reader = CacheReader(cache)
    loader = CacheLoader(reader, 24, "valid", 4, device=CPU)
    augment = GpuAugment.from_manifest(reader.manifest, 24)
    precision = Precision.for_device(CPU, False)  # as the trainer's (channels_last)
    figures = {}
    for name, weights in (("ema", best["model"]), ("raw", last["train_model"])):
        net = build_model("resnet18")
        net.load_state_dict(weights)
        net.to(memory_format=torch.channels_last)
        probs, labels = predict_split(net, loader, augment, precision, CPU, Dist())
        figures[name] = loss_and_acc(probs, labels)
    logged = metrics.iloc[-1]
    assert figures["ema"] == pytest.approx((logged["valid_loss"], logged["valid_acc"]), abs=2e-6)
    assert figures["raw"][0] != pytest.approx(logged["valid_loss"], abs=1e-4)
    summary = json.loads((run_dir / "summary.json").read_text())  # train.evaluate read best.pt's EMA weights
    assert summary["best_valid_acc"] == pytest.approx(logged["valid_acc"], abs=1e-6)


def test_an_epoch_with_every_option_reads_nothing_back_per_step(cache_dir):
    def epoch(batch_size, with_options):
        torch.manual_seed(0)
        model = _bn_model()
        loader = CacheLoader(cache_dir, SIZE, "train", batch_size, train=True)
        augment = GpuAugment.from_manifest(store.read_manifest(cache_dir), SIZE, backend="torch")
        cfg = config(nesterov=True, weight_decay=5e-4, label_smoothing=0.1, sched="cosine", warmup_epochs=1,
                     ema_decay=0.9) if with_options else config()
        optimizer = build_optimizer(model, cfg, 0.01, fused=False)
        schedule, ema = Schedule.from_config(cfg), ModelEma(model, cfg.ema_decay) if cfg.ema_decay else None
        with CountReads() as reads:
            train_one_epoch(model, loader, augment, optimizer, Precision.for_device(CPU, False), CPU, Dist(),
                            torch.Generator().manual_seed(0), progress=False, label_smoothing=cfg.label_smoothing,
                            before_step=lambda i: set_lr(optimizer, schedule.lr(i / len(loader), 4, 0.01)), ema=ema)
        return reads.reads, len(loader)
    (plain, few), (full, _), (full_many, many) = epoch(16, False), epoch(16, True), epoch(4, True)
    assert many >= 3 * few
    assert plain == full == full_many <= 3  # the epoch's sums at its end, whatever the options or step count


# ---------------------------------------------------------------- resume

ALL_OPTIONS = ["resnet18", "--stages", "16:2", "24:2", "--opt", "adamw", "--lr", "0.002", "--weight-decay", "0.05",
               "--label-smoothing", "0.1", "--sched", "cosine", "--min-lr", "0.0001", "--warmup-epochs", "1",
               "--ema-decay", "0.8", "--ema-warmup", "--seed", "4"]


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert main(ALL_OPTIONS + common(cache, out) + ["--no-progress", "--device", "cpu"]) == 0
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [1, 2])  # inside the first stage's warmup... and at the 16 -> 24 switch
def test_a_run_with_every_option_resumes_to_the_same_result(cache, tmp_path, capsys, uninterrupted, stop_after):
    part = run(ALL_OPTIONS + common(cache, tmp_path) + ["--stop-after", str(stop_after)], capsys)
    assert len(pd.read_csv(part / "metrics.csv")) == stop_after
    assert main(["resnet18", "--resume", str(part), "--no-progress"]) == 0
    whole = uninterrupted
    pd.testing.assert_frame_equal(pd.read_csv(whole / "metrics.csv")[TRAINING_COLUMNS],
                                  pd.read_csv(part / "metrics.csv")[TRAINING_COLUMNS])
    for name in ("best.pt", "last.pt"):
        a, b = ckpt.load(whole / name), ckpt.load(part / name)
        assert a["epoch"] == b["epoch"] and a["progress"] == b["progress"], name
        assert a["ema_updates"] == b["ema_updates"] and (name == "best.pt" or a["ema_updates"] > 0), name
        for key in ("model", "train_model"):  # the EMA's and the trained network's
            for k, v in a[key].items():
                torch.testing.assert_close(b[key][k], v, rtol=0, atol=1e-6, msg=f"{name} {key} {k}")
    moments = [s for s in ckpt.load(part / "last.pt")["optimizer"]["state"].values()]
    assert moments and all({"exp_avg", "exp_avg_sq", "step"} <= set(s) for s in moments)  # AdamW's, continued
    assert json.loads((part / "summary.json").read_text())["best_valid_acc"] == \
        json.loads((whole / "summary.json").read_text())["best_valid_acc"]


def test_a_run_saved_before_the_options_existed_loads_and_resumes(cache, tmp_path, capsys):
    run_dir = run(["resnet18", "--stages", "16:2", "--lr-drop", "plateau:1", "--stop-after", "1"]
                  + common(cache, tmp_path), capsys)
    path = run_dir / "config.json"
    data = json.loads(path.read_text())
    for key in ("recipe", "opt", "nesterov", "weight_decay", "label_smoothing", "sched", "min_lr", "warmup_epochs",
                "warmup_lr", "ema_decay", "ema_warmup"):
        del data["config"][key]
    path.write_text(json.dumps(data))
    last = ckpt.load(run_dir / "last.pt")
    del last["train_model"], last["ema_updates"]  # a version 2 checkpoint had no such keys
    torch.save(last, run_dir / "last.pt")
    old = TrainConfig.from_dict(data["config"])
    assert old.recipe == "report" and old.sched == "plateau" and old.ema_decay is None and old.weight_decay == 0
    assert main(["resnet18", "--resume", str(run_dir), "--no-progress"]) == 0
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 2


# ---------------------------------------------------------------- recipes

def _resolved(cache, *flags) -> TrainConfig:
    return resolve_config(parse_args(["resnet18", "--stages", "16:2", "--cache", str(cache), "--device", "cpu",
                                      *flags]))[0]


def test_the_modern_recipe_is_written_to_config_json_and_resume_keeps_it(cache, tmp_path, capsys):
    run_dir = run(["resnet18", "--stages", "16:2", "--recipe", "modern", "--stop-after", "1"] + common(cache, tmp_path),
                  capsys)
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    assert {k: saved[k] for k in RECIPES["modern"]} == RECIPES["modern"] and saved["recipe"] == "modern"
    assert ckpt.load(run_dir / "last.pt")["train_model"] is not None  # its EMA is on
    before = (run_dir / "last.pt").read_bytes()
    for flags, named in [(["--weight-decay", "0.1"], "--weight-decay 0.1 (the run keeps 0.0005)"),
                         (["--opt", "adamw"], "--opt adamw (the run keeps sgd)"),
                         (["--ema-decay", "off"], "--ema-decay off (the run keeps 0.998)"),
                         (["--recipe", "report"], "--recipe report (the run keeps modern)"),
                         (["--sched", "step"], "--sched step (the run keeps cosine)"),
                         (["--no-nesterov"], "--no-nesterov (the run keeps --nesterov)"),
                         (["--no-ema-warmup"], "--no-ema-warmup (the run keeps --ema-warmup)"),
                         (["--warmup-epochs", "3"], "--warmup-epochs 3 (the run keeps 1)"),
                         (["--label-smoothing", "0"], "--label-smoothing 0.0 (the run keeps 0.1)"),
                         # given with the default's value, still not the run's: refused all the same
                         (["--batch-size", "64"], "--batch-size 64 (the run keeps 4)")]:
        assert main(["resnet18", *flags, "--resume", str(run_dir), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert named in err and "start a new run" in err, err
    assert (run_dir / "last.pt").read_bytes() == before  # refused before touching anything
    assert main(["resnet18", "--recipe", "modern", "--weight-decay", "5e-4", "--ema-decay", "0.998", "--batch-size",
                 "4", "--resume", str(run_dir), "--no-progress"]) == 0  # the saved values are fine


def test_explicit_flags_override_the_recipe(cache):
    c = _resolved(cache, "--recipe", "modern", "--weight-decay", "0.001", "--ema-decay", "off", "--no-nesterov",
                  "--warmup-epochs", "0")
    assert (c.recipe, c.weight_decay, c.ema_decay, c.nesterov, c.warmup_epochs) == ("modern", 0.001, None, False, 0)
    assert (c.sched, c.label_smoothing, c.ema_warmup) == ("cosine", 0.1, False)  # no EMA: no EMA warmup either
    c = _resolved(cache, "--recipe", "modern", "--ema-decay", "0.99")
    assert (c.ema_decay, c.ema_warmup, c.label_smoothing) == (0.99, True, 0.1)  # the rest: the recipe's
    c = _resolved(cache, "--recipe", "modern", "--opt", "adamw")
    assert (c.opt, c.lr, c.weight_decay, c.nesterov) == ("adamw", 0.001, 0.05, False)
    c = _resolved(cache, "--recipe", "modern", "--lr-drop", "plateau:3")  # --lr-drop names its schedule
    assert (c.sched, c.lr_drop_patience) == ("plateau", 3)
    assert _resolved(cache, "--lr-drop", "2", "plateau:1").sched == "plateau"  # as before: both apply


def test_the_report_recipe_is_the_defaults(cache):
    report, default = _resolved(cache, "--recipe", "report"), _resolved(cache)
    assert report == default
    fields = TrainConfig.__dataclass_fields__
    for name, value in RECIPES["report"].items():
        assert getattr(default, name) == value == (fields[name].default if name != "sched" else "step"), name
    assert default.recipe == "report" and default.momentum == 0.9 and default.lr == 0.005


# ---------------------------------------------------------------- checks by name

@pytest.mark.parametrize("flags, message", [
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--label-smoothing", "1"], "--label-smoothing must be a number in [0, 1), got 1.0"),
    (["--label-smoothing", "-0.1"], "--label-smoothing must be"),
    (["--ema-decay", "1"], "--ema-decay must be off or a number in (0, 1)"),
    (["--ema-decay", "0"], "--ema-decay must be off or a number in (0, 1)"),
    (["--ema-decay", "nan"], "--ema-decay must be"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be an integer >= 0, got -1"),
    (["--warmup-lr", "inf"], "--warmup-lr must be a finite number >= 0, got inf"),
    (["--sched", "cosine", "--min-lr", "-1"], "--min-lr must be a finite number in [0, --lr 0.005], got -1.0"),
    (["--sched", "cosine", "--min-lr", "0.1"], "--min-lr must be"),
    (["--min-lr", "0.001"], "--min-lr is where --sched cosine ends; this run's --sched is step"),
    (["--sched", "cosine", "--lr-drop", "5"], "--sched cosine does not take --lr-drop"),
    (["--sched", "plateau"], "--sched plateau needs its patience: add --lr-drop plateau:N"),
    (["--sched", "step", "--lr-drop", "plateau:2"], "--sched step conflicts with --lr-drop plateau:N"),
    (["--opt", "adamw", "--nesterov"], "--nesterov is for --opt sgd"),
    (["--opt", "adamw", "--momentum", "0.5"], "--momentum is SGD's"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs a --momentum > 0"),
    (["--ema-warmup"], "--ema-warmup needs an EMA: give --ema-decay too"),
])
def test_bad_option_values_are_refused_by_flag_name(cache, tmp_path, capsys, flags, message):
    assert main(["resnet18", "--stages", "16:1", "--device", "cpu", "--no-progress", *common(cache, tmp_path),
                 *flags]) == 2
    assert message in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run folder for a refused command


@pytest.mark.parametrize("flags", [["--opt", "lamb"], ["--sched", "linear"], ["--warmup-epochs", "1.5"],
                                   ["--ema-decay", "high"], ["--recipe", "fast"]])
def test_unparsable_options_stop_argparse(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["resnet18", *flags])
    assert exc.value.code == 2 and flags[0] in capsys.readouterr().err


@pytest.mark.parametrize("options, flag", [
    ({"weight_decay": -0.1}, "--weight-decay"), ({"label_smoothing": 1.0}, "--label-smoothing"),
    ({"ema_decay": 1.0}, "--ema-decay"), ({"warmup_epochs": 0.5}, "--warmup-epochs"), ({"min_lr": 1.0}, "--min-lr"),
    ({"opt": "lamb"}, "--opt"), ({"sched": "cosine", "lr_drop_epochs": (2,)}, "--sched cosine"),
    ({"ema_warmup": True}, "--ema-warmup"),
])
def test_a_config_with_bad_options_names_the_flag(options, flag):
    with pytest.raises(ValueError, match=flag):
        config(**options)


def test_batch_size_given_with_a_preset_sets_every_stage(cache, tmp_path, monkeypatch):
    from train.experiment import session
    monkeypatch.setitem(session.PRESETS, "resnet18", ((16, 2, 64), (24, 1, 32)))  # a preset the tiny cache holds
    common_flags = ["--cache", str(cache), "--out", str(tmp_path), "--device", "cpu"]
    given, preset = session.resolve_config(session.parse_args(["resnet18", "--batch-size", "8", *common_flags]))
    assert preset and [(s.size, s.epochs, s.batch_size) for s in given.stages] == [(16, 2, 8), (24, 1, 8)]
    default, _ = session.resolve_config(session.parse_args(["resnet18", *common_flags]))
    assert [s.batch_size for s in default.stages] == [64, 32]  # the preset's own, when --batch-size is not typed


def test_a_linked_cache_under_the_cache_root_is_not_chosen(cache, tmp_path, caplog):
    """As `pipeline.cache list` and `prune`: a key-named link in the cache root is not one of its caches."""
    from train.experiment import session
    root = tmp_path / "root"
    root.mkdir()
    (root / cache.name).symlink_to(cache)
    with caplog.at_level("WARNING"), pytest.raises(session.RunError, match="no cache under"):
        session.find_cache(root, [16])
    assert "a symbolic link, not a cache folder" in caplog.text and f"--cache {root / cache.name}" in caplog.text
    assert session.find_cache(cache.parent, [16]) == cache  # the cache itself is found where it is


def test_the_time_estimate_synchronises_before_each_clock_read(cache, monkeypatch):
    """CUDA steps are only queued when train_step returns: a clock read without a sync first times the launches."""
    config = resolve_config(parse_args(["resnet18", "--stages", "16:1", "24:1", "--batch-size", "2", "--device", "cpu",
                                        *common(cache, Path("unused"))]))[0]
    log = []
    clock = iter(range(1, 1000))
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: log.append("clock") or next(clock))
    seconds, lines = estimate.estimate_seconds(config, sync=lambda: log.append("sync"))
    assert log == ["sync", "clock"] * 4 and len(lines) == 2 and seconds > 0  # two stages: start and end each


def test_a_ddp_run_is_told_when_inductor_skipped_its_cuda_graphs():
    message = cuda_graph_skips_warning("reduce-overhead", ddp=True, skips=3)
    assert "3 compiled graph(s) without CUDA graphs" in message and "pytorch/pytorch#139207" in message
    assert "--compile-mode reduce-overhead" in message
    assert cuda_graph_skips_warning("reduce-overhead", ddp=True, skips=0) is None
    assert cuda_graph_skips_warning("max-autotune", ddp=False, skips=3) is None  # not the known cause
