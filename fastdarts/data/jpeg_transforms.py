"""ImageNet's per-image transforms, without torchvision: decode + geometry on the CPU, colour jitter on the device.

The DARTS papers train on ImageNet with torchvision's
``RandomResizedCrop(224) -> RandomHorizontalFlip() -> ColorJitter(0.4, 0.4, 0.4, 0.2)
-> ToTensor() -> Normalize(mean, std)`` and evaluate with
``Resize(256) -> CenterCrop(224)`` (the published ImageNet search leaves out the jitter).
This module restates those transforms with Pillow, numpy and torch:

* Geometry (CPU, in a loader worker): a file is decoded to RGB (grayscale
  and CMYK JPEGs are converted as ``ImageFolder``'s ``convert("RGB")`` does),
  cropped and resized with Pillow's antialiased bilinear filter exactly as
  torchvision does it on PIL images (``crop`` then ``resize``), and flipped.
  The draws (crop, flip, jitter) come from a numpy ``Generator`` the caller
  seeds per image, in torchvision's order: the crop's tries, the flip, the
  jitter's op order, then its factors. Draws are float64 (torchvision's are
  float32), the same distribution.
* ``draft=True`` (the default) lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8
  of its size (DCT scaling, ``Image.draft``) when the crop (train) or the
  resized image (eval) is at most half that size, then resizes the reduced
  image from the same region (``resize(box=...)``, the box scaled by the
  reduction). It only applies to photos at least twice the output (at 224:
  a crop or a shorter side of 448+ pixels, ImageNet's larger photos; at
  112 most of them: a 500x375 JPEG then decodes ~1.6x faster). It changes
  pixels slightly (the DCT's own downscale replaces part of the bilinear
  one, and the filter may reach past the crop's border by a reduced pixel).
  ``draft=False`` gives torchvision's pixels exactly.
* Colour jitter (device, on the float batch in [0, 1] before normalising):
  torchvision's tensor semantics (``F.adjust_brightness/contrast/saturation/
  hue`` on float tensors, each result clamped to [0, 1]): brightness
  ``f * x``; contrast ``f * x + (1 - f) * mean(gray(x))`` over the image;
  saturation ``f * x + (1 - f) * gray(x)`` per pixel, with
  ``gray = 0.2989 R + 0.587 G + 0.114 B``; hue adds ``f`` to the HSV hue
  (mod 1). Factors are uniform in ``[max(0, 1 - b), 1 + b]`` (brightness,
  contrast, saturation) and ``[-h, h]`` (hue); an op whose setting is 0 is
  skipped and draws nothing; the four run in a random order per image. This
  differs from torchvision's PIL path (which DARTS ran) only by rounding: the
  PIL path rounds to uint8 after every op and turns the hue in 8-bit HSV.
  On the device it costs one pass over the batch per op instead of a
  quarter of the workers' CPU time.
"""
from __future__ import annotations

import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import FastDartsError

RRC_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_TRIES = 10
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale for tensors
_DRAFT_SCALES = (8, 4, 2)  # what libjpeg's DCT scaling offers (1/8, 1/4, 1/2)
_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")

# What Pillow raises for a file it cannot read: missing, not an image, truncated, corrupt, too large.
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, Image.DecompressionBombError)


# ---------------------------------------------------------------- draws


@dataclass(frozen=True)
class TrainDraws:
    """One image's random choices: the crop (top, left, height, width) in source pixels, the flip,
    the jitter's op order (0 brightness, 1 contrast, 2 saturation, 3 hue) and factors (in that op numbering)."""

    box: tuple[int, int, int, int]
    flip: bool
    order: tuple[int, int, int, int] = (0, 1, 2, 3)
    factors: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 0.0)


def check_jitter(jitter: Sequence[float] | None) -> tuple[float, float, float, float] | None:
    """``(brightness, contrast, saturation, hue)`` validated; ``None`` when no op is on."""
    if jitter is None:
        return None
    values = tuple(float(v) for v in jitter)
    if len(values) != 4:
        raise FastDartsError(f"colour jitter {tuple(jitter)} must have 4 values: "
                             "(brightness, contrast, saturation, hue)")
    for name, v in zip(_JITTER_NAMES, values):
        if not v >= 0:
            raise FastDartsError(f"colour jitter {name} {v} is negative: pass a value of at least 0")
    if values[3] > 0.5:
        raise FastDartsError(f"colour jitter hue {values[3]} is above 0.5: pass a value in [0, 0.5]")
    return values if any(values) else None


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = RRC_SCALE,
                            ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(top, left, height, width)`` of the crop.

    Up to 10 tries of an area fraction uniform in ``scale`` and an aspect ratio
    log-uniform in ``ratio``; the first that fits is placed uniformly. If none
    fits, the centred crop of the whole image, clamped to the ratio range.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(RRC_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_jitter(rng: np.random.Generator, jitter: tuple[float, float, float, float] | None
                ) -> tuple[tuple[int, int, int, int], tuple[float, float, float, float]]:
    """The op order (a permutation of 0..3) and the factors, as ``ColorJitter.get_params``.

    Ops whose setting is 0 draw nothing and keep the neutral factor (1, or 0 for hue).
    """
    if jitter is None:
        return (0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0)
    order = tuple(int(k) for k in rng.permutation(4))
    factors = [1.0, 1.0, 1.0, 0.0]
    for op in range(3):
        if jitter[op] > 0:
            factors[op] = float(rng.uniform(max(0.0, 1.0 - jitter[op]), 1.0 + jitter[op]))
    if jitter[3] > 0:
        factors[3] = float(rng.uniform(-jitter[3], jitter[3]))
    return order, tuple(factors)


def draw_train(width: int, height: int, rng: np.random.Generator,
               jitter: tuple[float, float, float, float] | None) -> TrainDraws:
    """All of one image's draws, in torchvision's order: crop, flip (p = 0.5), jitter."""
    box = random_resized_crop_box(width, height, rng)
    flip = bool(rng.random() < 0.5)
    order, factors = draw_jitter(rng, jitter)
    return TrainDraws(box, flip, order, factors)


# ---------------------------------------------------------------- decoding and geometry


@contextmanager
def reading(path: str | Path) -> Iterator[None]:
    """Pillow's errors for an unreadable file as one ``FastDartsError`` line naming it."""
    try:
        yield
    except _UNREADABLE as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FastDartsError(f"cannot read image {path}: {reason}; remove or replace the file") from None


def draft_scale(region_w: float, region_h: float, target_w: int, target_h: int) -> int:
    """How much libjpeg may shrink (1, 2, 4 or 8) so that a ``region`` of the source still covers
    at least ``target`` pixels: the largest s with ``s * target <= region`` in both directions.

    s is also kept at most ``min(target)``, which makes ``Image.draft`` pick exactly s
    (its choice is ``min(W // (W // s), H // (H // s))``, equal to s once ``W // s >= s``).
    """
    for s in _DRAFT_SCALES:
        if s * target_w <= region_w and s * target_h <= region_h and s <= min(target_w, target_h):
            return s
    return 1


def _open_reduced(img: Image.Image, scale: int) -> tuple[Image.Image, int]:
    """``img`` decoded to RGB, at 1/scale of its size where it is a JPEG; the scale actually used."""
    if scale > 1 and img.format == "JPEG":
        width, height = img.size
        drafted = img.draft("RGB", (width // scale, height // scale))
        scale = round(width / drafted[1][2]) if drafted is not None else 1
    else:
        scale = 1
    return img.convert("RGB"), scale


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output (width, height): the shorter side becomes ``size``,
    the longer ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def train_image(path: str | Path, rng: np.random.Generator, size: int, *,
                jitter: tuple[float, float, float, float] | None = None,
                draft: bool = True) -> tuple[np.ndarray, TrainDraws]:
    """``RandomResizedCrop(size)`` + ``RandomHorizontalFlip()`` of one file: uint8 ``[size, size, 3]``,
    and the draws (the jitter's are applied later, on the device, by ``color_jitter``)."""
    with reading(path), Image.open(path) as img:
        width, height = img.size
        draws = draw_train(width, height, rng, jitter)
        top, left, h, w = draws.box
        scale = draft_scale(w, h, size, size) if draft else 1
        rgb, scale = _open_reduced(img, scale)
        if scale == 1:  # torchvision's F.resized_crop on a PIL image
            out = rgb.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR)
        else:
            box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
            out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
        if draws.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(out), draws


def eval_image(path: str | Path, size: int, resize: int, *, draft: bool = True) -> np.ndarray:
    """``Resize(resize)`` (shorter side) + ``CenterCrop(size)`` of one file: uint8 ``[size, size, 3]``.

    ``resize >= size`` (the loader checks), so the crop never pads.
    """
    with reading(path), Image.open(path) as img:
        width, height = img.size
        new_w, new_h = resized_size(width, height, resize)
        scale = draft_scale(width, height, new_w, new_h) if draft else 1
        rgb, scale = _open_reduced(img, scale)
        if scale == 1:
            resized = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)  # a copy when the size is already right
        else:
            resized = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR, box=(0, 0, width / scale, height / scale))
        top = int(round((new_h - size) / 2.0))  # torchvision's F.center_crop (round half to even)
        left = int(round((new_w - size) / 2.0))
        return np.array(resized.crop((left, top, left + size, top + size)))


# ---------------------------------------------------------------- colour jitter on the device


def _per_image(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[n, 1, H, W]`` of RGB ``x`` ``[n, 3, H, W]``."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_image(factor, x)
    return (f * x + (1.0 - f) * other).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``clamp(f * x)`` per image (torchvision blends with black: ``f * x + (1 - f) * 0``, the same numbers)."""
    return (_per_image(factor, x) * x).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with the mean of its grayscale. The mean is summed in float64 and rounded once:
    a float32 reduction may split its sums differently for a whole batch and for one rank's part of it,
    and each image must come out the same either way."""
    mean = grayscale(x).to(torch.float64).mean(dim=(1, 2, 3), keepdim=True).to(x.dtype)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each pixel with its grayscale."""
    return _blend(x, grayscale(x), factor)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in [0, 1), saturation, value, each ``[n, H, W]``; gray pixels get hue 0 and saturation 0."""
    r, g, b = x.unbind(1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    colour = chroma > 0
    safe = torch.where(colour, chroma, torch.ones_like(chroma))  # no 0/0 for gray pixels
    saturation = torch.where(colour, chroma / torch.where(colour, value, torch.ones_like(value)), 0.0)
    rc, gc, bc = (value - r) / safe, (value - g) / safe, (value - b) / safe
    hue = torch.where(r == value, bc - gc, torch.where(g == value, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(colour, torch.remainder(hue / 6.0, 1.0), 0.0)
    return hue, saturation, value


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[n, 3, H, W]`` from HSV, by the sector-free form ``v - v s clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + 6 h) mod 6`` with n = 5, 3, 1 for R, G, B."""
    def channel(n: float) -> torch.Tensor:
        k = torch.remainder(n + 6.0 * hue, 6.0)
        return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return torch.stack((channel(5.0), channel(3.0), channel(1.0)), dim=1)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Turn each image's hue by its factor (a fraction of the circle, in [-0.5, 0.5])."""
    hue, saturation, value = rgb_to_hsv(x)
    shift = factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)
    return hsv_to_rgb(torch.remainder(hue + shift, 1.0), saturation, value)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 jitter: tuple[float, float, float, float] | None) -> torch.Tensor:
    """torchvision's ``ColorJitter`` on a float batch ``x`` ``[n, 3, H, W]`` in [0, 1].

    ``factors`` ``[n, 4]`` (any device) and ``order`` ``[n, 4]`` (on the CPU, so choosing which images
    take which op at each step needs no device sync) are ``draw_jitter``'s per image. Step k applies,
    to each image, op ``order[i, k]`` if that op is on in ``jitter``.
    """
    if jitter is None or len(x) == 0:
        return x
    order = order.cpu()
    factors = factors.to(device=x.device, non_blocking=True)  # pinned by the loader
    for step in range(4):
        for op, fn in enumerate(JITTER_OPS):
            if jitter[op] == 0:
                continue
            rows = (order[:, step] == op).nonzero().flatten()
            if len(rows) == len(x):
                x = fn(x, factors[:, op])
            elif len(rows):
                rows = rows.to(x.device, non_blocking=True)
                x = x.index_copy(0, rows, fn(x.index_select(0, rows), factors[rows, op]))
    return x
