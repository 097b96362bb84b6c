"""The cache manifest's writer and reader (pipeline.manifest): what one writes the other reads back, anything else is
refused by name, and a failed write never leaves a manifest that looks complete."""
import errno
import json
import os
import pathlib
from pathlib import Path

import pytest

from pipeline import manifest as mf
from pipeline import store
from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.sources import CLASS_NAMES, Item, Source

# The manifest's fields in the order they have always been written (existing caches hold exactly these).
FIELDS = ["format_version", "key", "created", "config", "classes", "source", "split", "splits", "sizes", "skipped"]


def small_manifest(root: Path, created: str | None = None) -> dict:
    config = PreprocessConfig()
    source = Source(root, "class-folders", (Item("all/a.bmp", 1, "1", None), Item("hem/h.bmp", 0, "H1", None)), ())
    shards = {"train": [{"file": "32/train-00000.h5", "count": 2, "sha256": "0" * 64, "bytes": 1234}]}
    sizes = {str(s): mf.size_entry(geometry=config.geometry(s), mean=[0.5] * 3, std=[0.25] * 3, shards=shards)
             for s in (64, 32)}
    return mf.make_manifest(key="0123456789abcdef", config=config, classes=CLASS_NAMES, source=source,
                            split={"method": "given"}, splits={"train": {"count": 2, "classes": {"hem": 1, "all": 1}}},
                            sizes=sizes, skipped=[], created=created)


def test_a_written_manifest_reads_back_equal_with_its_fields_in_order(tmp_path):
    manifest = small_manifest(tmp_path)
    path = mf.write_manifest(tmp_path, manifest)
    assert path == tmp_path / mf.MANIFEST
    assert mf.read_manifest(tmp_path) == manifest
    on_disk = json.loads(path.read_text())
    assert list(on_disk) == FIELDS
    assert list(on_disk["sizes"]) == ["32", "64"]  # sizes in increasing order, whatever order they were given in
    assert list(on_disk["sizes"]["32"]) == ["stored_size", "crop", "context_crop", "mean", "std", "shards"]
    assert on_disk["source"] == {"root": str(tmp_path), "fingerprint": on_disk["source"]["fingerprint"],
                                 "layout": "class-folders", "count": 2}
    assert small_manifest(tmp_path, created="2024-01-02T03:04:05+00:00")["created"] == "2024-01-02T03:04:05+00:00"


def test_a_built_cache_manifest_round_trips_unchanged(kaggle_source, tmp_path):
    report = build(PreprocessConfig(shard_size=8), BuildOptions(sizes=(16,), source=kaggle_source,
                                                                cache_root=tmp_path / "cache", jobs=1, progress="off"))
    text = (report.cache_dir / mf.MANIFEST).read_text()
    manifest = mf.read_manifest(report.cache_dir)
    assert list(manifest) == FIELDS
    copy = tmp_path / "copy"
    copy.mkdir()
    mf.write_manifest(copy, manifest)
    assert (copy / mf.MANIFEST).read_text() == text  # the same bytes: the writer adds, drops or reorders nothing


def test_the_store_names_are_the_manifest_module_names():
    """Callers in train/ import these from pipeline.store; they must be the manifest module's own objects."""
    assert (store.MANIFEST, store.read_manifest, store.CacheError, store.ManifestError) == (
        mf.MANIFEST, mf.read_manifest, mf.CacheError, mf.ManifestError)


# ----------------------------------------------------------------------------- refused by name


def refused(cache_dir: Path) -> mf.ManifestError:
    with pytest.raises(mf.ManifestError) as err:
        mf.read_manifest(cache_dir)
    path = cache_dir / mf.MANIFEST
    assert err.value.path == path
    message = str(err.value)
    assert message.startswith(f"{path}: {err.value.problem}. ")
    assert f"python -m pipeline.cache rm {cache_dir.name}" in message and "python -m pipeline.build" in message
    return err.value


@pytest.mark.parametrize("field", mf.REQUIRED_FIELDS)
def test_a_manifest_without_a_required_field_is_refused_naming_it(tmp_path, field):
    manifest = small_manifest(tmp_path)
    del manifest[field]
    (tmp_path / mf.MANIFEST).write_text(json.dumps(manifest))
    assert refused(tmp_path).problem == f"is not a cache manifest: it lacks {field}"


def test_a_truncated_manifest_is_refused_as_invalid_json(tmp_path):
    text = json.dumps(small_manifest(tmp_path), indent=2)
    (tmp_path / mf.MANIFEST).write_text(text[:len(text) // 2])
    assert refused(tmp_path).problem.startswith("is not valid JSON (")


@pytest.mark.parametrize("damage, problem", [
    (lambda m: m.update(format_version=m["format_version"] + 1), "is cache format"),
    (lambda m: m["source"].pop("root"), "has no source root"),
    (lambda m: m.update(skipped={}), "has a config, splits, sizes or skipped entry of the wrong type"),
    (lambda m: m["sizes"]["32"]["shards"]["train"][0].pop("sha256"), "has a malformed entry for size '32'"),
    (lambda m: m["sizes"].update(big=m["sizes"]["32"]), "has a malformed entry for size 'big'"),
])
def test_a_manifest_with_a_bad_value_is_refused_naming_the_problem(tmp_path, damage, problem):
    manifest = small_manifest(tmp_path)
    damage(manifest)
    (tmp_path / mf.MANIFEST).write_text(json.dumps(manifest))
    assert refused(tmp_path).problem.startswith(problem)


def test_no_manifest_is_an_incomplete_cache_not_a_damaged_one(tmp_path):
    with pytest.raises(mf.CacheError, match="no manifest.json; it is not a complete cache") as err:
        mf.read_manifest(tmp_path)
    assert not isinstance(err.value, mf.ManifestError)


def test_the_writer_refuses_what_the_reader_would_refuse(tmp_path):
    manifest = small_manifest(tmp_path)
    del manifest["sizes"]
    with pytest.raises(ValueError, match="refusing to write a cache manifest that is not a cache manifest: it lacks "
                                         "sizes"):
        mf.write_manifest(tmp_path, manifest)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- atomic


def disk_full_halfway(monkeypatch):
    """Every text write stops halfway through with ENOSPC, as on a full disk."""
    def write_text(self, data, *args, **kwargs):
        with open(self, "w") as f:
            f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def fsync_fails(monkeypatch):
    """The bytes are all written, but flushing them to the disk fails (an I/O error)."""
    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("fail", [disk_full_halfway, fsync_fails])
def test_a_failed_first_write_leaves_no_manifest(tmp_path, monkeypatch, fail):
    manifest = small_manifest(tmp_path)
    fail(monkeypatch)
    with pytest.raises(OSError):
        mf.write_manifest(tmp_path, manifest)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # neither a manifest nor its temporary file
    with pytest.raises(mf.CacheError, match="not a complete cache"):
        mf.read_manifest(tmp_path)


@pytest.mark.parametrize("fail", [disk_full_halfway, fsync_fails])
def test_a_failed_rewrite_keeps_the_previous_manifest_whole(tmp_path, monkeypatch, fail):
    before = small_manifest(tmp_path)
    mf.write_manifest(tmp_path, before)
    after = {**before, "skipped": [{"path": "all/a.bmp", "reason": "unreadable"}]}
    fail(monkeypatch)
    with pytest.raises(OSError):
        mf.write_manifest(tmp_path, after)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [mf.MANIFEST]
    assert mf.read_manifest(tmp_path) == before
