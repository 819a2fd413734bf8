"""Discrete cells: the genotype, its JSON form, and its derivation from α (SPEC §3).

A genotype lists, for each intermediate node of a normal and a reduction cell,
the two kept incoming edges as ``(op_name, input_node)``. Node numbering
follows the original DARTS code: 0 and 1 are the cell inputs c_{k-2} and
c_{k-1}, intermediate node j has index 2+j. Everything a user can hand in (a
JSON file, a dict) is validated here, so the networks built from a genotype
can trust it.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .edge_ops import check_edge_ops
from .errors import FastDartsError
from .files import write_text
from .ops import PRIMITIVES, resolve_ops

Edge = tuple[str, int]

_KEYS = ("normal", "normal_concat", "reduce", "reduce_concat")


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error line quotes a bad value, not a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def node_name(index: int) -> str:
    """Readable name of a cell node index: c_{k-2}, c_{k-1}, then node j."""
    return ("c_{k-2}", "c_{k-1}")[index] if index < 2 else f"node {index - 2}"


def _edges(value: Any, field: str) -> tuple[Edge, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise FastDartsError(f"{field} must be a list of [op_name, input_node] pairs, got {_short(value)}")
    edges = []
    for position, edge in enumerate(value):
        if (isinstance(edge, (str, bytes)) or not isinstance(edge, Sequence) or len(edge) != 2
                or not isinstance(edge[0], str) or not _is_int(edge[1])):
            raise FastDartsError(f"{field} edge {position} must be an [op_name, input_node] pair, got {_short(edge)}")
        edges.append((edge[0], int(edge[1])))
    if not edges:
        raise FastDartsError(f"{field} has no edges; a cell needs 2 per intermediate node")
    if len(edges) % 2:
        raise FastDartsError(f"{field} has {len(edges)} edges; a cell needs 2 per intermediate node (an even number)")
    for position, (op, source) in enumerate(edges):
        node = position // 2
        where = f"{field} edge {position} (node {node})"
        if op not in PRIMITIVES:
            raise FastDartsError(f"{where} uses unknown op {op!r}; known ops: {', '.join(PRIMITIVES)}")
        if op == "none":
            raise FastDartsError(f"{where} keeps the op 'none'; a derived cell never keeps the zero op")
        if not 0 <= source <= 1 + node:
            raise FastDartsError(
                f"{where} takes input {source}, which is not an earlier node; node {node} may take inputs "
                f"0..{1 + node} (0 = c_{{k-2}}, 1 = c_{{k-1}}, 2+j = node j)")
    return tuple(edges)


def _concat(value: Any, field: str, steps: int) -> tuple[int, ...]:
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
            or not all(_is_int(i) for i in value)):
        raise FastDartsError(f"{field} must be a list of node indices, got {_short(value)}")
    concat = tuple(int(i) for i in value)
    if not concat:
        raise FastDartsError(f"{field} is empty; the output node must concatenate at least one node")
    outside = [i for i in concat if not 2 <= i <= steps + 1]
    if outside:
        raise FastDartsError(
            f"{field} has {outside} outside 2..{steps + 1} (the intermediate nodes of a {steps}-step cell)")
    if len(set(concat)) != len(concat):
        raise FastDartsError(f"{field} {list(concat)} names a node twice")
    return concat


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Genotype:
    """A discrete normal + reduction cell, validated on construction."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        normal = _edges(self.normal, "normal")
        reduce = _edges(self.reduce, "reduce")
        if len(normal) != len(reduce):
            raise FastDartsError(
                f"normal has {len(normal) // 2} intermediate nodes but reduce has {len(reduce) // 2}; "
                "both cells must have the same number of steps")
        steps = len(normal) // 2
        object.__setattr__(self, "normal", normal)
        object.__setattr__(self, "reduce", reduce)
        object.__setattr__(self, "normal_concat", _concat(self.normal_concat, "normal_concat", steps))
        object.__setattr__(self, "reduce_concat", _concat(self.reduce_concat, "reduce_concat", steps))

    @property
    def steps(self) -> int:
        return len(self.normal) // 2

    def to_dict(self) -> dict[str, list]:
        return {
            "normal": [list(edge) for edge in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(edge) for edge in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Genotype:
        if not isinstance(d, dict):
            raise FastDartsError(
                f"a genotype must be a JSON object with keys {', '.join(_KEYS)}, got {type(d).__name__}")
        missing = [k for k in _KEYS if k not in d]
        extra = [str(k) for k in d if k not in _KEYS]
        if missing or extra:
            problems = ([f"missing key(s) {', '.join(missing)}"] if missing else []) + (
                [f"unexpected key(s) {', '.join(extra)}"] if extra else [])
            raise FastDartsError(f"genotype has {'; '.join(problems)} (expected {', '.join(_KEYS)})")
        return cls(**{k: d[k] for k in _KEYS})

    def to_json(self) -> str:
        """One key per line, each edge list on one line: short enough to read and diff."""
        lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in self.to_dict().items())
        return "{\n" + lines + "\n}"

    @classmethod
    def from_json(cls, s: str) -> Genotype:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise FastDartsError(f"genotype is not valid JSON: {e}") from None
        except RecursionError:  # '[' nested a hundred thousand times
            raise FastDartsError("genotype JSON is nested too deeply to be a genotype") from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Genotype:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise FastDartsError(f"cannot read genotype file {path}: {getattr(e, 'strerror', None) or e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise FastDartsError(f"genotype file {path} is not valid JSON: {e}") from None
        except RecursionError:  # '[' nested a hundred thousand times
            raise FastDartsError(f"genotype file {path} is nested too deeply to be a genotype") from None
        try:
            return cls.from_dict(d)
        except FastDartsError as e:
            raise FastDartsError(f"genotype file {path}: {e}") from None

    def __str__(self) -> str:
        lines = []
        for title, edges, concat in (("normal cell", self.normal, self.normal_concat),
                                     ("reduce cell", self.reduce, self.reduce_concat)):
            lines.append(f"{title}:")
            for node in range(len(edges) // 2):
                pair = edges[2 * node: 2 * node + 2]
                lines.append(f"  node {node} = " + " + ".join(f"{op}({node_name(src)})" for op, src in pair))
            lines.append(f"  output = concat({', '.join(node_name(i) for i in concat)})")
        return "\n".join(lines)


DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=[2, 3, 4, 5],
)
DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5],
)
DARTS = DARTS_V2

GENOTYPES: dict[str, Genotype] = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS}


def get_genotype(name_or_path: str | Path) -> Genotype:
    """A published genotype by name, else a genotype JSON file."""
    if str(name_or_path) in GENOTYPES:
        return GENOTYPES[str(name_or_path)]
    if not Path(name_or_path).is_file():
        raise FastDartsError(
            f"unknown genotype {str(name_or_path)!r}: not a known name ({', '.join(GENOTYPES)}) and no such file")
    return Genotype.load(name_or_path)


def num_edges(steps: int) -> int:
    """Edges of a cell: intermediate node i has 2+i incoming edges."""
    return sum(2 + i for i in range(steps))


def select_edges(weights: Sequence[Sequence[float]], op_names: Sequence[str] | Sequence[Sequence[str]],
                 steps: int) -> tuple[Edge, ...]:
    """The kept edges of one cell from its op weights (softmax(α)), as the
    original DARTS ``Network.genotype()._parse``: per node the 2 edges whose
    strongest non-`none` weight is largest (stable: ties keep the earlier
    edge), strongest first, each with its strongest non-`none` op (ties: the
    earlier op). `none` only rescales a node, so it never decides.
    ``op_names``: the op of each column, or one such list per edge (when
    edges hold different ops)."""
    per_edge = [op_names] * len(weights) if op_names and isinstance(op_names[0], str) else list(op_names)
    gene: list[Edge] = []
    start = 0
    for node in range(steps):
        rows = weights[start: start + 2 + node]
        names = per_edge[start: start + 2 + node]
        counted = [[k for k, name in enumerate(ops) if name != "none"] for ops in names]
        if not all(counted):
            raise FastDartsError("the op list has only 'none'; a cell needs at least one other op")
        strength = [max(row[k] for k in ks) for row, ks in zip(rows, counted)]
        for source in sorted(range(2 + node), key=lambda i: -strength[i])[:2]:
            ks = counted[source]
            best = ks[0]
            for k in ks:
                if rows[source][k] > rows[source][best]:
                    best = k
            gene.append((names[source][best], source))
        start += 2 + node
    return tuple(gene)


def checked_tensor(value: Any, field: str, expected: tuple[int, ...], meaning: str) -> torch.Tensor:
    """``value`` (a tensor or numeric array) as a finite CPU tensor of ``expected``
    shape, in its own precision (at least float32) like the original code."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
    elif isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
        t = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise FastDartsError(f"{field} must be a numeric torch tensor or numpy array, got {type(value).__name__}")
    if tuple(t.shape) != expected:
        raise FastDartsError(f"{field} has shape {tuple(t.shape)}, expected {expected} ({meaning})")
    if t.dtype != torch.float64:
        t = t.float()
    if not torch.isfinite(t).all():
        raise FastDartsError(f"{field} contains NaN or inf; the search diverged")
    return t


def _weights(alpha: Any, field: str, expected: tuple[int, int], steps: int) -> torch.Tensor:
    """softmax(α) per edge, in α's precision."""
    t = checked_tensor(alpha, field, expected, f"{expected[0]} edges for steps={steps}, {expected[1]} ops")
    return torch.softmax(t, dim=-1)


# strengths(cell, softmax α) -> what ranks the ops; select(cell, weights, edge ops, steps) -> a cell or None.
Strengths = Callable[[str, torch.Tensor], torch.Tensor]
CellSelector = Callable[[str, list, Sequence[Sequence[str]], int], "tuple[Edge, ...] | None"]


def derive_genotype(alpha_normal: torch.Tensor | np.ndarray, alpha_reduce: torch.Tensor | np.ndarray,
                    op_names: Sequence[str], steps: int = 4, multiplier: int = 4, *,
                    edge_ops: dict[str, Sequence[Sequence[str]]] | None = None,
                    strengths: Strengths | None = None, select_cell: CellSelector | None = None) -> Genotype:
    """The discrete cells the architecture weights α point to (SPEC §3).
    ``edge_ops``: the ops each edge holds (α's columns in their order; None:
    every op). A method may change what ranks an op (``strengths``, from
    softmax(α) per cell type, e.g. weighted per edge) and how a cell is
    chosen from those strengths (``select_cell``, e.g. under a limit; None
    from it: the DARTS choice, ``select_edges``)."""
    op_names = resolve_ops(op_names)
    if not _is_int(steps) or steps < 1:
        raise FastDartsError(f"steps must be a positive integer, got {steps!r}")
    if not _is_int(multiplier) or not 1 <= multiplier <= steps:
        raise FastDartsError(f"multiplier must be in 1..steps={steps}, got {multiplier!r}")
    edge_ops = check_edge_ops(edge_ops, op_names, num_edges(steps))
    concat = tuple(range(2 + steps - multiplier, steps + 2))
    cells = []
    for cell, alpha in (("normal", alpha_normal), ("reduce", alpha_reduce)):
        expected = (num_edges(steps), len(edge_ops[cell][0]))
        weights = _weights(alpha, f"alpha_{cell}", expected, steps)
        if strengths is not None:
            weights = strengths(cell, weights)
        gene = None if select_cell is None else select_cell(cell, weights.tolist(), edge_ops[cell], steps)
        cells.append(gene if gene is not None else select_edges(weights.tolist(), edge_ops[cell], steps))
    return Genotype(normal=cells[0], normal_concat=concat, reduce=cells[1], reduce_concat=concat)


def genotype_op_weights(genotype: Genotype, edge_ops: dict[str, Sequence[Sequence[str]]],
                        dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The genotype as op weights of the supernet whose edges hold ``edge_ops``:
    per cell type an (edges, ops) matrix with 1 on each kept edge's op and 0
    elsewhere (a discrete sub-network: the architecture scored inside the
    supernet, SPEC §9)."""
    out = {}
    for cell in ("normal", "reduce"):
        lists = edge_ops[cell]
        gene = getattr(genotype, cell)
        if num_edges(genotype.steps) != len(lists):
            raise FastDartsError(f"the genotype has {genotype.steps} nodes per cell; the supernet's cells have "
                                 f"{len(lists)} edges")
        w = torch.zeros(len(lists), len(lists[0]), dtype=dtype)
        for i, (op, src) in enumerate(gene):
            edge = num_edges(i // 2) + src
            if op not in lists[edge]:
                raise FastDartsError(f"{cell} edge {src}->node {i // 2} keeps {op!r}, which that supernet edge does "
                                     f"not hold ({', '.join(lists[edge])})")
            w[edge, list(lists[edge]).index(op)] = 1.0
        out[cell] = w
    return out
