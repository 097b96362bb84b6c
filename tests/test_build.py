"""The build end to end on tiny sources: format, statistics, reuse, resume, locking and bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline import parallel as parallel_mod
from pipeline import store
from pipeline.build import BuildError, BuildOptions, build, main
from pipeline.cache import main as cache_main
from pipeline.config import PreprocessConfig
from tests.helpers import REAL_SAMPLE, write_images

ROOT = Path(__file__).resolve().parents[1]


def run(source, cache_root, sizes=(16, 32), config=None, shard_size=8, jobs=1, **kw):
    options = BuildOptions(sizes=tuple(sizes), source=Path(source), cache_root=Path(cache_root), jobs=jobs,
                           progress=False, **kw)
    return build(config or PreprocessConfig(shard_size=shard_size), options)


def tree(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its mtime_ns, to show what a step did not touch."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_build_writes_the_documented_format(kaggle_source, tmp_path):
    report = run(kaggle_source, tmp_path / "cache")
    m = json.loads((report.cache_dir / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["key"] == report.key == report.cache_dir.name
    assert m["source"]["layout"] == "kaggle" and m["source"]["count"] == 28
    assert m["split"]["method"] == "patient-grouped"
    assert sum(s["count"] for s in m["splits"].values()) == 28
    assert m["skipped"] == [] and PreprocessConfig.from_dict(m["config"]) == PreprocessConfig(shard_size=8)
    for size in (16, 32):
        info = m["sizes"][str(size)]
        g = PreprocessConfig().geometry(size)
        assert (info["stored_size"], info["crop"], info["context_crop"]) == (g.stored_size, g.crop, g.context_crop)
        for split, shards in info["shards"].items():
            assert sum(s["count"] for s in shards) == m["splits"][split]["count"]
            assert all(s["count"] <= 8 for s in shards)
            for i, s in enumerate(shards):
                assert s["file"] == f"{size}/{split}-{i:05d}.h5"
                path = report.cache_dir / s["file"]
                assert store.sha256_file(path) == s["sha256"]
                with h5py.File(path) as f:
                    assert f["images"].dtype == np.uint8 and f["images"].shape[1:] == (g.stored_size,) * 2 + (3,)
                    assert f["images"].chunks == (1, g.stored_size, g.stored_size, 3)
                    assert f["images"].compression is None and f["labels"].dtype == np.int64
                    paths = f["paths"].asstr()[()]
                    assert all(p.startswith("C-NMC_Leukemia/training_data/fold_") for p in paths)
                    assert list(f["patients"].asstr()[()]) == [p.split("/")[-1].split("_")[1] for p in paths]
    table = pd.read_csv(report.cache_dir / "split.csv", dtype=str)
    assert len(table) == 28 and table.groupby("patient")["split"].nunique().max() == 1
    assert not list(report.cache_dir.rglob("*.tmp"))


def test_manifest_statistics_match_numpy_over_the_shards(kaggle_source, tmp_path):
    report = run(kaggle_source, tmp_path / "cache", sizes=(32,))
    m = store.read_manifest(report.cache_dir)
    info, g = m["sizes"]["32"], PreprocessConfig().geometry(32)
    images = np.concatenate([store.read_shard(report.cache_dir / s["file"])["images"]
                             for s in info["shards"]["train"]])
    center = images[:, g.margin:g.margin + 32, g.margin:g.margin + 32].astype(np.float64) / 255
    np.testing.assert_allclose(info["mean"], center.mean((0, 1, 2)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(info["std"], center.std((0, 1, 2)), rtol=0, atol=1e-12)
    meta = store.CacheReader(report.cache_dir).read_meta(32, "train")
    assert len(meta["labels"]) == m["splits"]["train"]["count"] == len(images)
    assert int((meta["labels"] == 1).sum()) == m["splits"]["train"]["classes"]["all"]


def test_reuse_opens_no_image_and_touches_nothing(kaggle_source, tmp_path, monkeypatch):
    first = run(kaggle_source, tmp_path / "cache")
    before = tree(first.cache_dir)

    def no_images(*args, **kwargs):
        raise AssertionError("a reused cache must not preprocess any image")
    monkeypatch.setattr(parallel_mod, "process", no_images)
    again = run(kaggle_source, tmp_path / "cache", sizes=(32,))
    assert again.reused and again.cache_dir == first.cache_dir and tree(first.cache_dir) == before


def test_reuse_from_the_command_line_prints_the_path_last(kaggle_source, tmp_path, capsys):
    args = ["--source", str(kaggle_source), "--cache-dir", str(tmp_path / "c"), "--sizes", "16", "--no-progress",
            "--shard-size", "8"]
    assert main(args) == 0
    first = capsys.readouterr().out.strip().splitlines()
    assert main(args) == 0
    second = capsys.readouterr().out.strip().splitlines()
    assert first[-1] == second[-1] and Path(second[-1]).is_dir() and "nothing to do" in second[0]


def test_an_added_size_builds_only_that_size(kaggle_source, tmp_path):
    first = run(kaggle_source, tmp_path / "cache", sizes=(16,))
    before = tree(first.cache_dir / "16")
    second = run(kaggle_source, tmp_path / "cache", sizes=(16, 32))
    assert second.cache_dir == first.cache_dir and second.sizes_built == (32,) and second.images == 28
    assert tree(first.cache_dir / "16") == before
    assert sorted(store.read_manifest(first.cache_dir)["sizes"]) == ["16", "32"]
    assert store.verify(first.cache_dir) == []


def test_a_changed_parameter_or_source_file_gives_a_new_key_and_keeps_the_old(kaggle_source, tmp_path):
    first = run(kaggle_source, tmp_path / "cache", sizes=(16,))
    before = tree(first.cache_dir)
    other = run(kaggle_source, tmp_path / "cache", sizes=(16,), config=PreprocessConfig(clahe_clip=4.0, shard_size=8))
    assert other.key != first.key and tree(first.cache_dir) == before
    img = next((kaggle_source / "C-NMC_Leukemia" / "training_data" / "fold_0" / "all").iterdir())
    img.write_bytes(img.read_bytes())  # same bytes, new mtime: the source changed as far as the key knows
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    third = run(kaggle_source, tmp_path / "cache", sizes=(16,))
    assert third.key not in (first.key, other.key) and tree(first.cache_dir) == before


def test_dataset_bytes_do_not_depend_on_jobs_or_backend(kaggle_source, tmp_path):
    a = run(kaggle_source, tmp_path / "a", sizes=(16,), jobs=1)
    b = run(kaggle_source, tmp_path / "b", sizes=(16,), jobs=2, backend="processes")
    c = run(kaggle_source, tmp_path / "c", sizes=(16,), jobs=2, backend="threads")
    sums = [{s["file"]: s["sha256"] for shards in store.read_manifest(r.cache_dir)["sizes"]["16"]["shards"].values()
             for s in shards} for r in (a, b, c)]
    assert sums[0] == sums[1] == sums[2]


def _cli(source, cache_root, *extra):
    return [sys.executable, "-m", "pipeline.build", "--source", str(source), "--cache-dir", str(cache_root),
            "--sizes", "64", "128", "--no-progress", *extra]


@pytest.fixture
def slow_source(tmp_path) -> Path:
    """Full-size images (the expensive case), enough of them for a build to be caught mid-way."""
    root = tmp_path / "slow"
    write_images(root / "all", [f"a{i}.bmp" for i in range(60)], 1, side=450, seed=3)
    write_images(root / "hem", [f"h{i}.bmp" for i in range(60)], 0, side=450, seed=4)
    return root


@pytest.mark.slow
def test_a_killed_build_leaves_nothing_complete_and_resumes(slow_source, tmp_path):
    cache_root = tmp_path / "cache"
    proc = subprocess.Popen(_cli(slow_source, cache_root, "--shard-size", "4", "--jobs", "1"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache_root.glob("*/128/*.h5"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (cache_dir,) = [p for p in cache_root.iterdir() if p.name != ".locks"]
    assert not (cache_dir / "manifest.json").exists(), "killed too late: the build had finished"
    finished = {p.name: p.stat().st_mtime_ns for p in (cache_dir / "128").glob("*.h5")}
    assert len(finished) >= 3
    result = subprocess.run(_cli(slow_source, cache_root, "--shard-size", "4", "--jobs", "1"), cwd=ROOT,
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == str(cache_dir)
    assert not list(cache_dir.rglob("*.tmp"))
    processed = int(result.stdout.split(": ")[1].split(" images")[0])
    assert processed <= 120 - 4 * (len(finished) - 1)  # finished shards were kept, not redone
    for name, mtime in finished.items():
        assert (cache_dir / "128" / name).stat().st_mtime_ns == mtime
    assert store.verify(cache_dir) == []
    clean = run(slow_source, tmp_path / "clean", sizes=(64, 128), config=PreprocessConfig(shard_size=4))
    for size in ("64", "128"):
        assert (store.read_manifest(clean.cache_dir)["sizes"][size]
                == store.read_manifest(cache_dir)["sizes"][size])  # same checksums, same statistics


@pytest.mark.slow
def test_two_concurrent_builds_build_once(slow_source, tmp_path):
    cache_root = tmp_path / "cache"
    procs = [subprocess.Popen(_cli(slow_source, cache_root, "--jobs", "1"), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lasts = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(lasts) == 1
    summaries = sorted(out.strip().splitlines()[0] for out, _ in outs)
    assert summaries[0].startswith("built sizes") and "nothing to do" in summaries[1]
    assert store.verify(Path(lasts.pop())) == []


def _bad_source(tmp_path, kind: str) -> tuple[Path, str]:
    root = tmp_path / "bad"
    write_images(root / "all", [f"a{i}.bmp" for i in range(4)], 1)
    write_images(root / "hem", [f"h{i}.bmp" for i in range(4)], 0)
    bad = root / "hem" / "h2.bmp"
    if kind == "truncated":
        bad.write_bytes(bad.read_bytes()[:500])
        reason = "truncated"
    elif kind == "empty":
        bad.write_bytes(b"")
        reason = "empty"
    elif kind == "not-an-image":
        bad.write_text("hello")
        reason = "not a readable image"
    elif kind == "grey":
        import cv2
        cv2.imwrite(str(bad), np.zeros((96, 96), np.uint8))
        reason = "3 colour channels"
    else:  # listed in labels.csv but missing on disk
        rows = [(f"all/a{i}.bmp", 1) for i in range(4)] + [(f"hem/h{i}.bmp", 0) for i in range(4)]
        pd.DataFrame(rows, columns=["Path", "label"]).to_csv(root / "labels.csv", index=False)
        bad.unlink()
        reason = "missing"
    return root, reason


@pytest.mark.parametrize("kind", ["truncated", "empty", "not-an-image", "grey", "missing"])
def test_a_bad_image_stops_the_build_naming_it_and_leaves_nothing(tmp_path, kind, capsys):
    source, reason = _bad_source(tmp_path, kind)
    cache_root = tmp_path / "cache"
    with pytest.raises(BuildError, match=rf"h2.bmp: .*{reason}.*--on-error skip"):
        run(source, cache_root, shard_size=2)
    assert [p.name for p in cache_root.iterdir() if p.name != ".locks"] == []
    assert main(["--source", str(source), "--cache-dir", str(cache_root), "--sizes", "16", "--no-progress"]) == 2
    assert "h2.bmp" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["truncated", "empty", "not-an-image", "grey", "missing"])
def test_skip_mode_leaves_the_bad_image_out_and_lists_it(tmp_path, kind):
    source, reason = _bad_source(tmp_path, kind)
    report = run(source, tmp_path / "cache", on_error="skip")
    m = store.read_manifest(report.cache_dir)
    assert [s["path"] for s in m["skipped"]] == ["hem/h2.bmp"] and reason in m["skipped"][0]["reason"]
    assert "hem/h2.bmp" in report.summary()
    assert sum(s["count"] for s in m["splits"].values()) == 7
    paths = np.concatenate([store.CacheReader(report.cache_dir).read_meta(16, s)["paths"] for s in m["splits"]])
    assert "hem/h2.bmp" not in paths and len(paths) == 7
    assert store.verify(report.cache_dir) == []
    # Adding a size keeps it out without failing on it again; a fail-mode build refuses the incomplete cache.
    assert run(source, tmp_path / "cache", sizes=(16, 32, 48), on_error="skip").sizes_built == (48,)
    with pytest.raises(BuildError, match="--on-error skip"):
        run(source, tmp_path / "cache")


def test_nothing_is_written_outside_the_cache_dir(kaggle_source, tmp_path):
    before = tree(kaggle_source)
    run(kaggle_source, tmp_path / "cache")
    assert tree(kaggle_source) == before
    assert {p.name for p in tmp_path.iterdir()} == {"kaggle", "cache"}


def test_cache_verify_names_a_shard_with_flipped_bytes(kaggle_source, tmp_path, capsys):
    report = run(kaggle_source, tmp_path / "cache", sizes=(16,))
    assert cache_main(["verify", str(report.cache_dir)]) == 0
    shard = report.cache_dir / "16" / "train-00000.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cache_main(["verify", str(report.cache_dir)]) == 1
    assert "16/train-00000.h5" in capsys.readouterr().err


def test_cache_list_shows_each_cache(kaggle_source, folder_source, tmp_path, capsys):
    run(kaggle_source, tmp_path / "cache", sizes=(16,))
    run(folder_source, tmp_path / "cache", sizes=(16, 32))
    assert cache_main(["list", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "kaggle" in out and "class-folders" in out and "sizes=[16, 32]" in out and "train=" in out


def test_cli_errors_name_the_value(tmp_path, capsys):
    assert main(["--source", str(tmp_path / "none"), "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--cache-dir", str(tmp_path / "c")]) == 2
    assert "--demo" in capsys.readouterr().err


def test_demo_source_is_deterministic_and_learnable_shape(tmp_path):
    from pipeline.demo import ensure_demo_source
    from pipeline.sources import discover
    a, b = ensure_demo_source(tmp_path / "a"), ensure_demo_source(tmp_path / "b")
    sa, sb = discover(a), discover(b)
    assert sa.layout == "kaggle" and len(sa.items) == 288 and sa.fingerprint() == sb.fingerprint()
    assert {it.label for it in sa.items} == {0, 1} and len({it.patient for it in sa.items}) == 14
    first = sorted(a.rglob("*.bmp"))[0]
    assert first.read_bytes() == (b / first.relative_to(a)).read_bytes()


@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason="../shared/data/cnmc-sample not present")
def test_real_sample_builds(tmp_path):
    report = run(REAL_SAMPLE, tmp_path / "cache", sizes=(32,), jobs=2)
    m = store.read_manifest(report.cache_dir)
    assert m["source"]["layout"] == "labels-csv" and m["source"]["count"] == 96
    assert m["split"]["method"] == "stratified-images"  # 2 `all` patients and 1 `hem` patient: too few to group
    assert sum(s["count"] for s in m["splits"].values()) == 96
    assert all(0.05 < v < 0.9 for v in m["sizes"]["32"]["mean"] + m["sizes"]["32"]["std"])
