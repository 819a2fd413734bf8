"""Loads the compiled extension ``fastdarts._C`` (csrc/) and gives its ops what
torch needs beyond the C++ kernels: fake (meta) implementations for
torch.compile / FakeTensor, and the autograd formula of ``bn_accumulate``.

The extension is optional (pure-Python installs have none): importing this
module never fails. ``HAS_EXTENSION`` says whether the ops exist,
``EXTENSION_ERROR`` why not (for the error message of whoever asks for them),
``HAS_CUDA_KERNELS`` whether they run on CUDA tensors.
"""
from __future__ import annotations

import torch

from .bn_accumulate import check_args
from .pool3x3 import check_pool_args

EXTENSION_ERROR: str | None = None
try:
    import fastdarts._C  # noqa: F401  (loading the library registers torch.ops.fastdarts.*)
except ImportError as exc:  # not built, or built against another torch
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

HAS_EXTENSION: bool = EXTENSION_ERROR is None
HAS_CUDA_KERNELS: bool = HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastdarts::bn_accumulate", "CUDA")


if HAS_EXTENSION:
    @torch.library.register_fake("fastdarts::bn_accumulate")
    def _bn_accumulate_fake(acc, z, mean, invstd, weight):
        check_args("bn_accumulate", z, mean, invstd, weight, acc=acc)
        return acc.new_empty(z.shape)

    @torch.library.register_fake("fastdarts::bn_accumulate_backward")
    def _bn_accumulate_backward_fake(dy, z, mean, invstd, weight, compute_dz):
        check_args("bn_accumulate_backward", z, mean, invstd, weight, dy=dy)
        dz = z.new_empty(z.shape) if compute_dz else z.new_empty(0)
        return dz, mean.new_empty(())

    def _bn_accumulate_setup_context(ctx, inputs, output):
        acc, z, mean, invstd, weight = inputs
        ctx.save_for_backward(z, mean, invstd, weight)

    def _bn_accumulate_backward(ctx, grad):
        # The gradient is that of BN with batch statistics: mean/invstd are
        # treated as functions of z (their own gradient is folded into dz).
        z, mean, invstd, weight = ctx.saved_tensors
        need_acc, need_z, _, _, need_weight = ctx.needs_input_grad
        dz = dweight = None
        if need_z or need_weight:
            # The op takes dy in z's dtype (the accumulator is fp32 for fp16/bf16 z).
            dz, dweight = torch.ops.fastdarts.bn_accumulate_backward(grad.to(z.dtype), z, mean, invstd, weight,
                                                                      need_z)
            dz = dz if need_z else None
            dweight = dweight.reshape(weight.shape) if need_weight else None
        return (grad if need_acc else None), dz, None, None, dweight

    torch.library.register_autograd("fastdarts::bn_accumulate", _bn_accumulate_backward,
                                    setup_context=_bn_accumulate_setup_context)


# An extension built from older sources may lack the pool ops: register what exists.
HAS_POOL_KERNELS: bool = HAS_EXTENSION and hasattr(torch.ops.fastdarts, "pool3x3")

if HAS_POOL_KERNELS:
    # The 3x3 pools (csrc/pool3x3.cpp): CPU kernels only; other devices use ATen's.
    @torch.library.register_fake("fastdarts::pool3x3")
    def _pool3x3_fake(x, stride, is_max):
        check_pool_args("pool3x3", x, stride)
        n, c, h, w = x.shape
        return x.new_empty((n, c, (h - 1) // stride + 1, (w - 1) // stride + 1))

    @torch.library.register_fake("fastdarts::pool3x3_backward")
    def _pool3x3_backward_fake(dy, x, stride, is_max):
        check_pool_args("pool3x3_backward", x, stride)
        return x.new_empty(x.shape)

    def _pool3x3_setup_context(ctx, inputs, output):
        x, stride, is_max = inputs
        ctx.save_for_backward(x)  # no indices: the backward finds the argmax again
        ctx.stride, ctx.is_max = stride, is_max

    def _pool3x3_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        dx = torch.ops.fastdarts.pool3x3_backward(grad.contiguous(), x, ctx.stride, ctx.is_max)
        return dx, None, None

    torch.library.register_autograd("fastdarts::pool3x3", _pool3x3_backward, setup_context=_pool3x3_setup_context)
