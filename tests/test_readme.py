"""The README's commands run as written: the main job (its first command block) end to end on the demo data, and every
`python -m MODULE` the README names answers --help. A README edit that breaks a command fails here, not for a user."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def main_job_steps() -> list[list[str]]:
    """The main job's commands after the set-up (venv and pip), as argv lists for this interpreter."""
    steps = []
    for part in bash_blocks()[0].strip().split(" && "):
        argv = shlex.split(part)
        if argv[0].endswith("python") and argv[1] == "-m" and argv[2] not in ("venv", "pip"):
            steps.append([sys.executable, *argv[1:]])
    return steps


def test_the_readme_starts_with_the_two_commands():
    first, second = bash_blocks()[:2]
    assert "--demo" in first and "train.run" in first
    assert "pytest" in second
    assert "python3 -m venv .venv" in first and "python3 -m venv .venv" in second


@pytest.mark.slow
def test_the_readme_main_job_runs_as_written(tmp_path):
    steps = main_job_steps()
    assert [s[2] for s in steps] == ["pipeline.build", "train.run"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    out = ""
    for argv in steps:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(argv[1:])} failed:\n{done.stderr[-3000:]}"
        out = done.stdout
    run_dir = Path(out.strip().splitlines()[-1])  # the last line printed is the run folder
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["model"] == "resnet18"
    assert {"curves.png", "confusion_valid.png", "predictions_test.csv", "metrics.csv"} <= {
        p.name for p in run_dir.iterdir()}


def test_every_command_the_readme_names_answers_help():
    modules = sorted(set(re.findall(r"python -m ((?:pipeline|train)\.[a-z_.]+)", README)))
    assert {"pipeline.build", "train.run", "train.evaluate", "train.predict", "train.cv", "train.compare",
            "train.preview", "train.bench"} <= set(modules)
    for module in modules:
        done = subprocess.run([sys.executable, "-m", module.rstrip("."), "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"python -m {module} --help: {done.stderr[-2000:]}"
