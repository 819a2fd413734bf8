"""The 3x3 pools of the search space (padding 1, stride 1 or 2; the average
ignores the padding), the parameter-free ops the fused mixed op recomputes
in backward.

    max:  y = max over the window          ∂x: dy to the window's argmax
    avg:  y = mean over the window ∩ x     ∂x: dy/count to every element of the window

The compiled CPU kernels (``csrc/pool3x3.cpp``) need no stored indices: the
backward finds each window's argmax again, with ATen's tie rule, so the
gradient equals the reference's exactly. ``*_ref`` are the ATen pools they
are tested against, and what runs on devices without a compiled kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import FastDartsError


def check_pool_args(name: str, x: torch.Tensor, stride: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise FastDartsError(f"{name}: x must be a tensor [N, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if stride not in (1, 2):
        raise FastDartsError(f"{name}: stride must be 1 or 2, got {stride}")


def pool3x3_ref(x: torch.Tensor, stride: int, is_max: bool) -> torch.Tensor:
    check_pool_args("pool3x3", x, stride)
    if is_max:
        return F.max_pool2d(x, 3, stride, 1)
    return F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)


def pool3x3_backward_ref(dy: torch.Tensor, x: torch.Tensor, stride: int, is_max: bool) -> torch.Tensor:
    check_pool_args("pool3x3_backward", x, stride)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(pool3x3_ref(x, stride, is_max), x, dy)[0]
