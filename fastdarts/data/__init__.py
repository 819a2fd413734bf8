"""Data sets as uint8 tensors, augmented on the device (SPEC §5).

A whole data set is small as uint8 (CIFAR-10: 150 MB), so it is kept in one
tensor, moved to the GPU once and augmented there in batches; this avoids a
CPU-bound per-image loader.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import FastDartsError
from .cifar10 import CIFAR10_MEAN, CIFAR10_STD, download_cifar10, load_cifar10
from .dataset import Dataset, ImageSet
from .digits import load_digits
from .loader import DeviceLoader

DATASETS = ("cifar10", "digits")


def load_dataset(name: str, root: str | Path = "./data", download: bool = False) -> Dataset:
    """Load a data set by name; ``root``/``download`` only matter for CIFAR-10."""
    if name == "cifar10":
        return load_cifar10(root, download=download)
    if name == "digits":
        return load_digits()
    raise FastDartsError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "Dataset",
    "DeviceLoader",
    "ImageSet",
    "download_cifar10",
    "load_cifar10",
    "load_dataset",
    "load_digits",
]
