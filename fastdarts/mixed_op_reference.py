"""The ``reference`` mixed-op backend: the executable spec every other backend is tested against.

``Σ_k w_k·op_k(x)`` exactly as the original DARTS code writes it, every op's
activations kept for backward. With ``paths`` (a tuple of op indices) only
those ops are computed, ``weights`` holding one weight per path; the first
path is the active one, the others contribute their gate gradient only
(their output detached). Also here: the BatchNorm rule every recomputing
backend follows (a recompute leaves the running statistics as the forward
left them).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.func import functional_call


def mixed_op_reference(mixed: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                       paths: tuple[int, ...] | None = None) -> torch.Tensor:
    """``Σ_k w_k·op_k(x)``, written as the original DARTS code writes it; with
    ``paths``, a binary-gated sum over those ops (inactive outputs detached)."""
    if paths is None:
        return sum(w * op(x) for w, op in zip(weights, mixed.ops))
    out = weights[0] * mixed.ops[paths[0]](x)
    for w, k in zip(weights[1:], paths[1:]):
        out = out + w * mixed.ops[k](x).detach()
    return out


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module):
    """BatchNorm in training mode that leaves its running statistics as they
    are. Momentum 0 turns the update into ``r·1 + batch·0 == r`` exactly; the
    batch counter is restored after. (Disabling tracking instead would change
    what BN saves for backward, which checkpoint's recompute check rejects.)"""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def reference_with_params(mixed: nn.Module, names: list[list[str]], x: torch.Tensor, weights: torch.Tensor,
                           *params: torch.Tensor) -> torch.Tensor:
    """``mixed_op_reference`` with the ops' parameters given, not read from the modules."""
    it = iter(params)
    return sum(w * functional_call(op, {n: next(it) for n in op_names}, (x,))
               for w, op, op_names in zip(weights, mixed.ops, names))


def running_stats_frozen_context(module: nn.Module):
    """``context_fn`` for ``torch.utils.checkpoint``: the recompute leaves
    ``module``'s BatchNorm running statistics as the forward left them."""
    return contextlib.nullcontext(), _running_stats_frozen(module)
