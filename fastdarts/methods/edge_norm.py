"""PC-DARTS' edge normalisation (SPEC §8).

One weight β per edge and cell type; node j sums its incoming edges weighted
by the softmax of their β over the node's incoming edges:
``node_j = Σ_i softmax(β_{·j})_i · edge_ij(x_i)``. The derivation ranks op o
on edge (i, j) by ``softmax(α_ij)_o · softmax(β_{·j})_i``
(``derive_with_beta``: ``derive_genotype`` with ``strengths=beta_strengths(...)``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FastDartsError
from ..genotype import Strengths, checked_tensor, derive_genotype, num_edges
from ..method import Option, SearchMethod, register_method


def node_segments(steps: int) -> list[tuple[int, int]]:
    """(first edge, number of edges) of each intermediate node: node i has 2+i."""
    out, start = [], 0
    for i in range(steps):
        out.append((start, 2 + i))
        start += 2 + i
    return out


def edge_weights(beta: torch.Tensor, steps: int) -> torch.Tensor:
    """softmax(β) over each node's incoming edges, one weight per edge."""
    return torch.cat([F.softmax(beta[start:start + n], dim=-1) for start, n in node_segments(steps)])


def node_weights_line(weights: list[float], steps: int) -> str:
    """softmax(β) of one cell type for the log: nodes split by '|'."""
    return " | ".join(" ".join(f"{v:.3f}" for v in weights[start:start + n]) for start, n in node_segments(steps))


def beta_strengths(beta_normal: Any, beta_reduce: Any, steps: int) -> Strengths:
    """``derive_genotype``'s ``strengths`` for PC-DARTS: op o on edge (i, j)
    ranked by softmax(α_ij)_o · softmax(β_{·j})_i, as its original code (β
    checked: shape, finite)."""
    scales = {cell: edge_weights(checked_tensor(beta, f"beta_{cell}", (num_edges(steps),),
                                                f"one weight per edge for steps={steps}"), steps)
              for cell, beta in (("normal", beta_normal), ("reduce", beta_reduce))}

    def strengths(cell: str, weights: torch.Tensor) -> torch.Tensor:
        # Multiplied in α's precision, as the original's float32 numpy arrays (its ties are ours).
        return weights * scales[cell].to(weights.dtype)[:, None]

    return strengths


def derive_with_beta(alpha_normal: Any, alpha_reduce: Any, op_names, steps: int = 4, multiplier: int = 4,
                     beta_normal: Any = None, beta_reduce: Any = None, **options: Any):
    """``derive_genotype`` with PC-DARTS' β of both cell types (or neither: DARTS' derivation)."""
    if (beta_normal is None) != (beta_reduce is None):
        raise FastDartsError("give both beta_normal and beta_reduce, or neither")
    strengths = None if beta_normal is None else beta_strengths(beta_normal, beta_reduce, steps)
    return derive_genotype(alpha_normal, alpha_reduce, op_names, steps, multiplier, strengths=strengths, **options)


@register_method
class EdgeNormalisation(SearchMethod):
    """β per edge and cell type, created after α; each edge's output scaled by softmax(β) over its node."""

    name = "edge-norm"
    options = (Option("edge_norm", False, "PC-DARTS' edge normalisation (a weight β per edge)", kind="bool"),)

    @classmethod
    def check(cls, config, from_preset):
        return dict(edge_norm=bool(config.edge_norm))

    def setup_network(self, model) -> list[nn.Parameter]:
        k = num_edges(model.steps)
        model.beta_normal = nn.Parameter(1e-3 * torch.randn(k))
        model.beta_reduce = nn.Parameter(1e-3 * torch.randn(k))
        return [model.beta_normal, model.beta_reduce]

    def edge_scales(self, model) -> list[torch.Tensor]:
        return [edge_weights(b, model.steps) for b in (model.beta_normal, model.beta_reduce)]

    def op_strengths(self, model, cell: str, weights: torch.Tensor) -> torch.Tensor:
        beta = model.beta_normal if cell == "normal" else model.beta_reduce
        return beta_strengths(beta, beta, model.steps)(cell, weights)

    def epoch_figures(self, run, entry: dict) -> dict:
        return {"betas": edge_weights_of(run.model)}

    def epoch_log(self, run, entry: dict) -> str:
        steps = run.model.steps
        return (f"edge weights (softmax β) normal: {node_weights_line(entry['betas']['normal'], steps)}  "
                f"reduce: {node_weights_line(entry['betas']['reduce'], steps)}")


def edge_weights_of(model) -> dict[str, list[float]]:
    """softmax(β) per node's incoming edges of both cell types, as plain lists (logs, plots)."""
    return {name: edge_weights(b.detach().float(), model.steps).cpu().tolist()
            for name, b in (("normal", model.beta_normal), ("reduce", model.beta_reduce))}
