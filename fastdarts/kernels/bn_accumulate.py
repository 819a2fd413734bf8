"""BatchNorm-normalise-and-accumulate: the hot step of the fused mixed op.

Every parametric candidate op of a DARTS edge ends in ``BN(affine=False)``,
and the edge output is ``y = Σ_k w_k · BN(z_k)``. With the batch statistics
``mean_c``, ``invstd_c = 1/sqrt(var_c + eps)`` of ``z`` (``[N, C, *spatial]``,
``M = N·Π spatial`` elements per channel) and ``x̂ = (z - mean_c)·invstd_c``:

Forward (one op's contribution, into an fp32 accumulator):

    out = acc + w · x̂

Backward, given ``dy = ∂L/∂out`` (BN in training mode: the statistics are
functions of z):

    s1_c = Σ dy            s2_c = Σ dy · x̂           (per channel, fp32)
    ∂L/∂w   = Σ_c s2_c     (= ⟨dy, BN(z)⟩: the α gradient needs no stored o_k)
    ∂L/∂z   = w · invstd_c · (dy - s1_c/M - x̂ · s2_c/M)
    ∂L/∂acc = dy

The statistics are inputs, not outputs: the caller takes them from
``torch.batch_norm_update_stats``, which also moves the running statistics
exactly as ``nn.BatchNorm2d`` does, once per forward. The gradient above is
nonetheless that of BN with *batch* statistics, i.e. ``mean``/``invstd`` must be
z's own batch statistics in training mode; in eval mode (running statistics,
constant) there is no backward through this op.

This module holds the plain-PyTorch twins (``*_ref``), the executable spec of
the Triton kernels (``triton_bn_accumulate.py``) and of the C++/CUDA kernels
(``csrc/``), and the argument checks they share.
"""
from __future__ import annotations

import torch

from ..errors import FastDartsError

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp32/fp16/bf16, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_args(name: str, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor,
               **same_as_z: torch.Tensor | None) -> None:
    """Readable errors for what the kernels cannot take. ``same_as_z`` are the
    tensors that must have z's shape (``acc``, ``dy``)."""
    if not isinstance(z, torch.Tensor) or z.dim() < 2:
        raise FastDartsError(f"{name}: z must be a tensor [N, C, ...], got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    if z.dtype not in FLOAT_DTYPES:
        raise FastDartsError(f"{name}: z has dtype {z.dtype}; supported: float32, float64, float16, bfloat16")
    acc_dtype = accumulator_dtype(z.dtype)
    C = z.shape[1]
    for arg, t in (("mean", mean), ("invstd", invstd)):
        if t.shape != (C,):
            raise FastDartsError(f"{name}: {arg} must have shape ({C},) (one value per channel of z), "
                                 f"got {tuple(t.shape)}")
    if weight.numel() != 1:
        raise FastDartsError(f"{name}: weight must hold one value, got shape {tuple(weight.shape)}")
    for arg, t in (("mean", mean), ("invstd", invstd), ("weight", weight)):
        if t.dtype != acc_dtype:
            raise FastDartsError(f"{name}: {arg} must be {acc_dtype} for z of dtype {z.dtype}, got {t.dtype}")
    for arg, t in same_as_z.items():
        if t is None:
            continue
        if t.shape != z.shape:
            raise FastDartsError(f"{name}: {arg} must have z's shape {tuple(z.shape)}, got {tuple(t.shape)}")
        want = acc_dtype if arg == "acc" else z.dtype
        if t.dtype != want:
            raise FastDartsError(f"{name}: {arg} must be {want} for z of dtype {z.dtype}, got {t.dtype}")
    for arg, t in (("mean", mean), ("invstd", invstd), ("weight", weight), *same_as_z.items()):
        if t is not None and t.device != z.device:
            raise FastDartsError(f"{name}: {arg} is on {t.device} but z is on {z.device}; "
                                 "all arguments must be on one device")


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view((1, -1) + (1,) * (like.dim() - 2))


def bn_accumulate_ref(acc: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
    """``acc + w · (z - mean) · invstd`` in the accumulator's dtype."""
    check_args("bn_accumulate", z, mean, invstd, weight, acc=acc)
    xhat = (z.to(acc.dtype) - _per_channel(mean, z)) * _per_channel(invstd, z)
    return acc + weight.reshape(()) * xhat


def bn_accumulate_backward_ref(dy: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                               weight: torch.Tensor, compute_dz: bool = True
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂L/∂z, ∂L/∂w)``; ``∂L/∂z`` is an empty tensor when ``compute_dz`` is
    false (only the α gradient is wanted)."""
    check_args("bn_accumulate_backward", z, mean, invstd, weight, dy=dy)
    acc_dtype = accumulator_dtype(z.dtype)
    dims = [0] + list(range(2, z.dim()))
    M = z.numel() // z.shape[1]
    g = dy.to(acc_dtype)
    xhat = (z.to(acc_dtype) - _per_channel(mean, z)) * _per_channel(invstd, z)
    s1 = g.sum(dims)
    s2 = (g * xhat).sum(dims)
    dweight = s2.sum()
    if not compute_dz:
        return z.new_empty(0), dweight
    w = weight.reshape(())
    dz = w * _per_channel(invstd, z) * (g - _per_channel(s1 / M, z) - xhat * _per_channel(s2 / M, z))
    return dz.to(z.dtype), dweight


def register_fake_and_autograd(namespace: str) -> None:
    """Fake (meta) kernels for ``{namespace}::bn_accumulate`` and its backward,
    and the autograd formula of ``bn_accumulate``: the same for every
    implementation of the schema (the compiled ``fastdarts`` ops and the
    Triton ``fastdarts_triton`` ones)."""
    forward, backward = f"{namespace}::bn_accumulate", f"{namespace}::bn_accumulate_backward"

    @torch.library.register_fake(forward)
    def _forward_fake(acc, z, mean, invstd, weight):
        check_args("bn_accumulate", z, mean, invstd, weight, acc=acc)
        return acc.new_empty(z.shape)

    @torch.library.register_fake(backward)
    def _backward_fake(dy, z, mean, invstd, weight, compute_dz=True):
        check_args("bn_accumulate_backward", z, mean, invstd, weight, dy=dy)
        dz = z.new_empty(z.shape) if compute_dz else z.new_empty(0)
        return dz, mean.new_empty(())

    def setup_context(ctx, inputs, output):
        _acc, z, mean, invstd, weight = inputs
        ctx.save_for_backward(z, mean, invstd, weight)

    def grad_fn(ctx, grad):
        # The gradient of BN with batch statistics: mean/invstd are functions
        # of z, and their derivative is already folded into dz.
        z, mean, invstd, weight = ctx.saved_tensors
        need_acc, need_z, _, _, need_weight = ctx.needs_input_grad
        dz = dweight = None
        if need_z or need_weight:
            # The backward op takes dy in z's dtype (the accumulator is fp32
            # for fp16/bf16 z, so this rounds dy once there).
            op = getattr(torch.ops, namespace).bn_accumulate_backward
            dz, dweight = op(grad.to(z.dtype), z, mean, invstd, weight, bool(need_z))
            dz = dz if need_z else None
            dweight = dweight.reshape(weight.shape) if need_weight else None
        return (grad if need_acc else None), dz, None, None, dweight

    torch.library.register_autograd(forward, grad_fn, setup_context=setup_context)
