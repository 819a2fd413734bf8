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
``nn.BatchNorm2d`` makes), inner BNs (sep conv) as ``nn.BatchNorm2d.forward``
moves them; the recompute uses batch statistics without touching them
(inplace_abn's rule).

Forward and recompute use the same tensors: an op's parameters are looked up
on its modules at every call (so ``torch.func.functional_call``,
``load_state_dict(assign=True)`` and replaced weights are seen), passed to
the Function as inputs (so autograd accumulates their gradients, hooks and
DDP included) and applied functionally from what the Function saved. What is
cached is only the edge's structure, checked against its modules each call.
Only plain modules are fused (exact types) and without module hooks: a
subclass such as ``SyncBatchNorm``, or a hook, computes something the
recompute cannot, and is an error. (Global module hooks, such as profilers
register, are not run for the modules inside a fused edge.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.torch_version import TorchVersion

from .depthwise_conv import depthwise_conv2d, uses_depthwise_backward
from .errors import FastDartsError
from .kernels.backend import KernelOps, kernel_ops
from .kernels import meta_kernels  # noqa: F401  (Meta kernels: steps run on the meta device)
from .kernels.bn_accumulate import accumulator_dtype
from .mixed_op_checkpoint import mixed_op_checkpoint
from .mixed_op_reference import mixed_op_reference
from .ops import DilConv, FactorizedReduce, Identity, ReLUConvBN, SepConv, Zero

# torch.autograd.grad takes a GradientEdge as its output from torch 2.5 on.
_GRAD_FROM_EDGE = TorchVersion(torch.__version__) >= "2.5"

# The body of a parametric candidate is a chain of these, applied functionally.
_BODY_TYPES = (nn.ReLU, nn.Conv2d, nn.BatchNorm2d)


@dataclass
class _Candidate:
    """One op of an edge, split into its body and its final BN.

    kind: ``zero``, ``identity`` or ``bn`` (``z = body(input)``, ``o = BN(z)``).
    on_relu: the body's input is ReLU(x) (conv ops), not x (pools).
    slots: (module, attribute) of every parameter the body uses, in order;
        the tensors are looked up at each call (``_resolve_params``).
    """
    kind: str
    index: int
    body: list[nn.Module] = field(default_factory=list)
    bn: nn.BatchNorm2d | None = None
    on_relu: bool = False
    pool_is_max: bool | None = None       # a 3x3 pool: max (True) or average (False)
    factorized_reduce: FactorizedReduce | None = None
    pointwise: bool = False               # the body is one bias-free 1x1 conv, stride 1 (``_pointwise_*_grad``)
    slots: list[tuple[nn.Module, str]] = field(default_factory=list)


def _unsupported(index: int, op: nn.Module, why: str) -> FastDartsError:
    return FastDartsError(f"fused backend: op {index} ({type(op).__name__}) {why}; "
                          "use backend='reference' (--backend reference) for it")


def _check_plain(index: int, op: nn.Module, modules: Sequence[nn.Module]) -> None:
    """Exact types only: a subclass (SyncBatchNorm, a weight-standardised
    conv, ...) overrides what its forward computes, which the functional
    recompute would silently ignore."""
    for m in modules:
        if type(m) not in _BODY_TYPES:
            raise _unsupported(index, op, f"contains a {type(m).__name__}, which the fused recompute cannot "
                                          "reproduce (only plain ReLU, Conv2d and BatchNorm2d are fused)")
        if type(m) is nn.Conv2d and m.padding_mode != "zeros":
            raise _unsupported(index, op, f"has a Conv2d with padding_mode={m.padding_mode!r}")


def _param_slots(modules: Sequence[nn.Module]) -> list[tuple[nn.Module, str]]:
    return [(m, name) for m in modules for name in ("weight", "bias")
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and getattr(m, name) is not None]


def _conv_candidate(index: int, op: nn.Module, seq: nn.Sequential) -> _Candidate:
    mods = list(seq)
    if not (isinstance(mods[0], nn.ReLU) and isinstance(mods[-1], nn.modules.batchnorm._BatchNorm)):
        raise _unsupported(index, op, "is not ReLU -> ... -> BatchNorm")
    body = mods[1:-1]
    conv = body[0] if len(body) == 1 else None
    pointwise = (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
                 and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1
                 and conv.bias is None)
    return _Candidate("bn", index, body=body, bn=mods[-1], on_relu=True, pointwise=pointwise)


def _candidate(index: int, op: nn.Module) -> _Candidate:
    if type(op) is Zero:
        return _Candidate("zero", index)
    if type(op) is Identity:
        return _Candidate("identity", index)
    if type(op) is FactorizedReduce:
        for conv in (op.conv_1, op.conv_2):
            if type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1) or conv.stride != (2, 2) \
                    or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
                raise _unsupported(index, op, "has a conv that is not 1x1 with stride 2")
        cand = _Candidate("bn", index, bn=op.bn, on_relu=True, factorized_reduce=op)
        modules = [op.relu, op.conv_1, op.conv_2]
    elif type(op) in (ReLUConvBN, DilConv, SepConv):
        cand = _conv_candidate(index, op, op.op)
        modules = list(op.op)[:-1]
    elif type(op) is nn.Sequential and isinstance(op[0], nn.ReLU):
        cand = _conv_candidate(index, op, op)
        modules = list(op)[:-1]
    elif type(op) is nn.Sequential and len(op) == 2 and type(op[0]) in (nn.MaxPool2d, nn.AvgPool2d):
        pool = op[0]
        if not (pool.kernel_size in (3, (3, 3)) and pool.padding in (1, (1, 1)) and not pool.ceil_mode
                and getattr(pool, "dilation", 1) in (1, (1, 1)) and not getattr(pool, "return_indices", False)
                and getattr(pool, "count_include_pad", False) is False
                and getattr(pool, "divisor_override", None) is None):
            raise _unsupported(index, op, f"has a {type(pool).__name__} that is not 3x3 with padding 1")
        cand = _Candidate("bn", index, bn=op[1], pool_is_max=type(pool) is nn.MaxPool2d)
        modules = []
    else:
        raise _unsupported(index, op, "has no fused form")
    _check_plain(index, op, [*modules, cand.bn])  # every module the fused form replaces
    if cand.bn.affine:
        raise _unsupported(index, op, "ends in an affine BN; the supernet's are affine=False")
    cand.slots = _param_slots(modules)
    return cand


def _resolve_params(cands: Sequence[_Candidate]) -> list[torch.Tensor]:
    """The tensors the candidates' parameters are *now* (under
    ``functional_call`` the substituted ones), in slot order."""
    return [getattr(m, name) for cand in cands for m, name in cand.slots]


def _tracks(bn: nn.BatchNorm2d) -> bool:
    """Whether a training-mode forward moves ``bn``'s running statistics."""
    return bn.training and bn.track_running_stats and bn.running_mean is not None


def _update_running(bn: nn.BatchNorm2d, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z's batch (mean, biased var); moves ``bn``'s running statistics as
    ``nn.BatchNorm2d.forward`` does in training mode, without reading a
    device value on the host (its ``momentum=None`` branch calls ``float()``)."""
    if not _tracks(bn):
        return torch.batch_norm_update_stats(z, None, None, 0.0)
    counter = bn.num_batches_tracked
    if counter is not None:
        counter.add_(1)
    if bn.momentum is not None:
        return torch.batch_norm_update_stats(z, bn.running_mean, bn.running_var, bn.momentum)
    mean, var = torch.batch_norm_update_stats(z, None, None, 0.0)
    if counter is not None:  # the cumulative average: weight 1/batches, kept on the device
        weight = counter.reciprocal().to(bn.running_mean.dtype)
        n = z.numel() // z.shape[1]
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), weight)
        bn.running_var.lerp_((var * (n / (n - 1))).to(bn.running_var.dtype), weight)
    return mean, var


def _batch_norm(bn: nn.BatchNorm2d, h: torch.Tensor, params: Iterator[torch.Tensor],
                update_stats: bool) -> torch.Tensor:
    weight, bias = (next(params), next(params)) if bn.affine else (None, None)
    if not update_stats:
        # The recompute: batch statistics, running ones untouched (the forward moved them).
        return F.batch_norm(h, None, None, weight, bias, True, 0.0, bn.eps)
    if not bn.training and bn.running_mean is not None:
        return F.batch_norm(h, bn.running_mean, bn.running_var, weight, bias, False, 0.0, bn.eps)
    if _tracks(bn) and bn.momentum is not None:
        # One pass that normalises and moves the statistics, exactly nn.BatchNorm2d's.
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        return F.batch_norm(h, bn.running_mean, bn.running_var, weight, bias, True, bn.momentum, bn.eps)
    if _tracks(bn):  # momentum=None
        _update_running(bn, h)
    return F.batch_norm(h, None, None, weight, bias, True, 0.0, bn.eps)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """``t`` with NCHW strides. ``contiguous()`` is not enough: a channels-last
    1x1 conv weight counts as contiguous (its size-1 dims), yet its strides
    make the convolution return a channels-last output."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= max(size, 1)
    if t.stride() == tuple(reversed(expected)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _conv(conv: nn.Conv2d, h: torch.Tensor, params: Iterator[torch.Tensor], stride=None) -> torch.Tensor:
    """``conv(h)`` with the next parameter tensors (``stride``: instead of the conv's)."""
    weight = next(params)
    bias = next(params) if conv.bias is not None else None
    # NCHW weights: the edge computes in NCHW whatever the model's memory
    # format (a channels-last weight would make the output channels-last, and
    # every kernel would copy it). Weights are tiny next to activations.
    weight, stride = _nchw(weight), conv.stride if stride is None else stride
    if torch.is_grad_enabled() and uses_depthwise_backward(h, weight, bias, conv.padding, conv.dilation, conv.groups):
        # The recompute differentiates it: ATen's CPU backward of most depthwise convs is slow.
        return depthwise_conv2d(h, weight, stride, conv.padding, conv.dilation)
    return F.conv2d(h, weight, bias, stride, conv.padding, conv.dilation, conv.groups)


def _body_inputs(cand: _Candidate, base: torch.Tensor) -> list[torch.Tensor]:
    """What a candidate's body reads of its input ``base``: ``base`` itself or,
    for FactorizedReduce, the two stride-2 samples its 1x1 convs read (at
    [0::2, 0::2] and [1::2, 1::2]), as fresh contiguous tensors. The convs then
    run with stride 1 on a quarter of the input, and their backward needs no
    input-sized buffer (ATen's CPU backward of a strided 1x1 conv copies its
    whole input to channels-last, and slicing back costs a zero-filled one)."""
    if cand.factorized_reduce is None:
        return [base]
    return [base[:, :, i::2, i::2].clone(memory_format=torch.contiguous_format) for i in (0, 1)]


def _add_input_grads(acc: torch.Tensor | None, cand: _Candidate, grads: Sequence[torch.Tensor],
                     like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``acc`` plus the gradient of the body's input, given the gradients of
    ``_body_inputs`` (fresh tensors from autograd.grad: the first becomes the
    sum when there is none yet)."""
    if cand.factorized_reduce is None:
        g = grads[0].to(dtype)
        return g if acc is None else acc.add_(g)
    if acc is None:
        acc = torch.zeros(like.shape, dtype=dtype, device=like.device)
    for i, g in enumerate(grads):
        acc[:, :, i::2, i::2].add_(g)
    return acc


def _run_body(cand: _Candidate, inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
              update_stats: bool, stride: int, ops: KernelOps) -> torch.Tensor:
    """z = body(input) with the given parameter tensors, from ``inputs =
    _body_inputs(cand, input)``. Inner BNs update their running statistics
    only when ``update_stats`` (the forward)."""
    if cand.pool_is_max is not None:
        return ops.pool3x3(inputs[0], stride, cand.pool_is_max)
    it = iter(params)
    if cand.factorized_reduce is not None:
        fr = cand.factorized_reduce
        # Stride 1 on the samples: the same sums as the module's stride-2 convs.
        a, b = (_conv(conv, h, it, stride=1) for conv, h in zip((fr.conv_1, fr.conv_2), inputs))
        if b.shape[-2:] != a.shape[-2:]:
            b = F.pad(b, (0, a.shape[-1] - b.shape[-1], 0, a.shape[-2] - b.shape[-2]))
        return torch.cat([a, b], dim=1)
    h = inputs[0]
    for m in cand.body:
        if type(m) is nn.Conv2d:
            h = _conv(m, h, it)
        elif type(m) is nn.BatchNorm2d:
            h = _batch_norm(m, h, it, update_stats)
        else:
            h = F.relu(h)
    return h


def _final_bn_stats(bn: nn.BatchNorm2d, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, invstd) that BN normalises z with, updating the running
    statistics exactly as ``nn.BatchNorm2d.forward`` would (the forward only)."""
    acc_dtype = accumulator_dtype(z.dtype)
    if bn.training and z.numel() // max(z.shape[1], 1) <= 1:
        # nn.BatchNorm2d's own check; the statistics kernel would divide by zero silently.
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(z.shape)}")
    # nn.BatchNorm2d's rules: eval mode normalises with the running statistics
    # whenever they exist; training mode moves them only when tracking.
    if not bn.training and bn.running_mean is not None:
        return bn.running_mean.to(acc_dtype), (bn.running_var.to(acc_dtype) + bn.eps).rsqrt()
    mean, var = _update_running(bn, z)
    # A network cast whole to bf16 keeps bf16 statistics; the kernels take fp32.
    return mean.to(acc_dtype), (var.to(acc_dtype) + bn.eps).rsqrt()


def _zeros_like_output(x: torch.Tensor, stride: int, dtype: torch.dtype) -> torch.Tensor:
    """y of an edge whose every op is ``none``: zeros of the (strided) shape."""
    n, c, h, w = x.shape
    return torch.zeros((n, c, math.ceil(h / stride), math.ceil(w / stride)), dtype=dtype, device=x.device)


def _split(cands: Sequence[_Candidate], params: Sequence) -> list:
    """``params`` (flat, slot order) cut into one list per candidate."""
    out, first = [], 0
    for cand in cands:
        out.append(params[first:first + len(cand.slots)])
        first += len(cand.slots)
    return out


def fused_forward(cands: list[_Candidate], stride: int, x: torch.Tensor, weights: torch.Tensor,
                  params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y and, per BN candidate, its (mean, invstd) flattened into one list.
    Moves the running statistics (once per forward)."""
    ops = kernel_ops(x.device)
    acc_dtype = accumulator_dtype(x.dtype)
    x = _nchw(x)  # once per edge (a channels-last x would be copied by every op)
    w = weights.to(acc_dtype).unbind()  # one op, not one select per candidate
    acc = None
    relu = F.relu(x) if any(c.on_relu for c in cands) else None
    stats: list[torch.Tensor] = []
    for cand, cand_params in zip(cands, _split(cands, params)):
        if cand.kind == "identity":
            acc = x.to(acc_dtype) * w[cand.index] if acc is None else acc.addcmul_(x, w[cand.index])
        elif cand.kind == "bn":
            z = _run_body(cand, _body_inputs(cand, relu if cand.on_relu else x), cand_params, True, stride, ops)
            mean, invstd = _final_bn_stats(cand.bn, z)
            if acc is None:
                acc = torch.zeros(z.shape, dtype=acc_dtype, device=z.device)
            acc = ops.bn_accumulate(acc, z, mean, invstd, w[cand.index])
            stats += [mean, invstd]
            del z
    if acc is None:
        acc = _zeros_like_output(x, stride, acc_dtype)
    return acc.to(x.dtype), stats


def _pointwise_weight_grad(h: torch.Tensor, weight: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """∂L/∂W of ``z = conv1x1(h, W)`` (stride 1, no bias): Σ_n dz_n·h_nᵀ, one
    batched matmul over the channels that allocates a (N, C_out, C_in) result
    only. It runs in h's dtype whatever the autocast state: under autocast h
    is fp32, and a 16-bit bmm would round each sample's product before the
    sum over the batch (the convolution backward rounds once)."""
    n, c_out, c_in = dz.shape[0], dz.shape[1], h.shape[1]
    device_type = h.device.type
    autocast_on = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    with torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext():
        d_weight = torch.bmm(dz.reshape(n, c_out, -1).to(h.dtype), h.reshape(n, c_in, -1).transpose(1, 2)).sum(0)
    return d_weight.reshape(weight.shape).to(weight.dtype)


def _pointwise_input_grad(weight: torch.Tensor, dz: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
    """∂L/∂h of ``z = conv1x1(h, W)``: Wᵀ·dz, which needs no h (so h can be
    freed first) and allocates the result only. ATen's CPU convolution
    backward also allocates blocked copies of dz and of ∂L/∂h; with h alive
    as well, a cell's input preprocessing (h: the previous cell's whole
    output) was the search step's peak."""
    n, c_out = dz.shape[:2]
    return torch.matmul(weight.reshape(c_out, -1).t(), dz.reshape(n, c_out, -1)).reshape(input_shape)


def _relu_backward_(d_relu: torch.Tensor | None, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """ReLU's backward, in place: ``d_relu`` zeroed where x <= 0 (None: nothing reached relu(x))."""
    if d_relu is not None:
        torch.ops.aten.threshold_backward.grad_input(d_relu, x.to(dtype), 0, grad_input=d_relu)
    return d_relu


class FusedMixedOpFunction(torch.autograd.Function):
    """Forward keeps (x, weights, BN statistics, parameter tensors); backward
    recomputes each op from exactly those tensors.

    ``params`` are the tensors of every candidate's parameter slots, in
    candidate order (``_resolve_params``)."""

    @staticmethod
    def forward(ctx, cands, stride, x, weights, *params):
        y, stats = fused_forward(cands, stride, x, weights, params)
        ctx.cands, ctx.stride = cands, stride
        # The recompute runs under the forward's autocast state, on or off.
        device_type = x.device.type
        ctx.autocast = ((device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
                        if torch.amp.is_autocast_available(device_type) else None)
        # Saving the parameters makes the recompute use the forward's tensors,
        # and autograd's version check catches an in-place change in between.
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
        if ctx.autocast is None:  # a device without autocast (meta)
            return FusedMixedOpFunction._backward(ctx, dy)
        device_type, autocast_on, autocast_dtype = ctx.autocast
        # Every op of the recompute runs under the forward's autocast state,
        # whatever the state around this backward is.
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            return FusedMixedOpFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, weights, *rest = ctx.saved_tensors
        stats, params = rest[: ctx.num_stats], rest[ctx.num_stats:]
        need_x, need_w = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        need_param = ctx.needs_input_grad[4:]
        cands = ctx.cands
        ops = kernel_ops(x.device)
        acc_dtype = accumulator_dtype(x.dtype)
        x = _nchw(x)
        w = weights.to(acc_dtype).unbind()
        dy = _nchw(dy)

        # ∂L/∂w_k collected and stacked once at the end (no select + copy per op).
        d_weights: list[torch.Tensor] | None = None
        if need_w:
            zero = torch.zeros((), dtype=acc_dtype, device=x.device)
            d_weights = [zero] * len(weights)
        # ∂L/∂x and ∂L/∂relu(x): the first contribution becomes the sum (no
        # zero-filled buffers). The ops on relu(x) run first, so relu(x) and
        # its gradient are gone before the pools and the skip add to ∂L/∂x:
        # at most two input-sized sums are alive at once, not three.
        dx: torch.Tensor | None = None
        d_relu: torch.Tensor | None = None
        relu = F.relu(x) if any(c.on_relu for c in cands) else None
        param_grads: list[torch.Tensor | None] = [None] * len(need_param)
        layout, first, stat_iter = [], 0, iter(stats)  # per candidate: its parameters' positions, BN statistics
        for cand in cands:
            positions = range(first, first + len(cand.slots))
            first = positions.stop
            layout.append((cand, positions, (next(stat_iter), next(stat_iter)) if cand.kind == "bn" else None))
        layout.sort(key=lambda entry: not entry[0].on_relu)  # stable: the forward's order within each group
        # relu(x) is dropped once the last op on it has taken what it reads;
        # its backward is applied to ∂L/∂relu(x) once, after the last such op.
        last_on_relu = next((c for c, _, _ in reversed(layout) if c.on_relu), None)
        relu_pending = relu is not None
        for cand, positions, cand_stats in layout:
            k = cand.index
            if relu_pending and not cand.on_relu:
                dx, relu_pending = _relu_backward_(d_relu, x, acc_dtype), False
            if cand.kind == "identity":
                if need_w:
                    d_weights[k] = torch.dot(dy.reshape(-1).to(acc_dtype), x.reshape(-1).to(acc_dtype))
                if need_x:
                    dx = dy.to(acc_dtype) * w[k] if dx is None else dx.addcmul_(dy.to(acc_dtype), w[k])
                continue
            if cand.kind != "bn":
                continue
            mean, invstd = cand_stats
            wanted = [i for i in positions if need_param[i]]
            # Fresh leaves: the gradient is taken here, not through the outer graph.
            cand_params = [params[i].detach().requires_grad_(need_param[i]) for i in positions]
            sources = _body_inputs(cand, relu if cand.on_relu else x)
            if cand is last_on_relu:
                relu = None
            if not (need_x or wanted):
                z = _run_body(cand, sources, cand_params, False, ctx.stride, ops)
                if need_w:
                    _, d_weights[k] = ops.bn_accumulate_backward(dy.to(z.dtype), z, mean, invstd, w[k], False)
                del z, sources  # no reference to relu(x) may outlive the loop over the ops on it
                continue
            if cand.pointwise:  # one 1x1 conv (a cell's preprocessing): its gradients by matmul
                z = _run_body(cand, sources, cand_params, False, ctx.stride, ops)
                dz, dw_k = ops.bn_accumulate_backward(dy.to(z.dtype), z, mean, invstd, w[k], True)
                del z
                if need_w:
                    d_weights[k] = dw_k
                weight = cand_params[0]
                if wanted:
                    param_grads[positions.start] = _pointwise_weight_grad(sources[0], weight, dz)
                del sources  # the body's input is freed before its gradient is allocated
                if need_x:
                    d_input = _pointwise_input_grad(weight, dz, x.shape)
                    d_relu = _add_input_grads(d_relu, cand, [d_input], x, acc_dtype)
                    del d_input
                del dz
                continue
            inputs = [t.detach().requires_grad_(need_x) for t in sources]
            del sources
            with torch.enable_grad():
                z = _run_body(cand, inputs, cand_params, False, ctx.stride, ops)
            dz, dw_k = ops.bn_accumulate_backward(dy.to(z.dtype), z.detach(), mean, invstd, w[k], True)
            if need_w:
                d_weights[k] = dw_k
            leaves = (inputs if need_x else []) + [cand_params[i - positions.start] for i in wanted]
            # From z's graph node, not z: z (output-sized, saved by no op of a
            # body) is freed before its backward runs.
            root = get_gradient_edge(z) if _GRAD_FROM_EDGE else z
            del z
            grads = torch.autograd.grad(root, leaves, dz)
            del root, dz, inputs
            input_grads, grads = grads[:len(grads) - len(wanted)], grads[len(grads) - len(wanted):]
            if need_x and cand.on_relu:
                d_relu = _add_input_grads(d_relu, cand, input_grads, x, acc_dtype)
            elif need_x:
                dx = _add_input_grads(dx, cand, input_grads, x, acc_dtype)
            for i, g in zip(wanted, grads):
                param_grads[i] = g
            del grads, input_grads
        if relu_pending:  # every candidate reads relu(x)
            dx = _relu_backward_(d_relu, x, acc_dtype)
        if need_x and dx is None:  # no candidate reaches x (every op is `none`)
            dx = torch.zeros(x.shape, dtype=acc_dtype, device=x.device)
        return (None, None,
                dx.to(x.dtype) if need_x else None,
                torch.stack(d_weights).to(weights.dtype) if need_w else None,
                *param_grads)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _structure_key(module: nn.Module) -> tuple:
    """What the fused form of an edge depends on beyond its tensors: every
    submodule's identity (a replaced module, ``convert_sync_batchnorm``), a
    conv's padding mode and bias slot, a BN's affine slot. About 15 µs an
    edge. Module hooks are refused here: the fused form never calls the
    modules, so their hooks (and what is built on them: old-style
    ``spectral_norm``, ``weight_norm``, pruning) would silently not run."""
    out: list = []

    def walk(m: nn.Module) -> None:
        for name, child in m._modules.items():
            if child is None:
                continue
            if any(getattr(child, d) for d in _HOOK_DICTS):
                raise FastDartsError(
                    f"fused backend: module {name!r} ({type(child).__name__}) of an edge has a module hook, which "
                    "the fused recompute does not run; use backend='reference' (--backend reference)")
            kind = type(child)
            if kind is nn.Conv2d:
                out.append((id(child), child.padding_mode, child._parameters.get("bias") is None))
            elif kind is nn.BatchNorm2d:
                out.append((id(child), child._parameters.get("weight") is None))
            else:
                out.append(id(child))
            walk(child)

    walk(module)
    return tuple(out)


def _candidates(module: nn.Module, ops: Sequence[nn.Module]) -> list[_Candidate]:
    """The candidates of an edge (or of a single op). The structure is cached
    on the module and rebuilt (and so checked again) when its key changes;
    tensors are never cached (the cache holds the old modules, so their ids
    cannot be reused)."""
    key = _structure_key(module)
    cached = module.__dict__.get("_fused_candidates")
    if cached is None or cached[0] != key:
        cached = (key, [_candidate(k, op) for k, op in enumerate(ops)])
        module.__dict__["_fused_candidates"] = cached
    return cached[1]


def _any_bn_in_eval(cands: list[_Candidate]) -> bool:
    return any(not m.training for c in cands if c.kind == "bn"
               for m in [c.bn, *(b for b in c.body if type(b) is nn.BatchNorm2d)])


def _fused(cands: list[_Candidate], stride: int, x: torch.Tensor, weights: torch.Tensor,
           reference: Callable[[], torch.Tensor]) -> torch.Tensor:
    params = _resolve_params(cands)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weights.requires_grad or any(p.requires_grad for p in params))
    if not needs_grad:
        return fused_forward(cands, stride, x, weights, params)[0]
    if _any_bn_in_eval(cands):
        # Gradients through BN with running statistics (a module in eval mode, e.g. an
        # adversarial attack on the op weights): the kernels' backward assumes batch
        # statistics, so ``reference`` computes it (for a whole mixed op, under a
        # checkpoint: its ops recomputed in backward, not every op's output kept).
        return reference()
    return FusedMixedOpFunction.apply(cands, stride, x, weights, *params)


def _path_candidates(module: nn.Module, cands: list[_Candidate], paths: tuple[int, ...]) -> list[_Candidate]:
    """The candidates of sampled ``paths``, renumbered so that candidate i
    takes weight i (path sampling computes only these ops)."""
    cache = module.__dict__.get("_fused_paths")
    if cache is None or cache[0] is not cands:
        cache = module.__dict__["_fused_paths"] = (cands, {})
    subset = cache[1].get(paths)
    if subset is None:
        subset = cache[1][paths] = [dataclasses.replace(cands[k], index=i) for i, k in enumerate(paths)]
    return subset


@torch.compiler.disable  # opaque to torch.compile: the Function has Python side effects (BN statistics)
def mixed_op_fused(mixed: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                   paths: tuple[int, ...] | None = None) -> torch.Tensor:
    """The ``fused`` backend of ``MixedOp``. With ``paths`` only those ops run;
    an inactive path has gate 0, so its contribution to every gradient but its
    gate's is exactly zero, as the reference's detached output."""
    cands = _candidates(mixed, mixed.ops)
    if paths is not None:
        cands = _path_candidates(mixed, cands, paths)
        return _fused(cands, mixed.stride, x, weights, lambda: mixed_op_reference(mixed, x, weights, paths))
    return _fused(cands, mixed.stride, x, weights, lambda: mixed_op_checkpoint(mixed, x, weights))


_ONE: dict[torch.device, torch.Tensor] = {}  # the weight of a one-op "edge", per device


@torch.compiler.disable
def fused_single_op(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """``weight · module(x)`` for one fusable op (a one-op edge; ``weight`` of shape (1,))."""
    return _fused(_candidates(module, [module]), stride, x, weight, lambda: weight[0] * module(x))


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
        # Not an inference tensor even if the first call is under inference_mode:
        # a later training step saves it for backward.
        with torch.inference_mode(False):
            one = _ONE[x.device] = torch.ones(1, device=x.device)
    return _fused(cands, stride, x, one, lambda: module(x))
