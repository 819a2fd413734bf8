"""DARTS+ early stopping (Liang et al., 2019; SPEC §8) and the per-epoch
measures of how the α ranking moves.

Criteria (``--early-stop``, several may be given):
- ``skip:M``: stop at the end of the first epoch whose derived normal cell
  holds ≥ M skip connections (the collapse DARTS drifts into);
- ``stable:E``: stop once the ranking of the parametric ops on every edge
  of both cell types (and so the derived genotype's op choice) has not
  changed for E consecutive epochs.

Measures every search records per epoch: ``skip_connects`` (normal cell),
``rank_unchanged_epochs`` and ``alpha_rank_tau`` (mean over the edges of
both cell types of the Kendall τ between this epoch's and the previous
epoch's ranking of all ops). Everything is derived from the α history, so a
resumed run continues the counts exactly.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..errors import FastDartsError
from ..genotype import Genotype
from ..rank_stats import kendall_tau

CRITERIA = ("skip", "stable")


def parse_early_stop(specs: str | Sequence[str] | None) -> dict[str, int]:
    """``"skip:2,stable:10"`` (or a list of such) as {criterion: threshold}."""
    if specs is None:
        return {}
    if isinstance(specs, str):
        specs = [specs]
    out: dict[str, int] = {}
    for spec in (part.strip() for s in specs for part in str(s).split(",")):
        name, sep, value = spec.partition(":")
        if name not in CRITERIA:
            raise FastDartsError(f"unknown early-stop criterion {spec!r}; known: skip:M (stop once the normal cell "
                                 f"has M skip connections), stable:E (stop once the op ranking held for E epochs)")
        try:
            threshold = int(value) if sep else -1
        except ValueError:
            threshold = -1
        if threshold <= 0:
            raise FastDartsError(f"early-stop {spec!r} needs a positive integer after '{name}:'")
        if name in out:
            raise FastDartsError(f"early-stop criterion {name!r} given twice")
        out[name] = threshold
    return out


def canonical(criteria: dict[str, int]) -> str | None:
    """The criteria as one string in a fixed order (for configs and resume checks)."""
    return ",".join(f"{k}:{criteria[k]}" for k in CRITERIA if k in criteria) or None


def is_parametric(op: str) -> bool:
    return op.startswith(("sep_conv", "dil_conv", "conv_"))


def _ranking(row: Sequence[float], ops: Sequence[int]) -> tuple[int, ...]:
    """The ops, strongest first (ties: earlier op first)."""
    return tuple(sorted(ops, key=lambda k: (-row[k], k)))


def rank_measures(previous: dict[str, list[list[float]]], current: dict[str, list[list[float]]],
                  op_names: Sequence[str] | dict[str, Sequence[Sequence[str]]], unchanged_before: int) -> dict:
    """``alpha_rank_tau`` and ``rank_unchanged_epochs`` of an epoch, from the
    op weights (softmax α, per cell type) before and after it. ``op_names``:
    the ops of α's columns, or per cell type one list per edge (P-DARTS)."""
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


def skip_connects(genotype: Genotype) -> int:
    return sum(op == "skip_connect" for op, _ in genotype.normal)


def stop_reason(criteria: dict[str, int], entry: dict) -> str | None:
    """Why the search stops after this epoch's ``entry``, or None."""
    reasons = []
    if "skip" in criteria and entry["skip_connects"] >= criteria["skip"]:
        reasons.append(f"early stop (skip:{criteria['skip']}): the normal cell holds {entry['skip_connects']} "
                       f"skip connections")
    if "stable" in criteria and entry["rank_unchanged_epochs"] >= criteria["stable"]:
        reasons.append(f"early stop (stable:{criteria['stable']}): the parametric ops' ranking has not changed "
                       f"for {entry['rank_unchanged_epochs']} epochs")
    return "; ".join(reasons) or None
