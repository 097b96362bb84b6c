from collections import Counter

import pytest

from pipeline.sources import Item
from pipeline.split import assign_splits


def items_for(patients_per_class: dict[int, int], per_patient: int, sizes_vary=True) -> list[Item]:
    items = []
    for label, n_patients in patients_per_class.items():
        for p in range(n_patients):
            patient = f"{'H' if label == 0 else ''}{p}"
            n = per_patient + (p % 3 if sizes_vary else 0)
            items += [Item(f"{patient}_{i}_{label}.bmp", label, patient, None) for i in range(n)]
    return items


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patient_grouped_split_keeps_patients_together_and_classes_in_every_split(seed):
    items = items_for({0: 10, 1: 20}, 30)
    names, record = assign_splits(items, (0.75, 0.15, 0.10), seed)
    assert record["method"] == "patient-grouped"
    split_of_patient = {}
    for item, split in zip(items, names):
        assert split_of_patient.setdefault(item.patient, split) == split  # no patient in two splits
    for split in ("train", "valid", "test"):
        assert {it.label for it, s in zip(items, names) if s == split} == {0, 1}
    counts = Counter(names)
    assert abs(counts["train"] / len(items) - 0.75) < 0.08
    assert abs(counts["valid"] / len(items) - 0.15) < 0.06
    assert abs(counts["test"] / len(items) - 0.10) < 0.06


def test_split_is_deterministic_per_seed():
    items = items_for({0: 6, 1: 9}, 10)
    assert assign_splits(items, (0.75, 0.15, 0.10), 3)[0] == assign_splits(items, (0.75, 0.15, 0.10), 3)[0]
    assert assign_splits(items, (0.75, 0.15, 0.10), 3)[0] != assign_splits(items, (0.75, 0.15, 0.10), 4)[0]


def test_too_few_patients_falls_back_to_a_recorded_stratified_image_split():
    items = items_for({0: 1, 1: 2}, 40, sizes_vary=False)  # like the real 96-image sample: H22 | 2, 16
    names, record = assign_splits(items, (0.75, 0.15, 0.10), 0)
    assert record["method"] == "stratified-images" and "too few" in record["note"]
    for label in (0, 1):
        counts = Counter(s for it, s in zip(items, names) if it.label == label)
        n = sum(counts.values())
        assert counts["train"] == round(0.75 * n) and counts["valid"] == round(0.9 * n) - round(0.75 * n)
