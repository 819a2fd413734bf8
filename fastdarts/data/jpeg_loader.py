"""A loader that streams image files (ImageNet's JPEGs) through worker processes to the device.

ImageNet does not fit in memory as uint8 (1.28 M images), so unlike
``DeviceLoader`` this one decodes every batch from the files again:
``torch.utils.data.DataLoader`` workers each decode whole (part-)batches —
train: ``RandomResizedCrop`` + flip, eval: ``Resize`` + ``CenterCrop``
(``jpeg_transforms``) — into uint8 ``[b, 3, S, S]``, pinned when the device is
CUDA; the main process moves the batch with ``non_blocking=True``, then
converts it to float, applies the colour jitter (train) and normalises on the
device. The interface is ``DeviceLoader``'s, so the search and training loops
take either.

Order and randomness depend on nothing but (seed, epoch, pass, position): the
pass's permutation comes from a CPU ``torch.Generator`` seeded with
``mix_seed(seed, epoch, k)``, and each image's crop, flip and jitter draws from
a numpy ``Generator`` seeded with (that pass seed, the image's position in the
pass). So the number of workers changes nothing, and with
``shard=(rank, world_size)`` a rank decodes only its contiguous part
(``shard_bounds``) of every single-process batch: the ranks' parts
concatenated are the single-process batch, bit for bit.

Paths are kept as one byte buffer plus offsets, not a list of ``str``: forked
workers read it without touching a million Python objects' reference counts
(which would copy the pages into every worker).
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..distributed import shard_bounds
from ..errors import FastDartsError
from .augment import normalize, to_float
from .jpeg_transforms import check_jitter, color_jitter, eval_image, train_image
from .loader import PassLoader, mix_seed

DEFAULT_JITTER = (0.4, 0.4, 0.4, 0.2)  # the DARTS papers' ImageNet training


def image_rng(pass_seed: int, position: int) -> np.random.Generator:
    """The generator of the image at ``position`` of a pass (SeedSequence mixes both numbers fully)."""
    return np.random.default_rng((pass_seed, position))


# One batch for a worker: (pass seed, position in the pass of its first image, data set indices).
BatchItem = tuple[int, int, np.ndarray]


class _PassBatches(Sampler):
    """The current pass's batch items; set before each pass, so persistent workers serve every pass."""

    def __init__(self) -> None:
        self.items: list[BatchItem] = []

    def __iter__(self) -> Iterator[BatchItem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _BatchDecoder(torch.utils.data.Dataset):
    """Decodes a whole batch item in a worker (or in the main process with 0 workers).

    Returns ``(images uint8 [b, 3, S, S], labels int64 [b])``, plus ``(factors float64 [b, 4],
    order int64 [b, 4])`` of the colour jitter when training; or, for an unreadable file, the
    ``FastDartsError`` line as a ``str`` (a raised error would reach the main process wrapped in
    the worker's traceback, and the user should see one line).
    """

    def __init__(self, paths: Sequence[str | Path], labels: np.ndarray, *, train: bool, image_size: int,
                 resize: int, jitter: tuple[float, float, float, float] | None, draft: bool) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = labels
        self.train = train
        self.image_size = image_size
        self.resize = resize
        self.jitter = jitter
        self.draft = draft

    def path(self, index: int) -> str:
        return os.fsdecode(self.blob[self.offsets[index]:self.offsets[index + 1]].tobytes())

    def __getitem__(self, item: BatchItem) -> tuple[torch.Tensor, ...] | str:
        pass_seed, first, indices = item
        n, size = len(indices), self.image_size
        images = torch.empty((n, 3, size, size), dtype=torch.uint8)
        factors = np.zeros((n, 4), dtype=np.float64)
        order = np.zeros((n, 4), dtype=np.int64)
        try:
            for k, index in enumerate(indices.tolist()):
                path = self.path(index)
                if self.train:
                    pixels, draws = train_image(path, image_rng(pass_seed, first + k), size,
                                                jitter=self.jitter, draft=self.draft)
                    factors[k], order[k] = draws.factors, draws.order
                else:
                    pixels = eval_image(path, size, self.resize, draft=self.draft)
                images[k].copy_(torch.from_numpy(pixels).permute(2, 0, 1))
        except FastDartsError as exc:
            return str(exc)
        labels = torch.from_numpy(self.labels[indices])
        if self.train:
            return images, labels, torch.from_numpy(factors), torch.from_numpy(order)
        return images, labels


def _stop_workers(iterator: object) -> None:
    """Shut down a multi-process ``DataLoader`` iterator's workers (its own ``__del__`` does the same)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class JpegLoader(PassLoader):
    """Batches of image files, decoded by ``workers`` processes and normalised on ``device``.

    ``train``: ``RandomResizedCrop(image_size)``, horizontal flip, ``ColorJitter(*jitter)``
    (``None`` or zeros: none, as the ImageNet search recipe); else ``Resize(resize)``, ``CenterCrop(image_size)``.
    ``draft``: let libjpeg decode large JPEGs at reduced size (faster; pixels differ slightly,
    see ``jpeg_transforms``). One pass at a time: starting a pass ends the one before.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int],
        batch_size: int,
        *,
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        image_size: int = 224,
        resize: int = 256,
        shuffle: bool,
        seed: int = 0,
        workers: int = 2,
        drop_last: bool = False,
        shard: tuple[int, int] | None = None,
        jitter: Sequence[float] | None = DEFAULT_JITTER,
        draft: bool = True,
    ) -> None:
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if len(paths) == 0:
            raise FastDartsError("no image files to load: check that the folder holds images")
        if labels.shape != (len(paths),) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise FastDartsError(f"{len(paths)} image files but labels of shape {labels.shape} ({labels.dtype}): "
                                 "give one integer label per file")
        if labels.min() < 0:
            raise FastDartsError(f"label {int(labels.min())} is negative: labels are class indices from 0")
        self._check_common(batch_size, shard)
        if len(mean) != 3 or len(std) != 3:
            raise FastDartsError(f"mean/std have {len(mean)}/{len(std)} values for RGB images: give 3 each")
        if image_size <= 0:
            raise FastDartsError(f"image size {image_size} is not positive: pass a size such as 224")
        if not train and resize < image_size:
            raise FastDartsError(f"resize {resize} is smaller than the image size {image_size}: "
                                 "the centre crop must fit, pass a resize of at least the image size (256 for 224)")
        if workers < 0:
            raise FastDartsError(f"{workers} loader workers: pass 0 (decode in this process) or more")
        self.device = torch.device(device)
        self.num_images = len(paths)
        self.batch_size = batch_size
        self.train = train
        self.image_size = image_size
        self.shuffle = shuffle
        self.seed = seed
        self.workers = workers
        self.drop_last = drop_last
        self.shard = shard
        self.jitter = check_jitter(jitter) if train else None
        self._decoder = _BatchDecoder(paths, labels.astype(np.int64), train=train, image_size=image_size,
                                      resize=resize, jitter=self.jitter, draft=draft)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self._batches = _PassBatches()
        self._loader: DataLoader | None = None
        self._active: object | None = None
        self._stop: weakref.finalize | None = None
        self._check_batches()

    def close(self) -> None:
        """Stop the worker processes now (a later pass starts new ones)."""
        stop, self._stop = self._stop, None
        self._loader = self._active = None
        if stop is not None:
            stop()

    def pass_items(self, epoch: int, k: int) -> list[BatchItem]:
        """This rank's batch items of pass ``k`` of ``epoch``: what the workers decode."""
        pass_seed = mix_seed(self.seed, epoch, k)
        n = self.num_images
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(pass_seed)
            order = torch.randperm(n, generator=generator).numpy()
        else:
            order = np.arange(n, dtype=np.int64)
        items = []
        for i in range(len(self)):
            first = i * self.batch_size
            start, stop = 0, self.batch_images(i)
            if self.shard is not None:
                start, stop = shard_bounds(stop, *self.shard)
            items.append((pass_seed, first + start, order[first + start:first + stop].copy()))
        return items

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            self._loader = DataLoader(
                self._decoder, batch_size=None, sampler=self._batches, num_workers=self.workers,
                pin_memory=self.device.type == "cuda", prefetch_factor=2 if self.workers else None,
                persistent_workers=self.workers > 0)
        return self._loader

    def _pass(self, epoch: int, k: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        token = self._active = object()
        self._batches.items = self.pass_items(epoch, k)
        batches = iter(self._dataloader())  # persistent workers: the same iterator, reset for this pass
        if self.workers and self._stop is None:
            # Stop the workers when this loader goes, from a finalizer that holds their iterator: left
            # to the garbage collector (a loader in a reference cycle, say through a traceback), the
            # iterator's own shutdown may find its queues finalised first and wait 5 s per worker.
            self._stop = weakref.finalize(self, _stop_workers, batches)
        for _ in range(len(self._batches.items)):
            item = next(batches)
            if isinstance(item, str):
                raise FastDartsError(item)
            x = to_float(item[0].to(self.device, non_blocking=True))
            if self.jitter is not None:
                x = color_jitter(x, item[2], item[3], self.jitter)
            x = normalize(x, self._mean, self._std)
            yield x, item[1].to(self.device, non_blocking=True)
            if self._active is not token:  # checked before taking the next item: it would be the newer pass's
                raise RuntimeError("another pass of this JpegLoader started while this one was running: "
                                   "take one pass at a time")
