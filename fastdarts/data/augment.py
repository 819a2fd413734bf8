"""Batch augmentation on the batch's own device.

Each function treats a whole batch at once (no per-image Python loop, no trip
to the CPU) and draws its randomness from an explicit ``torch.Generator`` on
that device, so a pass can be replayed exactly from its seed.

``part_of=(start, total)`` says that ``x`` holds samples ``start ..
start + len(x) - 1`` of a batch of ``total``: the draws are made for the
whole batch and only this part's are used, so one rank of a multi-process
run augments its share of a batch exactly as a single process would.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


def _draw_rows(x: torch.Tensor, part_of: tuple[int, int] | None) -> tuple[int, slice]:
    """How many samples to draw for, and which of the draws are ``x``'s."""
    if part_of is None:
        return x.shape[0], slice(None)
    start, total = part_of
    return total, slice(start, start + x.shape[0])


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator,
                part_of: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` then crop back to H x W at a random offset per sample.

    As torchvision's ``RandomCrop(size, padding)`` before normalisation: the
    padding is black. Offsets (dy, dx) are drawn in [0, 2 * padding].
    """
    if padding == 0:
        return x
    n, c, h, w = x.shape
    draws, rows = _draw_rows(x, part_of)
    offsets = torch.randint(0, 2 * padding + 1, (2, draws), generator=generator, device=x.device)[:, rows]
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator, part_of: tuple[int, int] | None = None) -> torch.Tensor:
    """Mirror each sample horizontally with probability 0.5."""
    draws, rows = _draw_rows(x, part_of)
    mask = torch.rand(draws, generator=generator, device=x.device)[rows] < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per channel; pass tensors already on the device to avoid a copy per batch."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def cutout(x: torch.Tensor, size: int, generator: torch.Generator,
           part_of: tuple[int, int] | None = None) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square per sample, as DARTS' ``Cutout`` (applied after normalisation).

    The centre is uniform over the image, so the square may be clipped by the
    border; like DARTS it spans rows/columns ``[centre - size // 2, centre + size // 2)``.
    """
    if size == 0:
        return x
    _, _, h, w = x.shape
    draws, rows = _draw_rows(x, part_of)
    cy = torch.randint(0, h, (draws, 1), generator=generator, device=x.device)[rows]
    cx = torch.randint(0, w, (draws, 1), generator=generator, device=x.device)[rows]
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    half = size // 2
    in_rows = (ys >= cy - half) & (ys < cy + half)
    in_cols = (xs >= cx - half) & (xs < cx + half)
    square = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(square, 0.0)
