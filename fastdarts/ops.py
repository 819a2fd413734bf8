"""Candidate operations of the DARTS search space (SPEC §1).

Every convolution is ReLU -> Conv -> BN. ``OPS[name](C, stride, affine)``
builds one op; the supernet uses ``affine=False`` and appends BN to the pools
(see ``mixed_op.py``), the network trained from scratch uses ``affine=True``.
Module and attribute names inside each op follow the original DARTS code
(``op``, ``conv_1``, ``conv_2``, ``bn``), so a network built from these ops
with the original's container names loads its state_dicts by name; the
supernet names its containers differently and copies weights by position.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .errors import FastDartsError


class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    """ReLU, depthwise k x k with dilation, pointwise 1x1, BN."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    """Two (ReLU, depthwise k x k, pointwise 1x1, BN) blocks; stride on the first."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=stride, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, 1, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride=1, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x):
        return self.op(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    """The `none` op. Multiplies by zero (as the original code) rather than
    allocating zeros, so NaN/inf in x still propagate like the reference."""

    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halves the resolution: ReLU, two 1x1 stride-2 convs on x and on x shifted
    by one pixel, concatenated along channels, BN."""

    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        if C_out % 2:
            raise FastDartsError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        # The shifted branch must give the same size as the first for odd sizes too.
        shifted = x[:, :, 1:, 1:]
        a, b = self.conv_1(x), self.conv_2(shifted)
        if b.shape[-2:] != a.shape[-2:]:
            b = nn.functional.pad(b, (0, a.shape[-1] - b.shape[-1], 0, a.shape[-2] - b.shape[-2]))
        return self.bn(torch.cat([a, b], dim=1))


def _conv_1x3_3x1(C, stride, affine):
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(C, C, (1, 3), stride=(1, stride), padding=(0, 1), bias=False),
        nn.Conv2d(C, C, (3, 1), stride=(stride, 1), padding=(1, 0), bias=False),
        nn.BatchNorm2d(C, affine=affine),
    )


OpFactory = Callable[[int, int, bool], nn.Module]

OPS: dict[str, OpFactory] = {
    "none": lambda C, stride, affine: Zero(stride),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "skip_connect": lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
    "conv_3x3": lambda C, stride, affine: ReLUConvBN(C, C, 3, stride, 1, affine=affine),
    "conv_1x3_3x1": _conv_1x3_3x1,
}

PRIMITIVES = tuple(OPS)

DARTS_OPS = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
)
EXTENDED_OPS = DARTS_OPS + ("conv_3x3", "conv_1x3_3x1")
OP_SETS: dict[str, tuple[str, ...]] = {"darts": DARTS_OPS, "extended": EXTENDED_OPS}


def resolve_ops(ops: str | Sequence[str]) -> tuple[str, ...]:
    """An op-set name (``darts``, ``extended``), a comma-separated list of op
    names, or a sequence of op names -> a validated tuple of op names. A set
    name inside a list stands for its ops (``"darts,conv_3x3"``)."""
    if isinstance(ops, str):
        ops = [name.strip() for name in ops.split(",") if name.strip()]
    names = tuple(n for name in ops for n in OP_SETS.get(name, (name,)))
    if not names:
        raise FastDartsError("the op list is empty; name an op set (darts, extended) or some ops")
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise FastDartsError(
            f"unknown op {', '.join(map(repr, unknown))}; known ops: {', '.join(PRIMITIVES)}"
            f" (op sets: {', '.join(OP_SETS)})")
    if len(set(names)) != len(names):
        raise FastDartsError(f"op list {list(names)} names an op twice")
    return names


def imagenet_stems(in_channels: int, C: int) -> tuple[nn.Sequential, nn.Sequential]:
    """The ImageNet stems of DARTS' ``NetworkImageNet`` (and of the ImageNet supernet, with 3C): ``stem0``
    (conv 3x3 stride 2 to C/2, BN, ReLU, conv 3x3 stride 2 to C, BN) and ``stem1`` (ReLU, conv 3x3
    stride 2, BN): 224 -> 56 -> 28. The originals' ReLUs are in place (stem1's overwrites s0 with
    relu(s0)); every consumer of s0 starts with a ReLU, so out of place gives the same values."""
    stem0 = nn.Sequential(
        nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C // 2),
        nn.ReLU(inplace=False),
        nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C),
    )
    stem1 = nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(C),
    )
    return stem0, stem1


def stem_output_size(stem: str, size: int) -> int:
    """The side of the maps the first cell gets from ``size`` x ``size`` images: the ``imagenet`` stems'
    three stride-2 3x3 convolutions (padding 1) take 224 to 28; the ``cifar`` stem keeps the size."""
    for _ in range(3 if stem == "imagenet" else 0):
        size = (size - 1) // 2 + 1
    return size


def too_many_reductions(reductions: int, image_size: int, stem: str, images: str, stem_name: str) -> str | None:
    """None when ``reductions`` stride-2 cells fit the maps ``stem`` makes of ``image_size`` images; else
    the end of the error saying how many fit ("8x8 digits images (1x1 after the imagenet stem) allow at
    most 0"; ``images`` names the data, ``stem_name`` the stem, mentioned only when it shrinks the images)."""
    size = stem_output_size(stem, image_size)  # what the cells see
    if size >= 2 ** reductions:
        return None
    after = f" ({size}x{size} after the {stem_name})" if size != image_size else ""
    return f"{image_size}x{image_size} {images} images{after} allow at most {size.bit_length() - 1}"
