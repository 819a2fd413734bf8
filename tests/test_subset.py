"""Class-balanced subsets (PC-DARTS' ImageNet search: 10 % of each class for w, a disjoint 2.5 % for α)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from fastdarts.data.subset import class_balanced_subset
from fastdarts.errors import FastDartsError

# classes of 40, 20, 7, 1 and 10 members, interleaved
SIZES = {0: 40, 1: 20, 2: 7, 3: 1, 7: 10}
LABELS = np.random.default_rng(0).permutation(np.repeat(list(SIZES), list(SIZES.values()))).tolist()


def per_class(indices):
    return Counter(LABELS[i] for i in indices)


def test_each_class_gets_its_fraction_at_least_one():
    chosen = class_balanced_subset(LABELS, 0.1, seed=0)
    # 4, 2, round(0.7) = 1, at least 1, 1
    assert per_class(chosen) == {0: 4, 1: 2, 2: 1, 3: 1, 7: 1}
    assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
    assert per_class(class_balanced_subset(LABELS, 0.5, seed=0)) == {0: 20, 1: 10, 2: 4, 3: 1, 7: 5}  # 3.5 -> 4
    assert per_class(class_balanced_subset(LABELS, 0.25, seed=0)) == {0: 10, 1: 5, 2: 2, 3: 1, 7: 3}  # 2.5 -> 3
    assert class_balanced_subset(LABELS, 1.0, seed=0) == list(range(len(LABELS)))


def test_disjoint_from_exclude():
    labels = [y if y != 3 else 7 for y in LABELS]  # no single-image class: 40, 20, 7, 11
    weights = class_balanced_subset(labels, 0.5, seed=0)
    alphas = class_balanced_subset(labels, 0.25, seed=0, exclude=weights)
    assert not set(weights) & set(alphas)
    # the fraction is of the whole class (PC-DARTS' 2.5 % of each class), taken from what is left
    assert Counter(labels[i] for i in alphas) == {0: 10, 1: 5, 2: 2, 7: 3}
    even = [0, 1] * 10  # two classes of 10: half, then the other half, is everything
    first = class_balanced_subset(even, 0.5, seed=3)
    assert sorted(first + class_balanced_subset(even, 0.5, seed=3, exclude=first)) == list(range(20))


def test_exclude_that_leaves_too_few_is_refused():
    weights = class_balanced_subset(LABELS, 0.5, seed=0)  # class 3's single image is taken
    with pytest.raises(FastDartsError, match="class 3 has 1 images, 1 of them excluded"):
        class_balanced_subset(LABELS, 0.25, seed=0, exclude=weights)
    with pytest.raises(FastDartsError, match="excluded indices"):
        class_balanced_subset(LABELS, 0.25, seed=0, exclude=[len(LABELS)])


def test_deterministic_and_seeded():
    a = class_balanced_subset(LABELS, 0.3, seed=1)
    assert a == class_balanced_subset(LABELS, 0.3, seed=1)
    assert a == class_balanced_subset(torch.tensor(LABELS), 0.3, seed=1)
    assert a == class_balanced_subset(np.array(LABELS, dtype=np.int32), 0.3, seed=1)
    assert a != class_balanced_subset(LABELS, 0.3, seed=2)
    # a class's choice depends only on its own members: appending another class changes nothing else
    more = class_balanced_subset(LABELS + [9] * 5, 0.3, seed=1)
    assert [i for i in more if i < len(LABELS)] == a


def test_choice_is_spread_over_the_class():
    counts = Counter(i for seed in range(200) for i in class_balanced_subset(LABELS, 0.1, seed=seed)
                     if LABELS[i] == 0)
    members = [i for i, y in enumerate(LABELS) if y == 0]
    assert set(counts) == set(members)  # 4 of 40 per seed: every member is picked sometimes


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_fraction_is_refused(fraction):
    with pytest.raises(FastDartsError, match="fraction"):
        class_balanced_subset(LABELS, fraction, seed=0)


def test_bad_labels_are_refused():
    with pytest.raises(FastDartsError, match="labels"):
        class_balanced_subset([0.5, 1.0], 0.5, seed=0)
    assert class_balanced_subset([], 0.5, seed=0) == []
