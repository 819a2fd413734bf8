"""ImageNet (or any folder of JPEGs too large to cache): files decoded as they are read.

The standard layout, ``DIR/train/<wnid>/*.JPEG`` and ``DIR/val/<wnid>/*.JPEG``
(the validation images sorted into class folders, as torchvision's
``ImageFolder`` and every DARTS ImageNet script read them). 1.28 M training
images are about 190 GB as uint8 at 224x224, so unlike ``folder`` there is no
cache: worker processes decode each batch (``jpeg_loader.py``) with DARTS'
ImageNet augmentation, and the mean/std are ImageNet's usual ones.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .dataset import FileDataset, FileSet
from .folder_scan import scan_image_folder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP = 224    # the training crop and the evaluation centre crop
RESIZE = 256  # evaluation: shorter side resized to this first


def load_imagenet(root: str | Path, image_size: int | None = None) -> FileDataset:
    """ImageNet's file lists from ``root`` (``train/`` and ``val/``; nothing is decoded here).

    ``image_size``: the crop side (default 224); evaluation resizes the shorter
    side to ``image_size * 256 / 224`` first, DARTS' 256 -> 224 ratio.
    """
    index = scan_image_folder(root)
    side = CROP if image_size is None else image_size
    return FileDataset(
        name="imagenet",
        train=FileSet(tuple(str(index.path(f)) for f in index.train_files),
                      torch.tensor(index.train_labels, dtype=torch.int64)),
        test=FileSet(tuple(str(index.path(f)) for f in index.heldout_files),
                     torch.tensor(index.heldout_labels, dtype=torch.int64)),
        num_classes=len(index.classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_padding=0,
        flip=True,
        classes=index.classes,
        ordered_by_class=True,
        side=side,
        resize=round(side * RESIZE / CROP),
    )
