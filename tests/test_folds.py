"""Cross-validation folds: patient-grouped and class-stratified, or the Kaggle layout's own folds."""
import numpy as np
import pytest

from train.data.folds import FoldError, kaggle_folds, patient_folds


def _rows(per_patient: dict[str, tuple[int, int]]):
    """patients, paths, labels for {patient: (label, cells)}."""
    patients, paths, labels = [], [], []
    for patient, (label, cells) in per_patient.items():
        for n in range(cells):
            patients.append(patient)
            paths.append(f"{'all' if label else 'hem'}/UID_{patient}_{n}_1.bmp")
            labels.append(label)
    return patients, paths, labels


PATIENTS = {**{str(i): (1, 10 + 3 * i) for i in range(7)}, **{f"H{i}": (0, 8 + 2 * i) for i in range(5)}}


def test_patient_folds_are_disjoint_cover_everything_and_are_balanced_per_class():
    patients, paths, labels = _rows(PATIENTS)
    folds = patient_folds(patients, paths, labels, 3, seed=0)
    flat = [g for f in folds for g in f]
    assert sorted(flat) == sorted(PATIENTS) and len(flat) == len(set(flat))  # each patient in exactly one fold
    for fold in folds:
        assert {PATIENTS[g][0] for g in fold} == {0, 1}  # both classes to validate on
    # cells per class per fold: within the largest patient's size of each other (greedy balancing)
    for label in (0, 1):
        cells = [sum(PATIENTS[g][1] for g in fold if PATIENTS[g][0] == label) for fold in folds]
        biggest = max(c for lab, c in PATIENTS.values() if lab == label)
        assert max(cells) - min(cells) <= biggest, cells
    assert patient_folds(patients, paths, labels, 3, seed=0) == folds  # a seed means one assignment
    assert any(patient_folds(patients, paths, labels, 3, seed=s) != folds for s in range(1, 6))


def test_too_many_folds_for_the_patients_says_how_many_there_are():
    patients, paths, labels = _rows(PATIENTS)
    with pytest.raises(FoldError, match=r"5 hem.*7 all|use --folds 5 or fewer"):
        patient_folds(patients, paths, labels, 6, seed=0)
    with pytest.raises(FoldError, match="2 or more"):
        patient_folds(patients, paths, labels, 1, seed=0)


def test_images_without_a_patient_id_are_groups_of_their_own():
    patients, paths, labels = _rows({"unknown": (1, 6), "H1": (0, 3), "H2": (0, 3)})
    folds = patient_folds(patients, paths, labels, 2, seed=0)
    unknown = [g for f in folds for g in f if g.startswith("image:")]
    assert len(unknown) == 6 and all(any(g in f for g in unknown) for f in folds)  # spread, not one lump


def test_kaggle_folds_come_from_the_folders_and_refuse_other_layouts():
    paths = [f"C-NMC_training_data/fold_{i % 3}/all/UID_{i}_1_1_all.bmp" for i in range(9)]
    assert kaggle_folds(paths, "kaggle") == [["fold_0"], ["fold_1"], ["fold_2"]]
    with pytest.raises(FoldError, match="layout is class-folders.*--folds K"):
        kaggle_folds(["all/UID_1_1_1_all.bmp"] + paths, "class-folders")
    assert np.all([p.count("fold_") == 1 for p in paths])


def test_one_patient_of_a_class_cannot_be_cross_validated_and_says_so():
    patients, paths, labels = _rows({"H1": (0, 5), "1": (1, 5), "2": (1, 5)})  # the real sample's make-up
    with pytest.raises(FoldError, match="at least 2 patients of each class") as err:
        patient_folds(patients, paths, labels, 2, seed=0)
    assert "--folds 2 or fewer" not in str(err.value)
