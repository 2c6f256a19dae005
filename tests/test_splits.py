"""Labeled subsets: the references' exact ones for seed 0, nested and seeded otherwise."""

import pytest

from agcl.data import formats
from agcl.data.splits import SplitError, labeled_count, make_splits


@pytest.mark.parametrize("ratio,pool,expected", [
    (0.05, 80, 4), (0.1, 80, 8), (0.2, 80, 16), (0.05, 70, 3), (0.1, 70, 7), (0.2, 70, 14),
    (0.07, 100, 7), (0.05, 10, 1), (1.0, 173, 173), (0.05, 173, 8),
])
def test_labeled_count(ratio, pool, expected):
    assert labeled_count(ratio, pool) == expected


def test_labeled_count_rejects_bad_ratio():
    with pytest.raises(SplitError, match="ratio"):
        labeled_count(0, 10)


@pytest.fixture(scope="module")
def la_index(la_mirror_dir):
    train = formats.read_list(la_mirror_dir / "train.list")
    test = formats.read_list(la_mirror_dir / "test.list")
    return {"dataset": "la", "lists": {"train": train, "test": test}}, train, test


@pytest.fixture(scope="module")
def acdc_index(acdc_lists_mirror_dir):
    lists = {s: formats.read_list(acdc_lists_mirror_dir / f"{s}.list") for s in ("train", "val", "test")}
    slices = formats.read_list(acdc_lists_mirror_dir / "train_slices.list")
    return {"dataset": "acdc", "lists": lists, "train_slices": slices}


def test_la_seed0_is_the_first_lines_of_train_list(la_index):
    index, train, test = la_index
    split = make_splits(index, [0.05, 0.1, 0.2], seed=0)
    assert split["labeled"]["0.05"]["cases"] == train[:4]
    assert split["labeled"]["0.1"]["cases"] == train[:8]
    assert split["labeled"]["0.2"]["cases"] == train[:16]
    assert split["test"] == test and split["val"] == []


def test_la_other_seeds_are_nested_permutations(la_index):
    index, train, test = la_index
    a = make_splits(index, [0.05, 0.1], seed=1)
    b = make_splits(index, [0.05, 0.1], seed=1)
    c = make_splits(index, [0.05, 0.1], seed=2)
    assert a == b
    small, large = a["labeled"]["0.05"]["cases"], a["labeled"]["0.1"]["cases"]
    assert large[:4] == small and len(large) == 8
    assert small != train[:4] and small != c["labeled"]["0.05"]["cases"]
    assert set(large) <= set(train) and not set(large) & set(test)


def test_la_val_carved_from_the_tail_and_never_labeled(la_index):
    index, train, _ = la_index
    for seed in (0, 3):
        split = make_splits(index, [0.05, 0.1], seed=seed, val_cases=8)
        assert split["val"] == train[-8:]
        assert split["labeled"]["0.05"]["n"] == 4  # counts still refer to the 80 upstream cases
        assert not set(split["labeled"]["0.1"]["cases"]) & set(split["val"])
        assert not set(split["labeled_pool"]) & set(split["val"])


def test_acdc_reference_subsets(acdc_index):
    split = make_splits(acdc_index, [0.05, 0.1, 0.2], seed=0)
    patients = list(dict.fromkeys(f.split("_")[0] for f in acdc_index["lists"]["train"]))
    assert split["labeled"]["0.05"]["patients"] == patients[:3]
    assert split["labeled"]["0.1"]["patients"] == patients[:7]
    assert len(split["labeled"]["0.05"]["slices"]) == 68
    assert len(split["labeled"]["0.1"]["slices"]) == 136
    assert len(split["labeled"]["0.2"]["slices"]) == 256
    # exactly the first N slices of train_slices.list, in list order
    assert split["labeled"]["0.05"]["slices"] == acdc_index["train_slices"][:68]
    assert split["val"] == acdc_index["lists"]["val"]
    assert len(split["labeled"]["0.05"]["frames"]) == 6


def test_acdc_seeded_patients_are_nested(acdc_index):
    split = make_splits(acdc_index, [0.05, 0.1], seed=4)
    small, large = split["labeled"]["0.05"]["patients"], split["labeled"]["0.1"]["patients"]
    assert large[:3] == small
    chosen = set(large)
    assert all(s.split("_")[0] in chosen for s in split["labeled"]["0.1"]["slices"])


def test_val_cases_must_leave_training_data():
    index = {"dataset": "crag", "lists": {"train": ["a", "b"], "test": ["t"]}}
    with pytest.raises(SplitError, match="val_cases=2"):
        make_splits(index, [0.5], seed=0, val_cases=2)
