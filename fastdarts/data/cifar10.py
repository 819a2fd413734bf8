"""CIFAR-10, python version, and the batch-file reader CIFAR-100 shares.

No torchvision: the batches are pickled dicts of a uint8 ``N x 3072`` array
(channel-major 32x32) and a label list, read by an unpickler that admits only
such data (``safe_pickle``), so a planted batch file cannot run code. The
download is ``archive.download_archive``: checked against its md5 before
anything is extracted, and extracted whole or not at all. CIFAR-100's files
are the same format with another label key and class count, so
``read_cifar_batches`` takes both.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import FastDartsError
from .archive import download_archive
from .dataset import Dataset, ImageSet
from .safe_pickle import RefusedPickle, safe_load

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_NAME = "CIFAR-10"
_LABEL_KEY = b"labels"
_CLASSES = 10
_SIDE = 32


def download_cifar10(root: str | Path, url: str = URL, md5: str = MD5) -> Path:
    """Return ``root/FOLDER``, downloading, verifying and extracting it if absent.

    An archive already in ``root`` is verified instead of downloaded, so a
    machine without internet can be given the file by hand.
    """
    return download_archive(root, url=url, archive=ARCHIVE, md5=md5, folder=FOLDER, name=_NAME)


def load_cifar10(root: str | Path = "./data", download: bool = False) -> Dataset:
    """CIFAR-10 from ``root/FOLDER`` (fetched first when ``download``)."""
    root = Path(root)
    folder = root / FOLDER
    if not folder.is_dir():
        if not download:
            raise FastDartsError(f"CIFAR-10 not found: no folder {folder}; pass --download to fetch it into {root}")
        download_cifar10(root)
    return Dataset(
        name="cifar10",
        train=read_cifar_batches(folder, TRAIN_FILES, name=_NAME, label_key=_LABEL_KEY, num_classes=_CLASSES),
        test=read_cifar_batches(folder, TEST_FILES, name=_NAME, label_key=_LABEL_KEY, num_classes=_CLASSES),
        num_classes=_CLASSES,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        crop_padding=4,
        flip=True,
    )


def read_cifar_batches(folder: Path, files: tuple[str, ...], *, name: str, label_key: bytes,
                       num_classes: int) -> ImageSet:
    """The batch ``files`` of ``folder``, in order, as one set (see ``read_cifar_batch``)."""
    batches = [read_cifar_batch(folder / file, name=name, label_key=label_key, num_classes=num_classes)
               for file in files]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels))


def read_cifar_batch(path: Path, *, name: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch file as uint8 ``[N, 3, 32, 32]`` images and int64 labels, validated.

    ``label_key`` is the dict entry holding the labels (b'labels' for CIFAR-10,
    b'fine_labels' for CIFAR-100), each in ``0..num_classes-1``; ``name`` is
    the data set's name for messages.
    """

    def bad(problem: str) -> FastDartsError:
        return FastDartsError(f"{name} file {path} {problem}: delete {path.parent} and run again with --download")

    try:
        with open(path, "rb") as f:
            batch = safe_load(f)  # never pickle.load: the md5 covers the archive, not the files in the folder
    except FileNotFoundError:
        raise bad("is missing") from None
    except RefusedPickle as exc:  # a planted file that would run code (os.system, eval, ...) on load
        raise bad(f"is not a CIFAR batch ({exc})") from None
    except Exception as exc:  # garbage bytes can make unpickling fail in any way
        raise bad(f"is corrupt ({type(exc).__name__})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise bad(f"lacks the b'data' or {label_key!r} entry")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray):
        raise bad(f"has data of type {type(data).__name__}, expected a numpy array")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _SIDE * _SIDE:
        raise bad(f"has data of dtype {data.dtype} and shape {data.shape}, expected uint8 N x {3 * _SIDE * _SIDE}")
    labels = np.asarray(batch[label_key])
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise bad(f"has labels of shape {labels.shape} and dtype {labels.dtype}, expected {len(data)} integers")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise bad(f"has labels outside 0..{num_classes - 1}")
    images = np.ascontiguousarray(data.reshape(len(data), 3, _SIDE, _SIDE))
    return images, labels.astype(np.int64)
