"""The ``fused`` mixed-op backend: memory flat in the number of candidate ops.

``y = Σ_k w_k·o_k(x)`` as one ``torch.autograd.Function`` that keeps only the
edge input x (which the graph holds anyway), the softmax weights and two
numbers per channel and op (the BN batch statistics). Backward rebuilds the
candidates one at a time, so at most one op's activations exist at once
(SPEC §6):

- ``none`` is skipped exactly: no compute, zero gradient;
- ``skip_connect`` (stride 1) is x itself: ``∂L/∂w = ⟨dy, x⟩``, ``∂x += w·dy``;
- every conv op starts with ReLU(x): computed once per edge, forward and
  backward, and its backward applied once to the summed gradient;
- every parametric op ends in BN(affine=False), which is fused with the
  weighted accumulation (``kernels.bn_accumulate``): forward normalises and
  accumulates in one pass into an fp32 buffer; backward gets ``∂L/∂w_k =
  ⟨dy, o_k⟩`` from the reduction the BN backward computes anyway, so no o_k is
  ever stored.

Running statistics move exactly once per forward, as the reference's: the
final BN's through ``torch.batch_norm_update_stats`` (the same update
``nn.BatchNorm2d`` makes), inner BNs (sep conv) by calling the module; the
recompute uses batch statistics without touching them (inplace_abn's rule).
Every parameter the ops use is an input of the Function, so its gradient
flows through autograd's normal accumulation (hooks, DDP).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FastDartsError
from .kernels.backend import KernelOps, kernel_ops
from .kernels.bn_accumulate import accumulator_dtype
from .ops import DilConv, FactorizedReduce, Identity, ReLUConvBN, SepConv, Zero

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class _Candidate:
    """One op of an edge, split into its body and its final BN.

    kind: ``zero``, ``identity`` or ``bn`` (``z = body(input)``, ``o = BN(z)``).
    on_relu: the body's input is ReLU(x) (conv ops), not x (pools).
    """
    kind: str
    index: int
    body: list[nn.Module] = field(default_factory=list)
    bn: _BN | None = None
    on_relu: bool = False
    pool_is_max: bool | None = None       # a 3x3 pool: max (True) or average (False)
    factorized_reduce: FactorizedReduce | None = None
    params: list[nn.Parameter] = field(default_factory=list)


def _conv_candidate(index: int, seq: nn.Sequential) -> _Candidate:
    mods = list(seq)
    if not (isinstance(mods[0], nn.ReLU) and isinstance(mods[-1], _BN)):
        raise FastDartsError(f"fused backend: op {index} is not ReLU -> ... -> BN: {seq}")
    return _Candidate("bn", index, body=mods[1:-1], bn=mods[-1], on_relu=True)


def _candidate(index: int, op: nn.Module) -> _Candidate:
    if isinstance(op, Zero):
        return _Candidate("zero", index)
    if isinstance(op, Identity):
        return _Candidate("identity", index)
    if isinstance(op, FactorizedReduce):
        cand = _Candidate("bn", index, bn=op.bn, on_relu=True, factorized_reduce=op)
    elif isinstance(op, (ReLUConvBN, DilConv, SepConv)):
        cand = _conv_candidate(index, op.op)
    elif isinstance(op, nn.Sequential) and isinstance(op[0], nn.ReLU):
        cand = _conv_candidate(index, op)
    elif isinstance(op, nn.Sequential) and len(op) == 2 and isinstance(op[0], (nn.MaxPool2d, nn.AvgPool2d)) \
            and isinstance(op[1], _BN):
        pool = op[0]
        if not (pool.kernel_size in (3, (3, 3)) and pool.padding in (1, (1, 1)) and not pool.ceil_mode
                and getattr(pool, "count_include_pad", False) is False):
            raise FastDartsError(f"fused backend: op {index} is not a 3x3 pool with padding 1: {pool}")
        cand = _Candidate("bn", index, bn=op[1], pool_is_max=isinstance(pool, nn.MaxPool2d))
    else:
        raise FastDartsError(f"fused backend: no fused form for op {index} ({type(op).__name__})")
    if cand.bn.affine:
        raise FastDartsError(f"fused backend: op {index} ends in an affine BN; the supernet's are affine=False")
    owner = cand.factorized_reduce or nn.ModuleList(cand.body)
    cand.params = [p for name, p in owner.named_parameters() if not name.startswith("bn.")]
    return cand


def _run_body(cand: _Candidate, inp: torch.Tensor, update_stats: bool, stride: int, ops: KernelOps) -> torch.Tensor:
    """z = body(inp). Inner BNs update their running statistics only when
    ``update_stats`` (the forward); the recompute uses the batch statistics
    alone, which gives the same output without a second update."""
    if cand.pool_is_max is not None:
        return ops.pool3x3(inp, stride, cand.pool_is_max)
    if cand.factorized_reduce is not None:
        fr = cand.factorized_reduce
        a, b = fr.conv_1(inp), fr.conv_2(inp[:, :, 1:, 1:])
        if b.shape[-2:] != a.shape[-2:]:
            b = F.pad(b, (0, a.shape[-1] - b.shape[-1], 0, a.shape[-2] - b.shape[-2]))
        return torch.cat([a, b], dim=1)
    h = inp
    for m in cand.body:
        if isinstance(m, _BN) and not update_stats and m.training:
            h = F.batch_norm(h, None, None, m.weight, m.bias, True, 0.0, m.eps)
        else:
            h = m(h)
    return h


def _final_bn_stats(bn: _BN, z: torch.Tensor, update_stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, invstd) that BN normalises z with, updating the running
    statistics exactly as ``nn.BatchNorm2d.forward`` would when asked."""
    acc_dtype = accumulator_dtype(z.dtype)
    if bn.training and z.numel() // max(z.shape[1], 1) <= 1:
        # nn.BatchNorm2d's own check; the statistics kernel would divide by zero silently.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(z.shape)}")
    if not bn.training and bn.track_running_stats:
        return bn.running_mean.to(acc_dtype), (bn.running_var.to(acc_dtype) + bn.eps).rsqrt()
    running_mean = running_var = None
    momentum = 0.0
    if update_stats and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        running_mean, running_var = bn.running_mean, bn.running_var
    mean, var = torch.batch_norm_update_stats(z, running_mean, running_var, momentum)
    # A network cast whole to bf16 keeps bf16 statistics; the kernels take fp32.
    return mean.to(acc_dtype), (var.to(acc_dtype) + bn.eps).rsqrt()


def _zeros_like_output(x: torch.Tensor, stride: int, dtype: torch.dtype) -> torch.Tensor:
    """y of an edge whose every op is ``none``: zeros of the (strided) shape."""
    n, c, h, w = x.shape
    return torch.zeros((n, c, math.ceil(h / stride), math.ceil(w / stride)), dtype=dtype, device=x.device)


def fused_forward(cands: list[_Candidate], stride: int, x: torch.Tensor, weights: torch.Tensor,
                  update_stats: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y and, per BN candidate, its (mean, invstd) flattened into one list."""
    ops = kernel_ops(x.device)
    acc_dtype = accumulator_dtype(x.dtype)
    w = weights.to(acc_dtype)
    acc = None
    relu = F.relu(x) if any(c.on_relu for c in cands) else None
    stats: list[torch.Tensor] = []
    for cand in cands:
        if cand.kind == "identity":
            acc = x.to(acc_dtype) * w[cand.index] if acc is None else acc.addcmul_(x, w[cand.index])
        elif cand.kind == "bn":
            z = _run_body(cand, relu if cand.on_relu else x, update_stats, stride, ops)
            mean, invstd = _final_bn_stats(cand.bn, z, update_stats)
            if acc is None:
                acc = torch.zeros(z.shape, dtype=acc_dtype, device=z.device)
            acc = ops.bn_accumulate(acc, z, mean, invstd, w[cand.index])
            stats += [mean, invstd]
            del z
    if acc is None:
        acc = _zeros_like_output(x, stride, acc_dtype)
    return acc.to(x.dtype), stats


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    if device_type == "cuda":
        return device_type, torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    return device_type, torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()


class FusedMixedOpFunction(torch.autograd.Function):
    """Forward keeps (x, weights, BN statistics); backward recomputes each op.

    ``params`` are every parameter the candidates use, in candidate order
    (``_Candidate.params``), so that autograd accumulates their gradients."""

    @staticmethod
    def forward(ctx, cands, stride, x, weights, *params):
        y, stats = fused_forward(cands, stride, x, weights, update_stats=True)
        ctx.cands, ctx.stride = cands, stride
        # The recompute must run under the autocast state of the forward.
        ctx.autocast = _autocast_state(x.device.type)
        # Parameters are saved too so that an in-place change between forward
        # and backward is caught by autograd's version check, as in the reference.
        ctx.save_for_backward(x, weights, *stats, *params)
        ctx.num_stats = len(stats)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            # create_graph=True. once_differentiable would not do: its error node
            # is cut from the graph, so a second derivative silently loses
            # every term through this function. Refuse instead of being wrong.
            raise RuntimeError("the fused mixed-op backend has no double backward (create_graph=True); "
                               "use backend='reference' for higher-order gradients")
        x, weights, *rest = ctx.saved_tensors
        stats = rest[: ctx.num_stats]
        need_x, need_w = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        need_param = ctx.needs_input_grad[4:]
        cands = ctx.cands
        ops = kernel_ops(x.device)
        acc_dtype = accumulator_dtype(x.dtype)
        w = weights.to(acc_dtype)
        dy = dy.contiguous()
        device_type, autocast_on, autocast_dtype = ctx.autocast

        d_weights = torch.zeros(len(weights), dtype=acc_dtype, device=x.device) if need_w else None
        dx = torch.zeros(x.shape, dtype=acc_dtype, device=x.device) if need_x else None
        relu = F.relu(x) if any(c.on_relu for c in cands) else None
        d_relu = torch.zeros_like(dx) if need_x and relu is not None else None
        param_grads: list[torch.Tensor | None] = [None] * len(need_param)
        stat_iter = iter(stats)
        first = 0  # position of the candidate's first parameter in ``params``
        for cand in cands:
            k, n_params = cand.index, len(cand.params)
            positions = range(first, first + n_params)
            first += n_params
            if cand.kind == "identity":
                if need_w:
                    d_weights[k] = torch.dot(dy.reshape(-1).to(acc_dtype), x.reshape(-1).to(acc_dtype))
                if need_x:
                    dx.addcmul_(dy.to(acc_dtype), w[k])
                continue
            if cand.kind != "bn":
                continue
            mean, invstd = next(stat_iter), next(stat_iter)
            wanted = [i for i in positions if need_param[i]]
            base = relu if cand.on_relu else x
            with torch.autocast(device_type, dtype=autocast_dtype) if autocast_on else contextlib.nullcontext():
                if not (need_x or wanted):
                    with torch.no_grad():
                        z = _run_body(cand, base, False, ctx.stride, ops)
                    if need_w:
                        _, d_weights[k] = ops.bn_accumulate_backward(dy.to(z.dtype), z, mean, invstd, w[k], False)
                    continue
                inp = base.detach().requires_grad_(need_x)
                with torch.enable_grad():
                    z = _run_body(cand, inp, False, ctx.stride, ops)
            dz, dw_k = ops.bn_accumulate_backward(dy.to(z.dtype), z.detach(), mean, invstd, w[k], True)
            if need_w:
                d_weights[k] = dw_k
            inputs = ([inp] if need_x else []) + [cand.params[i - positions.start] for i in wanted]
            grads = torch.autograd.grad(z, inputs, dz)
            if need_x:
                (d_relu if cand.on_relu else dx).add_(grads[0])
                grads = grads[1:]
            for i, g in zip(wanted, grads):
                param_grads[i] = g
            del z, dz, grads, inp
        if d_relu is not None:
            del relu
            dx.add_(torch.ops.aten.threshold_backward(d_relu, x.to(acc_dtype), 0))  # ReLU's backward, once
        return (None, None,
                dx.to(x.dtype) if need_x else None,
                d_weights.to(weights.dtype) if need_w else None,
                *param_grads)


def _candidates(module: nn.Module, ops: Sequence[nn.Module]) -> list[_Candidate]:
    """The candidates of an edge (or of a single op), built once and kept on
    the module: the structure of an edge never changes, only its tensors
    (replacing one of ``mixed.ops`` after the first forward is not seen)."""
    cached = module.__dict__.get("_fused_candidates")
    if cached is None:
        cached = [_candidate(k, op) for k, op in enumerate(ops)]
        module.__dict__["_fused_candidates"] = cached
    return cached


def _any_bn_in_eval(cands: list[_Candidate]) -> bool:
    return any(not m.training for c in cands if c.kind == "bn"
               for m in [c.bn, *(b for b in c.body if isinstance(b, _BN))])


def _fused(cands: list[_Candidate], stride: int, x: torch.Tensor, weights: torch.Tensor,
           reference: Callable[[], torch.Tensor]) -> torch.Tensor:
    params = [p for cand in cands for p in cand.params]
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weights.requires_grad or any(p.requires_grad for p in params))
    if not needs_grad:
        return fused_forward(cands, stride, x, weights, update_stats=True)[0]
    if _any_bn_in_eval(cands):
        # Gradients through BN with running statistics (a module in eval mode):
        # rare in a search, and the kernels' backward assumes batch statistics.
        return reference()
    return FusedMixedOpFunction.apply(cands, stride, x, weights, *params)


@torch.compiler.disable  # opaque to torch.compile: the Function has Python side effects (BN statistics)
def mixed_op_fused(mixed: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The ``fused`` backend of ``MixedOp``."""
    cands = _candidates(mixed, mixed.ops)
    return _fused(cands, mixed.stride, x, weights,
                  lambda: sum(w * op(x) for w, op in zip(weights, mixed.ops)))


_ONE: dict[torch.device, torch.Tensor] = {}  # the weight of a one-op "edge", per device


@torch.compiler.disable
def fused_preprocess(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A cell's input preprocessing (ReLU -> 1x1 conv -> BN, or FactorizedReduce)
    evaluated like a one-op edge of weight 1. Its input, the previous cell's
    output, is kept for backward anyway (both consumers share it); the
    module's own ReLU output and conv output are not, which otherwise are
    the largest activations left once the edges are fused."""
    cands = _candidates(module, [module])
    stride = 2 if isinstance(module, FactorizedReduce) else 1
    one = _ONE.get(x.device)
    if one is None:
        one = _ONE[x.device] = torch.ones(1, device=x.device)
    return _fused(cands, stride, x, one, lambda: module(x))
