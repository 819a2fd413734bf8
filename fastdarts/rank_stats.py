"""Rank correlations (SPEC §9): Kendall τ (τ-b, ties counted as neither
concordant nor discordant), sparse Kendall τ (Yu et al., ICLR 2020: the
stand-alone accuracies binned first) and Spearman ρ (Pearson on average ranks).
Written out here, small and exact, rather than borrowed: they define figures
the README reports. Also the per-epoch measures of how a search's α ranking
moves (``rank_measures``, ``skip_connects``), which every search records."""
from __future__ import annotations

import math
from typing import Sequence


def _check(a: Sequence[float], b: Sequence[float]) -> tuple[list[float], list[float]]:
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b):
        raise ValueError(f"rank correlation of sequences of different lengths ({len(a)} and {len(b)})")
    if len(a) < 2:
        raise ValueError("rank correlation needs at least 2 pairs")
    return a, b


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's τ-b; NaN when either sequence is constant."""
    a, b = _check(a, b)
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denominator if denominator else math.nan


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's ρ: Pearson's correlation of the average ranks; NaN when either is constant."""
    a, b = _check(a, b)
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else math.nan


def sparse_kendall_tau(scores: Sequence[float], accuracies: Sequence[float], bin_width: float = 0.1) -> float:
    """Kendall τ-b against accuracies (percent) binned to ``bin_width``:
    architectures closer than the noise of training count as ties."""
    binned = [math.floor(acc / bin_width + 1e-9) for acc in accuracies]
    return kendall_tau(scores, binned)


# -- how the α ranking moves from epoch to epoch (every search records these) --------------
def is_parametric(op: str) -> bool:
    return op.startswith(("sep_conv", "dil_conv", "conv_"))


def _ranking(row: Sequence[float], ops: Sequence[int]) -> tuple[int, ...]:
    """The ops, strongest first (ties: earlier op first)."""
    return tuple(sorted(ops, key=lambda k: (-row[k], k)))


def rank_measures(previous: dict[str, list[list[float]]], current: dict[str, list[list[float]]],
                  op_names: Sequence[str] | dict[str, Sequence[Sequence[str]]], unchanged_before: int) -> dict:
    """``alpha_rank_tau`` and ``rank_unchanged_epochs`` of an epoch, from the
    op weights (softmax α, per cell type) before and after it. ``op_names``:
    the ops of α's columns, or per cell type one list per edge."""
    taus, same = [], True
    for cell in ("normal", "reduce"):
        rows = current[cell]
        names = [op_names] * len(rows) if not isinstance(op_names, dict) else op_names[cell]
        for before, after, ops in zip(previous[cell], rows, names):
            parametric = [k for k, op in enumerate(ops) if is_parametric(op)]
            tau = kendall_tau(before, after)
            taus.append(1.0 if math.isnan(tau) else tau)  # a constant row: nothing moved
            if _ranking(before, parametric) != _ranking(after, parametric):
                same = False
    return dict(alpha_rank_tau=sum(taus) / len(taus), rank_unchanged_epochs=unchanged_before + 1 if same else 0)


def skip_connects(genotype) -> int:
    """Skip connections of the normal cell (the collapse DARTS drifts into)."""
    return sum(op == "skip_connect" for op, _ in genotype.normal)
