"""PC-DARTS' partial channel connections (Xu et al., ICLR 2020; SPEC §8).

An edge with K > 1 runs its candidate ops on the first C/K channels of its
input only (the ops are built for C/K channels); the other channels bypass
them, through a 2x2 max pool of stride 2 on stride-2 edges. The edge output
is ``shuffle_K(cat[mixed(x[:, :C/K]), bypass(x[:, C/K:])])``.

``PartialChannelMixedOp`` is a ``MixedOp`` (same ``ops``, same backends, so
weights copy across positionally from the original's ``MixedOp``):

- ``reference``: the original code's forward, term for term;
- ``checkpoint``: the whole edge (slice, ops, bypass, shuffle, β scale)
  under ``torch.utils.checkpoint``;
- ``fused``: the ops through the fused Function (which keeps the slice, a
  view of x); the bypass through ``ScaledBypass``, which keeps only its
  input (another view of x) and recomputes the pool in backward; the
  concatenation and the shuffle keep nothing. So the edge keeps nothing
  beyond what a K=1 fused edge keeps.

On an odd-sized input the stride-2 ops give ceil(H/2) rows; the original's
pool gives floor(H/2) and the concatenation fails there. The bypass pools
with ``ceil_mode=True``, which equals the original on even sizes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from ..errors import FastDartsError
from ..mixed_op import DEFAULT_BACKEND, MixedOp, _reference_with_params


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """View (B, groups, C/groups, H, W), swap dims 1 and 2, flatten: output
    channel ``c·groups + g`` is input channel ``g·C/groups + c``."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def check_partial_channels(k, channels: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise FastDartsError(f"partial-channels K must be a positive integer, got {k!r}")
    if channels % k:
        raise FastDartsError(f"partial-channels K={k} does not divide the channels C={channels}; "
                             f"choose a K that divides {channels}")
    return k


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2, 2, ceil_mode=True)


class ScaledBypass(torch.autograd.Function):
    """``scale · bypass(x)`` (bypass: identity for stride 1, 2x2 max pool for
    stride 2) that keeps only x and the scale for backward: the pool's
    indices (int64, larger than its output) are recomputed."""

    @staticmethod
    def forward(ctx, x, scale, stride):
        ctx.stride = stride
        ctx.save_for_backward(x, scale)
        with torch.no_grad():
            y = _pool(x) if stride == 2 else x
            return y * scale

    @staticmethod
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        need_x, need_scale = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dscale = None
        if ctx.stride == 2:
            with torch.enable_grad():
                xd = x.detach().requires_grad_(need_x)
                y = _pool(xd)
            if need_scale:
                dscale = (dy * y.detach()).sum().reshape(scale.shape)
            if need_x:
                (dx,) = torch.autograd.grad(y, xd, dy * scale)
        else:
            if need_scale:
                dscale = (dy * x).sum().reshape(scale.shape)
            if need_x:
                dx = dy * scale
        return dx, dscale, None


def _bypass_reference(edge: "PartialChannelMixedOp", x2: torch.Tensor) -> torch.Tensor:
    return edge.mp(x2) if edge.stride == 2 else x2


def _edge_reference(edge: "PartialChannelMixedOp", y1: torch.Tensor, x2: torch.Tensor,
                    scale: torch.Tensor | None) -> torch.Tensor:
    y = channel_shuffle(torch.cat([y1, _bypass_reference(edge, x2)], dim=1), edge.k)
    return y if scale is None else scale * y  # the original's weights2[j] * edge(x)


def _edge_checkpointed(edge: "PartialChannelMixedOp", names: list[list[str]], aux_names: list[str],
                       x: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor | None,
                       aux_weight: torch.Tensor | None, dropped_skip: torch.Tensor | None,
                    *params: torch.Tensor) -> torch.Tensor:
    x1, x2 = edge.split(x)
    n_ops = sum(len(n) for n in names)
    y1 = _reference_with_params(edge, names, x1, weights, *params[:n_ops])
    if dropped_skip is not None:  # drawn outside, so the recompute sees the forward's mask
        y1 = y1 + dropped_skip
    if aux_weight is not None:
        y1 = y1 + aux_weight * functional_call(edge.auxiliary_op, dict(zip(aux_names, params[n_ops:])), (x1,))
    return _edge_reference(edge, y1, x2, scale)


class PartialChannelMixedOp(MixedOp):
    """A PC-DARTS edge for C channels: the candidate ops see the first C/K."""

    def __init__(self, C: int, stride: int, op_names: Sequence[str], backend: str = DEFAULT_BACKEND, k: int = 4,
                 aux_skip: bool = False):
        check_partial_channels(k, C)
        super().__init__(C // k, stride, op_names, backend, aux_skip)
        self.k = k
        self.mp = nn.MaxPool2d(2, 2, ceil_mode=True)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[1] // self.k
        return x[:, :c], x[:, c:]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, paths: tuple[int, ...] | None = None,
                scale: torch.Tensor | None = None, aux_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``aux_weight``: DARTS-' β_t; its auxiliary skip sits inside the mixed op (on the C/K channels)."""
        x1, x2 = self.split(x)
        if self.backend == "reference":
            return _edge_reference(self, self.mixed(x1, weights, paths, aux_weight), x2, scale)
        if self.backend == "checkpoint":
            if paths is not None:
                raise FastDartsError("path sampling does not run on the checkpoint backend; "
                                     "use --backend fused or reference")
            if not torch.is_grad_enabled():
                return _edge_reference(self, self.mixed(x1, weights, None, aux_weight), x2, scale)
            from ..mixed_op import running_stats_frozen_context

            named = [list(op.named_parameters()) for op in self.ops]
            aux = list(self.auxiliary_op.named_parameters()) if aux_weight is not None else []
            # Drawn here, outside the checkpoint: its recompute draws nothing (preserve_rng_state=False).
            weights, dropped_skip = self.split_skip_dropout(x1, weights, None)
            return checkpoint(_edge_checkpointed, self, [[n for n, _ in ps] for ps in named], [n for n, _ in aux],
                              x, weights, scale, aux_weight, dropped_skip, *(p for ps in named for _, p in ps),
                              *(p for _, p in aux), use_reentrant=False, preserve_rng_state=False,
                              context_fn=lambda: running_stats_frozen_context(self))
        # fused: β folded into the op weights, the bypass scaled by a Function that keeps only its input.
        if scale is not None:
            weights = weights * scale
            aux_weight = None if aux_weight is None else aux_weight * scale
        y1 = self.mixed(x1, weights, paths, aux_weight)
        if scale is None:
            y2 = ScaledBypass.apply(x2, _one(x2), 2) if self.stride == 2 else x2
        else:
            y2 = ScaledBypass.apply(x2, scale, self.stride)
        return channel_shuffle(torch.cat([y1, y2.to(y1.dtype)], dim=1), self.k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


def _one(x: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=x.dtype, device=x.device)
