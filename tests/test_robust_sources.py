"""Issue 10: nothing lost, nothing silently wrong - labels, preprocessing parameters and odd files."""
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.build import BuildError, BuildOptions, build, main
from pipeline.config import MAX_SIZE_PX, PreprocessConfig
from pipeline.preprocess import ImageError, preprocess_image, read_bgr
from pipeline.sources import Item, Skipped, SourceError, discover
from pipeline.split import assign_splits
from tests.helpers import cnmc_names, patient_folders, write_images


def labels_source(root: Path, labels: list, name: str = "labels.csv") -> Path:
    """A labels-csv source: one 64 px image per label, listed in order (first data row is file row 2)."""
    paths = write_images(root / "imgs", [f"c{i}.bmp" for i in range(len(labels))], 1, side=64)
    pd.DataFrame({"Path": [f"imgs/{p.name}" for p in paths], "label": labels}).to_csv(root / name, index=False)
    return root


def run_build(source, cache_root, sizes=(16,), on_error="fail", config=None):
    options = BuildOptions(sizes=tuple(sizes), source=Path(source), cache_root=Path(cache_root), jobs=1,
                           on_error=on_error, progress="off")
    return build(config or PreprocessConfig(shard_size=8), options)


# ----------------------------------------------------------------------------- A. labels


@pytest.mark.parametrize("value", ["1.7", "-0.4", "inf", "-inf", "nan", "NA", "2", "-1", "-0", "1e0", "01", "yes"])
def test_a_label_that_is_not_exactly_0_1_hem_all_names_file_row_and_value(tmp_path, value):
    labels_source(tmp_path, ["1", value, "0"])
    with pytest.raises(SourceError) as err:
        discover(tmp_path)
    message = str(err.value)
    assert f"labels.csv: row 3 has label {value!r} (image imgs/c1.bmp)" in message
    assert "0 or hem" in message and "1 or all" in message  # what is accepted


@pytest.mark.parametrize("value,label", [("0", 0), ("1", 1), (" 1 ", 1), ("hem", 0), ("ALL", 1), (" Hem ", 0),
                                         ("all", 1), ("0.0", 0), ("1.0", 1)])
def test_accepted_labels(tmp_path, value, label):
    labels_source(tmp_path, [value, "all", "hem"])
    assert [it.label for it in discover(tmp_path).items] == [label, 1, 0]


def test_float_labels_as_pandas_writes_them_are_read_exactly(tmp_path):
    labels_source(tmp_path, [1.0, 0.0, 1.0])  # a float column writes 1.0 / 0.0
    assert [it.label for it in discover(tmp_path).items] == [1, 0, 1]


def test_empty_label_in_a_labelled_list_is_an_error(tmp_path):
    labels_source(tmp_path, ["1", "", "0"])
    with pytest.raises(SourceError, match=r"labels.csv: row 3 has no label \(image imgs/c1.bmp\)"):
        discover(tmp_path)


def _csv_lists(tmp_path, train_labels, test_labels=None) -> Path:
    images = write_images(tmp_path / "imgs", cnmc_names(["1"], 4, "all") + cnmc_names(["H1"], 4, "hem"), 1,
                          side=64)
    root = tmp_path / "lists"
    root.mkdir()
    pd.DataFrame({"Path": ["../imgs/" + p.name for p in images[:3]], "label": train_labels}).to_csv(
        root / "train.csv", index=False)
    pd.DataFrame({"Path": ["../imgs/" + images[3].name], "label": ["1"]}).to_csv(root / "valid.csv", index=False)
    test = {"Path": ["../imgs/" + p.name for p in images[4:]]}
    if test_labels is not None:
        test["label"] = test_labels
    pd.DataFrame(test).to_csv(root / "final_test.csv", index=False)
    return root


def test_empty_label_in_train_csv_is_an_error_but_the_test_list_may_be_unlabelled(tmp_path):
    root = _csv_lists(tmp_path, ["1", "", "1"], ["0", "", " ", "hem"])
    with pytest.raises(SourceError, match=r"train.csv: row 3 has no label .*only the \*test\*.csv"):
        discover(root)
    pd.DataFrame({"Path": pd.read_csv(root / "train.csv")["Path"], "label": ["1", "1", "1"]}).to_csv(
        root / "train.csv", index=False)
    source = discover(root)
    assert [(it.split, it.label) for it in source.items] == [("train", 1)] * 3 + [("valid", 1)] + [
        ("test", 0), ("test", -1), ("test", -1), ("test", 0)]


def test_a_bad_label_in_the_test_list_is_still_an_error(tmp_path):
    root = _csv_lists(tmp_path, ["1", "1", "1"], ["0", "0.5", "", ""])
    with pytest.raises(SourceError, match=r"final_test.csv: row 3 has label '0.5'"):
        discover(root)


def test_kaggle_prelim_labels_are_checked(kaggle_source):
    base = kaggle_source / "C-NMC_Leukemia"
    write_images(base / "validation_data" / "C-NMC_test_prelim_phase_data", ["1.bmp", "2.bmp"], 1)
    csv = base / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv"
    pd.DataFrame({"Patient_ID": ["UID_57_29_1_all.bmp", ""], "new_names": ["1.bmp", "2.bmp"],
                  "labels": ["1", "1.7"]}).to_csv(csv, index=False)
    with pytest.raises(SourceError, match=r"prelim_phase_data_labels.csv: row 3 has label '1.7'"):
        discover(kaggle_source)
    pd.DataFrame({"Patient_ID": ["UID_57_29_1_all.bmp", ""], "new_names": ["1.bmp", "2.bmp"],
                  "labels": ["1", ""]}).to_csv(csv, index=False)
    with pytest.raises(SourceError, match=r"prelim_phase_data_labels.csv: row 3 has no label"):
        discover(kaggle_source)
    source = discover(kaggle_source, on_error="skip")  # the image of the bad row is left out, not unlabelled
    prelim = {it.path.split("/")[-1]: it for it in source.items if it.split == "prelim"}
    assert list(prelim) == ["1.bmp"] and (prelim["1.bmp"].label, prelim["1.bmp"].patient) == (1, "57")
    assert [s.path.split("/")[-1] for s in source.skipped] == ["2.bmp"]


def test_skip_leaves_bad_rows_out_and_lists_them(tmp_path):
    labels_source(tmp_path, ["1", "1.7", "", "hem"])
    source = discover(tmp_path, on_error="skip")
    assert [(it.path, it.label) for it in source.items] == [("imgs/c0.bmp", 1), ("imgs/c3.bmp", 0)]
    assert source.skipped == (Skipped("imgs/c1.bmp", "labels.csv row 3: label '1.7' is not one of 0, 1, hem, all"),
                              Skipped("imgs/c2.bmp", "labels.csv row 4: no label"))
    assert [s.as_dict() for s in source.skipped][1] == {"path": "imgs/c2.bmp", "reason": "labels.csv row 4: no label"}
    # The fingerprint covers what was left out (and stays what it was for a source without skipped rows).
    assert dataclasses.replace(source, skipped=()).fingerprint() != source.fingerprint()
    assert discover(tmp_path, on_error="skip").fingerprint() == source.fingerprint()


def test_fail_message_suggests_skip_only_to_callers_that_have_it(tmp_path):
    labels_source(tmp_path, ["1", "x"])
    with pytest.raises(SourceError) as plain:
        discover(tmp_path)
    with pytest.raises(SourceError) as failing:
        discover(tmp_path, on_error="fail")
    assert "--on-error skip" not in str(plain.value) and "--on-error skip" in str(failing.value)
    with pytest.raises(ValueError, match="on_error"):
        discover(tmp_path, on_error="ignore")


def test_every_row_needs_a_path(tmp_path):
    labels_source(tmp_path, ["1", "0"])
    (tmp_path / "labels.csv").write_text("Path,label\nimgs/c0.bmp,1\n,0\n")
    with pytest.raises(SourceError, match=r"labels.csv: row 3 has an empty Path"):
        discover(tmp_path)


def test_build_stops_on_a_bad_label_before_writing_anything(tmp_path):
    labels_source(tmp_path / "src", ["1", "-0.4"])
    with pytest.raises(BuildError, match=r"labels.csv: row 3 has label '-0.4'"):
        run_build(tmp_path / "src", tmp_path / "cache")
    assert not any(p.name != ".locks" for p in (tmp_path / "cache").glob("*"))


def test_unlabelled_images_are_never_assigned_a_split():
    items = [Item(f"a{i}.bmp", 1, "unknown", None) for i in range(4)] + [Item("x.bmp", -1, "unknown", None)]
    with pytest.raises(ValueError, match=r"1 images without a label .* x.bmp"):
        assign_splits(items, (0.75, 0.15, 0.10), 0)


# ----------------------------------------------------------------------------- B. preprocessing parameters


@pytest.mark.parametrize("field,value", [
    ("unsharp_sigma", math.inf), ("unsharp_sigma", math.nan), ("unsharp_sigma", -1.0), ("unsharp_sigma", 0.0),
    ("unsharp_sigma", 101.0), ("unsharp_strength", -0.5), ("unsharp_strength", math.inf),
    ("clahe_clip", math.nan), ("clahe_clip", 0.0), ("clahe_clip", 300.0), ("clahe_tiles", 0), ("clahe_tiles", 65),
    ("clahe_tiles", 2.5), ("crop_px", 0), ("crop_px", 451), ("reference_px", 0), ("max_rotation_deg", -1.0),
    ("max_rotation_deg", 45.0), ("max_rotation_deg", 90.0), ("max_rotation_deg", math.nan), ("split_seed", -1),
    ("shard_size", 0), ("shard_size", True), ("split_fractions", (0.5, 0.6, -0.1)),
    ("split_fractions", (0.5, 0.2, 0.2)), ("split_fractions", (math.nan, 0.5, 0.5)), ("split_fractions", (0.5, 0.5)),
])
def test_a_bad_parameter_names_its_flag_and_value(field, value):
    with pytest.raises(ValueError) as err:
        PreprocessConfig(**{field: value})
    message = str(err.value)
    assert "--" + field.replace("_", "-") in message
    shown = repr(tuple(value)) if isinstance(value, tuple) else repr(float(value) if field in (
        "unsharp_sigma", "unsharp_strength", "clahe_clip", "max_rotation_deg") else value)
    assert shown in message


def test_parameters_are_normalised_so_the_key_does_not_depend_on_their_type():
    config = PreprocessConfig(clahe_clip=3, clahe_tiles=np.int64(9), split_fractions=[0.75, 0.15, 0.10])
    assert config.digest() == PreprocessConfig().digest() and config == PreprocessConfig()
    assert type(config.clahe_tiles) is int and isinstance(config.split_fractions, tuple)
    json.dumps(config.as_dict())


def test_a_crop_that_cannot_rotate_inside_the_image_is_refused_at_once():
    with pytest.raises(ValueError, match=r"440 px crop rotated by 30 degrees .* --max-rotation-deg"):
        PreprocessConfig(crop_px=440, max_rotation_deg=30)


def test_cli_refuses_a_bad_parameter_before_reading_anything(tmp_path, capsys, folder_source):
    code = main(["--source", str(folder_source), "--cache-dir", str(tmp_path / "c"), "--sizes", "16",
                 "--unsharp-sigma", "inf", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--unsharp-sigma" in err and "inf" in err
    assert not (tmp_path / "c").exists()


def test_sizes_above_the_crop_need_allow_upscale():
    config = PreprocessConfig()
    assert config.check_sizes([224, 128, 224, 270]) == (128, 224, 270)
    with pytest.raises(ValueError, match=r"--sizes 271 is larger than the 270 px crop .*--allow-upscale"):
        config.check_sizes([128, 271])
    assert config.check_sizes([384], allow_upscale=True) == (384,)
    for bad in ([], [0], [-5], [MAX_SIZE_PX + 1], [True], [12.5]):
        with pytest.raises(ValueError, match="--sizes"):
            config.check_sizes(bad, allow_upscale=True)
    with pytest.raises(ValueError, match="--sizes"):
        config.geometry(MAX_SIZE_PX + 1)


@pytest.mark.parametrize("side,ok", [(4, False), (100, False), (187, False), (190, True), (450, True)])
def test_a_tiny_image_is_not_blown_up(side, ok):
    bgr = np.full((side, side, 3), 90, np.uint8)
    if ok:
        assert preprocess_image(bgr, PreprocessConfig(), (224,))[224].shape == (292, 292, 3)
        return
    with pytest.raises(ImageError, match=rf"image of {side}x{side} px is too small for size 224: .*at least 190 px"):
        preprocess_image(bgr, PreprocessConfig(), (224,))


def test_the_upscale_limit_is_relative_to_a_reference_image():
    # An allowed upscale (540 from a 270 crop) keeps working for reference images and for ones half again as big.
    bgr = np.full((450, 450, 3), 90, np.uint8)
    assert 540 in preprocess_image(bgr, PreprocessConfig(max_rotation_deg=0), (540,))
    with pytest.raises(ImageError, match="too small for size 540"):
        preprocess_image(bgr[:200, :200], PreprocessConfig(max_rotation_deg=0), (540,))


def test_build_names_a_tiny_image_or_skips_it(tmp_path):
    source = patient_folders(tmp_path / "src", 2, 2, side=64)
    write_images(source / "all", ["tiny_all.bmp"], 1, side=8)
    with pytest.raises(BuildError, match=r"tiny_all.bmp: image of 8x8 px is too small for size 32"):
        run_build(source, tmp_path / "cache", sizes=(16, 32))
    report = run_build(source, tmp_path / "cache", sizes=(16, 32), on_error="skip")
    assert [s["path"] for s in report.skipped] == ["all/tiny_all.bmp"]


# ----------------------------------------------------------------------------- C. odd files


def test_source_that_is_a_symlink_loop(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(SourceError, match=r"source folder .*/loop is \(or passes through\) a symbolic link loop"):
        discover(tmp_path / "loop")
    with pytest.raises(BuildError, match="symbolic link loop"):
        run_build(tmp_path / "loop", tmp_path / "cache")


def test_source_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SourceError, match="is a file, not a folder"):
        discover(tmp_path / "f")


def test_class_folder_or_fold_that_is_a_symlink_loop(tmp_path, kaggle_source):
    source = patient_folders(tmp_path / "src", 1, 1)
    for p in (source / "hem").iterdir():
        p.unlink()
    (source / "hem").rmdir()
    os.symlink("hem", source / "hem")
    with pytest.raises(SourceError, match=r"src/hem is \(or passes through\) a symbolic link loop"):
        discover(source)
    train = kaggle_source / "C-NMC_Leukemia" / "training_data"
    os.symlink("fold_9", train / "fold_9")
    with pytest.raises(SourceError, match=r"training_data/fold_9 is \(or passes through\) a symbolic link loop"):
        discover(kaggle_source)


def test_a_broken_link_as_a_class_folder_is_named(tmp_path):
    source = patient_folders(tmp_path / "src", 1, 1)
    os.rename(source / "hem", tmp_path / "elsewhere")
    os.symlink(tmp_path / "gone", source / "hem")
    with pytest.raises(SourceError, match=r"src/hem is a broken symbolic link \(to .*gone\)"):
        discover(source)


def test_labels_csv_that_is_a_symlink_loop(tmp_path):
    labels_source(tmp_path, ["1"], name="real.csv")
    os.symlink("labels.csv", tmp_path / "labels.csv")
    with pytest.raises(SourceError, match=r"labels.csv is \(or passes through\) a symbolic link loop"):
        discover(tmp_path)


@pytest.mark.parametrize("make,reason", [
    (lambda p: os.symlink(p.name, p), "symbolic link loop"),
    (lambda p: os.symlink(p.parent / "nowhere.bmp", p), "broken symbolic link"),
])
def test_an_image_link_that_leads_nowhere_is_not_lost(tmp_path, make, reason):
    source = patient_folders(tmp_path / "src", 2, 2, side=64)
    make(source / "all" / "odd_all.bmp")
    found = discover(source)
    assert "all/odd_all.bmp" in [it.path for it in found.items]  # listed, not silently dropped
    assert len(found.fingerprint()) == 64
    with pytest.raises(ImageError, match=reason):
        read_bgr(source / "all" / "odd_all.bmp")
    with pytest.raises(BuildError, match=rf"odd_all.bmp: {reason}"):
        run_build(source, tmp_path / "cache")
    report = run_build(source, tmp_path / "cache", on_error="skip")
    assert report.skipped == [{"path": "all/odd_all.bmp", "reason": report.skipped[0]["reason"]}]
    assert reason in report.skipped[0]["reason"]


def test_a_listed_image_that_is_a_symlink_loop(tmp_path):
    labels_source(tmp_path / "src", ["1", "0"])
    (tmp_path / "src" / "imgs" / "c1.bmp").unlink()
    os.symlink("c1.bmp", tmp_path / "src" / "imgs" / "c1.bmp")
    assert len(discover(tmp_path / "src").fingerprint()) == 64  # no raw OSError from stat
    with pytest.raises(BuildError, match=r"imgs/c1.bmp: symbolic link loop"):
        run_build(tmp_path / "src", tmp_path / "cache")


def _non_utf8_file(folder: Path, like: Path) -> bytes:
    """Copy `like` to folder/b'bad\\xff_all.bmp'; skip the test where the filesystem refuses such a name."""
    name = os.fsencode(folder) + b"/bad\xff_all.bmp"
    try:
        with open(name, "wb") as f:
            f.write(like.read_bytes())
    except (OSError, UnicodeError) as err:
        pytest.skip(f"this filesystem refuses a non-UTF-8 file name ({err})")
    return name


def test_a_file_name_that_is_not_utf8_is_named(tmp_path):
    source = patient_folders(tmp_path / "src", 2, 2, side=64)
    _non_utf8_file(source / "all", source / "all" / "UID_1_0_1_all.bmp")
    with pytest.raises(SourceError) as err:
        discover(source)
    assert "all/bad\\xff_all.bmp" in str(err.value) and "not valid UTF-8" in str(err.value)
    with pytest.raises(BuildError, match=r"bad\\xff_all.bmp"):  # today's build: a clear error, not a crash
        run_build(source, tmp_path / "cache")
    skipped = discover(source, on_error="skip")
    assert len(skipped.items) == 14 and all("bad" not in it.path for it in skipped.items)
    assert skipped.skipped == (Skipped("all/bad\\xff_all.bmp", "file name is not valid UTF-8"),)
    assert len(skipped.fingerprint()) == 64


def test_an_image_with_a_non_utf8_name_can_still_be_read(tmp_path):
    write_images(tmp_path, ["ok.bmp"], 1, side=64)
    name = _non_utf8_file(tmp_path, tmp_path / "ok.bmp")
    np.testing.assert_array_equal(read_bgr(os.fsdecode(name)), read_bgr(tmp_path / "ok.bmp"))
