"""The mixed operation of a supernet edge and its interchangeable backends.

``MixedOp`` owns one module per candidate op; *how* ``Σ_k w_k·op_k(x)`` is
evaluated is a backend, chosen by name:

- ``reference``: exactly the original DARTS code, every op's activations kept
  for backward. The executable spec every other backend is tested against.
- ``checkpoint``: ``torch.utils.checkpoint`` around the whole mixed op, the
  memory saver a user would try first. Its recompute runs the ops again, so
  BatchNorm would update its running statistics twice; we switch tracking off
  for the recompute (fairscale's ``patch_batchnorm`` idea), keeping the
  statistics identical to ``reference``.

- ``fused``: one autograd Function per edge that keeps no op activations and
  recomputes the ops one at a time in backward, with the fused BN kernels
  (``fused_mixed_op.py``, ``kernels/``). The default.

A backend is a function ``(mixed_op, x, weights, paths) -> y`` in
``MIXED_OP_BACKENDS``. ``paths`` (None: every op) is a tuple of op indices,
as path sampling chooses them (``methods/path_sampling.py``): only those ops
are computed, ``weights`` holding one weight per path; the first path is the
active one, the others contribute their gate gradient only (ProxylessNAS'
inactive op, whose output is detached).

An edge may carry a ``scale`` (PC-DARTS' edge normalisation, softmax(β) of
the edge): ``reference`` multiplies the edge output by it, as the original
code; the others fold it into the op weights (``Σ_k (s·w_k)·o_k``), so
nothing more is kept for ∂L/∂β.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from .errors import FastDartsError
from .fused_mixed_op import mixed_op_fused
from .ops import OPS

DEFAULT_BACKEND = "fused"


class MixedOp(nn.Module):
    """One supernet edge: every candidate op, mixed by the softmax weights."""

    def __init__(self, C: int, stride: int, op_names: Sequence[str], backend: str = DEFAULT_BACKEND,
                 aux_skip: bool = False):
        super().__init__()
        self.op_names = tuple(op_names)
        self.stride = stride
        if aux_skip:  # before the ops, as DARTS-' code registers it
            from .methods.aux_skip import make_aux_op

            self.auxiliary_op = make_aux_op(C, stride)
        self.ops = nn.ModuleList()
        for name in self.op_names:
            op = OPS[name](C, stride, False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            self.ops.append(op)
        self.backend = check_backend(backend)
        # P-DARTS' dropout after the skip connection (stride 1 only: on stride 2
        # it is a FactorizedReduce): None (no dropout, no random draws) or the
        # current rate, set by the search loop (``SearchNetwork.set_skip_dropout``).
        self.skip_dropout: float | None = None
        self.skip_index = (self.op_names.index("skip_connect")
                           if "skip_connect" in self.op_names and stride == 1 else None)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, paths: tuple[int, ...] | None = None,
                scale: torch.Tensor | None = None, aux_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``aux_weight``: DARTS-' β_t, with which the auxiliary skip is added."""
        if scale is not None:
            if self.backend == "reference":
                return scale * self.mixed(x, weights, paths, aux_weight)
            weights = weights * scale
            aux_weight = None if aux_weight is None else aux_weight * scale
        return self.mixed(x, weights, paths, aux_weight)

    def mixed(self, x: torch.Tensor, weights: torch.Tensor, paths: tuple[int, ...] | None = None,
              aux_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The ops' weighted sum on this edge's backend, plus the auxiliary skip."""
        weights, dropped_skip = self.split_skip_dropout(x, weights, paths)
        y = MIXED_OP_BACKENDS[self.backend](self, x, weights, paths)
        if dropped_skip is not None:
            y = y + dropped_skip
        if aux_weight is not None:
            from .methods.aux_skip import aux_output

            y = y + aux_output(self.auxiliary_op, self.backend, x, aux_weight)
        return y

    def split_skip_dropout(self, x: torch.Tensor, weights: torch.Tensor, paths: tuple[int, ...] | None):
        """With skip dropout on (training), the skip connection's term
        ``w·dropout(x)`` computed apart, and ``weights`` with that op's weight 0
        for the backend: every backend (and any recompute) then sees the one
        dropout mask autograd keeps, drawn once per forward. Else (weights, None)."""
        if self.skip_dropout is None or not self.training or self.skip_index is None:
            return weights, None
        position = (self.skip_index if paths is None else
                    next((i for i, k in enumerate(paths) if k == self.skip_index), None))
        if position is None:
            return weights, None
        dropped = F.dropout(x, self.skip_dropout, training=True)
        if paths is not None and position != 0:
            dropped = dropped.detach()  # an inactive path: its gate gradient only
        term = weights[position] * dropped
        mask = torch.ones(len(weights), dtype=weights.dtype, device=weights.device)
        mask[position] = 0
        return weights * mask, term

    def extra_repr(self) -> str:
        return f"stride={self.stride}, backend={self.backend!r}" + (
            f", skip_dropout={self.skip_dropout}" if self.skip_dropout is not None else "")


def mixed_op_reference(mixed: MixedOp, x: torch.Tensor, weights: torch.Tensor,
                       paths: tuple[int, ...] | None = None) -> torch.Tensor:
    """``Σ_k w_k·op_k(x)``, written as the original DARTS code writes it; with
    ``paths``, ProxylessNAS' binary-gated sum (inactive outputs detached)."""
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


def _reference_with_params(mixed: MixedOp, names: list[list[str]], x: torch.Tensor, weights: torch.Tensor,
                           *params: torch.Tensor) -> torch.Tensor:
    """``mixed_op_reference`` with the ops' parameters given, not read from the modules."""
    it = iter(params)
    return sum(w * functional_call(op, {n: next(it) for n in op_names}, (x,))
               for w, op, op_names in zip(weights, mixed.ops, names))


def running_stats_frozen_context(module: nn.Module):
    """``context_fn`` for ``torch.utils.checkpoint``: the recompute leaves
    ``module``'s BatchNorm running statistics as the forward left them."""
    return contextlib.nullcontext(), _running_stats_frozen(module)


def mixed_op_checkpoint(mixed: MixedOp, x: torch.Tensor, weights: torch.Tensor,
                        paths: tuple[int, ...] | None = None) -> torch.Tensor:
    """``reference`` under ``torch.utils.checkpoint``: nothing inside the edge is
    kept, everything is recomputed in backward."""
    if paths is not None:
        raise FastDartsError("path sampling does not run on the checkpoint backend; use --backend fused or reference")
    if not torch.is_grad_enabled():
        return mixed_op_reference(mixed, x, weights)
    # The parameters are arguments, so the recompute uses the forward's tensors:
    # by backward time a functional_call or a reload may have swapped them.
    named = [list(op.named_parameters()) for op in mixed.ops]
    return checkpoint(
        _reference_with_params, mixed, [[n for n, _ in ps] for ps in named], x, weights,
        *(p for ps in named for _, p in ps),
        use_reentrant=False,
        # Nothing inside draws random numbers (P-DARTS' skip dropout is drawn outside, in
        # MixedOp.mixed), so saving RNG state is waste.
        preserve_rng_state=False,
        context_fn=lambda: running_stats_frozen_context(mixed),
    )


MixedOpBackend = Callable[[MixedOp, torch.Tensor, torch.Tensor, "tuple[int, ...] | None"], torch.Tensor]

MIXED_OP_BACKENDS: dict[str, MixedOpBackend] = {
    "reference": mixed_op_reference,
    "checkpoint": mixed_op_checkpoint,
    "fused": mixed_op_fused,
}


def check_backend(name: str) -> str:
    if name not in MIXED_OP_BACKENDS:
        raise FastDartsError(f"unknown backend {name!r}; known backends: {', '.join(MIXED_OP_BACKENDS)}")
    return name
