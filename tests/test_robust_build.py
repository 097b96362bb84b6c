"""Issue 10: nothing lost, nothing silently wrong - damaged caches, empty builds, exit codes, full or read-only disks,
damaged manifests and bounded build memory."""
import errno
import json
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from pipeline import build as build_mod
from pipeline import checksums
from pipeline import locks as locks_mod
from pipeline import parallel as parallel_mod
from pipeline import store
from pipeline.build import BuildError, BuildOptions, StorageError, build, main
from pipeline.cache import main as cache_main
from pipeline.config import PreprocessConfig
from tests.helpers import write_images

ROOT = Path(__file__).resolve().parents[1]


def run(source, cache_root, sizes=(16,), shard_size=4, jobs=1, **kw):
    options = BuildOptions(sizes=tuple(sizes), source=Path(source), cache_root=Path(cache_root), jobs=jobs,
                           progress="off", **kw)
    return build(PreprocessConfig(shard_size=shard_size), options)


def flip(path: Path, offset: int) -> None:
    """Invert one byte in place (size unchanged: only a checksum can tell)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def image_offset(path: Path) -> int:
    with h5py.File(path) as f:
        return f["images"].id.get_chunk_info(0).byte_offset + 100


def labels_offset(path: Path) -> int:
    with h5py.File(path) as f:
        return f["labels"].id.get_offset()


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*.h5")}


def python_command(command: str) -> list[str]:
    """A printed `python -m ...` command, run with this interpreter."""
    args = shlex.split(command)
    assert args[0] == "python"
    return [sys.executable, *args[1:]]


@pytest.fixture
def cache(kaggle_source, tmp_path) -> Path:
    """A complete cache of the 28-image Kaggle source, size 16, shards of 4: train 3 shards, valid and test 2."""
    return run(kaggle_source, tmp_path / "cache").cache_dir


# ----------------------------------------------------------------------------- 1. damaged shards


@pytest.mark.parametrize("when", ["made", "read"])
@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_training_reads_stop_at_a_flipped_image_byte_naming_the_shard(cache, mode, when):
    from train.data.loader import CacheLoader
    shard = cache / "16" / "train-00001.h5"
    with pytest.raises(store.CacheError) as err:
        if when == "made":
            flip(shard, image_offset(shard))
        loader = CacheLoader(cache, 16, "train", 4, mode=mode, memory_budget_bytes=10**5)
        if when == "read":  # changed after the loader checked it: the read checks again
            flip(shard, image_offset(shard))
        list(loader)
    message = str(err.value)
    assert f"{shard}: shard differs from its sha256" in message
    assert "python -m pipeline.build --source" in message and "--verify" in message
    assert "train-00000.h5" not in message  # only the damaged one is named


def test_flipped_labels_and_damaged_headers_and_deleted_shards_give_the_same_named_error(cache):
    reader = store.CacheReader(cache)
    labels, header, deleted = (cache / "16" / f"train-0000{i}.h5" for i in range(3))
    flip(labels, labels_offset(labels))
    with pytest.raises(store.CacheError, match=r"train-00000.h5: shard differs from its sha256"):
        reader.read_meta(16, "train")
    header.write_bytes(b"\0" * 8 + header.read_bytes()[8:])
    deleted.unlink()
    with pytest.raises(store.CacheError) as err:
        store.CacheReader(cache).read_images_into(16, "train", np.empty((12, 22, 22, 3), np.uint8))
    message = str(err.value)
    assert f"{header}: shard differs" in message and f"{deleted}: shard is missing" in message
    assert "signature" not in message and "Unable to" not in message  # no raw h5py text


def test_each_shard_is_hashed_once_per_process(cache, monkeypatch):
    from train.data.loader import CacheLoader
    calls = []
    real = checksums.sha256_file
    monkeypatch.setattr(checksums, "sha256_file", lambda path, *a: calls.append(Path(path).name) or real(path, *a))
    checksums._checked.clear()
    for _ in range(2):
        loader = CacheLoader(cache, 16, "train", 4, mode="streaming", memory_budget_bytes=10**5)
        for _ in range(2):  # two epochs
            list(loader)
    n_shards = len(store.CacheReader(cache).shards(16, "train"))
    assert sorted(calls) == sorted(set(calls)) and len(calls) == n_shards


def test_the_printed_command_repairs_the_cache_in_place(kaggle_source, tmp_path):
    options = BuildOptions(sizes=(16, 32), source=kaggle_source, cache_root=tmp_path / "cache", jobs=1,
                           progress="off")
    cache_dir = build(PreprocessConfig(shard_size=4, clahe_clip=2.5), options).cache_dir
    before = store.read_manifest(cache_dir)
    shard = cache_dir / "32" / "train-00000.h5"
    flip(shard, image_offset(shard))
    with pytest.raises(store.CacheError) as err:
        store.CacheReader(cache_dir).read_meta(32, "train")
    command = str(err.value).splitlines()[-1].strip()
    assert "--clahe-clip 2.5 --shard-size 4" in command and "--sizes 32 " in command  # what makes the key
    untouched = {k: v for k, v in mtimes(cache_dir).items() if k != "32/train-00000.h5"}
    result = subprocess.run(python_command(command) + ["--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(cache_dir.resolve())
    assert "rebuilt 1 missing or damaged shard(s): 32/train-00000.h5" in result.stdout
    assert {k: v for k, v in mtimes(cache_dir).items() if k != "32/train-00000.h5"} == untouched
    assert store.read_manifest(cache_dir)["sizes"] == before["sizes"]  # same bytes as the first build
    assert store.verify(cache_dir) == []
    store.CacheReader(cache_dir).read_meta(32, "train")


def test_build_repairs_missing_or_resized_shards_without_verify_and_changed_ones_with_it(cache, kaggle_source,
                                                                                        tmp_path):
    missing, truncated, flipped = (cache / "16" / f"train-0000{i}.h5" for i in range(3))
    sums = {p.name: store.sha256_file(p) for p in (missing, truncated, flipped)}
    flip(flipped, image_offset(flipped))
    assert run(kaggle_source, tmp_path / "cache").reused  # a stat cannot see a flipped byte ...
    report = run(kaggle_source, tmp_path / "cache", verify=True)  # ... the checksum pass can
    assert report.repaired == ("16/train-00002.h5",) and report.images == 4
    assert "rebuilt damaged shards of cache" in report.summary()
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[:-10])
    flip(flipped, image_offset(flipped))
    report = run(kaggle_source, tmp_path / "cache")  # a stat sees these two; then every shard is hashed
    assert not report.reused and report.images == 12
    assert report.repaired == ("16/train-00000.h5", "16/train-00001.h5", "16/train-00002.h5")
    assert {p.name: store.sha256_file(p) for p in (missing, truncated, flipped)} == sums  # the same bytes again
    assert run(kaggle_source, tmp_path / "cache", verify=True).reused
    assert store.verify(cache) == []


def test_cache_verify_prints_the_repair_command(cache, capsys):
    (cache / "16" / "valid-00000.h5").unlink()
    assert cache_main(["verify", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "valid-00000.h5: is missing" in err and "python -m pipeline.build --source" in err


@pytest.mark.slow
def test_a_training_run_on_a_damaged_cache_exits_2_naming_the_shard(cache, tmp_path):
    shard = cache / "16" / "train-00000.h5"
    flip(shard, image_offset(shard))
    result = subprocess.run([sys.executable, "-m", "train.run", "resnet18", "--stages", "16:1", "--batch-size", "4",
                             "--device", "cpu", "--no-progress", "--cache", str(cache), "--out",
                             str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert f"{shard}: shard differs from its sha256" in result.stderr and "Traceback" not in result.stderr
    assert "python -m pipeline.build --source" in result.stderr


# ----------------------------------------------------------------------------- 2. empty builds


def bad_images(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).write_text("not an image")


def test_a_build_that_keeps_no_image_is_an_error_and_leaves_nothing(folder_source, tmp_path, capsys):
    bad_images(folder_source, [f"all/a{i}.bmp" for i in range(8)] + [f"hem/h{i}.bmp" for i in range(6)])
    with pytest.raises(BuildError, match=r"no usable image: all 14 source images were left out \(\w+/\w+.bmp: not a"):
        run(folder_source, tmp_path / "cache", on_error="skip")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".locks"]
    assert main(["--source", str(folder_source), "--cache-dir", str(tmp_path / "cache"), "--sizes", "16",
                 "--on-error", "skip", "--no-progress"]) == 2
    assert "no usable image" in capsys.readouterr().err


def test_a_class_emptied_by_skipped_images_is_an_error(folder_source, tmp_path):
    bad_images(folder_source, [f"hem/h{i}.bmp" for i in range(6)])
    with pytest.raises(BuildError, match=r"class hem would be empty: all its 6 images were left out"):
        run(folder_source, tmp_path / "cache", on_error="skip")
    assert not list((tmp_path / "cache").glob("*/manifest.json"))


def test_a_split_emptied_by_skipped_images_is_an_error(tmp_path):
    images = write_images(tmp_path / "imgs", [f"UID_1_{i}_1_all.bmp" for i in range(4)], 1)
    images += write_images(tmp_path / "imgs", [f"UID_H1_{i}_1_hem.bmp" for i in range(4)], 0)
    root = tmp_path / "lists"
    root.mkdir()
    rows = [(f"../imgs/{p.name}", int("_all" in p.name)) for p in images]
    pd.DataFrame(rows[:3] + rows[4:7], columns=["Path", "label"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame([rows[3], rows[7]], columns=["Path", "label"]).to_csv(root / "valid.csv", index=False)
    bad_images(tmp_path / "imgs", [images[3].name, images[7].name])
    with pytest.raises(BuildError, match=r"split valid would be empty: all its 2 images were left out"):
        run(root, tmp_path / "cache", on_error="skip")


# ----------------------------------------------------------------------------- 3. exit code after a bad image


@pytest.fixture
def bad_image_source(tmp_path) -> Path:
    """Full-size images (each worker is inside OpenCV when the bad one is reached), one unreadable near the start."""
    root = tmp_path / "bad"
    write_images(root / "all", [f"a{i}.bmp" for i in range(30)], 1, side=450, seed=1)
    write_images(root / "hem", [f"h{i}.bmp" for i in range(30)], 0, side=450, seed=2)
    (root / "hem" / "h2.bmp").write_text("hello")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["threads", "processes"])
def test_a_bad_image_exits_2_every_time_without_an_abort(bad_image_source, tmp_path, backend):
    runs = 5 if backend == "threads" else 2
    for i in range(runs):
        result = subprocess.run([sys.executable, "-m", "pipeline.build", "--source", str(bad_image_source),
                                 "--cache-dir", str(tmp_path / f"c{i}"), "--sizes", "64", "128", "--no-progress",
                                 "--backend", backend], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (i, result.returncode, result.stderr)
        assert "terminate called" not in result.stderr and "h2.bmp: not a readable image" in result.stderr
        assert "UserWarning" not in result.stderr  # no "tasks ... executed but not used" from joblib


def test_closing_the_results_early_waits_for_running_tasks_and_starts_no_more(monkeypatch):
    active, started = [0], [0]
    lock = threading.Lock()

    def slow(path, config, sizes):
        with lock:
            active[0] += 1
            started[0] += 1
        time.sleep(0.02)
        with lock:
            active[0] -= 1
        return True, path

    monkeypatch.setattr(parallel_mod, "process", slow)
    outputs = parallel_mod.results([(str(i), (16,)) for i in range(200)], None, "threads", 2, window=100)
    assert [next(outputs)[1] for _ in range(3)] == ["0", "1", "2"]
    outputs.close()
    assert active[0] == 0 and started[0] <= 3 + 2 * 2 + 2  # consumed + joblib's pre-dispatch, not the window


# ----------------------------------------------------------------------------- 4. full disk


def test_too_little_free_space_stops_before_any_image_is_read(kaggle_source, tmp_path, monkeypatch, capsys):
    Usage = type(shutil.disk_usage(tmp_path))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 5000, 5000))
    monkeypatch.setattr(parallel_mod, "process", lambda *a: pytest.fail("no image may be read"))
    with pytest.raises(StorageError) as err:
        run(kaggle_source, tmp_path / "cache", sizes=(16, 32))
    message = str(err.value)
    assert "not enough free space" in message and f"{tmp_path / 'cache'} has 0 MiB free" in message
    assert "56 stored images in 14 shards" in message  # 28 images x 2 sizes
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".locks"]
    assert main(["--source", str(kaggle_source), "--cache-dir", str(tmp_path / "cache"), "--sizes", "16",
                 "--no-progress"]) == 2
    assert "not enough free space" in capsys.readouterr().err


def test_disk_full_while_writing_removes_the_temporary_shard_and_a_rerun_resumes(kaggle_source, tmp_path,
                                                                               monkeypatch, capsys):
    closes = []
    real_close = store.ShardWriter.close

    def close_until_full(self):
        closes.append(self.rel)
        if len(closes) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))
        return real_close(self)

    monkeypatch.setattr(store.ShardWriter, "close", close_until_full)
    args = ["--source", str(kaggle_source), "--cache-dir", str(tmp_path / "cache"), "--sizes", "16",
            "--shard-size", "4", "--jobs", "1", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "train-00002.h5.tmp" in err and "run the same command again" in err
    (cache_dir,) = [p for p in (tmp_path / "cache").iterdir() if p.name != ".locks"]
    assert not list(cache_dir.rglob("*.tmp")) and not (cache_dir / "manifest.json").exists()
    assert sorted(mtimes(cache_dir)) == ["16/train-00000.h5", "16/train-00001.h5"]  # finished shards stay
    monkeypatch.setattr(store.ShardWriter, "close", real_close)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "built sizes [16]" in out and ": 20 images in" in out  # 28 - 2 kept shards of 4
    assert store.verify(cache_dir) == []


def _mount(kind: str, target: Path, *options: str) -> bool:
    cmd = ["mount", *(["-t", "tmpfs", "tmpfs"] if kind == "tmpfs" else []), *options, str(target)]
    try:
        return subprocess.run(cmd, capture_output=True).returncode == 0
    except OSError:
        return False


def _umount(target: Path) -> None:
    subprocess.run(["umount", str(target)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs (needs root or CAP_SYS_ADMIN; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount("tmpfs", disk, "-o", "size=6m"):
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    _umount(disk)


def test_a_real_full_disk(small_disk, tmp_path, capsys):
    source = tmp_path / "src"
    write_images(source / "all", [f"a{i}.bmp" for i in range(32)], 1, seed=1)
    write_images(source / "hem", [f"h{i}.bmp" for i in range(32)], 0, seed=2)
    args = ["--source", str(source), "--cache-dir", str(small_disk), "--sizes", "96", "--shard-size", "4",
            "--jobs", "1", "--no-progress"]  # 64 x 126 x 126 x 3: 3.0 MiB of pixels
    assert main(args + ["--sizes", "96", "112"]) == 2  # 7 MiB: refused before it starts
    assert "not enough free space" in capsys.readouterr().err
    (small_disk / "filler").write_bytes(b"\0" * (4 * 2**20))  # the disk fills up after the check
    result = subprocess.run([sys.executable, "-c", "import shutil, sys; from pipeline.build import main; "
                             "usage = type(shutil.disk_usage('/')); shutil.disk_usage = lambda p: usage(2**40, 0, "
                             f"2**40); sys.exit(main({args!r}))"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr  # not a crash of HDF5 at exit
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    (cache_dir,) = [p for p in small_disk.iterdir() if p.name not in (".locks", "filler")]
    finished = mtimes(cache_dir)
    assert finished and not list(cache_dir.rglob("*.tmp"))
    (small_disk / "filler").unlink()
    assert main(args) == 0
    assert ": 64 images" not in capsys.readouterr().out  # resumed
    assert all(mtimes(cache_dir)[k] == v for k, v in finished.items()) and store.verify(cache_dir) == []


# ----------------------------------------------------------------------------- 5. read-only cache folder


def test_an_unwritable_cache_folder_is_named_with_what_to_do(kaggle_source, tmp_path, monkeypatch, capsys):
    args = ["--source", str(kaggle_source), "--cache-dir", str(tmp_path / "cache"), "--sizes", "16",
            "--shard-size", "4", "--no-progress"]
    assert main(args) == 0

    def read_only(path, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(locks_mod, "open", read_only, raising=False)  # the lock file is the first thing written
    assert main(args) == 0  # a complete cache is reused without writing
    assert main(args[:-3] + ["32", "--shard-size", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write in the cache folder {tmp_path / 'cache'}: Read-only file system" in err
    assert "--cache-dir PATH on a writable disk" in err


def test_a_read_only_mount(kaggle_source, tmp_path):
    writable, mounted = tmp_path / "rw", tmp_path / "ro"
    mounted.mkdir()
    run(kaggle_source, writable)
    if not (_mount("bind", mounted, "--bind", str(writable)) and
            _mount("bind", mounted, "-o", "remount,ro,bind")):
        _umount(mounted)
        pytest.skip("cannot make a read-only bind mount here")
    try:
        cli = [sys.executable, "-m", "pipeline.build", "--source", str(kaggle_source), "--cache-dir", str(mounted),
               "--shard-size", "4", "--no-progress", "--sizes"]
        reuse = subprocess.run(cli + ["16"], cwd=ROOT, capture_output=True, text=True)
        assert reuse.returncode == 0 and "nothing to do" in reuse.stdout
        for extra in (["16", "32"], ["16", "--clahe-clip", "2"]):  # a new size, a new key
            result = subprocess.run(cli + extra, cwd=ROOT, capture_output=True, text=True)
            assert result.returncode == 2 and "Traceback" not in result.stderr
            assert f"cannot write in the cache folder {mounted}: Read-only file system" in result.stderr
    finally:
        _umount(mounted)


# ----------------------------------------------------------------------------- 6. damaged manifest.json


def damage(manifest: Path, kind: str) -> None:
    if kind == "folder":
        manifest.unlink()
        manifest.mkdir()
    else:
        manifest.write_text({"invalid-json": '{"key": "0123', "empty-object": "{}",
                             "foreign-json": '{"name": "left-pad", "version": "1.3.0"}', "list": "[1, 2]",
                             "other-format": json.dumps({**json.loads(manifest.read_text()), "format_version": 99})
                             }[kind])


KINDS = ["invalid-json", "empty-object", "foreign-json", "list", "folder", "other-format"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_manifest_is_a_named_cache_error_everywhere(cache, kind, capsys):
    manifest = cache / "manifest.json"
    damage(manifest, kind)
    with pytest.raises(store.CacheError) as err:
        store.CacheReader(cache)
    message = str(err.value)
    assert message.startswith(f"{manifest}: ") and f"python -m pipeline.cache rm {cache.name}" in message
    assert "python -m pipeline.build" in message
    assert cache_main(["verify", str(cache)]) == 2
    assert str(manifest) in capsys.readouterr().err
    assert cache_main(["list", "--cache-dir", str(cache.parent)]) == 0
    out = capsys.readouterr().out
    assert f"{cache.name}  DAMAGED ({manifest}: " in out and out.count(str(manifest)) == 1


def test_prune_incomplete_removes_a_damaged_cache(cache, capsys):
    damage(cache / "manifest.json", "invalid-json")
    assert cache_main(["prune", "--incomplete", "--dry-run", "--cache-dir", str(cache.parent)]) == 0
    assert f"would remove damaged cache {cache} (" in capsys.readouterr().out and cache.is_dir()
    assert cache_main(["prune", "--incomplete", "--cache-dir", str(cache.parent)]) == 0
    assert f"removed damaged cache {cache} (" in capsys.readouterr().out and not cache.exists()


@pytest.mark.parametrize("kind", ["invalid-json", "folder", "foreign-json"])
def test_a_build_of_a_key_with_a_damaged_manifest_builds_it_again(cache, kaggle_source, tmp_path, kind,
                                                                   monkeypatch):
    damage(cache / "manifest.json", kind)
    warnings = []
    monkeypatch.setattr(build_mod.log, "warning", lambda message, *args: warnings.append(message % args))
    report = run(kaggle_source, tmp_path / "cache")
    assert not report.reused and report.cache_dir == cache and report.images == 28
    assert store.verify(cache) == []
    assert warnings == [f"{cache / 'manifest.json'}: {warnings[0].split(': ', 1)[1]}"]
    assert warnings[0].endswith(f"; removing {cache} and building it again")


# ----------------------------------------------------------------------------- 7. bounded build memory


def test_channel_counts_are_exact_past_2_to_the_24_pixels():
    side = 4097  # 16,785,409 pixels: float32 counts would round to an even number
    hist = store.channel_histograms(np.zeros((side, side, 3), np.uint8))
    assert hist.dtype == np.int64 and hist[:, 0].tolist() == [side * side] * 3 and hist[:, 1:].sum() == 0
    small = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    expected = np.stack([np.bincount(small[:, :, c].ravel(), minlength=256) for c in range(3)])
    np.testing.assert_array_equal(store.channel_histograms(small), expected)


def test_large_images_are_buffered_one_at_a_time(tmp_path, monkeypatch):
    s = 40
    monkeypatch.setattr(store, "WRITE_BUFFER_BYTES", 3 * s * s * 3 + 5)
    writer = store.ShardWriter(tmp_path, 32, "train", 0, s, 8)
    assert writer.batch == 3 and writer.buffer.shape == (3, s, s, 3)
    images = np.random.default_rng(1).integers(0, 256, (8, s, s, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        writer.add(image, 1, f"p{i}", "x")
    result = writer.close()
    np.testing.assert_array_equal(store.read_shard(tmp_path / result.file)["images"], images)
    huge = store.ShardWriter(tmp_path, 32, "train", 1, 5000, 2)  # 75 MB per image: never more than one buffered
    assert huge.batch == 1
    huge.abort()
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_window_of_results_is_bounded_by_bytes():
    assert parallel_mod.window_for(338 * 2**10, 2) == (parallel_mod.MAX_WINDOW, 2)  # 128 + 224 px: unchanged
    window, jobs = parallel_mod.window_for(127 * 2**20, 16)  # 6,500 px stored images on a 16-core machine
    assert window == 4 and jobs == 4 and window * 127 * 2**20 <= parallel_mod.RESULT_BUDGET_BYTES
    assert parallel_mod.window_for(2 * parallel_mod.RESULT_BUDGET_BYTES, 8) == (1, 1)


def test_results_never_run_more_than_a_window_ahead_of_a_slow_writer(monkeypatch):
    produced = [0]
    lock = threading.Lock()

    def instant(path, config, sizes):
        with lock:
            produced[0] += 1
        return True, path

    monkeypatch.setattr(parallel_mod, "process", instant)
    ahead = []
    for i, (ok, path) in enumerate(parallel_mod.results([(str(i), (16,)) for i in range(64)], None,
                                                               "threads", 2, window=8)):
        assert path == str(i)
        time.sleep(0.003)  # the writer is the slow side
        ahead.append(produced[0] - (i + 1))
    assert max(ahead) <= 8 - 1


def test_a_tight_memory_budget_writes_the_same_bytes(kaggle_source, tmp_path, monkeypatch):
    default = run(kaggle_source, tmp_path / "a", sizes=(16, 32), jobs=2)
    g = PreprocessConfig().geometry(32).stored_size
    monkeypatch.setattr(parallel_mod, "RESULT_BUDGET_BYTES", 3 * g * g * 3)  # 3 images in flight, 2 workers
    monkeypatch.setattr(store, "WRITE_BUFFER_BYTES", 1)  # one image per write
    tight = run(kaggle_source, tmp_path / "b", sizes=(16, 32), jobs=2)
    assert store.read_manifest(tight.cache_dir)["sizes"] == store.read_manifest(default.cache_dir)["sizes"]


def test_bad_label_rows_are_skipped_and_listed_or_stop_the_build(tmp_path, capsys):
    """sources.discover(on_error=) wired through the build: a bad labels.csv row is left out and listed with
    --on-error skip (and in the manifest), and names the row otherwise."""
    build_main = main
    root = tmp_path / "src"
    rows = []
    for label, cls in ((1, "all"), (0, "hem")):
        for path in write_images(root / cls, [f"UID_{p}_{i}_1_{cls}.bmp" for p in ("1", "2", "3") for i in range(2)],
                                 label, side=48):
            rows.append(f"{cls}/{path.name},{label}")
    rows[0] = rows[0].rsplit(",", 1)[0] + ",1.7"
    (root / "labels.csv").write_text("Path,label\n" + "\n".join(rows) + "\n")
    args = ["--source", str(root), "--cache-dir", str(tmp_path / "c"), "--sizes", "16", "--no-progress", "--jobs", "1"]
    assert build_main(args) == 2
    assert "row 2 has label '1.7'" in capsys.readouterr().err
    assert build_main(args + ["--on-error", "skip"]) == 0
    cache_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert [s["path"] for s in manifest["skipped"]] == [rows[0].split(",")[0]]
    assert sum(info["count"] for info in manifest["splits"].values()) == len(rows) - 1
    assert build_main(["--demo", "--sizes", "300", "--cache-dir", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "--allow-upscale" in capsys.readouterr().err


@pytest.mark.parametrize("jobs", ["0", "-1000"])
def test_jobs_without_a_meaning_are_refused_by_name(tmp_path, capsys, jobs):
    assert main(["--demo", "--sizes", "16", "--cache-dir", str(tmp_path / "c"), "--no-progress", "--jobs", jobs]) == 2
    assert "--jobs must be a number of workers >= 1, or -1 for all cores" in capsys.readouterr().err
    assert not list((tmp_path / "c").glob("[0-9a-f]" * 16))
