"""Every fault in and around a cache folder gets a clear answer (issue 17, the pipeline's part): bad normalisation
numbers, key-named links and files, lock files left behind, absurd --older-than values, a cache root that is a file or
cannot be read, two prunes at once, a removal that fails halfway. No traceback, no silent wrong answer."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import housekeeping, manifest as mf
from pipeline.build import BuildError, BuildOptions, build, key_lock
from pipeline.build import main as build_main
from pipeline.cache import main
from pipeline.config import PreprocessConfig
from tests.helpers import patient_folders

ROOT = Path(__file__).resolve().parents[1]
OTHER = "00000000deadbeef"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """One complete cache, built once for the module; tests copy it (`fresh_root`)."""
    tmp = tmp_path_factory.mktemp("built")
    patient_folders(tmp / "src", all_images=3, hem_images=3, side=48)
    report = build(PreprocessConfig(), BuildOptions(sizes=(16,), source=tmp / "src", cache_root=tmp / "cache",
                                                    jobs=1, progress="off"))
    return report.cache_dir


@pytest.fixture
def root(built, tmp_path) -> Path:
    """A cache root holding a copy of the built cache (its lock file too) and a second, older one under OTHER."""
    cache_root = tmp_path / "cache"
    shutil.copytree(built.parent, cache_root, symlinks=True)
    copy_cache(cache_root / built.name, OTHER, created="2026-01-01T00:00:00+00:00")
    return cache_root


def copy_cache(src: Path, key: str, created: str | None = None, root: Path | None = None) -> Path:
    dst = (root or src.parent) / key
    shutil.copytree(src, dst)
    edit_manifest(dst, lambda m: m.update(key=key, **({"created": created} if created else {})))
    return dst


def edit_manifest(cache_dir: Path, change) -> None:
    path = cache_dir / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


def newest(root: Path) -> Path:
    (path,) = [p for p in root.iterdir() if housekeeping.KEY.match(p.name) and p.name != OTHER and p.is_dir()
               and not p.is_symlink()]
    return path


def locks_of(root: Path) -> set[str]:
    return {p.stem for p in (root / ".locks").glob("*.lock")} if (root / ".locks").is_dir() else set()


# ----------------------------------------------------------------------------- 2/16: normalisation numbers


@pytest.mark.parametrize("field, value", [
    ("mean", [0.3, 0.4]), ("mean", [0.3, float("nan"), 0.4]), ("mean", [0.3, 1e39, 0.4]), ("mean", "0.3"),
    ("std", [0.2, 0.0, 0.2]), ("std", [0.2, -0.1, 0.2]), ("std", [0.2, float("inf"), 0.2]), ("std", [0.2, True, 0.2]),
    ("std", None),
])
def test_a_manifest_with_unusable_normalisation_is_refused_naming_size_field_and_value(root, field, value):
    cache = newest(root)
    edit_manifest(cache, lambda m: m["sizes"]["16"].update({field: value}))
    with pytest.raises(mf.ManifestError) as err:
        mf.read_manifest(cache)
    assert err.value.path == cache / "manifest.json"
    assert err.value.problem.startswith(f"has a bad normalisation for size 16: {field} is {value!r}, not three finite")
    assert "build it again with python -m pipeline.build" in str(err.value)


def test_check_normalisation_names_where_the_field_and_the_value():
    mf.check_normalisation([0.3, 0.3, 0.3], (0.2, 0.25, 0.2), "x")  # lists or tuples of three finite numbers
    with pytest.raises(ValueError, match=r"^runs/r1/config.json, size 224: std is \[0.2, 0.0, 0.2\], not three finite "
                                         r"numbers > 0 \(one per RGB channel\); train again$"):
        mf.check_normalisation([0.3] * 3, [0.2, 0.0, 0.2], "runs/r1/config.json, size 224", fix="train again")
    assert mf.normalisation_problem([0.3] * 3, [0.2] * 2) == "std is [0.2, 0.2], not three finite numbers > 0 " \
                                                             "(one per RGB channel)"


def test_cache_list_shows_a_two_value_mean_as_damaged_and_training_refuses_it(root, tmp_path, capsys):
    cache = newest(root)
    edit_manifest(cache, lambda m: m["sizes"]["16"].update(mean=[0.3, 0.4]))
    assert main(["list", "--cache-dir", str(root)]) == 0
    assert f"{cache.name}  DAMAGED ({cache}/manifest.json: has a bad normalisation for size 16: mean is [0.3, 0.4]" \
        in capsys.readouterr().out
    from train.run import main as train_main
    assert train_main(["resnet18", "--cache", str(cache), "--stages", "16:1", "--device", "cpu",
                       "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "mean is [0.3, 0.4]" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_build_of_blank_images_is_refused_before_a_cache_with_std_0_exists(tmp_path):
    source = tmp_path / "blank"
    for cls, patients in (("all", ["1", "2", "3", "4"]), ("hem", ["H1", "H2", "H3"])):
        (source / cls).mkdir(parents=True)
        for p in patients:
            for k in range(2):  # every pixel black: no variation in any channel
                assert cv2.imwrite(str(source / cls / f"UID_{p}_{k}_1_{cls}.bmp"), np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(BuildError, match=r"size 16: the train split's channel statistics cannot normalise images "
                                         r"\(std is \[0.0, 0.0, 0.0\], .*blank or of a single colour; nothing was "
                                         r"cached"):
        build(PreprocessConfig(), BuildOptions(sizes=(16,), source=source, cache_root=tmp_path / "cache", jobs=1,
                                               progress="off"))
    assert not any(housekeeping.KEY.match(p.name) for p in (tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------- 6/14: key-named links


@pytest.fixture
def linked(root, tmp_path):
    """root plus two key-named links: to a cache in another cache root, and to a folder that is no cache."""
    elsewhere = copy_cache(newest(root), "1111111111111111", root=tmp_path / "elsewhere")
    (tmp_path / "not-a-cache").mkdir()
    (tmp_path / "not-a-cache" / "precious.txt").write_text("keep me")
    (root / "0123456789abcdef").symlink_to(elsewhere)
    (root / "fedcba9876543210").symlink_to(tmp_path / "not-a-cache")
    return root, elsewhere


def test_list_names_a_key_link_and_does_not_list_the_cache_behind_it(linked, capsys):
    root, elsewhere = linked
    assert main(["list", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "1111111111111111" not in out.replace(str(elsewhere), "")  # the linked cache is not listed as ours
    assert f"0123456789abcdef  not listed: a symbolic link (to {elsewhere}), not a cache folder: left alone" in out
    assert "fedcba9876543210  not listed: a symbolic link" in out
    assert "2 cache(s);" in out


@pytest.mark.parametrize("flags", [["--keep-newest", "0"], ["--incomplete"], ["--incomplete", "--older-than", "0"]])
def test_prune_names_links_first_and_never_follows_locks_or_removes_them(linked, tmp_path, capsys, flags,
                                                                        monkeypatch):
    root, elsewhere = linked
    assert main(["prune", *flags, "--dry-run", "--cache-dir", str(root)]) == 0
    dry = capsys.readouterr()
    assert "0123456789abcdef" not in dry.out and "fedcba9876543210" not in dry.out  # never promised
    planned = housekeeping.execute
    named_first = []

    def execute(*args, **kwargs):  # what was printed before the first removal
        named_first.append(capsys.readouterr().err)
        return planned(*args, **kwargs)
    monkeypatch.setattr(housekeeping, "execute", execute)
    assert main(["prune", *flags, "--cache-dir", str(root)]) == 0
    capsys.readouterr()  # the removals' report, not asserted here
    for name, target in (("0123456789abcdef", elsewhere), ("fedcba9876543210", tmp_path / "not-a-cache")):
        assert f"left {root / name}: a symbolic link (to {target}), not a cache folder: left alone" in named_first[0]
        assert (root / name).is_symlink() and name not in locks_of(root)
    assert (elsewhere / "manifest.json").is_file() and (tmp_path / "not-a-cache" / "precious.txt").is_file()


def test_rm_refuses_a_key_link_by_key_or_by_path(linked, capsys):
    root, elsewhere = linked
    for target in ("0123456789abcdef", str(root / "0123456789abcdef")):
        assert main(["rm", target, "--cache-dir", str(root)]) == 2
        assert f"a symbolic link (to {elsewhere}), not a cache folder; rm never follows or removes links" in \
            capsys.readouterr().err
    assert (root / "0123456789abcdef").is_symlink() and (elsewhere / "manifest.json").is_file()


# ----------------------------------------------------------------------------- 7: lock files of removed caches


def test_rm_and_prune_remove_the_lock_file_of_what_they_removed(root, capsys):
    cache = newest(root)
    with key_lock(root, OTHER):
        pass  # as the build that made it would have
    assert {cache.name, OTHER} <= locks_of(root)
    assert main(["rm", cache.name, "--cache-dir", str(root)]) == 0
    assert cache.name not in locks_of(root) and OTHER in locks_of(root)
    assert main(["prune", "--keep-newest", "0", "--cache-dir", str(root)]) == 0
    assert locks_of(root) == set()
    capsys.readouterr()
    assert main(["prune", "--incomplete", "--dry-run", "--cache-dir", str(root)]) == 0
    assert "stale lock" not in capsys.readouterr().out


def test_prune_incomplete_counts_the_lock_with_its_folder_not_twice(root, capsys):
    (root / "0000000000000001" / "16").mkdir(parents=True)  # a build killed before its manifest
    with key_lock(root, "0000000000000001"):
        pass
    assert main(["prune", "--incomplete", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "removed incomplete cache" in out and ".locks/0000000000000001.lock" not in out
    assert "0000000000000001" not in locks_of(root)


def test_a_lock_file_deleted_while_a_build_waits_on_it_still_excludes(tmp_path):
    """The remover deletes the lock file it holds while a build waits on it: the waiting build must end up holding
    the lock that the path names, so that a third process cannot take it beside it."""
    root = tmp_path / "cache"
    key = "0123456789abcdef"
    lock = root / ".locks" / f"{key}.lock"
    with key_lock(root, key):  # the remover
        got, release = threading.Event(), threading.Event()

        def waiting_build():
            with key_lock(root, key):
                got.set()
                release.wait(10)

        thread = threading.Thread(target=waiting_build)
        thread.start()
        time.sleep(0.3)  # the build has opened the lock file and waits on it
        lock.unlink()
    assert got.wait(10)
    try:
        import fcntl
        with open(lock, "a") as f:  # a third process: the lock the path names is held
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        release.set()
        thread.join(10)


# ----------------------------------------------------------------------------- 15: --older-than


@pytest.mark.parametrize("days", ["inf", "-inf", "nan"])
def test_older_than_refuses_values_that_are_no_number_of_days(root, capsys, days):
    assert main(["prune", f"--older-than={days}", "--cache-dir", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --older-than must be a finite number of days >= 0, got {float(days)}")
    assert (root / OTHER / "manifest.json").is_file()


@pytest.mark.parametrize("days", ["1e9", "1e300"])
def test_a_huge_older_than_removes_nothing(root, capsys, days):
    assert main(["prune", "--older-than", days, "--cache-dir", str(root)]) == 0
    assert "freed 0.0 MiB (0 bytes) in 0 item(s)" in capsys.readouterr().out
    assert (root / OTHER / "manifest.json").is_file()
    assert main(["prune", "--older-than", "30", "--cache-dir", str(root)]) == 0
    assert not (root / OTHER).exists()


# ----------------------------------------------------------------------------- own faults: odd cache roots and keys


@pytest.mark.parametrize("command", [["list"], ["prune", "--incomplete"], ["rm", OTHER]])
def test_a_file_given_as_the_cache_dir_is_named(tmp_path, capsys, command):
    (tmp_path / "afile").write_text("x")
    assert main([*command, "--cache-dir", str(tmp_path / "afile")]) == 2
    assert f"error: {tmp_path / 'afile'}: not a folder; --cache-dir names the folder that holds the caches" in \
        capsys.readouterr().err


def test_a_missing_cache_dir_lists_as_none_yet_and_prune_refuses_it(tmp_path, capsys):
    assert main(["list", "--cache-dir", str(tmp_path / "nope")]) == 0
    assert f"no cache folder {tmp_path / 'nope'} yet" in capsys.readouterr().out
    assert main(["prune", "--incomplete", "--cache-dir", str(tmp_path / "nope")]) == 2
    assert "no such cache folder" in capsys.readouterr().err


@pytest.mark.parametrize("demo", [True, False])
def test_build_names_a_file_given_as_the_cache_dir(built, tmp_path, capsys, demo):
    (tmp_path / "afile").write_text("x")
    source = ["--demo"] if demo else ["--source", str(built.parents[1] / "src")]
    assert build_main([*source, "--sizes", "16", "--cache-dir", str(tmp_path / "afile"), "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert f"error: --cache-dir {tmp_path / 'afile'} is a file (or a broken link), not a folder; nothing was built" \
        in err
    assert (tmp_path / "afile").read_text() == "x"


def test_a_file_where_a_cache_folder_belongs_is_named_by_build_list_prune_and_rm(built, tmp_path, capsys):
    root = tmp_path / "cache"
    root.mkdir()
    (root / built.name).write_text("not a cache")
    options = BuildOptions(sizes=(16,), source=built.parents[1] / "src", cache_root=root, jobs=1, progress="off")
    with pytest.raises(BuildError, match=rf"{root / built.name}: a file \(or a broken link\) where the folder of "
                                         rf"cache {built.name} belongs; nothing was built"):
        build(PreprocessConfig(), options)
    assert main(["list", "--cache-dir", str(root)]) == 0
    assert f"{built.name}  not listed: a file, not a cache folder: left alone" in capsys.readouterr().out
    assert main(["prune", "--incomplete", "--cache-dir", str(root)]) == 0
    assert f"left {root / built.name}: a file, not a cache folder" in capsys.readouterr().err
    assert main(["rm", built.name, "--cache-dir", str(root)]) == 2
    assert f"{built.name}: a file, not a cache folder; nothing was removed" in capsys.readouterr().err
    assert (root / built.name).read_text() == "not a cache"


def test_a_renamed_cache_folder_is_listed_under_its_folder_name(root, capsys):
    cache = newest(root)
    edit_manifest(root / OTHER, lambda m: m.update(key=cache.name))  # a copy that kept its original's manifest
    assert main(["list", "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{cache.name}  ") == 1
    assert f"{OTHER}  " in out and f"(its manifest names key '{cache.name}': a renamed or copied folder" in out


def test_verify_names_a_missing_folder_and_points_from_the_root_to_a_cache(root, capsys):
    assert main(["verify", str(root / "nope")]) == 2
    assert f"error: {root / 'nope'}: no such folder" in capsys.readouterr().err
    assert main(["verify", str(root)]) == 2
    assert "verify takes one cache folder, such as " in capsys.readouterr().err


@pytest.mark.parametrize("damage, problem", [
    (lambda m: m.update(created=5), "has no usable creation time (created: 5"),
    (lambda m: m["source"].pop("layout"), "has no source layout"),
    (lambda m: m["splits"].update(train=5), "has a malformed entry for split 'train'"),
    (lambda m: m["splits"]["train"].update(count=-1), "has a malformed entry for split 'train'"),
    (lambda m: m["sizes"]["16"].update(stored_size=-3), "has a malformed entry for size '16'"),
    (lambda m: m["sizes"]["16"]["shards"]["train"][0].update(count=-1), "has a malformed entry for size '16'"),
    (lambda m: m.update(classes=7), "has classes 7, not a list of class names"),
])
def test_list_and_prune_agree_on_a_manifest_with_a_bad_value(root, capsys, damage, problem):
    """Before: `list` showed these DAMAGED (or died on created=5) while prune --keep-newest removed them as caches."""
    edit_manifest(root / OTHER, damage)
    assert main(["list", "--cache-dir", str(root)]) == 0
    assert f"{OTHER}  DAMAGED ({root / OTHER}/manifest.json: {problem}" in capsys.readouterr().out
    assert main(["prune", "--keep-newest", "0", "--cache-dir", str(root)]) == 0
    assert (root / OTHER).is_dir()  # not a complete cache: prune --incomplete removes it
    assert main(["prune", "--incomplete", "--cache-dir", str(root)]) == 0
    assert f"removed damaged cache {root / OTHER}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- own faults: two prunes, failures


def _race(monkeypatch, then):
    """Make the next plan_prune call run `then()` after planning, as a second command would between the two."""
    planned = housekeeping.plan_prune

    def plan_then(*args, **kwargs):
        monkeypatch.setattr(housekeeping, "plan_prune", planned)
        result = planned(*args, **kwargs)
        then()
        return result
    monkeypatch.setattr(housekeeping, "plan_prune", plan_then)


def test_two_prunes_at_once_remove_each_thing_once(root, monkeypatch, capsys):
    (root / "0000000000000001").mkdir()
    _race(monkeypatch, lambda: main(["prune", "--incomplete", "--keep-newest", "0", "--cache-dir", str(root)]))
    assert main(["prune", "--incomplete", "--keep-newest", "0", "--cache-dir", str(root)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count(f"removed cache {root / OTHER} ") == 1  # by the second prune, not claimed twice
    assert f"cache {root / OTHER}: already gone (removed by another rm or prune while this one ran)" in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("freed 0.0 MiB (0 bytes) in 0 item(s)")
    assert locks_of(root) == set() and not any(housekeeping.KEY.match(p.name) for p in root.iterdir())


def test_a_folder_another_prune_is_removing_is_reported_gone_not_left_to_a_build(root, capsys):
    """Two prunes at once: the second finds the first holding a key's lock while it removes that folder."""
    holding = threading.Event()

    def other_prune():
        with key_lock(root, OTHER):
            holding.set()
            time.sleep(0.5)
            shutil.rmtree(root / OTHER)
    thread = threading.Thread(target=other_prune)
    thread.start()
    assert holding.wait(10)
    try:
        assert main(["prune", "--keep-newest", "1", "--cache-dir", str(root)]) == 0
    finally:
        thread.join(10)
    err = capsys.readouterr().err
    assert f"cache {root / OTHER}: already gone" in err and "holds its lock" not in err


def test_a_folder_a_build_completes_after_planning_is_not_pruned(root, monkeypatch, capsys):
    pending = root / "0000000000000001"
    pending.mkdir()
    _race(monkeypatch, lambda: (pending.rmdir(), copy_cache(root / OTHER, pending.name)))
    assert main(["prune", "--incomplete", "--cache-dir", str(root)]) == 1
    assert f"left {pending}: incomplete cache: a build finished it since it was planned: left alone" in \
        capsys.readouterr().err
    assert (pending / "manifest.json").is_file()


def test_a_removal_that_fails_halfway_is_named_and_leaves_no_complete_looking_cache(root, monkeypatch, capsys):
    def broken_rmtree(path, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(Path(path) / "16"))
    monkeypatch.setattr(housekeeping.shutil, "rmtree", broken_rmtree)
    assert main(["rm", OTHER, "--cache-dir", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"left {root / OTHER}: cache: removing it failed (Input/output error: {root / OTHER / '16'}); what is " \
           f"left has no manifest (an incomplete cache): fix the cause and run prune --incomplete" in err
    assert not (root / OTHER / "manifest.json").exists() and OTHER in locks_of(root)


# ----------------------------------------------------------------------------- own faults: permissions


def _unprivileged() -> list[str]:
    """A command prefix under which file permissions apply (root is exempt: it runs without the capabilities that
    override them); skips the test where that cannot be had."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if not shutil.which("setpriv") or subprocess.run([*prefix, "true"], capture_output=True).returncode:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return prefix


def _cache_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*_unprivileged(), sys.executable, "-m", "pipeline.cache", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("locked", ["folder", "manifest"])
def test_a_cache_this_user_cannot_read_is_listed_as_unreadable_and_never_pruned(root, locked):
    target = root / OTHER / "manifest.json" if locked == "manifest" else root / OTHER
    target.chmod(0)
    try:
        listed = _cache_cli("list", "--cache-dir", str(root))
        assert listed.returncode == 0 and f"{OTHER}  UNREADABLE ({target}: cannot be read (Permission denied)" in \
            listed.stdout
        pruned = _cache_cli("prune", "--incomplete", "--keep-newest", "0", "--cache-dir", str(root))
        assert pruned.returncode == 1 and "Traceback" not in pruned.stderr
        assert f"left {root / OTHER}: cannot be read by this user: left alone" in pruned.stderr
    finally:
        target.chmod(0o755)
    assert (root / OTHER / "manifest.json").is_file()


def test_a_cache_this_user_cannot_remove_is_named_and_nothing_of_it_is_removed(root):
    (root / OTHER / "16").chmod(0o555)
    try:
        removed = _cache_cli("rm", OTHER, "--cache-dir", str(root))
    finally:
        (root / OTHER / "16").chmod(0o755)
    assert removed.returncode == 1 and "Traceback" not in removed.stderr
    assert f"left {root / OTHER}: cache: cannot be removed: {root / OTHER / '16'} is not writable by this user" in \
        removed.stderr
    assert (root / OTHER / "manifest.json").is_file()


def test_a_root_this_user_cannot_list_is_an_error_not_an_empty_list(root):
    root.chmod(0)
    try:
        listed = _cache_cli("list", "--cache-dir", str(root))
    finally:
        root.chmod(0o755)
    assert listed.returncode == 2 and f"error: {root}: cannot be listed (Permission denied)" in listed.stderr


def test_a_build_does_not_replace_a_cache_whose_manifest_this_user_cannot_read(root, built):
    cache = newest(root)  # the very cache this build would make
    (cache / "manifest.json").chmod(0)
    try:
        result = subprocess.run([*_unprivileged(), sys.executable, "-m", "pipeline.build", "--source",
                                 str(built.parents[1] / "src"), "--sizes", "16", "--cache-dir", str(root),
                                 "--progress", "off"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        (cache / "manifest.json").chmod(0o644)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {cache / 'manifest.json'}: cannot be read (Permission denied); the cache may be whole" in \
        result.stderr
    assert mf.read_manifest(cache)["key"] == cache.name  # not removed and built again


def test_a_file_where_the_lock_folder_belongs_is_named_by_rm_and_build(root, built, capsys):
    shutil.rmtree(root / ".locks")
    (root / ".locks").write_text("x")
    message = f"{root / '.locks'}: a file (or a broken link) where the folder of the caches' build locks belongs"
    assert main(["rm", OTHER, "--cache-dir", str(root)]) == 2
    assert f"error: {message}" in capsys.readouterr().err and (root / OTHER / "manifest.json").is_file()
    assert build_main(["--source", str(built.parents[1] / "src"), "--sizes", "24", "--cache-dir", str(root),
                       "--progress", "off"]) == 2
    assert f"error: {message}" in capsys.readouterr().err
