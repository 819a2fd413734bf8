"""Batch augmentation on the batch's own device.

Each function treats a whole batch at once (no per-image Python loop, no trip
to the CPU) and draws its randomness from an explicit ``torch.Generator`` on
that device, so a pass can be replayed exactly from its seed.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]."""
    return images.to(torch.float32).div_(255.0)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` then crop back to H x W at a random offset per sample.

    As torchvision's ``RandomCrop(size, padding)`` before normalisation: the
    padding is black. Offsets (dy, dx) are drawn in [0, 2 * padding].
    """
    if padding == 0:
        return x
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each sample horizontally with probability 0.5."""
    mask = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def normalize(x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` per channel; pass tensors already on the device to avoid a copy per batch."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square per sample, as DARTS' ``Cutout`` (applied after normalisation).

    The centre is uniform over the image, so the square may be clipped by the
    border; like DARTS it spans rows/columns ``[centre - size // 2, centre + size // 2)``.
    """
    if size == 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1), generator=generator, device=x.device)
    cx = torch.randint(0, w, (n, 1), generator=generator, device=x.device)
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    half = size // 2
    in_rows = (ys >= cy - half) & (ys < cy + half)
    in_cols = (xs >= cx - half) & (xs < cx + half)
    square = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(square, 0.0)
