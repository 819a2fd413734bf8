"""PC-DARTS' edge normalisation (SPEC §8).

One weight β per edge and cell type; node j sums its incoming edges weighted
by the softmax of their β over the node's incoming edges:
``node_j = Σ_i softmax(β_{·j})_i · edge_ij(x_i)``. The derivation ranks op o
on edge (i, j) by ``softmax(α_ij)_o · softmax(β_{·j})_i``
(``genotype.derive_genotype(..., beta_normal=, beta_reduce=)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
