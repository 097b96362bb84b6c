"""pipeline.cache rm / prune / list: remove exactly what they list, only inside the cache root, never a locked key."""
import json
from pathlib import Path

import pytest

from pipeline.build import BuildOptions, build, key_lock
from pipeline.cache import main
from pipeline.config import PreprocessConfig
from tests.helpers import patient_folders


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def caches(tmp_path):
    """Two complete caches (older, newer), an incomplete folder, a temporary shard, a non-cache folder."""
    patient_folders(tmp_path / "src", all_images=3, hem_images=3, side=48)
    root = tmp_path / "cache"
    made = []
    for seed in (1, 2):
        report = build(PreprocessConfig(split_seed=seed), BuildOptions(sizes=(16,), source=tmp_path / "src",
                                                                       cache_root=root, jobs=1, progress="off"))
        made.append(report.cache_dir)
    older, newer = made
    manifest = json.loads((older / "manifest.json").read_text())
    manifest["created"] = "2026-01-01T00:00:00+00:00"  # months before the other
    (older / "manifest.json").write_text(json.dumps(manifest))
    (root / "00000000deadbeef").mkdir()  # a build killed before its manifest
    (root / "00000000deadbeef" / "16").mkdir()
    (root / "00000000deadbeef" / "16" / "train-00000.h5.tmp").write_bytes(b"x" * 1000)
    (newer / "16" / "valid-00009.h5.tmp").write_bytes(b"y" * 10)
    (root / "demo-source").mkdir()  # not a cache: never touched
    (root / "demo-source" / "a.bmp").write_bytes(b"z")
    return root, older, newer


def _removed_lines(out: str) -> list[str]:
    return [line.split(" (")[0] for line in out.splitlines() if line.startswith(("removed", "would remove"))]


def test_dry_run_lists_exactly_what_prune_removes(caches, capsys):
    root, older, newer = caches
    before = _tree(root)
    assert main(["prune", "--incomplete", "--keep-newest", "1", "--dry-run", "--cache-dir", str(root)]) == 0
    planned = [line.replace("would remove", "removed") for line in _removed_lines(capsys.readouterr().out)]
    assert _tree(root) == before  # a dry run removes nothing
    assert main(["prune", "--incomplete", "--keep-newest", "1", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert _removed_lines(out) == planned
    assert f"removed cache {older}" in out and "removed incomplete cache" in out
    assert not older.exists() and not (root / "00000000deadbeef").exists()
    assert newer.is_dir() and not list(newer.rglob("*.tmp")) and (newer / "manifest.json").is_file()
    assert (root / "demo-source" / "a.bmp").is_file()
    freed = int(out.splitlines()[-1].split("(")[1].split(" bytes")[0])
    assert freed > 1010  # the older cache plus both temporary files


def test_older_than_keeps_recent_caches(caches, capsys):
    root, older, newer = caches
    assert main(["prune", "--older-than", "30", "--cache-dir", str(root)]) == 0
    assert not older.exists() and newer.is_dir()
    assert main(["prune", "--cache-dir", str(root)]) == 2  # no selection given: refused
    assert "nothing to prune" in capsys.readouterr().err


def test_rm_by_key_or_path_only_inside_the_cache_dir(caches, tmp_path, capsys):
    root, older, newer = caches
    outside = tmp_path / "precious"
    outside.mkdir()
    for target in [str(outside), str(root), str(root / "demo-source"), "../precious", str(tmp_path / "src")]:
        assert main(["rm", target, "--cache-dir", str(root)]) == 2
        assert "not a cache folder inside" in capsys.readouterr().err
    assert main(["rm", newer.name, str(older), "--cache-dir", str(root), "--dry-run"]) == 0
    assert older.is_dir() and newer.is_dir()
    # one bad target among good ones: nothing is removed
    assert main(["rm", newer.name, str(outside), "--cache-dir", str(root)]) == 2 and newer.is_dir()
    assert main(["rm", newer.name, str(older), "--cache-dir", str(root)]) == 0
    assert not older.exists() and not newer.exists() and outside.is_dir()


def test_a_cache_whose_build_holds_the_lock_is_left_alone(caches, capsys):
    root, older, newer = caches
    with key_lock(root, "00000000deadbeef"), key_lock(root, older.name):  # as two running builds hold them
        assert main(["prune", "--incomplete", "--older-than", "0", "--cache-dir", str(root)]) == 1
        assert main(["rm", older.name, "--cache-dir", str(root)]) == 1
        err = capsys.readouterr().err
        assert (root / "00000000deadbeef").is_dir() and older.is_dir()
        assert "a running build holds its lock" in err
    assert not newer.exists()  # not locked: pruned


def test_list_shows_the_total_and_survives_a_damaged_manifest(caches, capsys):
    root, older, newer = caches
    (older / "manifest.json").write_text("{not json")
    assert main(["list", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{older.name}  DAMAGED" in out and newer.name in out and "manifest.json" in out
    assert "2 cache(s);" in out and "MiB in all" in out
