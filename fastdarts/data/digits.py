"""scikit-learn's 8x8 digits: a tiny offline stand-in for CIFAR-10.

Bundled with scikit-learn, so tests and smoke runs need no download. Same
layout as CIFAR-10 (uint8 images, 10 classes) with one channel.
"""
from __future__ import annotations

import numpy as np
import torch

from .dataset import Dataset, ImageSet

TRAIN_SIZE = 1437  # the first 1437 images train, the last 360 test


def load_digits() -> Dataset:
    """The 1797 digits as uint8 ``[N, 1, 8, 8]``, values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits as sklearn_digits  # lazy: only this data set needs sklearn

    raw = sklearn_digits()
    images = np.rint(raw.images * 255 / 16).astype(np.uint8)[:, None]  # rint, like round(), ties to even
    labels = raw.target.astype(np.int64)
    train = images[:TRAIN_SIZE] / 255.0
    return Dataset(
        name="digits",
        train=ImageSet(torch.from_numpy(np.ascontiguousarray(images[:TRAIN_SIZE])), torch.from_numpy(labels[:TRAIN_SIZE].copy())),
        test=ImageSet(torch.from_numpy(np.ascontiguousarray(images[TRAIN_SIZE:])), torch.from_numpy(labels[TRAIN_SIZE:].copy())),
        num_classes=10,
        mean=tuple(float(m) for m in train.mean(axis=(0, 2, 3))),
        std=tuple(float(s) for s in train.std(axis=(0, 2, 3))),
        crop_padding=1,
        flip=False,  # a mirrored digit is another glyph
    )
