"""The two containers of the data code: a set of images and a data set."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import FastDartsError
from .subset import class_balanced_subset


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

    def take(self, indices: Sequence[int]) -> ImageSet:
        """The images at ``indices`` (a copy in memory, also of a memory-mapped set)."""
        index = torch.as_tensor(list(indices), dtype=torch.int64, device=self.images.device)
        return ImageSet(self.images.index_select(0, index), self.labels.index_select(0, index))


@dataclass(frozen=True, eq=False)
class FileSet:
    """Images as files, decoded as they are read (ImageNet's route): paths and int64 labels ``[N]``."""

    paths: tuple[str, ...]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.paths),):
            raise ValueError(f"FileSet labels must be int64 [{len(self.paths)}], got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: slice) -> FileSet:
        return FileSet(self.paths[index], self.labels[index])

    def take(self, indices: Sequence[int]) -> FileSet:
        indices = list(indices)
        return FileSet(tuple(self.paths[i] for i in indices), self.labels[torch.as_tensor(indices, dtype=torch.int64)])


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
    classes: tuple[str, ...] = ()  # class names in label order, where the data set has them
    # Training images stored class after class (folders): a search split must then be taken per class.
    ordered_by_class: bool = False

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        """Height (= width: the data sets' images are square)."""
        return self.train.images.shape[2]

    def search_split(self, portion: float = 0.5, subset: float | None = None,
                     seed: int = 0) -> tuple[ImageSet, ImageSet]:
        """DARTS' split of the training set: the first part trains w, the rest trains α.

        No shuffling, as the original code's ``indices[:split]`` / ``indices[split:]``;
        for a set stored class after class, that split of each class. With
        ``subset``, the ImageNet search of Xu et al. (2020) instead: a class-balanced
        ``subset`` of the images trains w and a disjoint ``subset / 4`` trains α
        (10 % and 2.5 %), drawn from ``seed``.
        """
        if subset is not None:
            if not 0.0 < subset <= 0.8:
                raise FastDartsError(f"subset {subset} is outside (0, 0.8]: pass the fraction of each class that "
                                     f"trains the weights, such as 0.1 (α gets a quarter of it)")
            labels = self.train.labels.tolist()
            weights = class_balanced_subset(labels, subset, seed=seed)
            arch = class_balanced_subset(labels, subset / 4, seed=seed + 1, exclude=weights)
            return self.train.take(weights), self.train.take(arch)
        if not 0.0 < portion < 1.0:
            raise FastDartsError(f"search split portion {portion} is outside (0, 1): pass a fraction such as 0.5")
        if self.ordered_by_class:
            return self._split_per_class(portion)
        split = int(portion * len(self.train))
        if split == 0 or split == len(self.train):
            raise FastDartsError(
                f"search split portion {portion} of {len(self.train)} {self.name} training images leaves one part empty: pass a fraction nearer 0.5"
            )
        return self.train[:split], self.train[split:]

    def _split_per_class(self, portion: float) -> tuple[ImageSet | FileSet, ImageSet | FileSet]:
        labels = np.asarray(self.train.labels.tolist(), dtype=np.int64)
        weights, arch = [], []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            split = int(portion * len(members))
            if split == 0 or split == len(members):
                name = self.classes[c] if c < len(self.classes) else str(c)
                raise FastDartsError(f"search split portion {portion} of the {len(members)} training images of "
                                     f"class {name!r} leaves one part empty: pass a fraction nearer 0.5 or add images")
            weights.extend(members[:split].tolist())
            arch.extend(members[split:].tolist())
        return self.train.take(sorted(weights)), self.train.take(sorted(arch))


@dataclass(frozen=True, eq=False)
class FileDataset(Dataset):
    """A data set of image files decoded as they are read (``train``/``test`` are ``FileSet``s)."""

    side: int = 224       # the side of the images the loaders yield (the training crop)
    resize: int = 256     # evaluation: shorter side resized to this, then centre-cropped to ``side``

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def image_size(self) -> int:
        return self.side
