"""DARTS-' auxiliary skip connection (Chu et al., ICLR 2021; SPEC §8).

Every mixed op adds ``β_t·aux(x)``: aux is the identity on stride-1 edges
and a FactorizedReduce (affine=False) on stride-2 edges, created before the
candidate ops as in the authors' code (``Meituan-AutoML/DARTS-``,
``model_search.MixedOp``), so weights copy across positionally. β_t falls
linearly from 1 to 0 over the search: ``β_t = 1 − t/E`` in epoch t (0-based)
of E, the original's ``DecayScheduler(decay_type='linear')`` stepped at the
start of each epoch. The skip carries the gradient the candidate skip
connection would otherwise win with, so the α of ``skip_connect`` no longer
grows unchecked; β_t reaching 0 leaves the supernet DARTS' own.

β_t lives in a device tensor (``SearchNetwork.aux_skip_weight``) that the
loop fills each epoch: no host value is baked into a step.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from ..ops import FactorizedReduce, Identity


def aux_skip_weight(epoch: int, epochs: int) -> float:
    """β_t of epoch ``epoch`` (0-based) of ``epochs``."""
    return 1.0 - epoch / epochs


def make_aux_op(C: int, stride: int) -> nn.Module:
    return FactorizedReduce(C, C, affine=False) if stride == 2 else Identity()


def _aux_with_params(aux: nn.Module, names: list[str], x: torch.Tensor, weight: torch.Tensor,
                     *params: torch.Tensor) -> torch.Tensor:
    return weight * functional_call(aux, dict(zip(names, params)), (x,))


def aux_output(aux: nn.Module, backend: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight · aux(x)`` on ``backend``: the reference keeps what autograd
    keeps; ``checkpoint`` recomputes the FactorizedReduce; ``fused`` runs it
    as a one-op fused edge (keeps x and the BN statistics only)."""
    if type(aux) is Identity:
        return weight * x  # keeps x, which the edge keeps anyway
    if backend == "fused":
        from ..fused_mixed_op import fused_single_op

        return fused_single_op(aux, x, weight.reshape(1), stride=2)
    if backend == "checkpoint" and torch.is_grad_enabled():
        from ..mixed_op import running_stats_frozen_context

        names, params = zip(*aux.named_parameters())
        return checkpoint(_aux_with_params, aux, list(names), x, weight, *params, use_reentrant=False,
                          preserve_rng_state=False, context_fn=lambda: running_stats_frozen_context(aux))
    return weight * aux(x)
