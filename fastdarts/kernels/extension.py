"""Loads the compiled extension ``fastdarts._C`` (csrc/) and gives its ops what
torch needs beyond the C++ kernels: fake (meta) implementations for
torch.compile / FakeTensor, and the autograd formula of ``bn_accumulate``.

The extension is optional (pure-Python installs have none): importing this
module never fails. ``HAS_EXTENSION`` says whether the ops exist,
``EXTENSION_ERROR`` why not (for the error message of whoever asks for them),
``HAS_CUDA_KERNELS`` whether they run on CUDA tensors. ``FASTDARTS_NO_EXTENSION=1``
at run time skips loading an installed extension (the plain-PyTorch and
Triton kernels run instead), as it skips building it at install time.
"""
from __future__ import annotations

import os

import torch

from .bn_accumulate import register_fake_and_autograd
from .pool3x3 import check_pool_args

EXTENSION_ERROR: str | None = None
if os.environ.get("FASTDARTS_NO_EXTENSION", "").strip() not in ("", "0"):
    # Honoured at run time as at build time: an installed extension is then not loaded.
    EXTENSION_ERROR = "FASTDARTS_NO_EXTENSION is set, so the extension is not loaded"
else:
    try:
        import fastdarts._C  # noqa: F401  (loading the library registers torch.ops.fastdarts.*)
    except ImportError as exc:  # not built, or built against another torch
        EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

HAS_EXTENSION: bool = EXTENSION_ERROR is None
HAS_CUDA_KERNELS: bool = HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastdarts::bn_accumulate", "CUDA")


if HAS_EXTENSION:
    register_fake_and_autograd("fastdarts")

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
