"""The ops each edge of a supernet holds (SPEC §1).

By default every edge of both cell types holds every op of the op set; a
method may give each edge its own list (a subset of the op set in its
order, the same number on every edge, so α stays one (edges, ops) matrix
per cell type): ``{"normal": [ops of edge 0, ...], "reduce": [...]}``.
"""
from __future__ import annotations

from typing import Sequence

from .errors import FastDartsError

CELLS = ("normal", "reduce")

EdgeOps = dict[str, tuple[tuple[str, ...], ...]]


def full_edge_ops(op_names: Sequence[str], num_edges: int) -> EdgeOps:
    """Every edge of both cell types holding every op (DARTS)."""
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
