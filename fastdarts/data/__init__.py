"""Data sets and the loaders that serve them (SPEC §5).

A set small enough as uint8 (CIFAR-10: 150 MB; a folder's decoded cache) is
kept in one tensor, moved to the device once and augmented there in batches,
or streamed from host memory when it exceeds the budget (``serving.py``);
ImageNet is decoded from its JPEGs by worker processes as it is read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import FastDartsError
from .cifar10 import CIFAR10_MEAN, CIFAR10_STD, download_cifar10, load_cifar10
from .cifar100 import CIFAR100_MEAN, CIFAR100_STD, download_cifar100, load_cifar100
from .dataset import Dataset, FileDataset, FileSet, ImageSet
from .digits import load_digits
from .loader import DeviceLoader
from .serving import Loaders
from .stream_loader import StreamLoader

DATASETS = ("cifar10", "cifar100", "digits", "folder", "imagenet")
# Data sets read from a folder of image files (the others are fixed archives).
FOLDER_DATASETS = ("folder", "imagenet")


def load_dataset(name: str, root: str | Path = "./data", download: bool = False, *, image_size: int | None = None,
                 skip_bad_images: bool = False, workers: int | None = None, progress: bool = True,
                 log: Callable[[str], None] = print, build_cache: bool = True) -> Dataset:
    """Load a data set by name.

    ``root``: where CIFAR is (or is downloaded to, with ``download``), or the
    folder holding ``train/`` and ``val/`` (``folder``, ``imagenet``).
    ``image_size``: a folder's images are resized (shorter side) and
    centre-cropped to it; ImageNet's training crop. ``skip_bad_images``:
    drop unreadable images of a folder instead of stopping at the first.
    ``workers``: processes decoding a folder's images. ``build_cache=False``: wait
    for another process to decode a folder (rank 0 of a torchrun run does it).
    """
    check_data_settings(name, image_size=image_size, skip_bad_images=skip_bad_images, workers=workers,
                        download=download)
    if name == "cifar10":
        return load_cifar10(root, download=download)
    if name == "cifar100":
        return load_cifar100(root, download=download)
    if name == "digits":
        return load_digits()
    if name == "folder":
        from .image_folder import load_image_folder  # decoding needs Pillow: imported when used

        return load_image_folder(root, image_size=image_size, skip_bad_images=skip_bad_images, workers=workers,
                                 progress=progress, log=log, build=build_cache)
    if name == "imagenet":
        from .imagenet import load_imagenet

        return load_imagenet(root, image_size=image_size)
    raise FastDartsError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")


def check_data_settings(name: str, *, image_size: int | None = None, skip_bad_images: bool = False,
                        workers: int | None = None, download: bool = False,
                        data_budget_mb: float | None = None) -> None:
    """Refuse data options that do not apply to ``name`` or are out of range, before anything is read."""
    if name not in DATASETS:
        raise FastDartsError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    if image_size is not None:
        if name not in FOLDER_DATASETS:
            raise FastDartsError(f"--image-size applies to --dataset folder or imagenet; {name} images have a "
                                 f"fixed size")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2:
            raise FastDartsError(f"image-size must be an integer of at least 2, got {image_size!r}")
    if skip_bad_images and name != "folder":
        raise FastDartsError(f"--skip-bad-images applies to --dataset folder, not {name}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise FastDartsError(f"workers must be a non-negative integer (0: decode in this process), got {workers!r}")
    if download and name not in ("cifar10", "cifar100"):
        raise FastDartsError(f"--download fetches CIFAR-10 or CIFAR-100; {name} is read from --data as it is")
    if data_budget_mb is not None and not data_budget_mb >= 0:
        raise FastDartsError(f"data-budget-mb must not be negative (0: stream every batch), got {data_budget_mb!r}")


__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "Dataset",
    "FOLDER_DATASETS",
    "DeviceLoader",
    "FileDataset",
    "FileSet",
    "ImageSet",
    "Loaders",
    "StreamLoader",
    "check_data_settings",
    "download_cifar10",
    "download_cifar100",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
]
