"""Past one machine and past memory: the Dask build, two torchrun nodes, bounded streaming memory."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline import store
from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.demo import write_synthetic_source
from train.bench.scale import measure_loader
from train.evaluation.evaluator import evaluate_run

ROOT = Path(__file__).resolve().parents[1]


def shard_sums(cache_dir: Path) -> dict:
    m = store.read_manifest(cache_dir)
    return {s["file"]: s["sha256"] for info in m["sizes"].values() for shards in info["shards"].values()
            for s in shards}


@pytest.mark.slow
def test_the_dask_build_writes_the_same_bytes_as_the_default_backend(kaggle_source, tmp_path):
    pytest.importorskip("distributed", reason="the cluster extra is not installed: pip install -e '.[cluster]'")
    config = PreprocessConfig(shard_size=8)
    a = build(config, BuildOptions(sizes=(16, 32), source=kaggle_source, cache_root=tmp_path / "threads", jobs=2,
                                   progress=False))
    b = build(config, BuildOptions(sizes=(16, 32), source=kaggle_source, cache_root=tmp_path / "dask", jobs=2,
                                   backend="dask", progress=False))
    assert a.key == b.key and len(shard_sums(a.cache_dir)) == 8
    assert shard_sums(a.cache_dir) == shard_sums(b.cache_dir)
    assert store.verify(b.cache_dir) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_train_and_agree_with_one_process(tmp_path):
    source = write_synthetic_source(tmp_path / "src", 120, image_px=64)
    cache = build(PreprocessConfig(), BuildOptions(sizes=(16,), source=source, cache_root=tmp_path / "cache",
                                                   jobs=1, progress=False)).cache_dir
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
         "--rdzv_id", "cnmc-test", "-m", "train.run", "resnet18", "--stages", "16:1", "--batch-size", "8",
         "--device", "cpu", "--no-progress", "--cache", str(cache), "--out", str(tmp_path / "runs")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outs = [a.communicate(timeout=300) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [e[-2000:] for _, e in outs]
    printed = [o.strip().splitlines()[-1] for o, _ in outs if o.strip()]
    assert len(printed) == 1  # only global rank 0 prints (and writes)
    run_dir = Path(printed[0])
    assert json.loads((run_dir / "config.json").read_text())["world_size"] == 2
    two_nodes = json.loads((run_dir / "summary.json").read_text())
    preds = pd.read_csv(run_dir / "predictions_test.csv")
    one = evaluate_run(run_dir, device="cpu")
    assert one["splits"] == two_nodes["splits"]
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "predictions_test.csv"), preds)


@pytest.mark.slow
def test_streaming_memory_stays_within_budget_on_a_cache_many_times_larger(tmp_path):
    source = write_synthetic_source(tmp_path / "src", 3000, image_px=96)
    cache = build(PreprocessConfig(), BuildOptions(sizes=(64,), source=source, cache_root=tmp_path / "cache",
                                                   progress=False)).cache_dir
    reader = store.CacheReader(cache)
    train_bytes = sum(p.stat().st_size for p in reader.shard_paths(64, "train"))
    budget = 4 * 2**20
    assert train_bytes > 10 * budget
    streaming = measure_loader(cache, 64, "streaming", budget)
    resident = measure_loader(cache, 64, "resident", None)
    assert streaming["mode"] == "streaming" and resident["mode"] == "resident"
    assert streaming["images"] == resident["images"] > 2000
    constant = 16 * 2**20  # batches, one open file, allocator slack: measured ~7 MiB at 4k and 16k images
    assert streaming["peak_rss_above_baseline"] < budget + constant
    assert resident["peak_rss_above_baseline"] > 0.8 * train_bytes  # the measurement does see a split in memory


def test_the_measuring_child_runs_from_the_repository_root():
    from train.bench import scale
    assert (scale.REPO_ROOT / "train" / "bench" / "scale.py").is_file()  # the old parents[1] was train/
