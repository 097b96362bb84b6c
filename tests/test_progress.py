"""Progress output: bars on a terminal, a few plain lines in a log, nothing when off; the result line."""
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.progress import LineProgress, bars, lines, normalise, progress_bar

ROOT = Path(__file__).resolve().parents[1]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_modes_follow_the_stream():
    assert bars("auto", _Tty()) and not lines("auto", _Tty())
    assert not bars("auto", io.StringIO()) and lines("auto", io.StringIO())
    assert bars("on", io.StringIO()) and not bars("off", _Tty()) and not lines("off", io.StringIO())
    assert normalise(True) == "auto" and normalise(False) == "off"
    with pytest.raises(ValueError, match="progress must be one of auto, on, off"):
        normalise("loud")


def test_line_progress_logs_at_most_every_tenth_or_30_s(caplog):
    now = [0.0]
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        p = LineProgress(1000, "preprocess", "img", log, clock=lambda: now[0])
        for _ in range(1000):
            now[0] += 0.001
            p.update()
        p.close()
    messages = [r.getMessage() for r in caplog.records]
    assert 10 <= len(messages) <= 11 and messages[-1].startswith("preprocess: 1000/1000 img (100%)")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test.progress"):
        p = LineProgress(10**6, "slow", "img", log, clock=lambda: now[0])
        for _ in range(5):
            now[0] += 31  # 31 s per image: a line per update, though far from 10%
            p.update()
    assert len(caplog.records) == 5


def test_off_is_silent(capsys, caplog):
    bar = progress_bar("off", 10, "x", "img", logging.getLogger("test.progress"))
    for _ in range(10):
        bar.update()
    bar.close()
    assert capsys.readouterr().err == "" and not caplog.records


@pytest.mark.slow
def test_a_logged_main_job_has_no_redraws_and_prints_its_result(tmp_path):
    """The README's main job, shortened, with stdout and stderr going to a file (not a terminal)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        for cmd in (["-m", "pipeline.build", "--demo", "--sizes", "64", "96", "--cache-dir", str(tmp_path / "c")],
                    ["-m", "train.run", "resnet18", "--stages", "64:2", "96:1", "--batch-size", "16",
                     "--cache-root", str(tmp_path / "c"), "--out", str(tmp_path / "runs"), "--device", "cpu"]):
            subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, check=True)
    text = log.read_text()
    assert "\r" not in text and len(text.splitlines()) < 100
    assert "preprocess: 288/288 img (100%)" in text  # plain build progress lines instead of a bar
    assert len(re.findall(r"epoch \d/3 \(\d+ px\): train loss", text)) == 3  # one line per epoch
    run_dir, result = Path(text.splitlines()[-1]), text.splitlines()[-2]
    summary = json.loads((run_dir / "summary.json").read_text())
    match = re.fullmatch(r"result: resnet18, best valid acc ([\d.]+) \(epoch (\d+), (\d+) px\), test acc ([\d.]+), "
                         r"test F1 \(weighted\) ([\d.]+), training ([\d.]+) s", result)
    assert match, result
    valid, epoch, size, test, f1, seconds = match.groups()
    assert float(valid) == pytest.approx(summary["best_valid_acc"], abs=5e-5)
    assert (int(epoch), int(size)) == (summary["checkpoint_epoch"], summary["checkpoint_size"])
    assert float(test) == pytest.approx(summary["test_acc"], abs=5e-5)
    assert float(f1) == pytest.approx(summary["test_f1_weighted"], abs=5e-5)
    assert float(seconds) == pytest.approx(summary["train_seconds"], abs=0.05)
    # train.evaluate prints the same figures per split
    out = subprocess.run([sys.executable, "-m", "train.evaluate", str(run_dir), "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert f"test acc {summary['test_acc']:.4f}, test F1 (weighted) {summary['test_f1_weighted']:.4f}" in out
    assert f"valid acc {summary['best_valid_acc']:.4f}" in out
