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
from torch.utils.checkpoint import checkpoint

from ..errors import FastDartsError
from ..method import Option, SearchMethod, register_method
from ..mixed_op import DEFAULT_BACKEND, MixedOp
from ..mixed_op_checkpoint import PATHS_UNSUPPORTED
from ..mixed_op_reference import reference_with_params, running_stats_frozen_context


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


def _edge_checkpointed(edge: "PartialChannelMixedOp", names: list[list[str]], term_names: list[list[str]],
                       x: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor | None, extras: dict | None,
                       splits: list, n_term_params: list[int], *params: torch.Tensor) -> torch.Tensor:
    x1, x2 = edge.split(x)
    n_ops = sum(len(n) for n in names)
    y1 = reference_with_params(edge, names, x1, weights, *params[:n_ops])
    # The terms' parts drawn outside (a dropout mask) are in `splits`, so the recompute sees the forward's.
    rest, term_params = iter(params[n_ops:]), []
    for n in n_term_params:
        term_params.append([next(rest) for _ in range(n)])
    y1 = edge.add_terms(x1, y1, splits, None, extras, term_params)
    return _edge_reference(edge, y1, x2, scale)


class PartialChannelMixedOp(MixedOp):
    """A PC-DARTS edge for C channels: the candidate ops (and the edge terms) see the first C/K."""

    def __init__(self, C: int, stride: int, op_names: Sequence[str], backend: str = DEFAULT_BACKEND, k: int = 4,
                 terms: Sequence = ()):
        check_partial_channels(k, C)
        super().__init__(C // k, stride, op_names, backend, terms)
        self.k = k
        self.mp = nn.MaxPool2d(2, 2, ceil_mode=True)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[1] // self.k
        return x[:, :c], x[:, c:]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, paths: tuple[int, ...] | None = None,
                scale: torch.Tensor | None = None, extras: dict | None = None) -> torch.Tensor:
        x1, x2 = self.split(x)
        if self.backend == "reference":
            return _edge_reference(self, self.mixed(x1, weights, paths, None, extras), x2, scale)
        if self.backend == "checkpoint":
            if paths is not None:
                raise FastDartsError(PATHS_UNSUPPORTED)
            if not torch.is_grad_enabled():
                return _edge_reference(self, self.mixed(x1, weights, None, None, extras), x2, scale)
            named = [list(op.named_parameters()) for op in self.ops]
            terms = self.term_parameters()
            # Drawn here, outside the checkpoint: its recompute draws nothing (preserve_rng_state=False).
            weights, splits = self.split_terms(x1, weights, None)
            return checkpoint(_edge_checkpointed, self, [[n for n, _ in ps] for ps in named],
                              [[n for n, _ in ps] for ps in terms], x, weights, scale, extras, splits,
                              [len(ps) for ps in terms], *(p for ps in named for _, p in ps),
                              *(p for ps in terms for _, p in ps), use_reentrant=False, preserve_rng_state=False,
                              context_fn=lambda: running_stats_frozen_context(self))
        # fused: the edge's weight folded into the op weights, the bypass scaled by a Function that keeps only
        # its input.
        if scale is not None:
            weights = weights * scale
        y1 = self.mixed(x1, weights, paths, scale, extras)
        if scale is None:
            y2 = ScaledBypass.apply(x2, _one(x2), 2) if self.stride == 2 else x2
        else:
            y2 = ScaledBypass.apply(x2, scale, self.stride)
        return channel_shuffle(torch.cat([y1, y2.to(y1.dtype)], dim=1), self.k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


def _one(x: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=x.dtype, device=x.device)


@register_method
class PartialChannels(SearchMethod):
    """PC-DARTS' partial channel connections: every edge a ``PartialChannelMixedOp``."""

    name = "partial-channels"
    options = (Option("partial_channels", 1, "PC-DARTS: the ops of an edge see 1/K of its channels",
                      kind="positive_int", metavar="K"),)

    @classmethod
    def check(cls, config, from_preset):
        return dict(partial_channels=check_partial_channels(config.partial_channels, config.channels))

    @classmethod
    def channel_step(cls, config) -> int:
        return config.partial_channels

    def check_network(self, model, C, backend) -> None:
        if C is not None:
            check_partial_channels(self.config.partial_channels, C)

    def build_edge(self, C, stride, op_names, backend, terms):
        return PartialChannelMixedOp(C, stride, op_names, backend, k=self.config.partial_channels, terms=terms)
