"""DARTS+ early stopping (Liang et al., 2019; SPEC §8).

Criteria (``--early-stop``, several may be given):
- ``skip:M``: stop at the end of the first epoch whose derived normal cell
  holds ≥ M skip connections (the collapse DARTS drifts into);
- ``stable:E``: stop once the ranking of the parametric ops on every edge
  of both cell types has not changed for E consecutive epochs. That is the
  criterion, not a promise that the genotype held still: the derivation
  also weighs the non-parametric ops (a skip connection or a pool can
  overtake every parametric op of an edge, and the top-2 edges of a node can
  change) while the parametric ops keep their order (issue 24 reports a run
  that held the ranking for 10 epochs while its normal cell changed
  ``sep_conv_3x3(1)`` to ``skip_connect(0)``).

The criteria read the measures every search records per epoch
(``rank_stats.rank_measures``, ``skip_connects``): ``skip_connects`` (normal
cell), ``rank_unchanged_epochs`` and ``alpha_rank_tau``. Everything is
derived from the α history, so a resumed run continues the counts exactly.
"""
from __future__ import annotations

from typing import Sequence

from ..errors import FastDartsError
from ..method import Option, SearchMethod, register_method
from ..rank_stats import is_parametric, rank_measures, skip_connects  # noqa: F401  (re-exported)

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


@register_method
class EarlyStop(SearchMethod):
    """Stops the search (or a stage of it) once a criterion holds after an epoch."""

    name = "early-stop"
    options = (Option("early_stop", None, "DARTS+: skip:M stops after the first epoch whose normal cell holds M "
                      "skip connections; stable:E once the parametric ops' ranking on every edge held for E epochs. "
                      "May be given twice or as skip:2,stable:10; the stopping epoch's genotype is the result",
                      kind="list", metavar="CRITERION"),)

    @classmethod
    def check(cls, config, from_preset):
        return dict(early_stop=canonical(parse_early_stop(config.early_stop)))

    def __init__(self, config):
        super().__init__(config)
        self.criteria = parse_early_stop(config.early_stop)

    def stop_reason(self, run, entry: dict) -> str | None:
        return stop_reason(self.criteria, entry)
