"""A loader that keeps the whole image set on the device and augments batches there.

Randomness (permutation, crops, flips, cutout) comes from a generator seeded
by a fixed function of (seed, epoch, pass), never from global RNG state, so a
resumed run replays exactly the passes of the uninterrupted one.

With ``shard=(rank, world_size)`` a loader yields rank's contiguous part of
every batch of the single-process order (``shard_bounds``), augmented as the
single process augments it: every rank draws the permutation and the whole
batch's crops, flips and cutouts from the same generator and keeps its own
part. The ranks' parts, concatenated in rank order, are the single-process
batch, bit for bit; a part may be empty when a short last batch has fewer
images than there are ranks.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..distributed import shard_bounds
from ..errors import FastDartsError
from .dataset import ImageSet
from .augment import cutout as apply_cutout
from .augment import normalize, random_crop, random_flip, to_float

_PRIME = 1_000_003
_MASK63 = (1 << 63) - 1


def mix_seed(seed: int, epoch: int, k: int) -> int:
    """A 63-bit seed for pass ``k`` of ``epoch``; deterministic, unlike ``hash()``."""
    return ((seed * _PRIME + epoch) * _PRIME + k) & _MASK63


class PassLoader:
    """What every loader shares: ``batch_size``/``drop_last`` passes over ``num_images`` images, replayable
    by (epoch, pass); a subclass yields pass ``k`` of ``epoch`` from ``_pass``."""

    num_images: int
    batch_size: int
    drop_last: bool

    def _check_common(self, batch_size: int, shard: tuple[int, int] | None) -> None:
        if batch_size <= 0:
            raise FastDartsError(f"batch size {batch_size} is not positive: pass a batch size of at least 1")
        if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
            raise FastDartsError(f"shard {shard} is not (rank, world_size) with 0 <= rank < world_size")

    def _check_batches(self) -> None:
        if len(self) == 0:
            raise FastDartsError(f"{self.num_images} images make no batch of {self.batch_size} with drop_last: "
                                 f"lower the batch size")

    def __len__(self) -> int:
        """Batches per pass (whole batches: a shard's parts are counted once)."""
        n = self.num_images
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch_images(self, i: int) -> int:
        """Images in batch ``i`` of a pass, over all shards (the last may be short)."""
        return min(self.batch_size, self.num_images - i * self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the set, identical whenever ``epoch`` is replayed."""
        return self._pass(epoch, 0)

    def cycle(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches: pass ``epoch`` (as ``epoch(epoch)``), then further passes with new permutations."""
        k = 0
        while True:
            yield from self._pass(epoch, k)
            k += 1

    def _pass(self, epoch: int, k: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


class DeviceLoader(PassLoader):
    """Batches of one ``ImageSet``, moved to ``device`` once and augmented there."""

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        *,
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool,
        crop_padding: int = 0,
        flip: bool = False,
        cutout: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self._check_common(batch_size, shard)
        channels = images.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise FastDartsError(f"mean/std have {len(mean)}/{len(std)} values for {channels}-channel images: give one per channel")
        if crop_padding < 0 or cutout < 0:
            raise FastDartsError(f"crop padding {crop_padding} and cutout {cutout} must not be negative")
        self.device = torch.device(device)
        self.images, self.labels = self._hold(images)
        self.num_images = len(self.labels)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.crop_padding = crop_padding
        self.flip = flip
        self.cutout = cutout
        self.seed = seed
        self.drop_last = drop_last
        self.shard = shard
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self._check_batches()

    def _pass(self, epoch: int, k: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(mix_seed(self.seed, epoch, k))
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=generator, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        parts = []
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            part_of = None
            if self.shard is not None:
                start, stop = shard_bounds(len(index), *self.shard)
                part_of = (start, len(index))
                index = index[start:stop]
            parts.append((index, part_of))
        for (index, part_of), (x, y) in zip(parts, self._gathered([index for index, _ in parts])):
            x = to_float(x)
            x = random_crop(x, self.crop_padding, generator, part_of)
            if self.flip:
                x = random_flip(x, generator, part_of)
            x = normalize(x, self._mean, self._std)
            x = apply_cutout(x, self.cutout, generator, part_of)
            yield x, y

    def _gathered(self, indices: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each batch's uint8 images and labels, in order (gathering draws no random numbers)."""
        return (self._gather(index) for index in indices)

    def _hold(self, images: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the set is kept: the whole of it on the device."""
        on_device = images.to(self.device)
        return on_device.images, on_device.labels

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 images and the labels at ``index``, on the device."""
        return self.images[index], self.labels[index]
