"""A loader for image sets too large for the device: batches gathered from host memory.

``StreamLoader`` yields exactly ``DeviceLoader``'s batches (same order, same
augmentation, same shards: it only overrides where the uint8 images live).
The images stay in host memory, typically a memory-mapped uint8 cache
(``image_cache.py``), so the operating system pages in what is read. Each
batch is gathered on the host, pinned and copied to the device without
blocking; a background thread gathers the next batch while the current one
is augmented and trained on. Gathering draws no random numbers, so running
it ahead does not change any draw.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import torch

from .dataset import ImageSet
from .loader import DeviceLoader


class StreamLoader(DeviceLoader):
    """``DeviceLoader``'s batches of an ``ImageSet`` kept in host memory (see the module docstring)."""

    def _hold(self, images: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        # Labels are small: on the device. Images: where they are (host memory, maybe a memory map).
        return images.images.cpu(), images.labels.to(self.device)

    def _gathered(self, indices: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not indices:
            return
        host_indices = torch.cat(indices).cpu().split([len(i) for i in indices])  # one device sync per pass
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdarts-gather") as pool:
            ahead = pool.submit(self._gather_host, host_indices[0])
            for i in range(len(indices)):
                host = ahead.result()
                if i + 1 < len(indices):
                    ahead = pool.submit(self._gather_host, host_indices[i + 1])
                yield host.to(self.device, non_blocking=True), self.labels[indices[i]]

    def _gather_host(self, index: torch.Tensor) -> torch.Tensor:
        """The uint8 images at ``index`` in (pinned, for a CUDA device) host memory."""
        host = self.images.index_select(0, index)
        return host.pin_memory() if self.device.type == "cuda" else host
