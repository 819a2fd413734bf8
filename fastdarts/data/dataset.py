"""The two containers of the data code: a set of images and a data set."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FastDartsError


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images as uint8 ``[N, C, H, W]`` (contiguous) with int64 labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"ImageSet images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"ImageSet labels must be int64 [{len(self.images)}], got {self.labels.dtype} {tuple(self.labels.shape)}")
        if not self.images.is_contiguous():
            raise ValueError("ImageSet images must be contiguous")

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> ImageSet:
        """The same set on ``device`` (no copy if it is already there)."""
        return ImageSet(self.images.to(device), self.labels.to(device))

    def __getitem__(self, index: slice) -> ImageSet:
        """A slice of the set (a view: slicing dim 0 keeps it contiguous)."""
        return ImageSet(self.images[index], self.labels[index])


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test pair plus what the loaders need to normalise and augment it."""

    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    crop_padding: int  # random-crop padding of the train augmentation
    flip: bool  # horizontal flips in the train augmentation

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        """Height (= width: both data sets have square images)."""
        return self.train.images.shape[2]

    def search_split(self, portion: float = 0.5) -> tuple[ImageSet, ImageSet]:
        """DARTS' split of the training set: the first part trains w, the rest trains α.

        No shuffling, as the original code's ``indices[:split]`` / ``indices[split:]``.
        """
        if not 0.0 < portion < 1.0:
            raise FastDartsError(f"search split portion {portion} is outside (0, 1): pass a fraction such as 0.5")
        split = int(portion * len(self.train))
        if split == 0 or split == len(self.train):
            raise FastDartsError(
                f"search split portion {portion} of {len(self.train)} {self.name} training images leaves one part empty: pass a fraction nearer 0.5"
            )
        return self.train[:split], self.train[split:]
