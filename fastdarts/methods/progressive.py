"""P-DARTS' progressive search (Chen et al., ICCV 2019; SPEC §8).

The search runs in stages, each a new supernet (weights and α drawn afresh)
deeper than the last and with fewer candidate ops per edge:

- ``parse_stages("5:8,11:5,17:3")``: (cells, ops held per edge) per stage;
- ``drop_ops``: between stages every edge keeps its strongest ops by
  softmax(α) among those it still has (the original's ``get_min_k``). After
  the last stage the original drops ``none`` first and keeps one op per
  edge (``get_min_k_no_zero``, ``none_first=True`` here): that is the
  derivation's own choice of each edge's strongest non-`none` op, so the
  search ends with ``derive_genotype`` (and ``limit_skip_connects``);
- ``skip_dropout_rate``: dropout after ``skip_connect`` (stride 1), from the
  stage's initial rate p₀, decayed within the stage as the original's
  ``train_search.py``;
- ``limit_skip_connects``: the final normal cell holds at most M skip
  connections, by the original's procedure (remove the weakest chosen skip
  connection's probability, derive again, repeat).

Edges keep their ops in op-set order, so an edge's α column k is the k-th op
of ``edge_ops[cell][edge]``; every edge of a stage holds the same number of
ops, so α stays one (edges, ops) matrix per cell type.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.loader import mix_seed
from ..edge_ops import CELLS, EdgeOps, check_edge_ops, full_edge_ops  # noqa: F401  (re-exported)
from ..errors import FastDartsError
from ..genotype import CellSelector, num_edges, select_edges
from ..layout import layout_string, reduction_layout
from ..method import Option, SearchMethod, register_method

# The original's exponential decay of the dropout rate once α is trained.
_DECAY = 0.2
# mix_seed's pass number of the dropout masks' seed (the loader's passes are 0, 1, ...).
DROPOUT_PASS = 1 << 22


@dataclass(frozen=True)
class Stage:
    cells: int
    ops: int

    def __str__(self) -> str:
        return f"{self.cells}:{self.ops}"


def parse_stages(spec: str, num_ops: int) -> tuple[Stage, ...]:
    """``"5:8,11:5,17:3"`` -> stages; the first holds every op of the op set
    (``num_ops``), later ones fewer each time, at least 1 per edge."""
    stages = []
    for part in str(spec).split(","):
        cells, sep, ops = part.strip().partition(":")
        try:
            stage = Stage(int(cells), int(ops)) if sep else None
        except ValueError:
            stage = None
        if stage is None:
            raise FastDartsError(f"malformed stages {spec!r}: each comma-separated entry must be CELLS:OPS "
                                 f"(cells of the stage's supernet, ops held per edge), e.g. '5:8,11:5,17:3'")
        if stage.cells < 1 or stage.ops < 1:
            raise FastDartsError(f"stages {spec!r}: stage {len(stages) + 1} ({part.strip()}) needs at least "
                                 f"1 cell and 1 op per edge")
        stages.append(stage)
    if stages[0].ops != num_ops:
        raise FastDartsError(f"stages {spec!r}: the first stage must hold every op of the op set ({num_ops}), "
                             f"got {stages[0].ops}; later stages keep fewer")
    for before, after in zip(stages, stages[1:]):
        if after.ops < 2:
            raise FastDartsError(f"stages {spec!r}: a later stage ({after}) must hold at least 2 ops per edge "
                                 f"(with 1 nothing is searched; the final derivation keeps one op per edge)")
        if after.ops >= before.ops:
            raise FastDartsError(f"stages {spec!r}: ops kept per edge must fall from stage to stage "
                                 f"({before} then {after})")
    return tuple(stages)


def stages_string(stages: Sequence[Stage]) -> str:
    return ",".join(map(str, stages))


def parse_rates(spec: str | Sequence[float] | None, num_stages: int) -> tuple[float, ...]:
    """``--skip-dropout 0.0,0.4,0.7``: one initial rate per stage (None: 0)."""
    if spec is None:
        return (0.0,) * num_stages
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        rates = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise FastDartsError(f"malformed skip-dropout {spec!r}: give one rate per stage, e.g. 0.0,0.4,0.7") from None
    if len(rates) != num_stages:
        raise FastDartsError(f"skip-dropout {spec!r} gives {len(rates)} rate(s) for {num_stages} stage(s)")
    if not all(0 <= r < 1 for r in rates):
        raise FastDartsError(f"skip-dropout {spec!r}: each rate must be in [0, 1)")
    return rates


def skip_dropout_rate(p0: float, epoch: int, epochs: int, warmup_epochs: int) -> float:
    """The rate in ``epoch`` (0-based, within the stage) of ``epochs``: linear
    towards 0 while α rests (``p₀·(E − e − 1)/E``), then ``p₀·exp(−0.2·(e − w))``."""
    if epoch < warmup_epochs:
        return p0 * (epochs - epoch - 1) / epochs
    return p0 * math.exp(-(epoch - warmup_epochs) * _DECAY)


def _min_k(values: Sequence[float], k: int) -> list[int]:
    """Indices of the k smallest values, repeated argmin (ties: earlier first), as ``get_min_k``."""
    values, out = list(values), []
    for _ in range(k):
        i = min(range(len(values)), key=lambda j: (values[j], j))
        out.append(i)
        values[i] = math.inf
    return out


def drop_ops(edge_ops: EdgeOps, weights: dict[str, Sequence[Sequence[float]]], keep: int,
             none_first: bool = False) -> EdgeOps:
    """Each edge keeps its ``keep`` strongest ops by ``weights`` (softmax α per
    cell type, rows in the edge's op order); ``none_first``: `none` is dropped
    before anything else (the original's last stage)."""
    out = {}
    for cell in CELLS:
        rows = []
        for ops, w in zip(edge_ops[cell], weights[cell]):
            if len(w) != len(ops):
                raise FastDartsError(f"drop_ops: {cell} weights have {len(w)} entries for {len(ops)} ops")
            if keep > len(ops):
                raise FastDartsError(f"drop_ops: cannot keep {keep} of {len(ops)} ops")
            w = list(w)
            drop = []
            if none_first and "none" in ops:
                drop.append(ops.index("none"))
                w[drop[0]] = math.inf
            drop += _min_k(w, len(ops) - keep - len(drop)) if len(ops) - keep > len(drop) else []
            rows.append(tuple(op for i, op in enumerate(ops) if i not in drop))
        out[cell] = tuple(rows)
    return out


def limit_skip_connects(weights: Sequence[Sequence[float]], edge_ops: Sequence[Sequence[str]], steps: int,
                        max_skip: int) -> tuple[tuple[str, int], ...]:
    """The normal cell derived from ``weights`` (softmax α, rows in each edge's
    op order) with at most ``max_skip`` skip connections, by P-DARTS' procedure:
    while the derived cell has more, the chosen skip connection with the
    smallest weight gets weight 0 and the cell is derived again (so that edge
    takes its next op, or loses its place to a stronger edge)."""
    weights = [list(map(float, row)) for row in weights]
    starts = [num_edges(node) for node in range(steps)]
    for _ in range(sum(len(ops) for ops in edge_ops) + 1):
        gene = select_edges(weights, edge_ops, steps)
        chosen = [(weights[starts[i // 2] + src][edge_ops[starts[i // 2] + src].index(op)], starts[i // 2] + src)
                  for i, (op, src) in enumerate(gene) if op == "skip_connect"]
        if len(chosen) <= max_skip:
            return gene
        weight, edge = min(chosen)  # the weakest chosen skip (ties: the earlier edge, as np.argmin)
        if weight == 0:
            break
        weights[edge][edge_ops[edge].index("skip_connect")] = 0.0
    raise FastDartsError(f"cannot limit the normal cell to {max_skip} skip connection(s): some nodes have no "
                         f"other op left to take")


def max_skip_selector(max_skip: int) -> CellSelector:
    """``derive_genotype``'s ``select_cell`` that keeps at most ``max_skip``
    skip connections in the normal cell (``limit_skip_connects``)."""
    check_max_skip(max_skip)

    def select(cell, weights, edge_ops, steps):
        return limit_skip_connects(weights, edge_ops, steps, max_skip) if cell == "normal" else None

    return select


def check_max_skip(max_skip) -> int | None:
    if max_skip is not None and (isinstance(max_skip, bool) or not isinstance(max_skip, int) or max_skip < 0):
        raise FastDartsError(f"max-skip must be a non-negative integer, got {max_skip!r}")
    return max_skip


# -- skip dropout on an edge ---------------------------------------------------------------
def set_skip_dropout(model: torch.nn.Module, rate: float | None) -> None:
    """The dropout rate after every stride-1 skip connection of ``model``'s
    edges (None: off, no random draws); the edges must carry the term
    (a network whose ``--stages`` or ``--skip-dropout`` is set)."""
    edges = [m for m in model.modules() if hasattr(m, "skip_index")]
    if not edges:
        raise FastDartsError("this network's edges have no skip dropout (build it with the progressive method's "
                             "options, e.g. stages= or skip_dropout=)")
    for edge in edges:
        edge.skip_dropout = None if rate is None else float(rate)


@register_method
class Progressive(SearchMethod):
    """P-DARTS: stages of deeper supernets with fewer ops, skip dropout, at most M skip connections."""

    name = "progressive"
    options = (
        Option("stages", None, "P-DARTS: stages of a progressive search, each a new supernet of CELLS cells whose "
               "edges hold OPS ops (the first stage all; between stages every edge keeps its strongest); "
               "--epochs is per stage. 20:8 grows the depth without pruning", metavar="CELLS:OPS,..."),
        Option("skip_dropout", None, "P-DARTS: initial dropout rate after skip_connect in each stage, decayed "
               "within the stage", metavar="P,..."),
        Option("max_skip", None, "P-DARTS: the final normal cell keeps at most M skip connections",
               kind="non_negative_int", metavar="M"),
    )

    @classmethod
    def check(cls, config, from_preset):
        check_max_skip(config.max_skip)
        if config.stages is None:
            if config.skip_dropout is not None:
                raise FastDartsError("skip-dropout gives one rate per stage; it needs --stages")
            return {}
        for name in ("layout", "layers"):
            if getattr(config, name) is not None:
                raise FastDartsError(f"--stages sets each stage's cells; drop --{name} (or give the stages' cells)")
        stages = parse_stages(config.stages, len(config.ops.split(",")))
        if "skip_dropout" in from_preset and len(config.skip_dropout.split(",")) != len(stages):
            raise FastDartsError(f"the {config.method} preset's skip-dropout {config.skip_dropout} has one rate for "
                                 f"each of its stages; for --stages {config.stages} give --skip-dropout with "
                                 f"{len(stages)} rate(s)")
        rates = parse_rates(config.skip_dropout, len(stages))
        if len(stages) > 1 and config.arch_warmup_epochs >= config.epochs:
            raise FastDartsError(f"arch-warmup-epochs {config.arch_warmup_epochs} covers every one of the "
                                 f"{config.epochs} epochs of a stage: α would never be trained before the ops are "
                                 f"pruned by it; give more --epochs or fewer --arch-warmup-epochs")
        return dict(stages=stages_string(stages), skip_dropout=",".join(map(str, rates)))

    @classmethod
    def incompatible(cls, config) -> str | None:
        if not config.cuda_graph or config.stages is None:
            return None
        if not any(parse_rates(config.skip_dropout, 1 + config.stages.count(","))):
            return None  # no stage drops anything
        if config.order == "second":
            return ("--cuda-graph cannot capture the second-order step with skip dropout: w+ and w- must see the "
                    "same masks, which needs the generator state restored inside the step; use --order first "
                    "(P-DARTS' own) or run without --cuda-graph")
        if config.recompute == "cell":
            return ("--cuda-graph cannot capture --recompute cell with skip dropout: the recompute restores the "
                    "generator state to redraw the masks; use --recompute edge")
        return None

    @classmethod
    def stage_plan(cls, config) -> list[tuple[str, int]] | None:
        if config.stages is None:
            return None
        return [(layout_string(reduction_layout(st.cells)), st.ops)
                for st in parse_stages(config.stages, len(config.ops.split(",")))]

    def __init__(self, config):
        super().__init__(config)
        stages = getattr(config, "stages", None)
        # The initial dropout rate of each stage (a run without stages has none).
        self.rates = None if stages is None else parse_rates(config.skip_dropout, 1 + str(stages).count(","))

    # -- the edge term: dropout after the skip connection (stride 1 only: on stride 2 it is a FactorizedReduce)
    def attach_to_edge(self, edge, C: int, stride: int) -> None:
        edge.skip_dropout = None  # the current rate, set each epoch (set_skip_dropout); None: no draws
        edge.skip_index = edge.op_names.index("skip_connect") if "skip_connect" in edge.op_names and stride == 1 \
            else None

    def split_edge(self, edge, x, weights, paths):
        """With skip dropout on (training), the skip connection's term
        ``w·dropout(x)`` computed apart, and ``weights`` with that op's weight 0
        for the backend: every backend (and any recompute) then sees the one
        dropout mask autograd keeps, drawn once per forward."""
        if edge.skip_dropout is None or not edge.training or edge.skip_index is None:
            return weights, None
        position = (edge.skip_index if paths is None else
                    next((i for i, k in enumerate(paths) if k == edge.skip_index), None))
        if position is None:
            return weights, None
        dropped = F.dropout(x, edge.skip_dropout, training=True)
        if paths is not None and position != 0:
            dropped = dropped.detach()  # an inactive path: its gate gradient only
        term = weights[position] * dropped
        mask = torch.ones(len(weights), dtype=weights.dtype, device=weights.device)
        mask[position] = 0
        return weights * mask, term

    def add_to_edge(self, edge, x, y, split, scale, extras, params=None):
        return y if split is None else y + split

    def edge_draws_random_numbers(self, edge) -> bool:
        return edge.skip_dropout is not None and edge.skip_index is not None

    # -- the loop -------------------------------------------------------------------
    def start_epoch(self, run, epoch: int, stage_epoch: int) -> dict:
        if self.rates is None:
            return {}
        p0, cfg = self.rates[run.stage], self.config
        rate = None if p0 == 0 else skip_dropout_rate(p0, stage_epoch, cfg.epochs, cfg.arch_warmup_epochs)
        set_skip_dropout(run.model, rate)
        if rate is not None:
            # The dropout masks come from the global generator: seeded per epoch (and rank: each its own
            # masks), so a resumed run draws the same.
            torch.manual_seed(mix_seed(cfg.seed, epoch, DROPOUT_PASS + run.dist.rank))
        return {"skip_dropout": rate}

    def next_stage_edges(self, run, alphas: dict, keep: int) -> dict:
        # Each edge keeps its strongest ops by softmax(α) for the next stage.
        return drop_ops(run.edge_ops, alphas, keep)

    # -- derivation -----------------------------------------------------------------
    def select_cell(self, cell, weights, edge_ops, steps):
        max_skip = self.config.max_skip
        if cell != "normal" or max_skip is None:
            return None
        return limit_skip_connects(weights, edge_ops, steps, max_skip)

    def describe_final(self, genotype, unlimited) -> str | None:
        if self.config.max_skip is None or genotype == unlimited:
            return None
        return f"normal cell limited to {self.config.max_skip} skip connections"
