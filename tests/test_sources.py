import pandas as pd
import pytest

from pipeline.sources import SourceError, detect_layout, discover, patient_of
from tests.helpers import REAL_SAMPLE, cnmc_names, write_images


@pytest.mark.parametrize("name,patient", [
    ("UID_11_10_1_all.bmp", "11"), ("UID_H10_43_1_hem.bmp", "H10"), ("cell_7.bmp", "unknown"),
    ("fold_0/all/UID_2_1_1_all.bmp", "2"),
])
def test_patient_ids(name, patient):
    assert patient_of(name) == patient


def test_kaggle_layout_with_prelim_and_final(kaggle_source):
    base = kaggle_source / "C-NMC_Leukemia"
    prelim = base / "validation_data" / "C-NMC_test_prelim_phase_data"
    write_images(prelim, ["1.bmp", "2.bmp"], 1)
    pd.DataFrame({"Patient_ID": ["UID_57_29_1_all.bmp", "UID_H30_6_hem.bmp"], "new_names": ["1.bmp", "2.bmp"],
                  "labels": [1, 0]}).to_csv(base / "validation_data" / "C-NMC_test_prelim_phase_data_labels.csv",
                                            index=False)
    write_images(base / "testing_data" / "C-NMC_test_final_phase_data", ["1.bmp", "2.bmp", "3.bmp"], 0)
    source = discover(kaggle_source)
    assert source.layout == "kaggle"
    train = [it for it in source.items if it.split is None]
    assert len(train) == 28 and {it.label for it in train} == {0, 1}
    assert {it.patient for it in train} == {"1", "2", "3", "4", "H1", "H2", "H3"}
    prelim_items = {it.path.split("/")[-1]: it for it in source.items if it.split == "prelim"}
    assert (prelim_items["1.bmp"].label, prelim_items["1.bmp"].patient) == (1, "57")
    assert (prelim_items["2.bmp"].label, prelim_items["2.bmp"].patient) == (0, "H30")
    final = [it for it in source.items if it.split == "final"]
    assert len(final) == 3 and all(it.label == -1 for it in final)
    assert "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data_labels.csv" in source.label_files


def test_csv_lists_keep_their_split_and_accept_absolute_paths(tmp_path):
    images = write_images(tmp_path / "imgs", cnmc_names(["1"], 3, "all") + cnmc_names(["H1"], 3, "hem"), 1)
    root = tmp_path / "lists"
    root.mkdir()
    pd.DataFrame({"Path": [str(p) for p in images[:4]], "label": [1, 1, 1, 0]}).to_csv(root / "train.csv",
                                                                                      index=False)
    pd.DataFrame({"Path": ["../imgs/" + images[4].name], "label": [0]}).to_csv(root / "valid.csv", index=False)
    pd.DataFrame({"Path": ["../imgs/" + images[5].name]}).to_csv(root / "resnet18_test.csv", index=False)
    source = discover(root)
    assert source.layout == "csv-lists"
    assert [it.split for it in source.items] == ["train"] * 4 + ["valid", "test"]
    assert [it.label for it in source.items] == [1, 1, 1, 0, 0, -1]
    assert source.items[0].path == "../imgs/UID_1_1_1_all.bmp"
    assert source.has_split


def test_csv_list_with_a_bad_label_names_file_and_row(tmp_path):
    write_images(tmp_path / "all", ["a.bmp"], 1)
    pd.DataFrame({"Path": ["all/a.bmp"], "label": ["maybe"]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(SourceError, match=r"labels.csv: row 2 has label 'maybe'"):
        discover(tmp_path)


def test_labels_csv_and_class_folders(folder_source):
    source = discover(folder_source)
    assert source.layout == "class-folders" and len(source.items) == 14
    assert sum(it.label for it in source.items) == 8
    pd.DataFrame({"Path": ["all/a0.bmp", "hem/h0.bmp"], "label": [1, 0]}).to_csv(folder_source / "labels.csv",
                                                                                index=False)
    source = discover(folder_source)
    assert source.layout == "labels-csv" and [it.label for it in source.items] == [1, 0]


def test_unknown_layout_lists_the_expected_ones(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(SourceError) as err:
        discover(tmp_path)
    for layout in ("kaggle", "csv-lists", "labels-csv", "class-folders"):
        assert layout in str(err.value)


def test_missing_source_folder(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        discover(tmp_path / "nope")


def test_fingerprint_follows_bytes_and_mtimes(folder_source):
    before = discover(folder_source).fingerprint()
    assert discover(folder_source).fingerprint() == before
    path = folder_source / "all" / "a0.bmp"
    st = path.stat()
    import os
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert discover(folder_source).fingerprint() != before


def _layouts(tmp_path, kaggle_source, folder_source) -> dict:
    """One folder of each layout, and folders that match several (the first in discover's order must win)."""
    lists = tmp_path / "lists"
    write_images(lists / "imgs", ["a.bmp", "h.bmp"], 1)
    for name, path in (("train.csv", "imgs/a.bmp"), ("valid.csv", "imgs/h.bmp")):
        pd.DataFrame({"Path": [path], "label": [1]}).to_csv(lists / name, index=False)
    labelled = tmp_path / "labelled"
    write_images(labelled / "imgs", ["a.bmp"], 1)
    pd.DataFrame({"Path": ["imgs/a.bmp"], "label": [1]}).to_csv(labelled / "labels.csv", index=False)
    both = tmp_path / "both"  # labels.csv beside all/ and hem/: the list decides
    write_images(both / "all", ["a.bmp"], 1)
    write_images(both / "hem", ["h.bmp"], 0)
    pd.DataFrame({"Path": ["all/a.bmp"], "label": [1]}).to_csv(both / "labels.csv", index=False)
    lists_and_labels = tmp_path / "lists-and-labels"  # csv-lists come before labels.csv
    write_images(lists_and_labels, ["a.bmp", "b.bmp"], 1)
    for name, path in (("train.csv", "a.bmp"), ("valid.csv", "b.bmp"), ("labels.csv", "a.bmp")):
        pd.DataFrame({"Path": [path], "label": [1]}).to_csv(lists_and_labels / name, index=False)
    write_images(kaggle_source / "all", ["x.bmp"], 1)  # Kaggle folders win over class folders beside them
    write_images(kaggle_source / "hem", ["y.bmp"], 0)
    return {kaggle_source: "kaggle", lists: "csv-lists", labelled: "labels-csv", folder_source: "class-folders",
            both: "labels-csv", lists_and_labels: "csv-lists"}


def test_detect_layout_names_the_layout_discover_reads(tmp_path, kaggle_source, folder_source):
    for folder, layout in _layouts(tmp_path, kaggle_source, folder_source).items():
        assert (detect_layout(folder), discover(folder).layout) == (layout, layout), folder


def test_detect_layout_finds_none_in_a_plain_folder_of_images(tmp_path):
    write_images(tmp_path / "plain" / "sub", ["a.bmp"], 1)
    write_images(tmp_path / "plain", ["b.bmp"], 0)
    (tmp_path / "plain" / "all").mkdir()  # all/ without hem/ is no layout
    for folder in (tmp_path / "plain", tmp_path / "plain" / "sub", tmp_path / "missing"):
        assert detect_layout(folder) is None
    with pytest.raises(SourceError, match="no known source layout"):
        discover(tmp_path / "plain")


def test_detect_layout_names_a_broken_link_where_a_list_should_be(tmp_path):
    write_images(tmp_path / "all", ["a.bmp"], 1)
    (tmp_path / "labels.csv").symlink_to(tmp_path / "gone.csv")
    for find in (detect_layout, discover):
        with pytest.raises(SourceError, match="labels.csv is a broken symbolic link"):
            find(tmp_path)


@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason="../shared/data/cnmc-sample not present")
def test_real_sample_is_found():
    source = discover(REAL_SAMPLE)
    assert source.layout == "labels-csv" and len(source.items) == 96
    assert {it.patient for it in source.items} == {"2", "16", "H22"}
    assert sum(it.label == 1 for it in source.items) == 48
