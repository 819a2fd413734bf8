"""Rank correlations against a direct computation on made-up pairs, ties included."""
import itertools
import math

import pytest

from fastdarts.rank_stats import average_ranks, kendall_tau, sparse_kendall_tau, spearman_rho


def _tau_b_by_definition(a, b):
    pairs = list(itertools.combinations(range(len(a)), 2))
    s = sum(_sign(a[i] - a[j]) * _sign(b[i] - b[j]) for i, j in pairs)  # concordant − discordant
    n0 = len(pairs)
    n1 = sum(a[i] == a[j] for i, j in pairs)
    n2 = sum(b[i] == b[j] for i, j in pairs)
    return s / math.sqrt((n0 - n1) * (n0 - n2))


def _sign(v):
    return (v > 0) - (v < 0)


def test_kendall_tau_of_perfect_and_reversed_orders():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0


def test_kendall_tau_b_with_ties_is_the_textbook_formula():
    cases = [([1, 2, 2, 3, 4], [2, 1, 3, 3, 5]), ([0, 0, 1, 1, 2, 2], [3, 1, 2, 2, 0, 5]),
             ([5, 1, 4, 4, 2, 3], [1, 1, 1, 2, 2, 3])]
    for a, b in cases:
        assert kendall_tau(a, b) == pytest.approx(_tau_b_by_definition(a, b), abs=1e-12)
    # Worked by hand: a=[1,2,2,3] b=[1,3,2,4]: pairs (01)+ (02)+ (03)+ (12) tie in a (13)+ (23)+ -> S=5,
    # n0=6, n1=1 (a ties), n2=0 -> 5/sqrt(5*6).
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(5 / math.sqrt(30))


def test_spearman_uses_average_ranks():
    assert average_ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    # d = rank differences without ties: 1 - 6Σd²/(n(n²-1)).
    a, b = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]
    assert spearman_rho(a, b) == pytest.approx(1 - 6 * 4 / (5 * 24))
    assert spearman_rho([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # Pearson of ranks


def test_sparse_kendall_tau_counts_close_accuracies_as_ties():
    scores = [1.0, 2.0, 3.0]
    accuracies = [90.01, 90.05, 89.0]  # the first two are in the same 0.1% bin
    assert sparse_kendall_tau(scores, accuracies) == pytest.approx(kendall_tau(scores, [900, 900, 890]))
    assert sparse_kendall_tau(scores, accuracies) != kendall_tau(scores, accuracies)


def test_constant_input_is_nan_and_bad_input_an_error():
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman_rho([1, 2, 3], [4, 4, 4]))
    with pytest.raises(ValueError, match="different lengths"):
        kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        spearman_rho([1], [1])
