"""How a run's batches are served: one choice of route per run, then its loaders.

Three routes, all with the same interface (``epoch``, ``cycle``, ``len``,
``batch_images``) and the same (seed, epoch) order and sharding:

- ``device``: the uint8 images held on the device, augmented there
  (``DeviceLoader``); for sets within the memory budget (CIFAR-10: 150 MB).
- ``stream``: the uint8 images left in host memory, typically a memory-mapped
  cache, gathered per batch into pinned memory (``StreamLoader``); the same
  batches as ``device``, bit for bit.
- ``jpeg``: files decoded by worker processes as they are read
  (``JpegLoader``); for ImageNet, too large to hold as uint8.

The memory budget for holding images on the device: a quarter of the CUDA
device's memory, or a quarter of the host's physical memory for the CPU
device (where "on the device" means read into memory rather than left
memory-mapped). ``budget_mb`` overrides it (0: always stream).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from ..errors import FastDartsError
from .dataset import Dataset, FileDataset, FileSet, ImageSet
from .loader import DeviceLoader
from .stream_loader import StreamLoader

BUDGET_FRACTION = 0.25
ROUTES = ("device", "stream", "jpeg")


def device_budget_bytes(device: torch.device, budget_mb: float | None = None) -> int:
    """Bytes of uint8 images a run may hold on ``device`` (see the module docstring)."""
    if budget_mb is not None:
        if not budget_mb >= 0:
            raise FastDartsError(f"data budget {budget_mb!r} MB must not be negative (0: stream every batch)")
        return int(budget_mb * 2 ** 20)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not every platform says
            total = 8 * 2 ** 30
    return int(BUDGET_FRACTION * total)


class Loaders:
    """The loaders of one run on one data set: the route is chosen once, from every part it will serve.

    ``parts`` are the image sets the run reads (e.g. the two halves of a
    search split); ``placed`` holds them as the route keeps them (moved to the
    device once for ``device``, so loaders over the same part share one copy).
    """

    def __init__(self, dataset: Dataset, parts: Sequence[ImageSet | FileSet], device: torch.device, *,
                 shard: tuple[int, int] | None = None, budget_mb: float | None = None,
                 workers: int | None = None):
        self.dataset, self.device, self.shard = dataset, device, shard
        self.workers = default_workers() if workers is None else workers
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise FastDartsError(f"workers must be a non-negative integer (0: decode in this process), got "
                                 f"{workers!r}")
        if isinstance(dataset, FileDataset):
            self.route = "jpeg"
            self.placed = tuple(parts)
            return
        size = sum(part.images.numel() for part in parts)
        self.route = "device" if size <= device_budget_bytes(device, budget_mb) else "stream"
        self.placed = tuple(part.to(device) if self.route == "device" else part for part in parts)

    def __call__(self, part: ImageSet | FileSet, batch_size: int, *, train: bool, shuffle: bool, seed: int = 0,
                 cutout: int = 0, drop_last: bool = False, colour_jitter: bool = True, share: int = 1):
        """A loader of ``part`` (one of ``placed``); ``train`` applies the data set's training augmentation
        (``colour_jitter``: with DARTS' ImageNet colour jitter, on the ``jpeg`` route). ``share``: how many
        loaders read at the same time (a search's weight and α batches), sharing the decoding workers."""
        ds = self.dataset
        if self.route == "jpeg":
            from .jpeg_loader import JpegLoader  # only this route needs the decoding workers

            if train and cutout:
                raise FastDartsError(f"cutout ({cutout} px) is not applied on {ds.name}'s streamed JPEG route "
                                     f"(DARTS' ImageNet training has none): pass --cutout 0")

            return JpegLoader(part.paths, part.labels.tolist(), batch_size, device=self.device, mean=ds.mean,
                              std=ds.std, train=train, image_size=ds.side, resize=ds.resize, shuffle=shuffle,
                              seed=seed, workers=-(-self.workers // share), drop_last=drop_last, shard=self.shard,
                              **({} if colour_jitter else dict(jitter=None)))
        loader = DeviceLoader if self.route == "device" else StreamLoader
        augment = dict(crop_padding=ds.crop_padding, flip=ds.flip, cutout=cutout) if train else {}
        return loader(part, batch_size, device=self.device, mean=ds.mean, std=ds.std, shuffle=shuffle, seed=seed,
                      drop_last=drop_last, shard=self.shard, **augment)

    def describe(self) -> str:
        """A few words for the run's log."""
        return dict(device="images held on the device", stream="images streamed from host memory",
                    jpeg=f"JPEGs decoded by {self.workers} worker processes")[self.route]


def default_workers() -> int:
    """Decoding processes: the cores this process may use, less one for the training loop, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))
