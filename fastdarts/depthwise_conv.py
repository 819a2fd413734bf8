"""A depthwise convolution whose backward is two forward convolutions.

ATen's CPU backward of a depthwise convolution is fast only for 3x3 kernels
without dilation; for the search space's 5x5 and dilated kernels it takes a
slow path that costs 15-35x the forward at stride 1 (measured on the
paper's edge sizes; ``benchmarks/test_kernels.py`` compares it with this
module's), about 40% of a search step's time on the CPU.
Both gradients are convolutions ATen's forward runs fast:

- ∂L/∂x: stride 1, the convolution of dy with the flipped kernel (padding
  d·(k-1)-p); other strides, the transposed convolution;
- ∂L/∂w[c, i, j] = Σ_{n,h,w} dy[n,c,h,w] · x_pad[n,c, h·s + i·d, w·s + j·d]:
  every (sample, channel) of x convolved with its own dy as the kernel
  (N·C groups), stride and dilation swapped, then summed over the samples.

Used by the fused backend's recompute (``fused_mixed_op._conv``) on the CPU
for every depthwise conv but the 3x3 undilated ones. The reference backend
keeps ``nn.Conv2d`` (it is the plain-PyTorch baseline), and CUDA keeps its
own depthwise kernels (these formulas have not been measured on a GPU).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .kernels.bn_accumulate import accumulator_dtype


def uses_depthwise_backward(x: torch.Tensor, weight: torch.Tensor, bias, padding, dilation, groups: int) -> bool:
    """Whether ``conv2d(x, weight, ...)`` is a depthwise conv that
    ``depthwise_conv2d`` differentiates faster than ATen (see the module)."""
    if x.device.type != "cpu" or bias is not None or isinstance(padding, str) or x.dim() != 4:
        return False
    channels = x.shape[1]
    if not (groups == channels == weight.shape[0] and weight.shape[1] == 1):
        return False
    return not (tuple(weight.shape[-2:]) == (3, 3) and _pair(dilation) == (1, 1))


class DepthwiseConv2dFunction(torch.autograd.Function):
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups=C)`` for
    ``weight`` of shape (C, 1, kh, kw); the backward is described in the module."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        ctx.stride, ctx.padding, ctx.dilation = _pair(stride), _pair(padding), _pair(dilation)
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, None, stride, padding, dilation, x.shape[1])

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError("depthwise_conv2d has no double backward (create_graph=True)")
        x, weight = ctx.saved_tensors
        dx, dw = depthwise_conv2d_backward(dy, x, weight, ctx.stride, ctx.padding, ctx.dilation,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None, None, None


def depthwise_conv2d_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                              need_input: bool = True, need_weight: bool = True):
    """(∂L/∂x, ∂L/∂weight) of ``F.conv2d(x, weight, None, stride, padding,
    dilation, groups=C)`` given ``dy``; None where not needed."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    device_type = x.device.type
    # Explicit dtypes, not the ambient autocast state: dy has the forward's
    # compute dtype (autocast's, or x's).
    with torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
            else contextlib.nullcontext():
        # The weight gradient first: its transients (oneDNN's copies of x and
        # dy) are gone before the input-sized dx is allocated.
        dw = _weight_grad(x, weight, dy, stride, padding, dilation) if need_weight else None
        dx = _input_grad(x, weight, dy, stride, padding, dilation) if need_input else None
    return dx, dw


def _input_grad(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    channels, kernel = x.shape[1], weight.shape[-2:]
    w = weight.to(dy.dtype)
    flip_pad = tuple(d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding))
    if stride == (1, 1) and min(flip_pad) >= 0:
        dx = F.conv2d(dy, w.flip(2, 3), None, 1, flip_pad, dilation, channels)
    else:
        # The rows and columns the forward's last window did not reach get output padding.
        out_pad = tuple(size - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
                        for size, o, s, p, d, k in zip(x.shape[-2:], dy.shape[-2:], stride, padding, dilation, kernel))
        dx = F.conv_transpose2d(dy, w, None, stride, padding, out_pad, channels, dilation)
    return dx.to(x.dtype)


def _weight_grad(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    n, channels, height, width = x.shape
    kh, kw = weight.shape[-2:]
    # fp32 at least, from x itself: under autocast x is fp32 and dy 16-bit,
    # and a 16-bit conv would round x and every sample's product before the
    # sum over the batch.
    dtype = accumulator_dtype(dy.dtype)
    # Stride and dilation swap places: the kernel (dy) steps by the forward's
    # stride, the output (the weight's taps) by its dilation.
    per_sample = F.conv2d(x.to(dtype).reshape(1, n * channels, height, width),
                          dy.to(dtype).reshape(n * channels, 1, *dy.shape[-2:]),
                          None, dilation, padding, stride, n * channels)
    # The output covers at least the kernel (more where the last window overhangs).
    per_sample = per_sample[:, :, :kh, :kw].reshape(n, channels, kh, kw)
    return per_sample.sum(0).unsqueeze(1).to(weight.dtype)


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding, dilation, groups=C)``,
    differentiated by ``DepthwiseConv2dFunction``."""
    return DepthwiseConv2dFunction.apply(x, weight, stride, padding, dilation)
