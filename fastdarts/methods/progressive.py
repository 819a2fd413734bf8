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

from ..errors import FastDartsError

CELLS = ("normal", "reduce")
# The original's exponential decay of the dropout rate once α is trained.
_DECAY = 0.2

EdgeOps = dict[str, tuple[tuple[str, ...], ...]]


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


def full_edge_ops(op_names: Sequence[str], num_edges: int) -> EdgeOps:
    """Every edge of both cell types holding every op (DARTS, the first stage)."""
    return {cell: (tuple(op_names),) * num_edges for cell in CELLS}


def check_edge_ops(edge_ops, op_names: Sequence[str], num_edges: int) -> EdgeOps:
    """``edge_ops`` (None: every op on every edge) validated and as tuples."""
    if edge_ops is None:
        return full_edge_ops(op_names, num_edges)
    if not isinstance(edge_ops, dict) or set(edge_ops) != set(CELLS):
        raise FastDartsError("edge_ops must map 'normal' and 'reduce' to one op list per edge")
    out, width = {}, None
    for cell in CELLS:
        lists = edge_ops[cell]
        if isinstance(lists, str) or len(lists) != num_edges:
            raise FastDartsError(f"edge_ops[{cell!r}] must hold {num_edges} op lists (one per edge), "
                                 f"got {len(lists) if not isinstance(lists, str) else lists!r}")
        rows = []
        for e, ops in enumerate(lists):
            ops = (ops,) if isinstance(ops, str) else tuple(ops)
            where = f"edge_ops[{cell!r}] edge {e}"
            unknown = [op for op in ops if op not in op_names]
            if unknown:
                raise FastDartsError(f"{where} names {unknown}, not in the op set {list(op_names)}")
            if list(ops) != sorted(set(ops), key=op_names.index):
                raise FastDartsError(f"{where} {list(ops)} must list distinct ops in op-set order")
            if all(op == "none" for op in ops):
                raise FastDartsError(f"{where} holds only 'none'; an edge needs another op to be derivable")
            width = len(ops) if width is None else width
            if len(ops) != width:
                raise FastDartsError(f"{where} holds {len(ops)} ops, other edges {width}; every edge holds "
                                     f"the same number (α is one row per edge)")
            rows.append(ops)
        out[cell] = tuple(rows)
    return out


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
    from ..genotype import num_edges, select_edges

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
